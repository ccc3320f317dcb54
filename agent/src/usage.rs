//! What a call costs in the guest: the figures of `GuestUsage` in the
//! answers of the container verbs (see `protocol/protos/agent.proto`).
//!
//! Faults, context switches and CPU times come from getrusage; system calls
//! (and a process's faults and times) from `/proc/PID/rusage`, one line of
//! numbers our guest kernel adds (patch 0008: upstream Linux counts system
//! calls only with tracing). A reading costs two getrusage calls, one pread
//! of the agent's own `rusage` (kept open) and three calls (open, read,
//! close) for the process a call is about, which the figures include: the
//! meter runs on every container call. `/proc/PID/status`, which the count
//! was first read from, took tens of milliseconds to render on a kvm_pvm
//! host, four times a StartContainer. On a kernel without the file a
//! process's faults and times come from `/proc/PID/stat` and system calls
//! read zero.

use std::time::Instant;

use carapace_protocol::agent::GuestUsage;

/// Cumulative counters of a process (or of the agent and what it reaped).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub user_us: i64,
    pub system_us: i64,
    pub minor_faults: i64,
    pub major_faults: i64,
    pub voluntary_switches: i64,
    pub involuntary_switches: i64,
    pub syscalls: i64,
}

fn rusage(who: libc::c_int) -> Counters {
    // SAFETY: an all-zero rusage is a valid value of the plain C struct.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes one rusage into the struct we own.
    if unsafe { libc::getrusage(who, &mut r) } != 0 {
        return Counters::default();
    }
    let us = |t: libc::timeval| t.tv_sec * 1_000_000 + t.tv_usec;
    Counters {
        user_us: us(r.ru_utime),
        system_us: us(r.ru_stime),
        minor_faults: r.ru_minflt,
        major_faults: r.ru_majflt,
        voluntary_switches: r.ru_nvcsw,
        involuntary_switches: r.ru_nivcsw,
        syscalls: 0,
    }
}

/// A `/proc/PID/rusage` line (the thread group's system calls, its reaped
/// children's, its minor and major faults, its user and system time in
/// nanoseconds): the process's counters, and its reaped children's system
/// calls.
fn parse_rusage(text: &str) -> Option<(Counters, i64)> {
    let mut fields = text.split_ascii_whitespace().map(|f| f.parse::<i64>().ok());
    let mut next = || fields.next().flatten();
    let (syscalls, reaped) = (next()?, next()?);
    let (minor_faults, major_faults, user_ns, system_ns) = (next()?, next()?, next()?, next()?);
    let process = Counters {
        user_us: user_ns / 1000,
        system_us: system_ns / 1000,
        minor_faults,
        major_faults,
        voluntary_switches: 0,
        involuntary_switches: 0,
        syscalls,
    };
    Some((process, reaped))
}

fn read_proc(path: &str) -> Option<String> {
    crate::sys::read_small_file(std::path::Path::new(path)).ok()
}

/// The agent's own `rusage`, kept open: one pread a reading (from offset
/// 0, which makes the kernel generate the text afresh).
fn own_rusage() -> Option<String> {
    static FILE: std::sync::OnceLock<Option<std::fs::File>> = std::sync::OnceLock::new();
    let file = FILE.get_or_init(|| std::fs::File::open("/proc/self/rusage").ok()).as_ref()?;
    crate::sys::read_small(file, Some(0)).ok()
}

impl Counters {
    /// The agent (every thread) plus the children it has reaped.
    pub fn agent() -> Self {
        let syscalls = own_rusage().and_then(|s| parse_rusage(&s)).map_or(0, |(own, reaped)| own.syscalls + reaped);
        let syscalls = Counters { syscalls, ..Counters::default() };
        rusage(libc::RUSAGE_SELF) + rusage(libc::RUSAGE_CHILDREN) + syscalls
    }

    /// A live (or not yet reaped) process's own counters; zero when it is
    /// gone.
    pub fn of_process(pid: i32) -> Self {
        if let Some(text) = read_proc(&format!("/proc/{pid}/rusage")) {
            return parse_rusage(&text).map(|(c, _)| c).unwrap_or_default();
        }
        read_proc(&format!("/proc/{pid}/stat")).and_then(|s| parse_stat(&s)).unwrap_or_default()
    }
}

/// Clock ticks (`USER_HZ`) as microseconds: Linux reports 100 a second to
/// user space whatever the kernel's HZ.
const US_PER_TICK: i64 = 10_000;

/// Faults and times from the text of `/proc/PID/stat`.
fn parse_stat(text: &str) -> Option<Counters> {
    // The command name (field 2) may hold spaces and parentheses: the
    // fields that follow start after its last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state): field N is rest[N - 3].
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<i64>().ok());
    Some(Counters {
        minor_faults: field(10)?,
        major_faults: field(12)?,
        user_us: field(14)? * US_PER_TICK,
        system_us: field(15)? * US_PER_TICK,
        voluntary_switches: 0,
        involuntary_switches: 0,
        syscalls: 0,
    })
}

