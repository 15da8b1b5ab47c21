//! `kvplane engine-sim`: a simulated inference engine in its own process. It attaches to a
//! daemon over the rings like a real engine (its KV pool registered as the session's KV
//! buffer), then takes commands as JSON lines on stdin and answers on stdout
//! (`kvplane_sim::engine_sim::proto`). `kvplane replay --engines` starts and drives these.

use std::path::PathBuf;

use super::CliResult;
use crate::engine_sim::cost::TransferCost;
use crate::engine_sim::engine::{Engine, EngineConfig, Offload, serve, serve_real_time};
use crate::engine_sim::pages::KvGeometry;
use crate::engine_sim::proto::Command;

#[derive(Debug, clap::Args)]
pub struct EngineSimArgs {
    /// Daemon socket to attach to; without it the engine runs on its own pool only.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Worker id reported in events and stats.
    #[arg(long, default_value_t = 0)]
    pub worker: u64,
    /// Pages (blocks) in the engine's KV pool.
    #[arg(long, default_value_t = 16_384)]
    pub pages: u32,
    /// Tokens per page (the engine's block size).
    #[arg(long, default_value_t = 64)]
    pub page_tokens: u32,
    /// Layers of the simulated model (page bytes = layers x 2 x page_tokens x head_bytes).
    #[arg(long, default_value_t = 2)]
    pub layers: u32,
    /// Bytes of one head of one token.
    #[arg(long, default_value_t = 16)]
    pub head_bytes: u32,
    /// Token budget of one pass (chunked prefill).
    #[arg(long, default_value_t = 8192)]
    pub max_batched_tokens: u64,
    /// Most sequences running at once.
    #[arg(long, default_value_t = 256)]
    pub max_running: usize,
    /// When pages are offered to the daemon.
    #[arg(long, value_enum, default_value_t = Offload::Eager)]
    pub offload: Offload,
    /// Namespace the session binds.
    #[arg(long, default_value = "replay")]
    pub namespace: String,
    /// Wall-clock mode: passes are slept for their modelled duration and requests arrive
    /// when received (default: virtual clock driven by `Advance`).
    #[arg(long)]
    pub real_time: bool,
    /// What the virtual clock charges for transfers with the daemon, as JSON
    /// (`kvplane_sim::engine_sim::cost::TransferCost`; default: Llama-3.1-8B pages over the
    /// H200 link profile). `kvplane replay --engines` passes its `--model` and `--link`.
    #[arg(long, value_parser = parse_cost)]
    pub cost: Option<TransferCost>,
    /// Print one JSON object instead of a table (accepted for symmetry; the engine's
    /// output is always JSON lines).
    #[arg(long)]
    pub json: bool,
}

fn parse_cost(s: &str) -> Result<TransferCost, String> {
    serde_json::from_str(s).map_err(|e| format!("not a transfer cost: {e}"))
}

impl EngineSimArgs {
    pub fn config(&self) -> EngineConfig {
        EngineConfig {
            worker: self.worker,
            geometry: KvGeometry {
                layers: self.layers,
                page_tokens: self.page_tokens,
                head_bytes: self.head_bytes,
                num_pages: self.pages,
                ..KvGeometry::default()
            },
            max_batched_tokens: self.max_batched_tokens.max(1),
            max_running: self.max_running.max(1),
            offload: self.offload,
            namespace: self.namespace.clone(),
            cost: self.cost.clone().unwrap_or_default(),
            ..EngineConfig::default()
        }
    }
}

pub fn run(args: EngineSimArgs) -> CliResult {
    let stdout = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    let mut engine = Engine::new(args.config(), args.socket.as_deref(), stdout)?;
    if !args.real_time {
        serve(&mut engine, std::io::stdin().lock())?;
        return Ok(());
    }
    // Commands are read on their own thread so the engine keeps its pass schedule.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("engine-sim-stdin".into())
        .spawn(move || {
            use std::io::BufRead;
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { return };
                if line.trim().is_empty() {
                    continue;
                }
                let msg = serde_json::from_str::<Command>(&line)
                    .map_err(|e| format!("bad command line: {e}"));
                if tx.send(msg).is_err() {
                    return;
                }
            }
        })?;
    serve_real_time(&mut engine, rx)?;
    Ok(())
}
