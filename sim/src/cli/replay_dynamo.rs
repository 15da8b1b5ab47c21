//! NVIDIA Dynamo's own replay next to `kvplane replay --engines`, only where measured:
//! - `--with-dynamo` runs `python -m dynamo.replay` (ai-dynamo, installed into a venv by
//!   `scripts/install-dynamo.sh`) on the same trace with the same settings, both router
//!   modes, and reads its JSON reports;
//! - otherwise a recorded run (`data/reference/dynamo-replay-*.json`: the command, the
//!   versions, the trace's content hash, the settings and Dynamo's raw report) is shown
//!   only when the trace's hash and every setting match, labelled with its date.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::bench::serve_child::log_tail;

/// The version `scripts/install-dynamo.sh` installs (1.6.x needs nvidia-smi to install).
pub const DYNAMO_VERSION: &str = "1.4.2";
/// File name prefix of recorded runs in the reference directory.
const REFERENCE_PREFIX: &str = "dynamo-replay-";

/// Everything that decides Dynamo's figures besides the trace. Equal settings and an equal
/// trace hash are what lets a recorded run stand next to this run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DynamoSettings {
    pub workers: usize,
    /// Engine page (block) tokens.
    pub block_size: u32,
    /// Tokens per `hash_ids` entry.
    pub trace_block_size: u64,
    /// Engine pool pages.
    pub num_gpu_blocks: u32,
    pub max_num_batched_tokens: u64,
    pub max_num_seqs: usize,
    pub arrival_speedup_ratio: f64,
    pub replay_mode: String,
}

impl DynamoSettings {
    /// `--extra-engine-args` for the mock engine.
    fn engine_args(&self) -> String {
        serde_json::json!({
            "block_size": self.block_size,
            "num_gpu_blocks": self.num_gpu_blocks,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_num_seqs": self.max_num_seqs,
        })
        .to_string()
    }
}

/// The trace as replayed: content hash (xxh3-128 of the JSONL bytes) and request count.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceId {
    pub file: String,
    pub xxh3_128: String,
    pub requests: usize,
}

impl TraceId {
    pub fn of_bytes(file: &str, bytes: &[u8], requests: usize) -> Self {
        TraceId {
            file: file.into(),
            xxh3_128: format!("{:032x}", xxhash_rust::xxh3::xxh3_128(bytes)),
            requests,
        }
    }
}

/// One Dynamo replay run: how it was started and its raw report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DynamoRun {
    pub router_mode: String,
    pub command: Vec<String>,
    pub wall_s: f64,
    /// `--report-json` as Dynamo wrote it.
    pub report: serde_json::Value,
}

/// A recorded (or just measured) pair of Dynamo runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DynamoReference {
    pub recorded: String,
    pub machine: String,
    pub produced_by: String,
    pub versions: serde_json::Value,
    pub trace: TraceId,
    pub settings: DynamoSettings,
    pub runs: Vec<DynamoRun>,
}

/// Dynamo's figures for one router mode, read from its report.
#[derive(Clone, Debug, Serialize)]
pub struct DynamoRow {
    pub router_mode: String,
    pub prefix_reuse: f64,
    pub ttft_mean_ms: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub e2e_p50_ms: f64,
    pub e2e_p99_ms: f64,
    pub input_tokens: u64,
    /// Input tokens x (1 - prefix reuse): Dynamo reports the ratio, not the count.
    pub computed_tokens: u64,
    /// "measured in this run" or "recorded DATE, not re-run".
    pub label: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DynamoError {
    #[error(
        "Dynamo's replay is not installed ({python} not found): run scripts/install-dynamo.sh, or give --dynamo-python"
    )]
    NotInstalled { python: PathBuf },
    #[error("running {what}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed ({status}); log {log}:\n{tail}")]
    Failed {
        what: String,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Dynamo report {path}: {reason}")]
    Report { path: PathBuf, reason: String },
}

