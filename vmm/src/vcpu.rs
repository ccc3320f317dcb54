//! One vCPU: its thread's run loop and the handling of every KVM exit.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use kvm_bindings::{
    KVM_INTERNAL_ERROR_DELIVERY_EV, KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_SIMUL_EX, KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON,
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use tracing::{debug, trace, warn};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::bus::Bus;
use crate::debug;
use crate::exit::{ExitSender, VmExit};
use crate::profile::Profile;

/// What the run loop does after an exit.
enum Next {
    Continue,
    /// Stop this vCPU and report; `dump` adds the register/code dump to stderr.
    Stop {
        exit: VmExit,
        dump: bool,
    },
    /// KVM_EXIT_INTERNAL_ERROR: details are read from kvm_run after the exit's borrow ends.
    InternalError,
}

/// What all vCPU threads share.
#[derive(Debug, Clone)]
pub struct VcpuShared {
    /// The port-I/O bus.
    pub pio: Arc<Bus>,
    /// The MMIO bus.
    pub mmio: Arc<Bus>,
    /// Guest memory (for crash dumps).
    pub mem: GuestMemoryMmap,
    /// Where a vCPU reports the end of the VM.
    pub exit: ExitSender,
    /// Set by the VM's owner to stop every vCPU.
    pub stop: Arc<AtomicBool>,
    /// Bumped by the VM's owner to ask for a state dump.
    pub dump_gen: Arc<AtomicU64>,
    /// Set (before `stop`) when the vCPUs stop for a snapshot: each one
    /// completes the I/O it exited for before handing its fd back.
    pub pause: Arc<AtomicBool>,
    /// Where samples go when the guest is profiled (see [`crate::profile`]).
    pub profile: Option<Arc<Profile>>,
}

/// A vCPU ready to run on its own thread.
#[derive(Debug)]
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    shared: VcpuShared,
}

/// Reports a vCPU thread that ends while the VM was not being stopped (a
/// panic, or a path that forgot to report).
struct EndGuard<'a> {
    id: u8,
    exit: &'a ExitSender,
    stop: &'a AtomicBool,
}

impl Drop for EndGuard<'_> {
    fn drop(&mut self) {
        if !self.stop.load(Ordering::SeqCst) && !self.exit.exiting() {
            let reason = if std::thread::panicking() { "the vCPU thread panicked" } else { "the vCPU thread ended" };
            self.exit.send(VmExit::VmmError { cpu: self.id, reason: reason.into() });
        }
    }
}

impl Vcpu {
    /// Wraps a configured vCPU.
    pub fn new(id: u8, fd: VcpuFd, shared: VcpuShared) -> Self {
        Vcpu { id, fd, shared }
    }

    /// Runs until the VM stops (reported through the exit channel) or `stop`
    /// is set; gives the vCPU back (for a snapshot).
    pub fn run(mut self) -> VcpuFd {
        let exit = self.shared.exit.clone();
        let stop = self.shared.stop.clone();
        let _guard = EndGuard { id: self.id, exit: &exit, stop: &stop };
        let mut halts = 0u64;
        let mut dumped = 0u64;
        loop {
            if stop.load(Ordering::SeqCst) || exit.exiting() {
                debug!(cpu = self.id, "vCPU stopping");
                if self.shared.pause.load(Ordering::SeqCst) {
                    crate::snapshot::vcpu::complete_pending_io(&mut self.fd, self.id);
                }
                drop(_guard);
                return self.fd;
            }
            let gen = self.shared.dump_gen.load(Ordering::SeqCst);
            if gen != dumped {
                dumped = gen;
                eprintln!("{}", self.describe());
            }
            let next = match self.fd.run() {
                Ok(ex) => Self::handle(self.id, ex, &self.shared.pio, &self.shared.mmio, &mut halts),
                Err(e) if e.errno() == libc::EINTR => {
                    // A kick: the profiler's (or a stop or dump request).
                    if let Some(p) = &self.shared.profile {
                        self.sample(p);
                    }
                    Next::Continue
                }
                Err(e) if e.errno() == libc::EAGAIN => Next::Continue,
                Err(e) => Next::Stop { exit: VmExit::VmmError { cpu: self.id, reason: format!("KVM_RUN failed: {e}") }, dump: false },
            };
            match next {
                Next::Continue => {}
                Next::Stop { exit, dump } => {
                    self.report(exit, dump, "");
                    drop(_guard);
                    return self.fd;
                }
                Next::InternalError => {
                    let detail = self.internal_error_detail();
                    let exit = VmExit::KvmError { cpu: self.id, reason: detail.clone() };
                    self.report(exit, true, &detail);
                    drop(_guard);
                    return self.fd;
                }
            }
        }
    }

