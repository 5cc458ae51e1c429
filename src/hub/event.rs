//! Events and their wire encodings.
//!
//! An event is encoded at most once per wire format (SSE frame, WebSocket
//! text frame), lazily, and every subscriber shares the same `Bytes`. The
//! encoders are pure functions so they can be tested byte for byte.

use std::sync::{Arc, OnceLock};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::time::Instant;

use super::id::EventId;
use super::name::{ChannelName, EventName};

/// The payload of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    /// Text published as-is (any content type but JSON, or a JSON string).
    Text(String),
    /// Any JSON value but a string or null, kept as compact JSON text.
    Json(String),
}

impl Data {
    /// The text an SSE subscriber sees.
    pub fn as_text(&self) -> &str {
        match self {
            Self::Text(s) | Self::Json(s) => s,
        }
    }

    /// Payload size in bytes.
    pub fn len(&self) -> usize {
        self.as_text().len()
    }

    /// True if the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.as_text().is_empty()
    }
}

/// One published event, shared (`Arc`) by history and every subscriber queue.
#[derive(Debug)]
pub struct Event {
    /// The id the hub assigned.
    pub id: EventId,
    /// The channel it was published to.
    pub channel: ChannelName,
    /// The event name; `None` is the default `message`.
    pub name: Option<EventName>,
    /// The payload.
    pub data: Data,
    /// A reconnection delay for clients, in milliseconds.
    pub retry: Option<u64>,
    /// The publisher's idempotency key.
    pub key: Option<String>,
    /// When the hub accepted it (monotonic; drives history expiry).
    pub published_at: Instant,
    /// In a cluster: the node that accepted it (its `id` is that node's).
    pub origin: Option<super::position::Origin>,
    /// In a cluster: the id subscribers see, this node's position after it
    /// (see [`super::position`]); `None` = `id`.
    pub wire_id: Option<Arc<str>>,
    /// Published to be kept as the channel's current value.
    pub retain: bool,
    /// Where the event stands in this node's delivery order: its id on a
    /// single node, the count of events applied before it in a cluster
    /// (origin ids are not comparable across origins; apply order is what
    /// positions follow). Writers merge replays and live events by it.
    pub order: u64,
    sse: OnceLock<Bytes>,
    sse_envelope: OnceLock<Bytes>,
    ws: OnceLock<Bytes>,
    ws_frame: OnceLock<Bytes>,
}

impl Event {
    /// Makes an event; encodings are computed on first use.
    pub fn new(
        id: EventId,
        channel: ChannelName,
        name: Option<EventName>,
        data: Data,
        retry: Option<u64>,
        key: Option<String>,
    ) -> Self {
        Self {
            id,
            channel,
            name: name.filter(|n| !n.is_default()),
            data,
            retry,
            key,
            published_at: Instant::now(),
            origin: None,
            wire_id: None,
            retain: false,
            order: id.as_u64(),
            sse: OnceLock::new(),
            sse_envelope: OnceLock::new(),
            ws: OnceLock::new(),
            ws_frame: OnceLock::new(),
        }
    }

    /// The event name as text (`message` by default).
    pub fn name_str(&self) -> &str {
        self.name.as_ref().map_or("message", EventName::as_str)
    }

    /// The id subscribers see: the cluster position, else the id.
    pub fn wire_id(&self) -> String {
        match &self.wire_id {
            Some(w) => w.to_string(),
            None => self.id.to_string(),
        }
    }

    /// The SSE frame, encoded once.
    pub fn sse(&self) -> &Bytes {
        self.sse.get_or_init(|| {
            sse_frame(
                Some(&self.wire_id()),
                self.name.as_ref().map(EventName::as_str),
                self.retry,
                self.data.as_text(),
            )
        })
    }

    /// The SSE frame of a multi-channel stream that asked for an envelope
    /// (`envelope=json`), encoded once: the same `id:` and `event:`, and
    /// data `{"channel":C,"data":D}` (D as the WebSocket carries it: JSON
    /// as published, text as a JSON string), so a plain `EventSource` can
    /// tell the channel of each event.
    pub fn sse_envelope(&self) -> &Bytes {
        self.sse_envelope.get_or_init(|| {
            let mut data = Vec::with_capacity(self.data.len() + 32);
            data.extend_from_slice(b"{\"channel\":");
            push_json_str(&mut data, self.channel.as_str());
            data.extend_from_slice(b",\"data\":");
            match &self.data {
                Data::Text(s) => push_json_str(&mut data, s),
                Data::Json(raw) => data.extend_from_slice(raw.as_bytes()),
            }
            data.push(b'}');
            // JSON text holds no raw line break: one data line.
            sse_frame(
                Some(&self.wire_id()),
                self.name.as_ref().map(EventName::as_str),
                self.retry,
                &String::from_utf8_lossy(&data),
            )
        })
    }

