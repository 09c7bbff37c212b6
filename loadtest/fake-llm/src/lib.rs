//! `fake-llm`: a scripted OpenAI/Anthropic-compatible LLM server.
#![forbid(unsafe_code)]
