//! Describing a stuck or crashed vCPU: registers, and the instruction bytes
//! at RIP found by walking the guest's own page tables. On hosts whose KVM
//! emulates the guest kernel (`kvm_pvm`), an emulation failure printed this
//! way names the next instruction the guest must avoid.

use std::fmt::Write as _;

use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const CR0_PG: u64 = 1 << 31;
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;
const PRESENT: u64 = 1;
const PAGE_SIZE_BIT: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// The linear address of the instruction pointer.
pub fn linear_rip(regs: &kvm_regs, sregs: &kvm_sregs) -> u64 {
    if sregs.efer & EFER_LMA != 0 && sregs.cs.l == 1 {
        regs.rip
    } else {
        sregs.cs.base.wrapping_add(regs.rip) & 0xffff_ffff
    }
}

fn read_u64(mem: &GuestMemoryMmap, addr: u64) -> Result<u64, String> {
    mem.read_obj::<u64>(GuestAddress(addr)).map_err(|_| format!("page-table entry at {addr:#x} is outside RAM"))
}

fn read_u32(mem: &GuestMemoryMmap, addr: u64) -> Result<u64, String> {
    mem.read_obj::<u32>(GuestAddress(addr)).map(u64::from).map_err(|_| format!("page-table entry at {addr:#x} is outside RAM"))
}

/// Translates a linear address with the paging mode in `sregs`, reading the
/// page tables from guest memory.
pub fn translate(mem: &GuestMemoryMmap, sregs: &kvm_sregs, la: u64) -> Result<u64, String> {
    if sregs.cr0 & CR0_PG == 0 {
        return Ok(la);
    }
    let not_present = |level: &str| format!("{la:#x} not mapped ({level} entry not present)");
    if sregs.efer & EFER_LMA != 0 {
        let levels: &[(&str, u32)] = if sregs.cr4 & CR4_LA57 != 0 {
            &[("PML5", 48), ("PML4", 39), ("PDPT", 30), ("PD", 21), ("PT", 12)]
        } else {
            &[("PML4", 39), ("PDPT", 30), ("PD", 21), ("PT", 12)]
        };
        let mut table = sregs.cr3 & ADDR_MASK;
        for &(name, shift) in levels {
            let e = read_u64(mem, table + ((la >> shift) & 0x1ff) * 8)?;
            if e & PRESENT == 0 {
                return Err(not_present(name));
            }
            if (shift == 30 || shift == 21) && e & PAGE_SIZE_BIT != 0 {
                let page_mask = (1u64 << shift) - 1;
                return Ok((e & ADDR_MASK & !page_mask) | (la & page_mask));
            }
            table = e & ADDR_MASK;
        }
        return Ok(table | (la & 0xfff));
    }
    if sregs.cr4 & CR4_PAE != 0 {
        let pdpte = read_u64(mem, (sregs.cr3 & 0xffff_ffe0) + ((la >> 30) & 3) * 8)?;
        if pdpte & PRESENT == 0 {
            return Err(not_present("PDPT"));
        }
        let pde = read_u64(mem, (pdpte & ADDR_MASK) + ((la >> 21) & 0x1ff) * 8)?;
        if pde & PRESENT == 0 {
            return Err(not_present("PD"));
        }
        if pde & PAGE_SIZE_BIT != 0 {
            return Ok((pde & ADDR_MASK & !0x1f_ffff) | (la & 0x1f_ffff));
        }
        let pte = read_u64(mem, (pde & ADDR_MASK) + ((la >> 12) & 0x1ff) * 8)?;
        if pte & PRESENT == 0 {
            return Err(not_present("PT"));
        }
        return Ok((pte & ADDR_MASK) | (la & 0xfff));
    }
    let pde = read_u32(mem, (sregs.cr3 & 0xffff_f000) + ((la >> 22) & 0x3ff) * 4)?;
    if pde & PRESENT == 0 {
        return Err(not_present("PD"));
    }
    if pde & PAGE_SIZE_BIT != 0 && sregs.cr4 & CR4_PSE != 0 {
        return Ok((pde & 0xffc0_0000) | (la & 0x3f_ffff));
    }
    let pte = read_u32(mem, (pde & 0xffff_f000) + ((la >> 12) & 0x3ff) * 4)?;
    if pte & PRESENT == 0 {
        return Err(not_present("PT"));
    }
    Ok((pte & 0xffff_f000) | (la & 0xfff))
}

