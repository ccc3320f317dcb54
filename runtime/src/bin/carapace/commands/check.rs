//! `carapace check`: can this host run microVMs (one line per requirement).

use std::process::ExitCode;

use carapace_runtime::host;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Also boot a microVM and check that its agent answers.
    #[arg(long)]
    pub boot: bool,
}

pub fn run(a: &Args) -> anyhow::Result<ExitCode> {
    let mut items = host::check_host();
    if let Ok(config) = carapace_runtime::config::load(None) {
        items.push(carapace_runtime::template::check_item(&config));
    }
    for item in &items {
        println!("{item}");
    }
    if !host::all_ok(&items) {
        return Ok(ExitCode::FAILURE);
    }
    if a.boot {
        let report = carapace_runtime::smoke::boot_and_ping()?;
        println!("ok   boot       {report}");
    }
    Ok(ExitCode::SUCCESS)
}
