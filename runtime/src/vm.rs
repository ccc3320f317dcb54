//! Starting and stopping a sandbox VM: `carapace-vmm` as a child process with
//! a typed config, its console captured to a file, its agent reached over
//! the hybrid vsock socket.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use carapace_protocol::client::{self, ClientError};
pub use carapace_vmm_config::fs::{CacheMode as FsCacheMode, FsConfig};
use carapace_vmm_config::{SerialOutput, VmConfig, VsockConfig};

/// The VMM's cache mode for the operator's `shared_fs_cache`.
pub fn vmm_cache_mode(mode: crate::config::CacheMode) -> FsCacheMode {
    match mode {
        crate::config::CacheMode::None => FsCacheMode::None,
        crate::config::CacheMode::Auto => FsCacheMode::Auto,
        crate::config::CacheMode::Always => FsCacheMode::Always,
    }
}
use carapace_vmm_config::net::MacAddr;

use crate::assets::GuestAssets;

/// The guest CID every sandbox uses: each VM has its own vsock device, so
/// CIDs never meet.
pub const GUEST_CID: u64 = 3;

/// Errors starting or talking to a sandbox VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot write the VMM config {path}")]
    Config { path: PathBuf, source: std::io::Error },
    #[error("cannot start {vmm}")]
    Spawn { vmm: PathBuf, source: std::io::Error },
    #[error("the VMM exited ({status}) before its agent answered; VMM log: {log}; console tail:\n{console}")]
    EarlyExit { status: ExitStatus, log: String, console: String },
    #[error("the agent did not answer within {waited:?}: {err}; console tail:\n{console}")]
    AgentTimeout { waited: Duration, err: ClientError, console: String },
    #[error("waiting for the VMM")]
    Wait(#[source] std::io::Error),
    #[error("the VMM did not write its snapshot ({outcome}); VMM log:\n{log}")]
    Snapshot { outcome: String, log: String },
}

/// A network interface of a sandbox VM: a virtio-net device on a tap the
/// runtime opened and attached to the sandbox's network.
///
/// The tap must have been opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`
/// (the VMM checks, and fails to start otherwise); the VMM sets the 12-byte
/// virtio-net header size, turns offloads off and works on its own
/// duplicate, so the runtime may close its copy once the VM runs.
#[derive(Debug, Clone)]
pub struct NetDevice {
    /// The open tap file (shared: `VmOptions` is `Clone`).
    pub tap: Arc<OwnedFd>,
    /// The guest's MAC address (unicast).
    pub mac: [u8; 6],
    /// The MTU the guest is told (68..=65535; the tap's own MTU should match).
    pub mtu: u32,
}

/// Size and extras of a sandbox VM.
#[derive(Debug, Clone)]
pub struct VmOptions {
    pub vcpus: u8,
    pub mem_mib: u32,
    pub extra_cmdline: String,
    /// Host directories shared into the guest over virtio-fs.
    pub fs: Vec<FsConfig>,
    /// Network interfaces, in the order the guest sees them (eth0, eth1, ...).
    pub net: Vec<NetDevice>,
    /// Start from this snapshot (a template) instead of booting: it must
    /// have this VM's shape (a template: see the `template` module).
    pub restore_from: Option<PathBuf>,
    /// On SIGUSR2 the VMM writes a snapshot here and exits 0.
    pub snapshot_to: Option<PathBuf>,
}

impl Default for VmOptions {
    fn default() -> Self {
        Self {
            vcpus: crate::config::DEFAULT_VCPUS,
            mem_mib: crate::config::DEFAULT_MEMORY_MIB,
            extra_cmdline: String::new(),
            fs: Vec::new(),
            net: Vec::new(),
            restore_from: None,
            snapshot_to: None,
        }
    }
}

