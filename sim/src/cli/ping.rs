//! `kvplane ping`: attach to a running daemon as an engine would, send NOPs in batches,
//! read STATS back, print what happened. An operator's smoke test, and the engine half
//! of `kvplane demo`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kvplane_ffi::{Opcode, Pod, Status, kvp_cqe, kvp_sqe, kvp_stats};
use kvplane_shm::{AttachOptions, Session, client};

use super::CliResult;

#[derive(Debug, clap::Args)]
pub struct PingArgs {
    /// The daemon's engine socket.
    #[arg(long)]
    pub socket: PathBuf,
    /// NOPs to send.
    #[arg(long, default_value_t = 100_000)]
    pub count: u64,
    /// NOPs submitted per batch.
    #[arg(long, default_value_t = 64)]
    pub batch: u32,
    /// Namespace to attach with.
    #[arg(long, default_value = "demo")]
    pub namespace: String,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, serde::Serialize)]
pub struct PingReport {
    pub session_id: u64,
    pub nops: u64,
    pub seconds: f64,
    pub nops_per_s: f64,
    pub daemon_ops_completed: u64,
    pub daemon_ops_failed: u64,
    pub daemon_sessions_active: u64,
    pub backend: &'static str,
}

pub fn ping(args: &PingArgs) -> Result<PingReport, Box<dyn std::error::Error + Send + Sync>> {
    let mut opts = AttachOptions::new(&args.socket);
    opts.namespaces = vec![args.namespace.clone()];
    let mut session = Session::attach(opts)?;
    let mut qp = session.take_queue_pairs()?.remove(0);
    let timeout = Duration::from_secs(5);
    let batch = args.batch.clamp(1, qp.sq_entries()) as usize;
    let sqes: Vec<kvp_sqe> = (0..batch as u64)
        .map(|i| client::sqe(Opcode::Nop, i))
        .collect();
    let mut cqes: Vec<kvp_cqe> = vec![Pod::zeroed(); batch];
    let t0 = Instant::now();
    let mut done = 0u64;
    while done < args.count {
        let want = ((args.count - done) as usize).min(batch);
        let mut sent = 0;
        while sent < want {
            sent += qp.submit(&sqes[sent..want])?;
        }
        let mut got = 0;
        while got < want {
            let n = qp.wait(&mut cqes[..want - got], timeout)?;
            if let Some(bad) = cqes[..n].iter().find(|c| c.status != Status::Ok.raw()) {
                return Err(format!("NOP failed with status {}", bad.status).into());
            }
            got += n;
        }
        done += want as u64;
    }
    let seconds = t0.elapsed().as_secs_f64();
    let mut stats_sqe = client::sqe(Opcode::Stats, u64::MAX);
    stats_sqe.arg_len = std::mem::size_of::<kvp_stats>() as u32;
    let c = qp.call(stats_sqe, timeout)?;
    if c.status != Status::Ok.raw() {
        return Err(format!("STATS failed with status {}", c.status).into());
    }
    let mut raw = [0u8; std::mem::size_of::<kvp_stats>()];
    qp.read_arena(0, &mut raw)?;
    let st: kvp_stats = kvplane_ffi::read_pod(&raw).ok_or("short stats")?;
    Ok(PingReport {
        session_id: session.session_id(),
        nops: done,
        seconds,
        nops_per_s: done as f64 / seconds.max(1e-9),
        daemon_ops_completed: st.ops_completed,
        daemon_ops_failed: st.ops_failed,
        daemon_sessions_active: st.sessions_active,
        backend: if st.backend == 1 {
            "cuda"
        } else {
            "host (no GPU)"
        },
    })
}

pub fn run(args: PingArgs) -> CliResult {
    let r = ping(&args)?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "session {}: {} NOPs in {:.3} s ({:.2} M/s); daemon reports {} ops completed, {} failed, {} sessions active, backend {}",
            r.session_id,
            r.nops,
            r.seconds,
            r.nops_per_s / 1e6,
            r.daemon_ops_completed,
            r.daemon_ops_failed,
            r.daemon_sessions_active,
            r.backend
        );
    }
    Ok(())
}
