//! `carapace`: a runc-compatible OCI runtime where every container is a microVM.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use carapace_runtime::container::{CreateOptions, ExecOverrides, Runtime};
use carapace_runtime::monitor::{self, ExecRequest};
use carapace_runtime::state::{dir_name, StateStore, Status};
use carapace_runtime::template::{self, TemplateStore};
use carapace_runtime::{host, proc, spec};

#[derive(Debug, Parser)]
#[command(name = "carapace", version, about = "OCI runtime: every container in its own KVM microVM")]
struct Cli {
    /// Root directory for container state.
    #[arg(long, global = true, default_value = "/run/carapace")]
    root: PathBuf,
    /// Write logs to this file instead of stderr.
    #[arg(long, global = true)]
    log: Option<PathBuf>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log at debug level.
    #[arg(long, global = true)]
    debug: bool,
    /// Accepted for runc compatibility; cgroups live inside the guest.
    #[arg(long, global = true)]
    systemd_cgroup: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum TemplateAction {
    /// List the templates under the config's `template_dir`.
    List {
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Remove templates by key (VMs started from them run on).
    Rm {
        #[arg(required = true)]
        keys: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Debug, clap::Args)]
struct CreateArgs {
    /// The bundle directory (config.json and the rootfs).
    #[arg(short, long, default_value = ".")]
    bundle: PathBuf,
    /// Write the pid of the container's host process (the monitor, which
    /// exits with the container's status) to this file.
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Send the pty master of a terminal container to this Unix socket.
    #[arg(long)]
    console_socket: Option<PathBuf>,
    /// Accepted for runc compatibility (the guest always pivots).
    #[arg(long)]
    no_pivot: bool,
    /// Accepted for runc compatibility (keyrings are per guest).
    #[arg(long)]
    no_new_keyring: bool,
    /// Accepted for runc compatibility; extra fds do not cross into a VM.
    #[arg(long, default_value_t = 0)]
    preserve_fds: u32,
    /// The container id.
    id: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot the container's microVM and create the container (not started).
    Create(CreateArgs),
    /// Start a created container.
    Start { id: String },
    /// Print the container's state as JSON.
    State { id: String },
    /// Send a signal to the container's init (or to all its processes).
    Kill {
        #[arg(short, long)]
        all: bool,
        id: String,
        #[arg(default_value = "SIGTERM")]
        signal: String,
    },
    /// Stop the container's VM and remove every trace of it.
    Delete {
        #[arg(short, long)]
        force: bool,
        id: String,
    },
    /// Create and start a container; in the foreground, wait for it, delete
    /// it and exit with its status.
    Run {
        #[arg(short, long)]
        detach: bool,
        #[command(flatten)]
        create: CreateArgs,
    },
    /// Run a process in a running container.
    Exec {
        /// The process as an OCI `process` JSON file.
        #[arg(short, long)]
        process: Option<PathBuf>,
        /// Give the process a terminal.
        #[arg(short, long)]
        tty: bool,
        #[arg(short, long)]
        detach: bool,
        #[arg(long)]
        pid_file: Option<PathBuf>,
        /// Extra environment variables (KEY=VALUE).
        #[arg(short, long)]
        env: Vec<String>,
        /// Working directory in the container.
        #[arg(long)]
        cwd: Option<PathBuf>,
        /// UID[:GID] to run as.
        #[arg(short, long)]
        user: Option<String>,
        #[arg(long)]
        console_socket: Option<PathBuf>,
        /// Accepted for runc compatibility.
        #[arg(long, default_value_t = 0)]
        preserve_fds: u32,
        id: String,
        /// The command and its arguments (without --process).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// List the container's processes (guest pids).
    Ps {
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        format: Format,
        id: String,
    },
    /// List the containers under --root.
    List {
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        format: Format,
        #[arg(short, long)]
        quiet: bool,
    },
    /// Freeze every process of the container.
    Pause { id: String },
    /// Thaw a paused container.
    Resume { id: String },
    /// Write a default config.json into the bundle directory.
    Spec {
        #[arg(short, long, default_value = ".")]
        bundle: PathBuf,
        /// Accepted for runc compatibility (the guest runs as root).
        #[arg(long)]
        rootless: bool,
    },
    /// Print the OCI features document.
    Features,
    /// Print the container's cgroup statistics as runc's events.
    Events {
        /// Print one statistics event and exit.
        #[arg(long)]
        stats: bool,
        /// Time between events, in seconds.
        #[arg(long, default_value = "5s")]
        interval: String,
        id: String,
    },
    /// Apply new linux.resources (JSON, a file or - for stdin).
    Update {
        #[arg(short, long)]
        resources: PathBuf,
        id: String,
    },
    /// Print the runtime's and the spec's versions.
    Version,
    /// List or remove VM templates (the snapshots sandboxes start from).
    Template {
        #[command(subcommand)]
        action: TemplateAction,
    },
    /// Check that this host can run microVMs (one line per requirement).
    Check {
        /// Also boot a microVM and check that its agent answers.
        #[arg(long)]
        boot: bool,
    },
    #[command(name = "_monitor", hide = true)]
    Monitor {
        #[arg(long)]
        ready_fd: i32,
        #[arg(long)]
        bundle: PathBuf,
        #[arg(long)]
        console_socket: Option<PathBuf>,
        id: String,
    },
    #[command(name = "_exec", hide = true)]
    ExecHelper {
        #[arg(long)]
        ready_fd: i32,
        #[arg(long)]
        process_file: PathBuf,
        #[arg(long)]
        console_socket: Option<PathBuf>,
        id: String,
    },
}

fn init_logging(cli: &Cli) -> anyhow::Result<()> {
    let level = if cli.debug { "debug" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CARAPACE_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    // The monitor's stderr is the container's: it logs beside its state.
    let log = match (&cli.log, &cli.command) {
        (Some(p), _) => Some(p.clone()),
        (None, Command::Monitor { id, .. }) => Some(cli.root.join(dir_name(id)).join("monitor.log")),
        _ => None,
    };
    let writer: Box<dyn Fn() -> Box<dyn std::io::Write> + Send + Sync> = match log {
        Some(path) => {
            let file =
                std::fs::OpenOptions::new().create(true).append(true).open(&path).with_context(|| format!("--log {}", path.display()))?;
            Box::new(move || match file.try_clone() {
                Ok(f) => Box::new(f) as Box<dyn std::io::Write>,
                Err(_) => Box::new(std::io::sink()),
            })
        }
        None => Box::new(|| Box::new(std::io::stderr())),
    };
    match cli.log_format {
        LogFormat::Json => builder.json().with_writer(writer).init(),
        LogFormat::Text => builder.with_writer(writer).init(),
    }
    Ok(())
}

/// The global flags helpers are started with.
fn global_args(cli: &Cli) -> Vec<String> {
    let mut args = Vec::new();
    if let Some(log) = &cli.log {
        args.extend(["--log".to_string(), log.display().to_string()]);
    }
    if cli.log_format == LogFormat::Json {
        args.extend(["--log-format".to_string(), "json".to_string()]);
    }
    if cli.debug {
        args.push("--debug".into());
    }
    args
}

fn template(action: TemplateAction) -> anyhow::Result<ExitCode> {
    let config = carapace_runtime::config::load(None)?;
    let store = TemplateStore::new(&config.template_dir);
    match action {
        TemplateAction::List { format } => {
            let listed = store.list()?;
            match format {
                Format::Json => print_json(&serde_json::Value::Array(listed.iter().map(template::Listed::to_json).collect()))?,
                Format::Table => {
                    println!("{:<16}  {:>5}  {:>7}  {:>8}  {:<20}  DEVICES", "KEY", "VCPUS", "MEM_MIB", "DISK_MIB", "CREATED");
                    for l in listed {
                        let disk = l.disk_bytes / (1024 * 1024);
                        match &l.description {
                            Some(d) => {
                                let created = chrono::DateTime::from_timestamp(i64::try_from(d.created_unix).unwrap_or(0), 0)
                                    .map_or_else(String::new, |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string());
                                let devices = d.shape.devices.join(",");
                                println!("{:<16}  {:>5}  {:>7}  {disk:>8}  {created:<20}  {devices}", l.key, d.shape.vcpus, d.shape.mem_mib);
                            }
                            None => println!("{:<16}  {:>5}  {:>7}  {disk:>8}  {:<20}  (incomplete)", l.key, "-", "-", "-"),
                        }
                    }
                }
            }
        }
        TemplateAction::Rm { keys } => {
            for key in keys {
                store.remove(&key)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn check(boot: bool) -> anyhow::Result<ExitCode> {
    let mut items = host::check_host();
    if let Ok(config) = carapace_runtime::config::load(None) {
        items.push(template::check_item(&config));
    }
    for item in &items {
        println!("{item}");
    }
    if !host::all_ok(&items) {
        return Ok(ExitCode::FAILURE);
    }
    if boot {
        let report = carapace_runtime::smoke::boot_and_ping()?;
        println!("ok   boot       {report}");
    }
    Ok(ExitCode::SUCCESS)
}

fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

fn create_options(a: &CreateArgs) -> CreateOptions {
    CreateOptions { id: a.id.clone(), bundle: a.bundle.clone(), pid_file: a.pid_file.clone(), console_socket: a.console_socket.clone() }
}

/// An exit status as a process exit code (signals as 128+N).
fn code(status: i32) -> ExitCode {
    ExitCode::from(u8::try_from(status.clamp(0, 255)).unwrap_or(255))
}

fn run_foreground(rt: &Runtime, a: &CreateArgs, detach: bool) -> anyhow::Result<ExitCode> {
    let mut child = rt.create(&create_options(a))?;
    if let Err(e) = rt.start(&a.id) {
        let _ = rt.delete(&a.id, true);
        let _ = child.wait();
        return Err(e.into());
    }
    if detach {
        return Ok(ExitCode::SUCCESS);
    }
    forward_signals(rt.clone(), a.id.clone());
    let status = child.wait().context("waiting for the container")?;
    let status = status.code().unwrap_or_else(|| {
        use std::os::unix::process::ExitStatusExt;
        128 + status.signal().unwrap_or(0)
    });
    let status = rt.state(&a.id).ok().and_then(|r| r.exit_code).unwrap_or(status);
    rt.delete(&a.id, true)?;
    Ok(code(status))
}

/// Signals sent to a foreground `run` go to the container's init.
fn forward_signals(rt: Runtime, id: String) {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGQUIT, Signal::SIGUSR1, Signal::SIGUSR2] {
        set.add(s);
    }
    let _ = set.thread_block();
    std::thread::spawn(move || {
        while let Ok(sig) = set.wait() {
            if let Err(e) = rt.kill(&id, sig as i32, false) {
                tracing::warn!(error = %e, "forwarding {sig}");
            }
        }
    });
}

fn parse_user(s: &str) -> anyhow::Result<(u32, Option<u32>)> {
    let (u, g) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    let uid = u.parse().with_context(|| format!("--user {s:?}: the uid must be a number"))?;
    let gid = g.map(|g| g.parse()).transpose().with_context(|| format!("--user {s:?}: the gid must be a number"))?;
    Ok((uid, gid))
}

fn parse_interval(s: &str) -> anyhow::Result<Duration> {
    let n = s.strip_suffix('s').unwrap_or(s);
    let secs: f64 = n.parse().with_context(|| format!("--interval {s:?}: expected seconds such as 5s"))?;
    anyhow::ensure!(secs > 0.0 && secs < 86_400.0, "--interval {s:?}: out of range");
    Ok(Duration::from_secs_f64(secs))
}

fn list(rt: &Runtime, format: Format, quiet: bool) -> anyhow::Result<ExitCode> {
    let all = rt.list();
    if quiet {
        for r in &all {
            println!("{}", r.id);
        }
        return Ok(ExitCode::SUCCESS);
    }
    match format {
        Format::Json => print_json(&serde_json::Value::Array(all.iter().map(|r| r.oci_state()).collect()))?,
        Format::Table => {
            let rows: Vec<[String; 6]> = all
                .iter()
                .map(|r| {
                    let pid = if r.status == Status::Stopped { 0 } else { r.pid };
                    [
                        r.id.clone(),
                        pid.to_string(),
                        r.status.to_string(),
                        r.bundle.display().to_string(),
                        r.created.clone(),
                        r.owner.clone(),
                    ]
                })
                .collect();
            let head = ["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"].map(String::from);
            let mut widths = head.clone().map(|h| h.len());
            for row in &rows {
                for (w, c) in widths.iter_mut().zip(row) {
                    *w = (*w).max(c.len());
                }
            }
            for row in std::iter::once(&head).chain(&rows) {
                let line: Vec<String> = row.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
                println!("{}", line.join("   ").trim_end());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn write_spec(bundle: &Path) -> anyhow::Result<ExitCode> {
    let path = bundle.join("config.json");
    anyhow::ensure!(!path.exists(), "{}: file exists; remove it first", path.display());
    let text = serde_json::to_vec_pretty(&spec::default_spec())?;
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(ExitCode::SUCCESS)
}

fn events(rt: &Runtime, id: &str, stats: bool, interval: &str) -> anyhow::Result<ExitCode> {
    let interval = parse_interval(interval)?;
    loop {
        let s = rt.stats(id)?;
        println!("{}", spec::stats_event(id, &s));
        if stats {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(interval);
        if rt.state(id)?.status == Status::Stopped {
            return Ok(ExitCode::SUCCESS);
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let rt = Runtime { store: StateStore::new(&cli.root), global_args: global_args(&cli) };
    match cli.command {
        Command::Create(a) => {
            rt.create(&create_options(&a))?;
        }
        Command::Run { detach, create } => return run_foreground(&rt, &create, detach),
        Command::Start { id } => rt.start(&id)?,
        Command::State { id } => print_json(&rt.state(&id)?.oci_state())?,
        Command::Kill { all, id, signal } => rt.kill(&id, proc::parse_signal(&signal)?, all)?,
        Command::Delete { force, id } => rt.delete(&id, force)?,
        Command::Exec { process, tty, detach, pid_file, env, cwd, user, console_socket, preserve_fds: _, id, args } => {
            if process.is_none() && args.is_empty() {
                anyhow::bail!("exec: give the command to run, or --process FILE");
            }
            let user = user.as_deref().map(parse_user).transpose()?;
            let overrides = ExecOverrides { args, tty, cwd, env, user };
            let p = rt.exec_process(&id, process.as_deref(), &overrides)?;
            if detach {
                let pid = monitor::spawn_detached_exec(&rt, &id, &p, console_socket.as_deref())?;
                if let Some(f) = pid_file {
                    carapace_runtime::container::write_pid_file(&f, pid)?;
                }
            } else {
                let req = ExecRequest { id: &id, process: p, console_socket: console_socket.as_deref() };
                return Ok(code(monitor::exec(&rt, req, None)?));
            }
        }
        Command::Ps { format, id } => {
            let pids = rt.ps(&id)?;
            match format {
                Format::Json => print_json(&serde_json::json!(pids))?,
                Format::Table => {
                    println!("PID");
                    for p in pids {
                        println!("{p}");
                    }
                }
            }
        }
        Command::List { format, quiet } => return list(&rt, format, quiet),
        Command::Pause { id } => rt.pause(&id, true)?,
        Command::Resume { id } => rt.pause(&id, false)?,
        Command::Spec { bundle, rootless: _ } => return write_spec(&bundle),
        Command::Features => print_json(&spec::features())?,
        Command::Events { stats, interval, id } => return events(&rt, &id, stats, &interval),
        Command::Update { resources, id } => {
            let text = if resources.as_os_str() == "-" {
                let mut v = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut v)?;
                v
            } else {
                std::fs::read(&resources).with_context(|| format!("--resources {}", resources.display()))?
            };
            serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&text)
                .with_context(|| format!("--resources {}: not an OCI linux.resources object", resources.display()))?;
            rt.update(&id, text)?;
        }
        Command::Version => {
            println!("carapace version {}", env!("CARGO_PKG_VERSION"));
            println!("spec: {}", spec::OCI_VERSION);
        }
        Command::Check { boot } => return check(boot),
        Command::Template { action } => return template(action),
        Command::Monitor { ready_fd, bundle, console_socket, id } => {
            let status = monitor::container(&rt, &id, &bundle, console_socket.as_deref(), Some(ready_fd));
            return Ok(code(status));
        }
        Command::ExecHelper { ready_fd, process_file, console_socket, id } => {
            let process = monitor::read_process_file(&process_file)?;
            let req = ExecRequest { id: &id, process, console_socket: console_socket.as_deref() };
            return Ok(code(monitor::exec(&rt, req, Some(ready_fd))?));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// runc's shim reads the last `{"level":"error","msg":...}` line of a JSON
/// log to explain a failure: write ours in that shape.
fn log_error_json(path: &Path, msg: &str) {
    let line = serde_json::json!({"level": "error", "msg": msg, "time": chrono::Utc::now().to_rfc3339()});
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(f, "{line}");
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logging(&cli) {
        eprintln!("carapace: {e:#}");
        return ExitCode::FAILURE;
    }
    let json_log = (cli.log_format == LogFormat::Json).then(|| cli.log.clone()).flatten();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let msg = format!("{e:#}");
            if let Some(path) = json_log {
                log_error_json(&path, &msg);
            }
            eprintln!("carapace: {msg}");
            ExitCode::FAILURE
        }
    }
}
