//! The system calls the agent's setup code makes, behind a trait, so that
//! the order and arguments of guest setup (PID 1's mounts, CreateSandbox's
//! entropy, clock, hostname, shared file systems and sysctls) can be
//! checked in unit tests without root and without a VM
//! (`test_utils::RecordingSyscall`, under `cfg(test)`).
//!
//! Every call here is a real system call in the guest, where each costs
//! ~0.6 ms: implementations do exactly one syscall per step where they can
//! (no `stat` before `open`, no size probing before `read`).

use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use nix::mount::MsFlags;

/// The text of a small kernel file (proc, sys, cgroup), from offset `at`
/// (`Some(0)` makes a kept /proc file generate its text afresh) or from
/// where the file stands: one read when it fits 8 KiB (the kernel
/// generates such a file's whole text on the first read), more for a
/// longer one, none to probe its size or its end.
pub fn read_small(file: &std::fs::File, at: Option<u64>) -> io::Result<String> {
    use std::os::unix::fs::FileExt;
    let mut text = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = match at {
            Some(offset) => file.read_at(&mut chunk, offset + text.len() as u64)?,
            None => (&*file).read(&mut chunk)?,
        };
        text.extend_from_slice(&chunk[..n]);
        if n < chunk.len() {
            return Ok(String::from_utf8_lossy(&text).into_owned());
        }
    }
}

/// [`read_small`] of the file at `path` (open, read, close).
pub fn read_small_file(path: &Path) -> io::Result<String> {
    read_small(&std::fs::File::open(path)?, None)
}

/// The system calls guest setup needs.
pub trait Syscall: Send + Sync {
    /// mount(2).
    fn mount(&self, source: &str, target: &Path, fstype: &str, flags: MsFlags, data: Option<&str>) -> nix::Result<()>;

    /// umount2(2) with MNT_DETACH.
    fn umount(&self, target: &Path) -> nix::Result<()>;

    /// mkdir(2) of one directory (the parent must exist).
    fn mkdir(&self, path: &Path, mode: u32) -> io::Result<()>;

    /// A directory and its missing parents (mode 0755).
    fn mkdir_all(&self, path: &Path) -> io::Result<()>;

    /// Reads up to `buf.len()` bytes of a small file (open, one read,
    /// close); returns how many were read.
    fn read_file(&self, path: &Path, buf: &mut [u8]) -> io::Result<usize>;

    /// Writes `data` to an existing file with one write (open without
    /// create/truncate, write, close): for proc, sys and cgroup files.
    fn write_file(&self, path: &Path, data: &[u8]) -> io::Result<()>;

    /// sethostname(2).
    fn sethostname(&self, name: &str) -> nix::Result<()>;

    /// Mixes `bytes` into the kernel's entropy pool, credited as full
    /// entropy (ioctl RNDADDENTROPY).
    fn add_entropy(&self, bytes: &[u8]) -> io::Result<()>;

    /// Reseeds the kernel's CRNG from the pool now (ioctl RNDRESEEDCRNG),
    /// so that what was just added is used at once.
    fn reseed_crng(&self) -> io::Result<()>;

    /// Sets CLOCK_REALTIME (nanoseconds since the Unix epoch).
    fn set_realtime(&self, unix_nano: i64) -> io::Result<()>;

    /// kill(2).
    fn kill(&self, pid: i32, signal: nix::sys::signal::Signal) -> nix::Result<()>;
}

/// ioctl numbers from linux/random.h: `_IOW('R', 0x03, int[2])` and
/// `_IO('R', 0x07)`.
const RNDADDENTROPY: u64 = 0x4008_5203;
const RNDRESEEDCRNG: u64 = 0x5207;

/// The device the random ioctls are made on.
const RANDOM_DEVICE: &str = "/dev/urandom";

