//! virtio-fs served inline in the VMM: a FUSE server (`fuse-backend-rs`) on
//! the device's virtqueues, backed by a passthrough file system rooted at one
//! host directory.
//!
//! The guest sees a virtio-mmio device of type 26 whose configuration space
//! carries the mount tag; it mounts the share with
//! `mount -t virtiofs <tag> <dir>`.
//!
//! Layout:
//! - `device`: [`Fs`], the [`VirtioDevice`](super::VirtioDevice) (config
//!   space, features, activation, reset);
//! - `backend`: builds the passthrough file system from an [`FsConfig`] and
//!   wraps it in a guard that enforces read-only sharing, refuses to open
//!   host device nodes and validates names and sizes the guest sends;
//! - `creds`: acting as the guest caller (uid, gid and the DAC capabilities
//!   the guest kernel already checked) for requests that create entries;
//! - `request`: processes one virtqueue without threads (pop a descriptor
//!   chain, run the FUSE request, add the used length);
//! - `event_loop`: the worker thread's epoll loop over the queue notifiers;
//! - `stats`: FUSE requests served, by opcode (logged when the worker stops).
//!
//! Wiring, for the VMM core (one device, one transport, one MMIO slot per
//! shared directory):
//!
//! ```ignore
//! fs::validate_tags(config.fs.iter().map(|f| f.tag.as_str()))?; // no clashes
//! for fs_config in &config.fs {
//!     let dev = Fs::new(fs_config.clone())?; // checks tag and dir; needs root
//!     let t = MmioTransport::new(mem.clone(), Box::new(dev), irq);
//!     // ... like any virtio-mmio device: irqfd, ioeventfds, bus window,
//!     // `virtio_mmio.device=4K@<base>:<gsi>` on the kernel command line.
//! }
//! // In the guest: mount -t virtiofs <tag> <dir>   (-o ro for a read-only share)
//! ```
//!
//! Security model: the guest names files only by inode numbers the server
//! handed out and by single path components (no `/`, no `.`/`..` except
//! `..` at the root, which stays at the root). Every host lookup is an
//! `openat(parent_fd, name, O_PATH | O_NOFOLLOW)`, so symbolic links are
//! never followed on the host: the guest kernel reads and resolves them in
//! its own mount. Only regular files and directories are ever opened for
//! I/O on the host (the "nodev" rule: device nodes, FIFOs and sockets in
//! the share belong to the guest kernel).

use std::io;
use std::path::PathBuf;

mod backend;
mod creds;
mod device;
mod event_loop;
mod request;
mod stats;

#[cfg(feature = "fuzzing")]
pub(crate) mod fuzz;
#[cfg(test)]
mod hostile_tests;
#[cfg(test)]
mod test_utils;

pub use device::Fs;

/// Protocol and sizing constants.
pub mod defs {
    pub use carapace_vmm_config::fs::TAG_LEN;
    /// Size of `struct virtio_fs_config`: the tag and `num_request_queues`.
    pub const CONFIG_SPACE_SIZE: usize = TAG_LEN + 4;
    /// Number of request queues the device offers.
    pub const NUM_REQUEST_QUEUES: usize = 1;
    /// Index of the high-priority queue (FORGET, INTERRUPT).
    pub const HIPRIO_QUEUE_INDEX: usize = 0;
    /// Index of the first request queue.
    pub const REQUEST_QUEUE_INDEX: usize = 1;
    /// Total number of queues: hiprio plus the request queues.
    pub const NUM_QUEUES: usize = 1 + NUM_REQUEST_QUEUES;
    /// Maximum size of each queue.
    pub const QUEUE_SIZE: u16 = 1024;
    /// Largest xattr value or name list (Linux `XATTR_SIZE_MAX`); larger
    /// buffer sizes from the guest are clamped to it.
    pub const XATTR_SIZE_MAX: u32 = 64 * 1024;
    /// Largest READDIR buffer the backend fills in one request.
    pub const READDIR_SIZE_MAX: u32 = 1 << 20;
}

pub use carapace_vmm_config::fs::{validate_tag, validate_tags, CacheMode, FsConfig, FsConfigError};

/// Errors of the virtio-fs device.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The share's configuration (tag, directory).
    #[error(transparent)]
    Config(#[from] FsConfigError),
    /// The VMM does not run as root: it could not create files with the
    /// guest's ownership nor read every file of the share.
    #[error("virtio-fs needs the VMM to run as root (effective uid is {0})")]
    NotRoot(u32),
    /// The passthrough file system could not be set up.
    #[error("virtio-fs backend for {path}")]
    Backend {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The virtqueue is broken (its rings lie outside guest memory).
    #[error("virtio-fs virtqueue: {0}")]
    Queue(virtio_queue::Error),
}
