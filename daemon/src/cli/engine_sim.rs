//! `kvplane engine-sim`. Not built yet: issue 6 builds it.

use super::CliResult;

#[derive(Debug, clap::Args)]
pub struct EngineSimArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: EngineSimArgs) -> CliResult {
    Err("`kvplane engine-sim` is not built yet (issue 6)".into())
}
