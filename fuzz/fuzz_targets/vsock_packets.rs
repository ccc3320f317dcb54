//! `cargo fuzz run vsock_packets` (see `fuzz/README.md`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| carapace_fuzz::vsock_packets(data));
