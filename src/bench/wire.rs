//! An incremental reader for an HTTP/1.1 response carrying Server-Sent
//! Events: status line and headers, then a chunked or close-delimited body,
//! then SSE framing (`\n`, `\r\n` or `\r` line ends, multi-line `data`).
//!
//! The load generator holds tens of thousands of streams on a shared core,
//! so it parses bytes in place instead of running a full HTTP client per
//! connection. Only what a subscriber needs is kept: the data of each event.

/// A parse failure (the stream is not what a subscriber expects).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The status line or a header could not be read.
    #[error("malformed HTTP response: {0}")]
    Http(String),
    /// The server answered something other than 200.
    #[error("HTTP status {0}")]
    Status(u16),
    /// A chunk size line was not hexadecimal.
    #[error("malformed chunk size")]
    Chunk,
    /// The server broke the WebSocket protocol: close with this code.
    #[error("WebSocket protocol error {0}: {1}")]
    WebSocket(u16, &'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    Head,
    Chunked { left: usize, in_size_line: bool },
    Plain,
}

/// One SSE stream being read.
#[derive(Debug)]
pub struct SseReader {
    body: Body,
    head: Vec<u8>,
    chunk_line: Vec<u8>,
    line: Vec<u8>,
    skip_lf: bool,
    data: Vec<u8>,
    has_data: bool,
    /// True once the 200 and headers have been read.
    pub open: bool,
}

impl Default for SseReader {
    fn default() -> Self {
        Self::new()
    }
}

impl SseReader {
    /// A reader expecting the status line next.
    pub fn new() -> Self {
        Self {
            body: Body::Head,
            head: Vec::new(),
            chunk_line: Vec::new(),
            line: Vec::new(),
            skip_lf: false,
            data: Vec::new(),
            has_data: false,
            open: false,
        }
    }

    /// Feeds bytes read from the socket; calls `on_event` with the data of
    /// each complete event.
    pub fn feed(
        &mut self,
        mut input: &[u8],
        on_event: &mut impl FnMut(&[u8]),
    ) -> Result<(), Error> {
        while !input.is_empty() {
            match self.body {
                Body::Head => input = self.read_head(input)?,
                Body::Plain => {
                    self.sse(input, on_event);
                    input = &[];
                }
                Body::Chunked { left, in_size_line } => {
                    if in_size_line {
                        match input.iter().position(|&b| b == b'\n') {
                            None => {
                                self.chunk_line.extend_from_slice(input);
                                input = &[];
                            }
                            Some(i) => {
                                self.chunk_line.extend_from_slice(&input[..i]);
                                input = &input[i + 1..];
                                let text =
                                    String::from_utf8_lossy(&self.chunk_line).trim().to_owned();
                                self.chunk_line.clear();
                                if text.is_empty() {
                                    continue; // the CRLF after a chunk's data
                                }
                                let hex = text.split(';').next().unwrap_or_default();
                                let size = usize::from_str_radix(hex.trim(), 16)
                                    .map_err(|_| Error::Chunk)?;
                                if size == 0 {
                                    // Last chunk: the stream is over.
                                    self.body = Body::Plain;
                                    return Ok(());
                                }
                                self.body = Body::Chunked {
                                    left: size,
                                    in_size_line: false,
                                };
                            }
                        }
                    } else {
                        let n = left.min(input.len());
                        self.sse(&input[..n], on_event);
                        input = &input[n..];
                        self.body = Body::Chunked {
                            left: left - n,
                            in_size_line: left == n,
                        };
                    }
                }
            }
        }
        Ok(())
    }

    fn read_head<'a>(&mut self, input: &'a [u8]) -> Result<&'a [u8], Error> {
        let start = self.head.len().saturating_sub(3);
        self.head.extend_from_slice(input);
        let Some(end) = find(&self.head[start..], b"\r\n\r\n").map(|i| i + start + 4) else {
            if self.head.len() > 64 * 1024 {
                return Err(Error::Http("headers too long".into()));
            }
            return Ok(&[]);
        };
        let rest_in_input = self.head.len() - end;
        let head = String::from_utf8_lossy(&self.head[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::Http(status_line.to_owned()))?;
        if status != 200 {
            return Err(Error::Status(status));
        }
        let chunked = lines.any(|l| {
            let l = l.to_ascii_lowercase();
            l.starts_with("transfer-encoding:") && l.contains("chunked")
        });
        self.body = if chunked {
            Body::Chunked {
                left: 0,
                in_size_line: true,
            }
        } else {
            Body::Plain
        };
        self.head = Vec::new();
        self.open = true;
        Ok(&input[input.len() - rest_in_input..])
    }

    /// SSE framing over body bytes: whole lines are handled in place
    /// (found with memchr); only a line split across reads is copied.
    fn sse(&mut self, mut bytes: &[u8], on_event: &mut impl FnMut(&[u8])) {
        while !bytes.is_empty() {
            if self.skip_lf {
                self.skip_lf = false;
                if bytes[0] == b'\n' {
                    bytes = &bytes[1..];
                    continue;
                }
            }
            let Some(i) = memchr::memchr2(b'\r', b'\n', bytes) else {
                self.line.extend_from_slice(bytes);
                return;
            };
            if self.line.is_empty() {
                self.end_line(&bytes[..i], on_event);
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(&bytes[..i]);
                self.end_line(&line, on_event);
                line.clear();
                self.line = line;
            }
            self.skip_lf = bytes[i] == b'\r';
            bytes = &bytes[i + 1..];
        }
    }

    fn end_line(&mut self, line: &[u8], on_event: &mut impl FnMut(&[u8])) {
        if line.is_empty() {
            if self.has_data {
                on_event(&self.data);
            }
            self.data.clear();
            self.has_data = false;
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(0) => return, // comment
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        if field == b"data" {
            if self.has_data {
                self.data.push(b'\n');
            }
            self.data.extend_from_slice(value);
            self.has_data = true;
        }
    }
}

