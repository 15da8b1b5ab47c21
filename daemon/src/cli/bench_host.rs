//! `kvplane bench host`. Not built yet: issue 3 builds it.

use super::CliResult;

#[derive(Debug, clap::Args)]
pub struct HostArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: HostArgs) -> CliResult {
    Err("`kvplane bench host` is not built yet (issue 3)".into())
}
