//! The shim binary's actions, as containerd invokes them (runtime v2):
//!
//! - `start` (cwd: the bundle): finds or starts the shim that serves the
//!   container's sandbox and prints its ttrpc address. The shim socket's
//!   name derives from the sandbox id, so the containers of one pod reach
//!   one shim: a second `start` for the same sandbox finds the socket
//!   answering and returns its address.
//! - serving (no action, `-socket`): the daemon started by `start`. It
//!   takes a mount namespace of its own, serves the Task API until
//!   Shutdown, and publishes events to containerd's `TTRPC_ADDRESS`.
//! - `delete` (cwd: the bundle): cleanup after a shim that died.
//!
//! containerd 1.x expects a bare address from `start` and calls
//! `containerd.task.v2.Task`; 2.x also understands the JSON/bootstrap
//! replies and `containerd.task.v3.Task`. The `containerd-shim` crate's own
//! bootstrap (0.12) answers only the newer ways, so the actions are done
//! here with its parts; the Task service is registered under both names
//! (v3 is v2 renamed, message for message).

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{IsTerminal, Read, Write};
use std::os::fd::IntoRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use containerd_shim::bootstrap::{BootstrapParams, BootstrapResult};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::shim_sync::create_task;
use containerd_shim::{ExitSignal, Flags, StartOpts};
use oci_spec::runtime::Spec;

use crate::config::{self, ConfigSource};
use crate::events::{self, RemoteEvents};
use crate::task::{TaskConfig, TaskService};
use carapace_runtime::launcher::MicroVmLauncher;
use carapace_runtime::pod;

/// Where sandboxes live unless `CARAPACE_SHIM_ROOT` says otherwise.
pub const DEFAULT_STATE_ROOT: &str = "/run/carapace/shim";
const TTRPC_ADDRESS: &str = "TTRPC_ADDRESS";
const V3_PREFIX: &str = "/containerd.task.v3.Task/";
const V2_PREFIX: &str = "/containerd.task.v2.Task/";
/// containerd caps what it pipes to `start` at this.
const MAX_INPUT: u64 = 10 << 20;

