//! A data-plane thread's pass is bounded by the blocks its operations name, all its
//! sessions together, not by their number: sessions whose every entry is a LOOKUP of
//! 16,384 blocks hold the thread they share with others for a few such operations at a
//! time, not for a whole batch of 64 (before, another session's NOP waited for all of
//! them), nor for a few per session (before, the budget was each session's).

use std::time::{Duration, Instant};

use kvplane_daemon::tier::nvme::EngineKind;
use kvplane_ffi::{Opcode, Pod, Status, kvp_block_op};
use kvplane_shm::{AttachOptions, Session, client};

mod common;

const OPS: usize = 64;
const BLOCKS_PER_OP: usize = 16_384;
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
    let mut ob = AttachOptions::new(&socket);
    ob.namespaces = vec!["budget".into()];
    let mut b = Session::attach(ob).expect("attach B");
    let mut qb = b.take_queue_pairs().unwrap().remove(0);

    // One stored block, then LOOKUPs naming it BLOCKS_PER_OP times each (a lookup walks
    // until a miss, so every one of them is looked up).
    let h = 0xB0D6_E701u64;
    let (_, qa, kv) = &mut sessions[0];
    kv.write_bytes(0, &vec![7u8; common::PAGE_BYTES as usize])
        .unwrap();
    let save = common::chain_sqe(qa, Opcode::Save, 1, &[h], 0);
    let c = qa.call(save, Duration::from_secs(30)).unwrap();
    assert_eq!(c.status, Status::Ok.raw(), "{c:?}");
    let ops = vec![kvp_block_op::new(h, 0, 0); BLOCKS_PER_OP];
    let mut lookup = client::sqe(Opcode::Lookup, 0);
    lookup.count = BLOCKS_PER_OP as u32;
    lookup.arg_len = std::mem::size_of_val(&ops[..]) as u32;
    let batch: Vec<_> = (0..OPS as u64)
        .map(|i| {
            let mut s = lookup;
            s.user_data = 100 + i;
            s
        })
        .collect();

    let t0 = Instant::now();
    for (_, qa, _) in &mut sessions {
        qa.write_arena(0, kvplane_ffi::slice_as_bytes(&ops))
            .unwrap();
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
