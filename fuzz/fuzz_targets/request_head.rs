//! The request-head parser of the accept loop and the direct SSE and
//! WebSocket paths.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| herald::http::fuzz::request_head(data));
