//! The guest kernel command line, and the one host property it depends on:
//! whether KVM is `kvm_pvm` (no VMX/SVM; the guest kernel's supervisor code
//! is emulated instruction by instruction, see `shared/PVM-HOSTS.md`).

/// The Linux x86 `COMMAND_LINE_SIZE`, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// What every guest gets: console on the first UART, `reboot=k` so a reboot
/// reaches the VMM as an i8042 reset, no reboot loop on panic.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet nokaslr 8250.nr_uarts=1 random.trust_cpu=1 i8042.noaux";

/// What a `kvm_pvm` host needs on top: `carapace.pvm` switches on our guest
/// kernel's patches; the rest keeps the kernel away from instructions the
/// host's emulator lacks (and from slow paths). `percpu_alloc=page`: the
/// embedding allocator makes 2 MiB per-cpu chunks, whose 512-block free
/// map the kernel rescans on every per-cpu allocation (each mount and
/// cgroup makes some): 14 % of a container's create in the emulated
/// kernel; page-sized units keep the map short (create 2.5 -> 2.1 s).
pub const PVM_CMDLINE: &str = "carapace.pvm noxsave noreplace-smp rodata=off mitigations=off \
     clocksource=tsc tsc=reliable percpu_alloc=page \
     clearcpuid=cx16,smap,popcnt,fsgsbase,rdpid,invpcid,pcid,pku,114,erms,fsrm";

pub use carapace_vmm_config::host::{HostKind, PVM_MODULE_PATH};

/// A virtio-mmio device as the kernel must be told about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    /// Base address of the 4 KiB register window.
    pub addr: u64,
    /// Its interrupt (GSI / IOAPIC pin).
    pub gsi: u32,
    /// Size of the window.
    pub size: u64,
}

/// Errors building the command line.
#[derive(Debug, thiserror::Error)]
pub enum CmdlineError {
    #[error("kernel command line is {len} bytes, the kernel accepts at most {max} (shorten cmdline)", max = CMDLINE_MAX_SIZE - 1)]
    TooLong { len: usize },
    #[error("kernel command line contains a control character")]
    ControlChar,
}

/// Builds the full command line: base, host-specific switches, one
/// `virtio_mmio.device=` per device, then the user's `extra` (last, so it
/// can override and may end with `-- <init args>`).
pub fn build(host: HostKind, devices: &[MmioSlot], extra: &str) -> Result<String, CmdlineError> {
    let mut parts: Vec<String> = vec![BASE_CMDLINE.to_string()];
    if host == HostKind::Pvm {
        parts.push(PVM_CMDLINE.to_string());
    }
    for d in devices {
        parts.push(format!("virtio_mmio.device={}K@{:#x}:{}", d.size >> 10, d.addr, d.gsi));
    }
    let extra = extra.trim();
    if !extra.is_empty() {
        parts.push(extra.to_string());
    }
    let line = parts.join(" ");
    if line.bytes().any(|b| b.is_ascii_control()) {
        return Err(CmdlineError::ControlChar);
    }
    if line.len() >= CMDLINE_MAX_SIZE {
        return Err(CmdlineError::TooLong { len: line.len() });
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const VSOCK: MmioSlot = MmioSlot { addr: 0xd000_0000, gsi: 5, size: 0x1000 };

    #[test]
    fn native_host_gets_no_pvm_switches() {
        let line = build(HostKind::Native, &[VSOCK], "init=/init").unwrap();
        assert_eq!(line, format!("{BASE_CMDLINE} virtio_mmio.device=4K@0xd0000000:5 init=/init"));
        for w in ["carapace.pvm", "noxsave", "clearcpuid", "noreplace-smp", "percpu_alloc=page"] {
            assert!(!line.contains(w), "{w} in {line}");
        }
    }

    #[test]
    fn pvm_host_gets_its_switches_before_devices_and_extra() {
        let devs = [VSOCK, MmioSlot { addr: 0xd000_1000, gsi: 6, size: 0x1000 }];
        let line = build(HostKind::Pvm, &devs, "  foo -- arg ").unwrap();
        assert!(line.starts_with(&format!("{BASE_CMDLINE} carapace.pvm noxsave ")), "{line}");
        assert!(line.contains(" clearcpuid=cx16,smap,popcnt,fsgsbase,rdpid,invpcid,pcid,pku,114,erms,fsrm "));
        assert!(line.contains(" tsc=reliable percpu_alloc=page "));
        assert!(line.ends_with("virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 foo -- arg"));
    }

    #[test]
    fn empty_extra_adds_nothing() {
        assert_eq!(build(HostKind::Native, &[], "").unwrap(), BASE_CMDLINE);
    }

    #[test]
    fn too_long_or_control_chars_rejected() {
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(build(HostKind::Native, &[], &long), Err(CmdlineError::TooLong { .. })));
        assert!(matches!(build(HostKind::Native, &[], "a\tb"), Err(CmdlineError::ControlChar)));
    }
}
