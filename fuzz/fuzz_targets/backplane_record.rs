//! Records read back from Redis and NATS, and Redis stream entry ids.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| herald::backplane::fuzz::record(data));
