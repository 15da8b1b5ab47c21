//! `kvplane bench gather`. Not built yet: issue 4 builds it.

use super::CliResult;

#[derive(Debug, clap::Args)]
pub struct GatherArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: GatherArgs) -> CliResult {
    Err("`kvplane bench gather` is not built yet (issue 4)".into())
}
