//! hook-archive (work in progress).

fn main() {}
