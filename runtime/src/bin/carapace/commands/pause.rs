//! `carapace pause`: freeze every process of the container.

use std::process::ExitCode;

use carapace_runtime::container::Runtime;

#[derive(Debug, clap::Args)]
pub struct Args {
    pub id: String,
}

pub fn run(rt: &Runtime, a: &Args) -> anyhow::Result<ExitCode> {
    rt.pause(&a.id, true)?;
    Ok(ExitCode::SUCCESS)
}
