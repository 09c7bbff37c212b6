//! `ckpt-engine`: the host-scoped checkpoint engine.
#![forbid(unsafe_code)]
