//! `inspector-bpf`: the eBPF turn-effect inspector.
