//! SPSC rings and futex doorbells in a shared segment.
//!
//! Each side keeps its own index privately. An entry is published by its own `seq` field
//! (the lap of its index, [`entry_seq`]), which the consumer polls: one cache line
//! travels per entry, not an index line and then the entry line. The consumer publishes
//! `head` after each batch it takes; the producer re-reads it only when its cached copy
//! says the ring is full, and validates it (`tail - head <= capacity` in wrapping
//! arithmetic), so a hostile peer can make its own ring look corrupt, never make us read
//! outside it. `tail` is still published after each batch, but only attach reads it.
//!
//! A hostile producer (the engine, on a submission ring) controls every `seq`. An entry
//! whose `seq` is not the value for the consumer's `head` is treated as not yet written:
//! the consumer reads nothing at or after it, so a stale or forged `seq` only stalls that
//! queue pair's own submissions. A forged `seq` equal to the expected value is simply a
//! submission (validated like any other). The consumer reads at most the `out.len()`
//! entries it was asked for, each once, so no value of `seq` makes it loop or read
//! outside the ring.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering, fence};
use std::time::{Duration, Instant};

use kvplane_ffi::{self as ffi, Pod, kvp_cqe, kvp_sqe};

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

/// An ABI struct that travels in a ring: plain data with a `uint16_t seq` the ring
/// protocol owns (whatever the caller puts there is overwritten on push).
pub trait RingEntry: Pod {
    /// Byte offset of `seq` in the entry.
    const SEQ_OFFSET: usize;
    /// Checked at compile time wherever the ring uses `T` (the unsafe entry accesses rely
    /// on it): `seq` is an aligned u16 inside the entry, and the entry is whole 8-byte
    /// words, 8-aligned.
    const LAYOUT_OK: () = assert!(
        Self::SEQ_OFFSET % 2 == 0
            && Self::SEQ_OFFSET + 2 <= std::mem::size_of::<Self>()
            && std::mem::size_of::<Self>() % 8 == 0
            && std::mem::align_of::<Self>() >= 8,
        "a ring entry needs an aligned u16 seq inside it and a size and alignment of 8"
    );
}

impl RingEntry for kvp_sqe {
    const SEQ_OFFSET: usize = core::mem::offset_of!(kvp_sqe, seq);
}

impl RingEntry for kvp_cqe {
    const SEQ_OFFSET: usize = core::mem::offset_of!(kvp_cqe, seq);
}

