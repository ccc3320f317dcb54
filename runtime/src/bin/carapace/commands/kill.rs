//! `carapace kill`: signal the container's init, or all its processes.

use std::process::ExitCode;

use carapace_runtime::container::Runtime;
use carapace_runtime::proc;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(short, long)]
    pub all: bool,
    pub id: String,
    #[arg(default_value = "SIGTERM")]
    pub signal: String,
}

pub fn run(rt: &Runtime, a: &Args) -> anyhow::Result<ExitCode> {
    rt.kill(&a.id, proc::parse_signal(&a.signal)?, a.all)?;
    Ok(ExitCode::SUCCESS)
}
