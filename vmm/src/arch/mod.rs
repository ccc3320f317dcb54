//! x86_64 guest setup: the physical memory layout, the tables a 64-bit Linux
//! entry needs (GDT, identity page tables, zero page with e820 map, MP table)
//! and the initial vCPU state (registers, CPUID, MSRs, LAPIC).

pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod paging;
pub mod regs;

use vm_memory::GuestMemoryError;

/// Errors writing the boot-time tables into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("cannot write the {what} at {addr:#x} into guest memory")]
    Write {
        what: &'static str,
        addr: u64,
        #[source]
        source: GuestMemoryError,
    },
}
