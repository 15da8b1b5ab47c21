//! Kernel compilation for the GPU: NVRTC (through cudarc) turns `kernels/cuda/*.cu` into
//! PTX for a `compute_XY` target, a disk cache keeps the PTX (keyed by source hash, target
//! and NVRTC version), and `ptxas` reports registers, stack and spills per kernel.
//!
//! NVRTC 12 and 13 are both accepted: the calls used (create, compile, log, PTX, version)
//! have the same ABI in both, and cudarc (built for CUDA 13.0) looks for `libnvrtc.so.13`
//! and then `libnvrtc.so.12` by soname. cudarc panics when it finds neither, so this
//! module loads the library by absolute path first (the PyPI wheel's copy, a CUDA
//! toolkit's, or whatever the dynamic loader finds), so the name lookup that follows
//! resolves to the already loaded object by its soname, and never calls into cudarc's
//! NVRTC before that succeeded.

use kvplane_kernels::sources::{self, KernelSource};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Where the CUDA compile tools are; see [`CudaTools::find`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaTools {
    /// Absolute path of libnvrtc.so.13 or .12, or just the soname when the loader finds it.
    pub nvrtc_lib: PathBuf,
    /// The `ptxas` binary, if found (only the compile check needs it).
    pub ptxas: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ToolsError {
    #[error(
        "NVRTC (libnvrtc.so.13 or libnvrtc.so.12) not found (looked in: {searched}); run \
         scripts/install-cuda-tools.sh or set KVPLANE_NVRTC_LIB"
    )]
    NvrtcNotFound { searched: String },
    #[error("loading {path}: {reason}")]
    NvrtcLoad { path: PathBuf, reason: String },
    #[error(
        "ptxas not found (looked in: {searched}); run scripts/install-cuda-tools.sh or set KVPLANE_PTXAS"
    )]
    PtxasNotFound { searched: String },
}

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(transparent)]
    Tools(#[from] ToolsError),
    #[error("NVRTC failed on {file} for {arch}: {log}")]
    Nvrtc {
        file: &'static str,
        arch: String,
        log: String,
    },
    #[error("PTX cache {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("running {ptxas} for {arch}: {source}")]
    PtxasSpawn {
        ptxas: PathBuf,
        arch: String,
        source: std::io::Error,
    },
    #[error("ptxas failed on {file} for {arch}: {log}")]
    Ptxas {
        file: String,
        arch: String,
        log: String,
    },
    #[error("ptxas output for {file} ({arch}) lacks resource lines for kernel {kernel}")]
    PtxasParse {
        file: String,
        arch: String,
        kernel: String,
    },
}

/// The venv `scripts/install-cuda-tools.sh` creates.
pub fn tools_venv() -> PathBuf {
    if let Some(dir) = std::env::var_os("KVPLANE_CUDA_TOOLS") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/kvplane/cuda-tools")
}

/// `<venv>/lib/python*/site-packages/<rel>`, first match.
fn in_venv(venv: &Path, rel: &str) -> Option<PathBuf> {
    let lib = venv.join("lib");
    let mut entries: Vec<_> = std::fs::read_dir(&lib).ok()?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    entries
        .iter()
        .map(|e| e.path().join("site-packages").join(rel))
        .find(|p| p.is_file())
}

/// NVRTC sonames cudarc (built for CUDA 13.0) resolves by name, newest first.
pub const NVRTC_SONAMES: [&str; 2] = ["libnvrtc.so.13", "libnvrtc.so.12"];

