//! The GPU compile check, runnable with no GPU: every kernel source compiles with NVRTC
//! for compute_80 and compute_90, ptxas assembles the PTX for sm_80 and sm_90, and no
//! kernel spills or uses local memory. Prints the register table (`--nocapture`).
//!
//! This test never skips: without NVRTC/ptxas it fails with the command that installs
//! them (`scripts/install-cuda-tools.sh`, which CI runs before the tests).

use kvplane_cuda::cuda::KERNEL_PARAM_BYTES;
use kvplane_cuda::nvrtc::{
    Arch, CudaTools, PtxCache, compile_ptx, ptx_param_bytes, ptxas_resources,
};
use kvplane_kernels::sources::{self, ALL};
use std::path::PathBuf;

fn tools() -> CudaTools {
    let ci = std::env::var_os("CI").is_some();
    let tools = CudaTools::find().unwrap_or_else(|e| {
        panic!(
            "kernel compile check cannot run{}: {e}\n\
             install the tools with: scripts/install-cuda-tools.sh",
            if ci { " in CI" } else { "" }
        )
    });
    if let Err(e) = tools.ptxas() {
        panic!("kernel compile check cannot run: {e}\ninstall with: scripts/install-cuda-tools.sh");
    }
    tools
}

#[test]
fn kernels_compile_for_sm80_and_sm90_without_spills() {
    let tools = tools();
    let (major, minor) = tools.load_nvrtc().expect("load NVRTC");
    let work = tempfile::tempdir().expect("tempdir");
    let mut rows = Vec::new();
    for arch in [Arch::SM80, Arch::SM90] {
        for src in ALL {
            let ptx = compile_ptx(&tools, &src, arch)
                .unwrap_or_else(|e| panic!("{} for {}: {e}", src.file, arch.compute()));
            assert!(
                ptx.contains(&format!(".target {}", arch.sm())),
                "{}",
                src.file
            );
            for k in src.kernels {
                assert!(
                    ptx.contains(&format!(".entry {k}(")),
                    "{} lacks {k}",
                    src.file
                );
                // The cuda backend's launches pass exactly these argument sizes.
                let want = KERNEL_PARAM_BYTES
                    .iter()
                    .find(|(name, _)| name == k)
                    .map(|(_, p)| p.to_vec())
                    .unwrap_or_else(|| panic!("{k} missing from KERNEL_PARAM_BYTES"));
                assert_eq!(
                    ptx_param_bytes(&ptx, k),
                    Some(want),
                    "{k}: launch arguments vs PTX"
                );
            }
            let res = ptxas_resources(&tools, &src, &ptx, arch, work.path())
                .unwrap_or_else(|e| panic!("{} for {}: {e}", src.file, arch.sm()));
            for r in res {
                assert_eq!(
                    r.spill_store_bytes,
                    0,
                    "{} {}: spill stores",
                    r.kernel,
                    arch.sm()
                );
                assert_eq!(
                    r.spill_load_bytes,
                    0,
                    "{} {}: spill loads",
                    r.kernel,
                    arch.sm()
                );
                assert_eq!(
                    r.stack_frame_bytes,
                    0,
                    "{} {}: stack frame (local memory)",
                    r.kernel,
                    arch.sm()
                );
                assert_eq!(
                    r.ptx_local_bytes,
                    0,
                    "{} {}: .local in PTX",
                    r.kernel,
                    arch.sm()
                );
                assert!(
                    r.registers > 0 && r.registers <= 64,
                    "{} {}: {} registers",
                    r.kernel,
                    arch.sm(),
                    r.registers
                );
                rows.push((src.file, arch.sm(), r));
            }
        }
    }
    println!(
        "NVRTC {major}.{minor}, ptxas {}",
        tools.ptxas().unwrap().display()
    );
    println!("| kernel | source | arch | registers | stack bytes | spill stores | spill loads |");
    println!("|---|---|---|---:|---:|---:|---:|");
    for (file, arch, r) in &rows {
        println!(
            "| {} | {file} | {arch} | {} | {} | {} | {} |",
            r.kernel, r.registers, r.stack_frame_bytes, r.spill_store_bytes, r.spill_load_bytes
        );
    }
    assert_eq!(
        rows.len(),
        2 * ALL.iter().map(|s| s.kernels.len()).sum::<usize>()
    );
}

/// Each .cu also compiles in place with only the repository's include directories (what
/// an engineer running NVRTC or nvcc by hand does), not just flattened.
#[test]
fn sources_compile_in_place_with_repo_include_dirs() {
    let tools = tools();
    tools.load_nvrtc().expect("load NVRTC");
    // KVPLANE_REPO: where the sources are when this binary runs away from its build
    // tree (scripts/gpu/device-run.sh on a GPU machine).
    let repo = std::env::var_os("KVPLANE_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."));
    for src in ALL {
        let text =
            std::fs::read_to_string(repo.join("kernels/cuda").join(src.file)).expect("read .cu");
        let opts = cudarc::nvrtc::CompileOptions {
            include_paths: sources::INCLUDE_DIRS
                .iter()
                .map(|d| repo.join(d).display().to_string())
                .collect(),
            options: vec!["--gpu-architecture=compute_90".into()],
            ..Default::default()
        };
        cudarc::nvrtc::compile_ptx_with_opts(text, opts)
            .unwrap_or_else(|e| panic!("{} in place: {e}", src.file));
    }
}

#[test]
fn ptx_cache_hits_after_first_compile() {
    let tools = tools();
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = PtxCache::new(dir.path());
    let (first, cached) = cache
        .get_or_compile(&tools, &sources::PAGED, Arch::SM80)
        .expect("compile");
    assert!(!cached);
    let (second, cached) = cache
        .get_or_compile(&tools, &sources::PAGED, Arch::SM80)
        .expect("cached");
    assert!(cached, "second lookup is served from disk");
    assert_eq!(first, second);
}

/// A source error comes back as an error with NVRTC's log, never a panic.
#[test]
fn nvrtc_reports_source_errors() {
    let tools = tools();
    let bad = kvplane_kernels::sources::KernelSource {
        file: "bad.cu",
        text: "extern \"C\" __global__ void k() { undefined_thing(); }",
        kernels: &["k"],
    };
    let err = compile_ptx(&tools, &bad, Arch::SM90).expect_err("must fail");
    assert!(err.to_string().contains("undefined_thing"), "{err}");
}
