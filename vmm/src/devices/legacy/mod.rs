//! Legacy port-I/O devices: the 8250 UART console and the i8042 reset line.

mod i8042;
mod serial;

pub use i8042::I8042;
pub use serial::{open_sink, EventFdTrigger, SerialDevice, SerialError};
