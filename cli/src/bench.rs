//! `switchyard bench` (not built yet).

use crate::CliResult;

/// Options of `switchyard bench`.
#[derive(clap::Args)]
pub struct BenchArgs {}

/// Runs `switchyard bench`.
pub async fn run(_args: BenchArgs) -> CliResult {
    Err("`switchyard bench` is not built yet".into())
}
