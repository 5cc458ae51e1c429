//! The mesh's wire lines between nodes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| herald::cluster::fuzz::line(data));
