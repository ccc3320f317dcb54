//! Device models: the MMIO/PIO bus they hang on, legacy devices, virtio.

pub mod bus;
pub mod virtio;
