//! `carapace-vmm`: runs one microVM from flags or a JSON config.
//!
//! Exit codes: 0 the guest rebooted (a clean end), 1 bad config / setup
//! failure, 2 bad usage, 3 guest triple fault, 4 KVM could not run the guest
//! (emulation failure etc., details on stderr), 5 VMM failure while
//! running, 128+N stopped by signal N (SIGTERM, SIGINT, SIGHUP).
//! SIGUSR1 prints every vCPU's registers and code bytes to stderr.
//! SIGUSR2 with `--snapshot-to DIR` (or `snapshot_to`) pauses the VM, writes
//! a snapshot to DIR and exits 0 (5 if the snapshot failed); without it,
//! SIGUSR2 is logged and ignored. `--restore-from DIR` starts from one.
//!
//! The VMM confines each of its threads with a seccomp filter for its kind
//! (see `carapace_vmm::seccomp`) before the guest runs; a system call
//! outside it kills the process with SIGSYS. `--no-seccomp` turns that off
//! for debugging.
//!
//! `CARAPACE_VMM_PROFILE=FILE` samples every vCPU's RIP every 2 ms into
//! FILE (appended; `CARAPACE_VMM_PROFILE_PERCPU=HEX` adds a per-cpu word
//! of the guest kernel; see `carapace_vmm::profile`, and
//! `bench/guest_profile.py` to symbolize it).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use carapace_vmm::cmdline::HostKind;
use carapace_vmm::devices::virtio::fs::FsConfig;
use carapace_vmm::devices::virtio::net::NetConfig;
use carapace_vmm::error::one_line;
use carapace_vmm::exit::{EXIT_SETUP_ERROR, EXIT_USAGE};
use carapace_vmm::profile::{Profile, PERCPU_ENV, PROFILE_ENV};
use carapace_vmm::seccomp::{self, Filters, SeccompLevel, ThreadKind};
use carapace_vmm::{SerialOutput, VmConfig, VmExit, Vmm, VsockConfig};
use clap::Parser;

/// Runs a Linux microVM on KVM.
#[derive(Debug, Parser)]
#[command(name = "carapace-vmm", version, about)]
struct Cli {
    /// Read the whole VM config from this JSON file (excludes the other VM flags).
    /// `--net` may be given with it: those devices come after the file's
    /// (inherited tap fds are per process, so they do not belong in a file).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["kernel", "initramfs", "cmdline", "vcpus", "mem_mib", "serial", "vsock_uds", "cid", "fs", "snapshot_to", "restore_from"])]
    config: Option<PathBuf>,
    /// Uncompressed guest kernel (vmlinux ELF).
    #[arg(long, value_name = "PATH", required_unless_present_any = ["config", "print_cmdline", "seccomp_selftest", "restore_from"])]
    kernel: Option<PathBuf>,
    /// Initramfs (uncompressed cpio is fastest).
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,
    /// Extra kernel command line, appended to the VMM's own.
    #[arg(long, value_name = "ARGS", default_value = "")]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Guest RAM in MiB (at least 64).
    #[arg(long = "mem-mib", default_value_t = 256)]
    mem_mib: u32,
    /// Serial console output: a file path, `stdout` or `none`.
    #[arg(long, value_name = "PATH|stdout|none", default_value = "stdout")]
    serial: SerialOutput,
    /// Hybrid-vsock Unix socket to listen on (enables the vsock device).
    #[arg(long = "vsock-uds", value_name = "PATH", requires = "cid")]
    vsock_uds: Option<PathBuf>,
    /// The guest's vsock CID (>= 3).
    #[arg(long, value_name = "N", requires = "vsock_uds")]
    cid: Option<u64>,
    /// Share a host directory over virtio-fs: `TAG:DIR[:ro]` (repeatable).
    #[arg(long, value_name = "TAG:DIR[:ro]", value_parser = parse_fs)]
    fs: Vec<FsConfig>,
    /// A virtio-net device on a tap (repeatable): `fd=N` uses an inherited,
    /// open tap file (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR; the runtime's way),
    /// `tap=NAME` creates or attaches to tap NAME in the VMM's network
    /// namespace; `mtu` defaults to 1500.
    #[arg(long, value_name = "fd=N|tap=NAME,mac=MAC[,mtu=M]", value_parser = parse_net)]
    net: Vec<NetConfig>,
    /// On SIGUSR2, pause the VM, write a snapshot into this directory and exit 0.
    #[arg(long, value_name = "DIR")]
    snapshot_to: Option<PathBuf>,
    /// Start from the snapshot in this directory instead of booting
    /// (--kernel is then not needed and not loaded).
    #[arg(long, value_name = "DIR")]
    restore_from: Option<PathBuf>,
    /// Print the kernel command line this host gets (without device entries) and exit.
    #[arg(long)]
    print_cmdline: bool,
    /// Run without the per-thread seccomp filters (debugging only: the VMM
    /// then holds every privilege of its process while the guest runs).
    #[arg(long)]
    no_seccomp: bool,
    /// Let system calls outside the filters through and log them to the
    /// kernel audit log instead of killing the VMM (finding a missing call).
    #[arg(long, hide = true, conflicts_with = "no_seccomp")]
    seccomp_log: bool,
    /// Install the filter of thread kind KIND (vmm, vcpu, vsock, fs,
    /// net, spawner) on the main thread, then make a system call no VMM thread
    /// may make: the process must die of SIGSYS (a test hook).
    #[arg(long, hide = true, value_name = "KIND")]
    seccomp_selftest: Option<String>,
}

