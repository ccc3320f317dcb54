//! `containerd-shim-carapace-v2`: containerd's shim v2 Task API served on
//! Carapace microVMs.
//!
//! One shim process serves one sandbox: a Kubernetes pod (every container
//! whose CRI annotation `io.kubernetes.cri.sandbox-id` names the same
//! sandbox), or a single container started with `ctr run`. The first
//! `Create` boots the sandbox's VM; each container's rootfs and bind-mount
//! sources are bind-mounted into the VM's virtio-fs share (in the shim's own
//! mount namespace, so they die with it); the agent in the guest creates and
//! runs the containers; containerd's stdio FIFOs are bridged to the agent's
//! vsock streams; the VM stops when the last container is deleted.
//!
//! - [`bootstrap`]: the shim binary's actions (`start`, `delete`, serving).
//! - [`task`]: the Task service, generic over the [`vm::Launcher`] that
//!   boots sandboxes and the [`events::EventSink`] that reaches containerd,
//!   so that it is tested without a VM.
//! - [`container`], [`process`]: the state of containers and processes.
//! - [`config`]: which configuration file a sandbox boots with.
//! - [`io`]: containerd's stdio URIs for the runtime's relay; [`rootfs`]: containerd's rootfs mounts and the
//!   share; [`stats`]: cgroup v2 metrics in containerd's format;
//!   [`pod`]: CRI annotations and VM sizing; [`guest`]: the agent calls.

pub mod bootstrap;
pub mod config;
pub mod container;
pub mod error;
pub mod events;
pub mod io;
pub mod process;
pub mod rootfs;
pub mod stats;
pub mod task;

pub use containerd_shim::protos;

/// The runtime type containerd knows this shim by.
pub const RUNTIME_TYPE: &str = "io.containerd.carapace.v2";
