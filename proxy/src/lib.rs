//! `proxy`: the Crab sidecar (binary `crab`).
//!
//! Responsibility: a transparent HTTP(S) reverse proxy between agents and LLM endpoints that
//! forwards every byte unchanged and as it arrives, taps a copy of the traffic to mark turn
//! boundaries (via `llm-protocol`), keeps a redacted transcript, and exposes an admin API,
//! Prometheus metrics and the `crab` CLI. Later it wires the inspector and the checkpoint engine
//! together (coordinator + response gate).
#![forbid(unsafe_code)]
