//! SSE subscriptions served straight on the socket.
//!
//! An idle SSE stream behind hyper keeps hyper's connection buffers (about
//! 20 KB per connection, measured with `herald bench --scenario idle`).
//! When the first request on a connection is a valid SSE subscribe, the
//! server answers it here instead: the response head is written directly,
//! the body is close-delimited (`Connection: close`, no chunk framing), and
//! the connection's state is just its outbox, subscriptions and socket.
//! Anything this path does not fully accept (other routes, bad names,
//! conflicts, draining) goes to hyper, which answers with the same handlers
//! and errors as ever.

use std::time::Duration;

use bytes::{Buf, Bytes};
use percent_encoding::percent_decode_str;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::sse::{self, Session};
use super::{State as AppState, channel_list, query_pairs};
use crate::config::Cors;
use crate::hub::{Batch, ChannelName, ClientId, Resume};

/// A parsed request head that this path serves.
pub(super) struct Subscribe {
    channels: Vec<ChannelName>,
    client: Option<ClientId>,
    resume: Resume,
    origin: Option<String>,
    format: sse::Format,
}

/// Parses a complete HTTP/1.1 `GET` head and hands its path, query and
/// headers to `f`; `None` for anything else. Both direct paths start here.
pub(super) fn get_request<T>(
    head: &[u8],
    f: impl FnOnce(&str, Option<&str>, &[httparse::Header<'_>]) -> Option<T>,
) -> Option<T> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
        return None;
    }
    if req.method != Some("GET") || req.version != Some(1) {
        return None;
    }
    let (path, query) = match req.path?.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (req.path?, None),
    };
    f(path, query, req.headers)
}

/// Reads an SSE subscribe out of a request head; `None` for anything else
/// (which hyper then serves, errors included).
pub(super) fn parse(head: &[u8]) -> Option<Subscribe> {
    get_request(head, parse_subscribe)
}

