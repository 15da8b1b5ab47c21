//! `kvplane bench nvme`. Not built yet: issue 3 builds it.

use super::CliResult;

#[derive(Debug, clap::Args)]
pub struct NvmeArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: NvmeArgs) -> CliResult {
    Err("`kvplane bench nvme` is not built yet (issue 3)".into())
}
