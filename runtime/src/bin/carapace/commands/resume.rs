//! `carapace resume`: thaw a paused container.

use std::process::ExitCode;

use carapace_runtime::container::Runtime;

#[derive(Debug, clap::Args)]
pub struct Args {
    pub id: String,
}

pub fn run(rt: &Runtime, a: &Args) -> anyhow::Result<ExitCode> {
    rt.pause(&a.id, false)?;
    Ok(ExitCode::SUCCESS)
}
