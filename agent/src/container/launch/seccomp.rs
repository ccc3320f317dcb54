//! `linux.seccomp` as a BPF program, compiled once per container by
//! libseccomp (the filter libcontainer builds and loads), for the
//! launcher's children to load with one system call.
//!
//! libcontainer compiles and loads the filter inside the container's
//! process; a launched child may not allocate, so the agent compiles it
//! (`seccomp_export_bpf`) and the child only passes the program to
//! `seccomp(SECCOMP_SET_MODE_FILTER)`. Profiles with a notify action
//! (their listener descriptor has to reach a supervisor) stay with
//! libcontainer.

use std::ffi::c_ulong;
use std::io::{Read, Seek};
use std::os::fd::FromRawFd;

use libseccomp::{ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall};
use oci_spec::runtime::{Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompFilterFlag, LinuxSeccompOperator};

use super::raw;

/// A compiled filter and the flags it is loaded with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    program: Vec<libc::sock_filter>,
    flags: c_ulong,
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("linux.seccomp: {what}: {cause}")]
    Compile { what: String, cause: libseccomp::error::SeccompError },
    #[error("linux.seccomp: reading the compiled filter: {0}")]
    Export(std::io::Error),
    #[error("linux.seccomp: the compiled filter has {0} instructions, more than the kernel takes")]
    TooLong(usize),
}

fn action(action: LinuxSeccompAction, errno: Option<u32>) -> Result<ScmpAction, &'static str> {
    let errno = errno.and_then(|e| i32::try_from(e).ok()).unwrap_or(libc::EPERM);
    Ok(match action {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => ScmpAction::KillThread,
        LinuxSeccompAction::ScmpActKillProcess => ScmpAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => ScmpAction::Trap,
        LinuxSeccompAction::ScmpActErrno => ScmpAction::Errno(errno),
        LinuxSeccompAction::ScmpActTrace => ScmpAction::Trace(u16::try_from(errno).map_err(|_| "a trace action's errno")?),
        LinuxSeccompAction::ScmpActAllow => ScmpAction::Allow,
        LinuxSeccompAction::ScmpActLog => ScmpAction::Log,
        LinuxSeccompAction::ScmpActNotify => return Err("a seccomp notify action"),
    })
}

fn compare(op: LinuxSeccompOperator, value_two: Option<u64>) -> ScmpCompareOp {
    match op {
        LinuxSeccompOperator::ScmpCmpNe => ScmpCompareOp::NotEqual,
        LinuxSeccompOperator::ScmpCmpLt => ScmpCompareOp::Less,
        LinuxSeccompOperator::ScmpCmpLe => ScmpCompareOp::LessOrEqual,
        LinuxSeccompOperator::ScmpCmpEq => ScmpCompareOp::Equal,
        LinuxSeccompOperator::ScmpCmpGe => ScmpCompareOp::GreaterEqual,
        LinuxSeccompOperator::ScmpCmpGt => ScmpCompareOp::Greater,
        LinuxSeccompOperator::ScmpCmpMaskedEq => ScmpCompareOp::MaskedEqual(value_two.unwrap_or(0)),
    }
}

fn arch(arch: Arch) -> ScmpArch {
    use Arch::*;
    match arch {
        ScmpArchNative => ScmpArch::Native,
        ScmpArchX86 => ScmpArch::X86,
        ScmpArchX86_64 => ScmpArch::X8664,
        ScmpArchX32 => ScmpArch::X32,
        ScmpArchArm => ScmpArch::Arm,
        ScmpArchAarch64 => ScmpArch::Aarch64,
        ScmpArchMips => ScmpArch::Mips,
        ScmpArchMips64 => ScmpArch::Mips64,
        ScmpArchMips64n32 => ScmpArch::Mips64N32,
        ScmpArchMipsel => ScmpArch::Mipsel,
        ScmpArchMipsel64 => ScmpArch::Mipsel64,
        ScmpArchMipsel64n32 => ScmpArch::Mipsel64N32,
        ScmpArchPpc => ScmpArch::Ppc,
        ScmpArchPpc64 => ScmpArch::Ppc64,
        ScmpArchPpc64le => ScmpArch::Ppc64Le,
        ScmpArchS390 => ScmpArch::S390,
        ScmpArchS390x => ScmpArch::S390X,
        ScmpArchRiscv64 => ScmpArch::Riscv64,
        ScmpArchParisc => ScmpArch::Parisc,
        ScmpArchParisc64 => ScmpArch::Parisc64,
        ScmpArchLoongarch64 => ScmpArch::Loongarch64,
        ScmpArchM68k => ScmpArch::M68k,
        ScmpArchSh => ScmpArch::Sh,
        ScmpArchSheb => ScmpArch::Sheb,
    }
}