/// Why an action failed (printed by the binary; containerd logs it).
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error(transparent)]
    Shim(#[from] containerd_shim::Error),
    #[error("{what}")]
    Io { what: String, source: std::io::Error },
    #[error("ttrpc server")]
    Ttrpc(#[from] ttrpc::Error),
    #[error("protobuf")]
    Protobuf(#[from] containerd_shim::protos::protobuf::Error),
    #[error(transparent)]
    Share(#[from] carapace_runtime::share::ShareError),
    #[error("{TTRPC_ADDRESS} is not set: containerd passes it to its shims")]
    NoTtrpcAddress,
    /// An id, namespace or sandbox id that could name a path outside the
    /// state root (containerd never sends one; a caller of the binary might).
    #[error("{what}")]
    BadId { what: &'static str, source: carapace_runtime::id::IdError },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BootstrapError {
    let what = what.into();
    move |source| BootstrapError::Io { what, source }
}

/// The directory of sandbox VMs.
pub fn state_root() -> PathBuf {
    std::env::var_os("CARAPACE_SHIM_ROOT").filter(|v| !v.is_empty()).map_or_else(|| PathBuf::from(DEFAULT_STATE_ROOT), PathBuf::from)
}

fn bundle_dir(flags: &Flags) -> PathBuf {
    if flags.bundle.is_empty() {
        std::env::current_dir().unwrap_or_default()
    } else {
        PathBuf::from(&flags.bundle)
    }
}

/// The namespace, the container id and the sandbox id become the name of
/// the sandbox's directory: each must be a plain name (no `/`, not `..`).
fn check_ids(namespace: &str, id: &str, sandbox: &str) -> Result<(), BootstrapError> {
    let check = |what, value| carapace_runtime::id::validate_id(value).map_err(|source| BootstrapError::BadId { what, source });
    check("-namespace", namespace)?;
    check("-id", id)?;
    check(pod::SANDBOX_ID, sandbox)
}

/// containerd's ttrpc address, where events go.
fn ttrpc_address() -> Result<String, BootstrapError> {
    std::env::var(TTRPC_ADDRESS).ok().filter(|a| !a.is_empty()).ok_or(BootstrapError::NoTtrpcAddress)
}

fn read_stdin() -> Vec<u8> {
    let stdin = std::io::stdin();
    let mut input = Vec::new();
    if !stdin.is_terminal() {
        let _ = stdin.lock().take(MAX_INPUT).read_to_end(&mut input);
    }
    input
}

/// `start`: see the module docs.
pub fn start(flags: &Flags) -> Result<(), BootstrapError> {
    let input = read_stdin();
    // containerd 2.3+ sends BootstrapParams; older ones flags, environment
    // and (maybe) the runtime options.
    let params = BootstrapParams::parse_from_bytes(&input)
        .ok()
        .filter(|p| p.instance_id == flags.id && p.namespace == flags.namespace && !p.containerd_ttrpc_address.is_empty());
    let bootstrap = params.is_some();
    let opts: StartOpts = match params {
        Some(p) => p.into(),
        None => StartOpts {
            id: flags.id.clone(),
            publish_binary: flags.publish_binary.clone(),
            address: flags.address.clone(),
            ttrpc_address: ttrpc_address()?,
            namespace: flags.namespace.clone(),
            debug: flags.debug,
            ..Default::default()
        },
    };
    let spec = Spec::load(bundle_dir(flags).join("config.json")).ok();
    let grouping = pod::sandbox_id(&opts.id, spec.as_ref());
    check_ids(&opts.namespace, &opts.id, &grouping)?;
    // The daemon logs from its start: it gets the options' config file
    // (Create reads it again from the request) as its own CARAPACE_CONFIG.
    let config_path = if bootstrap { None } else { Any::parse_from_bytes(&input).ok().as_ref().and_then(config::config_path) };
    let config_env = config_path.as_ref().map(|p| p.to_string_lossy().into_owned());
    let vars: Vec<(&str, &str)> = config_env.iter().map(|p| (carapace_runtime::config::ENV, p.as_str())).collect();
    let (_pid, address) = containerd_shim::spawn(opts, &grouping, vars)?;
    containerd_shim::synchronous::util::write_address(&address)?;
    let reply = if bootstrap {
        BootstrapResult { version: containerd_shim::protos::TASK_API_VERSION, address, protocol: "ttrpc".into(), ..Default::default() }
            .write_to_bytes()?
    } else {
        address.into_bytes()
    };
    let mut out = std::io::stdout().lock();
    out.write_all(&reply).and_then(|()| out.flush()).map_err(io_err("writing the address"))
}

/// `delete`: the shim serving the container is gone (it would have
/// answered Delete otherwise); its VMM died with it (PDEATHSIG) and its
/// mounts with its namespace. Removes the sandbox's directory unless a live
/// shim still owns it, and reports the container killed.
pub fn delete(flags: &Flags) -> Result<(), BootstrapError> {
    let spec = Spec::load(bundle_dir(flags).join("config.json")).ok();
    let grouping = pod::sandbox_id(&flags.id, spec.as_ref());
    check_ids(&flags.namespace, &flags.id, &grouping)?;
    let key = format!("{}-{grouping}", flags.namespace);
    let dir = state_root().join(carapace_runtime::state::dir_name(&key));
    let owner_alive = std::fs::read_to_string(dir.join("shim.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
        .is_some_and(|pid| pid != 0 && Path::new(&format!("/proc/{pid}")).exists());
    if dir.exists() && !owner_alive {
        carapace_runtime::share::remove_sandbox_dir(&dir);
    }
    let resp = containerd_shim::api::DeleteResponse { exit_status: 128 + 9, exited_at: Some(events::now()).into(), ..Default::default() };
    let mut out = std::io::stdout().lock();
    resp.write_to_writer(&mut out)?;
    out.flush().map_err(io_err("writing the answer"))
}

/// Logs (tracing) go to the `log` FIFO containerd reads in the bundle
/// directory (our cwd), or nowhere. The filter: `CARAPACE_SHIM_LOG`, else
/// the config's `log_level`, else `debug` or `info` as containerd's
/// `-debug` says.
fn init_logging(debug: bool, config_level: Option<&str>) {
    let default = if debug { "debug" } else { "info" };
    let filter = std::env::var("CARAPACE_SHIM_LOG").unwrap_or_else(|_| config_level.unwrap_or(default).to_string());
    // Non-blocking: a containerd that stops reading must not stall the shim.
    let Ok(fifo) = OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open("log") else { return };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_ansi(false)
        .with_writer(Mutex::new(fifo))
        .try_init();
}

/// The serving shim's stderr is /dev/null (`spawn` gives it that): a panic
/// is logged, so that it reaches containerd's log.
fn log_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current().name().unwrap_or("unnamed").to_string();
        tracing::error!("thread '{thread}' panicked: {info}");
        default(info);
    }));
}

/// Binds the shim's socket. `Ok(None)`: a live shim already serves it.
fn listen(socket: &str) -> Result<Option<UnixListener>, BootstrapError> {
    let path = Path::new(socket.strip_prefix("unix://").unwrap_or(socket));
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_err(format!("creating {}", parent.display())))?;
    }
    match UnixListener::bind(path) {
        Ok(l) => Ok(Some(l)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                return Ok(None);
            }
            let _ = std::fs::remove_file(path);
            UnixListener::bind(path).map(Some).map_err(io_err(format!("binding {}", path.display())))
        }
        Err(e) => Err(io_err(format!("binding {}", path.display()))(e)),
    }
}

