//! `kvplane bench ring`. Not built yet: issue 2 builds it.

use super::CliResult;

#[derive(Debug, clap::Args)]
pub struct RingArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: RingArgs) -> CliResult {
    Err("`kvplane bench ring` is not built yet (issue 2)".into())
}