    fn handle(id: u8, ex: VcpuExit<'_>, pio: &Bus, mmio: &Bus, halts: &mut u64) -> Next {
        match ex {
            VcpuExit::IoIn(port, data) => {
                if !pio.read(u64::from(port), data) {
                    trace!(cpu = id, "unhandled port read {port:#x}");
                    data.fill(0xff);
                }
            }
            VcpuExit::IoOut(port, data) => {
                if !pio.write(u64::from(port), data) {
                    trace!(cpu = id, "unhandled port write {port:#x} <- {data:02x?}");
                }
            }
            VcpuExit::MmioRead(addr, data) => {
                if !mmio.read(addr, data) {
                    debug!(cpu = id, "unhandled MMIO read {addr:#x}");
                    data.fill(0xff);
                }
            }
            VcpuExit::MmioWrite(addr, data) => {
                if !mmio.write(addr, data) {
                    debug!(cpu = id, "unhandled MMIO write {addr:#x} <- {data:02x?}");
                }
            }
            VcpuExit::Hlt => {
                // The in-kernel LAPIC handles HLT; seeing it here is odd but harmless.
                *halts += 1;
                if *halts == 1 {
                    warn!(cpu = id, "KVM_EXIT_HLT with an in-kernel irqchip");
                }
            }
            VcpuExit::Intr | VcpuExit::IrqWindowOpen | VcpuExit::IoapicEoi(_) => {}
            VcpuExit::Shutdown => {
                return Next::Stop { exit: VmExit::TripleFault { cpu: id }, dump: true };
            }
            VcpuExit::SystemEvent(kind, _) => {
                return match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_RESET => Next::Stop { exit: VmExit::GuestReset, dump: false },
                    KVM_SYSTEM_EVENT_CRASH => {
                        Next::Stop { exit: VmExit::KvmError { cpu: id, reason: "the guest reported a crash".into() }, dump: true }
                    }
                    other => Next::Stop { exit: VmExit::KvmError { cpu: id, reason: format!("unknown system event {other}") }, dump: true },
                };
            }
            VcpuExit::InternalError => return Next::InternalError,
            VcpuExit::FailEntry(reason, hw_cpu) => {
                return Next::Stop {
                    exit: VmExit::KvmError {
                        cpu: id,
                        reason: format!("KVM_EXIT_FAIL_ENTRY (hardware reason {reason:#x}, host CPU {hw_cpu})"),
                    },
                    dump: true,
                };
            }
            other => {
                return Next::Stop { exit: VmExit::KvmError { cpu: id, reason: format!("unexpected KVM exit {other:?}") }, dump: true };
            }
        }
        Next::Continue
    }

    /// Decodes KVM_EXIT_INTERNAL_ERROR's suberror and data.
    fn internal_error_detail(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is
        // the active member of the union; it is plain data of fixed size.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let what = match internal.suberror {
            KVM_INTERNAL_ERROR_EMULATION => "instruction emulation failed",
            KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
            KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
            KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected exit reason",
            _ => "unknown",
        };
        let n = (internal.ndata as usize).min(internal.data.len());
        let data: Vec<String> = internal.data[..n].iter().map(|d| format!("{d:#x}")).collect();
        format!("KVM_EXIT_INTERNAL_ERROR suberror {} ({what}), data [{}]", internal.suberror, data.join(", "))
    }

    /// Records where the guest is (between two instructions: KVM_RUN
    /// returned EINTR).
    fn sample(&self, profile: &Profile) {
        if let (Ok(regs), Ok(sregs)) = (self.fd.get_regs(), self.fd.get_sregs()) {
            let word = profile.percpu().filter(|_| sregs.cs.selector & 3 == 0).and_then(|off| self.read_percpu(&sregs, off));
            profile.record(self.id, &regs, &sregs, word);
        }
    }

    /// The guest's 32-bit word at GS base + `offset` (a per-cpu variable
    /// while the guest kernel runs), through the vCPU's page tables.
    fn read_percpu(&self, sregs: &kvm_bindings::kvm_sregs, offset: u64) -> Option<u32> {
        let t = self.fd.translate_gva(sregs.gs.base.wrapping_add(offset)).ok()?;
        if t.valid == 0 {
            return None;
        }
        self.shared.mem.read_obj::<u32>(GuestAddress(t.physical_address)).ok()
    }

    /// Registers and code bytes at RIP, for stderr.
    fn describe(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(regs), Ok(sregs)) => debug::describe(self.id, &regs, &sregs, &self.shared.mem),
            (Err(e), _) | (_, Err(e)) => format!("vCPU {}: cannot read the registers: {e}", self.id),
        }
    }

    /// Prints the reason (and the vCPU state) to stderr, then reports.
    fn report(&self, exit: VmExit, dump: bool, detail: &str) {
        let mut msg = format!("carapace-vmm: {exit}");
        if !detail.is_empty() && !msg.contains(detail) {
            msg.push_str(&format!(": {detail}"));
        }
        if dump {
            msg.push('\n');
            msg.push_str(&self.describe());
        }
        eprintln!("{msg}");
        self.shared.exit.send(exit);
    }
}
