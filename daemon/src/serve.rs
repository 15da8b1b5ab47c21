//! `kvplane serve`: run the node daemon until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::sync::Arc;

use crate::block::{BlockManager, ManagerOptions, NamespaceQuota};
use crate::config::Config;
use crate::control::events::EventStream;
use crate::control::signals;
use crate::dataplane::DataPlane;
use crate::device::DaemonDevice;
use crate::privileges::{DropPlan, drop_privileges};
use crate::session::Daemon;

/// What `kvplane serve` returns: any start-up error, printed with its context by the binary.
pub type ServeResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

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

pub fn run(args: ServeArgs) -> ServeResult {
    if args.print_default_config {
        print!("{}", Config::default_toml());
        return Ok(());
    }
    let mut config = load_config(&args)?;
    // Before the tiers are built: a cap on engines' mappings the kernel cannot honour
    // stops the start-up at once (the daemon resolves it again when it starts serving).
    config
        .serve
        .engine_mapping_limits(crate::config::max_map_count())?;
    // NATS credentials and the routers' TLS files are root's: read them now, before
    // privileges are dropped.
    config.events.load_nats_auth()?;
    let events_tls = config.events.load_tls()?;
    if events_tls.is_none()
        && config
            .events
            .router_addrs()
            .iter()
            .any(|a| !a.ip().is_loopback())
    {
        tracing::warn!(
            routers = ?config.events.routers,
            "KV events go to routers off loopback in plain TCP (set [events.tls])"
        );
    }
    signals::block_termination()?;
    let t0 = std::time::Instant::now();
    let (events_tx, events_rx) = crossbeam::channel::bounded(config.events.queue_events);
    let streaming = config.events.enabled();
    let quotas = config
        .namespaces
        .iter()
        .filter(|ns| ns.max_bytes().values().any(Option::is_some))
        .map(|ns| NamespaceQuota {
            namespace: crate::dataplane::namespace_id(&ns.name),
            name: ns.name.clone(),
            max_bytes: ns.max_bytes(),
        })
        .collect();
    // Before any tier: G1 is allocated on this device and the host pool registered with
    // it. `backend = "cuda"` without a driver or that GPU ends the start-up here.
    let mut device = DaemonDevice::open(&config.device)?;
    device.log();
    let options = ManagerOptions {
        events: streaming.then_some(events_tx),
        quotas,
        device: Some(Arc::clone(&device.device)),
        ..ManagerOptions::default()
    };
    let blocks = Arc::new(BlockManager::new(&config.blocks, &config.tiers, options)?);
    device.nvme_g1_path = blocks.stores().nvme_g1.describe.clone();
    let pool = blocks.host_pool().report();
    let tiers = blocks.stats().tiers;
    let has_nvme = tiers
        .iter()
        .any(|t| t.tier == crate::tier::Tier::Nvme && t.capacity_slots > 0);
    if blocks.has_g1() && has_nvme {
        tracing::info!(path = %device.nvme_g1_path, "NVMe <-> G1");
    }
    tracing::info!(
        block_bytes = config.blocks.block_bytes,
        host_pool_bytes = pool.bytes,
        host_pool_touch_s = pool.touch_seconds,
        startup_s = t0.elapsed().as_secs_f64(),
        "tiers ready"
    );
    let dataplane = Arc::new(DataPlane::with_blocks(Arc::clone(&blocks)));
    // Configured names are known before any engine attaches: blocks restored from NVMe are
    // published to routers under their names, and two names whose ids collide stop the
    // start-up instead of the second tenant's first attach.
    let configured: Vec<String> = config.namespaces.iter().map(|n| n.name.clone()).collect();
    dataplane.bind_namespaces(&configured)?;
    // Everything privileged is done once the socket is bound: drop before any long-lived
    // thread starts (capabilities are per thread; new threads inherit the empty sets).
    let drop = config.serve.drop_privileges.then_some(DropPlan {
        run_as_uid: config.serve.run_as_uid,
        run_as_gid: config.serve.run_as_gid,
    });
    // The control listeners first (the engine socket answering is what tells clients the
    // daemon is up): the control socket's group is set with CAP_CHOWN, its directory may
    // be root's. The engine socket's directory is checked and made before either, so the
    // control socket (next to it by default) is never put through a link or into a
    // directory the daemon would refuse.
    crate::session::prepare_socket_dir(&config)?;
    let control = crate::control::admin::bind_for(&config);
    let bound = Daemon::bind(config.clone(), Arc::clone(&dataplane))?;
    if let Some(plan) = drop {
        let now = drop_privileges(plan)?;
        tracing::info!(
            uid = now.uid,
            gid = now.gid,
            cap_bounding = format!("{:#x}", now.cap_bounding),
            "privileges dropped: no capabilities, no_new_privs, not dumpable"
        );
    }
    let worker = config.events.resolve_worker_id(&config.serve.socket_path);
    let events = if streaming {
        let s = EventStream::start(
            &config.events,
            events_tls,
            worker,
            Arc::clone(&blocks),
            Arc::clone(&dataplane),
            events_rx,
        )?;
        tracing::info!(worker, routers = ?config.events.routers, nats = ?config.events.nats_url, "streaming KV events");
        Some(s)
    } else {
        None
    };
    let daemon = bound.start()?;
    let links = crate::control::admin::EventLinks {
        nats: events.as_ref().and_then(EventStream::nats_stats),
        routers: events
            .as_ref()
            .map(EventStream::router_links)
            .unwrap_or_default(),
    };
    let control = crate::control::admin::start_for(&daemon, control, &device, links);
    let sig = signals::wait_termination()?;
    tracing::info!(signal = sig, "shutting down: finishing in-flight batches");
    crate::control::admin::shutdown(daemon, control);
    if let Some(e) = events {
        e.stop();
    }
    tracing::info!("daemon stopped");
    Ok(())
}
