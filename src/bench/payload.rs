//! The benchmark payload: `t=<send time, µs since the epoch> s=<sequence>
//! c=<channel index>` padded to the requested size with `.`. Plain ASCII,
//! so it survives any wrapping (herald's WebSocket JSON, SSE `data:`), and
//! is found by scanning for the markers.

use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch.
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Makes a payload of at least `size` bytes stamped with the current time.
pub fn stamp(seq: u64, channel: u64, size: usize) -> String {
    let mut s = format!("t={} s={seq} c={channel} ", now_micros());
    while s.len() < size {
        s.push('.');
    }
    s
}

/// What a received payload says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Send time, µs since the epoch.
    pub sent: u64,
    /// Sequence number.
    pub seq: u64,
    /// Channel index.
    pub channel: u64,
}

/// Reads a stamp out of a received message (which may wrap the payload).
pub fn parse(msg: &[u8]) -> Option<Stamp> {
    Some(Stamp {
        sent: number_after(msg, b"t=")?,
        seq: number_after(msg, b"s=")?,
        channel: number_after(msg, b"c=")?,
    })
}

fn number_after(msg: &[u8], marker: &[u8]) -> Option<u64> {
    let at = msg.windows(marker.len()).position(|w| w == marker)? + marker.len();
    let digits = msg[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&msg[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_and_pad_to_size() {
        let p = stamp(7, 3, 100);
        assert_eq!(p.len(), 100);
        let s = parse(p.as_bytes()).unwrap();
        assert_eq!((s.seq, s.channel), (7, 3));
        assert!(s.sent > 1_600_000_000_000_000);
    }

    #[test]
    fn stamps_are_found_inside_a_websocket_json_frame() {
        let p = stamp(1, 0, 10);
        let frame = format!(
            r#"{{"type":"event","channel":"b-0","id":"0000000000000009","event":"message","data":"{p}"}}"#
        );
        assert_eq!(parse(frame.as_bytes()).unwrap().seq, 1);
        assert!(parse(b"hello").is_none());
    }
}
