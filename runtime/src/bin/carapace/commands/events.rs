//! `carapace events`: the container's cgroup statistics as runc's events.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use carapace_runtime::container::Runtime;
use carapace_runtime::spec;
use carapace_runtime::state::Status;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print one statistics event and exit.
    #[arg(long)]
    pub stats: bool,
    /// Time between events, in seconds.
    #[arg(long, default_value = "5s")]
    pub interval: String,
    pub id: String,
}

pub fn run(rt: &Runtime, a: &Args) -> anyhow::Result<ExitCode> {
    let interval = parse_interval(&a.interval)?;
    loop {
        let s = rt.stats(&a.id)?;
        println!("{}", spec::stats_event(&a.id, &s));
        if a.stats {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(interval);
        if rt.state(&a.id)?.status == Status::Stopped {
            return Ok(ExitCode::SUCCESS);
        }
    }
}

/// `--interval`: seconds, with or without an `s`.
fn parse_interval(s: &str) -> anyhow::Result<Duration> {
    let n = s.strip_suffix('s').unwrap_or(s);
    let secs: f64 = n.parse().with_context(|| format!("--interval {s:?}: expected seconds such as 5s"))?;
    anyhow::ensure!(secs > 0.0 && secs < 86_400.0, "--interval {s:?}: out of range");
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_is_seconds_in_range() {
        assert_eq!(parse_interval("5s").ok(), Some(Duration::from_secs(5)));
        assert_eq!(parse_interval("0.5").ok(), Some(Duration::from_millis(500)));
        for bad in ["0s", "-1s", "1d", "86400s", ""] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
    }
}
