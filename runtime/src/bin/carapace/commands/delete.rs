//! `carapace delete`: stop the container's VM and remove every trace of it.

use std::process::ExitCode;

use carapace_runtime::container::Runtime;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(short, long)]
    pub force: bool,
    pub id: String,
}

pub fn run(rt: &Runtime, a: &Args) -> anyhow::Result<ExitCode> {
    rt.delete(&a.id, a.force)?;
    Ok(ExitCode::SUCCESS)
}
