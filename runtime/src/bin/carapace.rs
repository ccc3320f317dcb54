//! `carapace`: a runc-compatible OCI runtime where every container is a microVM.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use carapace_runtime::host;

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

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check that this host can run microVMs (one line per requirement).
    Check {
        /// Also boot a microVM and check that its agent answers.
        #[arg(long)]
        boot: bool,
    },
}

fn init_logging(cli: &Cli) -> anyhow::Result<()> {
    let level = if cli.debug { "debug" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CARAPACE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let writer: Box<dyn Fn() -> Box<dyn std::io::Write> + Send + Sync> = match &cli.log {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("--log {}", path.display()))?;
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

fn check(boot: bool) -> anyhow::Result<ExitCode> {
    let items = host::check_host();
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

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Check { boot } => check(boot),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logging(&cli) {
        eprintln!("carapace: {e:#}");
        return ExitCode::FAILURE;
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("carapace: {e:#}");
            ExitCode::FAILURE
        }
    }
}
