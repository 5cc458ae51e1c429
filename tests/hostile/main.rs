//! Hostile clients, as an attacker would write them: raw sockets against a
//! real `herald serve` process, whose RSS each test bounds. Run alone with
//! `cargo test --test hostile` (they open many sockets; `scripts/test` runs
//! them as their own group).

// Helpers outside #[test] functions unwrap too: a failure is a test failure.
#![allow(clippy::unwrap_used, missing_docs)]

mod floods;
mod harness;
mod protocol;
mod replay;
#[path = "../it/support.rs"]
mod support;