    /// The WebSocket text frame payload (a JSON object), encoded once.
    pub fn ws(&self) -> &Bytes {
        self.ws.get_or_init(|| ws_event(self))
    }

    /// The whole WebSocket text frame (RFC 6455 header + [`Event::ws`]),
    /// encoded once: server frames are unmasked, so every subscriber can be
    /// sent the same bytes.
    pub fn ws_frame(&self) -> &Bytes {
        self.ws_frame.get_or_init(|| ws_text_frame(self.ws()))
    }

    /// What this event costs a subscriber queue, in bytes (an estimate that
    /// does not force an encoding).
    pub fn cost(&self) -> usize {
        self.data.len() + self.channel.as_str().len() + 64
    }
}

/// A notice that a subscriber's position could not be honoured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reset {
    /// The channel whose history has a gap for this subscriber.
    pub channel: ChannelName,
    /// Why, for humans.
    pub reason: String,
}

impl Reset {
    /// The SSE frame: `event: herald.reset` with a JSON body and no id, so
    /// the browser keeps its last id.
    pub fn sse(&self) -> Bytes {
        let body = serde_json::json!({ "channel": self.channel.as_str(), "reason": self.reason });
        sse_frame(None, Some("herald.reset"), None, &body.to_string())
    }

    /// The WebSocket frame payload.
    pub fn ws(&self) -> Bytes {
        let body = serde_json::json!({
            "type": "reset", "channel": self.channel.as_str(), "reason": self.reason,
        });
        Bytes::from(body.to_string())
    }
}

/// Encodes one SSE frame: `id:`, `event:`, `retry:`, one `data:` line per
/// line of `data` (split on `\r\n`, `\r` and `\n`), then a blank line.
pub fn sse_frame(id: Option<&str>, event: Option<&str>, retry: Option<u64>, data: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + 48);
    if let Some(id) = id {
        out.put_slice(b"id: ");
        out.put_slice(id.as_bytes());
        out.put_u8(b'\n');
    }
    if let Some(event) = event {
        out.put_slice(b"event: ");
        out.put_slice(event.as_bytes());
        out.put_u8(b'\n');
    }
    if let Some(ms) = retry {
        out.put_slice(format!("retry: {ms}\n").as_bytes());
    }
    for line in lines(data) {
        if line.is_empty() {
            out.put_slice(b"data:\n");
        } else {
            out.put_slice(b"data: ");
            out.put_slice(line.as_bytes());
            out.put_u8(b'\n');
        }
    }
    out.put_u8(b'\n');
    out.freeze()
}

/// Splits on `\r\n`, `\r` and `\n`, like an SSE parser does. A trailing line
/// break yields a trailing empty line, which the parser turns back into it.
fn lines(s: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(s);
    std::iter::from_fn(move || {
        let s = rest?;
        match s.find(['\r', '\n']) {
            Some(i) => {
                let skip = if s[i..].starts_with("\r\n") { 2 } else { 1 };
                rest = Some(&s[i + skip..]);
                Some(&s[..i])
            }
            None => {
                rest = None;
                Some(s)
            }
        }
    })
}

/// WebSocket opcodes the hub sends.
pub mod opcode {
    /// A text frame.
    pub const TEXT: u8 = 0x1;
    /// A binary frame.
    pub const BINARY: u8 = 0x2;
    /// A close frame.
    pub const CLOSE: u8 = 0x8;
    /// A ping.
    pub const PING: u8 = 0x9;
    /// A pong.
    pub const PONG: u8 = 0xA;
}

/// Encodes a final, unmasked server frame (RFC 6455 section 5.2).
pub fn ws_server_frame(opcode: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 10);
    out.put_u8(0x80 | (opcode & 0x0F));
    match payload.len() {
        n if n < 126 => out.put_u8(n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.put_u8(126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(127);
            out.put_u64(n as u64);
        }
    }
    out.put_slice(payload);
    out.freeze()
}

