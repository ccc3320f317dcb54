//! A small writer of uncompressed newc cpio archives (what the Linux
//! initramfs loader reads), for test guests. No root needed: device nodes
//! are written as archive entries, not created on the host.

use std::io::{self, Write};
use std::path::Path;

/// One archive entry.
#[derive(Debug, Clone)]
pub enum Entry {
    Dir { path: String, mode: u32 },
    File { path: String, mode: u32, data: Vec<u8> },
    Symlink { path: String, target: String },
    CharDev { path: String, mode: u32, major: u32, minor: u32 },
}

/// Writes `entries` as a newc archive, with the trailer.
pub fn write_newc(out: &mut impl Write, entries: &[Entry]) -> io::Result<()> {
    for (ino, e) in (1u32..).zip(entries) {
        let (path, mode, data, rdev): (&str, u32, &[u8], (u32, u32)) = match e {
            Entry::Dir { path, mode } => (path, 0o040000 | mode, &[], (0, 0)),
            Entry::File { path, mode, data } => (path, 0o100000 | mode, data, (0, 0)),
            Entry::Symlink { path, target } => (path, 0o120777, target.as_bytes(), (0, 0)),
            Entry::CharDev { path, mode, major, minor } => (path, 0o020000 | mode, &[], (*major, *minor)),
        };
        header(out, ino, mode, data.len(), rdev, path)?;
        out.write_all(data)?;
        pad(out, data.len())?;
    }
    header(out, 0, 0, 0, (0, 0), "TRAILER!!!")
}

fn header(out: &mut impl Write, ino: u32, mode: u32, size: usize, rdev: (u32, u32), name: &str) -> io::Result<()> {
    let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
    let namesize = name.len() + 1;
    write!(
        out,
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
        0, 0, 0, 0, 0, rdev.0, rdev.1, 0
    )?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    pad(out, 110 + namesize)
}

fn pad(out: &mut impl Write, len: usize) -> io::Result<()> {
    let n = (4 - len % 4) % 4;
    out.write_all(&[0u8; 3][..n])
}

/// Writes an initramfs whose /init is busybox's init (from Debian's
/// busybox-static), which never serves vsock: a guest that never answers.
pub fn busybox_initramfs(path: &Path) -> io::Result<()> {
    let busybox = std::fs::read("/bin/busybox").map_err(|e| io::Error::new(e.kind(), format!("/bin/busybox (apt busybox-static): {e}")))?;
    let entries = vec![
        Entry::Dir { path: "bin".into(), mode: 0o755 },
        Entry::File { path: "bin/busybox".into(), mode: 0o755, data: busybox },
        Entry::Symlink { path: "init".into(), target: "/bin/busybox".into() },
        Entry::Dir { path: "dev".into(), mode: 0o755 },
        Entry::CharDev { path: "dev/console".into(), mode: 0o600, major: 5, minor: 1 },
        Entry::Dir { path: "etc".into(), mode: 0o755 },
        Entry::File {
            path: "etc/inittab".into(),
            mode: 0o644,
            data: b"::sysinit:/bin/busybox echo busybox init: no agent here\n::respawn:/bin/busybox sleep 3600\n".to_vec(),
        },
    ];
    let mut f = io::BufWriter::new(std::fs::File::create(path)?);
    write_newc(&mut f, &entries)?;
    f.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout_is_aligned_and_terminated() {
        let mut buf = Vec::new();
        write_newc(&mut buf, &[Entry::File { path: "a".into(), mode: 0o644, data: b"xyz".to_vec() }]).expect("write");
        assert!(buf.starts_with(b"070701"));
        // header 110 + "a\0" = 112 (aligned), data 3 + 1 pad, then the trailer.
        assert_eq!(&buf[110..112], b"a\0");
        assert_eq!(&buf[112..115], b"xyz");
        assert_eq!(&buf[116..122], b"070701");
        assert!(buf.windows(10).any(|w| w == b"TRAILER!!!"));
        assert_eq!(buf.len() % 4, 0);
    }
}
