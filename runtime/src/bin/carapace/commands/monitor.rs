//! `carapace _monitor` (hidden): the host process standing in for a
//! container, started by `create`; see `carapace_runtime::monitor`.

use std::path::PathBuf;
use std::process::ExitCode;

use carapace_runtime::container::Runtime;
use carapace_runtime::monitor;

use super::code;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long)]
    pub ready_fd: i32,
    #[arg(long)]
    pub bundle: PathBuf,
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    pub id: String,
}

pub fn run(rt: &Runtime, a: &Args) -> anyhow::Result<ExitCode> {
    let status = monitor::container(rt, &a.id, &a.bundle, a.console_socket.as_deref(), Some(a.ready_fd));
    Ok(code(status))
}
