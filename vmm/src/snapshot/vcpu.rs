//! Saving and restoring one vCPU's KVM state, in the order KVM needs.
//!
//! The ioctls go through [`VcpuOps`] so the order and the handling of
//! refused MSRs can be tested without `/dev/kvm` (a recording fake in the
//! tests); [`kvm_ioctls::VcpuFd`] is the real implementation.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use tracing::{debug, warn};

use super::{SnapshotError, VcpuState};

type KvmResult<T> = Result<T, kvm_ioctls::Error>;

/// MSRs that KVM lists in KVM_GET_MSR_INDEX_LIST but that some hosts
/// refuse to read or write back; a refusal of exactly these is skipped
/// (with a debug line), a refusal of any other MSR fails the snapshot or
/// the restore. Each entry says which host refuses it and why skipping is
/// harmless.
pub const REFUSED_MSRS: &[(u32, &str)] = &[
    // kvm_pvm refuses KVM_SET_MSRS of it; the guest kernel only reads it
    // at boot (VMX feature probing), long before a snapshot is taken.
    (0x3a, "IA32_FEATURE_CONTROL (kvm_pvm refuses to set it)"),
];

/// MSR_IA32_TSC.
const MSR_IA32_TSC: u32 = 0x10;
/// MSR_IA32_TSC_DEADLINE: written after MSR_IA32_TSC (see [`order_msrs`]).
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// The vCPU ioctls of a snapshot and a restore.
pub trait VcpuOps {
    fn get_cpuid(&self) -> KvmResult<Vec<kvm_cpuid_entry2>>;
    fn set_cpuid(&self, entries: &[kvm_cpuid_entry2]) -> KvmResult<()>;
    fn get_mp_state(&self) -> KvmResult<kvm_mp_state>;
    fn set_mp_state(&self, s: kvm_mp_state) -> KvmResult<()>;
    fn get_regs(&self) -> KvmResult<kvm_regs>;
    fn set_regs(&self, r: &kvm_regs) -> KvmResult<()>;
    fn get_sregs(&self) -> KvmResult<kvm_sregs>;
    fn set_sregs(&self, s: &kvm_sregs) -> KvmResult<()>;
    fn get_xsave(&self) -> KvmResult<kvm_xsave>;
    fn set_xsave(&self, x: &kvm_xsave) -> KvmResult<()>;
    fn get_xcrs(&self) -> KvmResult<kvm_xcrs>;
    fn set_xcrs(&self, x: &kvm_xcrs) -> KvmResult<()>;
    fn get_debug_regs(&self) -> KvmResult<kvm_debugregs>;
    fn set_debug_regs(&self, d: &kvm_debugregs) -> KvmResult<()>;
    fn get_lapic(&self) -> KvmResult<kvm_lapic_state>;
    fn set_lapic(&self, l: &kvm_lapic_state) -> KvmResult<()>;
    /// Reads the MSRs named by `entries[i].index` into their `data`, in
    /// order; returns how many were read (KVM stops at the first it refuses).
    fn get_msrs(&self, entries: &mut [kvm_msr_entry]) -> KvmResult<usize>;
    /// Writes `entries` in order; returns how many were written (KVM stops
    /// at the first it refuses).
    fn set_msrs(&self, entries: &[kvm_msr_entry]) -> KvmResult<usize>;
    fn get_vcpu_events(&self) -> KvmResult<kvm_vcpu_events>;
    fn set_vcpu_events(&self, e: &kvm_vcpu_events) -> KvmResult<()>;
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm { what, source }
}

fn is_refusable(index: u32) -> bool {
    REFUSED_MSRS.iter().any(|(i, _)| *i == index)
}

fn refused_name(index: u32) -> &'static str {
    REFUSED_MSRS.iter().find(|(i, _)| *i == index).map_or("", |(_, n)| n)
}

/// Runs `op` (KVM_GET_MSRS or KVM_SET_MSRS semantics: returns how many
/// leading entries it handled) over `entries` in chunks KVM accepts. An
/// entry it stops at is dropped if it is on [`REFUSED_MSRS`] and the rest
/// goes on; any other refusal is an error naming the MSR. Returns the
/// entries handled (in order) and the indices skipped.
pub fn msrs_skipping_refused(
    cpu: u8,
    what: &'static str,
    mut entries: Vec<kvm_msr_entry>,
    mut op: impl FnMut(&mut [kvm_msr_entry]) -> KvmResult<usize>,
) -> Result<(Vec<kvm_msr_entry>, Vec<u32>), SnapshotError> {
    let mut done = Vec::with_capacity(entries.len());
    let mut skipped = Vec::new();
    let mut pos = 0;
    while pos < entries.len() {
        let end = (pos + KVM_MAX_MSR_ENTRIES).min(entries.len());
        let n = op(&mut entries[pos..end])
            .map_err(|source| SnapshotError::Kvm { what: if what == "read" { "KVM_GET_MSRS" } else { "KVM_SET_MSRS" }, source })?;
        let n = n.min(end - pos);
        done.extend_from_slice(&entries[pos..pos + n]);
        pos += n;
        if pos < end {
            let index = entries[pos].index;
            if !is_refusable(index) {
                return Err(SnapshotError::MsrRefused { cpu, op: what, index });
            }
            debug!(cpu, "KVM refused to {what} MSR {index:#x} ({}); skipped", refused_name(index));
            skipped.push(index);
            pos += 1;
        }
    }
    Ok((done, skipped))
}

