//! herald's integration tests: real servers on 127.0.0.1:0, real clients.

mod cli;
mod lifecycle;
mod publish;
mod sse;
mod support;
mod ws;
