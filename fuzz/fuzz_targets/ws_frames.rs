//! The WebSocket client-frame decoder, with reassembly.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| herald::http::fuzz::ws_frames(data));
