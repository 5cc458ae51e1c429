//! Validated names: channels, event names and client ids.
//!
//! Every name that reaches the hub has been parsed here, so the core never
//! sees a name that could break SSE framing or a log line.

use std::fmt;
use std::sync::Arc;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidName {
    /// The channel name is empty, too long or has a character outside the set.
    #[error("invalid channel name {0:?}: use 1 to 200 characters of A-Z a-z 0-9 _ . : @ = -")]
    Channel(String),
    /// The event name is empty, too long, has a line break or is reserved.
    #[error(
        "invalid event name {0:?}: use 1 to 128 characters without line breaks, not starting with \"herald.\" (reserved for the hub)"
    )]
    Event(String),
    /// The client id is empty, too long or has a character outside the set.
    #[error("invalid client id {0:?}: use 1 to 128 characters of A-Z a-z 0-9 _ . -")]
    Client(String),
}

/// Longest channel name accepted, in bytes (all allowed characters are ASCII).
pub const MAX_CHANNEL_LEN: usize = 200;
/// Longest event name accepted, in characters.
pub const MAX_EVENT_LEN: usize = 128;
/// Longest client id accepted, in bytes.
pub const MAX_CLIENT_LEN: usize = 128;
/// Prefix of the event names the hub keeps for its own events.
pub const RESERVED_EVENT_PREFIX: &str = "herald.";

/// A channel name: 1 to 200 characters of `A-Z a-z 0-9 _ . : @ = -`.
///
/// Cheap to clone (shared), since every event and subscription carries one.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelName(Arc<str>);

impl ChannelName {
    /// Parses a channel name.
    pub fn parse(s: &str) -> Result<Self, InvalidName> {
        let ok = !s.is_empty()
            && s.len() <= MAX_CHANNEL_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.:@=-".contains(&b));
        if ok {
            Ok(Self(Arc::from(s)))
        } else {
            Err(InvalidName::Channel(truncate(s)))
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An event name other than the default `message`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct EventName(Arc<str>);

impl EventName {
    /// Parses an event name a publisher chose. `herald.*` is refused.
    pub fn parse(s: &str) -> Result<Self, InvalidName> {
        let ok = !s.is_empty()
            && s.chars().count() <= MAX_EVENT_LEN
            && !s.contains(['\r', '\n'])
            && !s.starts_with(RESERVED_EVENT_PREFIX);
        if ok {
            Ok(Self(Arc::from(s)))
        } else {
            Err(InvalidName::Event(truncate(s)))
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True for the default name, which SSE frames leave out.
    pub fn is_default(&self) -> bool {
        &*self.0 == "message"
    }
}

/// A client id: chosen by the subscriber or made by the hub.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ClientId(Arc<str>);

impl ClientId {
    /// Parses a client id a subscriber chose.
    pub fn parse(s: &str) -> Result<Self, InvalidName> {
        let ok = !s.is_empty()
            && s.len() <= MAX_CLIENT_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if ok {
            Ok(Self(Arc::from(s)))
        } else {
            Err(InvalidName::Client(truncate(s)))
        }
    }

    /// Makes a random id (20 characters of base-62, about 119 bits).
    pub fn generate() -> Self {
        use rand::Rng;
        const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        let mut rng = rand::rng();
        let s: String = (0..20)
            .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
            .collect();
        Self(Arc::from(s))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Keeps error messages short when someone sends a megabyte of name.
fn truncate(s: &str) -> String {
    const KEEP: usize = 64;
    match s.char_indices().nth(KEEP) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

macro_rules! text_impls {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }
    )*};
}
text_impls!(ChannelName, EventName, ClientId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_accept_the_documented_set_only() {
        for ok in [
            "a",
            "k8s.deployment:ns:web",
            "user@x=1_2-3",
            &"x".repeat(200),
        ] {
            assert!(ChannelName::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a/b", "ü", "a\n", &"x".repeat(201), "a#b", "a?b"] {
            assert!(ChannelName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn event_names_refuse_line_breaks_reserved_prefix_and_length() {
        assert!(EventName::parse("version").is_ok());
        assert!(EventName::parse("with space and ünïcode").is_ok());
        assert!(EventName::parse(&"é".repeat(128)).is_ok());
        for bad in ["", "a\nb", "a\rb", "herald.reset", &"x".repeat(129)] {
            assert!(EventName::parse(bad).is_err(), "{bad:?}");
        }
        assert!(EventName::parse("message").is_ok_and(|n| n.is_default()));
    }

    #[test]
    fn client_ids_accept_the_documented_set_only() {
        assert!(ClientId::parse("tab-1.a_b").is_ok());
        for bad in ["", "a:b", "a@b", &"x".repeat(129)] {
            assert!(ClientId::parse(bad).is_err(), "{bad:?}");
        }
        let generated = ClientId::generate();
        assert!(ClientId::parse(generated.as_str()).is_ok());
        assert_ne!(generated, ClientId::generate());
    }

    #[test]
    fn long_bad_names_are_truncated_in_messages() {
        let err = ChannelName::parse(&"/".repeat(10_000)).unwrap_err();
        assert!(err.to_string().len() < 200, "{err}");
    }
}