/// The `seq` of the entry at free-running index `index` in a ring of `1 << log2_entries`
/// entries: its lap counted from 1, mod 2^16 (`kvplane.h`). Consecutive laps differ by one
/// even across the u32 index wrap (2^32 / entries laps is a multiple of 2^16, since
/// entries <= 2^16), so the entry a slot held one lap earlier never matches, and a zeroed
/// ring reads as empty.
#[inline]
pub fn entry_seq(index: u32, log2_entries: u32) -> u16 {
    ((index >> log2_entries) as u16).wrapping_add(1)
}

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
        // Reading the clock is ~20 ns: the spin's end is fixed at the first check, 64
        // spins in, and checked every 64 spins after, so a short wait reads it never.
        let mut spin_until = None;
        let mut spins = 0u32;
        loop {
            std::hint::spin_loop();
            if ready() {
                return Ok(true);
            }
            spins = spins.wrapping_add(1);
            if spins % 64 == 0 {
                let now = Instant::now();
                if now >= *spin_until.get_or_insert(now + policy.spin) {
                    break;
                }
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
    /// log2(capacity), for [`entry_seq`].
    shift: u32,
    qp: u32,
    kind: RingKind,
    _t: PhantomData<T>,
}

impl<'a, T: RingEntry> RingView<'a, T> {
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
            shift: capacity.trailing_zeros(),
            qp,
            kind,
            _t: PhantomData,
        })
    }

    /// The `seq` word of the entry at `index`'s slot.
    #[inline]
    fn seq_of(&self, index: u32) -> &AtomicU16 {
        let () = T::LAYOUT_OK;
        let slot = (index & self.mask) as usize;
        // SAFETY: slot < capacity within the entries array bounds-checked at construction
        // (8-aligned); SEQ_OFFSET is even and the u16 lies inside the entry (LAYOUT_OK), so
        // it is aligned and in bounds; the mapping outlives 'a. Both sides access this
        // word only atomically.
        unsafe {
            AtomicU16::from_ptr(
                self.entries
                    .add(slot)
                    .cast::<u8>()
                    .add(T::SEQ_OFFSET)
                    .cast::<u16>(),
            )
        }
    }

    /// Whether the entry at `index` is published (its `seq` is that index's), acquiring
    /// its contents if so.
    #[inline]
    fn published(&self, index: u32) -> bool {
        self.seq_of(index).load(Ordering::Acquire) == entry_seq(index, self.shift)
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

/// Copy an entry out of shared memory in 8-byte volatile loads (a field-by-field volatile
/// read would copy a byte array byte by byte).
///
/// # Safety
/// `src` points to a readable, 8-aligned `T` (ring entries are both, by `RingView::new`).
#[inline]
unsafe fn read_entry<T: RingEntry>(src: *const T) -> T {
    let () = T::LAYOUT_OK;
    let mut out = T::zeroed();
    let words = std::mem::size_of::<T>() / 8;
    let dst = (&mut out as *mut T).cast::<u64>();
    for k in 0..words {
        // SAFETY: k < size_of::<T>() / 8 words inside both `*src` (caller's guarantee) and
        // `out`, both 8-aligned. T is Pod: any bytes are a valid T, so a hostile producer
        // rewriting the entry meanwhile only garbles its own request, which is validated
        // after this copy.
        unsafe {
            dst.add(k)
                .write(std::ptr::read_volatile(src.cast::<u64>().add(k)))
        };
    }
    out
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

impl<'a, T: RingEntry> Producer<'a, T> {
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

    /// Write every byte of `item` but its `seq` into the slot of index `index`.
    #[inline]
    fn write_payload(&self, index: u32, item: &T) {
        let () = T::LAYOUT_OK;
        let slot = (index & self.view.mask) as usize;
        let seq_end = T::SEQ_OFFSET + 2;
        let src = (item as *const T).cast::<u8>();
        // SAFETY: slot < capacity within the bounds-checked entries array; the slot is
        // free (its previous entry was consumed: index - head < capacity), so an honest
        // consumer is not reading these bytes; the two copies, [0, SEQ_OFFSET) and
        // [SEQ_OFFSET + 2, size), lie inside both entries (LAYOUT_OK) and skip the `seq`
        // word, which is written only atomically, after them (release: a consumer that
        // sees the new seq sees these bytes).
        unsafe {
            let dst = self.view.entries.add(slot).cast::<u8>();
            std::ptr::copy_nonoverlapping(src, dst, T::SEQ_OFFSET);
            std::ptr::copy_nonoverlapping(
                src.add(seq_end),
                dst.add(seq_end),
                std::mem::size_of::<T>() - seq_end,
            );
        }
    }

    /// Write as many of `items` as fit, publish them, ring the doorbell at most once.
    /// Returns how many were written.
    ///
    /// A batch is published last entry first: the consumer polls the first one, so it
    /// sees the whole batch at once and takes it in one go, instead of chasing this loop
    /// entry by entry over cache lines still being written (which costs both sides a line
    /// transfer per entry, and the consumer a pass per entry).
    pub fn push_many(&mut self, items: &[T], bell: Option<&Doorbell<'_>>) -> Result<usize> {
        let mut room = self.view.capacity - self.tail.wrapping_sub(self.cached_head);
        if room < items.len() as u32 {
            room = self.free()?;
        }
        let n = (room as usize).min(items.len());
        if n == 0 {
            return Ok(0);
        }
        for (k, item) in items[..n].iter().enumerate() {
            self.write_payload(self.tail.wrapping_add(k as u32), item);
        }
        for k in (0..n as u32).rev() {
            let index = self.tail.wrapping_add(k);
            self.view
                .seq_of(index)
                .store(entry_seq(index, self.view.shift), Ordering::Release);
        }
        self.tail = self.tail.wrapping_add(n as u32);
        // For attach and tools only: the consumer polls the entries, not this line, so the
        // store stays in this core's cache.
        self.view.tail.store(self.tail, Ordering::Release);
        match bell {
            Some(b) => b.notify(),
            None => self.own_doorbell().notify(),
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
}

// SAFETY: the consumer is the only writer of its head; see Producer.
unsafe impl<T: Send> Send for Consumer<'_, T> {}

impl<'a, T: RingEntry> Consumer<'a, T> {
    /// Attach as consumer: `head` starts from what is published, checked against the
    /// published `tail` (a fresh segment is zeroed).
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
        Ok(Consumer { view, head })
    }

    /// Entries ready to read now: the published run from `head`, at most a ring's worth.
    /// (A scan of the entries' `seq`s, for tests and tools; `pop_many` does not need it.)
    pub fn available(&self) -> u32 {
        let mut ready = 0;
        while ready < self.view.capacity && self.view.published(self.head.wrapping_add(ready)) {
            ready += 1;
        }
        ready
    }

    /// Cheap readiness probe for wait loops: one acquire load of the next entry's `seq`.
    #[inline]
    pub fn has_entries(&self) -> bool {
        self.view.published(self.head)
    }

    /// Copy up to `out.len()` published entries out (stopping at the first that is not),
    /// then release them to the producer with one `head` store.
    pub fn pop_many(&mut self, out: &mut [T]) -> usize {
        let mut n = 0;
        while n < out.len() && self.view.published(self.head) {
            let slot = (self.head & self.view.mask) as usize;
            // SAFETY: slot < capacity within the bounds-checked entries array; the entry
            // was published (its seq acquire-loaded above).
            out[n] = unsafe { read_entry(self.view.entries.add(slot)) };
            self.head = self.head.wrapping_add(1);
            n += 1;
        }
        if n > 0 {
            self.view.head.store(self.head, Ordering::Release);
        }
        n
    }

    pub fn pop(&mut self) -> Option<T> {
        let mut one = [T::zeroed()];
        (self.pop_many(&mut one) == 1).then_some(one[0])
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

    fn cqe(v: u64) -> kvp_cqe {
        let mut c = kvp_cqe::zeroed();
        c.user_data = v;
        c.bytes = !v;
        c
    }

    /// Push `items` and check each comes back intact, in order.
    fn round_trip(
        p: &mut Producer<'_, kvp_cqe>,
        c: &mut Consumer<'_, kvp_cqe>,
        items: std::ops::Range<u64>,
    ) {
        let want: Vec<kvp_cqe> = items.clone().map(cqe).collect();
        assert_eq!(p.push_many(&want, None).unwrap(), want.len());
        let mut out = vec![kvp_cqe::zeroed(); want.len() + 1];
        assert_eq!(c.pop_many(&mut out), want.len());
        for (v, o) in items.zip(&out) {
            assert_eq!((o.user_data, o.bytes), (v, !v));
        }
    }

    #[test]
    fn wraps_around_full_and_empty() {
        let (s, g) = seg(8);
        let q = g.queue_pairs[0];
        let mut p = Producer::<kvp_cqe>::new(&s, q.cq_offset, 8, 0, RingKind::Completion).unwrap();
        let mut c = Consumer::<kvp_cqe>::new(&s, q.cq_offset, 8, 0, RingKind::Completion).unwrap();
        let mut next = 0u64;
        let mut expect = 0u64;
        let mut buf = [kvp_cqe::zeroed(); 5];
        for round in 0..1000 {
            let want: Vec<kvp_cqe> = (next..next + (round % 11) as u64).map(cqe).collect();
            let n = p.push_many(&want, None).unwrap();
            assert!(n <= 8);
            next += n as u64;
            assert!(next - expect <= 8, "never more than capacity in flight");
            assert_eq!(c.available() as u64, next - expect);
            let got = c.pop_many(&mut buf);
            for v in &buf[..got] {
                assert_eq!(v.user_data, expect);
                expect += 1;
            }
        }
        while let Some(v) = c.pop() {
            assert_eq!(v.user_data, expect);
            expect += 1;
        }
        assert_eq!(expect, next);
        assert!(next > 8 * 100, "wrapped many times");
    }

    #[test]
    fn sequence_survives_the_u16_lap_wrap_and_the_u32_index_wrap() {
        // Start a few laps before the 16-bit lap counter wraps, and a few laps before the
        // 32-bit index wraps (a lap-counter wrap too), with the slots holding the previous
        // lap's entries as a running ring's would.
        for (cap, start) in [
            (8u32, (0xfffeu32 << 3).wrapping_sub(3)),
            (8, 0u32.wrapping_sub(8 * 3 + 5)),
            (65536, 0u32.wrapping_sub(65536 * 2 + 7)),
        ] {
            let (s, g) = seg(cap);
            let q = g.queue_pairs[0];
            let before = start.wrapping_sub(cap);
            for index in [TAIL, HEAD] {
                s.atomic_u32(q.cq_offset + index)
                    .unwrap()
                    .store(before, Ordering::Relaxed);
            }
            let mut p = Producer::new(&s, q.cq_offset, cap, 0, RingKind::Completion).unwrap();
            let mut c = Consumer::new(&s, q.cq_offset, cap, 0, RingKind::Completion).unwrap();
            assert_eq!(c.available(), 0, "a zeroed ring is empty at any index");
            round_trip(&mut p, &mut c, 0..u64::from(cap));
            let half = cap / 2;
            let (mut index, mut value) = (start, u64::from(cap));
            let mut crossed = false;
            for _ in 0..10 {
                crossed |= entry_seq(index, cap.trailing_zeros()) == 0;
                assert_eq!(c.available(), 0, "cap {cap}: a lap-old entry reads as new");
                round_trip(&mut p, &mut c, value..value + u64::from(half));
                index = index.wrapping_add(half);
                value += u64::from(half);
            }
            assert!(crossed, "cap {cap}: the run crossed the lap-counter wrap");
        }
    }

    #[test]
    fn a_stale_or_forged_seq_reads_as_not_written() {
        let (s, g) = seg(8);
        let q = g.queue_pairs[0];
        let mut c = Consumer::<kvp_sqe>::new(&s, q.sq_offset, 8, 0, RingKind::Submission).unwrap();
        // A hostile engine writes the seq words directly.
        let forge = |slot: u64, seq: u16| {
            let at = q.sq_offset
                + ffi::RING_HEADER_BYTES as u64
                + slot * std::mem::size_of::<kvp_sqe>() as u64
                + kvp_sqe::SEQ_OFFSET as u64;
            s.write_bytes(at, &seq.to_le_bytes()).unwrap();
        };
        // Slots claiming the previous lap or a later one: nothing is taken.
        for (slot, seq) in [0u16, 2, 3, 0xffff, 7, 100, 2, 9].into_iter().enumerate() {
            forge(slot as u64, seq);
        }
        // A tail far ahead is not looked at after attach (the consumer polls entries).
        s.atomic_u32(q.sq_offset + TAIL)
            .unwrap()
            .store(1000, Ordering::Release);
        let mut out = [kvp_sqe::zeroed(); 16];
        assert!(!c.has_entries());
        assert_eq!(c.pop_many(&mut out), 0);
        // Slots 0 and 1 published for lap 1, slot 2 not: exactly two are taken.
        forge(0, 1);
        forge(1, 1);
        assert_eq!(c.available(), 2);
        assert_eq!(c.pop_many(&mut out), 2);
        // Every slot forged as published (slots 0-1 for lap 2): a scan stops after one
        // ring's worth, and a pop takes only what it is asked for.
        for slot in 0..8u64 {
            forge(slot, if slot < 2 { 2 } else { 1 });
        }
        assert_eq!(c.available(), 8);
        assert_eq!(c.pop_many(&mut out[..3]), 3);
        assert_eq!(
            s.atomic_u32(q.sq_offset + HEAD)
                .unwrap()
                .load(Ordering::Acquire),
            5
        );
    }

    #[test]
    fn corrupt_indices_are_errors_not_reads() {
        let (s, g) = seg(8);
        let q = g.queue_pairs[0];
        // A hostile producer publishes a tail far beyond capacity before we attach.
        s.atomic_u32(q.sq_offset + TAIL)
            .unwrap()
            .store(1000, Ordering::Release);
        assert!(matches!(
            Consumer::<kvp_sqe>::new(&s, q.sq_offset, 8, 0, RingKind::Submission),
            Err(ShmError::RingCorrupt { .. })
        ));
        let mut p = Producer::<kvp_cqe>::new(&s, q.cq_offset, 8, 0, RingKind::Completion).unwrap();
        // A hostile consumer publishes a head ahead of our tail.
        s.atomic_u32(q.cq_offset + HEAD)
            .unwrap()
            .store(100, Ordering::Release);
        assert_eq!(
            p.push_many(&[cqe(1); 8], None).unwrap(),
            8,
            "room from our own view"
        );
        assert!(matches!(
            p.push(cqe(1), None),
            Err(ShmError::RingCorrupt { .. })
        ));
    }
}
