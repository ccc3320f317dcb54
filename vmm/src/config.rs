//! The VM's typed configuration and its validation.
//!
//! A [`VmConfig`] is what the runtime hands `carapace-vmm` (as JSON through
//! `--config`) or what the binary builds from its flags. [`VmConfig::validate`]
//! checks everything that can be checked without creating the VM: files exist
//! and are what they claim to be, sizes are in range. Errors name the field,
//! the file or the value at fault.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::devices::virtio::fs::{self, FsConfig, FsError};
use crate::devices::virtio::net::{NetConfig, NetError, TapSource};

/// The smallest guest RAM we accept: the kernel image is loaded at 16 MiB
/// and needs room to unpack itself and the initramfs.
pub const MIN_MEM_MIB: u32 = 64;
/// The largest guest RAM we accept (1 TiB).
pub const MAX_MEM_MIB: u32 = 1 << 20;
/// The most vCPUs the MP table and the 8-bit APIC IDs allow (the IOAPIC
/// takes the ID after the last vCPU).
pub const MAX_VCPUS: u8 = 254;
/// The lowest CID a guest may have (0-2 are reserved by vsock).
pub const MIN_GUEST_CID: u64 = 3;
/// The highest CID a guest may have (`u32::MAX` is VMADDR_CID_ANY).
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;

const EM_X86_64: u16 = 62;

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SerialOutput {
    /// Discarded.
    None,
    /// The VMM's standard output.
    #[default]
    Stdout,
    /// Appended to a file (created if missing).
    File(PathBuf),
}

impl std::str::FromStr for SerialOutput {
    type Err = std::convert::Infallible;

    /// `stdout`, `none`, or anything else as a file path.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "stdout" => SerialOutput::Stdout,
            "none" => SerialOutput::None,
            path => SerialOutput::File(PathBuf::from(path)),
        })
    }
}

/// The hybrid-vsock device: its host-side Unix socket and the guest's CID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The Unix socket the VMM listens on (must not exist, or be a stale socket).
    pub uds_path: PathBuf,
    /// The guest's context ID (>= 3).
    pub guest_cid: u64,
}

fn default_vcpus() -> u8 {
    1
}

fn default_mem_mib() -> u32 {
    256
}

/// Everything `carapace-vmm` needs to run one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The uncompressed guest kernel (`vmlinux`, an x86_64 ELF).
    pub kernel: PathBuf,
    /// An optional initramfs (uncompressed cpio is fastest).
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    /// Extra kernel command line, appended after the VMM's own.
    #[serde(default)]
    pub cmdline: String,
    /// Number of vCPUs (>= 1).
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Guest RAM in MiB (>= 64).
    #[serde(default = "default_mem_mib")]
    pub mem_mib: u32,
    /// Where the serial console goes.
    #[serde(default)]
    pub serial: SerialOutput,
    /// The hybrid-vsock device, if any.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// virtio-fs devices, one host directory each, with distinct tags.
    #[serde(default)]
    pub fs: Vec<FsConfig>,
    /// virtio-net devices, one tap each, with distinct MACs (in this order
    /// on the MMIO bus, after vsock and fs: the guest's eth0, eth1, ...).
    #[serde(default)]
    pub net: Vec<NetConfig>,
    /// A directory: on SIGUSR2 the VMM pauses the VM, writes a snapshot
    /// there (`memory`, `state`) and exits with status 0.
    #[serde(default)]
    pub snapshot_to: Option<PathBuf>,
    /// A snapshot directory to start from instead of booting: `kernel`,
    /// `initramfs` and `cmdline` are then not loaded (and not checked);
    /// the devices' backends come from this config and must have the
    /// snapshot's shape.
    #[serde(default)]
    pub restore_from: Option<PathBuf>,
}

