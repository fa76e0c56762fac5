//! hook-ingest (work in progress).

fn main() {}