/// The candidates searched, in order, given the environment values (pure, for tests):
/// the explicit path, the tools venv (the CUDA 12 wheel's layout, then the CUDA 13
/// wheel's), then each toolkit directory with NVRTC 13 before 12.
pub fn nvrtc_candidates(explicit: Option<PathBuf>, venv: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = explicit.into_iter().collect();
    for rel in [
        "nvidia/cuda_nvrtc/lib/libnvrtc.so.12",
        "nvidia/cu13/lib/libnvrtc.so.13",
    ] {
        if let Some(p) = in_venv(venv, rel) {
            out.push(p);
        }
    }
    let mut toolkits: Vec<PathBuf> = std::env::var_os("CUDA_HOME")
        .map(|home| PathBuf::from(home).join("lib64"))
        .into_iter()
        .collect();
    toolkits.push(PathBuf::from("/usr/local/cuda/lib64"));
    for dir in toolkits {
        out.extend(NVRTC_SONAMES.iter().map(|soname| dir.join(soname)));
    }
    out
}

pub fn ptxas_candidates(explicit: Option<PathBuf>, venv: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = explicit.into_iter().collect();
    if let Some(p) = in_venv(venv, "nvidia/cuda_nvcc/bin/ptxas") {
        out.push(p);
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        out.push(PathBuf::from(home).join("bin/ptxas"));
    }
    out.push(PathBuf::from("/usr/local/cuda/bin/ptxas"));
    if let Some(path) = std::env::var_os("PATH") {
        out.extend(std::env::split_paths(&path).map(|d| d.join("ptxas")));
    }
    out
}

fn join_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl CudaTools {
    /// NVRTC: `KVPLANE_NVRTC_LIB`, the tools venv (`KVPLANE_CUDA_TOOLS`, default
    /// `~/.cache/kvplane/cuda-tools`), `$CUDA_HOME/lib64`, `/usr/local/cuda/lib64`, then
    /// the dynamic loader's own search. ptxas: `KVPLANE_PTXAS`, the venv, `$CUDA_HOME/bin`,
    /// `/usr/local/cuda/bin`, `PATH`.
    pub fn find() -> Result<Self, ToolsError> {
        let venv = tools_venv();
        let nvrtc = nvrtc_candidates(
            std::env::var_os("KVPLANE_NVRTC_LIB").map(PathBuf::from),
            &venv,
        );
        let nvrtc_lib = match nvrtc.iter().find(|p| p.is_file()) {
            Some(p) => p.clone(),
            None => {
                let by_name = NVRTC_SONAMES.iter().find(|soname| {
                    // SAFETY: loading NVRTC runs only its initialisers, which have no
                    // preconditions; the handle is dropped at once.
                    unsafe { libloading::Library::new(soname) }.is_ok()
                });
                match by_name {
                    Some(soname) => PathBuf::from(soname),
                    None => {
                        return Err(ToolsError::NvrtcNotFound {
                            searched: format!(
                                "the tools venv {}, {}, the dynamic loader's path",
                                venv.display(),
                                join_paths(&nvrtc)
                            ),
                        });
                    }
                }
            }
        };
        let ptxas = ptxas_candidates(std::env::var_os("KVPLANE_PTXAS").map(PathBuf::from), &venv)
            .into_iter()
            .find(|p| p.is_file());
        Ok(Self { nvrtc_lib, ptxas })
    }

    pub fn ptxas(&self) -> Result<&Path, ToolsError> {
        self.ptxas.as_deref().ok_or_else(|| {
            let venv = tools_venv();
            let candidates =
                ptxas_candidates(std::env::var_os("KVPLANE_PTXAS").map(PathBuf::from), &venv);
            ToolsError::PtxasNotFound {
                searched: format!(
                    "the tools venv {}, {}",
                    venv.display(),
                    join_paths(&candidates)
                ),
            }
        })
    }

    /// Loads NVRTC once per process (kept loaded for good) so cudarc's lookup by name
    /// finds it. Returns the NVRTC version (major, minor).
    pub fn load_nvrtc(&self) -> Result<(i32, i32), ToolsError> {
        static LOADED: OnceLock<Result<(i32, i32), String>> = OnceLock::new();
        let result = LOADED.get_or_init(|| {
            // SAFETY: as in `find`: library initialisers only.
            match unsafe { libloading::Library::new(&self.nvrtc_lib) } {
                Ok(lib) => {
                    // Kept for the life of the process: cudarc holds function pointers
                    // into it once it resolves the same soname.
                    std::mem::forget(lib);
                    // SAFETY: a probe that only tries to dlopen by name.
                    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
                        return Err(format!(
                            "{} loaded but not found again by soname (cudarc looks for {})",
                            self.nvrtc_lib.display(),
                            NVRTC_SONAMES.join(" or ")
                        ));
                    }
                    let (mut major, mut minor) = (0, 0);
                    // SAFETY: NVRTC is loaded (checked just above); two valid out pointers.
                    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
                    Ok((major, minor))
                }
                Err(e) => Err(e.to_string()),
            }
        });
        result.clone().map_err(|reason| ToolsError::NvrtcLoad {
            path: self.nvrtc_lib.clone(),
            reason,
        })
    }
}

