//! `kvplane router`: the cluster router service (KV event listener + HTTP API).

use crate::CliResult;
use kvplane_router::service::{RouterService, ServiceConfig};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct RouterArgs {
    /// TOML config file (keys of `ServiceConfig`: events_addr, http_addr, grace_ms,
    /// block_size, max_nodes_per_namespace, max_body_bytes, http_timeout_ms,
    /// max_http_connections, seed; a [route] table: prefill_weight, decode_weight,
    /// active_weight, tier_credit, temperature, prediction_ttl_ms, max_predictions; an
    /// [events_tls] table for mutual TLS on the event port: ca_file, cert_file,
    /// key_file, crl_file; `--print-config` lists every key). Flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address daemons and vLLM feed forwarders connect to.
    #[arg(long)]
    pub events_addr: Option<SocketAddr>,
    /// HTTP API address (POST /route, GET /workers, /metrics, /healthz).
    #[arg(long)]
    pub http_addr: Option<SocketAddr>,
    /// How long a disconnected worker stays routable.
    #[arg(long)]
    pub grace_ms: Option<u64>,
    /// Block size for token_ids queries that do not name one.
    #[arg(long)]
    pub block_size: Option<u32>,
    /// Index node cap per namespace (coldest branches are evicted beyond it).
    #[arg(long)]
    pub max_nodes: Option<usize>,
    /// Softmax temperature over negative costs (0 = pick the minimum).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Read KV events from this NATS JetStream server (`nats://host:4222`), in Dynamo's
    /// format; the `[nats]` table of the config file has the other keys (namespace,
    /// component, max_age_s, request_timeout_ms, snapshot_interval_ms).
    #[arg(long)]
    pub nats_url: Option<String>,
    /// Dynamo namespace of the stream name (with --nats-url).
    #[arg(long)]
    pub nats_namespace: Option<String>,
    /// Dynamo component of the stream name (with --nats-url).
    #[arg(long)]
    pub nats_component: Option<String>,
    /// How often this replica writes its index snapshot to the object store (0 = never).
    #[arg(long)]
    pub snapshot_interval_ms: Option<u64>,
    /// Print the effective configuration as JSON and exit.
    #[arg(long)]
    pub print_config: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RouterCliError {
    #[error("read router config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parse router config {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("start the tokio runtime")]
    Runtime(#[source] std::io::Error),
    #[error("NATS URL {url}: {reason}")]
    NatsUrl { url: String, reason: String },
    #[error(transparent)]
    Nats(#[from] kvplane_router::nats::NatsError),
}

pub fn effective_config(args: &RouterArgs) -> Result<ServiceConfig, RouterCliError> {
    let mut cfg = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| RouterCliError::Read {
                path: path.clone(),
                source,
            })?;
            toml::from_str(&text).map_err(|source| RouterCliError::Parse {
                path: path.clone(),
                source,
            })?
        }
        None => ServiceConfig::default(),
    };
    if let Some(a) = args.events_addr {
        cfg.events_addr = a;
    }
    if let Some(a) = args.http_addr {
        cfg.http_addr = a;
    }
    if let Some(g) = args.grace_ms {
        cfg.grace_ms = g;
    }
    if let Some(b) = args.block_size {
        cfg.block_size = b;
    }
    if let Some(n) = args.max_nodes {
        cfg.max_nodes_per_namespace = n;
    }
    if let Some(t) = args.temperature {
        cfg.route.temperature = t;
    }
    if let Some(url) = &args.nats_url {
        cfg.nats.get_or_insert_with(Default::default).stream.url = url.clone();
    }
    if let Some(n) = cfg.nats.as_mut() {
        if let Some(ns) = &args.nats_namespace {
            n.stream.namespace = ns.clone();
        }
        if let Some(c) = &args.nats_component {
            n.stream.component = c.clone();
        }
        if let Some(ms) = args.snapshot_interval_ms {
            n.snapshot_interval_ms = ms;
        }
    }
    Ok(cfg)
}

pub fn run(args: RouterArgs) -> CliResult {
    let cfg = effective_config(&args)?;
    if args.print_config {
        println!("{}", serde_json::to_string_pretty(&cfg)?);
        return Ok(());
    }
    if let Some(n) = &cfg.nats {
        // Fail at start-up on a bad URL or auth file; they are read again at each
        // connection (a rotated token or certificate is picked up).
        kvplane_router::nats::check_url(&n.stream.url).map_err(|reason| {
            RouterCliError::NatsUrl {
                url: n.stream.url.clone(),
                reason,
            }
        })?;
        n.stream
            .auth
            .load(&mut kvplane_router::tls::read_file)
            .map_err(RouterCliError::from)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(RouterCliError::Runtime)?;
    rt.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        // Before the ports open: a SIGHUP sent as soon as they do (a certificate renewer
        // watching the port) must not kill the router. SIGHUP reads the event port's TLS
        // files again (a renewed certificate, a new revocation list) without dropping
        // the index; SIGINT or SIGTERM stops the router.
        let mut hangup = signal(SignalKind::hangup())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let tls_on = !cfg.events_tls.is_empty();
        if cfg.events_tls.is_empty() && !cfg.events_addr.ip().is_loopback() {
            tracing::warn!(
                events = %cfg.events_addr,
                "the event port is plain TCP off loopback: any peer that reaches it can \
                 announce workers and steer routing (set [events_tls])"
            );
        }
        let svc = RouterService::start(cfg).await?;
        tracing::info!(
            events = %svc.events_addr,
            http = %svc.http_addr,
            "kvplane router listening"
        );
        eprintln!(
            "kvplane router: events on {}, HTTP on {} (Ctrl-C to stop)",
            svc.events_addr, svc.http_addr
        );
        loop {
            tokio::select! {
                _ = interrupt.recv() => break,
                _ = terminate.recv() => break,
                got = hangup.recv() => {
                    if got.is_none() {
                        break;
                    }
                    match svc.reload_tls() {
                        Ok(ended) if tls_on => tracing::info!(ended, "event port TLS files read again; connections they no longer admit ended"),
                        Ok(_) => tracing::info!("SIGHUP: the event port has no TLS files to read"),
                        Err(err) => tracing::error!(%err, "event port TLS files not reloaded; the previous ones stay"),
                    }
                }
            }
        }
        svc.shutdown();
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cmd {
        #[command(flatten)]
        args: RouterArgs,
    }

    #[test]
    fn config_file_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("router.toml");
        std::fs::write(
            &path,
            "grace_ms = 500\nblock_size = 32\n[route]\ndecode_weight = 0.25\ntier_credit = [1.0, 0.7, 0.3]\n",
        )
        .unwrap();
        let cmd = Cmd::parse_from([
            "x",
            "--config",
            path.to_str().unwrap(),
            "--block-size",
            "64",
            "--http-addr",
            "127.0.0.1:9999",
        ]);
        let cfg = effective_config(&cmd.args).unwrap();
        assert_eq!(cfg.grace_ms, 500);
        assert_eq!(cfg.block_size, 64, "flag overrides file");
        assert_eq!(cfg.route.decode_weight, 0.25);
        assert_eq!(cfg.route.tier_credit.0, [1.0, 0.7, 0.3]);
        assert_eq!(cfg.http_addr.port(), 9999);

        std::fs::write(&path, "grace_msec = 1\n").unwrap();
        let cmd = Cmd::parse_from(["x", "--config", path.to_str().unwrap()]);
        let err = effective_config(&cmd.args).unwrap_err();
        assert!(matches!(err, RouterCliError::Parse { .. }), "{err}");
    }
}
