//! `kvplane replay`: router-only replay of a Mooncake trace over simulated workers,
//! comparing round-robin, overlap-only and the cost router.

use super::CliResult;
use kvplane_router::replay::{self, Policy, PolicyReport, ReplayConfig};
use std::path::{Path, PathBuf};

const DEFAULT_TRACE: &str = "data/traces/mooncake/synthetic_trace.jsonl";

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Mooncake JSONL trace (default: the bundled synthetic trace).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Simulated workers.
    #[arg(long, default_value_t = 8)]
    pub workers: usize,
    /// Blocks (512 tokens each) each simulated worker caches (LRU).
    #[arg(long, default_value_t = 4096)]
    pub capacity_blocks: usize,
    /// Simulated prefill time per uncached 512-token block.
    #[arg(long, default_value_t = 25.0)]
    pub prefill_ms_per_block: f64,
    /// Simulated decode time per output token.
    #[arg(long, default_value_t = 20.0)]
    pub decode_ms_per_token: f64,
    /// Cost router: weight of uncached (and queued) prefill blocks.
    #[arg(long, default_value_t = 1.0)]
    pub prefill_weight: f64,
    /// Cost router: weight of KV blocks held by running requests.
    #[arg(long, default_value_t = 1.0)]
    pub decode_weight: f64,
    /// Cost router: weight per running request.
    #[arg(long, default_value_t = 1.0)]
    pub active_weight: f64,
    /// Seed for tie-breaking.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Replay against simulated engines (`kvplane engine-sim` processes) on real
    /// `kvplane serve` daemons, next to a round-robin baseline without daemon tiers.
    #[arg(long)]
    pub engines: bool,
    #[command(flatten)]
    pub engine_opts: super::replay_engines::EngineReplayArgs,
    /// Carry the cost policy's KV events through a real NATS JetStream server to router
    /// replicas and check every replica against the in-process index.
    #[arg(long)]
    pub nats: bool,
    #[command(flatten)]
    pub nats_opts: super::replay_nats::NatsReplayArgs,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayCliError {
    #[error("--workers must be at least 1")]
    NoWorkers,
    #[error("trace {0} not found (looked in the current directory and the source tree)")]
    TraceNotFound(PathBuf),
}

fn resolve_trace(arg: Option<&Path>) -> Result<PathBuf, ReplayCliError> {
    if let Some(p) = arg {
        return Ok(p.to_path_buf());
    }
    let here = PathBuf::from(DEFAULT_TRACE);
    if here.exists() {
        return Ok(here);
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(DEFAULT_TRACE);
    if src.exists() {
        return Ok(src);
    }
    Err(ReplayCliError::TraceNotFound(here))
}

pub fn run(args: ReplayArgs) -> CliResult {
    if args.engines {
        let trace_path = resolve_trace(args.trace.as_deref())?;
        let route = kvplane_router::route::RouteConfig {
            prefill_weight: args.prefill_weight,
            decode_weight: args.decode_weight,
            active_weight: args.active_weight,
            ..Default::default()
        };
        let input = super::replay_engines::ReplayInput {
            trace_path,
            workers: args.workers,
            seed: args.seed,
            json: args.json,
            route,
        };
        return super::replay_engines::run(input, args.engine_opts);
    }
    if args.workers == 0 {
        return Err(ReplayCliError::NoWorkers.into());
    }
    let path = resolve_trace(args.trace.as_deref())?;
    let trace = replay::load_trace(&path)?;
    let cfg = ReplayConfig {
        workers: args.workers,
        capacity_blocks: args.capacity_blocks,
        prefill_ms_per_block: args.prefill_ms_per_block,
        decode_ms_per_token: args.decode_ms_per_token,
        seed: args.seed,
        ..ReplayConfig::default()
    };
    let mut cfg = cfg;
    cfg.route.prefill_weight = args.prefill_weight;
    cfg.route.decode_weight = args.decode_weight;
    cfg.route.active_weight = args.active_weight;
    if args.nats {
        return super::replay_nats::run(&trace, &cfg, &args.nats_opts, args.json);
    }
    let reports: Vec<(Policy, PolicyReport)> = Policy::ALL
        .iter()
        .map(|&p| (p, replay::replay(&trace, p, &cfg)))
        .collect();
    let ceiling = replay::infinite_cache_hit_rate(&trace);
    if args.json {
        let mut obj = serde_json::Map::new();
        obj.insert("trace".into(), path.display().to_string().into());
        obj.insert("requests".into(), trace.len().into());
        obj.insert("workers".into(), cfg.workers.into());
        obj.insert("capacity_blocks".into(), cfg.capacity_blocks.into());
        obj.insert("infinite_cache_block_hit_rate".into(), ceiling.into());
        for (p, r) in &reports {
            obj.insert(p.name().into(), serde_json::to_value(r)?);
        }
        println!("{}", serde_json::Value::Object(obj));
    } else {
        println!(
            "trace {} ({} requests), {} simulated workers x {} blocks (LRU), infinite-cache hit rate {:.3}",
            path.display(),
            trace.len(),
            cfg.workers,
            cfg.capacity_blocks,
            ceiling
        );
        println!(
            "{:<12} {:>14} {:>10} {:>13} {:>13}",
            "policy", "block_hit_rate", "imbalance", "route_p50_us", "route_p99_us"
        );
        for (p, r) in &reports {
            println!(
                "{:<12} {:>14.3} {:>10.2} {:>13.2} {:>13.2}",
                p.name(),
                r.block_hit_rate,
                r.imbalance,
                r.route_p50_us,
                r.route_p99_us
            );
        }
    }
    Ok(())
}
