//! Publishing: the bad-input table, idempotency, targets, authorization.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use herald::http::Peer;
use serde_json::json;
use tower::ServiceExt;

use crate::support::{TestHub, config};

#[tokio::test]
async fn publish_answers_202_with_the_event_id() {
    let hub = TestHub::spawn().await;
    let (st, body) = hub.publish_json("/channel/c", json!({"data": "x"})).await;
    assert_eq!(st, 202);
    assert_eq!(body["id"].as_str().unwrap().len(), 16);
    assert!(body.get("duplicate").is_none());
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_nothing_is_published() {
    let hub = TestHub::spawn().await;
    let big = "x".repeat(64 * 1024 + 1);
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        (
            "/channel/a%20b",
            "text/plain",
            b"x".to_vec(),
            400,
            "invalid channel name",
        ),
        (
            "/channel/c",
            "text/plain",
            b"".to_vec(),
            400,
            "you cannot send the empty string as a message",
        ),
        (
            "/channel/c",
            "application/json",
            br#"{"data": ""}"#.to_vec(),
            400,
            "you cannot send the empty string as a message",
        ),
        (
            "/channel/c",
            "application/json",
            br#"{"data": null}"#.to_vec(),
            400,
            "data must not be null",
        ),
        (
            "/channel/c",
            "application/json",
            br#"{"event": "x"}"#.to_vec(),
            400,
            "missing field `data`",
        ),
        (
            "/channel/c",
            "application/json",
            br#"{"data": 1, "colour": "red"}"#.to_vec(),
            400,
            "unknown field `colour`",
        ),
        (
            "/channel/c",
            "application/json",
            br#"{"data": 1,"#.to_vec(),
            400,
            "invalid JSON body: EOF",
        ),
        (
            "/channel/c",
            "application/json",
            br#"{"data": 1, "event": "herald.reset"}"#.to_vec(),
            400,
            "invalid event name",
        ),
        (
            "/channel/c",
            "application/json",
            br#"{"data": 1, "event": "a\nb"}"#.to_vec(),
            400,
            "invalid event name",
        ),
        (
            "/channel/c",
            "application/json",
            br#"{"data": 1, "event": ""}"#.to_vec(),
            400,
            "invalid event name",
        ),
        (
            "/channel/c",
            "application/json",
            br#"{"data": 1, "retain": "yes"}"#.to_vec(),
            400,
            "invalid type",
        ),
        (
            "/channel/c?event=herald.x",
            "text/plain",
            b"x".to_vec(),
            400,
            "invalid event name",
        ),
        (
            "/channel/c?retain=maybe",
            "text/plain",
            b"x".to_vec(),
            400,
            "expected true or false (or 1 or 0)",
        ),
        (
            "/channel/c?retain=",
            "text/plain",
            b"x".to_vec(),
            400,
            "retain",
        ),
        (
            "/channel/c?retain=yes",
            "text/plain",
            b"x".to_vec(),
            400,
            "retain",
        ),
        (
            "/channel/c?colour=red",
            "text/plain",
            b"x".to_vec(),
            400,
            "unknown query parameter \"colour\"",
        ),
        (
            "/channel/c",
            "text/plain",
            vec![0xff, 0xfe, 0x41],
            400,
            "not valid UTF-8",
        ),
        (
            "/channel/c",
            "text/plain",
            big.clone().into_bytes(),
            413,
            "--max-message-bytes",
        ),
        (
            "/channel/c/client/nobody",
            "text/plain",
            b"x".to_vec(),
            404,
            "not connected",
        ),
        (
            "/channel/c/client/bad:id",
            "text/plain",
            b"x".to_vec(),
            400,
            "invalid client id",
        ),
    ];
    for (path, ctype, body, status, msg) in cases {
        let resp = hub
            .http
            .post(hub.url(path))
            .header("content-type", ctype)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status, "{path} {ctype}");
        assert!(
            resp.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json")
        );
        let v: serde_json::Value = resp.json().await.unwrap();
        let err = v["error"].as_str().unwrap_or_else(|| panic!("{v}"));
        assert!(err.contains(msg), "{path}: {err:?} lacks {msg:?}");
    }
    // A body over the limit without a Content-Length (chunked) is refused too.
    let stream =
        futures_util::stream::iter((0..65).map(|_| Ok::<_, std::io::Error>(vec![b'x'; 1024])));
    let resp = hub
        .http
        .post(hub.url("/channel/c"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(hub.status().await["events_published"], 0);
}

#[tokio::test]
async fn json_content_type_with_parameters_is_json() {
    let hub = TestHub::spawn().await;
    let mut sub = hub.sse("/channel/c").await;
    let r = hub
        .http
        .post(hub.url("/channel/c"))
        .header("content-type", "Application/JSON; charset=utf-8")
        .body(r#"{"data": {"k": true}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(sub.next_data().await, r#"{"k":true}"#);
}

#[tokio::test]
async fn an_idempotency_key_is_acknowledged_with_the_first_id_and_delivered_once() {
    let hub = TestHub::spawn().await;
    let mut sub = hub.sse("/channel/c").await;
    let (_, first) = hub
        .publish_json("/channel/c", json!({"data": "once", "id": "order-1"}))
        .await;
    let (st, again) = hub
        .publish_json("/channel/c", json!({"data": "once", "id": "order-1"}))
        .await;
    assert_eq!(st, 202);
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["duplicate"], true);
    hub.publish("c", "next").await;
    assert_eq!(sub.next_data().await, "once");
    assert_eq!(sub.next_data().await, "next");
}

#[tokio::test]
async fn a_targeted_publish_reaches_only_that_client() {
    let hub = TestHub::spawn().await;
    let mut me = hub.sse("/channel/c/client/me").await;
    let mut other = hub.sse("/channel/c").await;
    let r = hub
        .http
        .post(hub.url("/channel/c/client/me"))
        .body("for you")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    hub.publish("c", "for all").await;
    assert_eq!(me.next_data().await, "for you");
    assert_eq!(me.next_data().await, "for all");
    assert_eq!(other.next_data().await, "for all");
    let (st, v) = hub
        .publish_json("/channel/c/client/me", json!({"data": 1, "retain": true}))
        .await;
    assert_eq!(st, 400, "{v}");
}

#[tokio::test]
async fn publishing_to_all_reaches_every_channel_with_subscribers() {
    let hub = TestHub::spawn().await;
    let mut a = hub.sse("/channel/a").await;
    let mut b = hub.sse("/events?stream=b").await;
    let r = hub
        .http
        .post(hub.url("/channel"))
        .body("everyone")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["channels"], 2);
    assert_ne!(v["ids"]["a"], v["ids"]["b"]);
    assert_eq!(a.next_data().await, "everyone");
    assert_eq!(b.next_data().await, "everyone");
}

