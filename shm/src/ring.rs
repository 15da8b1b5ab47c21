//! SPSC rings and futex doorbells in a shared segment.
//!
//! Each side keeps its own index privately and only *publishes* it; it reads the peer's
//! index and validates it (`tail - head <= capacity` in wrapping arithmetic) before use,
//! so a hostile peer can make its own ring look corrupt, never make us read outside it.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU32, Ordering, fence};
use std::time::{Duration, Instant};

use kvplane_ffi::{self as ffi, Pod};

use crate::error::{Result, ShmError};
use crate::segment::Segment;
use crate::sys;

/// Offsets inside a `kvp_ring_header`, from the header's definition.
pub mod ring_offsets {
    use core::mem::offset_of;
    use kvplane_ffi::{kvp_index_line, kvp_ring_header};
    pub const TAIL: u64 =
        (offset_of!(kvp_ring_header, tail) + offset_of!(kvp_index_line, value)) as u64;
    pub const HEAD: u64 =
        (offset_of!(kvp_ring_header, head) + offset_of!(kvp_index_line, value)) as u64;
    pub const BELL_WORD: u64 =
        (offset_of!(kvp_ring_header, doorbell) + offset_of!(kvp_index_line, value)) as u64;
    pub const BELL_SLEEPING: u64 =
        (offset_of!(kvp_ring_header, doorbell) + offset_of!(kvp_index_line, aux)) as u64;
    pub const ENTRIES: u64 = offset_of!(kvp_ring_header, entries) as u64;
    pub const ENTRY_BYTES: u64 = offset_of!(kvp_ring_header, entry_bytes) as u64;
}
use ring_offsets::{BELL_SLEEPING, BELL_WORD, HEAD, TAIL};

/// Wake whoever sleeps on the doorbell of the ring at `ring_offset` (used when a session
/// ends, so a waiter re-checks the session state instead of sleeping out its slice).
pub fn wake_ring_waiters(seg: &Segment, ring_offset: u64) -> Result<()> {
    let word = seg.atomic_u32(ring_offset + BELL_WORD)?;
    word.fetch_add(1, Ordering::Release);
    sys::futex_wake_all(word);
    Ok(())
}

/// A futex doorbell: a word bumped by the notifier and a flag the waiter sets before
/// sleeping, so a busy pair never makes a system call.
#[derive(Clone, Copy, Debug)]
pub struct Doorbell<'a> {
    word: &'a AtomicU32,
    sleeping: &'a AtomicU32,
}

/// How long to spin before sleeping, and how long one sleep may last (sleepers re-check
/// liveness at that period).
#[derive(Clone, Copy, Debug)]
pub struct WaitPolicy {
    pub spin: Duration,
    pub sleep_slice: Duration,
}

impl Default for WaitPolicy {
    fn default() -> Self {
        // 50 us of spinning covers a round trip through the daemon (a few us) with a
        // wide margin; a wake-up from futex costs ~30-60 us on a VM, so sleeping sooner
        // would double the latency of every lightly loaded call.
        WaitPolicy {
            spin: Duration::from_micros(50),
            sleep_slice: Duration::from_millis(100),
        }
    }
}

impl<'a> Doorbell<'a> {
    pub fn new(word: &'a AtomicU32, sleeping: &'a AtomicU32) -> Self {
        Doorbell { word, sleeping }
    }

