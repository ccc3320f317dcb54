//! `carapace features`: the OCI features document.

use std::process::ExitCode;

use carapace_runtime::spec;

use super::print_json;

pub fn run() -> anyhow::Result<ExitCode> {
    print_json(&spec::features())?;
    Ok(ExitCode::SUCCESS)
}
