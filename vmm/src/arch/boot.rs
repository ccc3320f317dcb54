//! Loading the guest: the vmlinux ELF, the initramfs, the command line and
//! the zero page (`struct boot_params` with its e820 map).

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::Elf;
use linux_loader::loader::{load_cmdline, Cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, ReadVolatile};

use super::layout::{
    low_ram_end, BIOS_ROM_START, CMDLINE_ADDR, EBDA_END, EBDA_START, FOUR_GIB, HIMEM_START, MMIO_HOLE_START, ZERO_PAGE_ADDR,
};
use crate::cmdline::CMDLINE_MAX_SIZE;

/// e820 type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type: reserved.
pub const E820_RESERVED: u32 = 2;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
const PAGE_SIZE: u64 = 0x1000;
/// [`CMDLINE_ADDR`] as the zero page's 32-bit field.
#[allow(clippy::cast_possible_truncation)] // 0x20000 fits.
const CMDLINE_PTR: u32 = CMDLINE_ADDR as u32;

/// Errors loading the guest's kernel, initramfs, command line or zero page.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot open kernel {path}")]
    OpenKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load kernel {path}")]
    LoadKernel {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("kernel {path} ends at {end:#x}, beyond guest RAM ({ram:#x}); give the VM more memory")]
    KernelTooBig { path: PathBuf, end: u64, ram: u64 },
    #[error("cannot open initramfs {path}")]
    OpenInitramfs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("initramfs {path} ({size} bytes) does not fit in guest RAM above the kernel; give the VM more memory")]
    InitramfsTooBig { path: PathBuf, size: u64 },
    #[error("cannot read initramfs {path} into guest memory")]
    ReadInitramfs {
        path: PathBuf,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("invalid kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("cannot write the kernel command line: {0}")]
    WriteCmdline(linux_loader::loader::Error),
    #[error("cannot write the zero page: {0}")]
    ZeroPage(linux_loader::configurator::Error),
}

/// Where the kernel was loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedKernel {
    /// The 64-bit entry point (physical).
    pub entry: u64,
    /// First byte after the image (including .bss).
    pub end: u64,
}

/// Where the initramfs was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedInitrd {
    pub addr: u64,
    pub size: u64,
}

/// Loads the vmlinux ELF at its physical addresses.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path, mem_bytes: u64) -> Result<LoadedKernel, LoadError> {
    let mut file = File::open(path).map_err(|source| LoadError::OpenKernel { path: path.into(), source })?;
    let res = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
        .map_err(|source| LoadError::LoadKernel { path: path.into(), source })?;
    let ram = low_ram_end(mem_bytes);
    if res.kernel_end > ram {
        return Err(LoadError::KernelTooBig { path: path.into(), end: res.kernel_end, ram });
    }
    Ok(LoadedKernel { entry: res.kernel_load.0, end: res.kernel_end })
}

/// Where an initrd of `size` bytes goes: page-aligned, as high as possible
/// below the end of low RAM, and above `kernel_end`.
pub fn initrd_addr(size: u64, kernel_end: u64, mem_bytes: u64) -> Option<u64> {
    let top = low_ram_end(mem_bytes);
    let addr = top.checked_sub(size)? & !(PAGE_SIZE - 1);
    (addr >= kernel_end.next_multiple_of(PAGE_SIZE)).then_some(addr)
}

/// Reads the initramfs into guest memory below the top of low RAM.
pub fn load_initrd(mem: &GuestMemoryMmap, path: &Path, kernel_end: u64, mem_bytes: u64) -> Result<LoadedInitrd, LoadError> {
    let mut file = File::open(path).map_err(|source| LoadError::OpenInitramfs { path: path.into(), source })?;
    let size = file.metadata().map_err(|source| LoadError::OpenInitramfs { path: path.into(), source })?.len();
    let addr = initrd_addr(size, kernel_end, mem_bytes).ok_or_else(|| LoadError::InitramfsTooBig { path: path.into(), size })?;
    let len = usize::try_from(size).map_err(|_| LoadError::InitramfsTooBig { path: path.into(), size })?;
    read_exact_into(mem, &mut file, addr, len).map_err(|source| LoadError::ReadInitramfs { path: path.into(), source })?;
    Ok(LoadedInitrd { addr, size })
}

fn read_exact_into<F: ReadVolatile>(mem: &GuestMemoryMmap, src: &mut F, addr: u64, len: usize) -> Result<(), vm_memory::GuestMemoryError> {
    mem.read_exact_volatile_from(GuestAddress(addr), src, len)
}

/// Writes the NUL-terminated command line at [`CMDLINE_ADDR`]; returns its
/// length without the NUL.
pub fn write_cmdline(mem: &GuestMemoryMmap, line: &str) -> Result<usize, LoadError> {
    let cmdline = Cmdline::try_from(line, CMDLINE_MAX_SIZE).map_err(LoadError::Cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cmdline).map_err(LoadError::WriteCmdline)?;
    Ok(line.len())
}

/// The e820 map for `mem_bytes` of RAM.
pub fn e820_map(mem_bytes: u64) -> Vec<boot_e820_entry> {
    let entry = |addr, size, type_| boot_e820_entry { addr, size, type_ };
    let low = low_ram_end(mem_bytes);
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, EBDA_END - EBDA_START, E820_RESERVED),
        entry(BIOS_ROM_START, HIMEM_START - BIOS_ROM_START, E820_RESERVED),
        entry(HIMEM_START, low - HIMEM_START, E820_RAM),
    ];
    if mem_bytes > MMIO_HOLE_START {
        map.push(entry(FOUR_GIB, mem_bytes - low, E820_RAM));
    }
    map
}

