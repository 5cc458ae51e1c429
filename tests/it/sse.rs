//! SSE subscribe: headers, framing, resume, retained values, load, slow clients.

use std::time::Duration;

use crate::support::{TestHub, config, get_on, raw_get, read_until};

#[tokio::test]
async fn headers_and_retry_arrive_before_any_event() {
    let hub = TestHub::spawn().await;
    let mut s = raw_get(hub.addr, "/channel/news", "").await;
    let got = read_until(&mut s, "retry: 2000\n").await;
    let lower = got.to_ascii_lowercase();
    assert!(lower.starts_with("http/1.1 200 ok\r\n"), "{got}");
    assert!(
        lower.contains("content-type: text/event-stream\r\n"),
        "{got}"
    );
    assert!(lower.contains("cache-control: no-cache\r\n"), "{got}");
    assert!(lower.contains("x-accel-buffering: no\r\n"), "{got}");
    assert!(lower.contains("herald-client-id: "), "{got}");
}

#[tokio::test]
async fn retry_field_is_configurable() {
    let mut c = config();
    c.sse_retry = Duration::from_millis(750);
    let hub = TestHub::with(c).await;
    let mut s = raw_get(hub.addr, "/events?stream=a", "").await;
    let got = read_until(&mut s, "retry: 750\n").await;
    assert!(got.contains("\r\n\r\n"));
}

#[tokio::test]
async fn subscriber_receives_what_is_published_after_its_200() {
    let hub = TestHub::spawn().await;
    let mut sub = hub.sse("/channel/news").await;
    let id = hub.publish("news", "hello").await;
    let ev = sub.next().await;
    assert_eq!(
        (ev.id.as_str(), ev.event.as_str(), ev.data.as_str()),
        (id.as_str(), "message", "hello")
    );
}

#[tokio::test]
async fn frames_on_the_wire_split_every_kind_of_line_break() {
    let hub = TestHub::spawn().await;
    let mut s = raw_get(hub.addr, "/channel/c", "").await;
    read_until(&mut s, "retry: 2000\n").await;
    let id = hub.publish("c", "a\nb\r\nc\rd\n\ne").await;
    let got = read_until(&mut s, "data: e\n\n").await;
    let frame = format!("id: {id}\ndata: a\ndata: b\ndata: c\ndata: d\ndata:\ndata: e\n\n");
    assert!(got.contains(&frame), "{got:?}");
}

#[tokio::test]
async fn json_data_is_compact_json_strings_are_text_and_names_are_framed() {
    let hub = TestHub::spawn().await;
    let mut sub = hub.sse("/channel/c").await;
    let raw = r#"{"data": {"a": [1, 2.50],
        "b": "x y"}, "event": "version"}"#;
    let r = hub
        .http
        .post(hub.url("/channel/c"))
        .header("content-type", "application/json")
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let ev = sub.next().await;
    assert_eq!(
        (ev.event.as_str(), ev.data.as_str()),
        ("version", r#"{"a":[1,2.50],"b":"x y"}"#)
    );
    hub.publish_json(
        "/channel/c",
        serde_json::json!({"data": "plain \"text\"\nline2"}),
    )
    .await;
    assert_eq!(sub.next_data().await, "plain \"text\"\nline2");
    // A publisher's retry reaches the frame.
    let mut raw = raw_get(hub.addr, "/channel/d", "").await;
    read_until(&mut raw, "retry: 2000\n").await;
    hub.publish_json(
        "/channel/d",
        serde_json::json!({"data": 1, "retry": 5000, "event": "e"}),
    )
    .await;
    let got = read_until(&mut raw, "data: 1\n\n").await;
    assert!(
        got.contains("event: e\nretry: 5000\ndata: 1\n\n"),
        "{got:?}"
    );
}

#[tokio::test]
async fn heartbeat_comments_keep_an_idle_stream_alive() {
    let mut c = config();
    c.heartbeat = Duration::from_millis(50);
    let hub = TestHub::with(c).await;
    let mut s = raw_get(hub.addr, "/channel/quiet", "").await;
    // Chunked encoding puts each comment in its own chunk: wait for two.
    let first = read_until(&mut s, ": ping\n").await;
    assert!(first.contains("retry: 2000\n"), "{first:?}");
    read_until(&mut s, ": ping\n").await;
}

