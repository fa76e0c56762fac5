//! hook-replay (work in progress).

fn main() {}
