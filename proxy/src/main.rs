//! The `crab` binary: a thin shell over the `proxy` library.
#![forbid(unsafe_code)]

fn main() {
    println!("crab: not wired yet");
}
