//! ipc vs raw unix socket (filled in later).
fn main() {}
