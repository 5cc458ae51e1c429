//! Channel, event and client names. A name that parses is its own text
//! and parses again.
#![no_main]
use herald::hub::{ChannelName, ClientId, EventName};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = ChannelName::parse(s) {
        assert_eq!(c.as_str(), s);
        assert_eq!(ChannelName::parse(c.as_str()).ok(), Some(c));
    }
    if let Ok(e) = EventName::parse(s) {
        assert_eq!(e.as_str(), s);
        assert!(EventName::parse(e.as_str()).is_ok());
    }
    if let Ok(c) = ClientId::parse(s) {
        assert_eq!(c.as_str(), s);
        assert!(ClientId::parse(c.as_str()).is_ok());
    }
});
