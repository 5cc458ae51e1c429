//! WebSocket subscriptions served straight on the socket.
//!
//! Server-to-client frames are unmasked, so an event's frame is encoded once
//! (`Event::ws_frame`) and the same bytes are written to every subscriber,
//! as for SSE. Behind hyper and tungstenite each subscriber's frame was
//! copied into a per-connection write buffer and flushed through a `Sink`
//! (see `bench/results/2026-11-22/profile-herald-ws-fanout.txt`). When the
//! first request on a connection is a valid upgrade to `/ws`, the server
//! answers it here; anything else (bad channels, unknown parameters,
//! conflicts, draining) goes to hyper and `http::ws`, which answer with the
//! same protocol and errors.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::direct::{get_request, write};
use super::ws::{self, CLOSE_SLOW, Registered, handle, subscribed_json};
use super::{State as AppState, channel_list, join, query_pairs, sse};
use crate::config::MAX_WS_CLIENT_MESSAGE_BYTES;
use crate::hub::{
    Batch, ChannelName, Item, Resume, Subscription, opcode, ws_server_frame, ws_text_frame,
};

#[cfg(test)]
use super::ws_codec::masked_frame;
use super::ws_codec::{Decoder, Fail, Frame, Message, code};

/// A parsed upgrade request that this path serves.
pub(super) struct Upgrade {
    key: String,
    channels: Vec<ChannelName>,
    resume: Resume,
}

/// Reads a WebSocket upgrade to `/ws` out of a request head; `None` for
/// anything else.
pub(super) fn parse(head: &[u8]) -> Option<Upgrade> {
    get_request(head, parse_upgrade)
}

fn parse_upgrade(
    path: &str,
    query: Option<&str>,
    headers: &[httparse::Header<'_>],
) -> Option<Upgrade> {
    if super::repeated(headers.iter().map(|h| h.name)).is_some() {
        return None; // hyper answers 400
    }
    let key = handshake(headers.iter().map(|h| (h.name, h.value))).ok()?;
    let last_event_id = headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("last-event-id"))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .map(|v| v.trim().to_owned());
    if headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("content-length")
            || h.name.eq_ignore_ascii_case("transfer-encoding")
    }) {
        return None;
    }
    if path != "/ws" {
        return None;
    }
    let pairs = query_pairs(query);
    if pairs
        .iter()
        .any(|(k, _)| k != "channel" && k != "lastEventId")
    {
        return None;
    }
    let channels = channel_list(
        pairs
            .iter()
            .filter(|(k, _)| k == "channel")
            .map(|(_, v)| v.as_str()),
    )
    .ok()?;
    Some(Upgrade {
        key,
        channels,
        resume: sse::resume(last_event_id, query),
    })
}

/// Registers the subscriber on its initial channels; `None` if the hub
/// refuses (hyper then answers with the error).
pub(super) fn register(state: &AppState, up: &Upgrade) -> Option<Registered> {
    ws::register(state, &up.channels, &up.resume).ok()
}

/// The 101 that accepts a client's `key`.
fn accept_head(key: &str) -> String {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
    )
}

