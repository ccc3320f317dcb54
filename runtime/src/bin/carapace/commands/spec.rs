//! `carapace spec`: write a default config.json into the bundle directory.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use carapace_runtime::spec;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    /// Accepted for runc compatibility (the guest runs as root).
    #[arg(long)]
    pub rootless: bool,
}

pub fn run(a: &Args) -> anyhow::Result<ExitCode> {
    let path = a.bundle.join("config.json");
    anyhow::ensure!(!path.exists(), "{}: file exists; remove it first", path.display());
    let text = serde_json::to_vec_pretty(&spec::default_spec())?;
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(ExitCode::SUCCESS)
}