fn parse_fs(s: &str) -> Result<FsConfig, String> {
    let mut it = s.splitn(3, ':');
    let (tag, dir) = match (it.next(), it.next()) {
        (Some(t), Some(d)) if !t.is_empty() && !d.is_empty() => (t, d),
        _ => return Err(format!("{s:?}: expected TAG:DIR[:ro]")),
    };
    let read_only = match it.next() {
        None => false,
        Some("ro") => true,
        Some(o) => return Err(format!("{s:?}: unknown option {o:?} (only \"ro\")")),
    };
    Ok(FsConfig { tag: tag.into(), shared_dir: dir.into(), read_only, cache: Default::default() })
}

fn parse_net(s: &str) -> Result<NetConfig, String> {
    s.parse().map_err(|e: carapace_vmm::devices::virtio::net::NetConfigError| e.to_string())
}

impl Cli {
    fn into_config(self) -> Result<VmConfig, carapace_vmm::ConfigError> {
        if let Some(path) = self.config {
            let mut config = VmConfig::from_file(&path)?;
            config.net.extend(self.net);
            return Ok(config);
        }
        Ok(VmConfig {
            // clap guarantees --kernel when --config is absent.
            kernel: self.kernel.unwrap_or_default(),
            initramfs: self.initramfs,
            cmdline: self.cmdline,
            vcpus: self.vcpus,
            mem_mib: self.mem_mib,
            serial: self.serial,
            vsock: match (self.vsock_uds, self.cid) {
                (Some(uds_path), Some(guest_cid)) => Some(VsockConfig { uds_path, guest_cid }),
                _ => None,
            },
            fs: self.fs,
            net: self.net,
            snapshot_to: self.snapshot_to,
            restore_from: self.restore_from,
        })
    }
}

/// The signals that stop the VM cleanly, SIGUSR1 (dump the vCPUs) and
/// SIGUSR2 (snapshot and exit, with `snapshot_to`).
const STOP_SIGNALS: [libc::c_int; 5] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR1, libc::SIGUSR2];

fn stop_sigset() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, exclusively borrowed sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for s in STOP_SIGNALS {
        // SAFETY: `set` is initialized and `s` a valid signal number.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    set
}

/// Blocks the stop signals in this thread (and so in every thread it starts
/// later); a dedicated thread collects them with sigwait.
fn block_stop_signals() -> anyhow::Result<()> {
    let set = stop_sigset();
    // SAFETY: `set` is a valid sigset_t; the old mask is not requested.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        anyhow::bail!("cannot block signals: {}", std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Turns the first stop signal into a VM exit.
fn spawn_signal_thread(exit: carapace_vmm::ExitSender, filters: Option<Arc<Filters>>) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(f) = filters {
                if let Err(e) = f.apply(ThreadKind::Vmm) {
                    eprintln!("carapace-vmm: error: {}", one_line(&e));
                    std::process::abort();
                }
            }
            let set = stop_sigset();
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: `set` and `sig` are valid for the call; the signals are blocked in all threads.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    continue;
                }
                if sig == libc::SIGUSR1 {
                    exit.request_dump();
                } else if sig == libc::SIGUSR2 {
                    // The VM decides: without `snapshot_to` it logs and runs on.
                    exit.request_snapshot();
                } else {
                    tracing::info!(signal = sig, "stop requested");
                    exit.send(VmExit::Signal(sig));
                }
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