/// Why a configuration was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("cannot read config file {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("kernel {path}")]
    KernelUnreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {path} is not an x86_64 ELF vmlinux: {reason}")]
    KernelNotElf { path: PathBuf, reason: &'static str },
    #[error("initramfs {path}")]
    InitramfsUnreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("initramfs {path} is not a regular file")]
    InitramfsNotFile { path: PathBuf },
    #[error("mem_mib {0} is too small: the guest needs at least {MIN_MEM_MIB} MiB")]
    MemTooSmall(u32),
    #[error("mem_mib {0} is too large: at most {MAX_MEM_MIB} MiB")]
    MemTooLarge(u32),
    #[error("vcpus is 0: a VM needs at least 1 vCPU")]
    NoVcpus,
    #[error("vcpus {0} is too many: at most {MAX_VCPUS}")]
    TooManyVcpus(u8),
    #[error("vsock guest_cid {0} is invalid: it must be between {MIN_GUEST_CID} and {MAX_GUEST_CID}")]
    InvalidCid(u64),
    #[error("vsock uds_path is empty")]
    EmptyVsockPath,
    #[error("vsock uds_path {path}: directory {dir} does not exist")]
    VsockDirMissing { path: PathBuf, dir: PathBuf },
    #[error("vsock uds_path {0} exists and is not a socket")]
    VsockNotSocket(PathBuf),
    #[error("{field} {path} is not a directory")]
    NotADirectory { field: &'static str, path: PathBuf },
    #[error("serial: output file path is empty")]
    EmptySerialPath,
    #[error("cmdline contains a control character (byte {0:#04x}); the kernel command line is one line of text")]
    CmdlineControlChar(u8),
}

impl VmConfig {
    /// Reads a JSON config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile { path: path.to_path_buf(), source })?;
        serde_json::from_str(&text).map_err(|source| ConfigError::Parse { path: path.to_path_buf(), source })
    }

    /// Checks the config without creating anything. The vsock socket is only
    /// checked for obvious problems here; the device's constructor binds it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 {
            return Err(ConfigError::NoVcpus);
        }
        if self.vcpus > MAX_VCPUS {
            return Err(ConfigError::TooManyVcpus(self.vcpus));
        }
        if self.mem_mib < MIN_MEM_MIB {
            return Err(ConfigError::MemTooSmall(self.mem_mib));
        }
        if self.mem_mib > MAX_MEM_MIB {
            return Err(ConfigError::MemTooLarge(self.mem_mib));
        }
        if let Some(b) = self.cmdline.bytes().find(|b| b.is_ascii_control()) {
            return Err(ConfigError::CmdlineControlChar(b));
        }
        if let Some(dir) = &self.restore_from {
            if !dir.is_dir() {
                return Err(ConfigError::NotADirectory { field: "restore_from", path: dir.clone() });
            }
        } else {
            self.validate_boot_files()?;
        }
        if let Some(dir) = &self.snapshot_to {
            if !dir.is_dir() {
                return Err(ConfigError::NotADirectory { field: "snapshot_to", path: dir.clone() });
            }
        }
        if let SerialOutput::File(p) = &self.serial {
            if p.as_os_str().is_empty() {
                return Err(ConfigError::EmptySerialPath);
            }
        }
        if let Some(vsock) = &self.vsock {
            check_vsock(vsock)?;
        }
        fs::validate_tags(self.fs.iter().map(|f| f.tag.as_str()))?;
        for f in &self.fs {
            f.validate()?;
        }
        check_net(&self.net)?;
        Ok(())
    }

    /// The kernel and initramfs a boot loads.
    fn validate_boot_files(&self) -> Result<(), ConfigError> {
        check_kernel(&self.kernel)?;
        if let Some(initramfs) = &self.initramfs {
            let meta =
                std::fs::metadata(initramfs).map_err(|source| ConfigError::InitramfsUnreadable { path: initramfs.clone(), source })?;
            if !meta.is_file() {
                return Err(ConfigError::InitramfsNotFile { path: initramfs.clone() });
            }
            File::open(initramfs).map_err(|source| ConfigError::InitramfsUnreadable { path: initramfs.clone(), source })?;
        }
        Ok(())
    }

    /// The guest RAM size in bytes.
    pub fn mem_bytes(&self) -> u64 {
        u64::from(self.mem_mib) << 20
    }
}

