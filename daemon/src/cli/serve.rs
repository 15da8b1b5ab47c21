//! `kvplane serve`: run the node daemon until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::sync::Arc;

use super::CliResult;
use crate::block::{BlockManager, ManagerOptions};
use crate::config::Config;
use crate::control::signals;
use crate::dataplane::DataPlane;
use crate::session::Daemon;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Config file (TOML); `--print-default-config` shows every key.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Engine socket path (overrides serve.socket_path).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Print the default configuration, documented, and exit.
    #[arg(long)]
    pub print_default_config: bool,
}

/// Load the config file (or the defaults) and apply flag overrides.
pub fn load_config(args: &ServeArgs) -> Result<Config, crate::config::ConfigError> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(socket) = &args.socket {
        config.serve.socket_path = socket.clone();
    }
    config.validate()?;
    Ok(config)
}

pub fn run(args: ServeArgs) -> CliResult {
    if args.print_default_config {
        print!("{}", Config::default_toml());
        return Ok(());
    }
    let config = load_config(&args)?;
    signals::block_termination()?;
    let t0 = std::time::Instant::now();
    let blocks = BlockManager::new(&config.blocks, &config.tiers, ManagerOptions::default())?;
    let pool = blocks.host_pool().report();
    tracing::info!(
        block_bytes = config.blocks.block_bytes,
        host_pool_bytes = pool.bytes,
        host_pool_touch_s = pool.touch_seconds,
        startup_s = t0.elapsed().as_secs_f64(),
        "tiers ready"
    );
    let daemon = Daemon::start(config, Arc::new(DataPlane::with_blocks(Arc::new(blocks))))?;
    let control = crate::control::admin::start_for(&daemon);
    let sig = signals::wait_termination()?;
    tracing::info!(signal = sig, "shutting down: finishing in-flight batches");
    crate::control::admin::shutdown(daemon, control);
    tracing::info!("daemon stopped");
    Ok(())
}