fn parse_subscribe(
    path: &str,
    query: Option<&str>,
    headers: &[httparse::Header<'_>],
) -> Option<Subscribe> {
    if super::repeated(headers.iter().map(|h| h.name)).is_some() {
        return None; // hyper answers 400
    }
    let mut last_event_id = None;
    let mut origin = None;
    for h in headers {
        let name = h.name.to_ascii_lowercase();
        match name.as_str() {
            "last-event-id" => last_event_id = Some(String::from_utf8_lossy(h.value).into_owned()),
            "origin" => origin = std::str::from_utf8(h.value).ok().map(str::to_owned),
            // A body, an upgrade or keep-alive semantics: leave it to hyper.
            "content-length" | "transfer-encoding" | "upgrade" | "expect" => return None,
            _ => {}
        }
    }
    let segments: Vec<String> = path
        .strip_prefix('/')?
        .split('/')
        .map(|s| {
            percent_decode_str(s)
                .decode_utf8()
                .ok()
                .map(|c| c.into_owned())
        })
        .collect::<Option<_>>()?;
    let (channels, client) = match segments.as_slice() {
        [c, ch] if c == "channel" => (channel_list(std::iter::once(ch.as_str())).ok()?, None),
        [c, ch, k, id] if c == "channel" && k == "client" => (
            channel_list(std::iter::once(ch.as_str())).ok()?,
            Some(ClientId::parse(id).ok()?),
        ),
        [e] if e == "events" => {
            let pairs = query_pairs(query);
            let names = pairs
                .iter()
                .filter(|(k, _)| k == "stream")
                .map(|(_, v)| v.as_str());
            let channels = channel_list(names).ok()?;
            if channels.is_empty() {
                return None;
            }
            (channels, None)
        }
        _ => return None,
    };
    let resume = sse::resume(last_event_id, query);
    // A bad envelope= is hyper's to answer (400).
    let format = sse::Format::from_query(query).ok()?;
    Some(Subscribe {
        channels,
        client,
        resume,
        origin,
        format,
    })
}

/// Registers the subscriber; `None` if the hub refuses (hyper then answers
/// with the error).
pub(super) fn register(state: &AppState, sub: &Subscribe) -> Option<Session> {
    sse::register(state, &sub.channels, sub.client.clone(), &sub.resume).ok()
}

/// Serves a registered subscriber until the client leaves, falls too far
/// behind, a write blocks for `--write-timeout`, or the hub shuts down.
///
/// This future is the whole per-connection state of an idle stream, so it
/// is kept small: heartbeats come from the shared ticker (a comment is
/// written on a tick if nothing else was written since the previous one),
/// and writes try the socket without waiting first; only a write that
/// would block takes the boxed, timed path.
pub(super) async fn serve(
    mut stream: TcpStream,
    state: AppState,
    sub: Subscribe,
    session: Session,
) {
    let format = sub.format;
    let mut first = response_head(&state, &sub, &session.client);
    let prelude = sse::prelude(&state);
    first.extend_from_slice(&chunk_head(prelude.len()));
    first.extend_from_slice(&prelude);
    first.extend_from_slice(b"\r\n");
    drop(sub);
    let mut ticks = state.ticker();
    let Session {
        outbox,
        subs: _subs,
        guard: _guard,
        ..
    } = session;
    let AppState {
        shutdown, config, ..
    } = state;
    let write_timeout = config.write_timeout;
    drop(config);
    if write(&mut stream, Bytes::from(first), write_timeout)
        .await
        .is_err()
    {
        return;
    }
    let mut extra = 0usize;
    loop {
        let chunk = tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                // The last chunk: a clean end the client can tell from a cut.
                let _ = write(&mut stream, Bytes::from_static(b"0\r\n\r\n"), write_timeout).await;
                return;
            }
            batch = outbox.next_batch() => match batch {
                Batch::Items(items) => sse::encode(items, format),
                Batch::Closed(_) => return,
            },
            r = ticks.changed() => match r {
                Ok(()) => Bytes::from_static(sse::HEARTBEAT),
                Err(_) => return,
            },
            r = stream.readable() => {
                if r.is_err() || client_left(&stream, &mut extra) {
                    return;
                }
                continue;
            }
        };
        let rest = match write_chunk_now(&stream, &chunk) {
            Ok(None) => continue,
            Ok(Some(rest)) => rest,
            Err(()) => return,
        };
        if write(&mut stream, rest, write_timeout).await.is_err() {
            return;
        }
    }
}

/// The size line of an HTTP/1.1 chunk of `len` bytes.
fn chunk_head(len: usize) -> Vec<u8> {
    format!("{len:x}\r\n").into_bytes()
}

/// Writes `data` as one HTTP/1.1 chunk (size line, data, line break) in one
/// vectored write if the socket has room, without copying the shared frame.
/// Returns what is left to write (then copied, rarely), `None` if all went
/// (or the chunk is empty: a zero-size chunk would end the body), `Err`
/// if the socket failed.
fn write_chunk_now(stream: &TcpStream, data: &Bytes) -> Result<Option<Bytes>, ()> {
    use std::io::IoSlice;
    if data.is_empty() {
        return Ok(None);
    }
    let head = chunk_head(data.len());
    let total = head.len() + data.len() + 2;
    let written = match stream.try_write_vectored(&[
        IoSlice::new(&head),
        IoSlice::new(data),
        IoSlice::new(b"\r\n"),
    ]) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
        Err(_) => return Err(()),
    };
    if written == total {
        return Ok(None);
    }
    let mut rest = bytes::BytesMut::with_capacity(total - written);
    let mut skip = written;
    for part in [&head[..], &data[..], b"\r\n"] {
        if skip >= part.len() {
            skip -= part.len();
            continue;
        }
        rest.extend_from_slice(&part[skip..]);
        skip = 0;
    }
    Ok(Some(rest.freeze()))
}

