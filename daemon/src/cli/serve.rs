//! `kvplane serve`: run the node daemon until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::sync::Arc;

use super::CliResult;
use crate::block::{BlockManager, ManagerOptions};
use crate::config::Config;
use crate::control::events::EventStream;
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
    let (events_tx, events_rx) = crossbeam::channel::bounded(config.events.queue_events);
    let streaming = !config.events.routers.is_empty();
    let options = ManagerOptions {
        events: streaming.then_some(events_tx),
        ..ManagerOptions::default()
    };
    let blocks = Arc::new(BlockManager::new(&config.blocks, &config.tiers, options)?);
    let pool = blocks.host_pool().report();
    tracing::info!(
        block_bytes = config.blocks.block_bytes,
        host_pool_bytes = pool.bytes,
        host_pool_touch_s = pool.touch_seconds,
        startup_s = t0.elapsed().as_secs_f64(),
        "tiers ready"
    );
    let dataplane = Arc::new(DataPlane::with_blocks(Arc::clone(&blocks)));
    let worker = config.events.resolve_worker_id(&config.serve.socket_path);
    let events = if streaming {
        let s = EventStream::start(
            &config.events,
            worker,
            Arc::clone(&blocks),
            Arc::clone(&dataplane),
            events_rx,
        )?;
        tracing::info!(worker, routers = ?config.events.routers, "streaming KV events to routers");
        Some(s)
    } else {
        None
    };
    let daemon = Daemon::start(config, dataplane)?;
    let control = crate::control::admin::start_for(&daemon);
    let sig = signals::wait_termination()?;
    tracing::info!(signal = sig, "shutting down: finishing in-flight batches");
    crate::control::admin::shutdown(daemon, control);
    if let Some(e) = events {
        e.stop();
    }
    tracing::info!("daemon stopped");
    Ok(())
}
