//! `switchyard demo` (not built yet).

use crate::CliResult;

/// Options of `switchyard demo`.
#[derive(clap::Args)]
pub struct DemoArgs {}

/// Runs `switchyard demo`.
pub async fn run(_args: DemoArgs) -> CliResult {
    Err("`switchyard demo` is not built yet".into())
}
