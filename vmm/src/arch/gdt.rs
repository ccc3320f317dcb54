//! The boot GDT: flat 64-bit code, flat data and a TSS descriptor, and the
//! segment registers loaded from it.

use kvm_bindings::kvm_segment;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{GDT_ADDR, IDT_ADDR};
use super::TableError;

/// Selector index of the code segment.
pub const CODE_INDEX: u16 = 1;
/// Selector index of the data segment.
pub const DATA_INDEX: u16 = 2;
/// Selector index of the TSS.
pub const TSS_INDEX: u16 = 3;

/// Packs a segment descriptor: `flags` holds the access byte (bits 0-7) and
/// the G/DB/L/AVL nibble (bits 12-15).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The boot GDT: null, code (64-bit, present, ring 0), data, TSS.
pub const BOOT_GDT: [u64; 4] = [0, gdt_entry(0xa09b, 0, 0xfffff), gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x808b, 0, 0xfffff)];

/// The KVM view of descriptor `entry` loaded with selector `index * 8`.
pub fn segment_from_entry(entry: u64, index: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    #[allow(clippy::cast_possible_truncation)] // masked to 20 bits
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = bit(55);
    let limit = if g == 1 { (raw_limit << 12) | 0xfff } else { raw_limit };
    let present = bit(47);
    kvm_segment {
        base,
        limit,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Writes the GDT and an empty IDT.
pub fn write_gdt_idt(mem: &GuestMemoryMmap) -> Result<(), TableError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        let addr = GDT_ADDR + (i as u64) * 8;
        mem.write_obj(*entry, GuestAddress(addr)).map_err(|source| TableError::Write { what: "GDT", addr, source })?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR)).map_err(|source| TableError::Write { what: "IDT", addr: IDT_ADDR, source })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn entries_match_the_architectural_encoding() {
        assert_eq!(BOOT_GDT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(BOOT_GDT[2], 0x00cf_9300_0000_ffff);
        assert_eq!(BOOT_GDT[3], 0x008f_8b00_0000_ffff);
        assert_eq!(gdt_entry(0x0093, 0x1234_5678, 0xabcde), 0x120a_9334_5678_bcde);
    }

    #[test]
    fn segments_decode_back() {
        let cs = segment_from_entry(BOOT_GDT[1], CODE_INDEX);
        assert_eq!((cs.selector, cs.type_, cs.present, cs.l, cs.db, cs.s, cs.g, cs.dpl), (8, 0xb, 1, 1, 0, 1, 1, 0));
        assert_eq!((cs.base, cs.limit, cs.unusable), (0, 0xffff_ffff, 0));
        let ds = segment_from_entry(BOOT_GDT[2], DATA_INDEX);
        assert_eq!((ds.selector, ds.type_, ds.l, ds.db, ds.s), (0x10, 3, 0, 1, 1));
        let tr = segment_from_entry(BOOT_GDT[3], TSS_INDEX);
        assert_eq!((tr.selector, tr.type_, tr.s, tr.present), (0x18, 0xb, 0, 1));
        let null = segment_from_entry(0, 0);
        assert_eq!(null.unusable, 1);
        let odd = segment_from_entry(gdt_entry(0x0093, 0x1234_5678, 0xabcde), 5);
        assert_eq!((odd.base, odd.limit, odd.g), (0x1234_5678, 0xabcde, 0));
    }

    #[test]
    fn gdt_lands_in_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        write_gdt_idt(&mem).unwrap();
        for (i, e) in BOOT_GDT.iter().enumerate() {
            assert_eq!(mem.read_obj::<u64>(GuestAddress(GDT_ADDR + 8 * i as u64)).unwrap(), *e);
        }
        assert_eq!(mem.read_obj::<u64>(GuestAddress(IDT_ADDR)).unwrap(), 0);
    }
}
