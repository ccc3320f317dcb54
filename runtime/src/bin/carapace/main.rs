//! `carapace`: a runc-compatible OCI runtime where every container is a microVM.
//!
//! This file holds the global flags, logging and the dispatch; each command
//! is a file under `commands/`, over the `carapace_runtime` library.

mod commands;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use carapace_runtime::container::Runtime;
use carapace_runtime::state::{dir_name, StateStore};

use commands::{
    check, create, delete, events, exec, exec_helper, features, kill, list, monitor, pause, ps, resume, run, spec, start, state, template,
    update, version,
};

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
enum Command {
    /// Boot the container's microVM and create the container (not started).
    Create(create::Args),
    /// Start a created container.
    Start(start::Args),
    /// Print the container's state as JSON.
    State(state::Args),
    /// Send a signal to the container's init (or to all its processes).
    Kill(kill::Args),
    /// Stop the container's VM and remove every trace of it.
    Delete(delete::Args),
    /// Create and start a container; in the foreground, wait for it, delete
    /// it and exit with its status.
    Run(run::Args),
    /// Run a process in a running container.
    Exec(exec::Args),
    /// List the container's processes (guest pids).
    Ps(ps::Args),
    /// List the containers under --root.
    List(list::Args),
    /// Freeze every process of the container.
    Pause(pause::Args),
    /// Thaw a paused container.
    Resume(resume::Args),
    /// Write a default config.json into the bundle directory.
    Spec(spec::Args),
    /// Print the OCI features document.
    Features,
    /// Print the container's cgroup statistics as runc's events.
    Events(events::Args),
    /// Apply new linux.resources (JSON, a file or - for stdin).
    Update(update::Args),
    /// Print the runtime's and the spec's versions.
    Version,
    /// List or remove VM templates (the snapshots sandboxes start from).
    Template(template::Args),
    /// Check that this host can run microVMs (one line per requirement).
    Check(check::Args),
    #[command(name = "_monitor", hide = true)]
    Monitor(monitor::Args),
    #[command(name = "_exec", hide = true)]
    ExecHelper(exec_helper::Args),
}

fn init_logging(cli: &Cli) -> anyhow::Result<()> {
    let level = if cli.debug { "debug" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CARAPACE_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    // The monitor's stderr is the container's: it logs beside its state.
    let log = match (&cli.log, &cli.command) {
        (Some(p), _) => Some(p.clone()),
        (None, Command::Monitor(a)) => Some(cli.root.join(dir_name(&a.id)).join("monitor.log")),
        _ => None,
    };
    // Colours only on a terminal, never in a log file.
    let builder = builder.with_ansi(log.is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr()));
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

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let rt = Runtime { store: StateStore::new(&cli.root), global_args: global_args(&cli) };
    match cli.command {
        Command::Create(a) => create::run(&rt, &a),
        Command::Start(a) => start::run(&rt, &a),
        Command::State(a) => state::run(&rt, &a),
        Command::Kill(a) => kill::run(&rt, &a),
        Command::Delete(a) => delete::run(&rt, &a),
        Command::Run(a) => run::run(&rt, &a),
        Command::Exec(a) => exec::run(&rt, a),
        Command::Ps(a) => ps::run(&rt, &a),
        Command::List(a) => list::run(&rt, &a),
        Command::Pause(a) => pause::run(&rt, &a),
        Command::Resume(a) => resume::run(&rt, &a),
        Command::Spec(a) => spec::run(&a),
        Command::Features => features::run(),
        Command::Events(a) => events::run(&rt, &a),
        Command::Update(a) => update::run(&rt, &a),
        Command::Version => version::run(),
        Command::Check(a) => check::run(&a),
        Command::Template(a) => template::run(a),
        Command::Monitor(a) => monitor::run(&rt, &a),
        Command::ExecHelper(a) => exec_helper::run(&rt, &a),
    }
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
    match dispatch(cli) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// clap checks a command's definition only when it is parsed: check
    /// every subcommand's here.
    #[test]
    fn every_command_is_well_formed() {
        Cli::command().debug_assert();
    }
}
