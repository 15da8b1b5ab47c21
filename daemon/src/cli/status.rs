//! `kvplane status`: like `nvidia-smi` for KV. Reads `GET /status` from the running
//! daemon's control server and prints tiers, hit rates, throughput, sessions and GPUs, or
//! the daemon's JSON with `--json`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use super::CliResult;
use crate::control::admin::StatusReport;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The daemon's control address (`[control] metrics_addr`).
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub addr: String,
    /// Give up after this many milliseconds.
    #[arg(long, default_value_t = 3000)]
    pub timeout_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("control address `{addr}`: {reason}")]
    Addr { addr: String, reason: String },
    #[error(
        "no kvplane daemon answering at {addr} ({source}); is `kvplane serve` running, and is [control] metrics_addr this address?"
    )]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("reading /status from {addr}: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} answered {status_line}: {body}")]
    Http {
        addr: SocketAddr,
        status_line: String,
        body: String,
    },
    #[error("{addr} sent a /status body that is not a kvplane status: {source}")]
    Decode {
        addr: SocketAddr,
        #[source]
        source: serde_json::Error,
    },
}

/// One blocking `GET path` against the control server; returns the body of a 200.
pub fn http_get(addr: &str, path: &str, timeout: Duration) -> Result<String, StatusError> {
    let sock = addr
        .to_socket_addrs()
        .map_err(|e| StatusError::Addr {
            addr: addr.into(),
            reason: e.to_string(),
        })?
        .next()
        .ok_or_else(|| StatusError::Addr {
            addr: addr.into(),
            reason: "resolves to nothing".into(),
        })?;
    let io = |source| StatusError::Io { addr: sock, source };
    let mut stream = TcpStream::connect_timeout(&sock, timeout)
        .map_err(|source| StatusError::Connect { addr: sock, source })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
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
            addr: sock,
            status_line,
            body: body.trim().to_string(),
        });
    }
    Ok(body.to_string())
}

pub fn fetch(addr: &str, timeout: Duration) -> Result<StatusReport, StatusError> {
    let body = http_get(addr, "/status", timeout)?;
    let sock = addr
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
    serde_json::from_str(&body).map_err(|source| StatusError::Decode { addr: sock, source })
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
            for (tier, (u, q)) in ["hbm", "host", "nvme"].iter().zip(used.iter().zip(quota)) {
                let q = q.map_or("-".to_string(), |q| q.to_string());
                o += &format!(" {tier} {u}/{q}");
            }
        }
        o += "\n";
    }
    o += "\nGPUs:\n";
    if s.gpus.is_empty() {
        o += &format!("  {}\n", s.gpu_note.as_deref().unwrap_or("none"));
    }
    for g in &s.gpus {
        o += &format!(
            "  GPU{} {} {} PCIe gen{} x{} NVLink peers: {}\n",
            g.index,
            g.name,
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
    if args.json {
        // The daemon's own JSON, re-serialised through the typed report (one object).
        let report = fetch(&args.addr, timeout)?;
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", render(&fetch(&args.addr, timeout)?));
    }
    Ok(())
}