/// Checks every net device and that no two share a MAC, an fd or a tap name.
fn check_net(net: &[NetConfig]) -> Result<(), NetError> {
    let mut seen = std::collections::HashSet::new();
    for n in net {
        n.validate()?;
        let tap = match &n.tap {
            TapSource::Fd(fd) => format!("fd {fd}"),
            TapSource::Name(name) => format!("tap {name:?}"),
        };
        for key in [format!("MAC {}", n.mac), tap] {
            if !seen.insert(key.clone()) {
                return Err(NetError::Duplicate(key));
            }
        }
    }
    Ok(())
}

/// Checks that `path` is a readable 64-bit little-endian x86_64 ELF executable.
pub fn check_kernel(path: &Path) -> Result<(), ConfigError> {
    let unreadable = |source| ConfigError::KernelUnreadable { path: path.to_path_buf(), source };
    let not_elf = |reason| ConfigError::KernelNotElf { path: path.to_path_buf(), reason };
    let meta = std::fs::metadata(path).map_err(unreadable)?;
    if !meta.is_file() {
        return Err(not_elf("not a regular file"));
    }
    let mut file = File::open(path).map_err(unreadable)?;
    let mut hdr = [0u8; 0x210];
    let mut got = 0;
    while got < hdr.len() {
        match file.read(&mut hdr[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(unreadable(e)),
        }
    }
    check_elf_header(&hdr[..got]).map_err(not_elf)
}

/// Checks the first bytes of a kernel image; returns why it is not usable.
pub fn check_elf_header(hdr: &[u8]) -> Result<(), &'static str> {
    if hdr.len() >= 0x206 && &hdr[0x202..0x206] == b"HdrS" {
        return Err("it is a bzImage; use the uncompressed vmlinux");
    }
    if hdr.len() < 64 {
        return Err("file too short for an ELF header");
    }
    if &hdr[0..4] != b"\x7fELF" {
        if hdr.starts_with(b"MZ") {
            return Err("it is a PE/EFI image; use the uncompressed vmlinux");
        }
        return Err("no ELF magic");
    }
    if hdr[4] != 2 {
        return Err("not a 64-bit ELF");
    }
    if hdr[5] != 1 {
        return Err("not a little-endian ELF");
    }
    let machine = u16::from_le_bytes([hdr[18], hdr[19]]);
    if machine != EM_X86_64 {
        return Err("ELF machine is not x86_64");
    }
    let etype = u16::from_le_bytes([hdr[16], hdr[17]]);
    if etype != 2 {
        return Err("not an executable ELF (ET_EXEC)");
    }
    Ok(())
}