/// The venv's python: `--dynamo-python`, `KVPLANE_DYNAMO_PYTHON`, or the install script's
/// default.
pub fn dynamo_python(arg: Option<&Path>) -> PathBuf {
    if let Some(p) = arg {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os("KVPLANE_DYNAMO_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = std::env::var_os("KVPLANE_DYNAMO_VENV").map_or_else(
        || {
            std::env::var_os("HOME")
                .map_or_else(|| PathBuf::from("/root"), PathBuf::from)
                .join(".cache/kvplane/dynamo")
        },
        PathBuf::from,
    );
    venv.join("bin/python")
}

fn versions(python: &Path) -> Result<serde_json::Value, DynamoError> {
    let out = Command::new(python)
        .args([
            "-c",
            "import importlib.metadata as m, json, platform; print(json.dumps({'ai-dynamo': m.version('ai-dynamo'), 'ai-dynamo-runtime': m.version('ai-dynamo-runtime'), 'python': platform.python_version()}))",
        ])
        .stderr(Stdio::null())
        .output()
        .map_err(|source| DynamoError::Spawn {
            what: format!("{} (version check)", python.display()),
            source,
        })?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    if !out.status.success() || v["ai-dynamo"].as_str().is_none() {
        return Err(DynamoError::NotInstalled {
            python: python.to_path_buf(),
        });
    }
    Ok(v)
}

/// Runs Dynamo's replay of `trace` in both router modes.
pub fn run_dynamo(
    python: &Path,
    trace: &Path,
    trace_id: TraceId,
    settings: &DynamoSettings,
    work_dir: &Path,
) -> Result<DynamoReference, DynamoError> {
    if !python.exists() {
        return Err(DynamoError::NotInstalled {
            python: python.to_path_buf(),
        });
    }
    let versions = versions(python)?;
    let mut runs = Vec::new();
    for mode in ["kv_router", "round_robin"] {
        let report_path = work_dir.join(format!("dynamo-{mode}.json"));
        let log = work_dir.join(format!("dynamo-{mode}.log"));
        let args: Vec<String> = vec![
            "-m".into(),
            "dynamo.replay".into(),
            trace.display().to_string(),
            "--num-workers".into(),
            settings.workers.to_string(),
            "--replay-mode".into(),
            settings.replay_mode.clone(),
            "--router-mode".into(),
            mode.into(),
            "--trace-block-size".into(),
            settings.trace_block_size.to_string(),
            "--arrival-speedup-ratio".into(),
            settings.arrival_speedup_ratio.to_string(),
            "--extra-engine-args".into(),
            settings.engine_args(),
            "--report-json".into(),
            report_path.display().to_string(),
        ];
        let log_file = std::fs::File::create(&log).map_err(|source| DynamoError::Io {
            what: "creating",
            path: log.clone(),
            source,
        })?;
        let err_file = log_file.try_clone().map_err(|source| DynamoError::Io {
            what: "creating",
            path: log.clone(),
            source,
        })?;
        let what = format!("python -m dynamo.replay --router-mode {mode}");
        let t0 = std::time::Instant::now();
        let status = Command::new(python)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(err_file)
            .status()
            .map_err(|source| DynamoError::Spawn {
                what: what.clone(),
                source,
            })?;
        let wall_s = t0.elapsed().as_secs_f64();
        if !status.success() {
            return Err(DynamoError::Failed {
                what,
                status: status.to_string(),
                tail: log_tail(&log, 20),
                log,
            });
        }
        let text = std::fs::read(&report_path).map_err(|source| DynamoError::Io {
            what: "reading Dynamo's report",
            path: report_path.clone(),
            source,
        })?;
        let report: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| DynamoError::Report {
                path: report_path.clone(),
                reason: e.to_string(),
            })?;
        // The command as a user would type it (the trace by file name).
        let mut command = vec!["python".to_owned()];
        command.extend(args.iter().map(|a| {
            if a == &trace.display().to_string() {
                trace_id.file.clone()
            } else if a == &report_path.display().to_string() {
                format!("{mode}.json")
            } else {
                a.clone()
            }
        }));
        runs.push(DynamoRun {
            router_mode: mode.into(),
            command,
            wall_s,
            report,
        });
    }
    Ok(DynamoReference {
        recorded: today_utc(),
        machine: machine_description(),
        produced_by: "kvplane replay --engines --with-dynamo".into(),
        versions,
        trace: trace_id,
        settings: settings.clone(),
        runs,
    })
}

/// `YYYY-MM-DD` of now, UTC (civil-from-days, no date crate).
fn today_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

fn machine_description() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpus} CPUs, no GPU needed (Dynamo's mock engine)")
}

/// Rows of a reference, one per router mode, with `label`.
pub fn rows(r: &DynamoReference, label: &str) -> Vec<DynamoRow> {
    let num = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    r.runs
        .iter()
        .map(|run| {
            let v = &run.report;
            let reuse = num(v, "prefix_cache_reused_ratio");
            let input = v["total_input_tokens"].as_u64().unwrap_or(0);
            DynamoRow {
                router_mode: run.router_mode.clone(),
                prefix_reuse: reuse,
                ttft_mean_ms: num(v, "mean_ttft_ms"),
                ttft_p50_ms: num(v, "median_ttft_ms"),
                ttft_p99_ms: num(v, "p99_ttft_ms"),
                e2e_p50_ms: num(v, "median_e2e_latency_ms"),
                e2e_p99_ms: num(v, "p99_e2e_latency_ms"),
                input_tokens: input,
                computed_tokens: (input as f64 * (1.0 - reuse)).round() as u64,
                label: label.into(),
            }
        })
        .collect()
}