/// Puts MSRs in the order they are restored: MSR_IA32_TSC_DEADLINE after
/// MSR_IA32_TSC (KVM arms the deadline timer against the TSC it has at the
/// time of the write: written first, the timer could be lost or fire at
/// the wrong time), every other MSR in the order KVM listed them.
pub fn order_msrs(msrs: &mut Vec<kvm_msr_entry>) {
    if let Some(i) = msrs.iter().position(|m| m.index == MSR_IA32_TSC_DEADLINE) {
        let deadline = msrs.remove(i);
        msrs.push(deadline);
    }
}

/// Saves a stopped vCPU's state (every vCPU of the VM must be out of
/// KVM_RUN, and any I/O it had exited for completed).
///
/// Order (as Firecracker does it, for KVM's reasons):
/// - KVM_GET_MP_STATE first: it makes KVM accept pending LAPIC events
///   (INIT/SIPI), which may change the vCPU and LAPIC state read after it.
/// - KVM_GET_LAPIC may update the LAPIC (pending timer) before returning it.
/// - KVM_GET_VCPU_EVENTS last: the other GETs can change pending
///   exceptions and interrupts, which it reports.
pub fn save<V: VcpuOps>(vcpu: &V, cpu: u8, msr_list: &[u32]) -> Result<VcpuState, SnapshotError> {
    let mp_state = vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
    let regs = vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let xsave = vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?;
    let xcrs = vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?;
    let debug_regs = vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?;
    let lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let cpuid = vcpu.get_cpuid().map_err(kvm("KVM_GET_CPUID2"))?;
    let wanted = msr_list.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
    let (mut msrs, skipped) = msrs_skipping_refused(cpu, "read", wanted, |chunk| vcpu.get_msrs(chunk))?;
    debug!(cpu, saved = msrs.len(), ?skipped, "MSRs read (skipped: refused by this host)");
    fix_zero_tsc_deadline(&mut msrs);
    let vcpu_events = vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState { cpuid, mp_state, regs, sregs, xsave, xcrs, debug_regs, lapic, msrs, vcpu_events })
}

/// A TSC deadline of 0 means "no timer armed"; a guest that armed one
/// just before the snapshot could be left without timer interrupts after
/// the restore (Firecracker saw this). A deadline at the saved TSC fires
/// at once instead, and the guest re-arms its timer from the handler.
fn fix_zero_tsc_deadline(msrs: &mut [kvm_msr_entry]) {
    let Some(tsc) = msrs.iter().find(|m| m.index == MSR_IA32_TSC).map(|m| m.data) else { return };
    for m in msrs.iter_mut().filter(|m| m.index == MSR_IA32_TSC_DEADLINE && m.data == 0) {
        m.data = tsc;
    }
}

/// The order in which [`restore`] sets a vCPU's state, by ioctl:
/// - CPUID first: what KVM accepts in the other ioctls (MSRs, XSAVE
///   components, CR4 bits) depends on it.
/// - MP state before the registers (as Firecracker does it).
/// - REGS before SREGS, and both before VCPU_EVENTS: SET_REGS clears
///   pending exceptions, which SET_VCPU_EVENTS restores last.
/// - SREGS before LAPIC: SREGS carries the APIC base MSR that places and
///   enables the LAPIC. On kvm_pvm, SREGS can set the CPL only before the
///   vCPU first runs: hence restores always go to fresh vCPUs.
/// - LAPIC before MSRs: the TSC deadline MSR is accepted only once the
///   LAPIC is in TSC-deadline mode.
/// - MSRs after the memory slots exist (kvm_pvm's MSR_PVM_VCPU_STRUCT maps
///   guest memory): the VM's memory is registered before any vCPU is made.
pub const RESTORE_ORDER: [&str; 10] = [
    "KVM_SET_CPUID2",
    "KVM_SET_MP_STATE",
    "KVM_SET_REGS",
    "KVM_SET_SREGS",
    "KVM_SET_XSAVE",
    "KVM_SET_XCRS",
    "KVM_SET_DEBUGREGS",
    "KVM_SET_LAPIC",
    "KVM_SET_MSRS",
    "KVM_SET_VCPU_EVENTS",
];

