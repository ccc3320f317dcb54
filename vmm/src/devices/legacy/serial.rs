//! The 8250/16550A UART at 0x3f8 (vm-superio), writing the guest's console
//! to a file, to stdout or nowhere. Input is not wired.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::PathBuf;

use tracing::warn;
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::config::SerialOutput;
use crate::devices::bus::BusDevice;

/// Errors setting up the console.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("cannot open serial output file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Opens the console's sink.
pub fn open_sink(out: &SerialOutput) -> Result<Box<dyn Write + Send>, SerialError> {
    Ok(match out {
        SerialOutput::None => Box::new(io::sink()),
        SerialOutput::Stdout => Box::new(io::stdout()),
        SerialOutput::File(path) => Box::new(
            OpenOptions::new().create(true).append(true).open(path).map_err(|source| SerialError::Open { path: path.clone(), source })?,
        ),
    })
}

/// An interrupt line backed by an eventfd (registered with KVM as an irqfd).
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The UART on the port-I/O bus.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
    write_failed: bool,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialDevice { serial: Serial::new(EventFdTrigger(irq), out), write_failed: false }
    }

    /// A UART with the registers of a snapshot.
    pub fn from_state(state: &vm_superio::serial::SerialState, irq: EventFd, out: Box<dyn Write + Send>) -> Result<Self, String> {
        let serial =
            Serial::from_state(state, EventFdTrigger(irq), NoEvents, out).map_err(|e| format!("serial: cannot restore the UART: {e:?}"))?;
        Ok(SerialDevice { serial, write_failed: false })
    }

    /// The UART's registers, for a snapshot.
    pub fn state(&self) -> vm_superio::serial::SerialState {
        self.serial.state()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = u8::try_from(offset).map(|o| self.serial.read(o)).unwrap_or(0xff);
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(off), Some(&v)) = (u8::try_from(offset), data.first()) else { return };
        if let Err(e) = self.serial.write(off, v) {
            // Report once: a console that cannot be written stays that way.
            if !self.write_failed {
                warn!("serial: cannot write guest console output: {e:?}");
                self.write_failed = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn output_reaches_the_file_and_raises_the_irq() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("console.log");
        std::fs::write(&path, b"earlier\n").unwrap();
        let sink = open_sink(&SerialOutput::File(path.clone())).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut uart = SerialDevice::new(irq.try_clone().unwrap(), sink);
        // Enable the THR-empty interrupt like the 8250 driver does.
        uart.write(1, &[0x02]);
        for b in b"hello\n" {
            uart.write(0, &[*b]);
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"earlier\nhello\n");
        assert!(irq.read().unwrap() >= 1);
        // LSR: transmitter empty.
        let mut lsr = [0u8];
        uart.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60);
    }

    #[test]
    fn none_sink_swallows_output() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut uart = SerialDevice::new(irq, open_sink(&SerialOutput::None).unwrap());
        uart.write(0, b"x");
    }

    #[test]
    fn unopenable_file_is_a_clear_error() {
        let e = open_sink(&SerialOutput::File("/nonexistent-dir/console.log".into())).err().unwrap();
        assert!(e.to_string().contains("/nonexistent-dir/console.log"), "{e}");
    }
}
