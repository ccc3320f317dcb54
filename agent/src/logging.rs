//! Logs to stderr, which is the console (`/dev/console`, the serial port)
//! when the agent is PID 1. Each event is formatted first and written with
//! one `write`; every byte on the serial console costs a VM exit, so the
//! default level (INFO) logs little, and ttrpc's own logs only from WARN
//! (all of them at TRACE).

use std::str::FromStr;

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The environment variable that sets the level (the kernel passes
/// `CARAPACE_AGENT_LOG=debug` from its command line to init).
pub const LEVEL_ENV: &str = "CARAPACE_AGENT_LOG";

/// The level from the command line, else the environment, else INFO.
/// An unknown name is reported in the returned string.
pub fn level(arg: Option<&str>, env: Option<&str>) -> (LevelFilter, Option<String>) {
    match arg.or(env) {
        None => (LevelFilter::INFO, None),
        Some(name) => match LevelFilter::from_str(name.trim()) {
            Ok(level) => (level, None),
            Err(_) => (
                LevelFilter::INFO,
                Some(format!("unknown log level {name:?}, using info")),
            ),
        },
    }
}

/// Installs the subscriber (once; later calls do nothing).
pub fn init(level: LevelFilter) {
    // ttrpc logs every connection at INFO; its messages show at TRACE.
    let ttrpc_level = if level == LevelFilter::TRACE {
        level
    } else {
        level.min(LevelFilter::WARN)
    };
    let filter = Targets::new()
        .with_default(level)
        .with_target("ttrpc", ttrpc_level);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .with_timer(tracing_subscriber::fmt::time::uptime());
    // try_init also routes the `log` records of ttrpc into tracing.
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(filter)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_sources() {
        assert_eq!(level(None, None), (LevelFilter::INFO, None));
        assert_eq!(level(Some("debug"), Some("warn")).0, LevelFilter::DEBUG);
        assert_eq!(level(None, Some("warn")).0, LevelFilter::WARN);
        assert_eq!(level(None, Some("off")).0, LevelFilter::OFF);
        let (l, complaint) = level(Some("loud"), None);
        assert_eq!(l, LevelFilter::INFO);
        assert!(complaint.is_some());
    }
}
