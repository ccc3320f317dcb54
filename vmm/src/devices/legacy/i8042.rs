//! The i8042 keyboard controller, reduced to what a guest booted with
//! `reboot=k` needs: writing 0xfe (pulse reset) to the command port 0x64
//! ends the VM.

use tracing::info;
use vm_superio::{I8042Device, Trigger};

use crate::devices::bus::BusDevice;
use crate::exit::{ExitSender, VmExit};

/// Reports the reset as a guest reboot.
#[derive(Debug)]
struct ResetTrigger(ExitSender);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        info!("i8042: the guest asked for a CPU reset");
        self.0.send(VmExit::GuestReset);
        Ok(())
    }
}

/// The controller at ports 0x60-0x64 (data at offset 0, command/status at 4).
#[derive(Debug)]
pub struct I8042 {
    dev: I8042Device<ResetTrigger>,
}

impl I8042 {
    /// Number of ports covered from 0x60.
    pub const PORTS: u64 = 5;

    /// A controller reporting resets on `exit`.
    pub fn new(exit: ExitSender) -> Self {
        I8042 { dev: I8042Device::new(ResetTrigger(exit)) }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty (ready for commands).
        let v = u8::try_from(offset).map(|o| self.dev.read(o)).unwrap_or(0);
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), Some(&v)) = (u8::try_from(offset), data.first()) {
            // The trigger cannot fail (Infallible).
            let _ = self.dev.write(off, v);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::exit::VmEvent;

    #[test]
    fn reset_command_reports_a_guest_reset() {
        let (tx, rx) = ExitSender::channel();
        let mut kbd = I8042::new(tx.clone());
        let mut status = [0xffu8];
        kbd.read(4, &mut status);
        assert_eq!(status[0] & 0x2, 0, "input buffer empty");
        kbd.write(0, &[0xfe]); // data port: not a command
        kbd.write(4, &[0xd1]); // another command
        assert!(rx.try_recv().is_err());
        assert!(!tx.exiting());
        kbd.write(4, &[0xfe]);
        assert!(tx.exiting(), "vCPUs stop at their next exit");
        assert_eq!(rx.try_recv().unwrap(), VmEvent::Exit(VmExit::GuestReset));
    }
}
