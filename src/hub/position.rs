//! Positions in a cluster: how far a node (or a client) has got in every
//! origin's stream of events.
//!
//! In a cluster every event keeps the id its origin node gave it; ids of
//! one origin grow strictly (the hybrid clock, across restarts too), but
//! ids of different origins interleave arbitrarily. So one number cannot
//! say what a client has seen; a vector can: for each origin, the newest id
//! applied. A node applies each origin's events in id order, one at a time,
//! so when it delivers an event, the vector at that point says exactly what
//! every one of its subscribers has been given. That vector is the event
//! id a cluster node sends (`Last-Event-ID`), and any node can resume from
//! it: replay what is newer per origin, and skip what arrives later but
//! was already seen.
//!
//! Text form: `tag=id,tag=id,...` with origins in name order and ids as 16
//! decimal digits.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use super::id::EventId;

/// An origin: a node's name as peers know it.
pub type Origin = Arc<str>;

/// For each origin, the newest id applied (or seen).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position(BTreeMap<Origin, EventId>);

/// Most origins a position may name (a client's `Last-Event-ID` is bounded).
pub const MAX_ORIGINS: usize = 64;

impl Position {
    /// The empty position (nothing seen).
    pub fn new() -> Self {
        Self::default()
    }

    /// The newest id of `origin` (0 if none).
    pub fn get(&self, origin: &str) -> EventId {
        self.0.get(origin).copied().unwrap_or(EventId::from_u64(0))
    }

    /// True if the event `(origin, id)` is at or before this position.
    pub fn covers(&self, origin: &str, id: EventId) -> bool {
        self.0.get(origin).is_some_and(|seen| id <= *seen)
    }

    /// Moves `origin` forward to `id` (never back).
    pub fn advance(&mut self, origin: &Origin, id: EventId) {
        let e = self.0.entry(origin.clone()).or_insert(id);
        if id > *e {
            *e = id;
        }
    }

    /// Forgets an origin.
    pub fn remove(&mut self, origin: &str) {
        self.0.remove(origin);
    }

    /// The origins and ids.
    pub fn iter(&self) -> impl Iterator<Item = (&Origin, EventId)> {
        self.0.iter().map(|(o, i)| (o, *i))
    }

    /// Number of origins.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True if no origin is known.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Reads the text form; `None` if it is not a position.
    pub fn parse(s: &str) -> Option<Self> {
        let mut p = BTreeMap::new();
        for part in s.split(',') {
            let (origin, id) = part.split_once('=')?;
            if !valid_origin(origin) || p.len() >= MAX_ORIGINS {
                return None;
            }
            p.insert(Origin::from(origin), id.parse::<EventId>().ok()?);
        }
        (!p.is_empty()).then_some(Self(p))
    }
}

/// An origin name as node names are: 1 to 63 characters of
/// `a-z A-Z 0-9 . _ -`.
pub fn valid_origin(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (o, id) in &self.0 {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{o}={id}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn positions_round_trip_and_refuse_garbage() {
        let mut p = Position::new();
        p.advance(&Origin::from("node-b"), EventId::from_u64(7));
        p.advance(
            &Origin::from("node-a"),
            EventId::from_u64(1_795_000_000_000_000),
        );
        p.advance(&Origin::from("node-a"), EventId::from_u64(3));
        let text = p.to_string();
        assert_eq!(text, "node-a=1795000000000000,node-b=0000000000000007");
        assert_eq!(Position::parse(&text).unwrap(), p);
        assert!(p.covers("node-b", EventId::from_u64(7)));
        assert!(!p.covers("node-b", EventId::from_u64(8)));
        assert!(!p.covers("node-c", EventId::from_u64(1)));
        for bad in [
            "",
            "a",
            "a=",
            "=1",
            "a=x",
            "a b=1",
            "a=1,,b=2",
            "1795000000000000",
        ] {
            assert!(Position::parse(bad).is_none(), "{bad:?}");
        }
        let many: Vec<String> = (0..=MAX_ORIGINS).map(|i| format!("n{i}=1")).collect();
        assert!(Position::parse(&many.join(",")).is_none());
    }
}