/// The reference directory: `--reference-dir`, else `data/reference` here or in the source
/// tree.
pub fn reference_dir(arg: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = arg {
        return Some(p.to_path_buf());
    }
    let here = PathBuf::from("data/reference");
    if here.is_dir() {
        return Some(here);
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/reference");
    src.is_dir().then_some(src)
}

/// The recorded run whose trace hash and settings equal these, if any. Unreadable files
/// are skipped with a warning (a reference never fails the replay).
pub fn find_reference(
    dir: &Path,
    trace: &TraceId,
    settings: &DynamoSettings,
) -> Option<(PathBuf, DynamoReference)> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "json")
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(REFERENCE_PREFIX))
        })
        .collect();
    entries.sort();
    for path in entries {
        let parsed = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<DynamoReference>(&b).map_err(|e| e.to_string()));
        match parsed {
            Ok(r) => {
                if r.trace.xxh3_128 == trace.xxh3_128
                    && r.trace.requests == trace.requests
                    && &r.settings == settings
                {
                    return Some((path, r));
                }
            }
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "skipping reference"),
        }
    }
    None
}

/// Writes a reference file (pretty JSON, one trailing newline).
pub fn write_reference(path: &Path, r: &DynamoReference) -> Result<(), DynamoError> {
    let mut text = serde_json::to_string_pretty(r).map_err(|e| DynamoError::Report {
        path: path.into(),
        reason: e.to_string(),
    })?;
    text.push('\n');
    std::fs::write(path, text).map_err(|source| DynamoError::Io {
        what: "writing reference",
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn settings() -> DynamoSettings {
        DynamoSettings {
            workers: 8,
            block_size: 64,
            trace_block_size: 512,
            num_gpu_blocks: 16_384,
            max_num_batched_tokens: 8192,
            max_num_seqs: 256,
            arrival_speedup_ratio: 1.0,
            replay_mode: "offline".into(),
        }
    }

    fn reference(trace: TraceId) -> DynamoReference {
        DynamoReference {
            recorded: "2026-12-04".into(),
            machine: "test".into(),
            produced_by: "test".into(),
            versions: serde_json::json!({"ai-dynamo": "1.4.2"}),
            trace,
            settings: settings(),
            runs: vec![DynamoRun {
                router_mode: "kv_router".into(),
                command: vec!["python".into()],
                wall_s: 1.0,
                report: serde_json::json!({
                    "prefix_cache_reused_ratio": 0.5,
                    "median_ttft_ms": 31.0,
                    "p99_ttft_ms": 1000.0,
                    "mean_ttft_ms": 100.0,
                    "median_e2e_latency_ms": 700.0,
                    "p99_e2e_latency_ms": 4000.0,
                    "total_input_tokens": 1000
                }),
            }],
        }
    }

    #[test]
    fn a_reference_is_found_only_for_the_same_trace_and_settings() {
        let dir = std::env::temp_dir().join(format!("kvp-dynref-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let t = TraceId::of_bytes("a.jsonl", b"trace a", 2);
        write_reference(&dir.join("dynamo-replay-a.json"), &reference(t.clone())).unwrap();
        // Not a reference (name) and not JSON: both ignored.
        std::fs::write(dir.join("dynamo-replay-bad.json"), "{").unwrap();
        std::fs::write(dir.join("other.json"), "{}").unwrap();
        let (_, r) = find_reference(&dir, &t, &settings()).expect("same trace and settings");
        let rows = rows(&r, "recorded 2026-12-04, not re-run");
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].ttft_p50_ms, 31.0);
        assert_eq!(rows[0].computed_tokens, 500);
        // Another trace, or the same one cut short, or any other setting: nothing.
        let other = TraceId::of_bytes("a.jsonl", b"trace b", 2);
        assert!(find_reference(&dir, &other, &settings()).is_none());
        let shorter = TraceId {
            requests: 1,
            ..t.clone()
        };
        assert!(find_reference(&dir, &shorter, &settings()).is_none());
        for change in [
            |s: &mut DynamoSettings| s.workers = 4,
            |s: &mut DynamoSettings| s.block_size = 16,
            |s: &mut DynamoSettings| s.num_gpu_blocks = 2048,
            |s: &mut DynamoSettings| s.arrival_speedup_ratio = 2.0,
            |s: &mut DynamoSettings| s.max_num_seqs = 1,
        ] {
            let mut s = settings();
            change(&mut s);
            assert!(find_reference(&dir, &t, &s).is_none(), "{s:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dates_and_engine_args() {
        let d = today_utc();
        assert_eq!(d.len(), 10);
        assert!(d.starts_with("20"));
        let a: serde_json::Value = serde_json::from_str(&settings().engine_args()).unwrap();
        assert_eq!(a["block_size"], 64);
        assert_eq!(a["num_gpu_blocks"], 16_384);
    }
}
