//! `carapace _exec` (hidden): the host process of a detached exec, started
//! by `exec --detach`; see `carapace_runtime::monitor::exec`.

use std::path::PathBuf;
use std::process::ExitCode;

use carapace_runtime::container::Runtime;
use carapace_runtime::monitor::{self, ExecRequest};

use super::code;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long)]
    pub ready_fd: i32,
    #[arg(long)]
    pub process_file: PathBuf,
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    pub id: String,
}

pub fn run(rt: &Runtime, a: &Args) -> anyhow::Result<ExitCode> {
    let process = monitor::read_process_file(&a.process_file)?;
    let req = ExecRequest { id: &a.id, process, console_socket: a.console_socket.as_deref() };
    Ok(code(monitor::exec(rt, req, Some(a.ready_fd))?))
}
