//! Memory returns to its baseline after a million short-lived channels.
//!
//! A separate test binary because it installs a counting global allocator
//! and must not share the process with other tests' allocations.

#![allow(clippy::unwrap_used, missing_docs)]

use std::alloc::System;
use std::time::Duration;

use herald::hub::{ChannelName, ClientId, Config, Data, Hub, Publish, Resume};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn churn(hub: &std::sync::Arc<Hub>, range: std::ops::Range<u32>) {
    for i in range {
        let channel = ChannelName::parse(&format!("short-lived-{i}")).unwrap();
        let outbox = hub.outbox();
        let sub = hub
            .subscribe(&channel, &ClientId::generate(), &outbox, &Resume::Fresh)
            .unwrap();
        hub.publish(
            &channel,
            Publish {
                data: Data::Text(format!("event {i}")),
                event: None,
                key: Some(format!("key-{i}")),
                retry: None,
                retain: false,
            },
        );
        drop(sub);
        drop(outbox);
    }
}

#[tokio::test(start_paused = true)]
async fn memory_returns_to_baseline_after_a_million_short_lived_channels() {
    let hub = Hub::new(Config {
        history_size: 10,
        history_ttl: Duration::from_secs(60),
        max_queued_bytes: 1 << 20,
        max_channels: usize::MAX,
        origin: None,
    });
    // Warm up: lazily allocated runtime and map state is not a leak.
    churn(&hub, 0..1000);
    tokio::time::advance(Duration::from_secs(61)).await;
    hub.sweep();
    let region = Region::new(GLOBAL);

    churn(&hub, 0..1_000_000);
    let peak = region.change();
    let peak_live = peak.bytes_allocated as i64 - peak.bytes_deallocated as i64;
    assert_eq!(
        hub.channel_count(),
        1_000_000,
        "history keeps them until it expires"
    );
    assert!(
        peak_live > 100_000_000,
        "the churn really held memory: {peak_live}"
    );

    tokio::time::advance(Duration::from_secs(61)).await;
    hub.sweep();
    assert_eq!(hub.channel_count(), 0);
    let after = region.change();
    let live = after.bytes_allocated as i64 - after.bytes_deallocated as i64;
    eprintln!("peak {peak_live} bytes live; after expiry {live} bytes");
    assert!(
        live < 256 * 1024,
        "{live} bytes still live after every channel expired"
    );
}
