//! Ring properties: a model-based proptest (wrap-around, full, empty) and a concurrent
//! producer/consumer across threads that also exercises the sleeping doorbell.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use kvplane_shm::{Consumer, Geometry, Producer, RingKind, Segment, WaitPolicy};
use proptest::prelude::*;

fn segment(entries: u32) -> (Segment, u64) {
    let g = Geometry::new(1, entries, entries, 4096).unwrap();
    let off = g.queue_pairs[0].sq_offset;
    (Segment::create(&g, 1, 1, 0).unwrap(), off)
}

proptest! {
    #[test]
    fn ring_matches_a_bounded_queue_model(
        log2 in 3u32..7,
        ops in prop::collection::vec((any::<bool>(), 0usize..40), 1..300),
    ) {
        let cap = 1u32 << log2;
        let (seg, off) = segment(cap);
        let mut p = Producer::<u64>::new(&seg, off, cap, 0, RingKind::Submission).unwrap();
        let mut c = Consumer::<u64>::new(&seg, off, cap, 0, RingKind::Submission).unwrap();
        let mut model: VecDeque<u64> = VecDeque::new();
        let mut next = 0u64;
        for (push, k) in ops {
            if push {
                let items: Vec<u64> = (next..next + k as u64).collect();
                let n = p.push_many(&items, None).unwrap();
                let room = cap as usize - model.len();
                prop_assert_eq!(n, k.min(room), "push takes exactly what fits");
                model.extend(&items[..n]);
                next += n as u64;
            } else {
                let mut out = vec![0u64; k];
                let n = c.pop_many(&mut out).unwrap();
                prop_assert_eq!(n, k.min(model.len()), "pop returns exactly what is there");
                for v in &out[..n] {
                    prop_assert_eq!(Some(*v), model.pop_front());
                }
            }
            prop_assert_eq!(c.available().unwrap() as usize, model.len());
            prop_assert_eq!(p.free().unwrap() as usize, cap as usize - model.len());
        }
    }
}

#[test]
fn concurrent_producer_and_consumer_lose_nothing_and_never_miss_a_wakeup() {
    const N: u64 = 300_000;
    let (seg, off) = segment(64);
    let seg = &seg;
    // Short spin so the consumer really goes to sleep while the producer pauses.
    let policy = WaitPolicy {
        spin: Duration::from_micros(2),
        sleep_slice: Duration::from_millis(50),
    };
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut p = Producer::<u64>::new(seg, off, 64, 0, RingKind::Submission).unwrap();
            let mut next = 1u64;
            let mut batch = Vec::with_capacity(64);
            while next <= N {
                batch.clear();
                let k = (next % 37 + 1).min(N - next + 1);
                batch.extend(next..next + k);
                let n = p.push_many(&batch, None).unwrap();
                next += n as u64;
                if next % 5000 < 40 {
                    std::thread::sleep(Duration::from_micros(200)); // let the consumer sleep
                }
            }
        });
        s.spawn(move || {
            let mut c = Consumer::<u64>::new(seg, off, 64, 0, RingKind::Submission).unwrap();
            let bell = c.own_doorbell();
            let mut expect = 1u64;
            let mut out = [0u64; 64];
            while expect <= N {
                let deadline = Instant::now() + Duration::from_secs(10);
                let ready = bell
                    .wait_until(
                        policy,
                        Some(deadline),
                        || c.has_entries(),
                        || Ok::<(), ()>(()),
                    )
                    .unwrap();
                assert!(
                    ready,
                    "lost wakeup: waited 10 s with data pending or producer stuck at {expect}"
                );
                let n = c.pop_many(&mut out).unwrap();
                for v in &out[..n] {
                    assert_eq!(*v, expect, "in order, no loss, no duplicate");
                    expect += 1;
                }
            }
        });
    });
}
