//! A data-plane thread's pass over a session is bounded by the blocks its operations
//! name, not only by their number: a session whose every entry is a LOOKUP of 16,384
//! blocks holds the thread it shares with other sessions for a few such operations at a
//! time, not for its whole batch of 64 (before, another session's NOP waited for all of
//! them).

use std::time::{Duration, Instant};

use kvplane_daemon::tier::nvme::EngineKind;
use kvplane_ffi::{Opcode, Pod, Status, kvp_block_op};
use kvplane_shm::{AttachOptions, Session, client};

mod common;

const OPS: usize = 64;
const BLOCKS_PER_OP: usize = 16_384;

#[test]
fn a_session_of_huge_operations_does_not_hold_the_thread_for_its_whole_batch() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path(), EngineKind::Sync);
    config.serve.dataplane_threads = 1;
    let (daemon, _) = common::start(config, None);
    let socket = daemon.socket_path().to_path_buf();
    let (_a, mut qa, kv) = common::attach_with_kv(&socket, "budget");
    let mut ob = AttachOptions::new(&socket);
    ob.namespaces = vec!["budget".into()];
    let mut b = Session::attach(ob).expect("attach B");
    let mut qb = b.take_queue_pairs().unwrap().remove(0);

    // One stored block, then LOOKUPs naming it BLOCKS_PER_OP times each (a lookup walks
    // until a miss, so every one of them is looked up).
    let h = 0xB0D6_E701u64;
    kv.write_bytes(0, &vec![7u8; common::PAGE_BYTES as usize])
        .unwrap();
    let save = common::chain_sqe(&mut qa, Opcode::Save, 1, &[h], 0);
    let c = qa.call(save, Duration::from_secs(30)).unwrap();
    assert_eq!(c.status, Status::Ok.raw(), "{c:?}");
    let ops = vec![kvp_block_op::new(h, 0, 0); BLOCKS_PER_OP];
    qa.write_arena(0, kvplane_ffi::slice_as_bytes(&ops))
        .unwrap();
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
    assert_eq!(qa.submit(&batch).unwrap(), OPS);
    let mut done = 0;
    let mut rtts = Vec::new();
    let mut cqes = [Pod::zeroed(); OPS];
    while done < OPS {
        let n = qa.poll(&mut cqes).unwrap();
        for c in &cqes[..n] {
            assert_eq!(c.status, Status::Ok.raw(), "{c:?}");
            assert_eq!(c.blocks as usize, BLOCKS_PER_OP, "every block found");
            done += 1;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the LOOKUPs never completed"
        );
        if done < OPS {
            let t = Instant::now();
            let c = qb
                .call(client::sqe(Opcode::Nop, 1), Duration::from_secs(60))
                .expect("NOP of B");
            assert_eq!(c.status, Status::Ok.raw());
            rtts.push(t.elapsed());
        }
    }
    let batch_took = t0.elapsed();
    let slowest = rtts.iter().max().copied().unwrap_or_default();
    eprintln!(
        "{OPS} LOOKUPs of {BLOCKS_PER_OP} blocks took {batch_took:?}; meanwhile {} NOPs of another session on the thread, slowest {slowest:?}",
        rtts.len()
    );
    // At most 4 of the 64 per pass (65,536 blocks): the NOPs get in between.
    assert!(
        rtts.len() >= 4,
        "only {} NOPs got in while the batch ran for {batch_took:?}",
        rtts.len()
    );
    assert!(
        slowest < batch_took / 4,
        "a NOP waited {slowest:?} of the batch's {batch_took:?}"
    );
    drop((qa, qb, b));
    daemon.shutdown();
}
