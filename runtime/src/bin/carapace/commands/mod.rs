//! One module per command, runc's set: each has its flags (`Args`) and a
//! `run` that maps them onto the runtime library.

pub mod check;
pub mod create;
pub mod delete;
pub mod events;
pub mod exec;
pub mod exec_helper;
pub mod features;
pub mod kill;
pub mod list;
pub mod monitor;
pub mod pause;
pub mod ps;
pub mod resume;
pub mod run;
pub mod spec;
pub mod start;
pub mod state;
pub mod template;
pub mod update;
pub mod version;

use std::io::Write;
use std::process::ExitCode;

use clap::ValueEnum;

/// The output format of `list` and `ps`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

pub fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

/// An exit status as a process exit code (signals as 128+N).
pub fn code(status: i32) -> ExitCode {
    ExitCode::from(u8::try_from(status.clamp(0, 255)).unwrap_or(255))
}
