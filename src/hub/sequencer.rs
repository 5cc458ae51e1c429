//! Ids, and the horizon below which every publish has been queued.
//!
//! A single node takes no global lock to publish: each channel has its own
//! mutex, held while the event gets its id and is pushed into its
//! subscribers' outboxes. Two publishes on two channels run side by side,
//! so a connection subscribed to both can be handed id 101 (channel b)
//! before id 100 (channel a) reaches its queue. One id resumes every
//! channel of a stream (`Last-Event-ID` is the last id the client saw), so
//! a client that left between the two would lose 100 for good.
//!
//! The sequencer lets a writer of several channels wait for that without a
//! lock: a publish reserves a slot (an atomic holding a lower bound of the
//! id it is about to take) before it takes its id and releases it once its
//! fan-out is done. [`Sequencer::horizon`] is then the largest id such that
//! every publish at or below it has been queued everywhere: the newest id
//! issued, or one below the smallest reservation still held. Writers of
//! several channels send nothing above it (see `Outbox`), so every
//! connection receives ids in order. A publish costs two uncontended
//! atomic operations on its thread's own cache line.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::id::{EventId, IdGen};

/// Slots for publishes in flight at once. Publishes run on the runtime's
/// worker threads and never await while holding one, so the slots in use
/// are at most the threads publishing at this instant; a publish finding
/// them all taken waits for one (spinning) rather than risk disorder.
const SLOTS: usize = 32;

/// One slot on a cache line of its own (publishers on different threads
/// must not share one).
#[derive(Debug, Default)]
#[repr(align(64))]
struct Slot(AtomicU64);

/// Issues ids and knows which are fully queued.
#[derive(Debug)]
pub struct Sequencer {
    ids: IdGen,
    slots: Box<[Slot]>,
}

/// A reservation: the publish holding it has not finished its fan-out.
/// Dropping it releases the slot.
#[derive(Debug)]
pub struct InFlight<'a> {
    slot: &'a Slot,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.slot.0.store(0, Ordering::SeqCst);
    }
}

thread_local! {
    /// The slot this thread tries first (spread round robin).
    static PREFERRED: Cell<usize> = const { Cell::new(usize::MAX) };
}

fn preferred() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    PREFERRED.with(|p| {
        if p.get() == usize::MAX {
            p.set(NEXT.fetch_add(1, Ordering::Relaxed) % SLOTS);
        }
        p.get()
    })
}

impl Sequencer {
    /// A sequencer issuing ids from `ids`.
    pub fn new(ids: IdGen) -> Self {
        Self {
            ids,
            slots: (0..SLOTS).map(|_| Slot::default()).collect(),
        }
    }

    /// The id generator.
    pub fn ids(&self) -> &IdGen {
        &self.ids
    }

    /// Reserves a slot before an id is taken: hold the guard until the
    /// event has been queued for every subscriber.
    pub fn enter(&self) -> InFlight<'_> {
        // Every id issued from now on is above `last`, so `last + 1` is a
        // lower bound of the id this publish will take. It is never 0.
        let floor = self.ids.last().as_u64().saturating_add(1).max(1);
        let start = preferred();
        loop {
            for k in 0..SLOTS {
                let slot = &self.slots[(start + k) % SLOTS];
                if slot
                    .0
                    .compare_exchange(0, floor, Ordering::SeqCst, Ordering::Relaxed)
                    .is_ok()
                {
                    return InFlight { slot };
                }
            }
            std::hint::spin_loop();
        }
    }

    /// The largest id at or below which every publish has been queued.
    ///
    /// Why it holds: a publish stores its reservation before it takes its
    /// id (both `SeqCst`). If its id is at or below the `last` read here,
    /// the id was taken before that read, so the reservation was stored
    /// before the slots are scanned, and the scan sees it unless the
    /// publish has already released it (is done).
    pub fn horizon(&self) -> u64 {
        let last = self.ids.last().as_u64();
        self.slots
            .iter()
            .map(|s| s.0.load(Ordering::SeqCst))
            .filter(|&r| r != 0)
            .fold(last, |h, r| h.min(r - 1))
    }

    /// The next id (call it while holding an [`InFlight`] in single-node
    /// mode).
    pub fn next(&self) -> EventId {
        self.ids.next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_horizon_stays_below_a_publish_in_flight() {
        let s = Sequencer::new(IdGen::starting_at(100));
        assert_eq!(s.horizon(), 99);
        let a = s.enter();
        let id = s.next();
        assert!(s.horizon() < id.as_u64());
        let b = s.enter();
        let later = s.next();
        drop(a);
        assert!(s.horizon() >= id.as_u64());
        assert!(s.horizon() < later.as_u64());
        drop(b);
        assert_eq!(s.horizon(), later.as_u64());
    }

    #[test]
    fn more_publishers_than_one_slot_each_find_one() {
        let s = Sequencer::new(IdGen::starting_at(1));
        let held: Vec<_> = (0..SLOTS - 1).map(|_| s.enter()).collect();
        let last = s.enter();
        drop(held);
        drop(last);
        assert_eq!(s.horizon(), s.ids().last().as_u64());
    }
}
