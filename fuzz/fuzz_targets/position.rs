//! `Last-Event-ID` values: event ids and cluster positions. One that
//! parses prints back to one that parses to the same value.
#![no_main]
use herald::hub::{EventId, Position, Resume};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    match Resume::parse(Some(s)) {
        Resume::After(id) => {
            let again: EventId = id.to_string().parse().expect("a printed id parses");
            assert_eq!(again, id);
        }
        Resume::Position(p) => {
            let again = Position::parse(&p.to_string()).expect("a printed position parses");
            assert_eq!(again, p);
        }
        Resume::Fresh => assert!(s.trim().is_empty()),
        Resume::Unknown(_) => {}
    }
});
