//! Every annotation Carapace reads or writes, in one place: CRI's (which
//! group containers into a pod) and our own (VM size, the VMM's pid).

/// `sandbox` for a pod's first (pause) container, `container` for the others.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// The pod sandbox a container belongs to.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// Pod-level resources containerd (1.7+) puts on the sandbox spec.
pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

/// The VM's vCPUs, and the values it may take.
pub const VCPUS: &str = "io.carapace.vcpus";
pub const VCPUS_RANGE: std::ops::RangeInclusive<u32> = 1..=64;
/// The VM's memory in MiB, and the values it may take.
pub const MEMORY_MIB: &str = "io.carapace.memory_mib";
pub const MEMORY_MIB_RANGE: std::ops::RangeInclusive<u32> = 64..=256 * 1024;

/// Set by `carapace` in a container's state: the host pid of the VMM
/// (`pid` is the monitor's, as runc's is the container's init).
pub const VMM_PID: &str = "io.carapace.vmm-pid";