#[tokio::test]
async fn one_connection_carries_several_channels() {
    let hub = TestHub::spawn().await;
    let mut sub = hub.sse("/events?stream=a&stream=b").await;
    hub.publish("a", "1").await;
    hub.publish("other", "x").await;
    hub.publish("b", "2").await;
    assert_eq!(sub.next_data().await, "1");
    assert_eq!(sub.next_data().await, "2");
}

#[tokio::test]
async fn events_without_a_stream_is_refused_with_the_documented_message() {
    let hub = TestHub::spawn().await;
    for path in ["/events", "/events?foo=bar", "/events?stream=bad%20name"] {
        let resp = hub.http.get(hub.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 400, "{path}");
        let v: serde_json::Value = resp.json().await.unwrap();
        assert!(v["error"].is_string(), "{path}");
        if path != "/events?stream=bad%20name" {
            assert_eq!(
                v["error"],
                "a stream name is required as part of the query parameters"
            );
        }
    }
}

#[tokio::test]
async fn bad_channel_and_client_names_are_refused() {
    let hub = TestHub::spawn().await;
    let long = "x".repeat(201);
    for path in [
        "/channel/a%20b",
        &format!("/channel/{long}"),
        "/channel/a/client/b:c",
        "/channel/%FF",
    ] {
        let resp = hub.http.get(hub.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 400, "{path}");
        let v: serde_json::Value = resp.json().await.unwrap();
        assert!(
            v["error"].as_str().unwrap().contains("invalid"),
            "{path}: {v}"
        );
    }
}

