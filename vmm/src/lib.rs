//! Carapace's VMM: a minimal KVM virtual machine monitor that boots a Linux
//! guest (uncompressed `vmlinux`, 64-bit entry) with a serial console, an
//! i8042 reset line and virtio-mmio devices (vsock, fs).

pub mod devices;
