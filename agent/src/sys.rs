//! The system calls the agent's setup code makes, behind a trait, so that
//! the order and arguments of guest setup can be checked in unit tests
//! without root and without a VM.
//!
//! Every call here is a real system call in the guest, where each costs
//! ~0.6 ms: implementations do exactly one syscall per step where they can
//! (no `stat` before `open`, no size probing before `read`).

use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use nix::mount::MsFlags;

/// The system calls guest setup needs.
pub trait Syscall {
    /// mount(2).
    fn mount(
        &self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MsFlags,
        data: Option<&str>,
    ) -> nix::Result<()>;

    /// mkdir(2) of one directory (the parent must exist).
    fn mkdir(&self, path: &Path, mode: u32) -> io::Result<()>;

    /// Reads up to `buf.len()` bytes of a small file (open, one read,
    /// close); returns how many were read.
    fn read_file(&self, path: &Path, buf: &mut [u8]) -> io::Result<usize>;

    /// Writes `data` to an existing file with one write (open without
    /// create/truncate, write, close): for proc, sys and cgroup files.
    fn write_file(&self, path: &Path, data: &[u8]) -> io::Result<()>;
}

/// The real system calls.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxSyscall;

impl Syscall for LinuxSyscall {
    fn mount(
        &self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MsFlags,
        data: Option<&str>,
    ) -> nix::Result<()> {
        nix::mount::mount(Some(source), target, Some(fstype), flags, data)
    }

    fn mkdir(&self, path: &Path, mode: u32) -> io::Result<()> {
        std::fs::DirBuilder::new().mode(mode).create(path)
    }

    fn read_file(&self, path: &Path, buf: &mut [u8]) -> io::Result<usize> {
        let mut file = std::fs::File::open(path)?;
        loop {
            match file.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    fn write_file(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let mut file = OpenOptions::new().write(true).open(path)?;
        file.write_all(data)
    }
}