fn check_vsock(vsock: &VsockConfig) -> Result<(), ConfigError> {
    if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&vsock.guest_cid) {
        return Err(ConfigError::InvalidCid(vsock.guest_cid));
    }
    let path = &vsock.uds_path;
    if path.as_os_str().is_empty() {
        return Err(ConfigError::EmptyVsockPath);
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(ConfigError::VsockDirMissing { path: path.clone(), dir });
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(ConfigError::VsockNotSocket(path.clone()));
        }
        // A socket: in use or stale; the vsock device decides when it binds.
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Write;

    fn elf_header() -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[0..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        h[6] = 1;
        h[16..18].copy_from_slice(&2u16.to_le_bytes());
        h[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        h
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    fn good(dir: &Path) -> VmConfig {
        VmConfig {
            kernel: write(dir, "vmlinux", &elf_header()),
            initramfs: Some(write(dir, "initrd", b"070701")),
            cmdline: "foo=bar".into(),
            vcpus: 2,
            mem_mib: 128,
            serial: SerialOutput::File(dir.join("console.log")),
            vsock: Some(VsockConfig { uds_path: dir.join("v.sock"), guest_cid: 3 }),
            fs: Vec::new(),
            net: Vec::new(),
            snapshot_to: None,
            restore_from: None,
        }
    }

    #[test]
    fn net_devices_are_checked_before_the_vm() {
        use crate::devices::virtio::net::MacAddr;
        let d = tempfile::tempdir().unwrap();
        let net = |tap: TapSource, last: u8, mtu: u32| NetConfig { tap, mac: MacAddr([2, 0, 0, 0, 0, last]), mtu };
        let mut c = good(d.path());
        c.net = vec![net(TapSource::Fd(3), 1, 1500), net(TapSource::Name("tap1".into()), 2, 9000)];
        c.validate().unwrap();
        // In JSON as the runtime writes it, and back.
        let text = serde_json::to_string(&c).unwrap();
        assert!(text.contains(r#""net":[{"tap":{"fd":3},"mac":"02:00:00:00:00:01","mtu":1500}"#), "{text}");
        assert_eq!(serde_json::from_str::<VmConfig>(&text).unwrap(), c);

        let mut bad = c.clone();
        bad.net[1].mac = bad.net[0].mac;
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("MAC 02:00:00:00:00:01") && e.contains("more than one"), "{e}");
        let mut bad = c.clone();
        bad.net[1].tap = TapSource::Fd(3);
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("fd 3") && e.contains("more than one"), "{e}");
        let mut bad = c.clone();
        bad.net[0].mtu = 20;
        assert!(bad.validate().unwrap_err().to_string().contains("mtu 20"));
        let mut bad = c;
        bad.net[0].mac = MacAddr([3, 0, 0, 0, 0, 1]);
        assert!(bad.validate().unwrap_err().to_string().contains("03:00:00:00:00:01"));
    }

    #[test]
    fn fs_shares_are_checked_before_the_vm() {
        let d = tempfile::tempdir().unwrap();
        let share = |tag: &str, dir: PathBuf| FsConfig { tag: tag.into(), shared_dir: dir, read_only: false, cache: Default::default() };
        let mut c = good(d.path());
        c.fs = vec![share("root", d.path().join("missing"))];
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("missing"), "{e}");
        c.fs = vec![share("a", d.path().to_path_buf()), share("a", d.path().to_path_buf())];
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains('a'), "{e}");
        assert!(matches!(c.validate(), Err(ConfigError::Fs(FsError::DuplicateTag(_)))));
        c.fs = vec![share("a", d.path().to_path_buf())];
        c.validate().unwrap();
    }

    #[test]
    fn snapshot_directories_are_checked_and_a_restore_needs_no_kernel() {
        let d = tempfile::tempdir().unwrap();
        let mut c = good(d.path());
        c.kernel = d.path().join("no-such-vmlinux");
        c.initramfs = None;
        c.restore_from = Some(d.path().to_path_buf());
        c.snapshot_to = Some(d.path().to_path_buf());
        c.validate().unwrap();
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<VmConfig>(&text).unwrap(), c);
        c.restore_from = Some(d.path().join("missing"));
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("restore_from") && e.contains("missing"), "{e}");
        c.restore_from = None;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("no-such-vmlinux"), "{e}");
        let mut c = good(d.path());
        c.snapshot_to = Some(c.kernel.clone());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("snapshot_to") && e.contains("not a directory"), "{e}");
    }

    #[test]
    fn accepts_a_good_config() {
        let d = tempfile::tempdir().unwrap();
        good(d.path()).validate().unwrap();
    }

    #[test]
    fn elf_header_checks() {
        assert!(check_elf_header(&elf_header()).is_ok());
        let mut h = elf_header();
        h[18] = 40; // EM_ARM
        assert_eq!(check_elf_header(&h), Err("ELF machine is not x86_64"));
        let mut h = elf_header();
        h[4] = 1;
        assert_eq!(check_elf_header(&h), Err("not a 64-bit ELF"));
        assert_eq!(check_elf_header(b"hello"), Err("file too short for an ELF header"));
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert!(check_elf_header(&bz).unwrap_err().contains("bzImage"));
        assert_eq!(check_elf_header(&[0u8; 64]), Err("no ELF magic"));
    }

    #[test]
    fn rejects_bad_inputs_naming_them() {
        let d = tempfile::tempdir().unwrap();
        let base = good(d.path());

        let mut c = base.clone();
        c.kernel = d.path().join("missing");
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("kernel") && e.contains("missing"), "{e}");

        let mut c = base.clone();
        c.kernel = write(d.path(), "text", b"#!/bin/sh\necho this is not a kernel at all, not even close\n");
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("not an x86_64 ELF") && e.contains("text"), "{e}");

        let mut c = base.clone();
        c.initramfs = Some(d.path().join("nope.cpio"));
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("initramfs") && e.contains("nope.cpio"), "{e}");

        let mut c = base.clone();
        c.mem_mib = 32;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("mem_mib 32"), "{e}");

        let mut c = base.clone();
        c.vcpus = 0;
        assert!(matches!(c.validate(), Err(ConfigError::NoVcpus)));

        let mut c = base.clone();
        c.vsock = Some(VsockConfig { uds_path: d.path().join("v.sock"), guest_cid: 2 });
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("guest_cid 2"), "{e}");

        let mut c = base.clone();
        c.vsock = Some(VsockConfig { uds_path: d.path().join("no/such/dir/v.sock"), guest_cid: 3 });
        assert!(matches!(c.validate(), Err(ConfigError::VsockDirMissing { .. })));

        let mut c = base.clone();
        c.vsock = Some(VsockConfig { uds_path: base.kernel.clone(), guest_cid: 3 });
        assert!(matches!(c.validate(), Err(ConfigError::VsockNotSocket(_))));

        let mut c = base;
        c.cmdline = "a\nb".into();
        assert!(matches!(c.validate(), Err(ConfigError::CmdlineControlChar(b'\n'))));
    }

    #[test]
    fn json_round_trip_and_defaults() {
        let c: VmConfig = serde_json::from_str(r#"{"kernel": "/k"}"#).unwrap();
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.mem_mib, 256);
        assert_eq!(c.serial, SerialOutput::Stdout);
        assert!(c.vsock.is_none() && c.initramfs.is_none() && c.cmdline.is_empty());

        let d = tempfile::tempdir().unwrap();
        let full = good(d.path());
        let text = serde_json::to_string(&full).unwrap();
        assert!(text.contains(r#""serial":{"file":"#), "{text}");
        assert_eq!(serde_json::from_str::<VmConfig>(&text).unwrap(), full);

        let c: VmConfig = serde_json::from_str(r#"{"kernel": "/k", "serial": "none"}"#).unwrap();
        assert_eq!(c.serial, SerialOutput::None);
        assert!(serde_json::from_str::<VmConfig>(r#"{"kernel": "/k", "vcpu": 2}"#).is_err());
    }

    #[test]
    fn config_file_errors_name_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "vm.json", b"{ not json");
        let e = VmConfig::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("vm.json"), "{e}");
        let e = VmConfig::from_file(&d.path().join("absent.json")).unwrap_err().to_string();
        assert!(e.contains("absent.json"), "{e}");
    }

    #[test]
    fn serial_output_from_str() {
        assert_eq!("stdout".parse::<SerialOutput>().unwrap(), SerialOutput::Stdout);
        assert_eq!("none".parse::<SerialOutput>().unwrap(), SerialOutput::None);
        assert_eq!("/tmp/x".parse::<SerialOutput>().unwrap(), SerialOutput::File("/tmp/x".into()));
    }
}
