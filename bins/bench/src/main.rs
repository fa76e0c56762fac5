//! hook-bench (work in progress).

fn main() {}
