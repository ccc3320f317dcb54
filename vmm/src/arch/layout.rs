//! Where things live in guest-physical memory.
//!
//! ```text
//! 0x0000_0500  GDT (4 entries), 0x520 IDT (empty)
//! 0x0000_7000  zero page (struct boot_params)
//! 0x0000_8ff0  boot stack top
//! 0x0000_9000  PML4, 0xa000 PDPT, 0xb000.. page directories (one per GiB)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA (reserved)        0x000f_0000 MP table (reserved "BIOS ROM")
//! 0x0010_0000  RAM ... kernel at its ELF physical address (16 MiB) ... initrd at the top of low RAM
//! 0xc000_0000  MMIO hole: virtio-mmio at 0xd000_0000 + i * 4 KiB, IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000
//! 0x1_0000_0000 RAM above 3 GiB continues here
//! ```

use vm_memory::GuestAddress;

/// The boot GDT.
pub const GDT_ADDR: u64 = 0x500;
/// The (empty) boot IDT.
pub const IDT_ADDR: u64 = 0x520;
/// `struct boot_params`, handed to the kernel in RSI.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial RSP/RBP of the boot vCPU.
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// Top-level page table.
pub const PML4_ADDR: u64 = 0x9000;
/// The one page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// First page directory (2 MiB pages); one per identity-mapped GiB.
pub const PD_ADDR: u64 = 0xb000;
/// How many GiB the boot page tables can map (PDs up to 0xf000).
pub const MAX_IDENTITY_GIB: u64 = 4;
/// The kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Start of the Extended BIOS Data Area: base RAM ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// End of the legacy VGA/ROM window below 1 MiB.
pub const EBDA_END: u64 = 0xa0000;
/// The "BIOS ROM" range Linux scans for the MP floating pointer.
pub const BIOS_ROM_START: u64 = 0xf0000;
/// The MP floating pointer, followed by the MP configuration table.
pub const MPTABLE_ADDR: u64 = BIOS_ROM_START;
/// Start of high memory.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole: RAM below 4 GiB stops here.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// 4 GiB: RAM beyond the hole resumes here.
pub const FOUR_GIB: u64 = 1 << 32;
/// First virtio-mmio window.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// GSI of the first virtio-mmio device (then 6, 7, ...).
pub const VIRTIO_FIRST_GSI: u32 = 5;
/// The last IOAPIC pin usable for virtio devices.
pub const VIRTIO_LAST_GSI: u32 = 23;
/// The in-kernel IOAPIC.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The local APICs.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Three pages KVM needs for the TSS on Intel (inside the hole, below the BIOS area).
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;
/// COM1.
pub const SERIAL_PORT: u16 = 0x3f8;
/// COM1's ISA interrupt.
pub const SERIAL_IRQ: u32 = 4;
/// The i8042 keyboard controller's data port (command port is +4).
pub const I8042_PORT: u16 = 0x60;

/// The guest RAM regions for `mem_bytes` of RAM: from 0 up to the MMIO hole,
/// and the rest from 4 GiB.
pub fn ram_regions(mem_bytes: u64) -> Vec<(GuestAddress, u64)> {
    let low = mem_bytes.min(MMIO_HOLE_START);
    let mut regions = vec![(GuestAddress(0), low)];
    if mem_bytes > low {
        regions.push((GuestAddress(FOUR_GIB), mem_bytes - low));
    }
    regions
}

/// The end of RAM below the hole.
pub fn low_ram_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_HOLE_START)
}

/// The window and GSI of virtio-mmio device number `index`, if there is room.
pub fn virtio_slot(index: usize) -> Option<(u64, u32)> {
    let i = u32::try_from(index).ok()?;
    let gsi = VIRTIO_FIRST_GSI.checked_add(i)?;
    if gsi > VIRTIO_LAST_GSI {
        return None;
    }
    Some((VIRTIO_MMIO_BASE + u64::from(i) * VIRTIO_MMIO_SIZE, gsi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_split_around_the_hole() {
        assert_eq!(ram_regions(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        assert_eq!(ram_regions(4 << 30), vec![(GuestAddress(0), MMIO_HOLE_START), (GuestAddress(FOUR_GIB), (4 << 30) - MMIO_HOLE_START)]);
        assert_eq!(low_ram_end(8 << 30), MMIO_HOLE_START);
    }

    #[test]
    fn virtio_slots() {
        assert_eq!(virtio_slot(0), Some((0xd000_0000, 5)));
        assert_eq!(virtio_slot(2), Some((0xd000_2000, 7)));
        assert_eq!(virtio_slot(18), Some((0xd001_2000, 23)));
        assert_eq!(virtio_slot(19), None);
    }

    #[test]
    fn fixed_tables_do_not_overlap() {
        const {
            assert!(GDT_ADDR + 4 * 8 <= IDT_ADDR);
            assert!(IDT_ADDR + 8 <= ZERO_PAGE_ADDR);
            assert!(ZERO_PAGE_ADDR + 0x1000 <= BOOT_STACK_TOP);
            assert!(BOOT_STACK_TOP < PML4_ADDR);
            assert!(PD_ADDR + MAX_IDENTITY_GIB * 0x1000 <= CMDLINE_ADDR);
            assert!(CMDLINE_ADDR + 0x1000 <= EBDA_START);
        }
    }
}