/// The `--net` arguments for `net`, and the fds the child must inherit.
///
/// Each tap keeps its number in the child: a number open in the parent
/// cannot clash with anything the child has open at exec (the standard
/// library's own exec-error pipe included), so no renumbering is needed;
/// only close-on-exec is cleared, on exactly these fds, in the child.
fn net_args(net: &[NetDevice]) -> (Vec<String>, Vec<RawFd>) {
    let mut args = Vec::new();
    let mut fds = Vec::new();
    for dev in net {
        let fd = dev.tap.as_raw_fd();
        args.push("--net".to_string());
        args.push(format!("fd={fd},mac={},mtu={}", MacAddr(dev.mac), dev.mtu));
        fds.push(fd);
    }
    (args, fds)
}

/// A running `carapace-vmm` and the files that belong to it in `dir`.
#[derive(Debug)]
pub struct Vm {
    child: Option<Child>,
    pid: u32,
    dir: PathBuf,
}

/// Where [`Vm::spawn`] records the VMM's pid and start time.
const PID_FILE: &str = "vmm.pid";

impl Vm {
    /// The hybrid vsock socket of a VM whose files live in `dir`.
    pub fn vsock_path(dir: &Path) -> PathBuf {
        dir.join("vsock.sock")
    }

    /// The guest console log of a VM whose files live in `dir`.
    pub fn console_path(dir: &Path) -> PathBuf {
        dir.join("console.log")
    }

    /// The VMM's pid and start time, as [`Vm::spawn`] wrote them into `dir`:
    /// what names the VMM before the container's record does (a `create`
    /// killed while the VM boots leaves a record without it).
    pub fn recorded_pid(dir: &Path) -> Option<(u32, u64)> {
        let text = std::fs::read_to_string(dir.join(PID_FILE)).ok()?;
        let (pid, started) = text.trim().split_once(' ')?;
        Some((pid.parse().ok()?, started.parse().ok()?))
    }

