//! User-mode vector state on kvm_pvm hosts.
//!
//! There the guest kernel boots with `noxsave` (the instruction emulator
//! cannot execute XSAVE/XRSTOR at CPL0), so it saves and restores only the
//! legacy FPU/SSE state of a task. Guest user mode, however, runs natively
//! with the host's CPUID and XCR0: glibc sees AVX/AVX-512 and picks its
//! AVX/EVEX string functions, whose YMM/ZMM registers a context switch can
//! then clobber in the middle of a `memcpy`. Measured: busybox processes
//! in containers died in glibc's start-up (a garbage pointer copied into
//! their TLS) a few times per run; none with AVX turned off in glibc.
//!
//! So when the kernel says `noxsave` the agent (a static glibc binary itself) re-executes itself once with
//! [`NO_AVX_TUNABLES`] in `GLIBC_TUNABLES`, and gives every container
//! process the same variable unless its spec sets `GLIBC_TUNABLES`. On any
//! other host nothing changes.

/// The environment variable glibc reads its tunables from.
pub const TUNABLES_ENV: &str = "GLIBC_TUNABLES";

/// glibc's string functions without AVX (SSE2 variants are used).
pub const NO_AVX_TUNABLES: &str = "glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,-AVX_Fast_Unaligned_Load";

/// Whether the kernel (its command line) will not preserve AVX state. Not
/// tied to what this process's CPUID check says: on some kvm_pvm hosts it
/// reports no AVX while a container's glibc may decide otherwise, and the
/// tunables are harmless where AVX is absent.
pub fn avx_state_unsafe(kernel_cmdline: &str) -> bool {
    kernel_lacks_xsave(kernel_cmdline)
}

fn kernel_lacks_xsave(kernel_cmdline: &str) -> bool {
    kernel_cmdline.split_whitespace().any(|w| w == "noxsave")
}

/// `GLIBC_TUNABLES=<NO_AVX_TUNABLES>`, as a process environment entry.
pub fn no_avx_env() -> String {
    format!("{TUNABLES_ENV}={NO_AVX_TUNABLES}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_noxsave_on_the_command_line() {
        assert!(!avx_state_unsafe("console=ttyS0 quiet"));
        assert!(!kernel_lacks_xsave("noxsaveopt"));
        assert!(kernel_lacks_xsave("quiet noxsave clearcpuid=cx16"));
        assert!(avx_state_unsafe("noxsave"));
        assert!(no_avx_env().starts_with("GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,"));
    }
}