    /// The futex word notifiers bump (a waiter that sleeps on several doorbells at once
    /// reads it, sets [`Doorbell::sleeping_flag`], re-checks, then waits on all words).
    pub fn word(&self) -> &'a AtomicU32 {
        self.word
    }

    /// The flag a waiter sets before sleeping; notifiers wake only when it is set.
    pub fn sleeping_flag(&self) -> &'a AtomicU32 {
        self.sleeping
    }

    /// Notifier side, after publishing: wake the waiter only if it said it sleeps.
    #[inline]
    pub fn notify(&self) {
        // Pairs with the fence in `wait_until`: either the waiter sees our published
        // index, or we see its sleeping flag (Dekker).
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) != 0 {
            self.word.fetch_add(1, Ordering::Release);
            sys::futex_wake_all(self.word);
        }
    }

    /// Waiter side: spin for `policy.spin`, then sleep on the futex in slices of
    /// `policy.sleep_slice` until `ready()` or `deadline`. `between_sleeps` runs after
    /// every slice (liveness checks); returning `Err` from it aborts the wait.
    pub fn wait_until<E>(
        &self,
        policy: WaitPolicy,
        deadline: Option<Instant>,
        mut ready: impl FnMut() -> bool,
        mut between_sleeps: impl FnMut() -> std::result::Result<(), E>,
    ) -> std::result::Result<bool, E> {
        if ready() {
            return Ok(true);
        }
        let spin_until = Instant::now() + policy.spin;
        let mut spins = 0u32;
        loop {
            std::hint::spin_loop();
            if ready() {
                return Ok(true);
            }
            spins = spins.wrapping_add(1);
            // Reading the clock is ~20 ns; check it every 64 spins.
            if spins % 64 == 0 && Instant::now() >= spin_until {
                break;
            }
        }
        loop {
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Ok(false);
            }
            let seq = self.word.load(Ordering::Acquire);
            self.sleeping.store(1, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if ready() {
                self.sleeping.store(0, Ordering::Relaxed);
                return Ok(true);
            }
            let slice = deadline.map_or(policy.sleep_slice, |d| (d - now).min(policy.sleep_slice));
            sys::futex_wait(self.word, seq, Some(slice));
            self.sleeping.store(0, Ordering::Relaxed);
            if ready() {
                return Ok(true);
            }
            between_sleeps()?;
        }
    }
}

/// Which ring of a queue pair, for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingKind {
    Submission,
    Completion,
}

impl RingKind {
    fn name(self) -> &'static str {
        match self {
            RingKind::Submission => "submission",
            RingKind::Completion => "completion",
        }
    }
}

/// One ring's location, validated against the mapping once.
struct RingView<'a, T> {
    tail: &'a AtomicU32,
    head: &'a AtomicU32,
    bell_word: &'a AtomicU32,
    bell_sleeping: &'a AtomicU32,
    entries: *mut T,
    capacity: u32,
    mask: u32,
    qp: u32,
    kind: RingKind,
    _t: PhantomData<T>,
}

impl<'a, T: Pod> RingView<'a, T> {
    fn new(seg: &'a Segment, offset: u64, capacity: u32, qp: u32, kind: RingKind) -> Result<Self> {
        assert!(capacity.is_power_of_two());
        let entry_bytes = std::mem::size_of::<T>() as u64;
        let entries = seg
            .ptr_checked(
                offset + ffi::RING_HEADER_BYTES as u64,
                capacity as u64 * entry_bytes,
                8,
            )?
            .cast::<T>();
        Ok(RingView {
            tail: seg.atomic_u32(offset + TAIL)?,
            head: seg.atomic_u32(offset + HEAD)?,
            bell_word: seg.atomic_u32(offset + BELL_WORD)?,
            bell_sleeping: seg.atomic_u32(offset + BELL_SLEEPING)?,
            entries,
            capacity,
            mask: capacity - 1,
            qp,
            kind,
            _t: PhantomData,
        })
    }

    fn corrupt(&self, head: u32, tail: u32) -> ShmError {
        ShmError::RingCorrupt {
            ring: self.kind.name(),
            qp: self.qp,
            head,
            tail,
            capacity: self.capacity,
        }
    }
}

/// Producer end of an SPSC ring.
pub struct Producer<'a, T> {
    view: RingView<'a, T>,
    tail: u32,
    cached_head: u32,
}

// SAFETY: the producer is the only writer of its tail and its free slots; moving it to
// another thread moves that role with it. The raw entry pointer targets the segment,
// which outlives 'a.
unsafe impl<T: Send> Send for Producer<'_, T> {}

impl<'a, T: Pod> Producer<'a, T> {
    /// Attach as producer. `tail` and `head` start from what is published (a fresh
    /// segment is zeroed).
    pub fn new(
        seg: &'a Segment,
        offset: u64,
        capacity: u32,
        qp: u32,
        kind: RingKind,
    ) -> Result<Self> {
        let view = RingView::new(seg, offset, capacity, qp, kind)?;
        let tail = view.tail.load(Ordering::Relaxed);
        let head = view.head.load(Ordering::Acquire);
        if tail.wrapping_sub(head) > capacity {
            return Err(view.corrupt(head, tail));
        }
        Ok(Producer {
            view,
            tail,
            cached_head: head,
        })
    }