/// Serves the WebSocket until either side closes, the subscriber falls too
/// far behind, it stops answering pings, or the hub shuts down.
pub(super) async fn serve(
    mut stream: TcpStream,
    state: AppState,
    up: Upgrade,
    session: Registered,
) {
    let _guard = state.hub.connection();
    let Registered {
        client,
        outbox,
        mut subs,
    } = session;
    let mut first = BytesMut::from(accept_head(&up.key).as_bytes());
    for c in &up.channels {
        first.extend_from_slice(&ws_text_frame(subscribed_json(c).to_string().as_bytes()));
    }
    drop(up);
    let write_timeout = state.config.write_timeout;
    if write(&mut stream, first.freeze(), write_timeout)
        .await
        .is_err()
    {
        return;
    }
    let mut ticks = state.ticker();
    let mut decoder = Decoder::new(MAX_WS_CLIENT_MESSAGE_BYTES);
    let mut heard_since_ping = true;
    let end = loop {
        let out = tokio::select! {
            biased;
            () = state.shutdown.cancelled() => break Some((code::RESTART, "herald is restarting; reconnect")),
            batch = outbox.next_batch() => match batch {
                Batch::Closed(_) => break Some((CLOSE_SLOW, "slow consumer: too far behind")),
                Batch::Items(items) => encode(items, &subs),
            },
            r = ticks.changed() => {
                if r.is_err() {
                    break None;
                }
                if !std::mem::replace(&mut heard_since_ping, false) {
                    break Some((code::AWAY, "no answer to ping"));
                }
                ws_server_frame(opcode::PING, b"")
            }
            r = stream.readable() => {
                if r.is_err() {
                    break None;
                }
                match read(&stream, &mut decoder) {
                    Read::Closed => break None,
                    Read::Nothing => continue,
                    Read::Frames(frames) => {
                        heard_since_ping = true;
                        let mut out = BytesMut::new();
                        let end = answer(frames, &mut out, |message, out| match message {
                            Message::Text(text) => {
                                for reply in handle(&state, &client, &outbox, &mut subs, &text) {
                                    out.extend_from_slice(&ws_text_frame(reply.to_string().as_bytes()));
                                }
                                None
                            }
                            Message::Binary(_) => {
                                Some((code::UNSUPPORTED, "binary frames are not supported"))
                            }
                        });
                        if !out.is_empty() && write(&mut stream, out.freeze(), write_timeout).await.is_err() {
                            break None;
                        }
                        if end.is_some() {
                            break end;
                        }
                        continue;
                    }
                }
            }
        };
        if write(&mut stream, out, write_timeout).await.is_err() {
            break None;
        }
    };
    if let Some((code, reason)) = end {
        close(&mut stream, code, reason, write_timeout).await;
    }
}

/// Answers decoded frames: pongs for pings (into `out`), messages to
/// `on_message` (which writes its replies into `out` and may end the
/// connection). Returns the close to send once the connection ends: the
/// client's own close echoed (its code), or the protocol failure found.
/// Shared by `/ws` and the conformance echo server.
fn answer(
    frames: Vec<Result<Frame, Fail>>,
    out: &mut BytesMut,
    mut on_message: impl FnMut(Message, &mut BytesMut) -> Option<Fail>,
) -> Option<Fail> {
    for f in frames {
        match f {
            Ok(Frame::Message(m)) => {
                if let Some(end) = on_message(m, out) {
                    return Some(end);
                }
            }
            Ok(Frame::Ping(payload)) => {
                out.extend_from_slice(&ws_server_frame(opcode::PONG, &payload))
            }
            Ok(Frame::Pong) => {}
            Ok(Frame::Close(code)) => return Some((code, "")),
            Err(fail) => return Some(fail),
        }
    }
    None
}

/// Sends a close frame, then lingers for the client's.
async fn close(
    stream: &mut TcpStream,
    code: u16,
    reason: &str,
    write_timeout: std::time::Duration,
) {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason.as_bytes());
    if write(
        stream,
        ws_server_frame(opcode::CLOSE, &payload),
        write_timeout,
    )
    .await
    .is_ok()
    {
        // Boxed: its buffer would otherwise enlarge every idle socket's task.
        Box::pin(linger(stream)).await;
    }
}

/// How long a closing socket is drained for the client's close.
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);
/// Most bytes drained from a closing socket.
const LINGER_BYTES: usize = 1 << 20;

