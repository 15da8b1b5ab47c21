//! Model check (loom) of the ring's publication and doorbell protocol, written with the
//! same orderings as `ring.rs`: the producer writes the entry, publishes it (stores its
//! `seq`, Release), issues a SeqCst fence, then reads the sleeping flag; the waiter stores
//! the flag (SeqCst), fences, re-checks the entry's `seq`.
//! Properties over every interleaving loom explores:
//! - a consumer that sees an entry published sees its contents (release/acquire);
//! - no lost wakeup: a consumer that decides to sleep is always woken (the producer
//!   sees its flag), so it never sleeps forever with an entry published;
//! - the ring with entries published by their own `seq` (`entry_seq_ring_...`): in order
//!   across the wrap of the 16-bit lap counter and of the u32 index, a batch published
//!   last entry first, a full ring whose producer waits for the consumer's head, and a
//!   sleeping consumer always woken.
//!
//! Run: RUSTFLAGS="--cfg loom" cargo test -p kvplane-shm --test loom_doorbell --release
#![cfg(loom)]

use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::sync::atomic::{AtomicU16, AtomicU32, Ordering, fence};
use loom::thread;

struct Ring {
    entry: UnsafeCell<u64>,
    /// The entry's publication word (its `seq` in `ring.rs`).
    tail: AtomicU32,
    bell_word: AtomicU32,
    sleeping: AtomicU32,
}

