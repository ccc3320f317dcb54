//! Carapace's VMM: a minimal KVM virtual machine monitor that boots a Linux
//! guest (uncompressed `vmlinux`, 64-bit entry) with a serial console, an
//! i8042 reset line and virtio-mmio devices (vsock, fs, net).
//!
//! Use it as a library:
//!
//! ```no_run
//! use carapace_vmm::{VmConfig, Vmm};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = VmConfig::from_file("vm.json".as_ref())?;
//! let exit = Vmm::new(&config)?.run()?;
//! std::process::exit(exit.exit_code());
//! # }
//! ```
//!
//! or as the `carapace-vmm` binary (`--config vm.json`, or flags); its exit
//! codes are the `EXIT_*` constants in [`exit`].
//!
//! A running VM can be written to a snapshot and later started from it
//! (`snapshot_to` / `restore_from` in [`VmConfig`]; see [`snapshot`]).

pub mod arch;
pub mod bus;
pub mod cmdline;
pub mod config;
pub mod debug;
pub mod devices;
pub mod error;
pub mod exit;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod profile;
pub mod ratelimit;
pub mod seccomp;
pub mod snapshot;
#[cfg(test)]
mod test_utils;
pub mod vcpu;
pub mod vm;

pub use config::{ConfigError, SerialOutput, VmConfig, VsockConfig};
pub use exit::{ExitSender, VmExit};
pub use vm::{Vmm, VmmError};
