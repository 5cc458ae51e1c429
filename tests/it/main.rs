//! herald's integration tests: real servers on 127.0.0.1:0, real clients.

// Helpers outside #[test] functions unwrap too: a failure is a test failure.
#![allow(clippy::unwrap_used, missing_docs)]

mod assets;
mod backplane;
mod bench;
mod cli;
mod cluster;
mod fake_kube;
mod k8s;
mod lifecycle;
mod publish;
mod resume;
mod sse;
mod support;
mod ws;
