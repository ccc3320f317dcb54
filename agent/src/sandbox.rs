//! CreateSandbox and DestroySandbox: the guest-wide setup before the first
//! container (fresh entropy and the host's time first, then hostname, DNS
//! files, network interfaces and routes, the host's shared file systems,
//! sysctls) and its undoing. The system calls go through the
//! [`Syscall`] seam, so the order is unit-tested without root.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use carapace_protocol::agent;
use nix::mount::MsFlags;
use ttrpc::Code;

use crate::network::{NetworkConfig, NetworkError};
use crate::sys::{LinuxSyscall, Syscall};

/// How much entropy CreateSandbox takes (bytes): at least a CRNG seed's
/// worth (128 bits), at most what one RNDADDENTROPY should carry.
pub const ENTROPY_MIN: usize = 16;
pub const ENTROPY_MAX: usize = 4096;

/// Why a sandbox call failed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("invalid argument: {field}: {message}")]
    Invalid { field: String, message: String },
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{what}: {cause}")]
    Io { what: String, cause: io::Error },
    #[error("mounting {tag:?} on {}: {cause}", target.display())]
    Mount { tag: String, target: PathBuf, cause: nix::Error },
    #[error(transparent)]
    Network(#[from] NetworkError),
}

impl SandboxError {
    pub fn code(&self) -> Code {
        match self {
            Self::Invalid { .. } => Code::INVALID_ARGUMENT,
            Self::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            Self::Io { .. } | Self::Mount { .. } => Code::INTERNAL,
            Self::Network(e) => e.code(),
        }
    }

    fn io(what: impl Into<String>, source: io::Error) -> Self {
        Self::Io { what: what.into(), cause: source }
    }
}

impl From<SandboxError> for ttrpc::Error {
    fn from(e: SandboxError) -> Self {
        carapace_protocol::rpc_error(e.code(), e.to_string())
    }
}

/// Where /etc lives (the guest's own; tests point elsewhere).
pub struct Sandbox {
    etc: PathBuf,
    /// Whether to change the host-wide things (entropy, clock, hostname,
    /// network, mounts, sysctls): only in the guest, never when the agent
    /// serves on a host.
    guest: bool,
    sys: Arc<dyn Syscall>,
    mounted: Mutex<Option<Vec<PathBuf>>>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox").field("etc", &self.etc).field("guest", &self.guest).finish_non_exhaustive()
    }
}

/// Mount options of mount(8) -o: flags, and the rest as data.
pub fn mount_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => flags &= !MsFlags::MS_RDONLY,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "suid" => flags &= !MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "dev" => flags &= !MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "exec" => flags &= !MsFlags::MS_NOEXEC,
            "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "nodiratime" => flags |= MsFlags::MS_NODIRATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "defaults" | "" => {}
            other => data.push(other.to_string()),
        }
    }
    (flags, data.join(","))
}

impl Sandbox {
    pub fn new(etc: PathBuf, guest: bool) -> Self {
        Self::with_syscall(etc, guest, Arc::new(LinuxSyscall))
    }

    /// With the system calls made through `sys` (tests record them).
    pub fn with_syscall(etc: PathBuf, guest: bool, sys: Arc<dyn Syscall>) -> Self {
        Self { etc, guest, sys, mounted: Mutex::new(None) }
    }