/// What a WebSocket stream delivered.
#[derive(Debug, PartialEq, Eq)]
pub enum WsItem<'a> {
    /// A whole text message (valid UTF-8).
    Text(&'a [u8]),
    /// A whole binary message.
    Binary(&'a [u8]),
    /// A ping to answer (its payload).
    Ping(Vec<u8>),
    /// The server closed the WebSocket with this code (1000 if none):
    /// answer with the same code.
    Close(u16),
}

/// The largest server message the client accepts.
const MAX_SERVER_MESSAGE: usize = 64 * 1024 * 1024;

/// One WebSocket client stream being read: the `101` answer, then unmasked
/// server frames, decoded by the codec herald's server uses
/// (`http::ws_codec`: fragments joined, control frames, UTF-8, close codes
/// checked; a violation is [`Error::WebSocket`]).
#[derive(Debug)]
pub struct WsReader {
    head: Vec<u8>,
    decoder: crate::http::ws_codec::Decoder,
    /// True once the `101 Switching Protocols` has been read.
    pub open: bool,
}

impl Default for WsReader {
    fn default() -> Self {
        Self {
            head: Vec::new(),
            decoder: crate::http::ws_codec::Decoder::client(MAX_SERVER_MESSAGE),
            open: false,
        }
    }
}

impl WsReader {
    /// The upgrade request to send for `path` on `host`.
    pub fn request(host: &str, path: &str) -> String {
        format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
    }

    /// A masked frame to send (`first` is FIN/RSV/opcode).
    pub fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        crate::http::ws_codec::masked_frame(first, payload, rand::random())
    }

    /// A masked pong frame answering `payload`.
    pub fn pong(payload: &[u8]) -> Vec<u8> {
        Self::frame(0x8A, &payload[..payload.len().min(125)])
    }

    /// Feeds bytes read from the socket; calls `on` for each item.
    pub fn feed(&mut self, input: &[u8], on: &mut impl FnMut(WsItem<'_>)) -> Result<(), Error> {
        let mut input = input;
        if !self.open {
            let start = self.head.len().saturating_sub(3);
            self.head.extend_from_slice(input);
            let Some(end) = find(&self.head[start..], b"\r\n\r\n").map(|i| i + start + 4) else {
                return Ok(());
            };
            let line = String::from_utf8_lossy(&self.head[..end])
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned();
            let status: u16 = line
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or(Error::Http(line.clone()))?;
            if status != 101 {
                return Err(Error::Status(status));
            }
            self.open = true;
            let rest = self.head.split_off(end);
            self.head = Vec::new();
            self.decoder.buf = rest;
            input = &[];
        }
        use crate::http::ws_codec::{Frame, Message};
        self.decoder.buf.extend_from_slice(input);
        loop {
            match self.decoder.next() {
                Ok(None) => break,
                Ok(Some(Frame::Message(Message::Text(t)))) => on(WsItem::Text(t.as_bytes())),
                Ok(Some(Frame::Message(Message::Binary(b)))) => on(WsItem::Binary(&b)),
                Ok(Some(Frame::Ping(p))) => on(WsItem::Ping(p)),
                Ok(Some(Frame::Pong)) => {}
                Ok(Some(Frame::Close(code))) => on(WsItem::Close(code)),
                Err((code, why)) => return Err(Error::WebSocket(code, why)),
            }
        }
        self.decoder.release();
        Ok(())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(parts: &[&[u8]]) -> Result<Vec<String>, Error> {
        let mut r = SseReader::new();
        let mut out = vec![];
        for p in parts {
            r.feed(p, &mut |d| {
                out.push(String::from_utf8_lossy(d).into_owned())
            })?;
        }
        Ok(out)
    }

    const HEAD_CHUNKED: &[u8] =
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";

    fn chunk(s: &str) -> Vec<u8> {
        format!("{:x}\r\n{s}\r\n", s.len()).into_bytes()
    }

    #[test]
    fn reads_multi_line_data_with_every_line_ending() {
        let body =
            "retry: 10\n\n: ping\n\nid: 1\nevent: x\ndata: a\ndata:b\r\ndata:  c\r\rdata: last\n\n";
        let mut input = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n".to_vec();
        input.extend_from_slice(body.as_bytes());
        assert_eq!(events(&[&input]).unwrap(), ["a\nb\n c", "last"]);
    }

    #[test]
    fn reads_chunked_bodies_split_anywhere() {
        let mut input = HEAD_CHUNKED.to_vec();
        input.extend(chunk("retry: 2000\n\n"));
        input.extend(chunk("id: 1\ndata: one\n\n"));
        input.extend(chunk(
            "id: 2\ndata: two\ndata: lines\n\nid: 3\ndata: three\n\n",
        ));
        for split in 0..input.len() {
            let (a, b) = input.split_at(split);
            assert_eq!(
                events(&[a, b]).unwrap(),
                ["one", "two\nlines", "three"],
                "split at {split}"
            );
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(events(&bytes).unwrap().len(), 3);
    }

    #[test]
    fn an_event_split_across_chunks_is_whole() {
        let mut input = HEAD_CHUNKED.to_vec();
        input.extend(chunk("data: hel"));
        input.extend(chunk("lo\n"));
        input.extend(chunk("\n"));
        assert_eq!(events(&[&input]).unwrap(), ["hello"]);
    }

    #[test]
    fn refuses_non_200_and_garbage() {
        assert_eq!(
            events(&[b"HTTP/1.1 502 Bad Gateway\r\n\r\n"]),
            Err(Error::Status(502))
        );
        assert!(events(&[b"garbage\r\n\r\n"]).is_err());
        let mut bad = HEAD_CHUNKED.to_vec();
        bad.extend_from_slice(b"zz\r\n");
        assert_eq!(events(&[&bad]), Err(Error::Chunk));
    }

    #[test]
    fn reads_websocket_frames_after_the_101_split_anywhere() {
        let mut input = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n".to_vec();
        input.extend_from_slice(b"\x81\x05hello");
        input.extend_from_slice(b"\x89\x01p");
        input.extend_from_slice(b"\x01\x03abc\x80\x02de");
        let mut long = vec![0x81, 126, 0x01, 0x2c];
        long.extend(vec![b'x'; 300]);
        input.extend(long);
        input.extend_from_slice(b"\x88\x02\x03\xe8");
        for split in 0..input.len() {
            let mut r = WsReader::default();
            let mut got = vec![];
            let mut on = |i: WsItem<'_>| {
                got.push(match i {
                    WsItem::Text(m) | WsItem::Binary(m) => String::from_utf8_lossy(m).into_owned(),
                    WsItem::Ping(p) => format!("ping:{}", String::from_utf8_lossy(&p)),
                    WsItem::Close(code) => format!("close:{code}"),
                })
            };
            r.feed(&input[..split], &mut on).unwrap();
            r.feed(&input[split..], &mut on).unwrap();
            assert_eq!(got.len(), 5, "split at {split}: {got:?}");
            assert_eq!(&got[..3], ["hello", "ping:p", "abcde"]);
            assert_eq!(got[3].len(), 300);
            assert_eq!(got[4], "close:1000");
        }
        assert_eq!(
            WsReader::default().feed(b"HTTP/1.1 400 Bad Request\r\n\r\n", &mut |_| {}),
            Err(Error::Status(400))
        );
    }

    #[test]
    fn absurd_websocket_lengths_are_refused_not_overflowed() {
        let mut r = WsReader::default();
        r.feed(b"HTTP/1.1 101 Switching Protocols\r\n\r\n", &mut |_| {})
            .unwrap();
        let frame = [0x81, 127, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert!(r.feed(&frame, &mut |_| {}).is_err());
    }

    #[test]
    fn marks_the_stream_open_at_the_end_of_the_headers() {
        let mut r = SseReader::new();
        r.feed(b"HTTP/1.1 200 OK\r\n", &mut |_| {}).unwrap();
        assert!(!r.open);
        r.feed(b"\r\n", &mut |_| {}).unwrap();
        assert!(r.open);
    }
}

#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// The load generator's readers never panic on what a server sends.
        #[test]
        fn readers_survive_any_input(body in prop::collection::vec(any::<u8>(), 0..2048), chunked in any::<bool>()) {
            let head: &[u8] = if chunked {
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            } else {
                b"HTTP/1.1 200 OK\r\n\r\n"
            };
            let mut sse = SseReader::new();
            let _ = sse.feed(head, &mut |_| {});
            let _ = sse.feed(&body, &mut |_| {});
            let mut ws = WsReader::default();
            let _ = ws.feed(b"HTTP/1.1 101 Switching Protocols\r\n\r\n", &mut |_| {});
            let _ = ws.feed(&body, &mut |_| {});
        }
    }
}
