//! Criterion: the ring itself, in one process with producer and consumer threads.
//! Throughput of batched 64-byte submissions through an SPSC ring (the engine -> daemon
//! path without the daemon's dispatch), against a crossbeam bounded channel of the same
//! capacity as a well-known ceiling. Cross-process latency is the `ping-pong` binary.

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kvplane_ffi::{Pod, kvp_sqe};
use kvplane_shm::{Consumer, Geometry, Producer, RingKind, Segment};

const ITEMS: u64 = 1 << 20;
const BATCH: usize = 32;

fn ring_transfer(items: u64) -> Duration {
    let g = Geometry::new(1, 1024, 1024, 4096).unwrap();
    let seg = Segment::create(&g, 1, 1, 0).unwrap();
    let off = g.queue_pairs[0].sq_offset;
    let seg = &seg;
    let t0 = Instant::now();
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut p = Producer::<kvp_sqe>::new(seg, off, 1024, 0, RingKind::Submission).unwrap();
            let mut batch = [kvp_sqe::zeroed(); BATCH];
            let mut sent = 0u64;
            while sent < items {
                for (i, e) in batch.iter_mut().enumerate() {
                    e.user_data = sent + i as u64;
                }
                let want = ((items - sent) as usize).min(BATCH);
                sent += p.push_many(&batch[..want], None).unwrap() as u64;
            }
        });
        s.spawn(move || {
            let mut c = Consumer::<kvp_sqe>::new(seg, off, 1024, 0, RingKind::Submission).unwrap();
            let mut out = [kvp_sqe::zeroed(); BATCH];
            let mut got = 0u64;
            while got < items {
                let n = c.pop_many(&mut out);
                if n > 0 {
                    assert_eq!(out[0].user_data, got);
                }
                got += n as u64;
            }
        });
    });
    t0.elapsed()
}

fn channel_transfer(items: u64) -> Duration {
    let (tx, rx) = crossbeam::channel::bounded::<kvp_sqe>(1024);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        s.spawn(move || {
            for i in 0..items {
                let mut e = kvp_sqe::zeroed();
                e.user_data = i;
                tx.send(e).unwrap();
            }
        });
        s.spawn(move || {
            for i in 0..items {
                assert_eq!(rx.recv().unwrap().user_data, i);
            }
        });
    });
    t0.elapsed()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("spsc_64B_entries");
    g.throughput(Throughput::Elements(ITEMS));
    g.sample_size(10);
    g.bench_function("kvplane_ring_batch32", |b| {
        b.iter_custom(|n| (0..n).map(|_| ring_transfer(ITEMS)).sum())
    });
    g.bench_function("crossbeam_bounded_channel", |b| {
        b.iter_custom(|n| (0..n).map(|_| channel_transfer(ITEMS)).sum())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
