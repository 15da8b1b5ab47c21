//! `kvplane serve`. Not built yet: issue 2 builds it.

use super::CliResult;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: ServeArgs) -> CliResult {
    Err("`kvplane serve` is not built yet (issue 2)".into())
}
