//! The one reconnection backoff: peer links, backplane connections and a
//! cluster node's first backfill all wait the same way after a failure,
//! so an outage is retried at the same pace everywhere and a thundering
//! herd of replicas spreads out (jitter).

use std::time::Duration;

use backon::BackoffBuilder;

/// The longest wait (the cap, 2.5 s, plus up to 100% jitter).
pub const MAX_WAIT: Duration = Duration::from_secs(5);

/// How long to wait after the `failures`-th failure in a row (1 = the
/// first): 50 ms doubling to 2.5 s, plus a random jitter of up to as much
/// again. `0` is no wait.
pub fn delay(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    backon::ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(MAX_WAIT / 2)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
        // The cap is reached after 6 doublings; later failures wait as long.
        .nth(failures.min(8) as usize - 1)
        .unwrap_or(MAX_WAIT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_with_jitter_and_is_capped() {
        assert_eq!(delay(0), Duration::ZERO);
        let first = delay(1);
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for n in [7, 30, u32::MAX] {
            let d = delay(n);
            assert!(d >= MAX_WAIT / 2 && d <= MAX_WAIT, "{n}: {d:?}");
        }
    }
}
