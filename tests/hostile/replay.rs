//! Replays are read lazily from the shared history: what a resume costs a
//! connection is bounded by a small constant plus `--max-queued-bytes`,
//! whatever the history holds.

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::harness::{Herald, eventually, tiny_socket, ws_open, ws_text};

/// Subscribers of `channel` in `/status`.
async fn subscribers(h: &Herald, channel: &str) -> u64 {
    h.status().await["channels"][channel]["subscribers"]
        .as_u64()
        .unwrap_or(0)
}

/// Defect 1: one WebSocket client that never reads sends, in one write,
/// 400 subscribe/unsubscribe pairs with a resume on a channel with 1 MiB
/// of history, then a last subscribe. Each used to queue the whole history
/// (431 MiB of RSS); now each is a cursor that its unsubscribe drops.
#[tokio::test]
async fn websocket_subscribe_floods_do_not_amplify_replays() {
    let h = Herald::start(&[]).await;
    h.fill("h", 64, 16 * 1024).await;
    let before = h.rss_mib();
    let mut s = tiny_socket(h.addr, 2).await;
    ws_open(&mut s, "").await;
    let mut burst = vec![];
    let sub = br#"{"type":"subscribe","channel":"h","lastEventId":"garbage"}"#;
    let unsub = br#"{"type":"unsubscribe","channel":"h"}"#;
    for _ in 0..400 {
        burst.extend(ws_text(sub));
        burst.extend(ws_text(unsub));
    }
    burst.extend(ws_text(sub));
    // Messages are handled in order: once this one is, all were.
    burst.extend(ws_text(br#"{"type":"subscribe","channel":"done"}"#));
    s.write_all(&burst).await.unwrap();
    eventually(|| async { subscribers(&h, "done").await == 1 }).await;
    assert_eq!(subscribers(&h, "h").await, 1);
    let grew = h.rss_mib() - before;
    eprintln!("RSS grew by {grew:.1} MiB");
    assert!(grew < 24.0, "RSS grew by {grew:.1} MiB");
    drop(s);
}

/// Defect 2: clients that resume from an unknown id (a reset, then all
/// history) and never read, over SSE, WebSocket and HTTP/2 streams, on a
/// channel with 16 MiB of history: RSS grows by a bounded amount per
/// connection, not by the history per connection.
#[tokio::test]
async fn resumes_that_never_read_cost_a_bounded_amount() {
    let h = Herald::start(&[]).await;
    h.fill("big", 256, 64 * 1024 - 256).await;
    let before = h.rss_mib();
    let mut held = vec![];
    for i in 0..20u8 {
        let mut s = tiny_socket(h.addr, 10 + i).await;
        s.write_all(b"GET /channel/big HTTP/1.1\r\nHost: x\r\nLast-Event-ID: garbage\r\n\r\n")
            .await
            .unwrap();
        held.push(s);
    }
    for i in 0..10u8 {
        let mut s = tiny_socket(h.addr, 40 + i).await;
        ws_open(&mut s, "?channel=big&lastEventId=garbage").await;
        held.push(s);
    }
    let mut h2 = vec![];
    let mut bodies = vec![];
    {
        let s = tiny_socket(h.addr, 60).await;
        let (mut client, conn) = h2::client::Builder::new()
            .initial_window_size(65_535)
            .handshake::<_, bytes::Bytes>(s)
            .await
            .unwrap();
        tokio::spawn(conn);
        for _ in 0..10 {
            let req = http::Request::get(h.url("/channel/big"))
                .header("last-event-id", "garbage")
                .body(())
                .unwrap();
            let (resp, _) = client.send_request(req, true).unwrap();
            h2.push(resp);
        }
        for r in h2 {
            // Held, never read: the body's flow-control window stays shut.
            let r = r.await.unwrap();
            assert_eq!(r.status(), 200);
            bodies.push(r.into_body());
        }
    }
    eventually(|| async { subscribers(&h, "big").await == 40 }).await;
    let grew = h.rss_mib() - before;
    eprintln!("RSS grew by {grew:.1} MiB");
    // 40 connections, each at most one replay batch (64 KiB) plus the
    // socket's buffers: far below one history (16 MiB) per connection.
    assert!(grew < 48.0, "RSS grew by {grew:.1} MiB");
    drop((held, bodies));
}

/// Defect 2, small messages: 256 channels of 200 events of 200 bytes, and
/// 10 resumers of all of them on one `/events` stream each that never
/// read. Each used to copy its whole backlog (51,200 events); now it holds
/// 256 cursors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_small_channels_resumed_cost_a_bounded_amount() {
    let h = Herald::start(&[]).await;
    let body = "y".repeat(200);
    let sends = (0..256).flat_map(|c| (0..200).map(move |_| c)).map(|c| {
        let req = h
            .http
            .post(h.url(&format!("/channel/s{c}")))
            .body(body.clone());
        async move { req.send().await.unwrap().status() }
    });
    let statuses: Vec<_> = futures_util::stream::iter(sends)
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(statuses.iter().all(|s| *s == 202));
    let before = h.rss_mib();
    let query: Vec<String> = (0..256).map(|c| format!("stream=s{c}")).collect();
    let head = format!(
        "GET /events?{} HTTP/1.1\r\nHost: x\r\nLast-Event-ID: garbage\r\n\r\n",
        query.join("&")
    );
    let mut held = vec![];
    for i in 0..10u8 {
        let mut s = tiny_socket(h.addr, 80 + i).await;
        s.write_all(head.as_bytes()).await.unwrap();
        held.push(s);
    }
    eventually(|| async { subscribers(&h, "s0").await == 10 }).await;
    let grew = h.rss_mib() - before;
    eprintln!("RSS grew by {grew:.1} MiB");
    assert!(grew < 24.0, "RSS grew by {grew:.1} MiB");
    drop(held);
}
