//! What a snapshot's state file holds: the VM's shape, every vCPU's KVM
//! state, the VM-wide KVM state (PIT, clock, interrupt controllers) and the
//! devices' registers. KVM's own structures are serialized through
//! kvm-bindings' `serde` support; the rest derives `serde` here.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};
use virtio_queue::QueueState;

/// The parts of a VM that must be the same in the snapshot and in the
/// config that restores it: the guest saw them at boot and cannot take a
/// change (its memory map, its CPUs, its virtio-mmio devices).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub mem_mib: u32,
    /// Whether the host was `kvm_pvm` (the guest's command line and CPUID
    /// differ between the two kinds of host).
    pub pvm: bool,
    /// The virtio-mmio devices, in bus order.
    pub devices: Vec<DeviceShape>,
}

/// One virtio-mmio device as the guest knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceShape {
    /// The virtio device ID (19 vsock, 26 fs, 1 net).
    pub device_type: u32,
    /// The virtio-fs mount tag (the guest mounts the share by it).
    pub tag: Option<String>,
}

impl DeviceShape {
    /// A readable name for errors ("vsock", "fs \"root\"", "net").
    pub fn describe(&self) -> String {
        let kind = match self.device_type {
            1 => "net".to_string(),
            19 => "vsock".to_string(),
            26 => "fs".to_string(),
            other => format!("virtio device {other}"),
        };
        match &self.tag {
            Some(t) => format!("{kind} {t:?}"),
            None => kind,
        }
    }
}

/// The whole state file. (kvm-bindings' `kvm_xsave` and `kvm_irqchip` are
/// neither `Clone` nor `PartialEq`: tests compare encodings.)
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// What the restoring config must match.
    pub shape: Shape,
    /// One per vCPU, by vCPU index.
    pub vcpus: Vec<VcpuState>,
    /// The VM-wide KVM state.
    pub kvm: KvmVmState,
    /// The UART.
    pub serial: SerialSnapshot,
    /// The virtio-mmio transports and their devices, in bus order.
    pub devices: Vec<TransportState>,
}

/// One vCPU's KVM state (see `snapshot::vcpu` for the order of the ioctls).
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID the vCPU was given (restored first: what the other
    /// ioctls accept depends on it).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// Every MSR of KVM_GET_MSR_INDEX_LIST that the host let us read.
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
}

/// The in-kernel devices of the VM.
#[derive(Serialize, Deserialize)]
pub struct KvmVmState {
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
}

impl std::fmt::Debug for KvmVmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // kvm_irqchip is a union without Debug.
        f.debug_struct("KvmVmState").field("pit", &self.pit).field("clock", &self.clock).finish_non_exhaustive()
    }
}

/// The 16550A's registers (vm-superio's `SerialState`, which has no serde).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialSnapshot {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for vm_superio::serial::SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// A virtio-mmio transport's registers and its queues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// The device behind it (checked against the restoring config).
    pub device_type: u32,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    /// The features the driver accepted (handed to the device again).
    pub driver_features: u64,
    pub queue_sel: u32,
    pub shm_sel: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    /// Whether the driver had set DRIVER_OK and the device was running.
    pub activated: bool,
    /// Every queue, with the indices the device had reached if it ran.
    pub queues: Vec<QueueSnapshot>,
}

/// A virtqueue: its configuration and where the device stood in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
        }
    }
}

impl From<&QueueSnapshot> for QueueState {
    fn from(q: &QueueSnapshot) -> Self {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}