    /// CreateSandbox.
    pub fn create(&self, req: &agent::CreateSandboxRequest) -> Result<agent::CreateSandboxResponse, SandboxError> {
        let _span = tracing::info_span!("create_sandbox", id = %req.sandbox_id).entered();
        let mut mounted = self.mounted.lock().unwrap_or_else(PoisonError::into_inner);
        if mounted.is_some() {
            return Err(SandboxError::FailedPrecondition("the sandbox already exists".into()));
        }
        let host_time = check_fresh_state(req)?;
        // Before anything else: until now this guest may share its random
        // state and clock with every VM restored from the same snapshot.
        if self.guest {
            self.refresh(&req.entropy, host_time)?;
        }
        for (i, fs) in req.shared_fs.iter().enumerate() {
            if fs.tag.is_empty() {
                return Err(SandboxError::Invalid { field: format!("shared_fs[{i}].tag"), message: "empty".into() });
            }
            if !fs.mount_point.starts_with('/') {
                return Err(SandboxError::Invalid {
                    field: format!("shared_fs[{i}].mount_point"),
                    message: format!("{:?} is not an absolute path", fs.mount_point),
                });
            }
        }
        if let Some(settings) = req.settings.as_ref() {
            let level = settings.log_level.trim();
            if !level.is_empty() && level.parse::<tracing_subscriber::filter::LevelFilter>().is_err() {
                return Err(SandboxError::Invalid {
                    field: "settings.log_level".into(),
                    message: format!("unknown level {level:?} (error, warn, info, debug, trace, off)"),
                });
            }
            for key in settings.sysctls.keys() {
                if key.is_empty() || key.contains("..") || key.contains('/') {
                    return Err(SandboxError::Invalid { field: format!("settings.sysctls[{key:?}]"), message: "not a sysctl name".into() });
                }
            }
        }
        let network = NetworkConfig::from_request(&req.interfaces, &req.routes)?;

        if !req.hostname.is_empty() {
            if self.guest {
                self.sys.sethostname(&req.hostname).map_err(|e| SandboxError::io("sethostname", e.into()))?;
            }
            self.write_etc("hostname", format!("{}\n", req.hostname).as_bytes())?;
        }
        if !req.resolv_conf.is_empty() {
            self.write_etc("resolv.conf", &req.resolv_conf)?;
        }
        if !req.hosts.is_empty() {
            self.write_etc("hosts", &req.hosts)?;
        }
        // Before the mounts, which a failure here would leave behind, and
        // before the sysctls, which may name the renamed devices
        // (net.ipv6.conf.eth0.*).
        if !network.is_empty() {
            if self.guest {
                network.apply()?;
            } else {
                tracing::warn!("not in a guest: the network is left as it is");
            }
        }

        let mut done: Vec<PathBuf> = Vec::new();
        for fs in &req.shared_fs {
            let target = PathBuf::from(&fs.mount_point);
            self.sys.mkdir_all(&target).map_err(|e| SandboxError::io(format!("creating {}", target.display()), e))?;
            let fstype = if fs.fs_type.is_empty() { "virtiofs" } else { fs.fs_type.as_str() };
            let (flags, data) = mount_options(&fs.options);
            let data = (!data.is_empty()).then_some(data.as_str());
            let result = self.sys.mount(&fs.tag, &target, fstype, flags, data);
            if let Err(source) = result {
                for t in done.iter().rev() {
                    let _ = self.sys.umount(t);
                }
                return Err(SandboxError::Mount { tag: fs.tag.clone(), target, cause: source });
            }
            tracing::info!(tag = %fs.tag, target = %target.display(), "shared file system mounted");
            done.push(target);
        }

        if let Some(settings) = req.settings.as_ref() {
            for (key, value) in &settings.sysctls {
                let path = Path::new("/proc/sys").join(key.replace('.', "/"));
                self.sys.write_file(&path, value.as_bytes()).map_err(|e| SandboxError::io(format!("sysctl {key}"), e))?;
            }
            // The older way to pass the host's time (host_time_unix_ns,
            // set first, supersedes it).
            if settings.wall_clock_unix_nano != 0 && req.host_time_unix_ns == 0 && self.guest {
                self.sys.set_realtime(settings.wall_clock_unix_nano).map_err(|e| SandboxError::io("setting the wall clock", e))?;
            }
            if !settings.log_level.is_empty() {
                crate::logging::set_level(&settings.log_level)
                    .map_err(|message| SandboxError::Invalid { field: "settings.log_level".into(), message })?;
            }
        }
        *mounted = Some(done);

        let mut resp = agent::CreateSandboxResponse::new();
        resp.kernel_release = nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
        Ok(resp)
    }

    /// DestroySandbox; `containers` is how many containers still exist.
    pub fn destroy(&self, containers: usize) -> Result<(), SandboxError> {
        if containers > 0 {
            return Err(SandboxError::FailedPrecondition(format!("{containers} container(s) still exist; remove them first")));
        }
        let mut mounted = self.mounted.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(targets) = mounted.take() else {
            return Ok(());
        };
        for t in targets.iter().rev() {
            if let Err(e) = self.sys.umount(t) {
                tracing::warn!(target = %t.display(), error = %e, "unmounting a shared file system");
            }
        }
        Ok(())
    }

