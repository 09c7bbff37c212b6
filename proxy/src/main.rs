//! The `crab` binary: a thin shell over the `proxy` library.
#![forbid(unsafe_code)]

/// mimalloc instead of glibc's malloc: the proxy allocates and frees small buffers on every
/// request, across worker threads and the transcript writer, where glibc's arenas cost 10–20%
/// of its CPU (lock round trips, consolidation); measured in the README's proxy benchmark.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(proxy::cli::main());
}
