//! Test fixtures: tiny guest "kernels".

/// A 64-bit x86_64 ELF executable with one PT_LOAD segment holding `code`
/// at physical address `addr` (also the entry point).
pub fn tiny_elf(code: &[u8], addr: u64) -> Vec<u8> {
    let code_off = 0x100usize;
    let mut elf = vec![0u8; code_off];
    elf[0..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // 64-bit
    elf[5] = 1; // little-endian
    elf[6] = 1; // version
    elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf[20..24].copy_from_slice(&1u32.to_le_bytes());
    elf[24..32].copy_from_slice(&addr.to_le_bytes()); // e_entry
    elf[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    elf[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    elf[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    let len = code.len() as u64;
    let ph = &mut elf[64..120];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    ph[8..16].copy_from_slice(&(code_off as u64).to_le_bytes()); // p_offset
    ph[16..24].copy_from_slice(&addr.to_le_bytes()); // p_vaddr
    ph[24..32].copy_from_slice(&addr.to_le_bytes()); // p_paddr
    ph[32..40].copy_from_slice(&len.to_le_bytes()); // p_filesz
    ph[40..48].copy_from_slice(&len.next_multiple_of(0x1000).to_le_bytes()); // p_memsz
    elf.extend_from_slice(code);
    elf
}
