//! carapace-agent: PID 1 of a Carapace guest. It mounts the kernel file
//! systems, reaps children and serves the agent API (ttrpc) on vsock port
//! 1024. Run on a host (not PID 1) with `--listen unix:///path`, it only
//! serves, for tests.
//!
//! Every system call in the guest costs ~0.6 ms and a fork+exec ~1 s on
//! the hosts we run on: the agent makes few calls and never spawns helpers.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use carapace_protocol::{AGENT_VSOCK_ADDRESS, API_VERSION, VSOCK_HOST_CID};

use carapace_agent::args::{self, Args};
use carapace_agent::container::stdio::{self, Dialer};
use carapace_agent::container::{cgroup, ContainerManager, ManagerConfig};
use carapace_agent::reaper::Reaper;
use carapace_agent::sandbox::Sandbox;
use carapace_agent::server::{self, AgentServer, ListenAddress};
use carapace_agent::service::{AgentService, AGENT_VERSION};
use carapace_agent::shutdown::{self, ShutdownTrigger};
use carapace_agent::signals::{Event, Signals};
use carapace_agent::{init, logging, sys, xstate};

/// As PID 1, how often and how far apart to retry binding the listener
/// (the vsock transport could still be coming up).
const BIND_ATTEMPTS: u32 = 20;
const BIND_RETRY: Duration = Duration::from_millis(100);

/// How long the host-mode agent waits for ttrpc's threads when stopping.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// Where container state lives unless `--state-dir` says otherwise.
const DEFAULT_STATE_DIR: &str = "/run/carapace-agent";

/// The Agent service with its container manager: stdio streams go where
/// the listener is (vsock to the host, or `<unix socket>_<port>`).
fn agent_service(args: &Args, address: &ListenAddress, trigger: ShutdownTrigger, reaper: Arc<Reaper>, guest: bool) -> AgentService {
    let state_dir = std::path::PathBuf::from(args.state_dir.as_deref().unwrap_or(DEFAULT_STATE_DIR));
    let dialer = match address {
        ListenAddress::Vsock { .. } => Dialer::Vsock { cid: VSOCK_HOST_CID },
        ListenAddress::Unix(path) => Dialer::Unix { base: path.into() },
    };
    // In the guest the sandbox's files are the guest's /etc; on a host the
    // agent must not touch the host's.
    let etc = if guest { "/etc".into() } else { state_dir.join("etc") };
    // Set only by `reexec_without_avx` (see `carapace_agent::xstate`).
    let default_env = match std::env::var(xstate::TUNABLES_ENV) {
        Ok(v) if guest && v == xstate::NO_AVX_TUNABLES => vec![xstate::no_avx_env()],
        _ => Vec::new(),
    };
    let containers =
        Arc::new(ContainerManager::new(ManagerConfig { state_dir, dialer, cgroup_root: cgroup::CGROUP_ROOT.into(), default_env }, reaper));
    if guest {
        // Before serving, so that a VM template has them.
        containers.make_spares();
    }
    AgentService::new(trigger, containers, Sandbox::new(etc, guest))
}

fn main() -> ExitCode {
    let args = Args::parse(std::env::args_os().skip(1));
    if args.help {
        println!("{}", args::USAGE);
        return ExitCode::SUCCESS;
    }
    if args.version {
        println!("carapace-agent {AGENT_VERSION} (agent API {API_VERSION})");
        return ExitCode::SUCCESS;
    }
    if std::process::id() == 1 {
        run_as_init(&args)
    }
    match run_on_host(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("carapace-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(args: &Args) {
    let env = std::env::var(logging::LEVEL_ENV).ok();
    let (level, complaint) = logging::level(args.log_level.as_deref(), env.as_deref());
    logging::init(level);
    if let Some(complaint) = complaint {
        tracing::warn!("{complaint}");
    }
}

/// The first line on the console once the agent answers; tests and
/// benchmarks wait for it.
fn announce(address: &ListenAddress) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "carapace-agent {AGENT_VERSION} serving on {}", address.display());
    let _ = out.flush();
}

