//! ResizeTty: the window size of a process's terminal.

use carapace_protocol::agent;

use super::*;

impl ContainerManager {
    /// ResizeTty.
    pub fn resize(&self, req: &agent::ResizeTtyRequest) -> Result<()> {
        let c = self.get(&req.container_id)?;
        let process = c.process(&req.exec_id)?;
        let rows = u16::try_from(req.rows)
            .map_err(|_| ContainerError::InvalidArgument("rows: too large".into()))?;
        let cols = u16::try_from(req.cols)
            .map_err(|_| ContainerError::InvalidArgument("cols: too large".into()))?;
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