    /// The VMM started with `dir`'s config, found among the host's
    /// processes: the one [`Vm::recorded_pid`] misses when its starter was
    /// killed between the spawn and the write.
    pub fn find_running(dir: &Path) -> Option<(u32, u64)> {
        let config = dir.join("vmm.json");
        let config = config.as_os_str().as_encoded_bytes();
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let mut args = cmdline.split(|&b| b == 0);
            args.any(|a| a == b"--config").then_some(())?;
            (args.next()? == config).then_some(())?;
            Some((pid, crate::proc::start_time(pid)?))
        })
    }

    /// Writes the VMM config into `dir` and starts the VMM. `dir` must exist
    /// and be private to this VM.
    pub fn start(assets: &GuestAssets, dir: &Path, opts: &VmOptions) -> Result<Self, VmError> {
        Self::spawn(assets, dir, opts, false)
    }

    /// Like [`Vm::start`], and the VMM is killed when the calling thread's
    /// process dies, however it dies (the monitor owns its VM this way).
    /// Call from a thread that lives as long as the VM.
    pub fn start_owned(assets: &GuestAssets, dir: &Path, opts: &VmOptions) -> Result<Self, VmError> {
        Self::spawn(assets, dir, opts, true)
    }

    #[tracing::instrument(skip(assets, opts), fields(dir = %dir.display()))]
    fn spawn(assets: &GuestAssets, dir: &Path, opts: &VmOptions, owned: bool) -> Result<Self, VmError> {
        let config = VmConfig {
            kernel: assets.kernel.clone(),
            initramfs: Some(assets.initramfs.clone()),
            cmdline: opts.extra_cmdline.clone(),
            vcpus: opts.vcpus,
            mem_mib: opts.mem_mib,
            serial: SerialOutput::File(Self::console_path(dir)),
            vsock: Some(VsockConfig { uds_path: Self::vsock_path(dir), guest_cid: GUEST_CID }),
            fs: opts.fs.clone(),
            // Inherited fds are passed as `--net` arguments: a number in a
            // config file would outlive the process it means something in.
            net: Vec::new(),
            snapshot_to: opts.snapshot_to.clone(),
            restore_from: opts.restore_from.clone(),
        };
        let config_path = dir.join("vmm.json");
        let text = serde_json::to_vec_pretty(&config).map_err(|e| VmError::Config { path: config_path.clone(), source: e.into() })?;
        std::fs::write(&config_path, text).map_err(|source| VmError::Config { path: config_path.clone(), source })?;
        let log_path = dir.join("vmm.log");
        let log = File::create(&log_path).map_err(|source| VmError::Config { path: log_path.clone(), source })?;
        let log_err = log.try_clone().map_err(|source| VmError::Config { path: log_path.clone(), source })?;
        let mut cmd = Command::new(&assets.vmm);
        cmd.arg("--config").arg(&config_path).stdin(Stdio::null()).stdout(log).stderr(log_err);
        let (args, fds) = net_args(&opts.net);
        cmd.args(&args);
        if !fds.is_empty() {
            // SAFETY: runs in the forked child before exec; fcntl is
            // async-signal-safe, and `fds` was moved in (no allocation).
            unsafe {
                cmd.pre_exec(move || {
                    for &fd in &fds {
                        if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                })
            };
        }
        if owned {
            let parent = std::process::id();
            // SAFETY: runs in the forked child before exec; prctl and getppid
            // are async-signal-safe and touch no memory of the parent.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // The parent may have died before prctl took effect.
                    if u32::try_from(libc::getppid()).ok() != Some(parent) {
                        return Err(std::io::Error::other("the parent died before the VMM started"));
                    }
                    Ok(())
                })
            };
        }
        let child = cmd.spawn().map_err(|source| VmError::Spawn { vmm: assets.vmm.clone(), source })?;
        let pid = child.id();
        tracing::info!(pid, "VMM started");
        // Best effort: only `delete` of a half-made container reads it.
        if let Some(started) = crate::proc::start_time(pid) {
            let _ = std::fs::write(dir.join(PID_FILE), format!("{pid} {started}\n"));
        }
        Ok(Self { child: Some(child), pid, dir: dir.to_path_buf() })
    }

    /// The VMM's host pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits until the agent answers Health.Check with SERVING, or the VMM
    /// dies, or `timeout` passes.
    #[tracing::instrument(skip(self), fields(pid = self.pid))]
    pub fn wait_for_agent(&mut self, timeout: Duration) -> Result<ttrpc::Client, VmError> {
        let start = Instant::now();
        let uds = Self::vsock_path(&self.dir);
        loop {
            if let Some(status) = self.try_wait()? {
                return Err(VmError::EarlyExit {
                    status,
                    log: tail(&self.dir.join("vmm.log"), 2000),
                    console: tail(&Self::console_path(&self.dir), 2000),
                });
            }
            // Bounded attempts, so that a VMM that hangs is noticed too (one
            // that dies fails the attempt at once); not short ones: a loaded
            // host's emulated guest may take seconds to answer a call.
            let left = timeout.saturating_sub(start.elapsed());
            match client::wait_for_agent(&uds, left.min(Duration::from_secs(30))) {
                Ok(c) => {
                    tracing::info!(elapsed = ?start.elapsed(), "agent serving");
                    return Ok(c);
                }
                Err(source) if start.elapsed() >= timeout => {
                    return Err(VmError::AgentTimeout {
                        waited: start.elapsed(),
                        err: source,
                        console: tail(&Self::console_path(&self.dir), 2000),
                    })
                }
                Err(_) => {}
            }
        }
    }

    /// The exit status, if the VMM has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, VmError> {
        match self.child.as_mut() {
            Some(c) => c.try_wait().map_err(VmError::Wait),
            None => Ok(None),
        }
    }

    /// Waits up to `timeout` for the VMM to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, VmError> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= end {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Has the VMM (started with `snapshot_to`) write its snapshot and exit
    /// (SIGUSR2), and waits up to `timeout` for it to be done.
    pub fn snapshot(&mut self, timeout: Duration) -> Result<(), VmError> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid).unwrap_or(i32::MAX));
        if let Err(e) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR2) {
            return Err(VmError::Snapshot { outcome: format!("cannot signal pid {pid}: {e}"), log: tail(&self.dir.join("vmm.log"), 2000) });
        }
        let outcome = match self.wait_timeout(timeout)? {
            Some(status) if status.success() => return Ok(()),
            Some(status) => format!("exited {status}"),
            None => format!("still running after {timeout:?}"),
        };
        Err(VmError::Snapshot { outcome, log: tail(&self.dir.join("vmm.log"), 2000) })
    }

    /// Kills the VMM (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        // A killed VMM cannot unlink its socket.
        let _ = std::fs::remove_file(Self::vsock_path(&self.dir));
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `max` bytes of a text file, for error messages.
pub fn tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = File::open(path) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::PermissionsExt;

    fn pipe_fd() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both fds were just created and are owned by nothing else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    #[test]
    fn net_args_name_each_fd() {
        let (a, b) = pipe_fd();
        let net = vec![
            NetDevice { tap: Arc::new(a), mac: [2, 0, 0, 0, 0, 0xa1], mtu: 1500 },
            NetDevice { tap: Arc::new(b), mac: [2, 0, 0, 0, 0, 0xb2], mtu: 9000 },
        ];
        let (args, fds) = net_args(&net);
        let (fa, fb) = (net[0].tap.as_raw_fd(), net[1].tap.as_raw_fd());
        assert_eq!(fds, vec![fa, fb]);
        assert_eq!(
            args,
            vec![
                "--net".to_string(),
                format!("fd={fa},mac=02:00:00:00:00:a1,mtu=1500"),
                "--net".to_string(),
                format!("fd={fb},mac=02:00:00:00:00:b2,mtu=9000"),
            ]
        );
        assert!(VmOptions::default().net.is_empty());
    }

    /// The VMM child gets exactly the tap fds (and its stdio), with the
    /// `--net` arguments naming them; other fds of the runtime stay closed
    /// to it.
    #[test]
    fn the_vmm_inherits_the_tap_fds_and_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        let report = d.path().join("report");
        let fake = d.path().join("fake-vmm");
        // Records its arguments and open fds, then exits.
        std::fs::write(&fake, format!("#!/bin/sh\necho \"$@\" > {r}.args\nexec ls /proc/self/fd > {r}.fds\n", r = report.display()))
            .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let assets = GuestAssets { kernel: d.path().join("k"), initramfs: d.path().join("i"), vmm: fake };
        let (tap, other) = pipe_fd();
        // A number no process would open by chance (`ls` opens low ones).
        // SAFETY: F_DUPFD_CLOEXEC on an fd we own; the new fd is owned below.
        let other = unsafe { OwnedFd::from_raw_fd(libc::fcntl(other.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 200)) };
        let tap_fd = tap.as_raw_fd();
        let opts = VmOptions { net: vec![NetDevice { tap: Arc::new(tap), mac: [2, 0, 0, 0, 0, 1], mtu: 1500 }], ..VmOptions::default() };
        for owned in [false, true] {
            let mut vm =
                if owned { Vm::start_owned(&assets, d.path(), &opts) } else { Vm::start(&assets, d.path(), &opts) }.expect("start");
            assert!(vm.wait_timeout(Duration::from_secs(30)).unwrap().is_some());
            let args = std::fs::read_to_string(report.with_extension("args")).unwrap();
            assert!(args.contains(&format!("--net fd={tap_fd},mac=02:00:00:00:00:01,mtu=1500")), "{args}");
            assert!(args.contains("--config"), "{args}");
            let fds: Vec<i32> =
                std::fs::read_to_string(report.with_extension("fds")).unwrap().split_whitespace().filter_map(|s| s.parse().ok()).collect();
            assert!(fds.contains(&tap_fd), "{fds:?}");
            assert!(!fds.contains(&other.as_raw_fd()), "{fds:?}");
        }
        // The runtime's own copy is untouched (still close-on-exec).
        // SAFETY: F_GETFD on a number we own; no memory involved.
        let flags = unsafe { libc::fcntl(opts.net[0].tap.as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
    }

    /// `delete` of a container whose `create` died while the VM booted
    /// finds the VMM by what `spawn` wrote beside its config.
    #[test]
    fn the_vmm_pid_is_recorded_in_its_dir() {
        let d = tempfile::tempdir().unwrap();
        let fake = d.path().join("fake-vmm");
        // No exec: the shell keeps the VMM's arguments (its child, which
        // has them until it execs sleep, comes after it in /proc).
        std::fs::write(&fake, "#!/bin/sh\nsleep 30\n").unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let assets = GuestAssets { kernel: d.path().join("k"), initramfs: d.path().join("i"), vmm: fake };
        assert_eq!(Vm::recorded_pid(d.path()), None);
        let mut vm = Vm::start(&assets, d.path(), &VmOptions::default()).expect("start");
        let (pid, started) = Vm::recorded_pid(d.path()).expect("recorded");
        assert_eq!(pid, vm.pid());
        assert_eq!(Some(started), crate::proc::start_time(pid));
        // Without the record (its writer killed first), by its config path.
        std::fs::remove_file(d.path().join(PID_FILE)).unwrap();
        // A process's arguments read empty for a moment while it execs.
        let found = (0..100).find_map(|_| {
            Vm::find_running(d.path()).or_else(|| {
                std::thread::sleep(Duration::from_millis(50));
                None
            })
        });
        assert_eq!(found, Some((pid, started)));
        crate::proc::signal(pid, started, nix::sys::signal::Signal::SIGKILL);
        assert!(vm.wait_timeout(Duration::from_secs(30)).unwrap().is_some());
        assert_eq!(Vm::find_running(d.path()), None);
        std::fs::write(d.path().join(PID_FILE), "garbage").unwrap();
        assert_eq!(Vm::recorded_pid(d.path()), None);
    }

    /// Boots the real guest with a net device on a tap (in a throwaway
    /// network namespace): the guest driver takes the device (DRIVER_OK)
    /// and the agent still answers.
    #[test]
    #[ignore = "boots a microVM (minutes here): run with --ignored, CARAPACE_KERNEL, CARAPACE_INITRAMFS and CARAPACE_BIN_DIR set"]
    fn boots_with_a_net_device() {
        use carapace_test_support::{can_run, Need};
        if !can_run("boots_with_a_net_device", &[Need::Root, Need::Kvm, Need::Tun]) {
            return;
        }
        let assets = GuestAssets::locate().expect("guest assets");
        std::thread::spawn(move || {
            // SAFETY: moves only this thread (and the VMM it starts) into a
            // new network namespace.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            // SAFETY: literal path, valid flags.
            let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
            assert!(fd >= 0);
            // SAFETY: just opened, owned here.
            let tap = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: ifreq is plain data; zeros are valid.
            let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
            for (d, s) in r.ifr_name.iter_mut().zip(b"cpboot0") {
                *d = libc::c_char::from_ne_bytes([*s]);
            }
            r.ifr_ifru.ifru_flags = i16::try_from(libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR).unwrap();
            // SAFETY: `r` is a valid ifreq.
            assert_eq!(unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNSETIFF, &mut r) }, 0);
            // The VMM logs device activation at debug level.
            std::env::set_var("CARAPACE_VMM_LOG", "debug");
            let d = tempfile::tempdir().unwrap();
            let opts =
                VmOptions { net: vec![NetDevice { tap: Arc::new(tap), mac: [2, 0, 0, 0, 0, 7], mtu: 1500 }], ..VmOptions::default() };
            let mut vm = Vm::start(&assets, d.path(), &opts).expect("start");
            let agent = vm.wait_for_agent(Duration::from_secs(300));
            let log = std::fs::read_to_string(d.path().join("vmm.log")).unwrap_or_default();
            // Without the terminal colours tracing puts in.
            let mut plain = String::new();
            let mut in_escape = false;
            for c in log.chars() {
                match (in_escape, c) {
                    (false, '\u{1b}') => in_escape = true,
                    (false, c) => plain.push(c),
                    (true, 'm') => in_escape = false,
                    (true, _) => {}
                }
            }
            let log = plain;
            agent.unwrap_or_else(|e| panic!("{e}\nVMM log:\n{log}"));
            assert!(log.contains("device activated device=1"), "{log}");
            for line in log.lines().filter(|l| l.contains("net:")) {
                eprintln!("{line}");
            }
            assert!(!log.contains("needs a reset"), "{log}");
            vm.kill();
        })
        .join()
        .unwrap();
    }
}
