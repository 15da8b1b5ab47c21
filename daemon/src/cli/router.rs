//! `kvplane router`. Not built yet: issue 5 builds it.

use super::CliResult;

#[derive(Debug, clap::Args)]
pub struct RouterArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: RouterArgs) -> CliResult {
    Err("`kvplane router` is not built yet (issue 5)".into())
}
