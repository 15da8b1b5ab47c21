//! `kvplane demo`: the main job on the built-in defaults, with no GPU. For now: a daemon
//! on a temporary socket and an engine process that talks to it over the rings.

use std::sync::Arc;

use super::CliResult;
use kvplane_daemon::config::Config;
use kvplane_daemon::dataplane::DataPlane;
use kvplane_daemon::session::Daemon;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// NOPs the engine process sends.
    #[arg(long, default_value_t = 1_000_000)]
    pub count: u64,
}

pub fn run(args: DemoArgs) -> CliResult {
    let dir = std::env::temp_dir().join(format!("kvplane-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut config = Config::default();
    config.serve.socket_path = dir.join("kvplane.sock");
    println!(
        "starting daemon on {} (ring NOPs only: no tiers, no device)",
        config.serve.socket_path.display()
    );
    let daemon = Daemon::start(config, Arc::new(DataPlane::new()))?;
    let exe = std::env::current_exe()?;
    println!(
        "starting an engine process: kvplane ping --count {}",
        args.count
    );
    let status = std::process::Command::new(exe)
        .arg("ping")
        .arg("--socket")
        .arg(daemon.socket_path())
        .args(["--count", &args.count.to_string()])
        .status()?;
    daemon.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    if !status.success() {
        return Err(format!("engine process failed: {status}").into());
    }
    println!("daemon stopped cleanly");
    Ok(())
}
