//! Host processes the runtime keeps track of (the VMM and the monitor), and
//! signals as users name them.

use std::str::FromStr;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// The start time of `pid` (clock ticks after boot, /proc/PID/stat field
/// 22), or `None` if there is no such process.
pub fn start_time(pid: u32) -> Option<u64> {
    if pid == 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count
    // fields after its last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); field 22 is index 19. A zombie is
    // gone once it is the last of its threads: the others share its files
    // (a VMM's taps, which vanish when the last holder closes them) and
    // close them only as they exit, after the leader may have.
    if fields.first() == Some(&"Z") && !other_threads(pid) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// True if `pid`'s thread group has a thread besides its leader.
fn other_threads(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|d| d.count() > 1)
}

/// True if `pid` is still the process that started at `started` (0 = do
/// not check the start time).
pub fn alive(pid: u32, started: u64) -> bool {
    match start_time(pid) {
        Some(t) => started == 0 || t == started,
        None => false,
    }
}

/// Sends `sig` to `pid` if it is still the process we knew.
pub fn signal(pid: u32, started: u64, sig: Signal) {
    if alive(pid, started) {
        if let Ok(p) = i32::try_from(pid) {
            let _ = nix::sys::signal::kill(Pid::from_raw(p), sig);
        }
    }
}

/// Waits up to `timeout` for `pid` to be gone; true if it is.
pub fn wait_gone(pid: u32, started: u64, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while alive(pid, started) {
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// A signal name or number that is not one.
#[derive(Debug, thiserror::Error)]
#[error("unknown signal {0:?}")]
pub struct UnknownSignal(pub String);

/// Parses a signal as runc does: `KILL`, `SIGKILL`, `kill` or `9`; numbers
/// up to 64 (real-time signals) are taken as they are.
pub fn parse_signal(s: &str) -> Result<i32, UnknownSignal> {
    if let Ok(n) = s.parse::<i32>() {
        return if (1..=64).contains(&n) { Ok(n) } else { Err(UnknownSignal(s.into())) };
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
    Signal::from_str(&name).map(|sig| sig as i32).map_err(|_| UnknownSignal(s.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_and_number() {
        assert_eq!(parse_signal("KILL").ok(), Some(9));
        assert_eq!(parse_signal("SIGTERM").ok(), Some(15));
        assert_eq!(parse_signal("hup").ok(), Some(1));
        assert_eq!(parse_signal("9").ok(), Some(9));
        assert_eq!(parse_signal("34").ok(), Some(34));
        for bad in ["SIGNOPE", "0", "65", "-1", ""] {
            assert!(parse_signal(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn knows_itself_and_not_others() {
        let me = std::process::id();
        let t = start_time(me).expect("own start time");
        assert!(alive(me, t));
        assert!(!alive(me, t + 1));
        assert!(!alive(0, 0));
    }

    #[test]
    fn a_zombie_leader_is_alive_until_its_threads_are_gone() {
        // SAFETY: the child only starts a thread (glibc's malloc and
        // pthread_create are made safe to use after fork) and exits.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(700));
                    // SAFETY: ends the whole child process at once.
                    unsafe { libc::_exit(0) };
                });
                // SAFETY: the leader exits alone, leaving its thread running.
                unsafe { libc::syscall(libc::SYS_exit, 0) };
                unreachable!();
            }
            nix::unistd::ForkResult::Parent { child } => {
                let pid = u32::try_from(child.as_raw()).expect("pid");
                std::thread::sleep(Duration::from_millis(200));
                assert!(alive(pid, 0), "the leader is a zombie but its thread runs");
                assert!(wait_gone(pid, 0, Duration::from_secs(10)));
                let _ = nix::sys::wait::waitpid(child, None);
            }
        }
    }
}
