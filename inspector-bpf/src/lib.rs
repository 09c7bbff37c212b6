//! `inspector-bpf`: the eBPF turn-effect inspector.

pub mod cli;
