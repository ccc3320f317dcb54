//! `carapace run`: create and start a container; in the foreground, wait
//! for it, delete it and exit with its status.

use std::process::ExitCode;

use anyhow::Context;
use carapace_runtime::container::Runtime;
use carapace_runtime::error::Chain;

use super::{code, create};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(short, long)]
    pub detach: bool,
    #[command(flatten)]
    pub create: create::Args,
}

pub fn run(rt: &Runtime, a: &Args) -> anyhow::Result<ExitCode> {
    let id = &a.create.id;
    let mut child = rt.create(&a.create.options())?;
    if let Err(e) = rt.start(id) {
        let _ = rt.delete(id, true);
        let _ = child.wait();
        return Err(e.into());
    }
    if a.detach {
        return Ok(ExitCode::SUCCESS);
    }
    forward_signals(rt.clone(), id.clone());
    let status = child.wait().context("waiting for the container")?;
    let status = status.code().unwrap_or_else(|| {
        use std::os::unix::process::ExitStatusExt;
        128 + status.signal().unwrap_or(0)
    });
    let status = rt.state(id).ok().and_then(|r| r.exit_code).unwrap_or(status);
    rt.delete(id, true)?;
    Ok(code(status))
}

/// Signals sent to a foreground `run` go to the container's init.
fn forward_signals(rt: Runtime, id: String) {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGQUIT, Signal::SIGUSR1, Signal::SIGUSR2] {
        set.add(s);
    }
    let _ = set.thread_block();
    std::thread::spawn(move || {
        while let Ok(sig) = set.wait() {
            if let Err(e) = rt.kill(&id, sig as i32, false) {
                tracing::warn!(error = %Chain(&e), "forwarding {sig}");
            }
        }
    });
}