/// `struct rand_pool_info` (entropy_count in bits, buf_size in bytes, the
/// bytes), as 32-bit words so that it is aligned as the kernel reads it.
fn rand_pool_info(bytes: &[u8]) -> io::Result<Vec<u32>> {
    let too_big = || io::Error::new(io::ErrorKind::InvalidInput, "too much entropy for one call");
    let size = i32::try_from(bytes.len()).map_err(|_| too_big())?;
    let bits = size.checked_mul(8).ok_or_else(too_big)?;
    let mut words = Vec::with_capacity(2 + bytes.len().div_ceil(4));
    words.push(u32::from_ne_bytes(bits.to_ne_bytes()));
    words.push(u32::from_ne_bytes(size.to_ne_bytes()));
    for chunk in bytes.chunks(4) {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        words.push(u32::from_ne_bytes(word));
    }
    Ok(words)
}

/// The real system calls.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxSyscall;

impl LinuxSyscall {
    fn random_ioctl(request: u64, arg: *const u32) -> io::Result<()> {
        let device = std::fs::File::open(RANDOM_DEVICE)?;
        // SAFETY: `request` is one of the random ioctls above; `arg` is
        // null (RNDRESEEDCRNG) or points to a rand_pool_info whose
        // buf_size matches the words that follow it (RNDADDENTROPY), alive
        // for the call. The kernel only reads it.
        #[allow(clippy::cast_possible_truncation)]
        let rc = unsafe { libc::ioctl(device.as_raw_fd(), request as libc::Ioctl, arg) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Syscall for LinuxSyscall {
    fn mount(&self, source: &str, target: &Path, fstype: &str, flags: MsFlags, data: Option<&str>) -> nix::Result<()> {
        nix::mount::mount(Some(source), target, Some(fstype), flags, data)
    }

    fn umount(&self, target: &Path) -> nix::Result<()> {
        nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH)
    }

    fn mkdir(&self, path: &Path, mode: u32) -> io::Result<()> {
        std::fs::DirBuilder::new().mode(mode).create(path)
    }

    fn mkdir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::DirBuilder::new().mode(0o755).recursive(true).create(path)
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

    fn sethostname(&self, name: &str) -> nix::Result<()> {
        nix::unistd::sethostname(name)
    }

    fn add_entropy(&self, bytes: &[u8]) -> io::Result<()> {
        let info = rand_pool_info(bytes)?;
        Self::random_ioctl(RNDADDENTROPY, info.as_ptr())
    }

    fn reseed_crng(&self) -> io::Result<()> {
        Self::random_ioctl(RNDRESEEDCRNG, std::ptr::null())
    }

    fn set_realtime(&self, unix_nano: i64) -> io::Result<()> {
        let ts = libc::timespec { tv_sec: unix_nano.div_euclid(1_000_000_000), tv_nsec: unix_nano.rem_euclid(1_000_000_000) };
        // SAFETY: clock_settime reads the timespec we pass by valid pointer.
        let rc = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn kill(&self, pid: i32, signal: nix::sys::signal::Signal) -> nix::Result<()> {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
    }
}

/// A recording [`Syscall`] for unit tests of setup logic.
#[cfg(test)]
pub mod test_utils {
    use std::collections::HashMap;
    use std::io;
    use std::path::Path;
    use std::sync::{Mutex, MutexGuard, PoisonError};

    use nix::mount::MsFlags;

    use super::Syscall;

    /// Records every call, one line each; answers reads from `files`;
    /// fails the mounts and writes it is told to.
    #[derive(Debug, Default)]
    pub struct RecordingSyscall {
        calls: Mutex<Vec<String>>,
        pub files: HashMap<&'static str, &'static str>,
        pub fail_mounts: Vec<(&'static str, nix::Error)>,
        /// When not empty: writes of these, or of anything with a space,
        /// fail with EINVAL.
        pub refuse_writes: Vec<&'static str>,
    }

    impl RecordingSyscall {
        /// The calls so far.
        pub fn calls(&self) -> MutexGuard<'_, Vec<String>> {
            self.calls.lock().unwrap_or_else(PoisonError::into_inner)
        }

        fn record(&self, call: String) {
            self.calls().push(call);
        }
    }

    impl Syscall for RecordingSyscall {
        fn mount(&self, source: &str, target: &Path, fstype: &str, flags: MsFlags, data: Option<&str>) -> nix::Result<()> {
            self.record(format!("mount {source} {} {fstype} {:#x} {}", target.display(), flags.bits(), data.unwrap_or("-")));
            match self.fail_mounts.iter().find(|(t, _)| Path::new(t) == target) {
                Some((_, e)) => Err(*e),
                None => Ok(()),
            }
        }

        fn umount(&self, target: &Path) -> nix::Result<()> {
            self.record(format!("umount {}", target.display()));
            Ok(())
        }

        fn mkdir(&self, path: &Path, mode: u32) -> io::Result<()> {
            self.record(format!("mkdir {} {mode:o}", path.display()));
            Ok(())
        }

        fn mkdir_all(&self, path: &Path) -> io::Result<()> {
            self.record(format!("mkdir -p {}", path.display()));
            Ok(())
        }

        fn read_file(&self, path: &Path, buf: &mut [u8]) -> io::Result<usize> {
            self.record(format!("read {}", path.display()));
            let content = path.to_str().and_then(|p| self.files.get(p)).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
            let n = content.len().min(buf.len());
            buf[..n].copy_from_slice(&content.as_bytes()[..n]);
            Ok(n)
        }

        fn write_file(&self, path: &Path, data: &[u8]) -> io::Result<()> {
            let data = String::from_utf8_lossy(data).into_owned();
            self.record(format!("write {} {data}", path.display()));
            let refused = !self.refuse_writes.is_empty() && (data.contains(' ') || self.refuse_writes.contains(&data.as_str()));
            if refused {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            Ok(())
        }

        fn sethostname(&self, name: &str) -> nix::Result<()> {
            self.record(format!("sethostname {name}"));
            Ok(())
        }

        fn add_entropy(&self, bytes: &[u8]) -> io::Result<()> {
            self.record(format!("add_entropy {} bytes", bytes.len()));
            Ok(())
        }

        fn reseed_crng(&self) -> io::Result<()> {
            self.record("reseed_crng".into());
            Ok(())
        }

        fn set_realtime(&self, unix_nano: i64) -> io::Result<()> {
            self.record(format!("set_realtime {unix_nano}"));
            Ok(())
        }

        fn kill(&self, pid: i32, signal: nix::sys::signal::Signal) -> nix::Result<()> {
            self.record(format!("kill {pid} {signal}"));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real ioctls, as root (CAP_SYS_ADMIN): the kernel accepts the
    /// layout and the numbers. Adding entropy only ever adds to the pool.
    #[test]
    fn the_kernel_takes_the_random_ioctls() {
        if !nix::unistd::geteuid().is_root() {
            assert!(std::env::var_os("CARAPACE_REQUIRE_KVM").is_none(), "CARAPACE_REQUIRE_KVM is set: this test needs root");
            eprintln!("SKIP the_kernel_takes_the_random_ioctls: needs root");
            return;
        }
        let sys = LinuxSyscall;
        sys.add_entropy(&[0xa5; 32]).expect("RNDADDENTROPY");
        sys.reseed_crng().expect("RNDRESEEDCRNG");
    }

    #[test]
    fn rand_pool_info_is_laid_out_as_the_kernel_reads_it() {
        let info = rand_pool_info(&[1, 2, 3, 4, 5]).expect("info");
        assert_eq!(info.len(), 2 + 2);
        assert_eq!(info[0], 40, "entropy_count in bits");
        assert_eq!(info[1], 5, "buf_size in bytes");
        let bytes: Vec<u8> = info[2..].iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(&bytes[..5], &[1, 2, 3, 4, 5]);
    }
}
