//! Device models: the MMIO/PIO bus they hang on, legacy devices, virtio.

pub mod bus;
pub mod legacy;
pub mod virtio;
