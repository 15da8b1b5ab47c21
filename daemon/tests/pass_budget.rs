//! A data-plane thread's pass is bounded by the blocks its operations name, all its
//! sessions together, not by their number: sessions whose every entry is a LOOKUP of
//! 16,384 blocks hold the thread they share with others for a few such operations at a
//! time, not for a whole batch of 64 (before, another session's NOP waited for all of
//! them), nor for a few per session (before, the budget was each session's).

use std::time::{Duration, Instant};

use kvplane_daemon::tier::nvme::EngineKind;
use kvplane_ffi::{Opcode, Pod, Status, kvp_block_op};
use kvplane_shm::client;

mod common;

const OPS: usize = 64;
const BLOCKS_PER_OP: usize = 16_384;
/// The block every LOOKUP names.
const LOOKUP_HASH: u64 = 0xB0D6_E701;
/// The data-plane thread's blocks per pass (`PASS_BLOCKS` in `session/pool.rs`).
const PASS_BLOCKS: usize = 1 << 16;

/// What [`lookups_beside_nops`] saw.
struct Run {
    /// From the first submission to the last LOOKUP's completion.
    took: Duration,
    /// NOP round trips of another session meanwhile.
    rtts: Vec<Duration>,
}

#[test]
fn a_session_of_huge_operations_does_not_hold_the_thread_for_its_whole_batch() {
    let Run { took, rtts } = lookups_beside_nops(1);
    let slowest = rtts.iter().max().copied().unwrap_or_default();
    // At most 4 of the 64 per pass (65,536 blocks): the NOPs get in between.
    assert!(
        rtts.len() >= 4,
        "only {} NOPs got in while the batch ran for {took:?}",
        rtts.len()
    );
    assert!(
        slowest < took / 4,
        "a NOP waited {slowest:?} of the batch's {took:?}"
    );
}

/// Eight such sessions: one budget per pass for all of them, so the NOP session waits for
/// one budget's worth of their LOOKUPs at most, not eight. Measured against the daemon's
/// own pace in the same run: the NOPs' median round trip stays under the time it takes
/// for two budgets of these LOOKUPs (with a budget per session, a NOP arriving in a pass
/// waited for the rest of it: a median of about four).
#[test]
fn sessions_of_huge_operations_share_one_budget_per_pass() {
    const HEAVY: usize = 8;
    let Run { took, mut rtts } = lookups_beside_nops(HEAVY);
    let per_budget = took.mul_f64(PASS_BLOCKS as f64 / (HEAVY * OPS * BLOCKS_PER_OP) as f64);
    rtts.sort_unstable();
    // A NOP gets in once a pass: about 128 passes of one budget here (16 of eight).
    assert!(rtts.len() >= 32, "only {} NOPs got in", rtts.len());
    let median = rtts[rtts.len() / 2];
    assert!(
        median < per_budget * 2,
        "NOP median {median:?} over two budgets' time ({per_budget:?} each)"
    );
}

/// Two sessions of two queue pairs each, every queue pair with 64 such LOOKUPs: the
/// thread's budget alternates between the sessions, and within each session between its
/// queue pairs, so no queue pair waits for another's whole batch. (A session moved on to
/// its next queue pair in every pass, budget or not, so with two sessions each one's
/// budget always went to the same queue pair.)
#[test]
fn each_queue_pair_of_sessions_sharing_the_budget_gets_its_turn() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path(), EngineKind::Sync);
    config.serve.dataplane_threads = 1;
    let (daemon, _) = common::start(config, None);
    let socket = daemon.socket_path().to_path_buf();
    let mut sessions: Vec<_> = (0..2)
        .map(|_| common::attach_with_kv_qps(&socket, "budget", 2))
        .collect();
    let batch = {
        let (_, qps, kv) = &mut sessions[0];
        stored_block_lookups(&mut qps[0], kv)
    };
    for (_, qps, _) in &mut sessions {
        for q in qps.iter_mut() {
            q.write_arena(0, &lookup_args()).unwrap();
        }
    }
    for (_, qps, _) in &mut sessions {
        for q in qps.iter_mut() {
            assert_eq!(q.submit(&batch).unwrap(), OPS);
        }
    }
    // When each queue pair's first and last LOOKUPs completed, in completion order.
    let mut first_last = [[None::<(usize, usize)>; 2]; 2];
    let (mut seen, mut order) = (0, 0usize);
    let t0 = Instant::now();
    let mut cqes = [Pod::zeroed(); OPS];
    while seen < 4 * OPS {
        for (s, (_, qps, _)) in sessions.iter_mut().enumerate() {
            for (q, qp) in qps.iter_mut().enumerate() {
                let n = qp.poll(&mut cqes).unwrap();
                for c in &cqes[..n] {
                    assert_eq!(c.status, Status::Ok.raw(), "{c:?}");
                    let (first, _) = first_last[s][q].unwrap_or((order, order));
                    first_last[s][q] = Some((first, order));
                    order += 1;
                    seen += 1;
                }
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the LOOKUPs never completed"
        );
    }
    for (s, qps) in first_last.iter().enumerate() {
        let [(first0, last0), (first1, last1)] = qps.map(Option::unwrap);
        assert!(
            first1 < last0 && first0 < last1,
            "session {s}: one queue pair's LOOKUPs all came before the other's began \
             (completion order: {first0}..{last0} and {first1}..{last1})"
        );
    }
    drop(sessions);
    daemon.shutdown();
}

