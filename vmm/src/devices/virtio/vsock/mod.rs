//! virtio-vsock with a hybrid (Unix socket) backend.
