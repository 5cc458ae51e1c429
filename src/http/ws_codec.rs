//! The WebSocket frame codec (RFC 6455 section 5) that herald's server
//! and its load generator's client share: one decoder, checked by
//! Autobahn's cases in both roles (README "Conformance").

use crate::config::MAX_WS_CLIENT_MESSAGE_BYTES;

/// Close codes (RFC 6455 section 7.4.1).
pub(crate) mod code {
    /// Going away.
    pub(crate) const AWAY: u16 = 1001;
    /// A protocol error.
    pub(crate) const PROTOCOL: u16 = 1002;
    /// A kind of data the endpoint does not accept.
    pub(crate) const UNSUPPORTED: u16 = 1003;
    /// Data that does not match its type (text that is not UTF-8).
    pub(crate) const INVALID: u16 = 1007;
    /// A message too big to process.
    pub(crate) const SIZE: u16 = 1009;
    /// The server is restarting.
    pub(crate) const RESTART: u16 = 1012;
}

/// Why a connection ends: the close code and reason to send.
pub(crate) type Fail = (u16, &'static str);

/// A whole data message from the peer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Message {
    Text(String),
    Binary(Vec<u8>),
}

/// A whole message or control frame from the peer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    Message(Message),
    Ping(Vec<u8>),
    Pong,
    /// The peer closes with this code (1000 if it gave none): echoed.
    Close(u16),
}

/// True for a close code a peer may send (RFC 6455 section 7.4 and the
/// IANA registry): 1000-1003, 1007-1014, and the 3000-4999 ranges for
/// libraries and applications. 1004-1006 and 1015 must never be on the
/// wire, and the rest of 1000-2999 is unassigned.
pub(crate) fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Decodes a peer's frames: masked (a server reading a client) or not (a
/// client reading a server), possibly fragmented; limits enforced; text
/// checked for UTF-8 as each fragment arrives. Idle, it holds two empty
/// buffers.
#[derive(Debug)]
pub(crate) struct Decoder {
    /// Bytes read and not decoded yet.
    pub(crate) buf: Vec<u8>,
    message: Vec<u8>,
    /// The opcode of the message being reassembled (text or binary).
    in_message: Option<u8>,
    /// How much of a text `message` is known to be valid UTF-8.
    valid: usize,
    /// The largest message accepted.
    pub(crate) limit: usize,
    /// Frames must be masked (client to server) or must not be.
    masked: bool,
}

impl Decoder {
    /// A server's decoder of client frames (masked).
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            buf: Vec::new(),
            message: Vec::new(),
            in_message: None,
            valid: 0,
            limit,
            masked: true,
        }
    }

    /// A client's decoder of server frames (unmasked).
    pub(crate) fn client(limit: usize) -> Self {
        Self {
            masked: false,
            ..Self::new(limit)
        }
    }

    /// The next whole frame, `None` until one has arrived, or the failure
    /// to close with.
    pub(crate) fn next(&mut self) -> Result<Option<Frame>, Fail> {
        loop {
            let b = &self.buf;
            if b.len() < 2 {
                return Ok(None);
            }
            let (fin, rsv, op) = (b[0] & 0x80 != 0, b[0] & 0x70, b[0] & 0x0F);
            let masked = b[1] & 0x80 != 0;
            let (len, mut at) = match b[1] & 0x7F {
                126 if b.len() >= 4 => (u64::from(u16::from_be_bytes([b[2], b[3]])), 4),
                127 if b.len() >= 10 => (
                    u64::from_be_bytes(b[2..10].try_into().unwrap_or_default()),
                    10,
                ),
                126 | 127 => return Ok(None),
                n => (u64::from(n), 2),
            };
            if rsv != 0 {
                return Err((code::PROTOCOL, "no extension was negotiated (RSV bits set)"));
            }
            if masked != self.masked {
                return Err((
                    code::PROTOCOL,
                    if self.masked {
                        "client frames must be masked"
                    } else {
                        "server frames must not be masked"
                    },
                ));
            }
            if len >> 63 != 0 {
                return Err((
                    code::PROTOCOL,
                    "a 64-bit length must have its top bit clear",
                ));
            }
            let control = op >= 0x8;
            if control && (!fin || len > 125) {
                return Err((code::PROTOCOL, "invalid control frame"));
            }
            if !matches!(op, 0x0..=0x2 | 0x8..=0xA) {
                return Err((code::PROTOCOL, "unknown opcode"));
            }
            if len > self.limit as u64 {
                return Err((code::SIZE, "message too big"));
            }
            let len = len as usize;
            let mask_len = if masked { 4 } else { 0 };
            if b.len() < at + mask_len + len {
                return Ok(None);
            }
            let mask = if masked {
                [b[at], b[at + 1], b[at + 2], b[at + 3]]
            } else {
                [0; 4]
            };
            at += mask_len;
            let payload: Vec<u8> = b[at..at + len]
                .iter()
                .enumerate()
                .map(|(i, x)| x ^ mask[i % 4])
                .collect();
            self.buf.drain(..at + len);
            match op {
                0x8 => return close_frame(&payload).map(Some),
                0x9 => return Ok(Some(Frame::Ping(payload))),
                0xA => return Ok(Some(Frame::Pong)),
                _ => {
                    let kind = match (op, self.in_message) {
                        (0x0, Some(kind)) => kind,
                        (0x1 | 0x2, None) => op,
                        _ => return Err((code::PROTOCOL, "unexpected continuation")),
                    };
                    self.in_message = Some(kind);
                    if self.message.len() + payload.len() > self.limit {
                        return Err((code::SIZE, "message too big"));
                    }
                    self.message.extend_from_slice(&payload);
                    if kind == 0x1 {
                        self.check_utf8(fin)?;
                    }
                    if fin {
                        self.in_message = None;
                        self.valid = 0;
                        let message = std::mem::take(&mut self.message);
                        return Ok(Some(Frame::Message(if kind == 0x1 {
                            // Checked above: every byte is valid.
                            Message::Text(String::from_utf8(message).map_err(|_| not_utf8())?)
                        } else {
                            Message::Binary(message)
                        })));
                    }
                }
            }
        }
    }

    /// Fails as soon as the text so far cannot be UTF-8 (a sequence cut
    /// at the end of a fragment may still be completed by the next one,
    /// unless this is the last).
    fn check_utf8(&mut self, fin: bool) -> Result<(), Fail> {
        match std::str::from_utf8(&self.message[self.valid..]) {
            Ok(_) => {
                self.valid = self.message.len();
                Ok(())
            }
            Err(e) if e.error_len().is_none() && !fin => {
                self.valid += e.valid_up_to();
                Ok(())
            }
            Err(_) => Err(not_utf8()),
        }
    }

    /// Gives back buffer memory once everything has been decoded.
    pub(crate) fn release(&mut self) {
        if self.buf.is_empty() {
            self.buf = Vec::new();
        }
        if self.message.is_empty() {
            self.message = Vec::new();
        }
    }
}

