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
        match inner.init_process.as_mut() {
            Some(init) => init.start().map_err(|e| ContainerError::io("starting the container", e))?,
            None => {
                let _registry = self.reaper.registry();
                inner.lc.start().map_err(|e| ContainerError::libcontainer("starting the container", &e))?;
            }
        }
        inner.started = true;
        let watch = inner.exec_watch.take();
        drop(inner);
        let pid = u32::try_from(c.init.pid()).map_err(|_| ContainerError::InvalidArgument("pid".into()))?;
        if let Some(watch) = watch {
            if wait_for_exec(&watch) {
                // Exec'd or dead: it reads none of our memory any more.
                if let Some(init) = lock(&c.inner).init_process.as_mut() {
                    init.release();
                }
            }
        }
        Ok(pid)
    }
}

/// How long StartContainer waits for the init to run its startContainer
/// hooks and exec the user's program.
const EXEC_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Waits until the init has run the startContainer hooks and exec'd the
/// user's program (or died), i.e. until `watch`, the read end of the pipe
/// whose write end only the init holds, close-on-exec, hangs up; or
/// [`EXEC_WAIT`] passed. StartContainer returns only then, so that the
/// runtime's poststart hooks come after the process started, as the OCI
/// spec orders them. One blocking poll: polling /proc/PID/exe cost two
/// system calls every few milliseconds, on the init's only vCPU. Whether
/// the pipe hung up.
fn wait_for_exec(watch: &std::os::fd::OwnedFd) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let end = std::time::Instant::now() + EXEC_WAIT;
    loop {
        let left = end.saturating_duration_since(std::time::Instant::now());
        let mut fds = [PollFd::new(watch.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX)) {
            Err(nix::Error::EINTR) if !left.is_zero() => {}
            // Hung up (or, never, data), timed out, or failed: done waiting.
            Ok(n) if n > 0 => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_utils::{add_container, exit, manager};

    #[test]
    fn the_exec_wait_ends_when_the_last_writer_execs_or_closes() {
        use std::time::{Duration, Instant};
        let (watch, signal) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        // A child holds the write end until its exec, then runs on.
        let _children = crate::test_children();
        let mut child = std::process::Command::new("sleep").arg("30").spawn().expect("sleep");
        let held = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(signal);
        });
        let t = Instant::now();
        assert!(super::wait_for_exec(&watch));
        let waited = t.elapsed();
        let _ = child.kill();
        let _ = child.wait();
        held.join().expect("thread");
        assert!(waited >= Duration::from_millis(300), "returned before the last writer closed: {waited:?}");
        assert!(waited < Duration::from_secs(20), "waited for the child's exit: {waited:?}");
    }

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
