//! `carapace update`: apply new linux.resources (a file, or - for stdin).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use carapace_runtime::container::Runtime;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(short, long)]
    pub resources: PathBuf,
    pub id: String,
}

pub fn run(rt: &Runtime, a: &Args) -> anyhow::Result<ExitCode> {
    let text = if a.resources.as_os_str() == "-" {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut v)?;
        v
    } else {
        std::fs::read(&a.resources).with_context(|| format!("--resources {}", a.resources.display()))?
    };
    serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&text)
        .with_context(|| format!("--resources {}: not an OCI linux.resources object", a.resources.display()))?;
    rt.update(&a.id, text)?;
    Ok(ExitCode::SUCCESS)
}
