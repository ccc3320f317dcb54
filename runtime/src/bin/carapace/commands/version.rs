//! `carapace version`: the runtime's and the spec's versions.

use std::process::ExitCode;

use carapace_runtime::spec;

pub fn run() -> anyhow::Result<ExitCode> {
    println!("carapace version {}", env!("CARGO_PKG_VERSION"));
    println!("spec: {}", spec::OCI_VERSION);
    Ok(ExitCode::SUCCESS)
}