impl std::ops::Add for Counters {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        Self {
            user_us: self.user_us + o.user_us,
            system_us: self.system_us + o.system_us,
            minor_faults: self.minor_faults + o.minor_faults,
            major_faults: self.major_faults + o.major_faults,
            voluntary_switches: self.voluntary_switches + o.voluntary_switches,
            involuntary_switches: self.involuntary_switches + o.involuntary_switches,
            syscalls: self.syscalls + o.syscalls,
        }
    }
}

impl std::ops::Sub for Counters {
    type Output = Self;
    fn sub(self, o: Self) -> Self {
        Self {
            user_us: self.user_us - o.user_us,
            system_us: self.system_us - o.system_us,
            minor_faults: self.minor_faults - o.minor_faults,
            major_faults: self.major_faults - o.major_faults,
            voluntary_switches: self.voluntary_switches - o.voluntary_switches,
            involuntary_switches: self.involuntary_switches - o.involuntary_switches,
            syscalls: self.syscalls - o.syscalls,
        }
    }
}

/// Measures one call: the agent's counters from its start, and those of
/// the process the call is about (see [`Meter::finish`]).
#[derive(Debug, Clone, Copy)]
pub struct Meter {
    since: Instant,
    agent: Counters,
    process: Counters,
}

impl Meter {
    /// Starts measuring now, with the counters of `pid` (a process that
    /// exists before the call) as they are.
    pub fn start(pid: Option<i32>) -> Self {
        Self::from(Instant::now(), Counters::agent(), pid.map(Counters::of_process).unwrap_or_default())
    }

    /// A measure that began at `since` with these counters.
    pub fn from(since: Instant, agent: Counters, process: Counters) -> Self {
        Self { since, agent, process }
    }

    /// What was spent since the start, with `pid`'s counters now (zero if it
    /// was reaped meanwhile: its whole usage is then among the agent's
    /// reaped children, and subtracting its start counters removes what
    /// it had spent before the call).
    pub fn finish(&self, pid: Option<i32>) -> GuestUsage {
        let process = pid.map(Counters::of_process).unwrap_or_default();
        let d = (Counters::agent() - self.agent) + (process - self.process);
        let u = |v: i64| u64::try_from(v).unwrap_or(0);
        let mut g = GuestUsage::new();
        g.wall_us = u64::try_from(self.since.elapsed().as_micros()).unwrap_or(u64::MAX);
        g.user_us = u(d.user_us);
        g.system_us = u(d.system_us);
        g.minor_faults = u(d.minor_faults);
        g.major_faults = u(d.major_faults);
        g.voluntary_switches = u(d.voluntary_switches);
        g.involuntary_switches = u(d.involuntary_switches);
        g.syscalls = u(d.syscalls);
        g
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        let line = "42 (a) b (c)) S 1 42 42 0 -1 4194560 117 0 3 0 5 7 0 0 20 0 1 0 100 1000 10";
        let c = parse_stat(line).expect("parsed");
        assert_eq!((c.minor_faults, c.major_faults, c.user_us, c.system_us), (117, 3, 50_000, 70_000));
        assert_eq!(parse_stat("42 (x) S 1"), None);
    }

    #[test]
    fn rusage_lines_are_read_and_short_ones_refused() {
        let (c, reaped) = parse_rusage("1234 56 117 3 50000000 70000000\n").expect("parsed");
        assert_eq!(reaped, 56);
        assert_eq!((c.syscalls, c.minor_faults, c.major_faults, c.user_us, c.system_us), (1234, 117, 3, 50_000, 70_000));
        assert_eq!(parse_rusage("1234 56 117 3 50000000\n"), None);
        assert_eq!(parse_rusage("1234 x 117 3 5 7\n"), None);
    }

    #[test]
    fn a_kept_proc_file_is_read_afresh() {
        let file = std::fs::File::open("/proc/self/stat").expect("stat");
        let cpu = || {
            let c = crate::sys::read_small(&file, Some(0)).ok().and_then(|s| parse_stat(&s)).expect("parsed");
            c.user_us + c.system_us
        };
        let before = cpu();
        // 150 ms of CPU: at least one clock tick more for this process.
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < std::time::Duration::from_millis(150) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(cpu() > before, "the same text twice");
        assert_eq!(read_proc("/proc/self/stat").map(|s| parse_stat(&s).is_some()), Some(true));
        assert_eq!(read_proc("/proc/no-such-pid/stat"), None);
    }

    #[test]
    fn our_own_work_shows() {
        let me = i32::try_from(std::process::id()).ok();
        let meter = Meter::start(me);
        // Touch fresh pages: minor faults.
        let v = vec![1u8; 8 << 20];
        assert!(v.iter().step_by(4096).all(|b| *b == 1));
        let g = meter.finish(me);
        assert!(g.minor_faults >= 1000, "{g:?}");
        assert!(g.wall_us > 0);
        assert_eq!(Counters::of_process(-1), Counters::default());
    }
}