/// Saves the block the LOOKUPs of [`lookup_args`] name (through `qp`, into `kv`), and
/// returns `OPS` LOOKUP submissions of `BLOCKS_PER_OP` blocks each, for an arena holding
/// those arguments.
fn stored_block_lookups(
    qp: &mut kvplane_shm::QueuePair,
    kv: &kvplane_shm::Segment,
) -> Vec<kvplane_ffi::kvp_sqe> {
    kv.write_bytes(0, &vec![7u8; common::PAGE_BYTES as usize])
        .unwrap();
    let save = common::chain_sqe(qp, Opcode::Save, 1, &[LOOKUP_HASH], 0);
    let c = qp.call(save, Duration::from_secs(30)).unwrap();
    assert_eq!(c.status, Status::Ok.raw(), "{c:?}");
    let mut lookup = client::sqe(Opcode::Lookup, 0);
    lookup.count = BLOCKS_PER_OP as u32;
    lookup.arg_len = (BLOCKS_PER_OP * std::mem::size_of::<kvp_block_op>()) as u32;
    (0..OPS as u64)
        .map(|i| {
            let mut s = lookup;
            s.user_data = 100 + i;
            s
        })
        .collect()
}

/// The arena bytes of a LOOKUP naming the stored block `BLOCKS_PER_OP` times (a lookup
/// walks until a miss, so every one of them is looked up).
fn lookup_args() -> Vec<u8> {
    let ops = vec![kvp_block_op::new(LOOKUP_HASH, 0, 0); BLOCKS_PER_OP];
    kvplane_ffi::slice_as_bytes(&ops).to_vec()
}

/// `heavy` sessions on the daemon's one data-plane thread each submit `OPS` LOOKUPs of
/// `BLOCKS_PER_OP` blocks at once; another session sends NOP round trips until all are
/// done.
fn lookups_beside_nops(heavy: usize) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path(), EngineKind::Sync);
    config.serve.dataplane_threads = 1;
    let (daemon, _) = common::start(config, None);
    let socket = daemon.socket_path().to_path_buf();
    let mut sessions: Vec<_> = (0..heavy)
        .map(|_| common::attach_with_kv(&socket, "budget"))
        .collect();
    let (b, mut qb) = common::attach_plain(&socket, "budget");

    let batch = {
        let (_, qa, kv) = &mut sessions[0];
        stored_block_lookups(qa, kv)
    };
    let t0 = Instant::now();
    for (_, qa, _) in &mut sessions {
        qa.write_arena(0, &lookup_args()).unwrap();
        assert_eq!(qa.submit(&batch).unwrap(), OPS);
    }
    let mut done = 0;
    let mut rtts = Vec::new();
    let mut cqes = [Pod::zeroed(); OPS];
    while done < heavy * OPS {
        for (_, qa, _) in &mut sessions {
            let n = qa.poll(&mut cqes).unwrap();
            for c in &cqes[..n] {
                assert_eq!(c.status, Status::Ok.raw(), "{c:?}");
                assert_eq!(c.blocks as usize, BLOCKS_PER_OP, "every block found");
                done += 1;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "the LOOKUPs never completed"
        );
        if done < heavy * OPS {
            rtts.push(common::timed_nop(&mut qb));
        }
    }
    let took = t0.elapsed();
    let slowest = rtts.iter().max().copied().unwrap_or_default();
    eprintln!(
        "{heavy} x {OPS} LOOKUPs of {BLOCKS_PER_OP} blocks took {took:?}; meanwhile {} NOPs of another session on the thread, slowest {slowest:?}",
        rtts.len()
    );
    drop((sessions, qb, b));
    daemon.shutdown();
    Run { took, rtts }
}
