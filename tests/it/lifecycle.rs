//! Health, readiness, status and graceful shutdown.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use tower::ServiceExt;

use crate::support::{TestHub, config};

#[tokio::test]
async fn health_ready_and_status() {
    let hub = TestHub::spawn().await;
    assert_eq!(
        hub.http
            .get(hub.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        hub.http
            .get(hub.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let _sub = hub.sse("/channel/c").await;
    hub.publish("c", "x").await;
    let s = hub.status().await;
    assert!(s["node"].is_string());
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(s["connections"], 1);
    assert_eq!(
        s["channels"]["c"],
        serde_json::json!({"subscribers": 1, "history": 1, "retained": false})
    );
}

#[tokio::test]
async fn a_channel_leaves_status_when_its_last_subscriber_goes_and_nothing_is_kept() {
    let mut c = config();
    c.heartbeat = Duration::from_millis(50);
    c.history_size = 0;
    let hub = TestHub::with(c).await;
    let sub = hub.sse("/channel/gone").await;
    assert_eq!(hub.status().await["channels"]["gone"]["subscribers"], 1);
    drop(sub);
    crate::support::eventually(|| async { hub.status().await["channels"].get("gone").is_none() })
        .await;
}

#[tokio::test]
async fn draining_answers_503_on_readyz_and_new_subscriptions() {
    let c = config();
    let state = herald::http::State::new(c);
    state.shutdown.cancel();
    let router = herald::http::router(state);
    let r = router
        .clone()
        .oneshot(Request::get("/readyz").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let r = router
        .clone()
        .oneshot(Request::get("/channel/c").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let r = router
        .oneshot(Request::get("/healthz").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "still alive while draining");
}

#[tokio::test]
async fn shutdown_ends_open_streams_and_websockets_and_refuses_new_connections() {
    let mut hub = TestHub::spawn().await;
    let mut sse: Vec<_> =
        futures_util::future::join_all((0..50).map(|_| hub.sse("/channel/c"))).await;
    let mut ws = hub.ws("?channel=c").await;
    let addr = hub.addr;
    let started = Instant::now();
    hub.stop().await;
    for s in &mut sse {
        s.ends().await;
    }
    assert_eq!(ws.close_code().await, 1012);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
}

#[tokio::test]
async fn shutdown_with_thousands_of_streams_finishes_well_within_the_grace() {
    let mut hub = TestHub::spawn().await;
    let opens = (0..3000).map(|i| {
        hub.sse(if i % 2 == 0 {
            "/channel/a"
        } else {
            "/events?stream=a&stream=b"
        })
    });
    let streams = futures_util::future::join_all(opens).await;
    assert_eq!(hub.status().await["connections"], 3000);
    let started = Instant::now();
    hub.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    drop(streams);
}

#[tokio::test]
async fn a_client_that_never_reads_cannot_hold_shutdown_past_the_grace() {
    let mut c = config();
    c.shutdown_grace = Duration::from_millis(500);
    c.write_timeout = Duration::from_secs(60);
    let mut hub = TestHub::with(c).await;
    let stalled = crate::support::stalled_subscriber(hub.addr, "/channel/flood").await;
    let payload = "y".repeat(60_000);
    for _ in 0..20 {
        hub.publish("flood", &payload).await;
    }
    let started = Instant::now();
    hub.stop().await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "{took:?}");
    drop(stalled);
}

#[tokio::test]
async fn ids_issued_after_a_restart_are_above_every_id_issued_before() {
    let mut before = TestHub::spawn().await;
    let mut last = String::new();
    for i in 0..100 {
        last = before.publish("c", &i.to_string()).await;
    }
    before.stop().await;
    let after = TestHub::spawn().await;
    let first = after.publish("c", "new").await;
    assert!(first > last, "{first} <= {last}");
    // An id from the previous process is unknown here: reset, not silence.
    let mut sub = after.sse_with("/channel/c", Some(&last)).await;
    assert_eq!(sub.next().await.event, "herald.reset");
    assert_eq!(sub.next_data().await, "new");
}

#[tokio::test]
async fn the_public_listener_has_a_deep_accept_queue() {
    // A reconnect storm (a rollout, a network blip) must not overflow the
    // kernel's accept queue: `ss` shows a listener's backlog as Send-Q.
    let hub = crate::support::TestHub::spawn().await;
    let Ok(out) = std::process::Command::new("ss")
        .args(["-ltnH", &format!("sport = :{}", hub.addr.port())])
        .output()
    else {
        eprintln!("SKIPPED: no ss on this machine");
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let send_q: u64 = text
        .split_whitespace()
        .nth(2)
        .and_then(|q| q.parse().ok())
        .unwrap_or_else(|| panic!("unexpected ss output: {text:?}"));
    let somaxconn: u64 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096);
    assert_eq!(send_q, somaxconn.min(8192), "{text}");
}

/// SIGTERM starts a drain Kubernetes can see: for --drain-delay the
/// listener stays open, /readyz answers 503, new subscriptions get 503 with
/// Retry-After, and open streams keep flowing; then the streams end (SSE
/// ends its body, a WebSocket gets 1012). Paused time: the default 5 s.
#[tokio::test(start_paused = true)]
async fn a_drain_keeps_the_listener_open_and_streams_flowing_for_the_drain_delay() {
    let mut c = config();
    c.drain_delay = herald::config::DEFAULT_DRAIN_DELAY;
    let mut hub = TestHub::with(c).await;
    let mut sse = hub.sse("/events?stream=d").await;
    let mut ws = hub.ws("?channel=d").await;
    let started = tokio::time::Instant::now();
    hub.token.cancel();
    let r = hub.http.get(hub.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["status"],
        "draining"
    );
    for path in ["/channel/d", "/events?stream=d"] {
        let r = hub.http.get(hub.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 503, "{path}");
        assert_eq!(r.headers()["retry-after"], "1", "{path}");
    }
    let refused = tokio_tungstenite::connect_async(format!("ws://{}/ws?channel=d", hub.addr)).await;
    assert!(
        refused.is_err(),
        "a new WebSocket is refused while draining"
    );
    hub.publish("d", "during the drain").await;
    assert_eq!(sse.next().await.data, "during the drain");
    assert_eq!(ws.next_json().await["data"], "during the drain");
    sse.ends().await;
    assert_eq!(ws.close_code().await, 1012);
    assert!(
        started.elapsed() >= herald::config::DEFAULT_DRAIN_DELAY,
        "streams ended after {:?}",
        started.elapsed()
    );
    hub.stop().await;
}