/// Blocks on the signalfd: reaps children, returns when SIGTERM/SIGINT
/// arrives, with the time it did.
fn serve_signals(signals: &Signals, reaper: &Reaper) -> Instant {
    loop {
        match signals.wait() {
            Ok(Event::ChildExited) => {
                reaper.reap();
            }
            Ok(Event::Terminate(signal)) => {
                let now = Instant::now();
                tracing::info!(%signal, "shutting down");
                return now;
            }
            Err(e) => {
                tracing::error!(error = %e, "waiting for signals");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// PID 1: set the guest up, serve until Shutdown, reboot. Never returns
/// and never exits (that would panic the kernel).
fn run_as_init(args: &Args) -> ! {
    // stderr is already the console if the initramfs has /dev/console.
    init_logging(args);
    let reexecuted = std::env::var_os(REEXEC_ENV).is_some();
    // First, before anything is mounted: containers pivot_root, which the
    // initramfs's root refuses. (Done already before a re-exec.)
    let pivot_error = if reexecuted { None } else { init::make_root_pivotable().err() };
    let init_errors = init::setup(&sys::LinuxSyscall);
    let console_error = init::ensure_console_stdio().err();
    if !reexecuted {
        reexec_without_avx();
    }
    for e in pivot_error.iter().chain(&init_errors).chain(console_error.as_ref()) {
        tracing::warn!("guest setup: {e}");
    }
    if !args.unknown.is_empty() {
        tracing::debug!(args = ?args.unknown, "ignoring arguments");
    }

    // Before any thread exists: the mask is inherited.
    let signals = match Signals::block_and_open() {
        Ok(signals) => signals,
        Err(e) => fatal(&anyhow!(e)),
    };
    let address = match ListenAddress::parse(args.listen.as_deref().unwrap_or(AGENT_VSOCK_ADDRESS)) {
        Ok(address) => address,
        Err(e) => fatal(&anyhow!(e)),
    };
    init::warm_heap();
    start_copiers();
    let reaper = Arc::new(Reaper::new());
    let trigger = ShutdownTrigger::new();
    let agent = Arc::new(agent_service(args, &address, trigger.clone(), reaper.clone(), true));

    let mut attempt = 1;
    let _server: AgentServer = loop {
        match server::start(&address, agent.clone()) {
            Ok(server) => break server,
            Err(e) if attempt < BIND_ATTEMPTS => {
                tracing::debug!(attempt, error = %e, "listener not ready, retrying");
                attempt += 1;
                std::thread::sleep(BIND_RETRY);
            }
            Err(e) => fatal(&anyhow!(e)),
        }
    };
    announce(&address);

    let since = serve_signals(&signals, &reaper);
    nix::unistd::sync();
    trigger.wait_for_reply(since);
    shutdown::reboot_guest()
}

/// Idle stdio copier threads started at boot: enough for a container's
/// three streams and an exec's (see `carapace_agent::container::stdio`).
const COPIERS_AT_BOOT: usize = 6;

/// Starts the idle copier threads (after the signal mask is set: threads
/// inherit it). Without them a process's start makes its own.
fn start_copiers() {
    if let Err(e) = stdio::start_copiers(COPIERS_AT_BOOT) {
        tracing::warn!(error = %e, "starting the stdio copier threads");
    }
}

/// Set in the environment of the agent's re-exec of itself.
const REEXEC_ENV: &str = "CARAPACE_AGENT_REEXEC";

/// On a kernel that will not preserve user-mode AVX state (kvm_pvm hosts,
/// see `carapace_agent::xstate`), executes this binary again, as the same
/// PID 1, with glibc's AVX string functions turned off. Returns only if
/// nothing needs doing or the exec failed.
fn reexec_without_avx() {
    use std::os::unix::process::CommandExt;
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if !xstate::avx_state_unsafe(&cmdline) || std::env::var_os(xstate::TUNABLES_ENV).is_some() {
        return;
    }
    tracing::info!("the kernel does not preserve AVX state (noxsave): re-executing without glibc's AVX routines");
    let err = std::process::Command::new("/proc/self/exe")
        .args(std::env::args_os().skip(1))
        .env(xstate::TUNABLES_ENV, xstate::NO_AVX_TUNABLES)
        .env(REEXEC_ENV, "1")
        .exec();
    tracing::warn!(error = %err, "re-executing the agent failed; going on with AVX");
}

/// An error PID 1 cannot serve past: say it on the console and end the VM.
fn fatal(e: &anyhow::Error) -> ! {
    tracing::error!("fatal: {e:#}");
    eprintln!("carapace-agent: fatal: {e:#}; rebooting");
    nix::unistd::sync();
    shutdown::reboot_guest()
}

/// Not PID 1: serve on `--listen` until Shutdown or SIGTERM/SIGINT.
fn run_on_host(args: &Args) -> anyhow::Result<()> {
    args.check_strict().context("bad command line (see --help)")?;
    let listen =
        args.listen.as_deref().ok_or_else(|| anyhow!("not PID 1: give an address with --listen unix:///path/to.sock (see --help)"))?;
    let address = ListenAddress::parse(listen)?;
    init_logging(args);

    // Orphans of the processes we start become ours, as in the guest.
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!(error = %e, "cannot become a child subreaper");
    }
    let signals = Signals::block_and_open()?;
    start_copiers();
    let reaper = Arc::new(Reaper::new());
    let trigger = ShutdownTrigger::new();
    let agent = Arc::new(agent_service(args, &address, trigger.clone(), reaper.clone(), false));
    let server = server::start(&address, agent)?;
    announce(&address);

    let since = serve_signals(&signals, &reaper);
    trigger.wait_for_reply(since);
    server.stop(STOP_TIMEOUT);
    Ok(())
}