/// The zero page for a kernel entered at its 64-bit entry point.
pub fn boot_params(mem_bytes: u64, cmdline_len: usize, initrd: Option<LoadedInitrd>) -> boot_params {
    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    params.hdr.cmd_line_ptr = CMDLINE_PTR;
    params.hdr.cmdline_size = u32::try_from(cmdline_len).unwrap_or(u32::MAX);
    if let Some(rd) = initrd {
        // Both below the 3 GiB hole, so the 32-bit fields hold them.
        params.hdr.ramdisk_image = u32::try_from(rd.addr).unwrap_or(0);
        params.hdr.ramdisk_size = u32::try_from(rd.size).unwrap_or(0);
    }
    let map = e820_map(mem_bytes);
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = *e;
    }
    params.e820_entries = u8::try_from(map.len()).unwrap_or(u8::MAX);
    params
}

/// Writes the zero page at [`ZERO_PAGE_ADDR`] (through linux-loader).
pub fn write_boot_params(mem: &GuestMemoryMmap, params: &boot_params) -> Result<(), LoadError> {
    let bp = BootParams::new::<boot_params>(params, GuestAddress(ZERO_PAGE_ADDR));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&bp, mem).map_err(LoadError::ZeroPage)
}

/// Reads back a value written to the guest (tests and debugging).
pub fn read_zero_page(mem: &GuestMemoryMmap) -> Option<boot_params> {
    mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Write;

    #[test]
    fn e820_small_guest() {
        let m = e820_map(256 << 20);
        let v: Vec<(u64, u64, u32)> = m.iter().map(|e| (e.addr, e.size, e.type_)).collect();
        assert_eq!(
            v,
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x400, E820_RESERVED),
                (0xf0000, 0x10000, E820_RESERVED),
                (0x100000, (256 << 20) - 0x100000, E820_RAM),
            ]
        );
    }

    #[test]
    fn e820_big_guest_skips_the_hole() {
        let m = e820_map(5 << 30);
        assert_eq!(m.len(), 5);
        assert_eq!((m[3].addr, m[3].addr + m[3].size), (0x100000, 0xc000_0000));
        assert_eq!((m[4].addr, m[4].size, m[4].type_), (1 << 32, (5 << 30) - 0xc000_0000, E820_RAM));
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        let mem = 256u64 << 20;
        assert_eq!(initrd_addr(0x1000, 0x200_0000, mem), Some(mem - 0x1000));
        assert_eq!(initrd_addr(0x1001, 0x200_0000, mem), Some(mem - 0x2000));
        assert_eq!(initrd_addr(mem, 0x200_0000, mem), None);
        assert_eq!(initrd_addr(0x1000, 0x200_0000, 8 << 30), Some(0xc000_0000 - 0x1000));
    }

    #[test]
    fn zero_page_contents() {
        let rd = LoadedInitrd { addr: 0x0ff0_0000, size: 0x1234 };
        let p = boot_params(256 << 20, 100, Some(rd));
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!(u64::from(p.hdr.cmd_line_ptr), CMDLINE_ADDR);
        assert_eq!({ p.hdr.cmdline_size }, 100);
        assert_eq!({ p.hdr.ramdisk_image }, 0x0ff0_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!(p.e820_entries, 4);

        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_params(&mem, &p).unwrap();
        let back = read_zero_page(&mem).unwrap();
        assert_eq!({ back.hdr.ramdisk_image }, 0x0ff0_0000);
        assert_eq!({ back.e820_table[3].addr }, 0x100000);
    }

    #[test]
    fn cmdline_written_nul_terminated() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert_eq!(write_cmdline(&mem, "console=ttyS0 quiet").unwrap(), 19);
        let mut buf = [0u8; 20];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&buf, b"console=ttyS0 quiet\0");
    }

    #[test]
    fn initrd_loaded_at_the_top() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("rd");
        File::create(&p).unwrap().write_all(b"070701hello").unwrap();
        let mem_bytes = 64u64 << 20;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let rd = load_initrd(&mem, &p, 0x200_0000, mem_bytes).unwrap();
        assert_eq!(rd, LoadedInitrd { addr: mem_bytes - 0x1000, size: 11 });
        let mut buf = [0u8; 11];
        mem.read_slice(&mut buf, GuestAddress(rd.addr)).unwrap();
        assert_eq!(&buf, b"070701hello");
        let e = load_initrd(&mem, &p, mem_bytes, mem_bytes).unwrap_err().to_string();
        assert!(e.contains("does not fit"), "{e}");
    }

    #[test]
    fn loads_a_minimal_elf() {
        let elf = crate::test_utils::tiny_elf(&[0xf4, 0xeb, 0xfd, 0x90], 0x20_0000);
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("vmlinux");
        File::create(&p).unwrap().write_all(&elf).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let k = load_kernel(&mem, &p, 4 << 20).unwrap();
        assert_eq!(k, LoadedKernel { entry: 0x20_0000, end: 0x20_1000 });
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x20_0000)).unwrap(), 0x90fd_ebf4);
        assert!(load_kernel(&mem, &p, 0x20_0800).is_err());
    }
}
