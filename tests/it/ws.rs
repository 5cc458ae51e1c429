//! WebSocket subscribe: frames, client messages, resume, close codes, pings.

use std::time::Duration;

use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{TestHub, config};

#[tokio::test]
async fn subscribed_then_events_with_json_data_kept_as_json() {
    let hub = TestHub::spawn().await;
    let mut ws = hub.ws("?channel=a&channel=b").await;
    let id = hub.publish("a", "text").await;
    assert_eq!(
        ws.next_json().await,
        json!({"type": "event", "channel": "a", "id": id, "event": "message", "data": "text"})
    );
    let (_, v) = hub
        .publish_json("/channel/b", json!({"data": {"n": [1, 2]}, "event": "e"}))
        .await;
    assert_eq!(
        ws.next_json().await,
        json!({"type": "event", "channel": "b", "id": v["id"], "event": "e", "data": {"n": [1, 2]}})
    );
}

#[tokio::test]
async fn clients_subscribe_and_unsubscribe_by_message() {
    let hub = TestHub::spawn().await;
    let mut ws = hub.ws("").await;
    ws.send_json(json!({"type": "subscribe", "channel": "x"}))
        .await;
    assert_eq!(
        ws.next_json().await,
        json!({"type": "subscribed", "channel": "x"})
    );
    hub.publish("x", "1").await;
    assert_eq!(ws.next_json().await["data"], "1");
    ws.send_json(json!({"type": "unsubscribe", "channel": "x"}))
        .await;
    assert_eq!(
        ws.next_json().await,
        json!({"type": "unsubscribed", "channel": "x"})
    );
    hub.publish("x", "2").await;
    ws.send_json(json!({"type": "subscribe", "channel": "y"}))
        .await;
    assert_eq!(
        ws.next_json().await,
        json!({"type": "subscribed", "channel": "y"})
    );
    hub.publish("y", "3").await;
    assert_eq!(
        ws.next_json().await["data"],
        "3",
        "nothing from x after unsubscribing"
    );
}

#[tokio::test]
async fn malformed_messages_get_an_error_frame_and_the_connection_stays_open() {
    let hub = TestHub::spawn().await;
    let mut ws = hub.ws("?channel=a").await;
    for bad in [
        "not json".to_owned(),
        json!({"type": "dance"}).to_string(),
        json!({"type": "subscribe"}).to_string(),
        json!({"type": "subscribe", "channel": "bad name"}).to_string(),
        json!({"type": "subscribe", "channel": "a"}).to_string(),
        json!({"type": "unsubscribe", "channel": "never"}).to_string(),
        json!({"type": "subscribe", "channel": "b", "extra": 1}).to_string(),
    ] {
        ws.socket.send(Message::text(bad.clone())).await.unwrap();
        let v = ws.next_json().await;
        assert_eq!(v["type"], "error", "{bad}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{bad}");
    }
    hub.publish("a", "still here").await;
    assert_eq!(ws.next_json().await["data"], "still here");
}

#[tokio::test]
async fn binary_frames_close_with_1003() {
    let hub = TestHub::spawn().await;
    let mut ws = hub.ws("?channel=a").await;
    ws.socket
        .send(Message::binary(vec![1, 2, 3]))
        .await
        .unwrap();
    assert_eq!(ws.close_code().await, 1003);
}

#[tokio::test]
async fn oversize_frames_close_with_1009() {
    let hub = TestHub::spawn().await;
    let mut ws = hub.ws("?channel=a").await;
    ws.socket
        .send(Message::text("x".repeat(100 * 1024)))
        .await
        .unwrap();
    assert_eq!(ws.close_code().await, 1009);
}

#[tokio::test]
async fn last_event_id_resumes_over_websocket_and_unknown_ids_reset() {
    let hub = TestHub::spawn().await;
    let first = hub.publish("a", "1").await;
    hub.publish("a", "2").await;
    let mut ws = hub.ws(&format!("?channel=a&lastEventId={first}")).await;
    assert_eq!(ws.next_json().await["data"], "2");
    ws.send_json(json!({"type": "subscribe", "channel": "b", "lastEventId": "nonsense"}))
        .await;
    assert_eq!(
        ws.next_json().await,
        json!({"type": "subscribed", "channel": "b"})
    );
    let reset = ws.next_json().await;
    assert_eq!(reset["type"], "reset");
    assert_eq!(reset["channel"], "b");
    assert!(reset["reason"].is_string());
}

