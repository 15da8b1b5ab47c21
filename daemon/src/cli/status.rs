//! `kvplane status`. Not built yet: issue 8 builds it.

use super::CliResult;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: StatusArgs) -> CliResult {
    Err("`kvplane status` is not built yet (issue 8)".into())
}
