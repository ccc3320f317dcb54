//! `carapace check`: can this host run microVMs?

use std::fmt;
use std::fs::OpenOptions;
use std::io::Read;
use std::path::Path;

use carapace_vmm_config::host::HostKind;

use crate::assets::{self, GuestAssets};
use crate::config::{self, Config};

/// What kind of hardware virtualization the host's KVM offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmKind {
    /// Intel VT-x or AMD-V: the guest kernel runs natively.
    Hardware,
    /// `kvm_pvm`: the guest kernel is emulated (see PVM-HOSTS.md); slow but works.
    Pvm,
    /// Neither: KVM cannot run a guest here.
    None,
}

/// Reads the host's virtualization kind from sysfs and /proc/cpuinfo.
pub fn kvm_kind() -> KvmKind {
    if HostKind::detect() == HostKind::Pvm {
        return KvmKind::Pvm;
    }
    let mut cpuinfo = String::new();
    let read = std::fs::File::open("/proc/cpuinfo").and_then(|mut f| f.read_to_string(&mut cpuinfo));
    if read.is_ok() && cpu_flags_have_virt(&cpuinfo) {
        KvmKind::Hardware
    } else {
        KvmKind::None
    }
}

fn cpu_flags_have_virt(cpuinfo: &str) -> bool {
    cpuinfo.lines().filter(|l| l.starts_with("flags")).flat_map(|l| l.split_whitespace()).any(|f| f == "vmx" || f == "svm")
}

/// One line of the check report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckItem {
    pub ok: bool,
    pub what: &'static str,
    pub detail: String,
}

impl fmt::Display for CheckItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = if self.ok { "ok  " } else { "FAIL" };
        write!(f, "{mark} {:<10} {}", self.what, self.detail)
    }
}

fn item(ok: bool, what: &'static str, detail: impl Into<String>) -> CheckItem {
    CheckItem { ok, what, detail: detail.into() }
}

/// Runs every host check and returns one item each.
pub fn check_host() -> Vec<CheckItem> {
    let mut items = Vec::new();
    items.push(match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => item(true, "/dev/kvm", "present and read-write"),
        Err(e) => item(false, "/dev/kvm", format!("cannot open: {e}")),
    });
    items.push(match kvm_kind() {
        KvmKind::Hardware => item(true, "kvm", "hardware virtualization (vmx/svm)"),
        KvmKind::Pvm => item(true, "kvm", "kvm_pvm (no vmx/svm): guest kernel emulated, boots in tens of seconds"),
        KvmKind::None => item(false, "kvm", "neither vmx/svm nor kvm_pvm found"),
    });
    let config = match config::load(None) {
        Ok(c) => {
            let from = c.source.as_ref().map_or_else(|| "built-in defaults (no file)".to_string(), |p| p.display().to_string());
            items.push(item(true, "config", from));
            c
        }
        Err(e) => {
            items.push(item(false, "config", crate::error::Chain(&e).to_string()));
            Config::default()
        }
    };
    // Same precedence as GuestAssets::locate_with: environment, config, default.
    let kernel = std::env::var_os("CARAPACE_KERNEL")
        .map(Into::into)
        .or_else(|| config.kernel.clone())
        .unwrap_or_else(|| Path::new(assets::DEFAULT_ASSET_DIR).join("vmlinux"));
    items.push(match elf_kind(&kernel) {
        Ok(()) => item(true, "kernel", kernel.display().to_string()),
        Err(e) => item(false, "kernel", format!("{}: {e}", kernel.display())),
    });
    let initramfs = std::env::var_os("CARAPACE_INITRAMFS")
        .map(Into::into)
        .or_else(|| config.initramfs.clone())
        .unwrap_or_else(|| Path::new(assets::DEFAULT_ASSET_DIR).join("initramfs.cpio"));
    items.push(match std::fs::metadata(&initramfs) {
        Ok(m) if m.is_file() => item(true, "initramfs", format!("{} ({} KiB)", initramfs.display(), m.len() / 1024)),
        Ok(_) => item(false, "initramfs", format!("{}: not a file", initramfs.display())),
        Err(e) => item(false, "initramfs", format!("{}: {e}", initramfs.display())),
    });
    items.push(match assets::locate_vmm(&config) {
        Ok(p) => item(true, "vmm", p.display().to_string()),
        Err(e) => item(false, "vmm", e.to_string()),
    });
    items
}

/// Checks that `path` is a 64-bit x86 ELF executable (a `vmlinux`).
fn elf_kind(path: &Path) -> Result<(), String> {
    let mut head = [0u8; 20];
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    f.read_exact(&mut head).map_err(|_| "too short to be an ELF file".to_string())?;
    if &head[..4] != b"\x7fELF" {
        return Err("not an ELF file (an uncompressed vmlinux is needed)".into());
    }
    if head[4] != 2 || u16::from_le_bytes([head[18], head[19]]) != 62 {
        return Err("not an x86_64 ELF".into());
    }
    Ok(())
}

/// True when every item passed.
pub fn all_ok(items: &[CheckItem]) -> bool {
    items.iter().all(|i| i.ok)
}

/// Locates assets for a boot check, for callers that already ran `check_host`.
pub fn assets_for_boot() -> Result<GuestAssets, assets::AssetError> {
    GuestAssets::locate()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virt_flags_are_found_only_in_flags_lines() {
        assert!(cpu_flags_have_virt("flags\t: fpu vme svm lm\n"));
        assert!(cpu_flags_have_virt("model\t: x\nflags\t: vmx\n"));
        assert!(!cpu_flags_have_virt("flags\t: fpu vme lm\nmodel name\t: svm chip\n"));
    }

    #[test]
    fn elf_check_names_the_problem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("k");
        std::fs::write(&p, b"MZ not an elf at all, sorry").expect("write");
        assert!(elf_kind(&p).expect_err("text file").contains("not an ELF"));
        let mut elf = b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\x02\0\x3e\0".to_vec();
        std::fs::write(&p, &elf).expect("write");
        assert!(elf_kind(&p).is_ok());
        elf[18] = 0xb7; // aarch64
        std::fs::write(&p, &elf).expect("write");
        assert!(elf_kind(&p).expect_err("wrong machine").contains("x86_64"));
        assert!(elf_kind(&dir.path().join("missing")).is_err());
    }
}