    pub fn capacity(&self) -> u32 {
        self.view.capacity
    }

    /// Free slots, refreshing the consumer's head. Err if the consumer published garbage.
    pub fn free(&mut self) -> Result<u32> {
        let head = self.view.head.load(Ordering::Acquire);
        let used = self.tail.wrapping_sub(head);
        if used > self.view.capacity {
            return Err(self.view.corrupt(head, self.tail));
        }
        self.cached_head = head;
        Ok(self.view.capacity - used)
    }

    /// Free slots as last seen, refreshing the consumer's head only when that shows the
    /// ring full: a busy producer reads the consumer's cache line once per wrap, not per
    /// entry.
    pub fn free_cached(&mut self) -> Result<u32> {
        let room = self.view.capacity - self.tail.wrapping_sub(self.cached_head);
        if room > 0 {
            return Ok(room);
        }
        self.free()
    }

    /// Write as many of `items` as fit, publish once, ring the doorbell at most once.
    /// Returns how many were written.
    pub fn push_many(&mut self, items: &[T], bell: Option<&Doorbell<'_>>) -> Result<usize> {
        let mut room = self.view.capacity - self.tail.wrapping_sub(self.cached_head);
        if room < items.len() as u32 {
            room = self.free()?;
        }
        let n = (room as usize).min(items.len());
        for item in &items[..n] {
            let slot = (self.tail & self.view.mask) as usize;
            // SAFETY: slot < capacity, and the entries array of `capacity` Ts was bounds-
            // checked against the mapping at construction; the slot is free (between tail
            // and head + capacity) so the consumer is not reading it.
            unsafe { std::ptr::write_volatile(self.view.entries.add(slot), *item) };
            self.tail = self.tail.wrapping_add(1);
        }
        if n > 0 {
            self.view.tail.store(self.tail, Ordering::Release);
            match bell {
                Some(b) => b.notify(),
                None => self.own_doorbell().notify(),
            }
        }
        Ok(n)
    }

    /// Push one entry. `Ok(false)` when the ring is full.
    pub fn push(&mut self, item: T, bell: Option<&Doorbell<'_>>) -> Result<bool> {
        Ok(self.push_many(std::slice::from_ref(&item), bell)? == 1)
    }

    /// The doorbell in this ring's own header (its consumer sleeps on it).
    pub fn own_doorbell(&self) -> Doorbell<'a> {
        Doorbell::new(self.view.bell_word, self.view.bell_sleeping)
    }
}

/// Consumer end of an SPSC ring.
pub struct Consumer<'a, T> {
    view: RingView<'a, T>,
    head: u32,
    cached_tail: u32,
}

// SAFETY: the consumer is the only writer of its head; see Producer.
unsafe impl<T: Send> Send for Consumer<'_, T> {}

impl<'a, T: Pod> Consumer<'a, T> {
    pub fn new(
        seg: &'a Segment,
        offset: u64,
        capacity: u32,
        qp: u32,
        kind: RingKind,
    ) -> Result<Self> {
        let view = RingView::new(seg, offset, capacity, qp, kind)?;
        let head = view.head.load(Ordering::Relaxed);
        let tail = view.tail.load(Ordering::Acquire);
        if tail.wrapping_sub(head) > capacity {
            return Err(view.corrupt(head, tail));
        }
        Ok(Consumer {
            view,
            head,
            cached_tail: head,
        })
    }

    /// Entries ready to read, refreshing the producer's tail. Err if it is garbage.
    pub fn available(&mut self) -> Result<u32> {
        let tail = self.view.tail.load(Ordering::Acquire);
        let ready = tail.wrapping_sub(self.head);
        if ready > self.view.capacity {
            return Err(self.view.corrupt(self.head, tail));
        }
        self.cached_tail = tail;
        Ok(ready)
    }