/// Restores `state` onto a fresh vCPU (one that never ran), in
/// [`RESTORE_ORDER`]. Returns the MSRs the host refused and that were
/// skipped (from [`REFUSED_MSRS`]).
pub fn restore<V: VcpuOps>(vcpu: &V, cpu: u8, state: &VcpuState) -> Result<Vec<u32>, SnapshotError> {
    vcpu.set_cpuid(&state.cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
    vcpu.set_mp_state(state.mp_state).map_err(kvm("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&state.regs).map_err(kvm("KVM_SET_REGS"))?;
    vcpu.set_sregs(&state.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    vcpu.set_xsave(&state.xsave).map_err(kvm("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&state.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&state.debug_regs).map_err(kvm("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&state.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    let mut msrs = state.msrs.clone();
    order_msrs(&mut msrs);
    let (_, skipped) = msrs_skipping_refused(cpu, "write", msrs, |chunk| vcpu.set_msrs(chunk))?;
    vcpu.set_vcpu_events(&state.vcpu_events).map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    Ok(skipped)
}

fn to_msrs(entries: &[kvm_msr_entry]) -> KvmResult<Msrs> {
    Msrs::from_entries(entries).map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))
}

impl VcpuOps for VcpuFd {
    fn get_cpuid(&self) -> KvmResult<Vec<kvm_cpuid_entry2>> {
        let cpuid = self.get_cpuid2(KVM_MAX_CPUID_ENTRIES)?;
        Ok(cpuid.as_slice().to_vec())
    }
    fn set_cpuid(&self, entries: &[kvm_cpuid_entry2]) -> KvmResult<()> {
        let cpuid = CpuId::from_entries(entries).map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
        self.set_cpuid2(&cpuid)
    }
    fn get_mp_state(&self) -> KvmResult<kvm_mp_state> {
        VcpuFd::get_mp_state(self)
    }
    fn set_mp_state(&self, s: kvm_mp_state) -> KvmResult<()> {
        VcpuFd::set_mp_state(self, s)
    }
    fn get_regs(&self) -> KvmResult<kvm_regs> {
        VcpuFd::get_regs(self)
    }
    fn set_regs(&self, r: &kvm_regs) -> KvmResult<()> {
        VcpuFd::set_regs(self, r)
    }
    fn get_sregs(&self) -> KvmResult<kvm_sregs> {
        VcpuFd::get_sregs(self)
    }
    fn set_sregs(&self, s: &kvm_sregs) -> KvmResult<()> {
        VcpuFd::set_sregs(self, s)
    }
    fn get_xsave(&self) -> KvmResult<kvm_xsave> {
        VcpuFd::get_xsave(self)
    }
    fn set_xsave(&self, x: &kvm_xsave) -> KvmResult<()> {
        // SAFETY: `x` is a whole kvm_xsave (4 KiB) that came from
        // KVM_GET_XSAVE, as KVM_SET_XSAVE without KVM_CAP_XSAVE2 expects.
        unsafe { VcpuFd::set_xsave(self, x) }
    }
    fn get_xcrs(&self) -> KvmResult<kvm_xcrs> {
        VcpuFd::get_xcrs(self)
    }
    fn set_xcrs(&self, x: &kvm_xcrs) -> KvmResult<()> {
        VcpuFd::set_xcrs(self, x)
    }
    fn get_debug_regs(&self) -> KvmResult<kvm_debugregs> {
        VcpuFd::get_debug_regs(self)
    }
    fn set_debug_regs(&self, d: &kvm_debugregs) -> KvmResult<()> {
        VcpuFd::set_debug_regs(self, d)
    }
    fn get_lapic(&self) -> KvmResult<kvm_lapic_state> {
        VcpuFd::get_lapic(self)
    }
    fn set_lapic(&self, l: &kvm_lapic_state) -> KvmResult<()> {
        VcpuFd::set_lapic(self, l)
    }
    fn get_msrs(&self, entries: &mut [kvm_msr_entry]) -> KvmResult<usize> {
        let mut msrs = to_msrs(entries)?;
        let n = VcpuFd::get_msrs(self, &mut msrs)?;
        for (dst, src) in entries.iter_mut().zip(msrs.as_slice()).take(n) {
            dst.data = src.data;
        }
        Ok(n)
    }
    fn set_msrs(&self, entries: &[kvm_msr_entry]) -> KvmResult<usize> {
        VcpuFd::set_msrs(self, &to_msrs(entries)?)
    }
    fn get_vcpu_events(&self) -> KvmResult<kvm_vcpu_events> {
        VcpuFd::get_vcpu_events(self)
    }
    fn set_vcpu_events(&self, e: &kvm_vcpu_events) -> KvmResult<()> {
        VcpuFd::set_vcpu_events(self, e)
    }
}

/// Finishes the I/O a stopped vCPU last exited for: a port or MMIO read's
/// data is copied into the guest's register only by the next KVM_RUN. With
/// `immediate_exit` set, KVM_RUN completes it and returns at once (EINTR)
/// without running guest code. Must run on the thread that ran the vCPU.
pub fn complete_pending_io(fd: &mut VcpuFd, cpu: u8) {
    fd.set_kvm_immediate_exit(1);
    match fd.run() {
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
        Err(e) => warn!(cpu, "KVM_RUN to complete pending I/O: {e}"),
        Ok(exit) => warn!(cpu, "KVM_RUN with immediate_exit returned an exit: {exit:?}"),
    }
    fd.set_kvm_immediate_exit(0);
}