    fn write_etc(&self, name: &str, data: &[u8]) -> Result<(), SandboxError> {
        let path = self.etc.join(name);
        std::fs::create_dir_all(&self.etc).map_err(|e| SandboxError::io(format!("creating {}", self.etc.display()), e))?;
        std::fs::write(&path, data).map_err(|e| SandboxError::io(format!("writing {}", path.display()), e))
    }
}

/// Checks the entropy's size and the host time's range; returns the time
/// as CLOCK_REALTIME takes it (0 = leave the clock).
fn check_fresh_state(req: &agent::CreateSandboxRequest) -> Result<i64, SandboxError> {
    let n = req.entropy.len();
    if n != 0 && !(ENTROPY_MIN..=ENTROPY_MAX).contains(&n) {
        return Err(SandboxError::Invalid { field: "entropy".into(), message: format!("{n} bytes (want {ENTROPY_MIN} to {ENTROPY_MAX})") });
    }
    i64::try_from(req.host_time_unix_ns).map_err(|_| SandboxError::Invalid {
        field: "host_time_unix_ns".into(),
        message: format!("{} is past what the clock can hold", req.host_time_unix_ns),
    })
}

impl Sandbox {
    /// Mixes the host's entropy into the pool (credited), reseeds the CRNG
    /// with it, then sets the wall clock to the host's.
    fn refresh(&self, entropy: &[u8], host_time: i64) -> Result<(), SandboxError> {
        if entropy.is_empty() {
            tracing::warn!("no entropy from the host: the guest's random state is the one it booted (or was restored) with");
        } else {
            self.sys.add_entropy(entropy).map_err(|e| SandboxError::io("adding the host's entropy (RNDADDENTROPY)", e))?;
            self.sys.reseed_crng().map_err(|e| SandboxError::io("reseeding the CRNG (RNDRESEEDCRNG)", e))?;
        }
        if host_time != 0 {
            self.sys.set_realtime(host_time).map_err(|e| SandboxError::io("setting the wall clock", e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::sys::test_utils::RecordingSyscall;

    fn guest(dir: &Path) -> (Sandbox, Arc<RecordingSyscall>) {
        let sys = Arc::new(RecordingSyscall::default());
        (Sandbox::with_syscall(dir.join("etc"), true, sys.clone()), sys)
    }

    #[test]
    fn entropy_and_host_time_come_before_anything_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (sandbox, sys) = guest(dir.path());
        let mut req = agent::CreateSandboxRequest::new();
        req.hostname = "pod".into();
        req.entropy = vec![0x5a; 64];
        req.host_time_unix_ns = 1_700_000_000_000_000_001;
        let mut fs = agent::SharedFs::new();
        fs.tag = "carapace".into();
        fs.mount_point = "/run/carapace/shared".into();
        fs.options = vec!["nodev".into()];
        req.shared_fs.push(fs);
        let settings = req.settings.mut_or_insert_default();
        settings.sysctls.insert("kernel.shm_rmid_forced".into(), "1".into());
        settings.wall_clock_unix_nano = 5;
        sandbox.create(&req).expect("create");
        assert_eq!(
            *sys.calls(),
            [
                "add_entropy 64 bytes",
                "reseed_crng",
                "set_realtime 1700000000000000001",
                "sethostname pod",
                "mkdir -p /run/carapace/shared",
                "mount carapace /run/carapace/shared virtiofs 0x4 -",
                "write /proc/sys/kernel/shm_rmid_forced 1",
            ]
        );
        sandbox.destroy(0).expect("destroy");
        assert_eq!(sys.calls().last().map(String::as_str), Some("umount /run/carapace/shared"));
    }

    #[test]
    fn entropy_of_a_wrong_size_is_refused_before_anything() {
        for n in [1, ENTROPY_MIN - 1, ENTROPY_MAX + 1] {
            let dir = tempfile::tempdir().expect("tempdir");
            let (sandbox, sys) = guest(dir.path());
            let mut req = agent::CreateSandboxRequest::new();
            req.hostname = "pod".into();
            req.entropy = vec![1; n];
            let err = sandbox.create(&req).expect_err("bad size");
            assert_eq!(err.code(), Code::INVALID_ARGUMENT);
            assert!(err.to_string().contains(&format!("entropy: {n} bytes")), "{err}");
            assert!(sys.calls().is_empty(), "{:?}", sys.calls());
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let (sandbox, sys) = guest(dir.path());
        let mut req = agent::CreateSandboxRequest::new();
        req.host_time_unix_ns = u64::MAX;
        let err = sandbox.create(&req).expect_err("time");
        assert!(err.to_string().contains("host_time_unix_ns"), "{err}");
        assert!(sys.calls().is_empty());
    }

    #[test]
    fn without_new_fields_the_old_clock_setting_is_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (sandbox, sys) = guest(dir.path());
        let mut req = agent::CreateSandboxRequest::new();
        req.settings.mut_or_insert_default().wall_clock_unix_nano = 42;
        sandbox.create(&req).expect("create");
        assert_eq!(*sys.calls(), ["set_realtime 42"]);
    }

    #[test]
    fn on_a_host_nothing_host_wide_is_touched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sys = Arc::new(RecordingSyscall::default());
        let sandbox = Sandbox::with_syscall(dir.path().join("etc"), false, sys.clone());
        let mut req = agent::CreateSandboxRequest::new();
        req.hostname = "pod".into();
        req.entropy = vec![1; 32];
        req.host_time_unix_ns = 7;
        sandbox.create(&req).expect("create");
        assert!(sys.calls().is_empty(), "{:?}", sys.calls());
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let (flags, data) = mount_options(&["ro".into(), "nodev".into(), "dax=never".into(), "x".into()]);
        assert_eq!(flags, MsFlags::MS_RDONLY | MsFlags::MS_NODEV);
        assert_eq!(data, "dax=never,x");
    }

    #[test]
    fn refuses_an_unknown_log_level_before_doing_anything() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sandbox = Sandbox::new(dir.path().join("etc"), false);
        let mut req = agent::CreateSandboxRequest::new();
        req.hostname = "pod".into();
        req.settings.mut_or_insert_default().log_level = "loud".into();
        let err = sandbox.create(&req).expect_err("unknown level");
        assert_eq!(err.code(), Code::INVALID_ARGUMENT);
        assert!(err.to_string().contains("settings.log_level"), "{err}");
        assert!(!dir.path().join("etc/hostname").exists());
    }

    #[test]
    fn refuses_bad_network_input_before_doing_anything() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sandbox = Sandbox::new(dir.path().join("etc"), false);
        let mut req = agent::CreateSandboxRequest::new();
        req.hostname = "pod".into();
        let mut route = agent::Route::new();
        route.gateway = "10.0.0".into();
        req.routes.push(route);
        let err = sandbox.create(&req).expect_err("bad gateway");
        assert_eq!(err.code(), Code::INVALID_ARGUMENT);
        assert_eq!(err.to_string(), "routes[0].gateway \"10.0.0\": not an IP address");
        assert!(!dir.path().join("etc/hostname").exists());

        // Valid, but on a host the network is left alone.
        req.routes[0].gateway = "10.0.0.1".into();
        sandbox.create(&req).expect("create on a host");
    }

