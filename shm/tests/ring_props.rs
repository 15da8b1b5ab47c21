//! Ring properties: a model-based proptest (wrap-around, full, empty, from any starting
//! index, so across the wrap of the entries' 16-bit lap `seq` and of the 32-bit index)
//! and a concurrent producer/consumer across threads that also exercises the sleeping
//! doorbell.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use kvplane_ffi::{Pod, kvp_cqe};
use kvplane_shm::ring::ring_offsets::{HEAD, TAIL};
use kvplane_shm::{Consumer, Geometry, Producer, RingKind, Segment, WaitPolicy};
use proptest::prelude::*;

fn segment(entries: u32) -> (Segment, u64) {
    let g = Geometry::new(1, entries, entries, 4096).unwrap();
    let off = g.queue_pairs[0].cq_offset;
    (Segment::create(&g, 1, 1, 0).unwrap(), off)
}

/// A completion carrying `v` (and its complement, so a torn entry shows).
fn entry(v: u64) -> kvp_cqe {
    let mut c = kvp_cqe::zeroed();
    c.user_data = v;
    c.bytes = !v;
    c
}

fn value(c: &kvp_cqe) -> u64 {
    assert_eq!(c.bytes, !c.user_data, "torn entry");
    c.user_data
}

/// Producer and consumer of a ring whose indices start at `start`, the slots holding the
/// previous lap's entries as a long-running ring's would.
fn ring_at<'a>(
    seg: &'a Segment,
    off: u64,
    cap: u32,
    start: u32,
) -> (Producer<'a, kvp_cqe>, Consumer<'a, kvp_cqe>) {
    let before = start.wrapping_sub(cap);
    for word in [TAIL, HEAD] {
        seg.atomic_u32(off + word)
            .unwrap()
            .store(before, std::sync::atomic::Ordering::Relaxed);
    }
    let mut p = Producer::new(seg, off, cap, 0, RingKind::Completion).unwrap();
    let mut c = Consumer::new(seg, off, cap, 0, RingKind::Completion).unwrap();
    let fill: Vec<kvp_cqe> = (0..u64::from(cap)).map(|v| entry(u64::MAX - v)).collect();
    assert_eq!(p.push_many(&fill, None).unwrap(), cap as usize);
    let mut out = vec![kvp_cqe::zeroed(); cap as usize];
    assert_eq!(c.pop_many(&mut out), cap as usize);
    (p, c)
}

/// A starting index: anywhere, or just before a wrap of the lap `seq` (every 2^16 laps)
/// or of the u32 index.
fn start_index(log2: u32) -> impl Strategy<Value = u32> {
    prop_oneof![
        any::<u32>(),
        (0u32..200).prop_map(move |d| (0xffffu32 << log2).wrapping_sub(d)),
        (0u32..200).prop_map(|d| 0u32.wrapping_sub(d)),
    ]
}

proptest! {
    #[test]
    fn ring_matches_a_bounded_queue_model(
        (log2, start) in (3u32..7).prop_flat_map(|l| (Just(l), start_index(l))),
        ops in prop::collection::vec((any::<bool>(), 0usize..40), 1..300),
    ) {
        let cap = 1u32 << log2;
        let (seg, off) = segment(cap);
        let (mut p, mut c) = ring_at(&seg, off, cap, start);
        let mut model: VecDeque<u64> = VecDeque::new();
        let mut next = 0u64;
        for (push, k) in ops {
            if push {
                let items: Vec<kvp_cqe> = (next..next + k as u64).map(entry).collect();
                let n = p.push_many(&items, None).unwrap();
                let room = cap as usize - model.len();
                prop_assert_eq!(n, k.min(room), "push takes exactly what fits");
                model.extend(next..next + n as u64);
                next += n as u64;
            } else {
                let mut out = vec![kvp_cqe::zeroed(); k];
                let n = c.pop_many(&mut out);
                prop_assert_eq!(n, k.min(model.len()), "pop returns exactly what is there");
                for v in &out[..n] {
                    prop_assert_eq!(Some(value(v)), model.pop_front());
                }
            }
            prop_assert_eq!(c.available() as usize, model.len());
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
            let mut p = Producer::<kvp_cqe>::new(seg, off, 64, 0, RingKind::Completion).unwrap();
            let mut next = 1u64;
            let mut batch = Vec::with_capacity(64);
            while next <= N {
                batch.clear();
                let k = (next % 37 + 1).min(N - next + 1);
                batch.extend((next..next + k).map(entry));
                let n = p.push_many(&batch, None).unwrap();
                next += n as u64;
                if next % 5000 < 40 {
                    std::thread::sleep(Duration::from_micros(200)); // let the consumer sleep
                }
            }
        });
        s.spawn(move || {
            let mut c = Consumer::<kvp_cqe>::new(seg, off, 64, 0, RingKind::Completion).unwrap();
            let bell = c.own_doorbell();
            let mut expect = 1u64;
            let mut out = [kvp_cqe::zeroed(); 64];
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
                let n = c.pop_many(&mut out);
                for v in &out[..n] {
                    assert_eq!(value(v), expect, "in order, no loss, no duplicate");
                    expect += 1;
                }
            }
        });
    });
}
