//! `kvplane status`: like `nvidia-smi` for KV. Reads `GET /status` from the running
//! daemon's control socket (or, where the operator allows it, its loopback TCP port) and
//! prints tiers, hit rates, throughput, sessions and GPUs, or the daemon's JSON with
//! `--json`. What it shows depends on who runs it: the operator sees everything, a tenant
//! its own namespaces and sessions (the daemon checks the caller's uid).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use super::CliResult;
use kvplane_daemon::control::admin::StatusReport;

/// The default engine socket's control socket (`[control] socket_path` unset).
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/kvplane/kvplane.control.sock";

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The daemon's control socket (`[control] socket_path`; by default next to the engine
    /// socket, `kvplane.sock` -> `kvplane.control.sock`).
    #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
    pub socket: PathBuf,
    /// Ask the loopback TCP listener instead (`[control] metrics_addr`; it serves
    /// `/status` only with `tcp_tenant_data = true`).
    #[arg(long)]
    pub addr: Option<String>,
    /// Give up after this many milliseconds.
    #[arg(long, default_value_t = 3000)]
    pub timeout_ms: u64,
}

/// Where the control server is.
#[derive(Clone, Debug)]
pub enum Endpoint {
    /// The control Unix socket.
    Unix(PathBuf),
    /// A loopback `IP:port`.
    Tcp(String),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "{}", p.display()),
            Endpoint::Tcp(a) => f.write_str(a),
        }
    }
}

