//! What a test needs from its host, and what happens when the host lacks
//! it. By default the test is skipped: it prints `SKIP <test>: <why>` and
//! returns early, so `cargo test` works on a laptop without `/dev/kvm` or
//! root. Under `CARAPACE_REQUIRE_KVM=1` (set by `.ci/run`) it fails instead,
//! naming what is missing, so a CI host that lost `/dev/kvm` or root cannot
//! pass by skipping every test that boots a VM.
//!
//! Every crate's tests go through [`can_run`] or [`skip`]; nothing else
//! returns early for lack of the host's resources. The crate depends on
//! nothing of the workspace, so any crate may dev-depend on it.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::Path;

/// The variable under which a test that cannot run here fails.
pub const REQUIRE_ENV: &str = "CARAPACE_REQUIRE_KVM";

/// Something a test needs from its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// `/dev/kvm`, opened read-write and answering KVM's API version.
    Kvm,
    /// Effective uid 0 (namespaces, mounts, cgroups, the VMM's file server).
    Root,
    /// `/dev/net/tun` (taps).
    Tun,
}

impl Need {
    /// Whether this host has it.
    pub fn present(self) -> bool {
        match self {
            Need::Kvm => kvm_usable(),
            Need::Root => {
                // SAFETY: geteuid has no preconditions and cannot fail.
                let euid = unsafe { libc::geteuid() };
                euid == 0
            }
            Need::Tun => Path::new("/dev/net/tun").exists(),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Need::Kvm => "/dev/kvm (read-write)",
            Need::Root => "root",
            Need::Tun => "/dev/net/tun",
        }
    }
}

/// `KVM_GET_API_VERSION`: `_IO(KVMIO, 0x00)`.
const KVM_GET_API_VERSION: libc::c_ulong = 0xae00;
/// The only KVM API version there is.
const KVM_API_VERSION: libc::c_int = 12;

/// `/dev/kvm` opens read-write and is KVM (not, say, a file bound over it).
fn kvm_usable() -> bool {
    let Ok(kvm) = OpenOptions::new().read(true).write(true).open("/dev/kvm") else {
        return false;
    };
    // SAFETY: KVM_GET_API_VERSION takes no argument and touches no memory;
    // on anything but KVM it fails (ENOTTY).
    let version = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION) };
    version == KVM_API_VERSION
}

/// Whether `CARAPACE_REQUIRE_KVM=1` is set.
pub fn required() -> bool {
    std::env::var_os(REQUIRE_ENV).is_some_and(|v| v == "1")
}

/// What to do with a test that lacks `missing`.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Run,
    Skip(String),
    Fail(String),
}

fn verdict(test: &str, missing: &[&str], required: bool) -> Verdict {
    if missing.is_empty() {
        return Verdict::Run;
    }
    let what = missing.join(", ");
    if required {
        Verdict::Fail(format!("{test}: this host lacks {what}, and {REQUIRE_ENV}=1 forbids skipping the test"))
    } else {
        Verdict::Skip(format!("SKIP {test}: needs {what}"))
    }
}

#[track_caller]
fn decide(test: &str, missing: &[&str]) -> bool {
    match verdict(test, missing, required()) {
        Verdict::Run => true,
        Verdict::Skip(note) => {
            eprintln!("{note}");
            false
        }
        Verdict::Fail(message) => panic!("{message}"),
    }
}

/// True when the host has every one of `needs`. Otherwise the test is
/// skipped (a note on stderr, false: the caller returns) or, under
/// `CARAPACE_REQUIRE_KVM=1`, fails here with what is missing.
#[track_caller]
pub fn can_run(test: &str, needs: &[Need]) -> bool {
    let missing: Vec<&str> = needs.iter().filter(|n| !n.present()).map(|n| n.describe()).collect();
    decide(test, &missing)
}

/// For a need the caller checked itself (a tool such as `ip`): skips the
/// test (false) or, under `CARAPACE_REQUIRE_KVM=1`, fails it. `what` names
/// what is missing.
#[track_caller]
pub fn skip(test: &str, what: &str) -> bool {
    decide(test, &[what])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_missing_runs() {
        assert_eq!(verdict("t", &[], false), Verdict::Run);
        assert_eq!(verdict("t", &[], true), Verdict::Run);
    }

    #[test]
    fn a_missing_need_skips_with_a_note_or_fails_when_required() {
        assert_eq!(
            verdict("boots", &["/dev/kvm (read-write)", "root"], false),
            Verdict::Skip("SKIP boots: needs /dev/kvm (read-write), root".into())
        );
        let Verdict::Fail(m) = verdict("boots", &["root"], true) else {
            panic!("required: must fail");
        };
        assert!(m.contains("boots") && m.contains("root") && m.contains(REQUIRE_ENV), "{m}");
    }

    #[test]
    fn a_file_bound_over_dev_kvm_is_not_kvm() {
        // /dev/null opens read-write but does not answer KVM's ioctl.
        let null = OpenOptions::new().read(true).write(true).open("/dev/null").expect("/dev/null");
        // SAFETY: as in kvm_usable; /dev/null fails the ioctl.
        let rc = unsafe { libc::ioctl(null.as_raw_fd(), KVM_GET_API_VERSION) };
        assert_ne!(rc, KVM_API_VERSION);
    }
}