#[tokio::test]
async fn bad_upgrade_requests_are_refused_before_the_upgrade() {
    let hub = TestHub::spawn().await;
    let r = hub.http.get(hub.url("/ws?channel=a")).send().await.unwrap();
    assert!(r.status().is_client_error(), "{}", r.status());
    assert!(r.json::<serde_json::Value>().await.unwrap()["error"].is_string());
    let err = tokio_tungstenite::connect_async(format!("ws://{}/ws?channel=bad%20name", hub.addr))
        .await
        .unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 400),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_closed() {
    let mut c = config();
    c.heartbeat = Duration::from_millis(50);
    let hub = TestHub::with(c).await;
    let ws = hub.ws("?channel=a").await;
    // Not reading means not answering pings: the hub must let go.
    crate::support::eventually(|| async { hub.status().await["connections"] == 0 }).await;
    drop(ws);
}

#[tokio::test]
async fn a_reading_peer_is_pinged_and_stays_connected() {
    let mut c = config();
    c.heartbeat = Duration::from_millis(50);
    let hub = TestHub::with(c).await;
    let mut ws = hub.ws("?channel=a").await;
    let mut pings = 0;
    while pings < 4 {
        match tokio::time::timeout(
            crate::support::WAIT,
            futures_util::StreamExt::next(&mut ws.socket),
        )
        .await
        .unwrap()
        {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("{other:?}"),
        }
    }
    hub.publish("a", "alive").await;
    assert_eq!(ws.next_json().await["data"], "alive");
}

#[tokio::test]
async fn an_upgrade_after_another_request_on_a_kept_alive_connection_uses_the_same_protocol() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hub = TestHub::spawn().await;
    let mut s = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // Read exactly the first response (its body is the JSON status).
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("\"ok\"}") {
        let mut b = [0u8; 256];
        let n = s.read(&mut b).await.unwrap();
        assert!(n > 0);
        got.extend_from_slice(&b[..n]);
    }
    let url = format!("ws://{}/ws?channel=kept", hub.addr);
    let s = tokio_tungstenite::MaybeTlsStream::Plain(s);
    let (socket, _) = tokio_tungstenite::client_async(url, s).await.unwrap();
    let mut ws = crate::support::Ws { socket };
    assert_eq!(
        ws.next_json().await,
        json!({"type": "subscribed", "channel": "kept"})
    );
    hub.publish("kept", "through hyper").await;
    assert_eq!(ws.next_json().await["data"], "through hyper");
    ws.socket.send(Message::binary(vec![1])).await.unwrap();
    assert_eq!(ws.close_code().await, 1003);
}

/// Pings leave a client one whole heartbeat to answer, on the direct and
/// the hyper path: the first ping comes with the first tick after the
/// connection (not at once), a client that answers every ping 1.5 s late
/// (heartbeat 2 s) is never closed, and one that never answers is closed
/// only after more than a heartbeat. Paused time: ticks and delays are
/// exact.
#[tokio::test(start_paused = true)]
async fn pings_leave_a_whole_heartbeat_to_answer_on_every_path() {
    use crate::support::RawWs;
    use tokio::time::{Instant, sleep};
    let beat = Duration::from_secs(2);
    let mut c = config();
    c.heartbeat = beat;
    let hub = TestHub::with(c).await;
    // Each path after ticks happened (the first round connects before any).
    for hyper in [false, true, false] {
        // Connect just before a tick: a ping sent on connect would be
        // followed by the tick 0.1 s later.
        sleep(beat - Duration::from_millis(100)).await;
        let mut slow = RawWs::connect(hub.addr, hyper, "/ws?channel=p").await;
        let mut silent = RawWs::connect(hub.addr, hyper, "/ws?channel=p").await;
        let connected = Instant::now();
        assert_eq!(slow.frame().await.unwrap().opcode, 1, "subscribed");
        assert_eq!(silent.frame().await.unwrap().opcode, 1, "subscribed");
        let mut pings = 0;
        while pings < 6 {
            let f = slow.frame().await.expect("still open");
            assert_eq!(f.opcode, 9, "hyper={hyper}: {f:?}");
            pings += 1;
            sleep(Duration::from_millis(1500)).await;
            slow.send(0x8a, &f.payload).await;
        }
        let ping = silent.frame().await.unwrap();
        assert_eq!(ping.opcode, 9);
        let close = silent.frame().await.unwrap();
        assert_eq!(close.close_code(), Some(1001), "hyper={hyper}: {close:?}");
        assert!(
            connected.elapsed() > beat,
            "hyper={hyper}: closed {:?} after connecting",
            connected.elapsed()
        );
    }
}