/// A virtual architecture for NVRTC and the matching real one for ptxas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Arch {
    pub major: u32,
    pub minor: u32,
}

impl Arch {
    pub const SM80: Arch = Arch { major: 8, minor: 0 };
    pub const SM90: Arch = Arch { major: 9, minor: 0 };

    pub fn compute(self) -> String {
        format!("compute_{}{}", self.major, self.minor)
    }
    pub fn sm(self) -> String {
        format!("sm_{}{}", self.major, self.minor)
    }
}

/// Compiles one kernel source (flattened: no include path needed) to PTX text.
pub fn compile_ptx(
    tools: &CudaTools,
    src: &KernelSource,
    arch: Arch,
) -> Result<String, CompileError> {
    tools.load_nvrtc()?;
    let opts = cudarc::nvrtc::CompileOptions {
        options: vec![
            format!("--gpu-architecture={}", arch.compute()),
            "--std=c++17".into(),
            "--device-as-default-execution-space".into(),
        ],
        name: Some(src.file.to_string()),
        ..Default::default()
    };
    match cudarc::nvrtc::compile_ptx_with_opts(sources::flattened(src), opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(cudarc::nvrtc::CompileError::CompileError { log, .. }) => Err(CompileError::Nvrtc {
            file: src.file,
            arch: arch.compute(),
            log: log.to_string_lossy().into_owned(),
        }),
        Err(other) => Err(CompileError::Nvrtc {
            file: src.file,
            arch: arch.compute(),
            log: other.to_string(),
        }),
    }
}

/// On-disk PTX cache: `<dir>/<stem>-<source hash>-<arch>-nvrtc<M.m>.ptx`, each file
/// starting with a line holding the checksum of the rest, so a torn write is a miss.
#[derive(Debug, Clone)]
pub struct PtxCache {
    dir: PathBuf,
}

const CACHE_TAG: &str = "// kvplane ptx cache v1 checksum ";

impl PtxCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// `KVPLANE_PTX_CACHE`, else `$XDG_CACHE_HOME/kvplane/ptx`, else `~/.cache/kvplane/ptx`.
    pub fn default_dir() -> PathBuf {
        if let Some(d) = std::env::var_os("KVPLANE_PTX_CACHE") {
            return d.into();
        }
        if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
            return PathBuf::from(d).join("kvplane/ptx");
        }
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
        PathBuf::from(home).join(".cache/kvplane/ptx")
    }

    pub fn path_for(&self, src: &KernelSource, arch: Arch, nvrtc: (i32, i32)) -> PathBuf {
        let stem = src.file.trim_end_matches(".cu");
        self.dir.join(format!(
            "{stem}-{:016x}-{}-nvrtc{}.{}.ptx",
            sources::source_hash(src),
            arch.compute(),
            nvrtc.0,
            nvrtc.1
        ))
    }

    /// The cached PTX, if present and intact.
    pub fn get(&self, path: &Path) -> Option<String> {
        let text = std::fs::read_to_string(path).ok()?;
        let (first, body) = text.split_once('\n')?;
        let want = u64::from_str_radix(first.strip_prefix(CACHE_TAG)?, 16).ok()?;
        (kvplane_kernels::checksum64(body.as_bytes()) == want).then(|| body.to_string())
    }

    pub fn put(&self, path: &Path, ptx: &str) -> Result<(), CompileError> {
        let err = |source| CompileError::Cache {
            path: path.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(err)?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let text = format!(
            "{CACHE_TAG}{:016x}\n{ptx}",
            kvplane_kernels::checksum64(ptx.as_bytes())
        );
        std::fs::write(&tmp, text).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }

    /// Cached PTX, or compile and cache it. Returns (ptx, was_cached).
    pub fn get_or_compile(
        &self,
        tools: &CudaTools,
        src: &KernelSource,
        arch: Arch,
    ) -> Result<(String, bool), CompileError> {
        let version = tools.load_nvrtc()?;
        let path = self.path_for(src, arch, version);
        if let Some(ptx) = self.get(&path) {
            return Ok((ptx, true));
        }
        let ptx = compile_ptx(tools, src, arch)?;
        self.put(&path, &ptx)?;
        Ok((ptx, false))
    }
}