impl StatusArgs {
    pub fn endpoint(&self) -> Endpoint {
        match &self.addr {
            Some(a) => Endpoint::Tcp(a.clone()),
            None => Endpoint::Unix(self.socket.clone()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("control address `{addr}`: {reason}")]
    Addr { addr: String, reason: String },
    #[error(
        "no kvplane daemon answering at {at} ({source}); is `kvplane serve` running, and is this its control socket ([control] socket_path) or metrics_addr?"
    )]
    Connect {
        at: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading from {at}: {source}")]
    Io {
        at: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{at} answered {status_line}: {body}")]
    Http {
        at: String,
        status_line: String,
        body: String,
    },
    #[error("{at} sent a /status body that is not a kvplane status: {source}")]
    Decode {
        at: String,
        #[source]
        source: serde_json::Error,
    },
}

/// A connected stream to the control server, with its timeouts set.
trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

fn connect(endpoint: &Endpoint, timeout: Duration) -> Result<Box<dyn Stream>, StatusError> {
    let at = endpoint.to_string();
    let io = |source| StatusError::Io {
        at: at.clone(),
        source,
    };
    let connect_err = |source| StatusError::Connect {
        at: at.clone(),
        source,
    };
    match endpoint {
        Endpoint::Unix(path) => {
            let s = UnixStream::connect(path).map_err(connect_err)?;
            s.set_read_timeout(Some(timeout)).map_err(io)?;
            s.set_write_timeout(Some(timeout)).map_err(io)?;
            Ok(Box::new(s))
        }
        Endpoint::Tcp(addr) => {
            let sock = addr
                .to_socket_addrs()
                .map_err(|e| StatusError::Addr {
                    addr: addr.clone(),
                    reason: e.to_string(),
                })?
                .next()
                .ok_or_else(|| StatusError::Addr {
                    addr: addr.clone(),
                    reason: "resolves to nothing".into(),
                })?;
            let s = TcpStream::connect_timeout(&sock, timeout).map_err(connect_err)?;
            s.set_read_timeout(Some(timeout)).map_err(io)?;
            s.set_write_timeout(Some(timeout)).map_err(io)?;
            Ok(Box::new(s))
        }
    }
}

/// One blocking `GET path` against the control server; returns the body of a 200.
pub fn http_get(endpoint: &Endpoint, path: &str, timeout: Duration) -> Result<String, StatusError> {
    let at = endpoint.to_string();
    let io = |source| StatusError::Io {
        at: at.clone(),
        source,
    };
    let mut stream = connect(endpoint, timeout)?;
    // The server answers only loopback Host names (DNS rebinding).
    let host = match endpoint {
        Endpoint::Unix(_) => "localhost",
        Endpoint::Tcp(a) => a.as_str(),
    };
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(io)?;
    let mut raw = Vec::new();
    // The daemon's answers are a few KiB (one line per session at most): cap at 64 MiB.
    stream.take(64 << 20).read_to_end(&mut raw).map_err(io)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status_line = head.lines().next().unwrap_or("").to_string();
    if status_line.split(' ').nth(1) != Some("200") {
        return Err(StatusError::Http {
            at,
            status_line,
            body: body.trim().to_string(),
        });
    }
    Ok(body.to_string())
}

pub fn fetch(endpoint: &Endpoint, timeout: Duration) -> Result<StatusReport, StatusError> {
    let body = http_get(endpoint, "/status", timeout)?;
    serde_json::from_str(&body).map_err(|source| StatusError::Decode {
        at: endpoint.to_string(),
        source,
    })
}

fn gib(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    }
}

fn pct(r: Option<f64>) -> String {
    r.map_or_else(|| "-".into(), |r| format!("{:.1}%", r * 100.0))
}

/// The human table (separate from `run` so tests can render a report).
pub fn render(s: &StatusReport) -> String {
    let mut o = String::new();
    let uptime = s.uptime_s as u64;
    o += &format!(
        "kvplane {}  pid {}  up {}h{:02}m{:02}s  backend: {}  socket {}\n",
        s.version,
        s.pid,
        uptime / 3600,
        uptime / 60 % 60,
        uptime % 60,
        s.backend,
        s.socket_path
    );
    // Which device moves the bytes, what was configured, and why they differ.
    let d = &s.device;
    o += &format!(
        "device: {}  ([device] backend = \"{}\", ordinal {})\n",
        d.describe, d.choice, d.ordinal
    );
    if let Some(reason) = &d.fallback_reason {
        o += &format!("  {} backend because: {reason}\n", d.backend);
    }
    if !d.nvme_g1_path.is_empty() {
        o += &format!("  NVMe <-> G1: {}\n", d.nvme_g1_path);
    }
    o += &format!(
        "block {} KiB, {} blocks stored; lookups: {} hits, {} misses, hit rate {}\n\n",
        s.block_bytes / 1024,
        s.blocks,
        s.lookup_hits,
        s.lookup_misses,
        pct(s.hit_rate)
    );
    o += &format!(
        "{:<5} {:>12} {:>12} {:>6} {:>9}  {:<}\n",
        "TIER", "CAPACITY", "USED", "USE", "HITS", "BACKING"
    );
    for t in &s.tiers {
        let use_pct = if t.capacity_bytes > 0 {
            format!(
                "{:.0}%",
                t.used_bytes as f64 * 100.0 / t.capacity_bytes as f64
            )
        } else {
            "-".into()
        };
        o += &format!(
            "{:<5} {:>12} {:>12} {:>6} {:>9}  {}\n",
            t.tier,
            gib(t.capacity_bytes),
            gib(t.used_bytes),
            use_pct,
            pct(t.hit_rate),
            t.backing
        );
        let evicted: Vec<String> = t
            .removed
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(r, n)| format!("{r} {n}"))
            .collect();
        if !evicted.is_empty() {
            o += &format!("      removed: {}\n", evicted.join(", "));
        }
    }
    o += &format!(
        "\n{:<16} {:>14} {:>12}   (rates over the last {:.0} s)\n",
        "LINK", "TOTAL", "RATE", s.rate_window_s
    );
    for l in &s.links {
        o += &format!(
            "{:<16} {:>14} {:>9.3} GB/s\n",
            l.link,
            gib(l.bytes_total),
            l.bytes_per_s / 1e9
        );
    }
    o += &format!(
        "\nops: {} completed, {} failed, {} in flight\n",
        s.ops_completed, s.ops_failed, s.ops_in_flight
    );
    for l in &s.op_latency {
        let b = |v: Option<u64>| v.map_or_else(|| ">2.5 s".into(), |us| format!("<={us} us"));
        o += &format!(
            "  {:<15} {:>9} ops  p50 {:>10}  p99 {:>10}\n",
            l.op,
            l.count,
            b(l.p50_le_us),
            b(l.p99_le_us)
        );
    }
    if !s.nvme.engine.is_empty() {
        o += &format!(
            "nvme: engine {}{}, restored at start {}, errors: write {}, read {}, corrupt {}\n",
            s.nvme.engine,
            if s.nvme.registered_buffers {
                " (registered buffers)"
            } else {
                ""
            },
            s.nvme.restored_at_start,
            s.nvme.write_errors,
            s.nvme.read_errors,
            s.nvme.corrupt_dropped
        );
    }
    o += &format!("\nsessions: {}\n", s.sessions.len());
    for sess in &s.sessions {
        o += &format!(
            "  #{:<4} pid {:<8} uid {:<6} qps {:<2} namespaces: {}\n",
            sess.session_id,
            sess.pid,
            sess.uid,
            sess.queue_pairs,
            sess.namespaces.join(", ")
        );
    }
    for ns in &s.namespaces {
        o += &format!(
            "  namespace {:<32} hits {:>9} misses {:>9} hit rate {}",
            ns.namespace,
            ns.lookup_hits,
            ns.lookup_misses,
            pct(ns.hit_rate)
        );
        // Namespaces with a quota: blocks held / limit per tier ("-" = no limit).
        if let (Some(used), Some(quota)) = (ns.used_blocks, ns.quota_blocks) {
            o += "  blocks/quota";
            for (tier, u) in used.iter() {
                let q = quota[tier].map_or("-".to_string(), |q| q.to_string());
                o += &format!(" {tier} {u}/{q}");
            }
        }
        o += "\n";
    }
    o += "\nGPUs:\n";
    if d.gpus.is_empty() {
        o += &format!("  {}\n", d.gpu_note.as_deref().unwrap_or("none"));
    }
    for g in &d.gpus {
        o += &format!(
            "  GPU{} {} {} {} PCIe gen{} x{} NVLink peers: {}\n",
            g.index,
            g.name,
            g.uuid,
            gib(g.memory_total_bytes),
            g.pcie_link_gen.map_or("?".into(), |v| v.to_string()),
            g.pcie_link_width.map_or("?".into(), |v| v.to_string()),
            if g.nvlink_peers.is_empty() {
                "none".to_string()
            } else {
                g.nvlink_peers.join(", ")
            }
        );
    }
    o
}