    /// Cheap readiness probe for wait loops (one acquire load, no validation).
    pub fn has_entries(&self) -> bool {
        if self.view.tail.load(Ordering::Acquire) != self.head {
            return true;
        }
        // While waiting, also touch the slot the next entry will land in: its cache line
        // then travels to this core alongside the tail's, instead of one miss after the
        // other once the tail moves (a round trip is otherwise two serial misses per side).
        let slot = (self.head & self.view.mask) as usize;
        // SAFETY: slot < capacity within the bounds-checked entries array; a one-byte
        // volatile read of memory the producer may be writing is a plain load of shared
        // memory whose value we discard.
        unsafe { std::ptr::read_volatile(self.view.entries.add(slot).cast::<u8>()) };
        false
    }

    /// Copy up to `out.len()` entries out, release them to the producer once.
    pub fn pop_many(&mut self, out: &mut [T]) -> Result<usize> {
        let mut ready = self.cached_tail.wrapping_sub(self.head);
        if ready == 0 {
            ready = self.available()?;
        }
        let n = (ready as usize).min(out.len());
        for o in &mut out[..n] {
            let slot = (self.head & self.view.mask) as usize;
            // SAFETY: slot < capacity within the bounds-checked entries array; the entry
            // was published (head < tail, acquire-loaded). T is Pod: any bytes are valid.
            *o = unsafe { std::ptr::read_volatile(self.view.entries.add(slot)) };
            self.head = self.head.wrapping_add(1);
        }
        if n > 0 {
            self.view.head.store(self.head, Ordering::Release);
        }
        Ok(n)
    }

    pub fn pop(&mut self) -> Result<Option<T>> {
        let mut one = [T::zeroed()];
        Ok((self.pop_many(&mut one)? == 1).then_some(one[0]))
    }

    /// The doorbell in this ring's own header (the consumer sleeps on it).
    pub fn own_doorbell(&self) -> Doorbell<'a> {
        Doorbell::new(self.view.bell_word, self.view.bell_sleeping)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::Geometry;

    fn seg(cap: u32) -> (Segment, Geometry) {
        let g = Geometry::new(1, cap, cap, 4096).unwrap();
        (Segment::create(&g, 1, 1, 0).unwrap(), g)
    }

    #[test]
    fn wraps_around_full_and_empty() {
        let (s, g) = seg(8);
        let q = g.queue_pairs[0];
        let mut p = Producer::<u64>::new(&s, q.sq_offset, 8, 0, RingKind::Submission).unwrap();
        let mut c = Consumer::<u64>::new(&s, q.sq_offset, 8, 0, RingKind::Submission).unwrap();
        let mut next = 0u64;
        let mut expect = 0u64;
        let mut buf = [0u64; 5];
        for round in 0..1000 {
            let want: Vec<u64> = (next..next + (round % 11) as u64).collect();
            let n = p.push_many(&want, None).unwrap();
            assert!(n <= 8);
            next += n as u64;
            assert!(next - expect <= 8, "never more than capacity in flight");
            let got = c.pop_many(&mut buf).unwrap();
            for v in &buf[..got] {
                assert_eq!(*v, expect);
                expect += 1;
            }
        }
        while let Some(v) = c.pop().unwrap() {
            assert_eq!(v, expect);
            expect += 1;
        }
        assert_eq!(expect, next);
        assert!(next > 8 * 100, "wrapped many times");
    }

    #[test]
    fn corrupt_indices_are_errors_not_reads() {
        let (s, g) = seg(8);
        let q = g.queue_pairs[0];
        let mut c = Consumer::<u64>::new(&s, q.sq_offset, 8, 0, RingKind::Submission).unwrap();
        // A hostile producer publishes a tail far beyond capacity.
        s.atomic_u32(q.sq_offset)
            .unwrap()
            .store(1000, Ordering::Release);
        assert!(matches!(c.pop(), Err(ShmError::RingCorrupt { .. })));
        let mut p = Producer::<u64>::new(&s, q.cq_offset, 8, 0, RingKind::Completion).unwrap();
        // A hostile consumer publishes a head ahead of our tail.
        s.atomic_u32(q.cq_offset + 64)
            .unwrap()
            .store(100, Ordering::Release);
        assert_eq!(
            p.push_many(&[1; 8], None).unwrap(),
            8,
            "room from our own view"
        );
        assert!(matches!(p.push(1, None), Err(ShmError::RingCorrupt { .. })));
    }
}
