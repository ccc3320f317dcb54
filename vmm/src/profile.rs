//! An opt-in sampling profiler of the guest: where its vCPUs are, every
//! [`PERIOD`] of wall time.
//!
//! On a kvm_pvm host the guest kernel runs in KVM's instruction emulator,
//! and tracing from inside the guest distorts what it measures; sampling
//! from the host does not. `carapace-vmm` turns it on when [`PROFILE_ENV`]
//! names a file (see `main.rs`); without it no thread runs and the vCPU
//! loop only tests an `Option`.
//!
//! A sampler thread kicks every vCPU thread with the VMM's kick signal;
//! `KVM_RUN` returns `EINTR` between two guest instructions, and the vCPU
//! thread then reads its registers and appends one line (see
//! [`Profile::record`]). Samples are taken only on `EINTR`, never in the
//! middle of an I/O exit. A kick that lands while the thread is outside
//! `KVM_RUN` is lost: that sample is missing, not misplaced. An idle vCPU
//! is sampled too (in the guest's idle loop), so counts are wall time.
//!
//! With [`PERCPU_ENV`] set to the hex offset of a per-cpu variable (from
//! the guest kernel's System.map, e.g. `__preempt_count`), a kernel-mode
//! sample also carries the 32-bit word at GS base + offset: with
//! `__preempt_count` that tells hard-IRQ and soft-IRQ context (the timer
//! tick) from task context.
//!
//! The file is opened for appending and written in whole lines, so that
//! several VMMs (a template's and its restores) may share one file; each
//! line carries the VMM's pid.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kvm_bindings::{kvm_regs, kvm_sregs};
use tracing::{info, warn};

use crate::seccomp::{self, ThreadKind};

/// The environment variable that names the profile file.
pub const PROFILE_ENV: &str = "CARAPACE_VMM_PROFILE";
/// The environment variable with the hex offset of a per-cpu word to add
/// to kernel-mode samples.
pub const PERCPU_ENV: &str = "CARAPACE_VMM_PROFILE_PERCPU";
/// The sampling period (wall time).
pub const PERIOD: Duration = Duration::from_millis(2);
/// Samples are written out when this much is buffered...
const WRITE_AT: usize = 64 * 1024;
/// ...and at least this often, so a VMM that is killed loses little.
const WRITE_EVERY: Duration = Duration::from_secs(1);

/// Errors starting the profiler.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("cannot open the profile file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the profiler thread")]
    Spawn(#[source] std::io::Error),
}

/// The profile file, shared by the vCPU threads.
#[derive(Debug)]
pub struct Profile {
    out: Mutex<Out>,
    pid: u32,
    /// When the sampler last kicked the vCPUs (ns since `start`): the delay
    /// of a sample after its kick tells whether samples land anywhere or
    /// only where KVM happens to notice a signal.
    kicked: AtomicU64,
    start: Instant,
    /// The offset of the per-cpu word to record, if any.
    percpu: Option<u64>,
}

#[derive(Debug)]
struct Out {
    file: File,
    /// Whole lines not written yet.
    buf: Vec<u8>,
    /// Set after a failed write: profiling stops, the VM runs on.
    failed: bool,
}

impl Out {
    fn write(&mut self) {
        if self.buf.is_empty() || self.failed {
            return;
        }
        // One write of whole lines: O_APPEND keeps other VMMs' lines apart.
        if let Err(e) = self.file.write_all(&self.buf) {
            warn!("profile: cannot write samples, stopping: {e}");
            self.failed = true;
        }
        self.buf.clear();
    }
}

impl Profile {
    /// Opens (creates, appends to) `path`. Call it before the VMM confines
    /// itself: no thread may open files afterwards.
    pub fn open(path: &Path) -> Result<Self, ProfileError> {
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .map_err(|source| ProfileError::Open { path: path.to_path_buf(), source })?;
        info!(path = %path.display(), period = ?PERIOD, "profiling the guest");
        Ok(Profile {
            out: Mutex::new(Out { file, buf: Vec::with_capacity(WRITE_AT + 256), failed: false }),
            pid: std::process::id(),
            kicked: AtomicU64::new(0),
            start: Instant::now(),
            percpu: None,
        })
    }

    /// Adds the per-cpu word at GS base + `offset` to kernel-mode samples.
    pub fn with_percpu(mut self, offset: u64) -> Self {
        self.percpu = Some(offset);
        self
    }