/// RFC 6455 details on both paths (direct, and hyper after a kept-alive
/// request): close frames are validated and a valid code is echoed; a
/// wrong version is 426 with the version herald speaks; a key must be 16
/// bytes in base64; a 64-bit length with its top bit set is a protocol
/// error; invalid UTF-8 fails on the first fragment that proves it.
#[tokio::test]
async fn websocket_conformance_details_hold_on_both_paths() {
    use crate::support::RawWs;
    let hub = TestHub::spawn().await;
    for hyper in [false, true] {
        let path = if hyper { "hyper" } else { "direct" };
        let closes: [(&[u8], u16); 11] = [
            (&[0x03], 1002),
            (&999u16.to_be_bytes(), 1002),
            (&1004u16.to_be_bytes(), 1002),
            (&1005u16.to_be_bytes(), 1002),
            (&1006u16.to_be_bytes(), 1002),
            (&1015u16.to_be_bytes(), 1002),
            (&2000u16.to_be_bytes(), 1002),
            (&[0x03, 0xe8, 0xff, 0xfe], 1007),
            (&1000u16.to_be_bytes(), 1000),
            (&3001u16.to_be_bytes(), 3001),
            (&4999u16.to_be_bytes(), 4999),
        ];
        for (payload, want) in closes {
            let mut ws = RawWs::connect(hub.addr, hyper, "/ws").await;
            ws.send(0x88, payload).await;
            let f = ws.frame_not_ping().await.expect("a close frame");
            assert_eq!(f.close_code(), Some(want), "{path}: close {payload:?}");
        }
        // An empty close is answered with a close too.
        let mut ws = RawWs::connect(hub.addr, hyper, "/ws").await;
        ws.send(0x88, b"").await;
        assert_eq!(
            ws.frame_not_ping().await.map(|f| f.opcode),
            Some(8),
            "{path}"
        );

        let bad_version = "!Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
        let head = RawWs::try_connect(hub.addr, hyper, "/ws", bad_version)
            .await
            .err()
            .expect("refused");
        assert!(head.starts_with("HTTP/1.1 426"), "{path}: {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("sec-websocket-version: 13"),
            "{path}: {head}"
        );
        for key in [
            "c2hvcnQ=",
            "not base64 at all!!!!!==",
            "dGhlIHNhbXBsZSBub25jZQ",
        ] {
            let headers = format!(
                "!Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
            );
            let head = RawWs::try_connect(hub.addr, hyper, "/ws", &headers)
                .await
                .err()
                .expect("refused");
            assert!(head.starts_with("HTTP/1.1 400"), "{path} key {key}: {head}");
            assert!(head.contains("Sec-WebSocket-Key"), "{path}: {head}");
        }

        let mut ws = RawWs::connect(hub.addr, hyper, "/ws").await;
        let mut huge = vec![0x81, 0x80 | 127];
        huge.extend_from_slice(&(1u64 << 63 | 5).to_be_bytes());
        huge.extend_from_slice(&[1, 2, 3, 4]);
        ws.send_raw(&huge).await;
        let f = ws.frame_not_ping().await.expect("a close frame");
        assert_eq!(f.close_code(), Some(1002), "{path}: 64-bit length");

        // The first fragment already holds a byte that is never UTF-8.
        let mut ws = RawWs::connect(hub.addr, hyper, "/ws").await;
        ws.send(0x01, b"ok so far \xff").await;
        let f = ws.frame_not_ping().await.expect("a close frame");
        assert_eq!(f.close_code(), Some(1007), "{path}: invalid UTF-8 fragment");
    }
}
