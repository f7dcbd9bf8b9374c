//! `switchyard bus` (not built yet).

use crate::CliResult;

/// Options of `switchyard bus`.
#[derive(clap::Args)]
pub struct BusArgs {}

/// Runs `switchyard bus`.
pub async fn run(_args: BusArgs) -> CliResult {
    Err("`switchyard bus` is not built yet".into())
}