/// Shuts down our side and reads what the client still sends until it
/// closes too (bounded in time and bytes). Closing a socket with unread
/// bytes makes the kernel send a reset, which can destroy the close frame
/// before the client reads it (seen in about 2 runs of 120 for 1009).
pub(super) async fn linger(stream: &mut TcpStream) {
    use tokio::io::AsyncReadExt;
    let _ = stream.shutdown().await;
    let drain = async {
        let mut scratch = [0u8; 512];
        let mut seen = 0;
        while seen < LINGER_BYTES {
            match stream.read(&mut scratch).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// The frames for a batch: events of subscribed channels (their shared
/// frames) and resets.
fn encode(
    items: std::collections::VecDeque<Item>,
    subs: &HashMap<ChannelName, Subscription>,
) -> Bytes {
    join(items.into_iter().filter_map(|item| match item {
        Item::Event(e) => subs.contains_key(&e.channel).then(|| e.ws_frame().clone()),
        Item::Reset(r) => Some(ws_text_frame(&r.ws())),
    }))
}

enum Read {
    Closed,
    Nothing,
    Frames(Vec<Result<Frame, Fail>>),
}

/// Reads what the socket has without waiting and decodes whole frames.
fn read(stream: &TcpStream, decoder: &mut Decoder) -> Read {
    let mut scratch = [0u8; 512];
    let mut got = 0;
    // Bounded work per wake-up: a client that never stops sending must not
    // hold the task (and the thread).
    let budget = decoder.limit.clamp(MAX_WS_CLIENT_MESSAGE_BYTES, 1 << 20);
    loop {
        match stream.try_read(&mut scratch) {
            Ok(0) => return Read::Closed,
            Ok(n) => {
                got += n;
                decoder.buf.extend_from_slice(&scratch[..n]);
                if got >= budget {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(_) => return Read::Closed,
        }
    }
    if got == 0 {
        return Read::Nothing;
    }
    let mut frames = vec![];
    loop {
        match decoder.next() {
            Ok(Some(f)) => frames.push(Ok(f)),
            Ok(None) => break,
            Err(fail) => {
                frames.push(Err(fail));
                break;
            }
        }
    }
    decoder.release();
    Read::Frames(frames)
}

/// Why an upgrade request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// Not a WebSocket upgrade at all.
    NotUpgrade,
    /// `Sec-WebSocket-Version` is not 13: 426 with the version herald speaks.
    Version,
    /// `Sec-WebSocket-Key` is not 16 bytes in base64.
    Key,
}

impl Refusal {
    /// The status and message to answer with.
    pub(super) fn answer(self) -> (u16, &'static str) {
        match self {
            Self::NotUpgrade => (400, "a WebSocket upgrade is required"),
            Self::Version => (
                426,
                "herald speaks WebSocket version 13 (Sec-WebSocket-Version: 13)",
            ),
            Self::Key => (400, "Sec-WebSocket-Key must be 16 bytes in base64"),
        }
    }
}

/// Checks the handshake headers of an upgrade (RFC 6455 section 4.2.1);
/// the client's key. Shared by the direct path, hyper's and the echo
/// server.
pub(super) fn handshake<'a>(
    headers: impl Iterator<Item = (&'a str, &'a [u8])>,
) -> Result<String, Refusal> {
    use base64::Engine as _;
    let (mut upgrade, mut connection, mut version, mut key) = (false, false, None, None);
    for (name, value) in headers {
        let value = std::str::from_utf8(value)
            .map_err(|_| Refusal::NotUpgrade)?
            .trim();
        match name.to_ascii_lowercase().as_str() {
            "upgrade" => upgrade |= value.eq_ignore_ascii_case("websocket"),
            "connection" => {
                connection |= value
                    .split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            }
            "sec-websocket-version" => version = Some(value == "13"),
            "sec-websocket-key" => key = Some(value.to_owned()),
            _ => {}
        }
    }
    if !(upgrade && connection) {
        return Err(Refusal::NotUpgrade);
    }
    if version != Some(true) {
        return Err(Refusal::Version);
    }
    let key = key.ok_or(Refusal::Key)?;
    match base64::engine::general_purpose::STANDARD.decode(&key) {
        Ok(k) if k.len() == 16 => Ok(key),
        _ => Err(Refusal::Key),
    }
}

/// Serves one connection of the conformance echo server
/// (`examples/ws_echo.rs`): the handshake, decoder, UTF-8 checks, close
/// handling and writer of `/ws`, echoing every message (text and binary,
/// up to `max_message` bytes) instead of reading subscribe requests.
pub(super) async fn echo(mut stream: TcpStream, max_message: usize) {
    use tokio::io::AsyncReadExt;
    let timeout = std::time::Duration::from_secs(10);
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(timeout, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 && head.len() + n <= 16 * 1024 => {
                head.extend_from_slice(&chunk[..n])
            }
            _ => return,
        }
    }
    let key = get_request(&head, |_, _, headers| {
        Some(handshake(headers.iter().map(|h| (h.name, h.value))))
    })
    .unwrap_or(Err(Refusal::NotUpgrade));
    let key = match key {
        Ok(key) => key,
        Err(r) => {
            let (status, msg) = r.answer();
            let _ = write(
                &mut stream,
                Bytes::from(format!("HTTP/1.1 {status} Refused\r\nsec-websocket-version: 13\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{msg}", msg.len())),
                timeout,
            )
            .await;
            return;
        }
    };
    if write(&mut stream, Bytes::from(accept_head(&key)), timeout)
        .await
        .is_err()
    {
        return;
    }
    let mut decoder = Decoder::new(max_message);
    let end = loop {
        if stream.readable().await.is_err() {
            break None;
        }
        let frames = match read(&stream, &mut decoder) {
            Read::Closed => break None,
            Read::Nothing => continue,
            Read::Frames(frames) => frames,
        };
        let mut out = BytesMut::new();
        let end = answer(frames, &mut out, |message, out| {
            out.extend_from_slice(&match message {
                Message::Text(t) => ws_text_frame(t.as_bytes()),
                Message::Binary(b) => ws_server_frame(opcode::BINARY, &b),
            });
            None
        });
        if !out.is_empty() && write(&mut stream, out.freeze(), timeout).await.is_err() {
            break None;
        }
        if end.is_some() {
            break end;
        }
    };
    if let Some((code, reason)) = end {
        close(&mut stream, code, reason, timeout).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        masked_frame(first, payload, [1, 2, 3, 4])
    }

    fn decode(bytes: &[u8]) -> Vec<Result<Frame, Fail>> {
        let mut d = Decoder::new(MAX_WS_CLIENT_MESSAGE_BYTES);
        let mut out = vec![];
        for &b in bytes {
            d.buf.push(b); // byte by byte: every split point
            loop {
                match d.next() {
                    Ok(Some(f)) => out.push(Ok(f)),
                    Ok(None) => break,
                    Err(e) => {
                        out.push(Err(e));
                        return out;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn decodes_masked_text_control_and_fragmented_frames() {
        let mut bytes = client_frame(0x81, b"{\"type\":\"subscribe\"}");
        bytes.extend(client_frame(0x89, b"p"));
        bytes.extend(client_frame(0x01, b"hel"));
        bytes.extend(client_frame(0x8A, b""));
        bytes.extend(client_frame(0x80, b"lo"));
        bytes.extend(client_frame(0x88, &1000u16.to_be_bytes()));
        assert_eq!(
            decode(&bytes),
            vec![
                Ok(Frame::Message(Message::Text(
                    "{\"type\":\"subscribe\"}".into()
                ))),
                Ok(Frame::Ping(b"p".to_vec())),
                Ok(Frame::Pong),
                Ok(Frame::Message(Message::Text("hello".into()))),
                Ok(Frame::Close(1000)),
            ]
        );
    }

    #[test]
    fn refuses_what_the_protocol_or_the_limits_forbid() {
        let close = |b: &[u8]| decode(b).pop().unwrap().unwrap_err().0;
        assert_eq!(
            decode(&client_frame(0x82, b"bin")),
            [Ok(Frame::Message(Message::Binary(b"bin".to_vec())))],
            "binary is a message (/ws refuses it with 1003)"
        );
        // Close frames: the code is checked, the reason must be UTF-8.
        assert_eq!(close(&client_frame(0x88, &[3])), code::PROTOCOL);
        for bad in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            assert_eq!(
                close(&client_frame(0x88, &bad.to_be_bytes())),
                code::PROTOCOL,
                "{bad}"
            );
        }
        assert_eq!(close(&client_frame(0x88, &[3, 232, 0xff])), code::INVALID);
        for good in [1000u16, 1003, 1007, 1014, 3000, 4999] {
            assert_eq!(
                decode(&client_frame(0x88, &good.to_be_bytes())),
                [Ok(Frame::Close(good))]
            );
        }
        // A 64-bit length with its top bit set is malformed, not big.
        let mut huge = vec![0x81, 0xff];
        huge.extend_from_slice(&(1u64 << 63).to_be_bytes());
        huge.extend_from_slice(&[0; 4]);
        assert_eq!(close(&huge), code::PROTOCOL);
        // Invalid UTF-8 fails on the fragment that holds it; a sequence cut
        // between fragments is fine.
        assert_eq!(close(&client_frame(0x01, b"\xff")), code::INVALID);
        let mut cut = client_frame(0x01, &[0xe2, 0x82]);
        cut.extend(client_frame(0x80, &[0xac]));
        assert_eq!(
            decode(&cut),
            [Ok(Frame::Message(Message::Text("€".into())))]
        );
        let mut unfinished = client_frame(0x01, &[0xe2, 0x82]);
        unfinished.extend(client_frame(0x80, b""));
        assert_eq!(close(&unfinished), code::INVALID);
        assert_eq!(
            close(&client_frame(
                0x81,
                &vec![b'x'; MAX_WS_CLIENT_MESSAGE_BYTES + 1]
            )),
            code::SIZE
        );
        assert_eq!(close(&client_frame(0x81, &[0xff, 0xfe])), code::INVALID);
        assert_eq!(
            close(&client_frame(0x80, b"orphan continuation")),
            code::PROTOCOL
        );
        assert_eq!(
            close(&client_frame(0x09, b"fragmented ping")),
            code::PROTOCOL
        );
        assert_eq!(close(b"\x81\x02hi"), code::PROTOCOL, "unmasked");
        let mut two_halves = client_frame(0x01, &vec![b'x'; MAX_WS_CLIENT_MESSAGE_BYTES]);
        two_halves.extend(client_frame(0x80, b"x"));
        assert_eq!(close(&two_halves), code::SIZE);
    }

    #[test]
    fn parses_only_valid_upgrades_to_ws() {
        let up = |extra: &str, target: &str| {
            parse(format!("GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n").as_bytes())
        };
        let ok = up("", "/ws?channel=a&channel=b&lastEventId=0000000000000001").unwrap();
        assert_eq!(ok.channels.len(), 2);
        assert_eq!(ok.resume, Resume::After(crate::hub::EventId::from_u64(1)));
        assert!(up("", "/ws").is_some_and(|u| u.channels.is_empty()));
        assert!(up("", "/ws?channel=bad%20name").is_none());
        assert!(up("", "/ws?colour=red").is_none());
        assert!(up("", "/channel/a").is_none());
        assert!(
            parse(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n").is_none(),
            "not an upgrade"
        );
    }
}

#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::masked_frame;
    use super::*;

    proptest! {
        /// Arbitrary bytes from a client never panic the decoder, and
        /// nothing it returns breaks the limits.
        #[test]
        fn the_decoder_survives_any_input(input in prop::collection::vec(any::<u8>(), 0..4096), split in 0usize..4096) {
            let mut d = Decoder::new(MAX_WS_CLIENT_MESSAGE_BYTES);
            let split = split.min(input.len());
            for part in [&input[..split], &input[split..]] {
                d.buf.extend_from_slice(part);
                loop {
                    match d.next() {
                        Ok(Some(Frame::Message(Message::Text(t)))) => prop_assert!(t.len() <= MAX_WS_CLIENT_MESSAGE_BYTES),
                        Ok(Some(Frame::Ping(p))) => prop_assert!(p.len() <= 125),
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err((code, _)) => {
                            prop_assert!([code::PROTOCOL, code::UNSUPPORTED, code::INVALID, code::SIZE].contains(&code));
                            return Ok(());
                        }
                    }
                }
            }
        }

        /// Valid text messages, fragmented at random and masked with random
        /// keys, come out whole and in order.
        #[test]
        fn fragmented_messages_decode_exactly(
            messages in prop::collection::vec("[ -~]{0,300}", 1..6),
            cuts in prop::collection::vec(0usize..300, 6),
            mask in any::<[u8; 4]>(),
        ) {
            let mut wire = vec![];
            for (m, cut) in messages.iter().zip(&cuts) {
                let cut = (*cut).min(m.len());
                if cut == 0 {
                    wire.extend(masked_frame(0x81, m.as_bytes(), mask));
                } else {
                    wire.extend(masked_frame(0x01, &m.as_bytes()[..cut], mask));
                    wire.extend(masked_frame(0x89, b"ping", mask)); // control frames may interleave
                    wire.extend(masked_frame(0x80, &m.as_bytes()[cut..], mask));
                }
            }
            let mut d = Decoder::new(MAX_WS_CLIENT_MESSAGE_BYTES);
            d.buf = wire;
            let mut got = vec![];
            while let Some(f) = d.next().unwrap() {
                if let Frame::Message(Message::Text(t)) = f {
                    got.push(t);
                }
            }
            prop_assert_eq!(got, messages);
        }

        /// Arbitrary request heads never panic either direct path's parser.
        #[test]
        fn request_heads_never_panic(head in prop::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse(&head);
            let _ = super::super::direct::parse(&head);
        }

        /// Arbitrary text after a plausible prefix never panics them either.
        #[test]
        fn plausible_heads_never_panic(rest in "[ -~\r\n%?&=/]{0,400}") {
            for prefix in ["GET /ws?", "GET /channel/", "GET /events?stream=", "GET /"] {
                let head = format!("{prefix}{rest}\r\n\r\n");
                let _ = parse(head.as_bytes());
                let _ = super::super::direct::parse(head.as_bytes());
            }
        }
    }
}
