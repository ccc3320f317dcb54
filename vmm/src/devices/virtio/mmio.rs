//! The virtio-mmio transport (virtio 1.x, "version 2" register layout).
