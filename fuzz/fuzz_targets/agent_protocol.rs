//! `cargo fuzz run agent_protocol` (see `fuzz/README.md`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| carapace_fuzz::agent_protocol(data));