/// Tells `start` (waiting for our stdout to close) that we serve.
fn signal_started() {
    // SAFETY: dup2 on the process's own standard fds; fd 2 is open (spawn
    // gave us /dev/null), and replacing fd 1 closes the pipe to `start`.
    unsafe {
        libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO);
    }
}

/// The daemon: see the module docs. Returns when the shim shuts down.
pub fn serve(flags: &Flags) -> Result<(), BootstrapError> {
    // First, before any thread exists: the share's binds must be ours only.
    carapace_runtime::share::private_mount_namespace()?;
    let _ = nix::unistd::setsid();
    let config_source = ConfigSource::from_env();
    // Only for the log level: each sandbox boot reads the file again, and a
    // broken one fails that Create with the reason.
    let config = config_source.load(None);
    init_logging(flags.debug, config.as_ref().ok().and_then(|c| c.log_level.as_deref()));
    if let Err(e) = &config {
        tracing::warn!(error = %e, "the configuration file is refused; Create will fail until it is fixed");
    }
    log_panics();
    // Checked before the socket exists: a shim that cannot serve leaves none.
    let ttrpc_address = ttrpc_address()?;
    let Some(listener) = listen(&flags.socket)? else {
        // Another shim serves this sandbox: `start` returns its address.
        containerd_shim::synchronous::util::write_address(&flags.socket)?;
        signal_started();
        return Ok(());
    };
    let _span = tracing::info_span!("shim", namespace = %flags.namespace, id = %flags.id).entered();
    let events = Arc::new(RemoteEvents::new(ttrpc_address, flags.namespace.clone()));
    let exit = Arc::new(ExitSignal::default());
    let cfg = TaskConfig { namespace: flags.namespace.clone(), state_root: state_root(), config: config_source };
    let service: Arc<dyn containerd_shim::Task + Send + Sync> =
        Arc::new(TaskService::new(cfg, Box::new(MicroVmLauncher), events, exit.clone()));
    let v3 = create_task(service.clone());
    let v2: HashMap<_, _> =
        create_task(service).into_iter().map(|(path, handler)| (path.replacen(V3_PREFIX, V2_PREFIX, 1), handler)).collect();
    let mut server = ttrpc::Server::new()
        .add_listener(listener.into_raw_fd())?
        .register_service(v3)
        .register_service(v2)
        .set_thread_count_default(4)
        .set_thread_count_min(1)
        .set_thread_count_max(256);
    server.start()?;
    signal_started();
    tracing::info!(socket = %flags.socket, "serving the Task API");
    exit.wait();
    shutdown_within(server, SERVER_SHUTDOWN);
    let path = flags.socket.strip_prefix("unix://").unwrap_or(&flags.socket);
    let _ = std::fs::remove_file(path);
    tracing::info!("shim exits");
    Ok(())
}

