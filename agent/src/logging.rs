//! Logs to stderr, which is the console (`/dev/console`, the serial port)
//! when the agent is PID 1. Each event is formatted first and written with
//! one `write`; every byte on the serial console costs a VM exit, so the
//! default level (INFO) logs little, and ttrpc's own logs only from WARN
//! (all of them at TRACE).

use std::str::FromStr;
use std::sync::OnceLock;

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, Registry};

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
            Err(_) => (LevelFilter::INFO, Some(format!("unknown log level {name:?}, using info"))),
        },
    }
}

/// The filter of the installed subscriber, for [`set_level`].
static FILTER: OnceLock<reload::Handle<Targets, Registry>> = OnceLock::new();

/// The per-target filter for `level`.
fn targets(level: LevelFilter) -> Targets {
    // ttrpc logs every connection at INFO; its messages show at TRACE.
    let ttrpc_level = if level == LevelFilter::TRACE { level } else { level.min(LevelFilter::WARN) };
    Targets::new().with_default(level).with_target("ttrpc", ttrpc_level)
}

/// Changes the level from now on (CreateSandbox's `log_level`).
pub fn set_level(name: &str) -> Result<(), String> {
    let level =
        LevelFilter::from_str(name.trim()).map_err(|_| format!("unknown log level {name:?} (error, warn, info, debug, trace, off)"))?;
    let handle = FILTER.get().ok_or("logging is not set up")?;
    handle.reload(targets(level)).map_err(|e| e.to_string())
}

/// Installs the subscriber (once; later calls do nothing).
pub fn init(level: LevelFilter) {
    let (filter, handle) = reload::Layer::new(targets(level));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .with_timer(tracing_subscriber::fmt::time::uptime());
    // try_init also routes the `log` records of ttrpc into tracing.
    let installed = tracing_subscriber::registry().with(filter).with(fmt).try_init();
    if installed.is_ok() {
        let _ = FILTER.set(handle);
    }
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

    #[test]
    fn set_level_needs_a_known_name() {
        assert!(set_level("loud").is_err());
    }
}
