//! Event ids: ordered within the hub and never reused after a restart.
//!
//! An id is a hybrid clock reading: the larger of "microseconds since the
//! Unix epoch" and "previous id + 1". It grows strictly, so one id is a
//! position in *every* channel of the hub, which is what lets one
//! `Last-Event-ID` resume a multi-channel stream. A restarted hub starts
//! from the clock again, above every id it issued before (unless the clock
//! went backwards, or the hub issued more than a million ids per second for
//! longer than it was down). Ids print as 16 zero-padded decimal digits, so
//! their text sorts like their value.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// An event id. Opaque to clients; ordered within the hub.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId(u64);

/// Why a client's id could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an event id issued by herald: {0:?}")]
pub struct InvalidEventId(pub String);

impl EventId {
    /// The id with this numeric value.
    pub const fn from_u64(v: u64) -> Self {
        Self(v)
    }

    /// The numeric value.
    pub const fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016}", self.0)
    }
}

impl fmt::Debug for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for EventId {
    type Err = InvalidEventId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(InvalidEventId(s.chars().take(64).collect()));
        }
        s.parse::<u64>()
            .map(Self)
            .map_err(|_| InvalidEventId(s.to_owned()))
    }
}

/// Issues ids. One per hub; lock-free.
#[derive(Debug)]
pub struct IdGen {
    last: AtomicU64,
    boot: u64,
}

impl IdGen {
    /// Starts a generator at the current time.
    pub fn new() -> Self {
        Self::starting_at(unix_micros())
    }

    /// Starts a generator whose first id is at least `boot` (for tests).
    pub fn starting_at(boot: u64) -> Self {
        Self {
            last: AtomicU64::new(boot.saturating_sub(1)),
            boot,
        }
    }

    /// The next id: strictly greater than every id issued before.
    pub fn next(&self) -> EventId {
        let now = unix_micros();
        let prev = self
            .last
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
                Some(now.max(last + 1))
            });
        // fetch_update with a closure that always returns Some cannot fail;
        // both arms carry the previous value.
        let prev = match prev {
            Ok(p) | Err(p) => p,
        };
        EventId(now.max(prev + 1))
    }

    /// Makes every later id greater than `id`.
    pub fn observe(&self, id: EventId) {
        self.last.fetch_max(id.0, Ordering::SeqCst);
    }

    /// The smallest id this generator can issue: ids below it predate this
    /// process, so the hub knows nothing of what followed them.
    pub fn boot(&self) -> EventId {
        EventId(self.boot)
    }

    /// True if no node could have issued `id` yet: more than `skew` ahead
    /// of this clock (ids are clock readings; nodes' clocks differ by a
    /// little, never by minutes).
    pub fn from_the_future(&self, id: EventId, skew: std::time::Duration) -> bool {
        let skew = u64::try_from(skew.as_micros()).unwrap_or(u64::MAX);
        id.0 > unix_micros().max(self.last().0).saturating_add(skew)
    }

    /// The last id issued (or `boot - 1` before the first).
    pub fn last(&self) -> EventId {
        // SeqCst: the sequencer's horizon reasons on one total order of
        // id updates and reservations.
        EventId(self.last.load(Ordering::SeqCst))
    }
}

impl Default for IdGen {
    fn default() -> Self {
        Self::new()
    }
}

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_grow_strictly_and_sort_as_text() {
        let ids = IdGen::new();
        let mut prev = ids.next();
        for _ in 0..10_000 {
            let next = ids.next();
            assert!(next > prev);
            assert!(next.to_string() > prev.to_string());
            prev = next;
        }
    }

    #[test]
    fn a_restarted_generator_issues_ids_above_the_old_ones() {
        let old = IdGen::new();
        let last_before_restart = (0..1000).map(|_| old.next()).last().unwrap();
        let restarted = IdGen::new();
        assert!(restarted.next() > last_before_restart || restarted.boot() <= last_before_restart);
        // A generator that starts later in time is above every id the
        // clock had reached before.
        let later = IdGen::starting_at(last_before_restart.as_u64() + 1);
        assert!(later.next() > last_before_restart);
        assert!(later.boot() > last_before_restart);
    }

    #[test]
    fn ids_round_trip_through_text_and_reject_garbage() {
        let id = IdGen::new().next();
        assert_eq!(id.to_string().len(), 16);
        assert_eq!(id.to_string().parse::<EventId>().unwrap(), id);
        for bad in ["", "abc", "-1", "1.5", "123456789012345678901", " 12"] {
            assert!(bad.parse::<EventId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ids_are_unique_across_threads() {
        let ids = std::sync::Arc::new(IdGen::new());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let ids = ids.clone();
                std::thread::spawn(move || (0..10_000).map(|_| ids.next()).collect::<Vec<_>>())
            })
            .collect();
        let mut all: Vec<_> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n);
    }
}