pub fn run(args: StatusArgs) -> CliResult {
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let report = fetch(&args.endpoint(), timeout)?;
    if args.json {
        // The daemon's own JSON, re-serialised through the typed report (one object).
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report as the daemon serialises it, with `device` set by the caller.
    fn report(device: serde_json::Value) -> StatusReport {
        serde_json::from_value(serde_json::json!({
            "version": "0.1.0", "backend": device["backend"], "pid": 42, "uptime_s": 3.0,
            "socket_path": "/run/kvplane/kvplane.sock", "block_bytes": 2097152, "blocks": 0,
            "tiers": [], "lookup_hits": 0, "lookup_misses": 0, "hit_rate": null, "links": [],
            "rate_window_s": 10.0, "ops_completed": 0, "ops_failed": 0, "ops_in_flight": 0,
            "op_latency": [], "nvme": {"engine": "", "registered_buffers": false,
            "write_errors": 0, "read_errors": 0, "corrupt_dropped": 0, "restored_at_start": 0},
            "sessions": [], "namespaces": [], "device": device,
        }))
        .expect("a StatusReport")
    }

    #[test]
    fn the_device_line_says_the_backend_the_choice_and_why() {
        // `auto` with no driver: the host, the reason, no GPUs and why.
        let host = render(&report(serde_json::json!({
            "backend": "host", "choice": "auto", "ordinal": 0,
            "fallback_reason": "no NVIDIA driver: libcuda.so could not be loaded",
            "describe": "host backend: CPU build of kernels/cuda/*.cu",
            "gpus": [], "gpu_note": "no NVIDIA driver (libcuda.so could not be loaded)",
        })));
        assert!(host.contains("backend: host  socket"), "{host}");
        assert!(
            host.contains(
                "device: host backend: CPU build of kernels/cuda/*.cu  ([device] backend = \"auto\", ordinal 0)\n  host backend because: no NVIDIA driver: libcuda.so could not be loaded\n"
            ),
            "{host}"
        );
        assert!(
            host.contains("GPUs:\n  no NVIDIA driver (libcuda.so could not be loaded)\n"),
            "{host}"
        );
        // `cuda` on a GPU: its line, no reason, the GPU listed with its UUID.
        let cuda = render(&report(serde_json::json!({
            "backend": "cuda", "choice": "cuda", "ordinal": 1, "fallback_reason": null,
            "describe": "cuda backend: NVIDIA H200 (sm_90, 139.8 GiB)",
            "gpus": [{"index": 1, "name": "NVIDIA H200", "uuid": "GPU-0123",
                "memory_total_bytes": 150_000_000_000u64, "pci_bus_id": "00000000:19:00.0",
                "pcie_link_gen": 5, "pcie_link_width": 16, "nvlink_peers": []}],
            "gpu_note": null,
            "nvme_g1_path": "through the pinned host tier, MACs checked on the CPU",
        })));
        assert!(cuda.contains("backend: cuda  socket"), "{cuda}");
        assert!(
            cuda.contains(
                "\n  NVMe <-> G1: through the pinned host tier, MACs checked on the CPU\n"
            ),
            "{cuda}"
        );
        assert!(
            cuda.contains(
                "device: cuda backend: NVIDIA H200 (sm_90, 139.8 GiB)  ([device] backend = \"cuda\", ordinal 1)\n"
            ),
            "{cuda}"
        );
        assert!(!cuda.contains("because"), "{cuda}");
        assert!(
            cuda.contains("  GPU1 NVIDIA H200 GPU-0123 139.70 GiB PCIe gen5 x16"),
            "{cuda}"
        );
    }
}
