//! `loadtest`: Crab's evaluation harness.
#![forbid(unsafe_code)]

fn main() {
    println!("loadtest: not wired yet");
}