#[test]
fn publication_and_doorbell_never_lose_an_entry_or_a_wakeup() {
    loom::model(|| {
        let r = Arc::new(Ring {
            entry: UnsafeCell::new(0),
            tail: AtomicU32::new(0),
            bell_word: AtomicU32::new(0),
            sleeping: AtomicU32::new(0),
        });
        let p = Arc::clone(&r);
        let producer = thread::spawn(move || {
            // push_many: write the entry, publish the tail, then Doorbell::notify.
            // SAFETY: only the producer writes the entry, before publishing the tail.
            p.entry.with_mut(|e| unsafe { *e = 42 });
            p.tail.store(1, Ordering::Release);
            fence(Ordering::SeqCst);
            if p.sleeping.load(Ordering::Relaxed) != 0 {
                p.bell_word.fetch_add(1, Ordering::Release);
                true
            } else {
                false
            }
        });
        // Consumer: Doorbell::wait_until's sleep path.
        let seq = r.bell_word.load(Ordering::Acquire);
        r.sleeping.store(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let ready = r.tail.load(Ordering::Acquire) == 1;
        let woke = producer.join().unwrap();
        if ready {
            // SAFETY: the acquire load of tail == 1 orders this read after the write.
            let v = r.entry.with(|e| unsafe { *e });
            assert_eq!(v, 42, "tail seen implies entry seen");
        } else {
            // We would FUTEX_WAIT(bell_word, seq): it returns only if the word moved.
            assert!(
                woke,
                "consumer sleeps with an entry pending and nobody wakes it"
            );
            assert_ne!(r.bell_word.load(Ordering::Acquire), seq);
        }
    });
}

/// One slot of the sequence-numbered ring: the payload and its `seq` word.
struct Slot {
    seq: AtomicU16,
    payload: UnsafeCell<u64>,
}

/// The ring as `ring.rs` runs it since entries carry their own `seq`: two slots, the
/// consumer's published head, and the consumer's doorbell.
struct SeqRing {
    slots: [Slot; 2],
    head: AtomicU32,
    bell_word: AtomicU32,
    sleeping: AtomicU32,
}

const CAP: u32 = 2;
const LOG2_CAP: u32 = 1;
/// Two entries before the u32 index wraps: the three pushed entries carry `seq` 0 (the
/// 16-bit lap counter wrapped), 0, then 1 (the index wrapped), and the slots start out
/// holding the previous lap's `seq` 0xffff, as a long-running ring's would.
const START: u32 = u32::MAX - 1;
const PUSHED: u32 = 3;

#[test]
fn entry_seq_ring_wraps_fills_and_always_wakes_its_sleeping_consumer() {
    use kvplane_shm::ring::entry_seq;
    assert_eq!(
        [0, 1, 2].map(|i| entry_seq(START.wrapping_add(i), LOG2_CAP)),
        [0, 0, 1]
    );
    let mut builder = loom::model::Builder::new();
    // Spin loops (a producer waiting for room, a futex wait) make the full state space
    // unbounded; three preemptions cover every interleaving of one push against one pop.
    builder.preemption_bound = Some(3);
    builder.check(|| {
        let stale = entry_seq(START.wrapping_sub(CAP), LOG2_CAP);
        let r = Arc::new(SeqRing {
            slots: [0, 1].map(|_| Slot {
                seq: AtomicU16::new(stale),
                payload: UnsafeCell::new(0),
            }),
            head: AtomicU32::new(START),
            bell_word: AtomicU32::new(0),
            sleeping: AtomicU32::new(0),
        });
        let p = Arc::clone(&r);
        let producer = thread::spawn(move || {
            let mut tail = START;
            let mut cached_head = START;
            let mut value = 100u64;
            // Producer::push_many of a batch of two (filling the ring), then of one (which
            // must wait for the consumer's head).
            for batch in [2u32, 1] {
                let mut left = batch;
                while left > 0 {
                    // Refresh head only when the cached view has too little room.
                    let mut room = CAP - tail.wrapping_sub(cached_head);
                    if room < left {
                        cached_head = p.head.load(Ordering::Acquire);
                        room = CAP - tail.wrapping_sub(cached_head);
                    }
                    let n = room.min(left);
                    if n == 0 {
                        thread::yield_now();
                        continue;
                    }
                    for k in 0..n {
                        let slot = &p.slots[(tail.wrapping_add(k) & (CAP - 1)) as usize];
                        // SAFETY: the slot is free (its previous entry was consumed: head
                        // moved past it, acquire), so only the producer touches it now.
                        slot.payload
                            .with_mut(|e| unsafe { *e = value + u64::from(k) });
                    }
                    // Published last entry first, as push_many does.
                    for k in (0..n).rev() {
                        let index = tail.wrapping_add(k);
                        p.slots[(index & (CAP - 1)) as usize]
                            .seq
                            .store(entry_seq(index, LOG2_CAP), Ordering::Release);
                    }
                    tail = tail.wrapping_add(n);
                    value += u64::from(n);
                    left -= n;
                    // Doorbell::notify.
                    fence(Ordering::SeqCst);
                    if p.sleeping.load(Ordering::Relaxed) != 0 {
                        p.bell_word.fetch_add(1, Ordering::Release);
                    }
                }
            }
        });
        // Consumer::pop_many one entry at a time, and Doorbell::wait_until's sleep path
        // whenever the next entry is not there (no spin: sleeping is what is checked).
        let mut head = START;
        for k in 0..PUSHED {
            let slot = &r.slots[(head & (CAP - 1)) as usize];
            let ready = || slot.seq.load(Ordering::Acquire) == entry_seq(head, LOG2_CAP);
            while !ready() {
                let seq = r.bell_word.load(Ordering::Acquire);
                r.sleeping.store(1, Ordering::SeqCst);
                fence(Ordering::SeqCst);
                if !ready() {
                    // FUTEX_WAIT(bell_word, seq) returns only once the word moved: a lost
                    // wakeup spins here forever, which loom reports as a failure.
                    while r.bell_word.load(Ordering::Acquire) == seq {
                        thread::yield_now();
                    }
                }
                r.sleeping.store(0, Ordering::Relaxed);
            }
            // SAFETY: the acquire load of the slot's seq orders this read after the
            // producer's write of the payload.
            let v = slot.payload.with(|e| unsafe { *e });
            assert_eq!(
                v,
                100 + u64::from(k),
                "seq seen implies its entry seen, in order"
            );
            head = head.wrapping_add(1);
            r.head.store(head, Ordering::Release);
        }
        producer.join().unwrap();
        assert!(
            r.slots
                .iter()
                .all(|s| s.seq.load(Ordering::Relaxed) != stale),
            "every slot was rewritten for the new laps"
        );
    });
}