#[tokio::test]
async fn chosen_client_ids_are_unique_per_channel_and_generated_ones_are_returned() {
    let mut c = config();
    c.heartbeat = Duration::from_millis(50); // notices the closed connection quickly
    let hub = TestHub::with(c).await;
    let sub = hub.sse("/channel/c/client/tab-1").await;
    assert_eq!(sub.headers["herald-client-id"], "tab-1");
    let again = hub
        .http
        .get(hub.url("/channel/c/client/tab-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
    let v: serde_json::Value = again.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().contains("already connected"));
    let other = hub.sse("/channel/c").await;
    let generated = other.headers["herald-client-id"].to_str().unwrap();
    assert!(!generated.is_empty() && generated != "tab-1");
    drop(sub);
    crate::support::eventually(|| async {
        hub.status().await["channels"]["c"]["subscribers"] == 1
    })
    .await;
    let r = hub
        .http
        .get(hub.url("/channel/c/client/tab-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the id is free again");
}

#[tokio::test]
async fn resume_with_last_event_id_has_no_gap_and_no_duplicate() {
    let hub = TestHub::spawn().await;
    let mut ids = vec![];
    for i in 0..5 {
        ids.push(hub.publish("c", &i.to_string()).await);
    }
    let mut sub = hub.sse_with("/channel/c", Some(&ids[2])).await;
    hub.publish("c", "5").await;
    let got: Vec<String> = [sub.next().await, sub.next().await, sub.next().await]
        .into_iter()
        .map(|e| e.data)
        .collect();
    assert_eq!(got, ["3", "4", "5"]);
    // The query parameter works the same (EventSource cannot set headers on a first connect).
    let mut q = hub.sse(&format!("/channel/c?lastEventId={}", ids[3])).await;
    assert_eq!(q.next_data().await, "4");
    assert_eq!(q.next_data().await, "5");
}

#[tokio::test]
async fn one_id_resumes_all_channels_of_a_stream() {
    let hub = TestHub::spawn().await;
    hub.publish("a", "a1").await;
    let mid = hub.publish("b", "b1").await;
    hub.publish("a", "a2").await;
    hub.publish("b", "b2").await;
    let mut sub = hub.sse_with("/events?stream=a&stream=b", Some(&mid)).await;
    let mut got = vec![sub.next_data().await, sub.next_data().await];
    got.sort();
    assert_eq!(got, ["a2", "b2"]);
}

#[tokio::test]
async fn a_resume_through_a_cut_connection_loses_and_repeats_nothing() {
    let hub = TestHub::spawn().await;
    let proxy = crate::support::Proxy::start(hub.addr).await;
    let http = crate::support::http();
    let resp = http
        .get(format!("http://{}/channel/c", proxy.addr))
        .send()
        .await
        .unwrap();
    let mut sub = crate::support::Sse::from_response(resp);
    hub.publish("c", "before").await;
    let seen = sub.next().await;
    proxy.cut_all();
    sub.ends().await;
    for i in 0..3 {
        hub.publish("c", &format!("during {i}")).await;
    }
    let resp = http
        .get(format!("http://{}/channel/c", proxy.addr))
        .header("last-event-id", &seen.id)
        .send()
        .await
        .unwrap();
    let mut sub = crate::support::Sse::from_response(resp);
    hub.publish("c", "after").await;
    let got: Vec<String> = [
        sub.next().await,
        sub.next().await,
        sub.next().await,
        sub.next().await,
    ]
    .into_iter()
    .map(|e| e.data)
    .collect();
    assert_eq!(got, ["during 0", "during 1", "during 2", "after"]);
}

#[tokio::test]
async fn unknown_or_expired_ids_get_a_reset_then_everything_retained() {
    let mut c = config();
    c.history_size = 2;
    let hub = TestHub::with(c).await;
    let first = hub.publish("c", "0").await;
    for i in 1..4 {
        hub.publish("c", &i.to_string()).await;
    }
    for id in ["garbage", "0000000000000001", first.as_str()] {
        let mut sub = hub.sse_with("/channel/c", Some(id)).await;
        let reset = sub.next().await;
        assert_eq!(reset.event, "herald.reset", "{id}");
        assert_eq!(reset.id, "", "a reset carries no id");
        let body: serde_json::Value = serde_json::from_str(&reset.data).unwrap();
        assert_eq!(body["channel"], "c");
        assert!(body["reason"].is_string());
        assert_eq!(sub.next_data().await, "2");
        assert_eq!(sub.next_data().await, "3");
    }
}

#[tokio::test]
async fn a_retained_value_is_sent_first_to_new_subscribers() {
    let hub = TestHub::spawn().await;
    let resp = hub
        .http
        .post(hub.url("/channel/v?retain=true&event=version"))
        .body("v1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    hub.publish("v", "not retained").await;
    let mut sub = hub.sse("/channel/v").await;
    let ev = sub.next().await;
    assert_eq!((ev.event.as_str(), ev.data.as_str()), ("version", "v1"));
    hub.publish("v", "live").await;
    assert_eq!(sub.next_data().await, "live");
    assert_eq!(hub.status().await["channels"]["v"]["retained"], true);
}

#[tokio::test]
async fn a_thousand_subscribers_each_receive_a_burst_of_a_hundred_in_order() {
    let hub = TestHub::spawn().await;
    let mut subs = Vec::new();
    let opens: Vec<_> = (0..1000).map(|_| hub.sse("/channel/burst")).collect();
    for s in futures_util::future::join_all(opens).await {
        subs.push(s);
    }
    assert_eq!(hub.status().await["channels"]["burst"]["subscribers"], 1000);
    let publisher = hub.http.clone();
    let url = hub.url("/channel/burst");
    for i in 0..100 {
        let r = publisher
            .post(&url)
            .body(i.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    let readers = subs.into_iter().map(|mut s| async move {
        for i in 0..100 {
            assert_eq!(s.next_data().await, i.to_string());
        }
    });
    futures_util::future::join_all(readers).await;
    assert_eq!(hub.status().await["slow_consumers_disconnected"], 0);
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_the_others_get_everything() {
    let mut c = config();
    c.max_queued_bytes = 256 * 1024;
    c.write_timeout = Duration::from_millis(500);
    let hub = TestHub::with(c).await;
    let stalled = crate::support::stalled_subscriber(hub.addr, "/channel/flood").await;
    let mut fast = hub.sse("/channel/flood").await;
    let payload = "x".repeat(16 * 1024);
    let reader = tokio::spawn(async move {
        for _ in 0..400 {
            assert_eq!(fast.next_data().await.len(), 16 * 1024);
        }
        fast
    });
    for _ in 0..400 {
        hub.publish("flood", &payload).await;
    }
    let _fast = tokio::time::timeout(crate::support::WAIT, reader)
        .await
        .unwrap()
        .unwrap();
    let status = hub.status().await;
    assert_eq!(status["slow_consumers_disconnected"], 1, "{status}");
    assert_eq!(status["channels"]["flood"]["subscribers"], 1, "{status}");
    drop(stalled);
}

#[tokio::test]
async fn cors_is_off_by_default_and_any_origin_when_enabled() {
    let hub = TestHub::spawn().await;
    let r = hub
        .http
        .get(hub.url("/healthz"))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let mut c = config();
    c.cors = herald::config::Cors::Any;
    let hub = TestHub::with(c).await;
    let r = hub
        .http
        .get(hub.url("/healthz"))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    let pre = hub
        .http
        .request(reqwest::Method::OPTIONS, hub.url("/channel/c"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type,authorization",
        )
        .send()
        .await
        .unwrap();
    assert!(pre.status().is_success(), "{}", pre.status());
    assert_eq!(pre.headers()["access-control-allow-origin"], "*");
    let allowed = pre.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        allowed.contains("content-type") && allowed.contains("authorization"),
        "{allowed}"
    );
}

#[tokio::test]
async fn an_sse_subscribe_after_another_request_on_a_kept_alive_connection_works() {
    use tokio::io::AsyncWriteExt;
    let hub = TestHub::spawn().await;
    let mut s = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut s, "\"ok\"").await;
    // Same connection, second request: served through hyper (chunked).
    s.write_all(b"GET /channel/kept HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let head = read_until(&mut s, "retry: 2000\n").await;
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    hub.publish("kept", "via hyper").await;
    read_until(&mut s, "data: via hyper\n\n").await;
}

#[tokio::test]
async fn a_first_request_sse_subscribe_is_chunked_and_leaves_promptly() {
    let hub = TestHub::spawn().await;
    let mut s = raw_get(
        hub.addr,
        "/channel/direct",
        "Origin: https://app.example\r\n",
    )
    .await;
    let head = read_until(&mut s, "retry: 2000\n")
        .await
        .to_ascii_lowercase();
    // Chunked, as behind hyper: clients that read fixed-size blocks get
    // each event at once (a close-delimited body made them wait).
    assert!(
        head.contains("connection: close") && head.contains("transfer-encoding: chunked"),
        "{head}"
    );
    assert!(
        !head.contains("access-control-allow-origin"),
        "CORS is off: {head}"
    );
    hub.publish("direct", "x").await;
    read_until(&mut s, "data: x\n\n").await;
    assert_eq!(hub.status().await["channels"]["direct"]["subscribers"], 1);
    drop(s);
    // No heartbeat needed: the closed socket is noticed at once.
    crate::support::eventually(|| async {
        hub.status().await["channels"]["direct"]["subscribers"] == 0
    })
    .await;
}

#[tokio::test]
async fn direct_sse_answers_carry_cors_headers_when_enabled() {
    let mut c = config();
    c.cors = herald::config::Cors::Origins(vec!["https://app.example".into()]);
    let hub = TestHub::with(c).await;
    let mut s = raw_get(hub.addr, "/channel/c", "Origin: https://app.example\r\n").await;
    let head = read_until(&mut s, "retry: 2000\n")
        .await
        .to_ascii_lowercase();
    assert!(
        head.contains("access-control-allow-origin: https://app.example"),
        "{head}"
    );
    assert!(
        head.contains("access-control-expose-headers: herald-client-id"),
        "{head}"
    );
    let mut other = raw_get(hub.addr, "/channel/c", "Origin: https://evil.example\r\n").await;
    let head = read_until(&mut other, "retry: 2000\n")
        .await
        .to_ascii_lowercase();
    assert!(!head.contains("access-control-allow-origin"), "{head}");
}

#[tokio::test]
async fn a_client_that_never_sends_a_request_is_dropped_at_shutdown() {
    let mut hub = TestHub::spawn().await;
    let _silent = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
    let started = std::time::Instant::now();
    hub.stop().await;
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Every idle stream rides the one shared ticker, the hyper path's too:
/// heartbeats fall on its ticks (multiples of --heartbeat since the start,
/// paused time), not on a timer counted from the stream's last write.
#[tokio::test(start_paused = true)]
async fn a_hyper_stream_heartbeats_on_the_shared_ticker() {
    use tokio::time::{Duration, Instant, sleep};
    let start = Instant::now();
    let beat = Duration::from_secs(2);
    let mut c = config();
    c.heartbeat = beat;
    let hub = TestHub::with(c).await;
    sleep(beat - Duration::from_millis(300)).await;
    let mut s = get_on(hub.addr, true, "/channel/beat", "").await;
    read_until(&mut s, "retry:").await;
    read_until(&mut s, ":").await;
    let at = start.elapsed().as_millis() % beat.as_millis();
    assert!(at < 100, "a heartbeat {at} ms after a tick");
}

/// Strips HTTP/1.1 chunk framing from what a raw socket read.
fn dechunk(raw: &str) -> String {
    let body = &raw[raw.find("\r\n\r\n").unwrap() + 4..];
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n + 2 {
            out.push_str(&after[..n.min(after.len())]);
            break;
        }
        out.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
    out
}

/// On both paths: the stream opens with `retry:` and heartbeats are comment
/// lines, none followed by a blank line (a blank line dispatches an empty
/// event in parsers such as fetch-event-source and httpx-sse), and a
/// heartbeat comes on every tick, busy or idle (paused time).
#[tokio::test(start_paused = true)]
async fn heartbeats_and_retry_dispatch_nothing_and_come_every_tick_on_both_paths() {
    use tokio::time::{Duration, sleep};
    let beat = Duration::from_secs(2);
    let mut c = config();
    c.heartbeat = beat;
    let hub = TestHub::with(c).await;
    for hyper in [false, true] {
        let mut s = get_on(hub.addr, hyper, "/channel/beats", "").await;
        let mut raw = read_until(&mut s, "retry: 2000\n").await;
        // Three ticks idle, then events between the next ticks.
        for _ in 0..3 {
            raw.push_str(&read_until(&mut s, ": ping\n").await);
        }
        for k in 0..3 {
            hub.publish("beats", &format!("busy {k}")).await;
            raw.push_str(&read_until(&mut s, &format!("data: busy {k}\n\n")).await);
            sleep(beat).await;
            raw.push_str(&read_until(&mut s, ": ping\n").await);
        }
        let body = dechunk(&raw);
        assert!(body.starts_with("retry: 2000\n"), "{body:?}");
        assert_eq!(
            body.matches(": ping\n").count(),
            6,
            "hyper={hyper}: {body:?}"
        );
        // Every blank line ends an event with data.
        for (at, _) in body.match_indices("\n\n") {
            let line = body[..at].rsplit('\n').next().unwrap_or_default();
            assert!(
                line.starts_with("data"),
                "hyper={hyper}: a blank line after {line:?} in {body:?}"
            );
        }
    }
}

/// `envelope=json` on a multi-channel stream: each event's data says its
/// channel (`{"channel":C,"data":D}`, D as published: JSON as JSON, text as
/// a string), `id:` and `event:` unchanged; a bad value is a 400.
#[tokio::test]
async fn the_json_envelope_names_the_channel_of_each_event() {
    let hub = TestHub::spawn().await;
    let mut sub = hub.sse("/events?stream=a&stream=b&envelope=json").await;
    let id = hub.publish("a", "line one\nline two").await;
    let (_, v) = hub
        .publish_json(
            "/channel/b",
            serde_json::json!({"data": {"n": 1}, "event": "named"}),
        )
        .await;
    let ev = sub.next().await;
    assert_eq!(
        (ev.id.as_str(), ev.event.as_str()),
        (id.as_str(), "message")
    );
    let data: serde_json::Value = serde_json::from_str(&ev.data).unwrap();
    assert_eq!(
        data,
        serde_json::json!({"channel": "a", "data": "line one\nline two"})
    );
    let ev = sub.next().await;
    assert_eq!(
        (ev.id.as_str(), ev.event.as_str()),
        (v["id"].as_str().unwrap(), "named")
    );
    let data: serde_json::Value = serde_json::from_str(&ev.data).unwrap();
    assert_eq!(data, serde_json::json!({"channel": "b", "data": {"n": 1}}));
    // The plain stream is unchanged.
    let mut plain = hub.sse("/events?stream=a&stream=b").await;
    hub.publish("a", "plain").await;
    assert_eq!(plain.next().await.data, "plain");
    let r = hub
        .http
        .get(hub.url("/events?stream=a&envelope=xml"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("envelope=json"));
}
