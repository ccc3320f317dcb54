//! CloseStdin: EOF on a process's stdin.

use carapace_protocol::agent;

use super::*;

impl ContainerManager {
    /// CloseStdin.
    pub fn close_stdin(&self, req: &agent::CloseStdinRequest) -> Result<()> {
        let c = self.get(&req.container_id)?;
        c.process(&req.exec_id)?.io().close_stdin();
        Ok(())
    }
}
