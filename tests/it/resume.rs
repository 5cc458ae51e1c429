//! Resume is exact on a connection of several channels: the replay is
//! merged in id order, live events arrive in id order under concurrent
//! publishers, and a client cut anywhere resumes from its last id with
//! every event once (SSE and WebSocket; the cluster checks are in
//! `cluster.rs` and `backplane.rs`).

use crate::support::{TestHub, Ws, get_on, read_until};

/// Publishes a0 b0 c0 a1 ... on three channels; returns (data, id) in
/// publish order.
async fn interleaved(hub: &TestHub, rounds: usize) -> Vec<(String, String)> {
    let mut out = vec![];
    for i in 0..rounds {
        for c in ["a", "b", "c"] {
            let data = format!("{c}{i}");
            let id = hub.publish(c, &data).await;
            out.push((data, id));
        }
    }
    out
}

/// The id just before `id` (ids are 16-digit numbers), to resume from
/// before the first event.
fn before(id: &str) -> String {
    format!("{:016}", id.parse::<u64>().unwrap() - 1)
}

#[tokio::test]
async fn sse_a_multi_channel_replay_is_in_id_order_and_a_cut_anywhere_resumes_exactly() {
    let hub = TestHub::spawn().await;
    let published = interleaved(&hub, 8).await;
    let want: Vec<&str> = published.iter().map(|(d, _)| d.as_str()).collect();
    // Read one event per connection, then reconnect from its id, as a
    // browser cut after every event would.
    let mut last = before(&published[0].1);
    let mut got = vec![];
    for _ in 0..published.len() {
        let mut s = hub
            .sse_with("/events?stream=c&stream=a&stream=b", Some(&last))
            .await;
        let ev = s.next().await;
        last = ev.id;
        got.push(ev.data);
    }
    assert_eq!(got, want);
    // Nothing left, nothing repeated: the next event is a new one.
    let mut s = hub
        .sse_with("/events?stream=a&stream=b&stream=c", Some(&last))
        .await;
    hub.publish("b", "marker").await;
    assert_eq!(s.next().await.data, "marker");
}

/// Reads one WebSocket event frame (skipping `subscribed`).
async fn ws_event(ws: &mut Ws) -> serde_json::Value {
    loop {
        let m = ws.next_json().await;
        if m["type"] == "event" {
            return m;
        }
        assert_eq!(m["type"], "subscribed", "{m}");
    }
}

#[tokio::test]
async fn ws_a_multi_channel_replay_is_in_id_order_and_a_cut_anywhere_resumes_exactly() {
    let hub = TestHub::spawn().await;
    let published = interleaved(&hub, 8).await;
    let mut last = before(&published[0].1);
    let mut got = vec![];
    for _ in 0..published.len() {
        let mut ws = hub
            .ws(&format!(
                "?channel=b&channel=c&channel=a&lastEventId={last}"
            ))
            .await;
        let ev = ws_event(&mut ws).await;
        last = ev["id"].as_str().unwrap().to_owned();
        got.push((
            ev["data"].as_str().unwrap().to_owned(),
            ev["channel"].as_str().unwrap().to_owned(),
        ));
    }
    let want: Vec<(String, String)> = published
        .iter()
        .map(|(d, _)| (d.clone(), d[..1].to_owned()))
        .collect();
    assert_eq!(got, want);
    let mut ws = hub
        .ws(&format!(
            "?channel=a&channel=b&channel=c&lastEventId={last}"
        ))
        .await;
    hub.publish("c", "marker").await;
    assert_eq!(ws_event(&mut ws).await["data"], "marker");
}

/// Four publishers on four channels at once: a subscriber of all four over
/// SSE and over WebSocket sees ids only grow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_multi_channel_delivery_is_in_id_order_under_concurrent_publishers() {
    let hub = TestHub::spawn().await;
    let chans = ["a", "b", "c", "d"];
    let mut sse = hub.sse("/events?stream=a&stream=b&stream=c&stream=d").await;
    let mut ws = hub.ws("?channel=a&channel=b&channel=c&channel=d").await;
    let per = 300;
    let publishers: Vec<_> = chans
        .iter()
        .map(|c| {
            let (http, url) = (hub.http.clone(), hub.url(&format!("/channel/{c}")));
            tokio::spawn(async move {
                for i in 0..per {
                    let r = http.post(&url).body(i.to_string()).send().await.unwrap();
                    assert_eq!(r.status(), 202);
                }
            })
        })
        .collect();
    for p in publishers {
        p.await.unwrap();
    }
    let mut sse_ids = vec![];
    let mut ws_ids = vec![];
    for _ in 0..4 * per {
        sse_ids.push(sse.next().await.id);
        ws_ids.push(ws_event(&mut ws).await["id"].as_str().unwrap().to_owned());
    }
    for (name, ids) in [("sse", &sse_ids), ("ws", &ws_ids)] {
        let inversions = ids.windows(2).filter(|w| w[0] >= w[1]).count();
        assert_eq!(inversions, 0, "{name}: ids out of order");
    }
    // And resuming from any of them is exact: the rest, in order.
    let cut = 2 * per;
    let mut s = hub
        .sse_with(
            "/events?stream=d&stream=c&stream=b&stream=a",
            Some(&sse_ids[cut]),
        )
        .await;
    for want in &sse_ids[cut + 1..] {
        assert_eq!(&s.next().await.id, want);
    }
}

const WS_HEADERS: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

/// One rule on both paths, SSE and WebSocket: a repeated `Last-Event-ID`
/// or `Origin` is refused with 400 (which one to honour is ambiguous), and
/// an empty `Last-Event-ID:` is no header (`?lastEventId` applies).
#[tokio::test]
async fn repeated_and_empty_resume_headers_follow_one_rule_on_every_path() {
    let hub = TestHub::spawn().await;
    let first = hub.publish("h", "e0").await;
    hub.publish("h", "e1").await;
    for hyper in [false, true] {
        for (path, upgrade) in [("/events?stream=h", ""), ("/ws?channel=h", WS_HEADERS)] {
            let what = format!("{path} via {}", if hyper { "hyper" } else { "direct" });
            for (twice, name) in [
                ("Last-Event-ID: 1\r\nLast-Event-ID: 2\r\n", "Last-Event-ID"),
                (
                    "Origin: https://a.example\r\norigin: https://b.example\r\n",
                    "Origin",
                ),
            ] {
                let mut s = get_on(hub.addr, hyper, path, &format!("{upgrade}{twice}")).await;
                let got = read_until(&mut s, "send it once").await;
                assert!(got.starts_with("HTTP/1.1 400"), "{what}: {got}");
                assert!(
                    got.contains(&format!("the {name} header is given more than once")),
                    "{what}: {got}"
                );
            }
            let query = if path.contains('?') { "&" } else { "?" };
            let mut s = get_on(
                hub.addr,
                hyper,
                &format!("{path}{query}lastEventId={first}"),
                &format!("{upgrade}Last-Event-ID:\r\n"),
            )
            .await;
            let got = if upgrade.is_empty() {
                read_until(&mut s, "data: e1\n").await
            } else {
                read_until(&mut s, "\"data\":\"e1\"").await
            };
            assert!(!got.contains("e0"), "{what}: resumed after e0: {got}");
            assert!(!got.contains("herald.reset"), "{what}: {got}");
        }
    }
}