/// Reads up to `len` bytes of code at linear address `la`, page by page.
/// Returns what could be read and, if it stopped early, why.
pub fn read_code(mem: &GuestMemoryMmap, sregs: &kvm_sregs, la: u64, len: usize) -> (Vec<u8>, Option<String>) {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let cur = la.wrapping_add(out.len() as u64);
        let pa = match translate(mem, sregs, cur) {
            Ok(pa) => pa,
            Err(e) => return (out, Some(e)),
        };
        let in_page = usize::try_from(0x1000 - (cur & 0xfff)).unwrap_or(1);
        let n = in_page.min(len - out.len());
        let mut buf = vec![0u8; n];
        if mem.read_slice(&mut buf, GuestAddress(pa)).is_err() {
            return (out, Some(format!("physical address {pa:#x} is outside RAM")));
        }
        out.extend_from_slice(&buf);
    }
    (out, None)
}

/// A multi-line description of a vCPU for stderr.
pub fn describe(cpu: u8, regs: &kvm_regs, sregs: &kvm_sregs, mem: &GuestMemoryMmap) -> String {
    let mut s = String::new();
    let la = linear_rip(regs, sregs);
    let _ = writeln!(s, "vCPU {cpu}: RIP {:#018x} (linear {la:#x})", regs.rip);
    match translate(mem, sregs, la) {
        Ok(pa) => {
            let (code, err) = read_code(mem, sregs, la, 16);
            let hex: Vec<String> = code.iter().map(|b| format!("{b:02x}")).collect();
            let _ = write!(s, "  code at RIP (phys {pa:#x}): {}", hex.join(" "));
            if let Some(e) = err {
                let _ = write!(s, " (then: {e})");
            }
            let _ = writeln!(s);
        }
        Err(e) => {
            let _ = writeln!(s, "  code at RIP: unreadable: {e}");
        }
    }
    let r = regs;
    let _ = writeln!(s, "  RAX {:016x} RBX {:016x} RCX {:016x} RDX {:016x}", r.rax, r.rbx, r.rcx, r.rdx);
    let _ = writeln!(s, "  RSI {:016x} RDI {:016x} RBP {:016x} RSP {:016x}", r.rsi, r.rdi, r.rbp, r.rsp);
    let _ = writeln!(s, "  R8  {:016x} R9  {:016x} R10 {:016x} R11 {:016x}", r.r8, r.r9, r.r10, r.r11);
    let _ = writeln!(s, "  R12 {:016x} R13 {:016x} R14 {:016x} R15 {:016x}", r.r12, r.r13, r.r14, r.r15);
    let _ = writeln!(
        s,
        "  RFLAGS {:08x} CS {:04x} (base {:x}, L={} DPL={}) SS {:04x}",
        r.rflags, sregs.cs.selector, sregs.cs.base, sregs.cs.l, sregs.cs.dpl, sregs.ss.selector
    );
    let _ = writeln!(s, "  CR0 {:x} CR2 {:x} CR3 {:x} CR4 {:x} EFER {:x}", sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.efer);
    let _ = write!(s, "  (look RIP up with: nm -n vmlinux | awk '$1 <= \"{:016x}\"' | tail -1)", regs.rip);
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::arch::paging::write_page_tables;

    fn long_mode(cr3: u64) -> kvm_sregs {
        let mut s = kvm_sregs { cr0: CR0_PG | 1, cr3, cr4: CR4_PAE, efer: EFER_LMA | (1 << 8), ..Default::default() };
        s.cs.l = 1;
        s
    }

    #[test]
    fn walks_the_boot_identity_map() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let cr3 = write_page_tables(&mem, 4 << 20).unwrap();
        let s = long_mode(cr3);
        assert_eq!(translate(&mem, &s, 0x12_3456).unwrap(), 0x12_3456);
        assert_eq!(translate(&mem, &s, 0x3fff_ffff).unwrap(), 0x3fff_ffff);
        assert!(translate(&mem, &s, 0x4000_0000).unwrap_err().contains("PDPT"));
        assert!(translate(&mem, &s, 0xffff_ffff_8100_0000).unwrap_err().contains("not mapped"));
    }

    #[test]
    fn walks_4k_pages_and_reads_across_them() {
        // PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000, mapping
        // linear 0xffff_ffff_8000_0000 + 0x0000/0x1000 to 0x10000/0x7000.
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let la: u64 = 0xffff_ffff_8000_0000;
        let w = |a: u64, v: u64| mem.write_obj(v, GuestAddress(a)).unwrap();
        w(0x1000 + ((la >> 39) & 0x1ff) * 8, 0x2003);
        w(0x2000 + ((la >> 30) & 0x1ff) * 8, 0x3003);
        w(0x3000 + ((la >> 21) & 0x1ff) * 8, 0x4003);
        w(0x4000, 0x10003);
        w(0x4008, 0x7003);
        let s = long_mode(0x1000);
        assert_eq!(translate(&mem, &s, la + 0xffe).unwrap(), 0x10ffe);
        assert_eq!(translate(&mem, &s, la + 0x1001).unwrap(), 0x7001);
        mem.write_slice(&[0x0f, 0x01], GuestAddress(0x10ffe)).unwrap();
        mem.write_slice(&[0xca, 0x90], GuestAddress(0x7000)).unwrap();
        let (code, err) = read_code(&mem, &s, la + 0xffe, 4);
        assert_eq!(code, vec![0x0f, 0x01, 0xca, 0x90]);
        assert!(err.is_none());
        let (code, err) = read_code(&mem, &s, la + 0x1ffe, 4);
        assert_eq!(code.len(), 2);
        assert!(err.unwrap().contains("PT entry not present"));
    }

    #[test]
    fn real_mode_and_32bit() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut s = kvm_sregs::default();
        s.cs.base = 0x9a000;
        let r = kvm_regs { rip: 0x10, ..Default::default() };
        assert_eq!(linear_rip(&r, &s), 0x9a010);
        assert_eq!(translate(&mem, &s, 0x9a010).unwrap(), 0x9a010);
        // 32-bit paging with a 4 MiB page mapping linear 0xc0000000 -> 0.
        mem.write_obj(0x83u32, GuestAddress(0x5000 + (0xc000_0000u64 >> 22) * 4)).unwrap();
        let s = kvm_sregs { cr0: CR0_PG | 1, cr3: 0x5000, cr4: CR4_PSE, ..Default::default() };
        assert_eq!(translate(&mem, &s, 0xc000_1234).unwrap(), 0x1234);
    }

    #[test]
    fn description_names_rip_and_bytes() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let cr3 = write_page_tables(&mem, 4 << 20).unwrap();
        mem.write_slice(&[0x0f, 0x0b], GuestAddress(0x20_0000)).unwrap();
        let regs = kvm_regs { rip: 0x20_0000, rax: 0xabc, ..Default::default() };
        let d = describe(1, &regs, &long_mode(cr3), &mem);
        assert!(d.contains("vCPU 1: RIP 0x0000000000200000"), "{d}");
        assert!(d.contains("code at RIP (phys 0x200000): 0f 0b 00"), "{d}");
        assert!(d.contains("RAX 0000000000000abc"), "{d}");
    }
}