    #[test]
    fn writes_etc_files_and_refuses_bad_input() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sandbox = Sandbox::new(dir.path().join("etc"), false);
        let mut req = agent::CreateSandboxRequest::new();
        req.hostname = "pod".into();
        req.resolv_conf = b"nameserver 10.0.0.1\n".to_vec();
        let mut bad = req.clone();
        let mut fs = agent::SharedFs::new();
        fs.tag = "t".into();
        fs.mount_point = "relative".into();
        bad.shared_fs.push(fs);
        let err = sandbox.create(&bad).expect_err("relative mount point");
        assert_eq!(err.code(), Code::INVALID_ARGUMENT);
        assert!(err.to_string().contains("shared_fs[0].mount_point"), "{err}");

        let resp = sandbox.create(&req).expect("create");
        assert!(!resp.kernel_release.is_empty());
        assert_eq!(std::fs::read_to_string(dir.path().join("etc/hostname")).expect("hostname"), "pod\n");
        assert!(dir.path().join("etc/resolv.conf").exists());
        assert_eq!(sandbox.create(&req).expect_err("twice").code(), Code::FAILED_PRECONDITION);
        assert_eq!(sandbox.destroy(1).expect_err("containers left").code(), Code::FAILED_PRECONDITION);
        sandbox.destroy(0).expect("destroy");
    }
}
