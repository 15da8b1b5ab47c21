//! `kvplane bench lookup`. Not built yet: issue 3 builds it.

use super::CliResult;

#[derive(Debug, clap::Args)]
pub struct LookupArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: LookupArgs) -> CliResult {
    Err("`kvplane bench lookup` is not built yet (issue 3)".into())
}