    /// The offset of the per-cpu word to record, if any.
    pub fn percpu(&self) -> Option<u64> {
        self.percpu
    }

    fn since_start(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Notes a kick of the vCPUs (by the sampler).
    fn kick(&self) {
        self.kicked.store(self.since_start(), Ordering::Relaxed);
    }

    /// Appends one sample of vCPU `cpu`:
    /// `<unix time s.us> <vmm pid> <cpu> <rip hex> <cpl> <cr3 hex> <delay us>`
    /// and, with a per-cpu offset, ` <word hex>` (`-` if it could not be
    /// read), where the CPL is the low two bits of the CS selector and the
    /// delay is the time since the last kick.
    pub fn record(&self, cpu: u8, regs: &kvm_regs, sregs: &kvm_sregs, percpu: Option<u32>) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let delay = self.since_start().saturating_sub(self.kicked.load(Ordering::Relaxed)) / 1000;
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        if out.failed {
            return;
        }
        let mut line = format!(
            "{}.{:06} {} {cpu} {:x} {} {:x} {delay}",
            now.as_secs(),
            now.subsec_micros(),
            self.pid,
            regs.rip,
            sregs.cs.selector & 3,
            sregs.cr3
        );
        if self.percpu.is_some() {
            match percpu {
                Some(w) => line.push_str(&format!(" {w:x}\n")),
                None => line.push_str(" -\n"),
            }
        } else {
            line.push('\n');
        }
        out.buf.extend_from_slice(line.as_bytes());
        if out.buf.len() >= WRITE_AT {
            out.write();
        }
    }

    /// Writes out what is buffered.
    pub fn flush(&self) {
        self.out.lock().unwrap_or_else(|e| e.into_inner()).write();
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        self.flush();
    }
}

/// The thread that kicks the vCPU threads every [`PERIOD`].
#[derive(Debug)]
pub(crate) struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    /// Starts kicking `vcpus` with `signal` (whose handler does nothing).
    /// The threads must stay joinable until [`Sampler::stop`] returns.
    pub(crate) fn start(profile: Arc<Profile>, vcpus: Vec<libc::pthread_t>, signal: libc::c_int) -> Result<Self, ProfileError> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        // Confined like the main thread: it only sleeps, signals and writes.
        let thread = seccomp::spawn(ThreadKind::Vmm, "profiler".into(), move || {
            let mut written = Instant::now();
            while !stopped.load(Ordering::SeqCst) {
                profile.kick();
                for &t in &vcpus {
                    // SAFETY: `t` is a vCPU thread that is not joined before
                    // this thread ends (the contract of `start`), so the id
                    // is valid; the signal's handler is installed.
                    unsafe { libc::pthread_kill(t, signal) };
                }
                std::thread::sleep(PERIOD);
                if written.elapsed() >= WRITE_EVERY {
                    profile.flush();
                    written = Instant::now();
                }
            }
            profile.flush();
        })
        .map_err(ProfileError::Spawn)?;
        Ok(Sampler { stop, thread: Some(thread) })
    }

    /// Stops kicking; returns once the thread has ended.
    pub(crate) fn stop(self) {
        drop(self);
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn samples_are_whole_lines_appended() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("prof");
        std::fs::write(&path, "earlier\n").unwrap();
        let p = Profile::open(&path).unwrap();
        let mut regs = kvm_regs::default();
        let mut sregs = kvm_sregs::default();
        regs.rip = 0xffff_ffff_8100_0000;
        sregs.cs.selector = 0x10;
        sregs.cr3 = 0x0123_4000;
        p.record(0, &regs, &sregs, None);
        regs.rip = 0x40_1000;
        sregs.cs.selector = 0x33;
        p.record(1, &regs, &sregs, Some(7));
        drop(p);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0], "earlier");
        let f: Vec<&str> = lines[1].split(' ').collect();
        assert_eq!(f[1..6], [std::process::id().to_string().as_str(), "0", "ffffffff81000000", "0", "1234000"]);
        let f: Vec<&str> = lines[2].split(' ').collect();
        assert_eq!(f[2..6], ["1", "401000", "3", "1234000"]);
        assert!(f[6].parse::<u64>().is_ok());
        assert!(f[0].parse::<f64>().unwrap() > 1.0e9);
    }
}
