//! `switchyard send` and `switchyard listen` (not built yet).

use crate::CliResult;

/// Options of `switchyard send`.
#[derive(clap::Args)]
pub struct SendArgs {}

/// Options of `switchyard listen`.
#[derive(clap::Args)]
pub struct ListenArgs {}

/// Runs `switchyard send`.
pub async fn send(_args: SendArgs) -> CliResult {
    Err("`switchyard send` is not built yet".into())
}

/// Runs `switchyard listen`.
pub async fn listen(_args: ListenArgs) -> CliResult {
    Err("`switchyard listen` is not built yet".into())
}
