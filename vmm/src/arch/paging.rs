//! Identity-mapped boot page tables (PML4 -> PDPT -> PDs of 2 MiB pages).
//!
//! Linux's 64-bit entry only needs its image, the zero page, the command
//! line and the initrd reachable; it builds its own tables right away. We
//! map all RAM below the MMIO hole (at least 1 GiB, at most 4 GiB).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{MAX_IDENTITY_GIB, PDPT_ADDR, PD_ADDR, PML4_ADDR};
use super::TableError;

/// Present | writable.
pub const PTE_PRESENT_RW: u64 = 0x3;
/// Present | writable | page size (2 MiB / 1 GiB leaf).
pub const PTE_LARGE_PAGE: u64 = 0x83;

const GIB: u64 = 1 << 30;
const TWO_MIB: u64 = 1 << 21;

/// How many GiB the boot tables map for a guest whose low RAM ends at `low_ram_end`.
pub fn identity_gib(low_ram_end: u64) -> u64 {
    low_ram_end.div_ceil(GIB).clamp(1, MAX_IDENTITY_GIB)
}

/// Writes the tables; returns the value for CR3.
pub fn write_page_tables(mem: &GuestMemoryMmap, low_ram_end: u64) -> Result<u64, TableError> {
    let write =
        |what, addr: u64, val: u64| mem.write_obj(val, GuestAddress(addr)).map_err(|source| TableError::Write { what, addr, source });
    let gib = identity_gib(low_ram_end);
    // Clear the PML4 and PDPT pages: stale entries must not survive.
    for page in [PML4_ADDR, PDPT_ADDR] {
        mem.write_slice(&[0u8; 0x1000], GuestAddress(page)).map_err(|source| TableError::Write {
            what: "page table",
            addr: page,
            source,
        })?;
    }
    write("PML4", PML4_ADDR, PDPT_ADDR | PTE_PRESENT_RW)?;
    for g in 0..gib {
        let pd = PD_ADDR + g * 0x1000;
        write("PDPT", PDPT_ADDR + g * 8, pd | PTE_PRESENT_RW)?;
        for i in 0..512u64 {
            write("PD", pd + i * 8, (g * GIB + i * TWO_MIB) | PTE_LARGE_PAGE)?;
        }
    }
    Ok(PML4_ADDR)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap()
    }

    fn read(mem: &GuestMemoryMmap, addr: u64) -> u64 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    #[test]
    fn maps_one_gib_for_small_guests() {
        let m = mem();
        assert_eq!(write_page_tables(&m, 256 << 20).unwrap(), PML4_ADDR);
        assert_eq!(read(&m, PML4_ADDR), 0xa003);
        assert_eq!(read(&m, PML4_ADDR + 8), 0);
        assert_eq!(read(&m, PDPT_ADDR), 0xb003);
        assert_eq!(read(&m, PDPT_ADDR + 8), 0);
        assert_eq!(read(&m, PD_ADDR), 0x83);
        assert_eq!(read(&m, PD_ADDR + 8), 0x20_0083);
        assert_eq!(read(&m, PD_ADDR + 511 * 8), (511 << 21) | 0x83);
    }

    #[test]
    fn maps_more_for_bigger_guests() {
        assert_eq!(identity_gib(1 << 30), 1);
        assert_eq!(identity_gib((1 << 30) + 1), 2);
        assert_eq!(identity_gib(3 << 30), 3);
        assert_eq!(identity_gib(64 << 30), 4);
        let m = mem();
        write_page_tables(&m, 3 << 30).unwrap();
        assert_eq!(read(&m, PDPT_ADDR + 16), 0xd003);
        assert_eq!(read(&m, PDPT_ADDR + 24), 0);
        assert_eq!(read(&m, 0xd000), (2 << 30) | 0x83);
        assert_eq!(read(&m, 0xd000 + 511 * 8), ((2 << 30) + (511 << 21)) | 0x83);
    }
}
