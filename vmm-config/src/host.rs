//! Whether this host's KVM is `kvm_pvm`: no VMX/SVM, the guest kernel's
//! supervisor code is emulated instruction by instruction (see
//! `shared/PVM-HOSTS.md`). The VMM adds the switches such a guest needs to
//! its command line; `carapace check` reports it.

use std::path::Path;

/// Where `kvm_pvm` shows itself when loaded.
pub const PVM_MODULE_PATH: &str = "/sys/module/kvm_pvm";

/// The kind of KVM the VMM runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// Hardware virtualization (VMX/SVM): the guest runs natively.
    Native,
    /// `kvm_pvm`: the guest kernel is emulated and needs its own kernel
    /// switches.
    Pvm,
}

impl HostKind {
    /// Looks at this host.
    pub fn detect() -> Self {
        Self::detect_at(Path::new(PVM_MODULE_PATH))
    }

    /// Detection against an arbitrary module path (for tests).
    pub fn detect_at(module: &Path) -> Self {
        if module.exists() {
            HostKind::Pvm
        } else {
            HostKind::Native
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn detection_follows_the_module_directory() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(HostKind::detect_at(d.path()), HostKind::Pvm);
        assert_eq!(HostKind::detect_at(&d.path().join("kvm_pvm")), HostKind::Native);
    }
}