/// A text frame carrying `payload`.
pub fn ws_text_frame(payload: &[u8]) -> Bytes {
    ws_server_frame(opcode::TEXT, payload)
}

fn ws_event(ev: &Event) -> Bytes {
    let mut out = Vec::with_capacity(ev.data.len() + 96);
    out.extend_from_slice(b"{\"type\":\"event\",\"channel\":");
    push_json_str(&mut out, ev.channel.as_str());
    out.extend_from_slice(b",\"id\":\"");
    out.extend_from_slice(ev.wire_id().as_bytes());
    out.extend_from_slice(b"\",\"event\":");
    push_json_str(&mut out, ev.name_str());
    out.extend_from_slice(b",\"data\":");
    match &ev.data {
        Data::Text(s) => push_json_str(&mut out, s),
        Data::Json(raw) => out.extend_from_slice(raw.as_bytes()),
    }
    out.push(b'}');
    Bytes::from(out)
}

fn push_json_str(out: &mut Vec<u8>, s: &str) {
    // Serialising a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Removes insignificant whitespace from valid JSON text, keeping numbers
/// and strings byte for byte (re-serialising through `Value` would not).
pub fn compact_json(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut in_string = false;
    let mut escaped = false;
    for c in raw.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            out.push(c);
        }
    }
    out
}

/// Shared handle to an event.
pub type SharedEvent = Arc<Event>;

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(data: &str) -> String {
        String::from_utf8(sse_frame(Some("1"), None, None, data).to_vec()).unwrap()
    }

    #[test]
    fn sse_golden_single_line() {
        assert_eq!(frame("hello"), "id: 1\ndata: hello\n\n");
    }

    #[test]
    fn sse_golden_all_fields() {
        let f = sse_frame(Some("0000000000000007"), Some("version"), Some(100), "{}");
        assert_eq!(
            &f[..],
            b"id: 0000000000000007\nevent: version\nretry: 100\ndata: {}\n\n"
        );
    }

    #[test]
    fn sse_golden_multi_line_lf_crlf_and_cr() {
        assert_eq!(frame("a\nb"), "id: 1\ndata: a\ndata: b\n\n");
        assert_eq!(frame("a\r\nb"), "id: 1\ndata: a\ndata: b\n\n");
        assert_eq!(frame("a\rb"), "id: 1\ndata: a\ndata: b\n\n");
        assert_eq!(frame("a\r\n\r\nb"), "id: 1\ndata: a\ndata:\ndata: b\n\n");
        assert_eq!(frame("a\n"), "id: 1\ndata: a\ndata:\n\n");
        assert_eq!(frame("\n\rx"), "id: 1\ndata:\ndata:\ndata: x\n\n");
    }

    #[test]
    fn sse_data_cannot_inject_fields_or_frames() {
        let f = frame("x\n\nid: 99\nevent: evil\r\rdata: y");
        // Every line the payload produced starts with "data:".
        let body = f
            .strip_prefix("id: 1\n")
            .unwrap()
            .strip_suffix("\n\n")
            .unwrap();
        assert!(body.lines().all(|l| l.starts_with("data:")), "{f}");
    }

    #[test]
    fn reset_frames_have_no_id() {
        let r = Reset {
            channel: ChannelName::parse("c").unwrap(),
            reason: "gone".into(),
        };
        assert_eq!(
            &r.sse()[..],
            b"event: herald.reset\ndata: {\"channel\":\"c\",\"reason\":\"gone\"}\n\n"
        );
        let v: serde_json::Value = serde_json::from_slice(&r.ws()).unwrap();
        assert_eq!(v["type"], "reset");
    }

    #[test]
    fn ws_frames_keep_json_data_as_json_and_text_as_string() {
        let ch = ChannelName::parse("c").unwrap();
        let json = Event::new(
            EventId::from_u64(5),
            ch.clone(),
            None,
            Data::Json("{\"a\":[1,2.50]}".into()),
            None,
            None,
        );
        let v: serde_json::Value = serde_json::from_slice(json.ws()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"event","channel":"c","id":"0000000000000005","event":"message","data":{"a":[1,2.5]}})
        );
        assert!(std::str::from_utf8(json.ws()).unwrap().contains("2.50"));
        let text = Event::new(
            EventId::from_u64(5),
            ch,
            EventName::parse("x").ok(),
            Data::Text("say \"hi\"\n".into()),
            None,
            None,
        );
        let v: serde_json::Value = serde_json::from_slice(text.ws()).unwrap();
        assert_eq!(v["data"], "say \"hi\"\n");
        assert_eq!(v["event"], "x");
    }

    #[test]
    fn ws_server_frames_use_the_shortest_length_encoding() {
        assert_eq!(&ws_text_frame(b"hi")[..], b"\x81\x02hi");
        let mid = ws_text_frame(&[b'x'; 300]);
        assert_eq!(&mid[..4], &[0x81, 126, 0x01, 0x2c]);
        assert_eq!(mid.len(), 304);
        let big = ws_text_frame(&vec![b'x'; 70_000]);
        assert_eq!(&big[..2], &[0x81, 127]);
        assert_eq!(u64::from_be_bytes(big[2..10].try_into().unwrap()), 70_000);
        assert_eq!(&ws_server_frame(opcode::PING, b"")[..], &[0x89, 0]);
    }

    #[test]
    fn default_event_name_is_left_out_of_sse() {
        let ch = ChannelName::parse("c").unwrap();
        let e = Event::new(
            EventId::from_u64(1),
            ch,
            EventName::parse("message").ok(),
            Data::Text("x".into()),
            None,
            None,
        );
        assert_eq!(&e.sse()[..], b"id: 0000000000000001\ndata: x\n\n");
        assert!(std::ptr::eq(e.sse(), e.sse()), "encoded once");
    }

    #[test]
    fn compact_json_strips_whitespace_outside_strings_only() {
        assert_eq!(
            compact_json("{ \"a b\" : [ 1 ,\n 2.0e3 ] ,\"c\":\"x \\\" y\" }"),
            "{\"a b\":[1,2.0e3],\"c\":\"x \\\" y\"}"
        );
        assert_eq!(compact_json("\"\\\\\" "), "\"\\\\\"");
    }
}

