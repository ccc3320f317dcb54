//! `cargo fuzz run virtio_queue` (see `fuzz/README.md`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| carapace_fuzz::virtio_queue(data));
