//! Printing an error with its causes.
//!
//! The VMM's errors print their own message and leave their cause to
//! `source()` (never both), except leaves that are only ever logged with
//! `{e}`; whatever prints a setup error for a person walks the chain here.

/// The message of an error and its causes, skipping causes already quoted.
pub fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let m = s.to_string();
        if !line.contains(&m) {
            line.push_str(": ");
            line.push_str(&m);
        }
        cur = s.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::SnapshotError;

    #[test]
    fn a_cause_is_printed_once() {
        let cause = std::io::Error::from_raw_os_error(libc::ENOENT);
        let text = cause.to_string();
        let e = SnapshotError::Io { what: "memory", path: "/snap/mem".into(), source: cause };
        let line = one_line(&e);
        assert_eq!(line, format!("snapshot memory /snap/mem: {text}"));
        // Walked without skipping quoted causes (as anyhow's `{:#}` does),
        // the cause still appears once.
        let walked = format!("{e}: {}", std::error::Error::source(&e).map(ToString::to_string).unwrap_or_default());
        assert_eq!(walked.matches(&text).count(), 1, "{walked}");
    }
}