/// ptxas's resource report for one kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelResources {
    pub kernel: String,
    pub registers: u32,
    pub stack_frame_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
    /// Bytes of `.local` state declared in the PTX for this kernel (0 = no local memory).
    pub ptx_local_bytes: u32,
}

fn leading_number(s: &str) -> Option<u32> {
    s.split_whitespace().next()?.parse().ok()
}

/// Parses `ptxas -v` output (stderr) into one record per `kernels`, in that order.
pub fn parse_ptxas_verbose(
    log: &str,
    kernels: &[&str],
    file: &str,
    arch: &str,
) -> Result<Vec<KernelResources>, CompileError> {
    let mut out = Vec::new();
    for &kernel in kernels {
        let parse_err = || CompileError::PtxasParse {
            file: file.to_string(),
            arch: arch.to_string(),
            kernel: kernel.to_string(),
        };
        let marker = format!("Function properties for {kernel}");
        let mut lines = log.lines().skip_while(|l| !l.contains(&marker)).skip(1);
        let props = lines.next().ok_or_else(parse_err)?;
        // "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"
        let fields: Vec<&str> = props.split(',').collect();
        let field = |name: &str| {
            fields
                .iter()
                .find(|f| f.contains(name))
                .and_then(|f| leading_number(f))
        };
        let stack = field("stack frame").ok_or_else(parse_err)?;
        let stores = field("spill stores").ok_or_else(parse_err)?;
        let loads = field("spill loads").ok_or_else(parse_err)?;
        // "ptxas info    : Used 24 registers, ..." follows within a couple of lines.
        let registers = lines
            .take(3)
            .find_map(|l| l.split("Used ").nth(1).and_then(leading_number))
            .ok_or_else(parse_err)?;
        out.push(KernelResources {
            kernel: kernel.to_string(),
            registers,
            stack_frame_bytes: stack,
            spill_store_bytes: stores,
            spill_load_bytes: loads,
            ptx_local_bytes: 0,
        });
    }
    Ok(out)
}

/// Bytes of `.local` declarations in the PTX body of `kernel` (0 = no local memory).
pub fn ptx_local_bytes(ptx: &str, kernel: &str) -> u32 {
    let entry = format!(".entry {kernel}(");
    let Some(start) = ptx.find(&entry) else {
        return 0;
    };
    let body = &ptx[start..];
    let end = body[entry.len()..]
        .find(".entry ")
        .map_or(body.len(), |e| e + entry.len());
    body[..end]
        .lines()
        .filter(|l| l.trim_start().starts_with(".local"))
        .map(|l| {
            // ".local .align 8 .b8 __local_depot0[16];"
            l.rsplit('[')
                .next()
                .and_then(|r| r.split(']').next())
                .and_then(|n| n.parse::<u32>().ok())
                .unwrap_or(1)
        })
        .sum()
}

