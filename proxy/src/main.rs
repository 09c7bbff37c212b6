//! The `crab` binary: a thin shell over the `proxy` library.
#![forbid(unsafe_code)]

fn main() {
    std::process::exit(proxy::cli::main());
}
