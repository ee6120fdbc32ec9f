//! Placeholder while the benchmark is being written.
fn main() {}
