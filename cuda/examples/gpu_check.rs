//! GPU check: `cargo run --release -p kvplane-cuda --example gpu_check -- [--backend cuda|host]
//! [--device N] [--max-batch-mib M] [--iters K] [--offload-only] [--no-offload]
//! [--offload-max-case-mib M] [--file-dir DIR] [--no-file] [--json] [--json-out PATH]`
//! (or `scripts/gpu-check.sh`).
//!
//! Runs the kernels' correctness and device-to-device check (`kvplane_cuda::gpu_check`),
//! then the offload path (`kvplane_cuda::offload`: engine pages <-> pinned host and G1
//! against a bulk copy and a per-page copy loop). `--json` prints one JSON object
//! instead of the tables; `--json-out PATH` writes it to a file besides the tables. Exit status 1 on any mismatch or device error.

use kvplane_cuda::gpu_check::{CheckConfig, format_report, run};
use kvplane_cuda::host::HostDevice;
use kvplane_cuda::offload::{self, OffloadConfig};
use kvplane_cuda::{Device, cuda::CudaDevice};
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut backend = "cuda".to_string();
    let mut ordinal = 0usize;
    let mut cfg = CheckConfig::default();
    let mut ocfg = OffloadConfig::default();
    let (mut json, mut check, mut offload_on) = (false, true, true);
    let mut json_out: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| {
            args.next().unwrap_or_else(|| {
                eprintln!("gpu_check: {name} needs a value");
                std::process::exit(2)
            })
        };
        let parsed = match a.as_str() {
            "--backend" => {
                backend = value("--backend");
                Ok(())
            }
            "--device" => value("--device").parse().map(|v| ordinal = v),
            "--max-batch-mib" => value("--max-batch-mib")
                .parse::<usize>()
                .map(|v| cfg.max_batch_bytes = v << 20),
            "--offload-max-case-mib" => value("--offload-max-case-mib")
                .parse::<usize>()
                .map(|v| ocfg.max_case_bytes = v << 20),
            "--iters" => value("--iters").parse().map(|v| {
                cfg.iters = v;
                ocfg.iters = v;
            }),
            "--json" => {
                json = true;
                Ok(())
            }
            "--json-out" => {
                json_out = Some(value("--json-out"));
                Ok(())
            }
            "--offload-only" => {
                check = false;
                Ok(())
            }
            "--file-dir" => {
                cfg.file_dir = Some(value("--file-dir").into());
                Ok(())
            }
            "--no-file" => {
                cfg.file_dir = None;
                Ok(())
            }
            "--no-offload" => {
                offload_on = false;
                Ok(())
            }
            other => {
                eprintln!("gpu_check: unknown argument {other}");
                return ExitCode::from(2);
            }
        };
        if let Err(e) = parsed {
            eprintln!("gpu_check: {a}: {e}");
            return ExitCode::from(2);
        }
    }
    let dev: Box<dyn Device> = match backend.as_str() {
        "cuda" => match CudaDevice::open(ordinal) {
            Ok(d) => Box::new(d),
            Err(e) => {
                eprintln!("gpu_check: cannot open CUDA device {ordinal}: {e}");
                return ExitCode::FAILURE;
            }
        },
        "host" => {
            // The CPU path is slow on the big cases: keep it small unless asked.
            cfg.max_batch_bytes = cfg.max_batch_bytes.min(64 << 20);
            ocfg.max_case_bytes = ocfg.max_case_bytes.min(64 << 20);
            Box::new(HostDevice::new())
        }
        other => {
            eprintln!("gpu_check: unknown backend {other} (cuda or host)");
            return ExitCode::from(2);
        }
    };
    let check_report = if check {
        match run(dev.as_ref(), &cfg) {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("gpu_check: FAILED: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    if let (false, Some(r)) = (json, &check_report) {
        println!("{}", format_report(r));
    }
    let offload_report = if offload_on {
        match offload::run(dev.as_ref(), &ocfg) {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("gpu_check: offload FAILED: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let out = serde_json::json!({
        "backend": dev.backend().as_str(),
        "device": dev.describe(),
        "check": check_report,
        "offload": offload_report,
    });
    if json {
        println!("{out}");
    } else if let Some(r) = &offload_report {
        print!("{}", offload::format_report(r));
    }
    if let Some(path) = json_out
        && let Err(e) = std::fs::write(&path, format!("{out}\n"))
    {
        eprintln!("gpu_check: writing {path}: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
