//! `kvplane replay`. Not built yet: issue 5 builds it.

use super::CliResult;

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: ReplayArgs) -> CliResult {
    Err("`kvplane replay` is not built yet (issue 5)".into())
}