/// How long the ttrpc server may take to close its connections at exit.
const SERVER_SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(5);

/// Stops `server`, waiting at most `limit`: the server joins its handler
/// threads, and one stuck in a call must not keep the shim alive (its
/// process exits, threads and all, once this returns).
fn shutdown_within(server: ttrpc::Server, limit: std::time::Duration) {
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new().name("server-shutdown".into()).spawn(move || {
        server.shutdown();
        let _ = tx.send(());
    });
    if spawned.is_ok() && rx.recv_timeout(limit).is_err() {
        tracing::warn!("a Task call still runs {limit:?} after shutdown; exiting without it");
    }
}

/// `-info`: the runtime's name (containerd 2.x asks before any start).
pub fn info() -> Result<(), BootstrapError> {
    let _ = read_stdin();
    let info = containerd_shim::protos::types::introspection::RuntimeInfo { name: crate::RUNTIME_TYPE.into(), ..Default::default() };
    let mut out = std::io::stdout().lock();
    info.write_to_writer(&mut out)?;
    out.flush().map_err(io_err("writing the runtime info"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use carapace_runtime::error::Chain;

    #[test]
    fn both_task_api_names_are_served() {
        // The generated service speaks v3; containerd 1.x calls v2.
        #[derive(Debug)]
        struct Nop;
        impl containerd_shim::Task for Nop {}
        let service: Arc<dyn containerd_shim::Task + Send + Sync> = Arc::new(Nop);
        let v3 = create_task(service);
        assert!(v3.contains_key("/containerd.task.v3.Task/Create"), "{:?}", v3.keys().collect::<Vec<_>>());
        let v2: Vec<String> = v3.keys().map(|k| k.replacen(V3_PREFIX, V2_PREFIX, 1)).collect();
        assert!(v2.iter().any(|k| k == "/containerd.task.v2.Task/Create"));
        assert!(v2.iter().all(|k| k.starts_with(V2_PREFIX)));
    }

    #[test]
    fn ids_that_could_leave_the_state_root_are_refused() {
        assert!(check_ids("default", "c1", "pod1").is_ok());
        for (ns, id, sb, want) in [
            ("default", "../x", "pod1", "-id: invalid container id"),
            ("default", "c1", "a/../../etc", "io.kubernetes.cri.sandbox-id: invalid container id"),
            ("a/b", "c1", "c1", "-namespace: invalid container id"),
            ("default", "..", "..", "-id: invalid container id \"..\": it must not be"),
        ] {
            let e = Chain(&check_ids(ns, id, sb).expect_err(id)).to_string();
            assert!(e.contains(want), "{e}");
        }
        let long = "x".repeat(1025);
        assert!(Chain(&check_ids("default", &long, &long).expect_err("long")).to_string().contains("1025 bytes"));
    }

    #[test]
    fn listen_takes_over_a_dead_socket_and_defers_to_a_live_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("s/shim.sock");
        let addr = format!("unix://{}", sock.display());
        let live = listen(&addr).expect("bind").expect("first");
        assert!(listen(&addr).expect("second").is_none(), "a live shim must be reused");
        drop(live); // the file stays, nobody listens: a dead shim's socket
        assert!(listen(&addr).expect("third").is_some());
    }
}
