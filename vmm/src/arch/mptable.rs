//! The Intel MultiProcessor Specification 1.4 table.
//!
//! Without ACPI, this is how Linux learns about the application processors,
//! the IOAPIC and how ISA interrupts reach it. The floating pointer and the
//! configuration table sit together at [`MPTABLE_ADDR`], inside the range
//! Linux scans (0xf0000-0xfffff).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{IOAPIC_ADDR, LAPIC_ADDR, MPTABLE_ADDR};
use super::TableError;

/// Number of IOAPIC pins we describe (the in-kernel IOAPIC has 24).
pub const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const BUS_ID_ISA: u8 = 0;
const SPEC_REV: u8 = 4;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Family 6 in the processor signature; the kernel only prints it.
const CPU_SIGNATURE: u32 = 0x600;
/// FPU and APIC present.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

/// Size of the floating pointer structure.
pub const FLOATING_POINTER_SIZE: usize = 16;
/// Size of the configuration table header.
pub const HEADER_SIZE: usize = 44;

/// The IOAPIC's ID: the one after the last vCPU's APIC ID.
pub fn ioapic_id(num_cpus: u8) -> u8 {
    num_cpus
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)).wrapping_neg()
}

/// Builds the floating pointer followed by the configuration table, for a
/// table placed at guest address `base`.
pub fn build(num_cpus: u8, base: u64) -> Vec<u8> {
    let table_addr = base + FLOATING_POINTER_SIZE as u64;
    let ioapic = ioapic_id(num_cpus);

    // Entries first, so the header can count and checksum them.
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        entries.push(ENTRY_PROCESSOR);
        entries.push(cpu); // local APIC ID
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, BUS_ID_ISA]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..IOAPIC_PINS {
        // type, interrupt type, flags (conforming polarity/trigger), bus, bus IRQ, IOAPIC, pin
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, BUS_ID_ISA, irq, ioapic, irq]);
        count += 1;
    }
    // LINT0 of the BSP: ExtINT (the 8259); LINT1 of every CPU: NMI.
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, BUS_ID_ISA, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, BUS_ID_ISA, 0, 0xff, 1]);
    count += 2;

    let table_len = HEADER_SIZE + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    // At most 254 CPUs: about 5.5 KiB.
    table.extend_from_slice(&u16::try_from(table_len).unwrap_or(u16::MAX).to_le_bytes());
    table.push(SPEC_REV);
    table.push(0); // checksum, below
    table.extend_from_slice(b"CARAPACE"); // OEM ID, 8 bytes
    table.extend_from_slice(b"MICROVM     "); // product ID, 12 bytes
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0); // reserved
    debug_assert_eq!(table.len(), HEADER_SIZE);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(FLOATING_POINTER_SIZE + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&u32::try_from(table_addr).unwrap_or(0).to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(SPEC_REV);
    out.push(0); // checksum, below
    out.extend_from_slice(&[0; 5]); // feature bytes: table present, no IMCR
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    out
}

/// Writes the MP table for `num_cpus` vCPUs at [`MPTABLE_ADDR`].
pub fn write(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), TableError> {
    let bytes = build(num_cpus, MPTABLE_ADDR);
    mem.write_slice(&bytes, GuestAddress(MPTABLE_ADDR)).map_err(|source| TableError::Write { what: "MP table", addr: MPTABLE_ADDR, source })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_header() {
        for cpus in [1u8, 2, 32, 254] {
            let t = build(cpus, MPTABLE_ADDR);
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0, "floating pointer checksum, {cpus} cpus");
            let phys = u32::from_le_bytes(t[4..8].try_into().unwrap());
            assert_eq!(u64::from(phys), MPTABLE_ADDR + 16);
            let table = &t[16..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = usize::from(u16::from_le_bytes([table[4], table[5]]));
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "table checksum, {cpus} cpus");
            let count = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(usize::from(count), usize::from(cpus) + 2 + 24 + 2);
            assert_eq!(u32::from_le_bytes(table[36..40].try_into().unwrap()), LAPIC_ADDR);
            assert!(t.len() <= 0x10000, "fits the BIOS area");
        }
    }

    #[test]
    fn entries() {
        let t = build(2, MPTABLE_ADDR);
        let e = &t[16 + HEADER_SIZE..];
        // Two processors: APIC IDs 0 (BSP) and 1.
        assert_eq!(&e[0..4], &[0, 0, APIC_VERSION, 3]);
        assert_eq!(&e[20..24], &[0, 1, APIC_VERSION, 1]);
        let e = &e[40..];
        assert_eq!(&e[0..8], b"\x01\x00ISA   ");
        assert_eq!(&e[8..12], &[2, 2, IOAPIC_VERSION, 1]);
        assert_eq!(u32::from_le_bytes(e[12..16].try_into().unwrap()), 0xfec0_0000);
        let ints = &e[16..];
        for irq in 0..24u8 {
            let i = &ints[usize::from(irq) * 8..][..8];
            assert_eq!(i, &[3, 0, 0, 0, 0, irq, 2, irq]);
        }
        let lints = &ints[24 * 8..];
        assert_eq!(&lints[0..8], &[4, 3, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&lints[8..16], &[4, 1, 0, 0, 0, 0, 0xff, 1]);
        assert_eq!(lints.len(), 16);
    }

    #[test]
    fn written_to_guest_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap();
        write(&mem, 4).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(MPTABLE_ADDR)).unwrap();
        assert_eq!(&sig, b"_MP_");
        mem.read_slice(&mut sig, GuestAddress(MPTABLE_ADDR + 16)).unwrap();
        assert_eq!(&sig, b"PCMP");
    }
}
