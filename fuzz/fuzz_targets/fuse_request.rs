//! `cargo fuzz run fuse_request` (see `fuzz/README.md`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| carapace_fuzz::fuse_request(data));
