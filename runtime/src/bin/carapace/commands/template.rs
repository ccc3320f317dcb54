//! `carapace template list|rm`: the VM templates sandboxes start from.

use std::process::ExitCode;

use carapace_runtime::template::{self, TemplateStore};

use super::{print_json, Format};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// List the templates under the config's `template_dir`.
    List {
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Remove templates by key (VMs started from them run on).
    Rm {
        #[arg(required = true)]
        keys: Vec<String>,
    },
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let action = a.action;
    let config = carapace_runtime::config::load(None)?;
    let store = TemplateStore::new(&config.template_dir);
    match action {
        Action::List { format } => {
            let listed = store.list()?;
            match format {
                Format::Json => print_json(&serde_json::Value::Array(listed.iter().map(template::Listed::to_json).collect()))?,
                Format::Table => {
                    println!("{:<16}  {:>5}  {:>7}  {:>8}  {:<20}  DEVICES", "KEY", "VCPUS", "MEM_MIB", "DISK_MIB", "CREATED");
                    for l in listed {
                        let disk = l.disk_bytes / (1024 * 1024);
                        match &l.description {
                            Some(d) => {
                                let created = chrono::DateTime::from_timestamp(i64::try_from(d.created_unix).unwrap_or(0), 0)
                                    .map_or_else(String::new, |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string());
                                let devices = d.shape.devices.join(",");
                                println!(
                                    "{:<16}  {:>5}  {:>7}  {disk:>8}  {created:<20}  {devices}",
                                    l.key, d.shape.vcpus, d.shape.mem_mib
                                );
                            }
                            None => println!("{:<16}  {:>5}  {:>7}  {disk:>8}  {:<20}  (incomplete)", l.key, "-", "-", "-"),
                        }
                    }
                }
            }
        }
        Action::Rm { keys } => {
            for key in keys {
                store.remove(&key)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
