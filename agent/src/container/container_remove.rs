//! RemoveContainer: processes, mounts, cgroup and state gone.

use std::io;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::mountinfo::unmount_new_under;
use super::*;

/// How long RemoveContainer waits for killed processes to go.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

impl ContainerManager {
    /// RemoveContainer.
    pub fn remove(&self, id: &str, force: bool) -> Result<()> {
        let c = self.get(id)?;
        let _span = tracing::info_span!("remove_container", id, force).entered();
        let mut inner = lock(&c.inner);
        if inner.started && !c.init.has_exited() && !force {
            return Err(ContainerError::FailedPrecondition(format!("container {id:?} is running; stop it first or remove with force")));
        }
        // Whatever still runs goes: the init (and with it a PID namespace),
        // then anything left in the cgroup (exec'd processes without one).
        let deadline = Instant::now() + KILL_TIMEOUT;
        loop {
            let mut left = c.cgroup.pids().unwrap_or_default();
            if !c.init.has_exited() {
                left.push(u32::try_from(c.init.pid()).unwrap_or(0));
            }
            left.retain(|&p| p != 0);
            if left.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(ContainerError::FailedPrecondition(format!(
                    "container {id:?}: processes {left:?} did not die within {KILL_TIMEOUT:?}"
                )));
            }
            // Frozen processes die of SIGKILL too (cgroup v2).
            for pid in left {
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = self.sys.kill(pid, Signal::SIGKILL);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if c.direct_init {
            // Dead now: it reads none of our memory any more.
            if let Some(init) = inner.init_process.as_mut() {
                init.release();
            }
        } else {
            let _registry = self.reaper.registry();
            if let Err(e) = inner.lc.delete(true) {
                tracing::warn!(error = %e, "libcontainer delete; cleaning up by hand");
            }
        }
        if let Some(before) = &c.mounts_before {
            unmount_new_under(self.sys.as_ref(), &c.rootfs, before);
        }
        let mut problems = Vec::new();
        if let Err(e) = c.cgroup.remove() {
            problems.push(format!("removing {}: {e}", c.cgroup.dir().display()));
        }
        for dir in [self.libcontainer_root().join(id), c.bundle.clone()] {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => problems.push(format!("removing {}: {e}", dir.display())),
            }
        }
        inner.execs.clear();
        drop(inner);
        lock(&self.containers).remove(id);
        if problems.is_empty() {
            tracing::info!("container removed");
            Ok(())
        } else {
            Err(ContainerError::io("removing the container", io::Error::other(problems.join("; "))))
        }
    }
}
