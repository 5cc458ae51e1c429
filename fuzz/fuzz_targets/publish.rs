//! The JSON publish envelope, the text body and the query parameters.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| herald::http::fuzz::publish(data));