fn run(config: VmConfig, filters: Option<Arc<Filters>>) -> anyhow::Result<i32> {
    let mut vmm = match Vmm::new(&config) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("carapace-vmm: error: {}", one_line(&e));
            return Ok(EXIT_SETUP_ERROR);
        }
    };
    spawn_signal_thread(vmm.exit_sender(), filters.clone())?;
    // Opened now: once confined, no thread may open a file.
    if let Some(path) = std::env::var_os(PROFILE_ENV).filter(|p| !p.is_empty()) {
        match Profile::open(path.as_ref()) {
            Ok(p) => {
                let percpu = std::env::var(PERCPU_ENV).ok().and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok());
                vmm = vmm.with_profile(match percpu {
                    Some(off) => p.with_percpu(off),
                    None => p,
                });
            }
            Err(e) => eprintln!("carapace-vmm: warning: {} (running without the profiler)", one_line(&e)),
        }
    }
    if let Some(f) = filters {
        vmm = vmm.with_seccomp(f);
    }
    let exit = vmm.run().context("running the VM")?;
    match exit {
        VmExit::GuestReset => tracing::info!("{exit}"),
        // The vCPU that stopped already described the failure on stderr.
        VmExit::TripleFault { .. } | VmExit::KvmError { .. } | VmExit::VmmError { .. } => {}
        VmExit::Signal(_) | VmExit::SnapshotFailed(_) => eprintln!("carapace-vmm: {exit}"),
        VmExit::Snapshotted(_) => tracing::info!("{exit}"),
    }
    Ok(exit.exit_code())
}

/// `--seccomp-selftest KIND`: returns only if the filter failed to stop a
/// forbidden call (the process is expected to die of SIGSYS first).
fn seccomp_selftest(kind: &str) -> i32 {
    let Some(kind) = ThreadKind::from_name(kind) else {
        eprintln!("carapace-vmm: error: unknown thread kind {kind:?}");
        return EXIT_USAGE;
    };
    let filters = match Filters::new(SeccompLevel::Kill) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("carapace-vmm: error: {}", one_line(&e));
            return EXIT_SETUP_ERROR;
        }
    };
    // Allowed under every filter: shows the filter lets the VMM work.
    eprintln!("carapace-vmm: {kind} filter ({} calls allowed): making a forbidden call", Filters::allowed_count(kind));
    match seccomp::selftest(&filters, kind) {
        Ok(msg) => eprintln!("carapace-vmm: seccomp self-test failed: {msg}"),
        Err(e) => eprintln!("carapace-vmm: error: {}", one_line(&e)),
    }
    EXIT_SETUP_ERROR
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CARAPACE_VMM_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    if cli.print_cmdline {
        match carapace_vmm::cmdline::build(HostKind::detect(), &[], &cli.cmdline) {
            Ok(line) => {
                println!("{line}");
                std::process::exit(0)
            }
            Err(e) => {
                eprintln!("carapace-vmm: error: {e}");
                std::process::exit(EXIT_SETUP_ERROR)
            }
        }
    }
    if let Some(kind) = &cli.seccomp_selftest {
        std::process::exit(seccomp_selftest(kind));
    }
    let filters = if cli.no_seccomp {
        tracing::warn!("running without seccomp filters (--no-seccomp)");
        None
    } else {
        let level = if cli.seccomp_log { SeccompLevel::Log } else { SeccompLevel::Kill };
        match Filters::new(level) {
            Ok(f) => Some(Arc::new(f)),
            Err(e) => {
                eprintln!("carapace-vmm: error: {}", one_line(&e));
                std::process::exit(EXIT_SETUP_ERROR);
            }
        }
    };
    let code = (|| -> anyhow::Result<i32> {
        block_stop_signals()?;
        let config = match cli.into_config() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("carapace-vmm: error: {}", one_line(&e));
                return Ok(EXIT_SETUP_ERROR);
            }
        };
        run(config, filters)
    })()
    .unwrap_or_else(|e| {
        eprintln!("carapace-vmm: error: {e:#}");
        EXIT_SETUP_ERROR
    });
    std::process::exit(code);
}