impl Filter {
    /// The program for `seccomp`; `Ok(Err(why))` when libcontainer has to
    /// load it.
    pub fn compile(seccomp: &LinuxSeccomp) -> Result<Result<Self, &'static str>, SeccompError> {
        let compile_error = |what: &str| {
            let what = what.to_string();
            move |cause| SeccompError::Compile { what: what.clone(), cause }
        };
        let default = match action(seccomp.default_action(), seccomp.default_errno_ret()) {
            Ok(a) => a,
            Err(why) => return Ok(Err(why)),
        };
        let mut ctx = ScmpFilterContext::new(default).map_err(compile_error("defaultAction"))?;
        // The flags are the seccomp() call's: loaded by the child itself.
        let mut flags = 0;
        for flag in seccomp.flags().as_deref().unwrap_or_default() {
            flags |= match flag {
                LinuxSeccompFilterFlag::SeccompFilterFlagLog => libc::SECCOMP_FILTER_FLAG_LOG,
                LinuxSeccompFilterFlag::SeccompFilterFlagTsync => libc::SECCOMP_FILTER_FLAG_TSYNC,
                LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW,
                LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => return Ok(Err("flag SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV")),
            };
        }
        for a in seccomp.architectures().as_deref().unwrap_or_default() {
            ctx.add_arch(arch(*a)).map_err(compile_error("architectures"))?;
        }
        for (i, rule) in seccomp.syscalls().as_deref().unwrap_or_default().iter().enumerate() {
            let act = match action(rule.action(), rule.errno_ret()) {
                Ok(a) => a,
                Err(why) => return Ok(Err(why)),
            };
            if act == default {
                // The default already does it (libseccomp refuses the rule).
                continue;
            }
            let comparisons: Vec<ScmpArgCompare> = rule
                .args()
                .as_deref()
                .unwrap_or_default()
                .iter()
                .map(|a| ScmpArgCompare::new(u32::try_from(a.index()).unwrap_or(u32::MAX), compare(a.op(), a.value_two()), a.value()))
                .collect();
            let mut indexes: Vec<usize> = rule.args().as_deref().unwrap_or_default().iter().map(|a| a.index()).collect();
            indexes.sort_unstable();
            let repeated = indexes.windows(2).any(|w| w[0] == w[1]);
            for name in rule.names() {
                // A name this kernel's libseccomp does not know: skipped, as
                // runc and libcontainer skip it.
                let Ok(nr) = ScmpSyscall::from_name(name) else { continue };
                let what = format!("syscalls[{i}] {name:?}");
                if repeated {
                    // One argument compared twice: one rule per comparison.
                    for c in &comparisons {
                        ctx.add_rule_conditional(act, nr, std::slice::from_ref(c)).map_err(compile_error(&what))?;
                    }
                } else {
                    ctx.add_rule_conditional(act, nr, &comparisons).map_err(compile_error(&what))?;
                }
            }
        }
        // SAFETY: memfd_create returns a new descriptor we own.
        let fd = unsafe { libc::memfd_create(c"seccomp-bpf".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(SeccompError::Export(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is ours (just created) and owned by the File alone.
        let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
        ctx.export_bpf(&file).map_err(compile_error("exporting the filter"))?;
        let mut bytes = Vec::new();
        file.rewind().and_then(|()| file.read_to_end(&mut bytes)).map_err(SeccompError::Export)?;
        let size = std::mem::size_of::<libc::sock_filter>();
        let program: Vec<libc::sock_filter> = bytes
            .chunks_exact(size)
            .map(|c| libc::sock_filter {
                code: u16::from_ne_bytes([c[0], c[1]]),
                jt: c[2],
                jf: c[3],
                k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect();
        if program.len() > usize::from(u16::MAX) {
            return Err(SeccompError::TooLong(program.len()));
        }
        Ok(Ok(Self { program, flags: c_ulong::from(flags) }))
    }

    /// Loads the filter into the calling process (a launched child:
    /// system calls only).
    pub fn load(&self) -> Result<(), i32> {
        let prog =
            libc::sock_fprog { len: u16::try_from(self.program.len()).unwrap_or(u16::MAX), filter: self.program.as_ptr().cast_mut() };
        // SAFETY: `prog` points into `self.program`, alive for the call.
        unsafe { raw::seccomp_filter(self.flags, &prog) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seccomp(v: serde_json::Value) -> LinuxSeccomp {
        serde_json::from_value(v).expect("seccomp")
    }

    #[test]
    fn a_profile_compiles_to_a_program() {
        let profile = seccomp(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64"],
            "flags": ["SECCOMP_FILTER_FLAG_LOG"],
            "syscalls": [
                {"names": ["mkdir", "no_such_syscall"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
                {"names": ["personality"], "action": "SCMP_ACT_ERRNO", "args": [
                    {"index": 0, "value": 0, "op": "SCMP_CMP_NE"}, {"index": 0, "value": 8, "op": "SCMP_CMP_NE"}
                ]},
                {"names": ["getpid"], "action": "SCMP_ACT_ALLOW"}
            ]
        }));
        let filter = Filter::compile(&profile).expect("compile").expect("direct");
        assert!(filter.program.len() > 4, "{filter:?}");
        assert_eq!(filter.flags, c_ulong::from(libc::SECCOMP_FILTER_FLAG_LOG));
        // BPF_RET of SECCOMP_RET_ALLOW somewhere (the default).
        assert!(filter.program.iter().any(|i| i.code == 0x06 && i.k == libc::SECCOMP_RET_ALLOW));
    }

    #[test]
    fn notify_stays_with_libcontainer() {
        let profile = seccomp(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]
        }));
        assert_eq!(Filter::compile(&profile).expect("compile"), Err("a seccomp notify action"));
    }
}
