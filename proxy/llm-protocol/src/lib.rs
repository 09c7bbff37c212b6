//! `llm-protocol`: pure, sans-IO understanding of LLM API traffic.
//!
//! No sockets and no clocks: callers pass bytes and timestamps in.
#![forbid(unsafe_code)]
