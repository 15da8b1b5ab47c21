//! The I/O executors: a fixed pool of threads that run the operations that may wait on
//! NVMe (a write-through save, a demotion to make room, a load staged from NVMe) or walk
//! a whole namespace (a CLEAR), so that neither a slow or stalled disk nor a large
//! namespace ever holds up a thread that polls rings. A data-plane thread
//! checks a session out to the pool with one such operation; the executor runs it with
//! the ordinary synchronous [`DataPlane::handle`] and hands the completion and the session
//! back (the completion ring has one producer: only the owning thread posts it).
//!
//! Bounded: the queue holds `serve.io_queue` jobs; when it is full the data-plane thread
//! keeps the job and retries later (that session waits, the others are served). A job
//! moves the session's data and two reference-counted handles: no allocation per op.

use std::sync::Arc;
use std::thread::JoinHandle;

use kvplane_ffi::{Opcode, Status, kvp_cqe};
use kvplane_shm::Segment;
use kvplane_shm::server::{Request, completion};

use super::{DataPlane, SessionData};

/// Where an executor hands a finished job back (the owning data-plane thread).
pub trait IoReturn: Send + Sync {
    fn io_done(&self, done: IoDone);
}

/// One operation checked out to the I/O pool with its session's data.
pub struct IoJob {
    /// The owner's handle for the session (slot in its table) and the queue pair whose
    /// completion ring gets the result.
    pub slot: u32,
    pub queue_pair: u32,
    pub data: SessionData,
    pub seg: Arc<Segment>,
    pub req: Request,
    pub back: Arc<dyn IoReturn>,
}

/// A finished job: the session's data comes back with the completion to post.
pub struct IoDone {
    pub slot: u32,
    pub queue_pair: u32,
    pub data: SessionData,
    pub cqe: kvp_cqe,
    /// The operation panicked: the session must end (its data may be half-updated).
    pub panicked: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("spawning I/O thread {name}: {source}")]
pub struct IoSpawnError {
    pub name: String,
    #[source]
    pub source: std::io::Error,
}

/// The executors and their bounded queue.
pub struct IoPool {
    tx: Option<crossbeam::channel::Sender<IoJob>>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for IoPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoPool")
            .field("threads", &self.threads.len())
            .finish()
    }
}

impl IoPool {
    /// Starts `threads` executors serving a queue of `queue` jobs.
    pub fn start(
        dataplane: &Arc<DataPlane>,
        threads: usize,
        queue: usize,
    ) -> Result<IoPool, IoSpawnError> {
        let (tx, rx) = crossbeam::channel::bounded::<IoJob>(queue.max(1));
        let mut pool = IoPool {
            tx: Some(tx),
            threads: Vec::with_capacity(threads),
        };
        for i in 0..threads.max(1) {
            let (rx, dp) = (rx.clone(), Arc::clone(dataplane));
            let name = format!("kvp-io-{i}");
            let h = std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || {
                    for job in rx {
                        run(&dp, job);
                    }
                })
                .map_err(|source| IoSpawnError { name, source })?;
            pool.threads.push(h);
        }
        Ok(pool)
    }

    /// A handle that queues jobs (one per data-plane thread). The executors run until
    /// every handle is gone and [`IoPool::shutdown`] was called.
    pub fn submitter(&self) -> Option<IoSubmitter> {
        self.tx.clone().map(IoSubmitter)
    }

    /// Lets the executors finish what is queued, then joins them (once every submitter
    /// is dropped).
    pub fn shutdown(&mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Queues jobs for the executors.
pub struct IoSubmitter(crossbeam::channel::Sender<IoJob>);

impl IoSubmitter {
    /// Queues a job; a full queue gives it back (the caller keeps it and retries).
    #[allow(clippy::result_large_err)]
    pub fn try_submit(&self, job: IoJob) -> Result<(), IoJob> {
        self.0.try_send(job).map_err(|e| e.into_inner())
    }
}

fn run(dp: &DataPlane, mut job: IoJob) {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        dp.handle(&mut job.data, &job.seg, &job.req, job.queue_pair as usize)
    }));
    let (cqe, panicked) = match r {
        Ok(c) => (c, false),
        Err(_) => {
            tracing::error!(session = job.data.id, opcode = ?job.req.opcode, "an I/O operation panicked; ending the session");
            (completion(job.req.user_data, Status::Internal), true)
        }
    };
    let IoJob {
        slot,
        queue_pair,
        data,
        back,
        ..
    } = job;
    back.io_done(IoDone {
        slot,
        queue_pair,
        data,
        cqe,
        panicked,
    });
}

impl DataPlane {
    /// Whether serving `req` may wait on NVMe I/O when the daemon has an NVMe tier: a
    /// SAVE (write-through, or a demotion to make room in the host tier), a LOAD (staged
    /// from NVMe), a DROP or CLEAR_NAMESPACE (they erase the NVMe slot headers before
    /// completing); or on a copy from G1 down to the host tier: a SAVE kept on the GPU
    /// when the daemon has G1 (making room there may copy a victim down and wait for
    /// it). A CLEAR_NAMESPACE goes to the pool with or without an NVMe tier: it visits
    /// every entry of its namespace, which a data-plane thread serving other sessions
    /// must not wait for. Such requests go to the [`IoPool`]; everything else is served
    /// on the data-plane thread, which never waits for the device.
    ///
    /// A SAVE that names an engine IPC event is not handed over at first
    /// (`at_submission`): the data-plane thread polls the event, holding nothing, and
    /// `poll` hands the SAVE over once the event has completed
    /// ([`Polled::HandOff`](super::Polled::HandOff)), so
    /// an engine that never records its event ties up no executor.
    pub fn may_do_io(&self, req: &Request, at_submission: bool) -> bool {
        let Some(stores) = self.mover().map(|m| m.stores()) else {
            return false;
        };
        if at_submission && req.opcode == Opcode::Save && req.param0 != 0 {
            return false;
        }
        let nvme = stores.nvme.is_some()
            && matches!(
                req.opcode,
                Opcode::Save | Opcode::Load | Opcode::Drop | Opcode::ClearNamespace
            );
        let copy_down = stores.hbm.is_some()
            && req.opcode == Opcode::Save
            && req.flags & kvplane_ffi::SQE_F_KEEP_ON_GPU != 0;
        nvme || copy_down || req.opcode == Opcode::ClearNamespace
    }
}