#[tokio::test]
async fn a_publish_token_is_required_when_set() {
    let mut c = config();
    c.publish_token = Some(herald::config::Secret::new("s3cret"));
    let hub = TestHub::with(c).await;
    for auth in [None, Some("Bearer wrong"), Some("s3cret")] {
        let mut req = hub.http.post(hub.url("/channel/c")).body("x");
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401, "{auth:?}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let v: serde_json::Value = r.json().await.unwrap();
        assert!(v["error"].as_str().unwrap().contains("token"));
    }
    let r = hub
        .http
        .post(hub.url("/channel/c"))
        .bearer_auth("s3cret")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
}

fn state(config: herald::config::Config) -> herald::http::State {
    herald::http::State::new(config)
}

async fn publish_from(
    config: herald::config::Config,
    peer: &str,
    token: Option<&str>,
) -> (u16, String) {
    let addr: SocketAddr = peer.parse().unwrap();
    let mut req = Request::post("/channel/c").body(Body::from("x")).unwrap();
    req.extensions_mut().insert(ConnectInfo(Peer(addr)));
    if let Some(t) = token {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let resp = herald::http::router(state(config))
        .oneshot(req)
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn without_a_token_only_loopback_may_publish_unless_anonymous_is_allowed() {
    assert_eq!(publish_from(config(), "127.0.0.1:5000", None).await.0, 202);
    assert_eq!(publish_from(config(), "127.9.9.9:5000", None).await.0, 202);
    assert_eq!(publish_from(config(), "[::1]:5000", None).await.0, 202);
    let (st, body) = publish_from(config(), "10.1.2.3:5000", None).await;
    assert_eq!(st, 403);
    assert!(
        body.contains("--publish-token") && body.contains("--allow-anonymous-publish"),
        "{body}"
    );
    let (st, _) = publish_from(config(), "[::ffff:10.1.2.3]:5000", None).await;
    assert_eq!(st, 403);
    let mut open = config();
    open.allow_anonymous_publish = true;
    assert_eq!(publish_from(open, "10.1.2.3:5000", None).await.0, 202);
    let mut with_token = config();
    with_token.publish_token = Some(herald::config::Secret::new("t"));
    assert_eq!(
        publish_from(with_token.clone(), "10.1.2.3:5000", Some("t"))
            .await
            .0,
        202
    );
    assert_eq!(
        publish_from(with_token, "127.0.0.1:5000", None).await.0,
        401
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let hub = TestHub::spawn().await;
    let r = hub.http.get(hub.url("/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.json::<serde_json::Value>().await.unwrap()["error"].is_string());
    let r = hub.http.delete(hub.url("/channel/c")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert!(r.json::<serde_json::Value>().await.unwrap()["error"].is_string());
}
