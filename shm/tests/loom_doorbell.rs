//! Model check (loom) of the ring's publication and doorbell protocol, written with the
//! same orderings as `ring.rs`: entry write, tail store (Release), SeqCst fence, then the
//! sleeping flag; the waiter stores the flag (SeqCst), fences, re-checks the tail.
//! Properties over every interleaving loom explores:
//! - a consumer that sees the tail sees the entry (release/acquire publication);
//! - no lost wakeup: a consumer that decides to sleep is always woken (the producer
//!   sees its flag), so it never sleeps forever with an entry published.
//!
//! Run: RUSTFLAGS="--cfg loom" cargo test -p kvplane-shm --test loom_doorbell --release
#![cfg(loom)]

use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::sync::atomic::{AtomicU32, Ordering, fence};
use loom::thread;

struct Ring {
    entry: UnsafeCell<u64>,
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
