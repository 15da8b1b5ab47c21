//! GPU check: `cargo run --release -p kvplane-cuda --example gpu_check -- [--backend cuda|host]
//! [--device N] [--max-batch-mib M] [--iters K]` (or `scripts/gpu-check.sh`).
//! See `kvplane_cuda::gpu_check` for what it runs and prints.

use kvplane_cuda::gpu_check::{CheckConfig, format_report, run};
use kvplane_cuda::host::HostDevice;
use kvplane_cuda::{Device, cuda::CudaDevice};
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut backend = "cuda".to_string();
    let mut ordinal = 0usize;
    let mut cfg = CheckConfig::default();
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
            "--iters" => value("--iters").parse().map(|v| cfg.iters = v),
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
            Box::new(HostDevice::new())
        }
        other => {
            eprintln!("gpu_check: unknown backend {other} (cuda or host)");
            return ExitCode::from(2);
        }
    };
    match run(dev.as_ref(), &cfg) {
        Ok(report) => {
            print!("{}", format_report(&report));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gpu_check: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}
