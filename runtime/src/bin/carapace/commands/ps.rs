//! `carapace ps`: the container's processes (guest pids).

use std::process::ExitCode;

use carapace_runtime::container::Runtime;

use super::{print_json, Format};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    pub id: String,
}

pub fn run(rt: &Runtime, a: &Args) -> anyhow::Result<ExitCode> {
    let pids = rt.ps(&a.id)?;
    match a.format {
        Format::Json => print_json(&serde_json::json!(pids))?,
        Format::Table => {
            println!("PID");
            for p in pids {
                println!("{p}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
