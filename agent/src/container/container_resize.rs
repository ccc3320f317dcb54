//! ResizeTty: the window size of a process's terminal.

use carapace_protocol::agent;

use super::*;

impl ContainerManager {
    /// ResizeTty.
    pub fn resize(&self, req: &agent::ResizeTtyRequest) -> Result<()> {
        let c = self.get(&req.container_id)?;
        let process = c.process(&req.exec_id)?;
        let rows = u16::try_from(req.rows).map_err(|_| ContainerError::InvalidArgument("rows: too large".into()))?;
        let cols = u16::try_from(req.cols).map_err(|_| ContainerError::InvalidArgument("cols: too large".into()))?;
        if process.io().resize(rows, cols)? {
            Ok(())
        } else {
            Err(ContainerError::FailedPrecondition(format!(
                "process {:?} of container {:?} has no terminal",
                req.exec_id, req.container_id
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_utils::{add_container, manager};
    use super::*;

    #[test]
    fn a_process_without_a_terminal_is_not_resized() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (m, _sys) = manager(dir.path());
        add_container(&m, "c1", 5, true, &[]);
        let mut req = agent::ResizeTtyRequest::new();
        req.container_id = "c1".into();
        req.rows = 24;
        req.cols = 80;
        let err = m.resize(&req).expect_err("no tty");
        assert_eq!(err.code(), ttrpc::Code::FAILED_PRECONDITION);
        req.rows = 70_000;
        let err = m.resize(&req).expect_err("too large");
        assert!(err.to_string().contains("rows"), "{err}");
    }
}
