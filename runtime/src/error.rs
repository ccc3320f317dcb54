//! Printing an error with its causes.
//!
//! The library's errors print their own message and leave their cause to
//! `source()` (never both), so a message that crosses a process or a ttrpc
//! status, or goes to a log, must walk the chain, as anyhow's `{:#}` does.

use std::error::Error;
use std::fmt;

/// Displays an error and each of its causes, `: `-separated.
#[derive(Debug, Clone, Copy)]
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            write!(f, ": {e}")?;
            cause = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn prints_each_cause_after_the_message() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(Chain(&e).to_string(), "outer: inner");
        assert_eq!(Chain(&std::io::Error::other("alone")).to_string(), "alone");
    }
}
