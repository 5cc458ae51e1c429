//! Micro-benchmarks of the hot paths: frame encoding and fan-out to 10,000
//! in-process subscribers. Run with `cargo bench`; compare medians across
//! commits, not against a fixed number (this machine is shared and noisy).

#![allow(missing_docs, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use herald::hub::{
    Batch, ChannelName, ClientId, Config, Data, Event, EventId, Hub, Publish, Resume, sse_frame,
};

fn encoding(c: &mut Criterion) {
    let data = "x".repeat(100);
    let multi = "line one\nline two\r\nline three\rline four".repeat(8);
    c.bench_function("sse_frame/100B", |b| {
        b.iter(|| {
            sse_frame(
                Some("1795369130306892"),
                None,
                None,
                std::hint::black_box(&data),
            )
        });
    });
    c.bench_function("sse_frame/multiline-300B", |b| {
        b.iter(|| {
            sse_frame(
                Some("1795369130306892"),
                Some("version"),
                None,
                std::hint::black_box(&multi),
            )
        });
    });
    let channel = ChannelName::parse("bench").unwrap();
    c.bench_function("ws_frame/100B", |b| {
        b.iter_batched(
            || {
                Event::new(
                    EventId::from_u64(1),
                    channel.clone(),
                    None,
                    Data::Text(data.clone()),
                    None,
                    None,
                )
            },
            |e| e.ws().len(),
            BatchSize::SmallInput,
        );
    });
}

fn fan_out(c: &mut Criterion) {
    let hub = Hub::new(Config {
        history_size: 100,
        history_ttl: Duration::from_secs(600),
        max_queued_bytes: 1 << 30,
        max_channels: usize::MAX,
        origin: None,
    });
    let channel = ChannelName::parse("fanout").unwrap();
    let outboxes: Vec<_> = (0..10_000).map(|_| hub.outbox()).collect();
    let _subs: Vec<_> = outboxes
        .iter()
        .map(|o| {
            hub.subscribe(&channel, &ClientId::generate(), o, &Resume::Fresh)
                .unwrap()
        })
        .collect();
    let publish = Publish {
        data: Data::Text("x".repeat(100)),
        event: None,
        key: None,
        retry: None,
        retain: false,
    };
    let mut group = c.benchmark_group("fan_out");
    group.sample_size(20);
    group.bench_function("publish_to_10000_subscribers", |b| {
        b.iter(|| {
            hub.publish(&channel, publish.clone());
            // Drain as the writers would, so queues do not grow.
            for o in &outboxes {
                if let Some(Batch::Items(items)) = o.try_batch() {
                    std::hint::black_box(items.len());
                }
            }
        });
    });
    group.finish();
    drop(Arc::clone(&hub));
}

criterion_group!(benches, encoding, fan_out);
criterion_main!(benches);