#[cfg(test)]
mod roundtrip {
    use futures_util::StreamExt;
    use proptest::prelude::*;

    use super::sse_frame;

    /// Parses SSE bytes with an independent parser (the one `herald
    /// subscribe` uses) into (id, event, data) triples.
    fn parse(bytes: &[u8]) -> Vec<(String, String, String)> {
        let chunks = vec![Ok::<_, std::convert::Infallible>(
            bytes::Bytes::copy_from_slice(bytes),
        )];
        let stream = eventsource_stream::EventStream::new(futures_util::stream::iter(chunks));
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(stream.collect::<Vec<_>>())
            .into_iter()
            .map(|e| {
                let e = e.unwrap();
                (e.id, e.event, e.data)
            })
            .collect()
    }

    proptest! {
        #[test]
        fn any_data_and_event_name_survive_framing(
            data in "(?s).{1,200}",
            event in "[^\r\n]{1,40}",
        ) {
            let frame = sse_frame(Some("0000000000000042"), Some(&event), None, &data);
            let expected = data.replace("\r\n", "\n").replace('\r', "\n");
            let got = parse(&frame);
            prop_assert_eq!(got.len(), 1, "one frame, one event: {:?}", frame);
            prop_assert_eq!(&got[0].0, "0000000000000042");
            prop_assert_eq!(&got[0].1, &event);
            prop_assert_eq!(&got[0].2, &expected);
        }
    }
}

#[cfg(test)]
mod compact {
    use proptest::prelude::*;
    use serde_json::Value;

    use super::compact_json;

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            "(?s).{0,20}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::hash_map("(?s).{0,10}", inner, 0..8)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn compacting_keeps_the_value_and_drops_all_outer_whitespace(v in json()) {
            let pretty = serde_json::to_string_pretty(&v).unwrap();
            let compact = compact_json(&pretty);
            prop_assert_eq!(&compact, &serde_json::to_string(&v).unwrap());
            // Same parser on both sides (its float parsing is not exact).
            let back: Value = serde_json::from_str(&compact).unwrap();
            let original: Value = serde_json::from_str(&pretty).unwrap();
            prop_assert_eq!(back, original);
        }
    }
}
