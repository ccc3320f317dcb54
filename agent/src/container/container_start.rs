//! StartContainer: the created container runs the user's program.

use super::*;

impl ContainerManager {
    /// StartContainer.
    pub fn start(&self, id: &str) -> Result<u32> {
        let c = self.get(id)?;
        let _span = tracing::info_span!("start_container", id).entered();
        let mut inner = lock(&c.inner);
        if inner.started {
            return Err(ContainerError::FailedPrecondition(format!("container {id:?} is already started")));
        }
        if c.init.has_exited() {
            return Err(ContainerError::FailedPrecondition(format!("container {id:?} has stopped")));
        }
        c.init.set_oom_baseline(c.cgroup.oom_kills());
        {
            let _registry = self.reaper.registry();
            inner.lc.start().map_err(|e| ContainerError::libcontainer("starting the container", &e))?;
        }
        inner.started = true;
        drop(inner);
        let pid = u32::try_from(c.init.pid()).map_err(|_| ContainerError::InvalidArgument("pid".into()))?;
        wait_for_exec(pid, || c.init.has_exited());
        Ok(pid)
    }
}

/// How long StartContainer waits for the init to run its startContainer
/// hooks and exec the user's program.
const EXEC_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Waits until process `pid` runs another program than this one (the
/// container's init has run the startContainer hooks and exec'd the user
/// process), or it exited, or [`EXEC_WAIT`] passed. StartContainer returns
/// only then, so that the runtime's poststart hooks come after the process
/// started, as the OCI spec orders them.
fn wait_for_exec(pid: u32, exited: impl Fn() -> bool) {
    use std::os::unix::fs::MetadataExt;
    let ours = std::fs::metadata("/proc/self/exe").map(|m| (m.dev(), m.ino())).ok();
    let start = std::time::Instant::now();
    while start.elapsed() < EXEC_WAIT && !exited() {
        match std::fs::metadata(format!("/proc/{pid}/exe")).map(|m| (m.dev(), m.ino())) {
            Ok(exe) if Some(exe) != ours => return,
            Ok(_) => {}
            // Gone, or not readable any more: nothing left to wait for.
            Err(_) => return,
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_utils::{add_container, exit, manager};

    #[test]
    fn only_a_created_running_init_starts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (m, _sys) = manager(dir.path());
        add_container(&m, "started", 10, true, &[]);
        let err = m.start("started").expect_err("twice");
        assert_eq!(err.code(), ttrpc::Code::FAILED_PRECONDITION);
        assert!(err.to_string().contains("already started"), "{err}");
        let c = add_container(&m, "dead", 11, false, &[]);
        exit(&c.init, 1);
        let err = m.start("dead").expect_err("stopped");
        assert!(err.to_string().contains("has stopped"), "{err}");
        assert_eq!(m.start("ghost").expect_err("unknown").code(), ttrpc::Code::NOT_FOUND);
    }
}