/// Bytes a subscriber may send after its request (a stray line end, a
/// pipelined request that will never be answered) before it is closed.
const MAX_EXTRA_BYTES: usize = 1024;

/// True if the client closed its side, the socket failed, or the client
/// has sent more than [`MAX_EXTRA_BYTES`] after its request (an SSE client
/// has nothing to say; one that keeps talking only costs CPU). One read
/// per wake-up: a client that never stops sending cannot hold the task.
fn client_left(stream: &TcpStream, extra: &mut usize) -> bool {
    let mut scratch = [0u8; 256];
    match stream.try_read(&mut scratch) {
        Ok(0) => true,
        Ok(n) => {
            *extra += n;
            *extra > MAX_EXTRA_BYTES
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(_) => true,
    }
}

/// Writes without waiting when the socket has room (the usual case); the
/// rest goes through a boxed write bounded by `limit`.
pub(super) async fn write(
    stream: &mut TcpStream,
    mut bytes: Bytes,
    limit: Duration,
) -> Result<(), ()> {
    while !bytes.is_empty() {
        match stream.try_write(&bytes) {
            Ok(n) => bytes.advance(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(_) => return Err(()),
        }
    }
    if bytes.is_empty() {
        return Ok(());
    }
    let slow = Box::pin(tokio::time::timeout(limit, stream.write_all(&bytes)));
    match slow.await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

fn response_head(state: &AppState, sub: &Subscribe, client: &ClientId) -> Vec<u8> {
    let mut h = String::with_capacity(256);
    h.push_str("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\nx-accel-buffering: no\r\ntransfer-encoding: chunked\r\nconnection: close\r\n");
    h.push_str("herald-client-id: ");
    h.push_str(client.as_str());
    h.push_str("\r\n");
    let allowed = match (&state.config.cors, &sub.origin) {
        (Cors::Any, _) => Some("*".to_owned()),
        (Cors::Origins(list), Some(o)) if list.iter().any(|a| a == o) => Some(o.clone()),
        _ => None,
    };
    if let Some(origin) = allowed {
        h.push_str("access-control-allow-origin: ");
        h.push_str(&origin);
        h.push_str("\r\naccess-control-expose-headers: herald-client-id\r\nvary: origin\r\n");
    }
    h.push_str(&format!(
        "date: {}\r\n\r\n",
        httpdate::fmt_http_date(std::time::SystemTime::now())
    ));
    h.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(head: &str) -> Option<Subscribe> {
        parse(head.as_bytes())
    }

    #[test]
    fn serves_only_complete_valid_sse_subscribes() {
        let s =
            p("GET /channel/news HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 0000000000000005\r\n\r\n")
                .unwrap();
        assert_eq!(s.channels[0].as_str(), "news");
        assert_eq!(s.resume, Resume::After(crate::hub::EventId::from_u64(5)));
        let s = p("GET /events?stream=a&stream=b%3Ac&lastEventId=x HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(s.channels.len(), 2);
        assert_eq!(s.channels[1].as_str(), "b:c");
        assert_eq!(s.resume, Resume::Unknown("x".into()));
        assert!(
            p("GET /channel/a/client/tab-1 HTTP/1.1\r\n\r\n")
                .unwrap()
                .client
                .is_some()
        );
        for other in [
            "GET /channel/news HTTP/1.1\r\n",           // incomplete
            "POST /channel/news HTTP/1.1\r\n\r\n",      // publish
            "GET /channel/bad%20name HTTP/1.1\r\n\r\n", // error: hyper answers
            "GET /events HTTP/1.1\r\n\r\n",             // error: hyper answers
            "GET /ws?channel=a HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            "GET /status HTTP/1.1\r\n\r\n",
            "GET /channel/%FF HTTP/1.1\r\n\r\n",
            "GET /channel/a HTTP/1.0\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ] {
            assert!(p(other).is_none(), "{other:?}");
        }
    }
}
