//! `content-store`: a portable content-addressed incremental snapshot store.
#![forbid(unsafe_code)]
