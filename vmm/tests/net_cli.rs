//! `carapace-vmm --net`, through the real binary: bad values are refused
//! with a message naming them before the guest runs a single instruction;
//! an inherited tap fd and a tap by name (with `--config`, too) start the VM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Output};

#[path = "../src/test_utils.rs"]
#[allow(dead_code)]
mod test_utils;

const VMM: &str = env!("CARGO_BIN_EXE_carapace-vmm");

/// Writes "X" on the serial port and resets the machine.
const PRINT_X: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'X', // mov al, 'X'
    0xee, // out dx, al
    0xb0, 0xfe, // mov al, 0xfe
    0xe6, 0x64, // out 0x64, al
    0xf4, 0xeb, 0xfd, // hlt; jmp hlt
];

struct Guest {
    dir: tempfile::TempDir,
}

impl Guest {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("guest.elf"), test_utils::tiny_elf(PRINT_X, 0x20_0000)).unwrap();
        Guest { dir }
    }

    fn args(&self) -> Vec<String> {
        let p = self.dir.path();
        ["--kernel", &p.join("guest.elf").display().to_string(), "--mem-mib", "64", "--serial"]
            .iter()
            .map(|s| s.to_string())
            .chain([p.join("console").display().to_string()])
            .collect()
    }

    fn console(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("console")).unwrap_or_default()
    }
}

fn run(args: &[String]) -> (Output, String) {
    let out = Command::new(VMM).args(args).env("CARAPACE_VMM_LOG", "debug").output().expect("run carapace-vmm");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stderr)
}

#[test]
fn bad_net_values_are_refused_by_name() {
    let g = Guest::new();
    for (net, code, needle) in [
        ("fd=3,mac=02:00:00:00:zz:01", 2, "02:00:00:00:zz:01"),
        ("fd=3,mac=01:00:00:00:00:01", 2, "01:00:00:00:00:01"),
        ("fd=3", 2, "missing mac"),
        ("mac=02:00:00:00:00:01", 2, "missing fd=N or tap=NAME"),
        ("tap=,mac=02:00:00:00:00:01", 2, "tap name is empty"),
        ("fd=3,mac=02:00:00:00:00:01,mtu=9", 2, "mtu 9"),
        ("fd=4242,mac=02:00:00:00:00:01", 1, "net fd 4242 is not open"),
    ] {
        let mut args = g.args();
        args.extend(["--net".to_string(), net.to_string()]);
        let (out, stderr) = run(&args);
        assert_eq!(out.status.code(), Some(code), "{net}: {stderr}");
        assert!(stderr.contains(needle), "{net}: {stderr}");
        assert_eq!(g.console(), "", "{net}: the guest must not have run");
    }
}

/// Opens a tap the runtime's way, in the calling thread's network namespace.
fn open_tap(name: &str) -> OwnedFd {
    // SAFETY: literal path, valid flags; the fd is inheritable on purpose.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR) };
    assert!(fd >= 0);
    // SAFETY: just opened, owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; zeros are valid.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = libc::c_char::from_ne_bytes([s]);
    }
    r.ifr_ifru.ifru_flags = i16::try_from(libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR).unwrap();
    // SAFETY: `r` is a valid ifreq.
    assert_eq!(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut r) }, 0);
    fd
}

#[test]
fn taps_by_fd_and_by_name_start_the_vm() {
    use carapace_test_support::{can_run, Need};
    if !can_run("taps_by_fd_and_by_name_start_the_vm", &[Need::Root, Need::Kvm, Need::Tun]) {
        return;
    }
    std::thread::spawn(|| {
        // SAFETY: unshare(CLONE_NEWNET) moves only this thread (and the
        // VMMs it starts) into a new network namespace.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
        let g = Guest::new();
        let tap = open_tap("cpcli0");
        let mut args = g.args();
        args.extend(
            ["--net", &format!("fd={},mac=02:00:00:00:00:01", tap.as_raw_fd()), "--net", "tap=cpcli1,mac=02:00:00:00:00:02,mtu=9000"]
                .map(String::from),
        );
        let (out, stderr) = run(&args);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        assert_eq!(g.console(), "X");
        assert!(stderr.contains("inherited tap") && stderr.contains("cpcli0"), "{stderr}");
        assert!(stderr.contains("tap opened by name") && stderr.contains("cpcli1"), "{stderr}");

        // --config plus --net (the runtime's way: fds stay off the file).
        let g = Guest::new();
        let config = g.dir.path().join("vm.json");
        let json = serde_json::json!({
            "kernel": g.dir.path().join("guest.elf"),
            "mem_mib": 64,
            "serial": {"file": g.dir.path().join("console")},
            "net": [{"tap": {"name": "cpcli2"}, "mac": "02:00:00:00:00:03"}],
        });
        std::fs::write(&config, json.to_string()).unwrap();
        let net = format!("fd={},mac=02:00:00:00:00:04", tap.as_raw_fd());
        let (out, stderr) = run(&["--config".into(), config.display().to_string(), "--net".into(), net]);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        assert_eq!(g.console(), "X");
        assert!(stderr.contains("cpcli2") && stderr.contains("cpcli0"), "{stderr}");

        // An fd that is open but no tap: refused before the guest runs.
        let g = Guest::new();
        let null = std::fs::File::open("/dev/null").unwrap();
        let nullfd = null.as_raw_fd();
        let mut args = g.args();
        args.extend(["--net".to_string(), format!("fd={nullfd},mac=02:00:00:00:00:01")]);
        let mut cmd = Command::new(VMM);
        cmd.args(&args);
        // SAFETY: runs in the child before exec; fcntl is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(nullfd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(&format!("net fd {nullfd} is not a usable tap")), "{stderr}");
        assert_eq!(g.console(), "");
    })
    .join()
    .unwrap();
}
