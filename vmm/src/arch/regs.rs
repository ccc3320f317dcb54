//! Initial vCPU state for Linux's 64-bit boot protocol.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use tracing::warn;

use super::gdt::{segment_from_entry, BOOT_GDT, CODE_INDEX, DATA_INDEX, TSS_INDEX};
use super::layout::{BOOT_STACK_TOP, GDT_ADDR, IDT_ADDR, ZERO_PAGE_ADDR};

#[allow(clippy::cast_possible_truncation)] // 4 entries
const GDT_LIMIT: u16 = (BOOT_GDT.len() * 8 - 1) as u16;
const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_AM: u64 = 1 << 18;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// MSR_IA32_MISC_ENABLE and its fast-string bit.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MSR_MTRRdefType: MTRRs on, default type write-back.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// LAPIC register offsets and delivery modes.
pub const APIC_LVT0: usize = 0x350;
pub const APIC_LVT1: usize = 0x360;
pub const APIC_MODE_NMI: u32 = 0x4;
pub const APIC_MODE_EXTINT: u32 = 0x7;

/// Errors configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("vCPU {cpu}: {what}")]
    Kvm {
        cpu: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// The MSRs a Linux guest expects set at boot (index, value).
pub fn boot_msrs() -> Vec<(u32, u64)> {
    vec![
        (0x174, 0),       // SYSENTER_CS
        (0x175, 0),       // SYSENTER_ESP
        (0x176, 0),       // SYSENTER_EIP
        (0xc000_0081, 0), // STAR
        (0xc000_0082, 0), // LSTAR
        (0xc000_0083, 0), // CSTAR
        (0xc000_0084, 0), // SYSCALL_MASK
        (0xc000_0102, 0), // KERNEL_GS_BASE
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
}

/// General registers of the boot vCPU: RIP at the kernel's 64-bit entry,
/// RSI at the zero page.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs { rflags: 0x2, rip: entry, rsp: BOOT_STACK_TOP, rbp: BOOT_STACK_TOP, rsi: ZERO_PAGE_ADDR, ..Default::default() }
}

/// Special registers of the boot vCPU: flat segments from the boot GDT,
/// long mode with paging on `cr3`.
pub fn boot_sregs(mut sregs: kvm_sregs, cr3: u64) -> kvm_sregs {
    let code = segment_from_entry(BOOT_GDT[usize::from(CODE_INDEX)], CODE_INDEX);
    let data = segment_from_entry(BOOT_GDT[usize::from(DATA_INDEX)], DATA_INDEX);
    let tss = segment_from_entry(BOOT_GDT[usize::from(TSS_INDEX)], TSS_INDEX);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = GDT_LIMIT;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = (sregs.cr0 & !(CR0_CD | CR0_NW)) | CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG;
    sregs.cr3 = cr3;
    sregs.cr4 |= CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// x87 control word and MXCSR at their reset values.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

/// Reads a 32-bit LAPIC register from KVM's register page.
pub fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = |i: usize| lapic.regs[offset + i].to_ne_bytes()[0];
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

/// Writes a 32-bit LAPIC register in KVM's register page.
pub fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[offset + i] = std::os::raw::c_char::from_ne_bytes([byte]);
    }
}

/// Sets the delivery mode (bits 8-10) of a LVT entry.
pub fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// LINT0 = ExtINT (the PIC), LINT1 = NMI.
pub fn setup_lapic(vcpu: &VcpuFd, cpu: u8) -> Result<(), RegsError> {
    let kvm = |what| move |source| RegsError::Kvm { cpu, what, source };
    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let lvt0 = lapic_reg(&lapic, APIC_LVT0);
    set_lapic_reg(&mut lapic, APIC_LVT0, set_delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(&lapic, APIC_LVT1);
    set_lapic_reg(&mut lapic, APIC_LVT1, set_delivery_mode(lvt1, APIC_MODE_NMI));
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))
}

/// Sets the boot MSRs one by one; an MSR KVM refuses is reported and skipped
/// (some hosts, `kvm_pvm` among them, do not implement them all).
pub fn setup_msrs(vcpu: &VcpuFd, cpu: u8) -> Result<(), RegsError> {
    for (index, data) in boot_msrs() {
        let msrs = Msrs::from_entries(&[kvm_msr_entry { index, data, ..Default::default() }]).map_err(|_| RegsError::Kvm {
            cpu,
            what: "building the MSR list",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        match vcpu.set_msrs(&msrs) {
            Ok(1) => {}
            Ok(_) => warn!(cpu, "KVM did not accept MSR {index:#x} = {data:#x}; continuing without it"),
            Err(source) => return Err(RegsError::Kvm { cpu, what: "KVM_SET_MSRS", source }),
        }
    }
    Ok(())
}

/// Puts the boot vCPU at the kernel's 64-bit entry point.
pub fn setup_boot_cpu(vcpu: &VcpuFd, entry: u64, cr3: u64) -> Result<(), RegsError> {
    let kvm = |what| move |source| RegsError::Kvm { cpu: 0, what, source };
    let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    vcpu.set_sregs(&boot_sregs(sregs, cr3)).map_err(kvm("KVM_SET_SREGS"))?;
    vcpu.set_regs(&boot_regs(entry)).map_err(kvm("KVM_SET_REGS"))
}

/// FPU state every vCPU starts with.
pub fn setup_fpu(vcpu: &VcpuFd, cpu: u8) -> Result<(), RegsError> {
    vcpu.set_fpu(&boot_fpu()).map_err(|source| RegsError::Kvm { cpu, what: "KVM_SET_FPU", source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_sregs() {
        let base = kvm_sregs { cr0: 0x6000_0010, ..Default::default() };
        let s = boot_sregs(base, 0x9000);
        assert_eq!(s.cr0, 0x8005_0033);
        assert_eq!(s.cr3, 0x9000);
        assert_eq!(s.cr4 & CR4_PAE, CR4_PAE);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!((s.gdt.base, s.gdt.limit), (GDT_ADDR, 31));
        assert_eq!((s.cs.selector, s.cs.l, s.ds.selector, s.ss.selector, s.tr.selector), (8, 1, 16, 16, 24));
    }

    #[test]
    fn regs_point_at_entry_and_zero_page() {
        let r = boot_regs(0x100_0000);
        assert_eq!((r.rip, r.rsi, r.rsp, r.rflags), (0x100_0000, ZERO_PAGE_ADDR, BOOT_STACK_TOP, 2));
    }

    #[test]
    fn lapic_lvt_modes() {
        let mut l = kvm_lapic_state::default();
        set_lapic_reg(&mut l, APIC_LVT0, 0x0001_0000);
        assert_eq!(lapic_reg(&l, APIC_LVT0), 0x0001_0000);
        let v = set_delivery_mode(lapic_reg(&l, APIC_LVT0), APIC_MODE_EXTINT);
        assert_eq!(v, 0x0001_0700);
        assert_eq!(set_delivery_mode(0x0001_0700, APIC_MODE_NMI), 0x0001_0400);
        set_lapic_reg(&mut l, APIC_LVT1, 0xdead_beef);
        assert_eq!(lapic_reg(&l, APIC_LVT1), 0xdead_beef);
    }

    #[test]
    fn misc_enable_has_fast_strings() {
        assert!(boot_msrs().contains(&(MSR_IA32_MISC_ENABLE, 1)));
    }
}
