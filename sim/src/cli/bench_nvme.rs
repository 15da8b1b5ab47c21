//! `kvplane bench nvme`: NVMe tier (G3) write and read throughput against fio on the same
//! file system, same block size, queue depth, O_DIRECT and io_uring, measured in the same
//! run.
//!
//! The tier side writes `--total-mib` of slots (4 KiB header + block, the tier's real unit)
//! from the pinned host pool through `NvmeStore` (header encoding with the data checksum
//! and data MAC included, as every save pays it), then reads them all back and verifies
//! each slot's header, checksum and MACs (as every load pays it). fio then writes and reads a file of the
//! same size with `bs` = the slot size. The default directory is a temporary one under
//! the current directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use super::CliResult;
use kvplane_daemon::tier::host::{HostConfig, HostPool};
use kvplane_daemon::tier::nvme::header::SlotHeader;
use kvplane_daemon::tier::nvme::{EngineKind, NvmeConfig, NvmeStore, slot_bytes};

#[derive(Debug, clap::Args)]
pub struct NvmeArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Directory for the test files (default: a temporary directory under the current one).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Bytes per block (the slot adds a 4 KiB header).
    #[arg(long, default_value_t = 2 << 20)]
    pub block_bytes: usize,
    /// Ops in flight.
    #[arg(long, default_value_t = 32)]
    pub queue_depth: u32,
    /// Bytes written then read, in MiB (the pinned pool is this large too).
    #[arg(long, default_value_t = 1024)]
    pub total_mib: u64,
    /// Threads computing slot checksums during writes (the tier's `checksum_threads`).
    #[arg(long, default_value_t = 2)]
    pub checksum_threads: usize,
    /// Alternating rounds (kvplane write+read, fio write+read); medians reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// `io_uring` or `sync` (pread/pwrite).
    #[arg(long, default_value = "io-uring")]
    pub engine: EngineArg,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum EngineArg {
    IoUring,
    Sync,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchNvmeError {
    #[error("fio is not installed (Debian package `fio`): the NVMe bench needs it as the ceiling")]
    FioMissing,
    #[error("running fio ({rw}): {detail}")]
    Fio { rw: &'static str, detail: String },
    #[error("bench nvme: {0}")]
    Setup(String),
}

/// A scratch directory removed on drop.
struct Scratch {
    path: PathBuf,
    owned: bool,
}
impl Drop for Scratch {
    fn drop(&mut self) {
        if self.owned {
            let _ = std::fs::remove_dir_all(&self.path);
        } else {
            let _ = std::fs::remove_file(self.path.join("kvplane-bench.kvp"));
            let _ = std::fs::remove_file(self.path.join("kvplane-bench.kvp.key"));
            let _ = std::fs::remove_file(self.path.join("fio-bench.dat"));
        }
    }
}

fn fio_gbps(
    file: &Path,
    rw: &'static str,
    size: u64,
    bs: usize,
    qd: u32,
) -> Result<f64, BenchNvmeError> {
    let out = Command::new("fio")
        .args([
            "--name=kvplane",
            &format!("--filename={}", file.display()),
            &format!("--size={size}"),
            &format!("--bs={bs}"),
            &format!("--iodepth={qd}"),
            "--direct=1",
            "--ioengine=io_uring",
            &format!("--rw={rw}"),
            "--numjobs=1",
            "--output-format=json",
        ])
        .output()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                BenchNvmeError::FioMissing
            } else {
                BenchNvmeError::Fio {
                    rw,
                    detail: e.to_string(),
                }
            }
        })?;
    if !out.status.success() {
        return Err(BenchNvmeError::Fio {
            rw,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notes before the JSON object.
    let json_start = text.find('{').ok_or(BenchNvmeError::Fio {
        rw,
        detail: "no JSON in output".into(),
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text[json_start..]).map_err(|e| BenchNvmeError::Fio {
            rw,
            detail: format!("parsing JSON: {e}"),
        })?;
    let key = if rw == "write" { "write" } else { "read" };
    v["jobs"][0][key]["bw_bytes"]
        .as_f64()
        .map(|b| b / 1e9)
        .ok_or(BenchNvmeError::Fio {
            rw,
            detail: format!("no jobs[0].{key}.bw_bytes"),
        })
}

pub fn run(args: NvmeArgs) -> CliResult {
    // Fail early and clearly when the ceiling cannot be measured.
    if Command::new("fio").arg("--version").output().is_err() {
        return Err(BenchNvmeError::FioMissing.into());
    }
    let scratch = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)
                .map_err(|e| BenchNvmeError::Setup(format!("creating {}: {e}", d.display())))?;
            Scratch {
                path: d.clone(),
                owned: false,
            }
        }
        None => {
            let d = std::env::current_dir()?
                .join(format!(".kvplane-bench-nvme-{}", std::process::id()));
            std::fs::create_dir_all(&d)
                .map_err(|e| BenchNvmeError::Setup(format!("creating {}: {e}", d.display())))?;
            Scratch {
                path: d,
                owned: true,
            }
        }
    };
    if args.rounds == 0 {
        return Err(BenchNvmeError::Setup("--rounds must be at least 1".into()).into());
    }
    // The machine's load when the run started and ended (the ratio depends on free cores:
    // the tier hashes every block, fio does not).
    let loadavg = || {
        std::fs::read_to_string("/proc/loadavg")
            .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    let loadavg_start = loadavg();
    let sb = slot_bytes(args.block_bytes);
    let slots = ((args.total_mib << 20) / sb as u64).max(1) as u32;
    let file_bytes = slots as u64 * sb as u64;
    let qd = args.queue_depth;

    // The host pool holds every slot written (the tier's registered buffers), so one call
    // moves the whole set, like a large write-through save or a large load.
    let pool_cfg = HostConfig {
        capacity_bytes: file_bytes,
        lock: true,
        ..HostConfig::default()
    };
    let pool = match HostPool::new(&pool_cfg, sb) {
        Ok(p) => p,
        Err(_) => HostPool::new(
            &HostConfig {
                lock: false,
                ..pool_cfg
            },
            sb,
        )?,
    };
    for s in 0..pool.slot_count() {
        // SAFETY: the bench is the pool's only user.
        let d = unsafe { pool.data_mut(s) };
        for (i, w) in d.chunks_exact_mut(8).enumerate() {
            let x = kvplane_kernels::checksum::mix64(((s as u64) << 32) | i as u64);
            w.copy_from_slice(&x.to_le_bytes());
        }
    }
    let cfg = NvmeConfig {
        paths: vec![scratch.path.join("kvplane-bench.kvp")],
        capacity_bytes: file_bytes,
        engine: match args.engine {
            EngineArg::IoUring => EngineKind::IoUring,
            EngineArg::Sync => EngineKind::Sync,
        },
        queue_depth: qd,
        batch_size: qd,
        checksum_threads: args.checksum_threads,
        ..NvmeConfig::default()
    };
    cfg.validate("tiers.nvme", args.block_bytes)?;
    let (store, _) = NvmeStore::open(&cfg, args.block_bytes, pool.regions(1 << 30), None)?;
    let engine = store.engine_name().to_string();
    let registered = store.registered_buffers();

    // One pass writes every slot in one call (qd in flight), one pass reads and verifies
    // them all. Passes alternate with fio's so both see the same disk weather; medians.
    let items: Vec<(u32, *mut u8)> = (0..slots).map(|s| (s, pool.slot_ptr(s))).collect();
    let mut results = Vec::new();
    let mut gens = vec![0u64; slots as usize];
    let mut write_pass = |gens: &mut [u64]| -> Result<f64, BenchNvmeError> {
        for g in gens.iter_mut() {
            *g = store.next_generation();
        }
        let t = Instant::now();
        // Header + checksum right before each write is submitted (as the tier does).
        let prepare = |i: usize| {
            let s = i as u32;
            let h = SlotHeader {
                namespace: 1,
                hash: s as u64,
                parent: None,
                length: 0,
                generation: gens[i],
                data_checksum: 0,
                data_mac: [0; 32],
            };
            // SAFETY: the bench is the pool's only user; header and data do not overlap.
            let (page, data) = unsafe { (pool.header_mut(s), pool.data(s)) };
            store.encode_header(page, data, h);
        };
        // SAFETY: pool slots valid and unused during the call.
        unsafe { store.write_slots_with(&items, &prepare, &mut results) };
        let secs = t.elapsed().as_secs_f64();
        if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
            return Err(BenchNvmeError::Setup(format!("write failed: {e}")));
        }
        Ok(secs)
    };
    let mut write_s = Vec::new();
    let mut read_s = Vec::new();
    let mut fio_w = Vec::new();
    let mut fio_r = Vec::new();
    let mut raw_w = Vec::new();
    let mut raw_r = Vec::new();
    let fio_file = scratch.path.join("fio-bench.dat");
    for _ in 0..args.rounds {
        write_s.push(write_pass(&mut gens)?);
        // Read back and verify each slot as soon as its read completes (as staging does).
        let mut verified = 0u32;
        let t = Instant::now();
        let mut check = |i: usize| {
            let s = i as u32;
            // SAFETY: the read into this pool slot completed; no one else uses it.
            let buf = unsafe { std::slice::from_raw_parts(pool.slot_ptr(s), sb) };
            if store.verify(s, buf, 1, s as u64, gens[i]).is_ok() {
                verified += 1;
            }
        };
        let mut rresults = Vec::new();
        // SAFETY: as above.
        unsafe { store.read_slots_with(&items, &mut check, &mut rresults) };
        read_s.push(t.elapsed().as_secs_f64());
        if let Some(Err(e)) = rresults.iter().find(|r| r.is_err()) {
            return Err(BenchNvmeError::Setup(format!("read failed: {e}")).into());
        }
        if verified != slots {
            return Err(BenchNvmeError::Setup(format!(
                "{} slots failed verification",
                slots - verified
            ))
            .into());
        }
        // The engine alone: rewrite the same slots with the headers already made (no
        // checksum) and read them without verifying, to separate I/O from checksum cost.
        let t = Instant::now();
        // SAFETY: as above.
        unsafe { store.write_slots(&items, &mut rresults) };
        raw_w.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        // SAFETY: as above.
        unsafe { store.read_slots(&items, &mut rresults) };
        raw_r.push(t.elapsed().as_secs_f64());
        if let Some(Err(e)) = rresults.iter().find(|r| r.is_err()) {
            return Err(BenchNvmeError::Setup(format!("raw pass failed: {e}")).into());
        }
        fio_w.push(fio_gbps(&fio_file, "write", file_bytes, sb, qd)?);
        fio_r.push(fio_gbps(&fio_file, "read", file_bytes, sb, qd)?);
    }
    drop(store);
    // Diagnostic: single-thread speed of the slot checksum (kvp checksum v1) and of the
    // slot's data MAC (keyed BLAKE3; the key's value does not change its speed), which every
    // write computes and every load verifies on the CPU. Passes over the same blocks
    // alternate (medians), so a busy machine slows both alike and their ratio holds.
    let key = kvplane_daemon::tier::nvme::key::SlotKey::from_material(&[1; 32]);
    let pass_gbps = |f: &dyn Fn(&[u8]) -> u8| {
        let t = Instant::now();
        let mut acc = 0u8;
        for s in 0..slots {
            // SAFETY: no I/O in flight; the bench is the pool's only user.
            acc ^= f(unsafe { pool.data(s) });
        }
        std::hint::black_box(acc);
        (slots as usize * args.block_bytes) as f64 / t.elapsed().as_secs_f64() / 1e9
    };
    let (mut checksum_runs, mut mac_runs, mut scalar_runs) = (Vec::new(), Vec::new(), Vec::new());
    let mut sums_runs = Vec::new();
    for _ in 0..args.rounds.max(3) {
        checksum_runs.push(pass_gbps(&|d| kvplane_kernels::checksum64(d) as u8));
        mac_runs.push(pass_gbps(&|d| key.data_mac(d)[0]));
        // Both as a slot write computes them: one pass, piece by piece.
        sums_runs.push(pass_gbps(&|d| {
            kvplane_daemon::tier::nvme::data_sums(&key, d).1[0]
        }));
        // The one-word-at-a-time definition, to show what the vector path gains.
        scalar_runs.push(pass_gbps(&|d| {
            kvplane_kernels::checksum::checksum64_scalar(d) as u8
        }));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let checksum_gbps = median(checksum_runs);
    let mac_gbps = median(mac_runs);
    let sums_gbps = median(sums_runs);
    let checksum_scalar_gbps = median(scalar_runs);
    let write_gbps = median(
        write_s
            .iter()
            .map(|s| file_bytes as f64 / s / 1e9)
            .collect(),
    );
    let read_gbps = median(read_s.iter().map(|s| file_bytes as f64 / s / 1e9).collect());
    let raw_write_gbps = median(raw_w.iter().map(|s| file_bytes as f64 / s / 1e9).collect());
    let raw_read_gbps = median(raw_r.iter().map(|s| file_bytes as f64 / s / 1e9).collect());
    let fio_write_gbps = median(fio_w);
    let fio_read_gbps = median(fio_r);

    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "write_gbps": write_gbps,
                "read_gbps": read_gbps,
                "fio_write_gbps": fio_write_gbps,
                "fio_read_gbps": fio_read_gbps,
                "write_ratio": write_gbps / fio_write_gbps,
                "read_ratio": read_gbps / fio_read_gbps,
                "block_bytes": args.block_bytes,
                "slot_bytes": sb,
                "queue_depth": qd,
                "total_bytes": file_bytes,
                "rounds": args.rounds,
                "checksum_gbps": checksum_gbps,
                "mac_gbps": mac_gbps,
                "sums_gbps": sums_gbps,
                "checksum_scalar_gbps": checksum_scalar_gbps,
                "engine_only_write_gbps": raw_write_gbps,
                "engine_only_read_gbps": raw_read_gbps,
                "engine_only_write_ratio": raw_write_gbps / fio_write_gbps,
                "engine_only_read_ratio": raw_read_gbps / fio_read_gbps,
                "checksum_threads": args.checksum_threads,
                "engine": engine,
                "registered_buffers": registered,
                "dir": scratch.path.display().to_string(),
                "loadavg_start": loadavg_start,
                "loadavg_end": loadavg(),
            })
        );
    } else {
        println!(
            "NVMe tier vs fio, {} bytes in slots of {} (block {} + 4 KiB header), queue depth {}, O_DIRECT, {}",
            file_bytes,
            sb,
            args.block_bytes,
            qd,
            scratch.path.display()
        );
        println!(
            "  engine: {engine}, registered buffers: {registered}; slot checksum alone: {checksum_gbps:.2} GB/s (scalar {checksum_scalar_gbps:.2}), data MAC alone: {mac_gbps:.2} GB/s, both in one pass as a slot write does: {sums_gbps:.2} GB/s, on one core"
        );
        println!("  {:<10} {:>8} {:>8} {:>7}", "", "kvplane", "fio", "ratio");
        println!(
            "  {:<10} {:>8.2} {:>8.2} {:>7.2}  GB/s (write includes checksum, MAC + header)",
            "write",
            write_gbps,
            fio_write_gbps,
            write_gbps / fio_write_gbps
        );
        println!(
            "  {:<10} {:>8.2} {:>8.2} {:>7.2}  GB/s (read includes verification)",
            "read",
            read_gbps,
            fio_read_gbps,
            read_gbps / fio_read_gbps
        );
        println!(
            "  {:<10} {:>8.2} {:>8.2} {:>7.2}  GB/s (engine only: no checksum)",
            "raw write",
            raw_write_gbps,
            fio_write_gbps,
            raw_write_gbps / fio_write_gbps
        );
        println!(
            "  {:<10} {:>8.2} {:>8.2} {:>7.2}  GB/s (engine only: no verification)",
            "raw read",
            raw_read_gbps,
            fio_read_gbps,
            raw_read_gbps / fio_read_gbps
        );
    }
    Ok(())
}