fn not_utf8() -> Fail {
    (code::INVALID, "text is not UTF-8")
}

/// A client's close frame: no payload, or a 2-byte code a peer may send
/// and a UTF-8 reason.
fn close_frame(payload: &[u8]) -> Result<Frame, Fail> {
    match payload {
        [] => Ok(Frame::Close(1000)),
        [_] => Err((
            code::PROTOCOL,
            "a close payload is a 2-byte code and a reason",
        )),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !close_code_allowed(code) {
                return Err((code::PROTOCOL, "this close code may not be sent"));
            }
            if std::str::from_utf8(reason).is_err() {
                return Err((code::INVALID, "the close reason is not UTF-8"));
            }
            Ok(Frame::Close(code))
        }
    }
}

/// A masked client frame (what a client sends: the load generator, tests
/// and fuzzing).
pub fn masked_frame(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = vec![first];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// The WebSocket fuzz target's body (see [`super::fuzz::ws_frames`]).
pub(super) fn fuzz_decoder(data: &[u8]) {
    // Arbitrary bytes: no panic; what is kept stays bounded.
    let mut d = Decoder::new(MAX_WS_CLIENT_MESSAGE_BYTES);
    let cut = data.first().map_or(0, |c| usize::from(*c)).min(data.len());
    for piece in [&data[..cut], &data[cut..]] {
        d.buf.extend_from_slice(piece);
        while let Ok(Some(_)) = d.next() {}
        assert!(d.message.len() <= MAX_WS_CLIENT_MESSAGE_BYTES);
    }
    // Messages made of the input (split at NUL), masked with its first four
    // bytes and fragmented at `cut`, decode to themselves.
    let mask = [
        data.get(1).copied().unwrap_or(0),
        data.get(2).copied().unwrap_or(0),
        data.get(3).copied().unwrap_or(0),
        data.get(4).copied().unwrap_or(0),
    ];
    let messages: Vec<String> = data
        .split(|b| *b == 0)
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .filter(|m| m.len() <= MAX_WS_CLIENT_MESSAGE_BYTES)
        .collect();
    let mut wire = vec![];
    for m in &messages {
        let b = m.as_bytes();
        let at = cut.min(b.len());
        if at == 0 || at == b.len() {
            wire.extend(masked_frame(0x81, b, mask));
        } else {
            wire.extend(masked_frame(0x01, &b[..at], mask));
            wire.extend(masked_frame(0x89, b"p", mask));
            wire.extend(masked_frame(0x80, &b[at..], mask));
        }
    }
    let mut d = Decoder {
        buf: wire,
        ..Decoder::new(MAX_WS_CLIENT_MESSAGE_BYTES)
    };
    let mut got = vec![];
    while let Ok(Some(f)) = d.next() {
        if let Frame::Message(Message::Text(t)) = f {
            got.push(t);
        }
    }
    assert_eq!(got, messages);
    assert!(d.buf.is_empty());
}
