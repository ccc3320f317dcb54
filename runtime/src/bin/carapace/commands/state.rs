//! `carapace state`: the container's OCI state as JSON.

use std::process::ExitCode;

use carapace_runtime::container::Runtime;

use super::print_json;

#[derive(Debug, clap::Args)]
pub struct Args {
    pub id: String,
}

pub fn run(rt: &Runtime, a: &Args) -> anyhow::Result<ExitCode> {
    print_json(&rt.state(&a.id)?.oci_state())?;
    Ok(ExitCode::SUCCESS)
}
