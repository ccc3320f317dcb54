//! Counts of the FUSE requests a device served, by opcode: one array
//! increment per request, logged (at info level) when the worker stops, so
//! a benchmark can tell how many requests a guest workload cost without
//! tracing every one.

use std::fmt;

/// Names of the FUSE opcodes below [`NAMES`]`.len()`; `""` where the ABI
/// leaves a value unassigned.
const NAMES: [&str; 50] = [
    "",
    "LOOKUP",
    "FORGET",
    "GETATTR",
    "SETATTR",
    "READLINK",
    "SYMLINK",
    "",
    "MKNOD",
    "MKDIR",
    "UNLINK",
    "RMDIR",
    "RENAME",
    "LINK",
    "OPEN",
    "READ",
    "WRITE",
    "STATFS",
    "RELEASE",
    "",
    "FSYNC",
    "SETXATTR",
    "GETXATTR",
    "LISTXATTR",
    "REMOVEXATTR",
    "FLUSH",
    "INIT",
    "OPENDIR",
    "READDIR",
    "RELEASEDIR",
    "FSYNCDIR",
    "GETLK",
    "SETLK",
    "SETLKW",
    "ACCESS",
    "CREATE",
    "INTERRUPT",
    "BMAP",
    "DESTROY",
    "IOCTL",
    "POLL",
    "NOTIFY_REPLY",
    "BATCH_FORGET",
    "FALLOCATE",
    "READDIRPLUS",
    "RENAME2",
    "LSEEK",
    "COPY_FILE_RANGE",
    "SETUPMAPPING",
    "REMOVEMAPPING",
];

/// Requests served, by opcode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestStats {
    by_opcode: [u64; NAMES.len()],
    /// Requests whose opcode is unknown, and chains without a readable
    /// header.
    other: u64,
}

impl Default for RequestStats {
    fn default() -> Self {
        Self { by_opcode: [0; NAMES.len()], other: 0 }
    }
}

impl RequestStats {
    /// Counts one request with this opcode (`None`: no readable header).
    pub(crate) fn record(&mut self, opcode: Option<u32>) {
        let slot = opcode.and_then(|op| usize::try_from(op).ok()).and_then(|op| self.by_opcode.get_mut(op));
        match slot {
            Some(n) => *n += 1,
            None => self.other += 1,
        }
    }

    /// How many requests in all.
    pub(crate) fn total(&self) -> u64 {
        self.by_opcode.iter().sum::<u64>() + self.other
    }

    /// How many requests with this opcode.
    #[cfg(test)]
    pub(crate) fn count(&self, opcode: u32) -> u64 {
        usize::try_from(opcode).ok().and_then(|op| self.by_opcode.get(op)).copied().unwrap_or(0)
    }
}

/// `N requests: LOOKUP 3, GETATTR 5, ...` (opcodes never seen are left out).
impl fmt::Display for RequestStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} requests:", self.total())?;
        let mut first = true;
        for (op, &n) in self.by_opcode.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let sep = if first { " " } else { ", " };
            first = false;
            match NAMES.get(op).copied().filter(|s| !s.is_empty()) {
                Some(name) => write!(f, "{sep}{name} {n}")?,
                None => write!(f, "{sep}opcode{op} {n}")?,
            }
        }
        if self.other > 0 {
            let sep = if first { " " } else { ", " };
            write!(f, "{sep}other {}", self.other)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_opcode_and_prints_the_nonzero_ones() {
        let mut s = RequestStats::default();
        assert_eq!(s.to_string(), "0 requests:");
        s.record(Some(1));
        s.record(Some(1));
        s.record(Some(16));
        s.record(Some(7)); // unassigned, still counted
        s.record(Some(4096)); // beyond the table
        s.record(Some(u32::MAX));
        s.record(None);
        assert_eq!(s.count(1), 2);
        assert_eq!(s.total(), 7);
        assert_eq!(s.to_string(), "7 requests: LOOKUP 2, opcode7 1, WRITE 1, other 3");
    }

    #[test]
    fn names_match_the_abi() {
        use fuse_backend_rs::abi::fuse_abi::Opcode;
        assert_eq!(NAMES[Opcode::Lookup as usize], "LOOKUP");
        assert_eq!(NAMES[Opcode::Create as usize], "CREATE");
        assert_eq!(NAMES[Opcode::Readdirplus as usize], "READDIRPLUS");
        assert_eq!(NAMES[Opcode::RemoveMapping as usize], "REMOVEMAPPING");
        assert_eq!(NAMES.len(), Opcode::MaxOpcode as usize);
    }
}
