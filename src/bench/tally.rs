//! Counting what subscribers received: unique deliveries, duplicates,
//! losses and latency. Each connection keeps a bitset of the sequence
//! numbers it saw; the shared part is a histogram and a few counters.

use std::sync::atomic::{AtomicU64, Ordering};

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// Shared by every connection of one worker process.
#[derive(Debug)]
pub struct Shared {
    latency: Mutex<Histogram<u64>>,
    delivered: AtomicU64,
    duplicates: AtomicU64,
    foreign: AtomicU64,
    complete: AtomicU64,
    expected_per_conn: u64,
}

/// One connection's view.
#[derive(Debug)]
pub struct Seen {
    bits: Vec<u64>,
    unique: u64,
}

impl Shared {
    /// Tally for connections that each expect `expected_per_conn` messages
    /// with sequence numbers `0..expected_per_conn`.
    pub fn new(expected_per_conn: u64) -> Self {
        Self {
            // 1 µs to 10 min, 3 significant digits; fits any run here.
            latency: Mutex::new(
                Histogram::new_with_bounds(1, 600_000_000, 3).unwrap_or_else(|_| {
                    Histogram::new(3)
                        .unwrap_or_else(|_| unreachable!("3 significant digits is valid"))
                }),
            ),
            delivered: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
            complete: AtomicU64::new(0),
            expected_per_conn,
        }
    }

    /// A fresh per-connection record.
    pub fn seen(&self) -> Seen {
        let words = usize::try_from(self.expected_per_conn.div_ceil(64)).unwrap_or(0);
        Seen {
            bits: vec![0; words],
            unique: 0,
        }
    }

    /// Records one received message. Returns true when this connection has
    /// now received everything it expects.
    pub fn record(&self, seen: &mut Seen, seq: u64, latency_us: u64) -> bool {
        if seq >= self.expected_per_conn {
            self.foreign.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let (w, b) = ((seq / 64) as usize, seq % 64);
        if seen.bits[w] & (1 << b) != 0 {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        seen.bits[w] |= 1 << b;
        seen.unique += 1;
        self.delivered.fetch_add(1, Ordering::Relaxed);
        let _ = self.latency.lock().record(latency_us.max(1));
        if seen.unique == self.expected_per_conn {
            self.complete.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Connections that have everything they expect.
    pub fn complete(&self) -> u64 {
        self.complete.load(Ordering::Relaxed)
    }

    /// The counts so far, for `connections` connections.
    pub fn summary(&self, connections: u64) -> Summary {
        let h = self.latency.lock();
        Summary {
            connections,
            expected: connections * self.expected_per_conn,
            delivered: self.delivered.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            foreign: self.foreign.load(Ordering::Relaxed),
            latency_us: h
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        }
    }
}

/// A worker's (or a whole run's) delivery counts.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Summary {
    /// Connections that were open.
    pub connections: u64,
    /// Messages that should have arrived (connections × messages each).
    pub expected: u64,
    /// Unique messages that arrived.
    pub delivered: u64,
    /// Messages that arrived more than once (not counted as delivered).
    pub duplicates: u64,
    /// Messages with a sequence number nobody sent to that connection.
    pub foreign: u64,
    /// Latency histogram: (µs, count) pairs.
    pub latency_us: Vec<(u64, u64)>,
}

impl Summary {
    /// Messages that never arrived.
    pub fn lost(&self) -> u64 {
        self.expected.saturating_sub(self.delivered)
    }

    /// Adds another worker's counts.
    pub fn merge(&mut self, other: &Self) {
        self.connections += other.connections;
        self.expected += other.expected;
        self.delivered += other.delivered;
        self.duplicates += other.duplicates;
        self.foreign += other.foreign;
        self.latency_us.extend_from_slice(&other.latency_us);
    }

    /// Latency percentiles in ms: (p50, p90, p99, max).
    pub fn percentiles_ms(&self) -> Option<[f64; 4]> {
        let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).ok()?;
        for &(v, c) in &self.latency_us {
            h.record_n(v.max(1), c).ok()?;
        }
        if h.is_empty() {
            return None;
        }
        let ms = |v: u64| v as f64 / 1000.0;
        Some([
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.9)),
            ms(h.value_at_quantile(0.99)),
            ms(h.max()),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn losses_and_duplicates_are_counted_per_connection() {
        let t = Shared::new(100);
        let mut a = t.seen();
        let mut b = t.seen();
        for seq in 0..100 {
            t.record(&mut a, seq, 1000);
        }
        for seq in (0..100).filter(|s| s % 10 != 0) {
            t.record(&mut b, seq, 2000);
        }
        t.record(&mut b, 5, 1); // duplicate
        t.record(&mut b, 500, 1); // never sent
        let s = t.summary(2);
        assert_eq!(
            (s.expected, s.delivered, s.lost(), s.duplicates, s.foreign),
            (200, 190, 10, 1, 1)
        );
        assert_eq!(t.complete(), 1);
    }

    #[test]
    fn merged_summaries_add_up_and_give_percentiles() {
        let t1 = Shared::new(10);
        let t2 = Shared::new(10);
        let (mut a, mut b) = (t1.seen(), t2.seen());
        for seq in 0..10 {
            t1.record(&mut a, seq, 1000 * (seq + 1));
            t2.record(&mut b, seq, 1000 * (seq + 1));
        }
        let mut s = t1.summary(1);
        s.merge(&t2.summary(1));
        assert_eq!((s.expected, s.delivered, s.lost()), (20, 20, 0));
        let [p50, _, p99, max] = s.percentiles_ms().unwrap();
        assert!((4.9..=5.1).contains(&p50), "{p50}");
        assert!((9.9..=10.1).contains(&p99) && (9.9..=10.1).contains(&max));
    }

    #[test]
    fn a_connection_that_got_nothing_loses_everything() {
        let t = Shared::new(5);
        let _silent = t.seen();
        let s = t.summary(1);
        assert_eq!((s.lost(), s.percentiles_ms()), (5, None));
    }
}
