//! `carapace create`: boot the container's microVM and create the container.

use std::path::PathBuf;
use std::process::ExitCode;

use carapace_runtime::container::{CreateOptions, Runtime};

// `run` flattens these beside its own `Args`: the group clap derives for
// a struct is named after it, and two groups named `Args` collide.
#[derive(Debug, clap::Args)]
#[group(id = "CreateArgs")]
pub struct Args {
    /// The bundle directory (config.json and the rootfs).
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    /// Write the pid of the container's host process (the monitor, which
    /// exits with the container's status) to this file.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Send the pty master of a terminal container to this Unix socket.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Accepted for runc compatibility (the guest always pivots).
    #[arg(long)]
    pub no_pivot: bool,
    /// Accepted for runc compatibility (keyrings are per guest).
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Accepted for runc compatibility; extra fds do not cross into a VM.
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    /// The container id.
    pub id: String,
}

impl Args {
    pub fn options(&self) -> CreateOptions {
        CreateOptions {
            id: self.id.clone(),
            bundle: self.bundle.clone(),
            pid_file: self.pid_file.clone(),
            console_socket: self.console_socket.clone(),
        }
    }
}

pub fn run(rt: &Runtime, a: &Args) -> anyhow::Result<ExitCode> {
    rt.create(&a.options())?;
    Ok(ExitCode::SUCCESS)
}