/// Byte sizes of `kernel`'s parameters in PTX (`.param .u64 x`, `.param .u32 y`, ...),
/// in order; None if the entry is not in the PTX or a parameter type is not scalar.
pub fn ptx_param_bytes(ptx: &str, kernel: &str) -> Option<Vec<usize>> {
    let entry = format!(".entry {kernel}(");
    let start = ptx.find(&entry)? + entry.len();
    let end = start + ptx[start..].find(')')?;
    ptx[start..end]
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let ty = p
                .split_whitespace()
                .find(|t| *t != ".param" && t.starts_with('.'))?;
            let bits: usize = ty
                .trim_start_matches(|c: char| c == '.' || c.is_alphabetic())
                .parse()
                .ok()?;
            Some(bits / 8)
        })
        .collect()
}

/// Assembles PTX with `ptxas -arch=sm_XY -v` and reports every kernel of `src`.
pub fn ptxas_resources(
    tools: &CudaTools,
    src: &KernelSource,
    ptx: &str,
    arch: Arch,
    work_dir: &Path,
) -> Result<Vec<KernelResources>, CompileError> {
    let ptxas = tools.ptxas()?;
    let stem = src.file.trim_end_matches(".cu");
    let ptx_path = work_dir.join(format!("{stem}-{}.ptx", arch.compute()));
    let cubin_path = work_dir.join(format!("{stem}-{}.cubin", arch.sm()));
    let io = |source| CompileError::Cache {
        path: ptx_path.clone(),
        source,
    };
    std::fs::create_dir_all(work_dir).map_err(io)?;
    std::fs::write(&ptx_path, ptx).map_err(io)?;
    let output = Command::new(ptxas)
        .arg(format!("-arch={}", arch.sm()))
        .arg("-v")
        .arg("-o")
        .arg(&cubin_path)
        .arg(&ptx_path)
        .output()
        .map_err(|source| CompileError::PtxasSpawn {
            ptxas: ptxas.to_path_buf(),
            arch: arch.sm(),
            source,
        })?;
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        return Err(CompileError::Ptxas {
            file: src.file.to_string(),
            arch: arch.sm(),
            log,
        });
    }
    let mut res = parse_ptxas_verbose(&log, src.kernels, src.file, &arch.sm())?;
    for r in &mut res {
        r.ptx_local_bytes = ptx_local_bytes(ptx, &r.kernel);
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'kvp_copy_batch' for 'sm_90'
ptxas info    : Function properties for kvp_copy_batch
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 26 registers, used 0 barriers, 380 bytes cmem[0]
ptxas info    : Compiling entry function 'kvp_other' for 'sm_90'
ptxas info    : Function properties for kvp_other
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, 380 bytes cmem[0]
";

    #[test]
    fn parses_ptxas_verbose() {
        let r = parse_ptxas_verbose(LOG, &["kvp_other", "kvp_copy_batch"], "f.cu", "sm_90")
            .expect("parse");
        assert_eq!(r[0].kernel, "kvp_other");
        assert_eq!(
            (
                r[0].registers,
                r[0].stack_frame_bytes,
                r[0].spill_store_bytes,
                r[0].spill_load_bytes
            ),
            (255, 16, 8, 4)
        );
        assert_eq!(
            (
                r[1].registers,
                r[1].stack_frame_bytes,
                r[1].spill_store_bytes
            ),
            (26, 0, 0)
        );
        assert!(matches!(
            parse_ptxas_verbose(LOG, &["kvp_missing"], "f.cu", "sm_90"),
            Err(CompileError::PtxasParse { .. })
        ));
    }

    #[test]
    fn parses_ptx_parameter_sizes() {
        let ptx = ".visible .entry k(\n\t.param .u64 k_param_0,\n\t.param .u32 k_param_1\n)\n{\n}\n\
                   .visible .entry none(\n)\n{\n}\n";
        assert_eq!(ptx_param_bytes(ptx, "k"), Some(vec![8, 4]));
        assert_eq!(ptx_param_bytes(ptx, "none"), Some(vec![]));
        assert_eq!(ptx_param_bytes(ptx, "missing"), None);
    }

    #[test]
    fn finds_local_declarations_per_kernel() {
        let ptx = ".visible .entry a(\n.param .u64 p\n)\n{\n.local .align 8 .b8 __local_depot0[24];\nret;\n}\n\
                   .visible .entry b(\n)\n{\nret;\n}\n";
        assert_eq!(ptx_local_bytes(ptx, "a"), 24);
        assert_eq!(ptx_local_bytes(ptx, "b"), 0);
        assert_eq!(ptx_local_bytes(ptx, "c"), 0);
    }

    #[test]
    fn cache_round_trips_and_rejects_torn_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = PtxCache::new(dir.path().join("ptx"));
        let path = cache.path_for(&sources::COPY, Arch::SM90, (12, 9));
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with("copy-") && name.ends_with("-compute_90-nvrtc12.9.ptx"),
            "{name}"
        );
        assert_ne!(path, cache.path_for(&sources::COPY, Arch::SM80, (12, 9)));
        assert_ne!(path, cache.path_for(&sources::COPY, Arch::SM90, (12, 8)));
        assert!(cache.get(&path).is_none());
        cache
            .put(&path, ".version 8.8\n.target sm_90\n")
            .expect("put");
        assert_eq!(
            cache.get(&path).as_deref(),
            Some(".version 8.8\n.target sm_90\n")
        );
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("garbage");
        std::fs::write(&path, text).unwrap();
        assert!(cache.get(&path).is_none(), "a changed body is a miss");
    }

    #[test]
    fn candidates_prefer_explicit_then_venv() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lib = dir
            .path()
            .join("lib/python3.11/site-packages/nvidia/cuda_nvrtc/lib");
        std::fs::create_dir_all(&lib).unwrap();
        std::fs::write(lib.join("libnvrtc.so.12"), b"").unwrap();
        let c = nvrtc_candidates(Some("/x/libnvrtc.so.12".into()), dir.path());
        assert_eq!(c[0], PathBuf::from("/x/libnvrtc.so.12"));
        assert_eq!(c[1], lib.join("libnvrtc.so.12"));
        let c = ptxas_candidates(None, dir.path());
        assert!(
            !c.iter().any(|p| p.starts_with(dir.path())),
            "no ptxas in this venv"
        );
    }

    #[test]
    fn candidates_take_nvrtc_13_or_12() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lib13 = dir
            .path()
            .join("lib/python3.12/site-packages/nvidia/cu13/lib");
        std::fs::create_dir_all(&lib13).unwrap();
        std::fs::write(lib13.join("libnvrtc.so.13"), b"").unwrap();
        let c = nvrtc_candidates(None, dir.path());
        assert_eq!(c[0], lib13.join("libnvrtc.so.13"), "the CUDA 13 wheel");
        let toolkit = |name: &str| Path::new("/usr/local/cuda/lib64").join(name);
        let pos = |p: PathBuf| c.iter().position(|x| *x == p).expect("listed");
        assert!(pos(toolkit("libnvrtc.so.13")) < pos(toolkit("libnvrtc.so.12")));
    }

    #[test]
    fn cudarc_resolves_both_nvrtc_sonames() {
        // What `load_nvrtc` relies on: after the library is loaded by path, cudarc's own
        // lookup by name finds it by soname, for NVRTC 13 (the GPU test machine's CUDA
        // 13 toolkit) and NVRTC 12 (the PyPI wheel CI uses). Building cudarc for a CUDA
        // 12 version drops `.so.13` from its list and fails this.
        let names = cudarc::get_lib_name_candidates("nvrtc");
        for soname in NVRTC_SONAMES {
            assert!(
                names.iter().any(|n| n == soname),
                "{soname} not in {names:?}"
            );
        }
    }
}
