//! Request processing for one virtqueue, without threads: the worker calls
//! [`process_queue`] when a queue is notified, and the tests call it
//! directly.
//!
//! Each available descriptor chain carries one FUSE request (device-readable
//! part: `fuse_in_header` and arguments) and room for its reply
//! (device-writable part). The chain goes to the FUSE server, and its head
//! goes back on the used ring with the number of bytes written.
//!
//! A malformed chain never stops the queue: a chain whose header cannot be
//! read (too short, outside guest memory, no readable descriptor) is given
//! back with nothing written; a request the server rejects without replying
//! (bad sizes, bad strings) gets an error reply if there is room for one.

use std::io::Write;

use fuse_backend_rs::abi::fuse_abi::{InHeader, Opcode, OutHeader};
use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use fuse_backend_rs::Error as FuseError;
use tracing::debug;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{ByteValued, GuestMemoryMmap};

use super::stats::RequestStats;
use super::FsError;

/// Handles every available chain of `queue`. Returns whether the driver
/// should be interrupted (something was used and the driver wants to hear
/// of it: always without VIRTIO_RING_F_EVENT_IDX, per `used_event` with it).
/// Driver notifications are suppressed while the queue is being drained and
/// re-enabled before returning (with a last check for chains that arrived
/// in between). An error means the queue itself is unusable (its rings are
/// out of guest memory or its available index is corrupt); the chains used
/// so far stay used. Every chain handled is counted in `stats`.
pub(crate) fn process_queue<F: FileSystem + Sync>(
    server: &Server<F>,
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    stats: &mut RequestStats,
) -> Result<bool, FsError> {
    let mut used_any = false;
    let result = drain_queue(server, mem, queue, stats, &mut used_any);
    let notify = if used_any { queue.needs_notification(mem).map_err(FsError::Queue)? } else { false };
    result.map(|()| notify)
}

fn drain_queue<F: FileSystem + Sync>(
    server: &Server<F>,
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    stats: &mut RequestStats,
    used_any: &mut bool,
) -> Result<(), FsError> {
    loop {
        queue.disable_notification(mem).map_err(FsError::Queue)?;
        loop {
            let chain = queue.iter(mem).map_err(FsError::Queue)?.next();
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let len = handle_chain(server, mem, chain, stats);
            match queue.add_used(mem, head, len) {
                Ok(()) => *used_any = true,
                Err(e) => crate::guest_warn!("virtio-fs: cannot return descriptor {head}: {e}"),
            }
        }
        if !queue.enable_notification(mem).map_err(FsError::Queue)? {
            return Ok(());
        }
    }
}

/// Opcodes that have no reply.
fn is_no_reply(opcode: u32) -> bool {
    opcode == Opcode::Forget as u32 || opcode == Opcode::BatchForget as u32 || opcode == Opcode::Interrupt as u32
}

/// Opcode values inside the known range that the ABI leaves unassigned
/// (the server's opcode conversion must never see them).
fn is_unassigned(opcode: u32) -> bool {
    matches!(opcode, 0 | 7 | 19)
}

/// Runs one request; returns the number of bytes written for the used ring.
fn handle_chain<F: FileSystem + Sync>(
    server: &Server<F>,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    stats: &mut RequestStats,
) -> u32 {
    let reader = match Reader::from_descriptor_chain(mem, chain.clone()) {
        Ok(r) => r,
        Err(e) => {
            crate::guest_warn!("virtio-fs: dropping request with unreadable descriptors: {e}");
            stats.record(None);
            return 0;
        }
    };
    let writer = match VirtioFsWriter::new(mem, chain) {
        Ok(w) => w,
        Err(e) => {
            crate::guest_warn!("virtio-fs: dropping request with unwritable descriptors: {e}");
            stats.record(None);
            return 0;
        }
    };

    let mut peek = reader.clone();
    let header: InHeader = match peek.read_obj() {
        Ok(h) => h,
        Err(e) => {
            crate::guest_warn!("virtio-fs: dropping request without a complete header: {e}");
            stats.record(None);
            return 0;
        }
    };
    stats.record(Some(header.opcode));
    if is_unassigned(header.opcode) {
        debug!("virtio-fs: unknown opcode {}", header.opcode);
        return reply_error(writer, header.unique, libc::ENOSYS);
    }

    match server.handle_message(reader, Writer::from(writer.clone()), None, None) {
        Ok(len) => u32::try_from(len).unwrap_or(0),
        Err(e) => {
            if is_no_reply(header.opcode) {
                debug!("virtio-fs: bad request {} (no reply): {e}", header.opcode);
                return 0;
            }
            crate::guest_warn!("virtio-fs: bad request {} (unique {}): {e}", header.opcode, header.unique);
            let errno = match e {
                FuseError::EncodeMessage(_) | FuseError::FailedToWrite(_) => libc::EIO,
                _ => libc::EINVAL,
            };
            reply_error(writer, header.unique, errno)
        }
    }
}

/// Writes a bare error reply at the start of the writable buffers; returns
/// its length, or 0 if it does not fit.
fn reply_error(mut writer: VirtioFsWriter<'_>, unique: u64, errno: i32) -> u32 {
    // The header is 16 bytes.
    #[allow(clippy::cast_possible_truncation)]
    const LEN: u32 = std::mem::size_of::<OutHeader>() as u32;
    let out = OutHeader { len: LEN, error: -errno, unique };
    match writer.write_all(out.as_slice()) {
        Ok(()) => LEN,
        Err(e) => {
            crate::guest_warn!("virtio-fs: no room for an error reply: {e}");
            0
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation, clippy::cast_possible_wrap, clippy::cast_sign_loss)]
mod tests {
    use std::collections::HashSet;
    use std::fs;
    use std::mem::size_of;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use fuse_backend_rs::abi::fuse_abi::{
        BatchForgetIn, EntryOut, ForgetOne, GetxattrIn, InHeader, Opcode, OutHeader, SetattrValid, ROOT_ID,
    };
    use vm_memory::ByteValued;

    use super::super::test_utils::*;
    use super::super::CacheMode;

    const S_IFMT: u32 = libc::S_IFMT;

    fn kind(mode: u32) -> u32 {
        mode & S_IFMT
    }

    #[test]
    fn init_negotiates() {
        let mem = test_mem();
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::share(&mem, dir.path(), false, CacheMode::Auto);
        let out = h.init().unwrap();
        assert_eq!(out.major, 7);
        assert!(out.minor >= 27, "minor {}", out.minor);
        assert!(out.max_write >= 4096);
        // The queue asks for an interrupt after every used batch (no EVENT_IDX).
        assert_eq!(h.used(0).0, 0);
    }

    #[test]
    fn requests_before_init_fail_cleanly() {
        let mem = test_mem();
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::share(&mem, dir.path(), false, CacheMode::Auto);
        assert_eq!(h.getattr(ROOT_ID).unwrap_err(), libc::EBADF);
        h.init().unwrap();
        assert!(h.getattr(ROOT_ID).is_ok());
    }

    #[test]
    fn lookup_and_getattr_mirror_the_host() {
        let mem = test_mem();
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("hello.txt"), b"hello world").unwrap();
        fs::set_permissions(dir.path().join("hello.txt"), fs::Permissions::from_mode(0o640)).unwrap();
        std::os::unix::fs::chown(dir.path().join("hello.txt"), Some(1234), Some(5678)).unwrap();
        let mut h = Harness::mounted(&mem, dir.path());

        let root = h.getattr(ROOT_ID).unwrap();
        assert_eq!(kind(root.attr.mode), libc::S_IFDIR);
        assert_eq!(root.attr.ino, fs::metadata(dir.path()).unwrap().ino());

        let e = h.lookup(ROOT_ID, "hello.txt").unwrap();
        let meta = fs::metadata(dir.path().join("hello.txt")).unwrap();
        assert_ne!(e.nodeid, 0);
        assert_eq!(e.attr.ino, meta.ino());
        assert_eq!(e.attr.size, 11);
        assert_eq!(e.attr.mode, libc::S_IFREG | 0o640);
        assert_eq!((e.attr.uid, e.attr.gid), (1234, 5678));
        assert_eq!(e.entry_valid, 1, "auto cache: one second");

        let a = h.getattr(e.nodeid).unwrap();
        assert_eq!(a.attr.ino, meta.ino());
        assert_eq!(a.attr.mtime, u64::try_from(meta.mtime()).unwrap());

        assert_eq!(h.lookup(ROOT_ID, "missing").unwrap_err(), libc::ENOENT);
        assert_eq!(h.getattr(0xdead_beef).unwrap_err(), libc::EBADF, "unknown inode");
    }

    #[test]
    fn open_and_read() {
        let mem = test_mem();
        let dir = tempfile::tempdir().unwrap();
        let content: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(dir.path().join("data"), &content).unwrap();
        let mut h = Harness::mounted(&mem, dir.path());

        let e = h.lookup(ROOT_ID, "data").unwrap();
        let fh = h.open(e.nodeid, libc::O_RDONLY).unwrap().fh;
        assert_eq!(h.read(e.nodeid, fh, 0, 16).unwrap(), &content[..16]);
        assert_eq!(h.read(e.nodeid, fh, 4096, 65536).unwrap(), &content[4096..4096 + 65536]);
        // Short read at EOF, empty read past it.
        assert_eq!(h.read(e.nodeid, fh, 99_990, 100).unwrap(), &content[99_990..]);
        assert!(h.read(e.nodeid, fh, 200_000, 100).unwrap().is_empty());
        // A read larger than the reply buffer is refused, not overflowed.
        assert!(h.read(e.nodeid, fh, 0, REPLY_LEN * 2).is_err());
        h.release(e.nodeid, fh).unwrap();
        assert_eq!(h.read(e.nodeid, fh, 0, 16).unwrap_err(), libc::EBADF, "released handle");
    }

    #[test]
    fn create_write_and_read_back() {
        let mem = test_mem();
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::mounted(&mem, dir.path());

        let (e, open) = h.create(ROOT_ID, "new.txt", libc::O_RDWR | libc::O_CREAT, libc::S_IFREG | 0o664).unwrap();
        assert_eq!(kind(e.attr.mode), libc::S_IFREG);
        assert_eq!(h.write(e.nodeid, open.fh, 0, b"first line\n").unwrap(), 11);
        assert_eq!(h.write(e.nodeid, open.fh, 11, b"second\n").unwrap(), 7);
        // A sparse write far out.
        assert_eq!(h.write(e.nodeid, open.fh, 1 << 20, b"end").unwrap(), 3);
        h.release(e.nodeid, open.fh).unwrap();

        let host = fs::read(dir.path().join("new.txt")).unwrap();
        assert_eq!(&host[..18], b"first line\nsecond\n");
        assert_eq!(host.len(), (1 << 20) + 3);
        assert_eq!(&host[1 << 20..], b"end");
        let meta = fs::metadata(dir.path().join("new.txt")).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o644, "mode & !umask");

        // Exclusive create of an existing name.
        assert_eq!(
            h.create(ROOT_ID, "new.txt", libc::O_RDWR | libc::O_CREAT | libc::O_EXCL, libc::S_IFREG | 0o644).unwrap_err(),
            libc::EEXIST
        );
    }

    #[test]
    fn files_are_created_with_the_callers_ownership() {
        let mem = test_mem();
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let mut h = Harness::mounted(&mem, dir.path());
        h.uid = 1000;
        h.gid = 1001;
        let (e, open) = h.create(ROOT_ID, "mine", libc::O_WRONLY | libc::O_CREAT, libc::S_IFREG | 0o600).unwrap();
        h.release(e.nodeid, open.fh).unwrap();
        let d = h.mkdir(ROOT_ID, "mydir", 0o755).unwrap();
        let s = h.symlink(ROOT_ID, "mylink", "mine").unwrap();
        for (name, entry) in [("mine", e), ("mydir", d), ("mylink", s)] {
            let meta = fs::symlink_metadata(dir.path().join(name)).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (1000, 1001), "{name}");
            assert_eq!((entry.attr.uid, entry.attr.gid), (1000, 1001), "{name}");
        }

        // A root-owned 0755 dir does not stop the caller on the host: the
        // guest kernel has checked its permissions and capabilities (see
        // `creds`); the new file is still the caller's.
        h.uid = 0;
        h.gid = 0;
        let locked = h.mkdir(ROOT_ID, "locked", 0o755).unwrap();
        h.uid = 1000;
        h.gid = 1000;
        let (e, _) = h.create(locked.nodeid, "theirs", libc::O_WRONLY | libc::O_CREAT, libc::S_IFREG | 0o644).unwrap();
        assert_eq!((e.attr.uid, e.attr.gid), (1000, 1000));
        let meta = fs::metadata(dir.path().join("locked/theirs")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (1000, 1000));
    }

    #[test]
    fn mkdir_rmdir_and_readdir() {
        let mem = test_mem();
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), b"").unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        let mut h = Harness::mounted(&mem, dir.path());

        let d = h.mkdir(ROOT_ID, "newdir", 0o750).unwrap();
        assert_eq!(d.attr.mode, libc::S_IFDIR | 0o750);
        let meta = fs::metadata(dir.path().join("newdir")).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.mode() & 0o7777, 0o750);
        assert_eq!(h.mkdir(ROOT_ID, "newdir", 0o750).unwrap_err(), libc::EEXIST);

        assert_eq!(h.list_dir(ROOT_ID), vec!["a", "newdir", "sub"]);

        let fh = h.opendir(ROOT_ID).unwrap().fh;
        let items = h.readdirplus(ROOT_ID, fh, 0, 8192).unwrap();
        let mut names: Vec<_> = items.iter().map(|i| i.name.clone()).collect();
        names.sort();
        assert_eq!(names, vec!["a", "newdir", "sub"]);
        for item in &items {
            let entry = item.entry.unwrap();
            let host = fs::metadata(dir.path().join(&item.name)).unwrap();
            assert_eq!(entry.attr.ino, host.ino(), "{}", item.name);
            assert_eq!(item.ino, host.ino(), "{}", item.name);
            assert_ne!(entry.nodeid, 0);
            assert_eq!(item.type_, (host.mode() & S_IFMT) >> 12, "{}", item.name);
        }
        h.releasedir(ROOT_ID, fh).unwrap();

        fs::write(dir.path().join("newdir/x"), b"").unwrap();
        assert_eq!(h.rmdir(ROOT_ID, "newdir").unwrap_err(), libc::ENOTEMPTY);
        fs::remove_file(dir.path().join("newdir/x")).unwrap();
        h.rmdir(ROOT_ID, "newdir").unwrap();
        assert!(!dir.path().join("newdir").exists());
    }

    #[test]
    fn large_directory_pages_through_readdir() {
        let mem = test_mem();
        let dir = tempfile::tempdir().unwrap();
        let expected: HashSet<String> = (0..3000).map(|i| format!("entry-with-a-longish-name-{i:05}")).collect();
        for name in &expected {
            fs::write(dir.path().join(name), b"").unwrap();
        }
        let mut h = Harness::mounted(&mem, dir.path());
        let names = h.list_dir(ROOT_ID);
        assert_eq!(names.len(), 3000, "every entry exactly once");
        assert_eq!(names.into_iter().collect::<HashSet<_>>(), expected);

        // READDIRPLUS pages too, and every entry is looked up.
        let fh = h.opendir(ROOT_ID).unwrap().fh;
        let (mut offset, mut count) = (0, 0);
        loop {
            let items = h.readdirplus(ROOT_ID, fh, offset, 16384).unwrap();
            let Some(last) = items.last() else { break };
            offset = last.off;
            count += items.len();
            assert!(items.iter().all(|i| i.entry.is_some_and(|e| e.nodeid != 0)));
        }
        assert_eq!(count, 3000);
    }

    #[test]
    fn unlink_removes_the_host_file() {
        let mem = test_mem();
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("gone"), b"x").unwrap();
        let mut h = Harness::mounted(&mem, dir.path());
        let e = h.lookup(ROOT_ID, "gone").unwrap();
        let fh = h.open(e.nodeid, libc::O_RDONLY).unwrap().fh;
        h.unlink(ROOT_ID, "gone").unwrap();
        assert!(!dir.path().join("gone").exists());
        // An open file stays readable after unlink.
        assert_eq!(h.read(e.nodeid, fh, 0, 10).unwrap(), b"x");
        assert_eq!(h.unlink(ROOT_ID, "gone").unwrap_err(), libc::ENOENT);
        assert_eq!(h.lookup(ROOT_ID, "gone").unwrap_err(), libc::ENOENT);
    }

    #[test]
    fn rename_moves_and_replaces() {
        let mem = test_mem();
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("from"), b"payload").unwrap();
        fs::write(dir.path().join("victim"), b"old").unwrap();
        fs::create_dir(dir.path().join("d")).unwrap();
        let mut h = Harness::mounted(&mem, dir.path());
        let d = h.lookup(ROOT_ID, "d").unwrap();

        h.rename(ROOT_ID, "from", d.nodeid, "to").unwrap();
        assert!(!dir.path().join("from").exists());
        assert_eq!(fs::read(dir.path().join("d/to")).unwrap(), b"payload");

        // Replacing an existing file.
        h.rename(d.nodeid, "to", ROOT_ID, "victim").unwrap();
        assert_eq!(fs::read(dir.path().join("victim")).unwrap(), b"payload");

        // RENAME2 with RENAME_NOREPLACE refuses to replace.
        fs::write(dir.path().join("other"), b"keep").unwrap();
        let err = h.rename2(ROOT_ID, "victim", ROOT_ID, "other", libc::RENAME_NOREPLACE).unwrap_err();
        assert_eq!(err, libc::EEXIST);
        assert_eq!(fs::read(dir.path().join("other")).unwrap(), b"keep");
        // RENAME_EXCHANGE swaps.
        h.rename2(ROOT_ID, "victim", ROOT_ID, "other", libc::RENAME_EXCHANGE).unwrap();
        assert_eq!(fs::read(dir.path().join("other")).unwrap(), b"payload");
        assert_eq!(fs::read(dir.path().join("victim")).unwrap(), b"keep");
    }

    #[test]
    fn symlinks_and_hard_links() {
        let mem = test_mem();
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("target"), b"t").unwrap();
        let mut h = Harness::mounted(&mem, dir.path());

        let s = h.symlink(ROOT_ID, "sym", "target").unwrap();
        assert_eq!(kind(s.attr.mode), libc::S_IFLNK);
        assert_eq!(fs::read_link(dir.path().join("sym")).unwrap().to_str(), Some("target"));
        assert_eq!(h.readlink(s.nodeid).unwrap(), b"target");
        // Dangling and absolute targets are stored verbatim.
        let abs = h.symlink(ROOT_ID, "abs", "/etc/passwd").unwrap();
        assert_eq!(h.readlink(abs.nodeid).unwrap(), b"/etc/passwd");

        let t = h.lookup(ROOT_ID, "target").unwrap();
        let l = h.link(t.nodeid, ROOT_ID, "hard").unwrap();
        assert_eq!(l.attr.ino, t.attr.ino);
        assert_eq!(l.attr.nlink, 2);
        assert_eq!(fs::metadata(dir.path().join("hard")).unwrap().ino(), fs::metadata(dir.path().join("target")).unwrap().ino());
        assert!(h.readlink(t.nodeid).is_err(), "not a link");
    }

    #[test]
    fn setattr_truncate_chmod_chown_and_times() {
        let mem = test_mem();
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("f"), b"0123456789").unwrap();
        let mut h = Harness::mounted(&mem, dir.path());
        let e = h.lookup(ROOT_ID, "f").unwrap();

        let mut arg = setattr_in(SetattrValid::SIZE.bits());
        arg.size = 4;
        assert_eq!(h.setattr(e.nodeid, arg).unwrap().attr.size, 4);
        assert_eq!(fs::read(dir.path().join("f")).unwrap(), b"0123");
        arg.size = 8192;
        h.setattr(e.nodeid, arg).unwrap();
        assert_eq!(fs::metadata(dir.path().join("f")).unwrap().len(), 8192);

        let mut arg = setattr_in(SetattrValid::MODE.bits());
        arg.mode = libc::S_IFREG | 0o4711;
        assert_eq!(h.setattr(e.nodeid, arg).unwrap().attr.mode & 0o7777, 0o4711);
        assert_eq!(fs::metadata(dir.path().join("f")).unwrap().mode() & 0o7777, 0o4711);

        let mut arg = setattr_in(SetattrValid::UID.bits() | SetattrValid::GID.bits());
        arg.uid = 4242;
        arg.gid = 4343;
        h.setattr(e.nodeid, arg).unwrap();
        let meta = fs::metadata(dir.path().join("f")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (4242, 4343));

        let mut arg = setattr_in(SetattrValid::MTIME.bits() | SetattrValid::ATIME.bits());
        arg.mtime = 1_000_000_000;
        arg.atime = 1_100_000_000;
        h.setattr(e.nodeid, arg).unwrap();
        let meta = fs::metadata(dir.path().join("f")).unwrap();
        assert_eq!(meta.mtime(), 1_000_000_000);
        assert_eq!(meta.atime(), 1_100_000_000);

        // Truncate through an open handle (ftruncate path).
        let fh = h.open(e.nodeid, libc::O_RDWR).unwrap().fh;
        let mut arg = setattr_in(SetattrValid::SIZE.bits() | fuse_backend_rs::abi::fuse_abi::FATTR_FH);
        arg.fh = fh;
        arg.size = 1;
        h.setattr(e.nodeid, arg).unwrap();
        assert_eq!(fs::metadata(dir.path().join("f")).unwrap().len(), 1);
    }

    #[test]
    fn xattrs_round_trip() {
        let mem = test_mem();
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("f"), b"").unwrap();
        let mut h = Harness::mounted(&mem, dir.path());
        let e = h.lookup(ROOT_ID, "f").unwrap();

        h.setxattr(e.nodeid, "user.carapace", b"value-1").unwrap();
        assert_eq!(h.getxattr_len(e.nodeid, "user.carapace").unwrap(), 7);
        assert_eq!(h.getxattr(e.nodeid, "user.carapace", 64).unwrap(), b"value-1");
        assert_eq!(h.getxattr(e.nodeid, "user.carapace", 3).unwrap_err(), libc::ERANGE);
        assert_eq!(h.getxattr(e.nodeid, "user.none", 64).unwrap_err(), libc::ENODATA);
        let list = h.listxattr(e.nodeid, 1024).unwrap();
        assert!(list.split(|&b| b == 0).any(|n| n == b"user.carapace"), "{list:?}");

        // The host file carries it.
        let mut buf = [0u8; 32];
        let path = std::ffi::CString::new(dir.path().join("f").to_str().unwrap()).unwrap();
        // SAFETY: valid NUL-terminated strings and a buffer of the given size.
        let n = unsafe { libc::getxattr(path.as_ptr(), c"user.carapace".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        assert_eq!(usize::try_from(n).unwrap(), 7);
        assert_eq!(&buf[..7], b"value-1");

        // Huge sizes from the guest are clamped, not allocated.
        assert_eq!(h.getxattr(e.nodeid, "user.carapace", u32::MAX).unwrap(), b"value-1");
        assert!(h.listxattr(e.nodeid, u32::MAX).is_ok());

        h.removexattr(e.nodeid, "user.carapace").unwrap();
        assert_eq!(h.getxattr(e.nodeid, "user.carapace", 64).unwrap_err(), libc::ENODATA);
    }

    #[test]
    fn statfs_and_access() {
        let mem = test_mem();
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::mounted(&mem, dir.path());
        let st = h.statfs(ROOT_ID).unwrap();
        assert!(st.st.blocks > 0);
        assert!(st.st.namelen >= 255);
        h.access(ROOT_ID, libc::R_OK | libc::W_OK | libc::X_OK).unwrap();
    }

    #[test]
    fn forget_has_no_reply() {
        let mem = test_mem();
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("f"), b"").unwrap();
        let mut h = Harness::mounted(&mem, dir.path());
        let e = h.lookup(ROOT_ID, "f").unwrap();
        assert_eq!(h.forget(e.nodeid, 1), 0, "FORGET writes nothing");
        // The inode is gone from the server's table now.
        assert_eq!(h.getattr(e.nodeid).unwrap_err(), libc::EBADF);

        // BATCH_FORGET, with a count larger than the message.
        let e = h.lookup(ROOT_ID, "f").unwrap();
        let one = ForgetOne { nodeid: e.nodeid, nlookup: 1 };
        let batch = BatchForgetIn { count: 1000, dummy: 0 };
        let unique = h.next_unique();
        let mut req = in_header(Opcode::BatchForget as u32, unique, 0, 24).as_slice().to_vec();
        req.extend_from_slice(batch.as_slice());
        req.extend_from_slice(one.as_slice());
        assert_eq!(h.send_raw(&req, 64).0, 0, "no reply, even to a bad batch");
        assert!(h.lookup(ROOT_ID, "f").is_ok(), "the worker keeps serving");
    }

    #[test]
    fn several_chains_in_one_pass() {
        let mem = test_mem();
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::mounted(&mem, dir.path());
        let before = h.used_idx();
        // Three GETATTRs, each with its own request and reply areas.
        let mut heads = Vec::new();
        for i in 0..3u64 {
            let req_addr = REQ_ADDR + i * 0x1000;
            let reply_addr = REPLY_ADDR + i * 0x1000;
            let arg = fuse_backend_rs::abi::fuse_abi::GetattrIn::default();
            let mut req = in_header(Opcode::Getattr as u32, 100 + i, ROOT_ID, size_of_val(&arg)).as_slice().to_vec();
            req.extend_from_slice(arg.as_slice());
            vm_memory::Bytes::write_slice(&mem, &req, vm_memory::GuestAddress(req_addr)).unwrap();
            heads.push(h.push_chain(&[(req_addr, req.len() as u32, false), (reply_addr, 0x1000, true)]));
        }
        let getattrs = h.stats.count(Opcode::Getattr as u32);
        assert!(h.process().unwrap(), "the driver is notified");
        assert_eq!(h.used_idx(), before.wrapping_add(3));
        assert_eq!(h.stats.count(Opcode::Getattr as u32), getattrs + 3, "{}", h.stats);
        for (i, head) in heads.iter().enumerate() {
            let (id, len) = h.used(2 - i as u16);
            assert_eq!(id, u32::from(*head));
            let out: OutHeader = vm_memory::Bytes::read_obj(&mem, vm_memory::GuestAddress(REPLY_ADDR + i as u64 * 0x1000)).unwrap();
            assert_eq!((out.error, out.unique, out.len), (0, 100 + i as u64, len));
        }
        // Nothing more to do: no notification.
        assert!(!h.process().unwrap());
    }

    #[test]
    fn event_idx_suppresses_interrupts_and_publishes_avail_event() {
        use vm_memory::{Bytes, GuestAddress};
        let mem = test_mem();
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::mounted(&mem, dir.path());
        virtio_queue::QueueT::set_event_idx(&mut h.queue, true);
        let used_event = GuestAddress(h.vq.avail_addr().0 + 4 + 2 * u64::from(QSIZE));
        let avail_event = GuestAddress(USED_ADDR + 4 + 8 * u64::from(QSIZE));

        let arg = fuse_backend_rs::abi::fuse_abi::GetattrIn::default();
        let mut req = in_header(Opcode::Getattr as u32, 500, ROOT_ID, size_of_val(&arg)).as_slice().to_vec();
        req.extend_from_slice(arg.as_slice());
        mem.write_slice(&req, GuestAddress(REQ_ADDR)).unwrap();
        let chain = [(REQ_ADDR, req.len() as u32, false), (REPLY_ADDR, 0x1000, true)];

        // The driver wants to hear only once the used index passes 10.
        mem.write_obj(10u16, used_event).unwrap();
        h.push_chain(&chain);
        assert!(!h.process().unwrap(), "interrupt suppressed");
        assert_eq!(h.used_idx(), 2);
        // The device asks to be kicked at the next new chain.
        assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), h.vq.avail().idx().load());

        // Now the driver waits for the next used entry.
        mem.write_obj(h.used_idx(), used_event).unwrap();
        h.push_chain(&chain);
        assert!(h.process().unwrap(), "interrupt due");
        assert_eq!(h.used_idx(), 3);
        assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 3);
    }

    #[test]
    fn split_descriptors_are_gathered() {
        let mem = test_mem();
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("split-name"), b"").unwrap();
        let mut h = Harness::mounted(&mem, dir.path());
        // LOOKUP with the header and the name in three readable pieces, and
        // the reply across two writable ones.
        let name = cname("split-name");
        let hdr = in_header(Opcode::Lookup as u32, 77, ROOT_ID, name.len());
        let mut req = hdr.as_slice().to_vec();
        req.extend_from_slice(&name);
        vm_memory::Bytes::write_slice(&mem, &req, vm_memory::GuestAddress(REQ_ADDR)).unwrap();
        let cut1 = 13u32;
        let cut2 = size_of::<InHeader>() as u32 + 4;
        let total = req.len() as u32;
        h.push_chain(&[
            (REQ_ADDR, cut1, false),
            (REQ_ADDR + u64::from(cut1), cut2 - cut1, false),
            (REQ_ADDR + u64::from(cut2), total - cut2, false),
            (REPLY_ADDR, 20, true),
            (REPLY_ADDR + 0x1000, 0x1000, true),
        ]);
        h.process().unwrap();
        let (_, len) = h.used(0);
        assert_eq!(len as usize, size_of::<OutHeader>() + size_of::<EntryOut>());
        let mut reply = vec![0u8; 20];
        vm_memory::Bytes::read_slice(&mem, &mut reply, vm_memory::GuestAddress(REPLY_ADDR)).unwrap();
        let out: OutHeader = obj(&reply);
        assert_eq!((out.error, out.unique), (0, 77));
        let mut rest = vec![0u8; size_of::<EntryOut>() - 4];
        vm_memory::Bytes::read_slice(&mem, &mut rest, vm_memory::GuestAddress(REPLY_ADDR + 0x1000)).unwrap();
        reply.extend_from_slice(&rest);
        let entry: EntryOut = obj(&reply[size_of::<OutHeader>()..]);
        assert_eq!(entry.attr.ino, fs::metadata(dir.path().join("split-name")).unwrap().ino());
    }

    // --- malformed requests: an error reply or a dropped chain, never a
    // panic, and the queue keeps working -------------------------------

    fn still_serving(h: &mut Harness<'_>) {
        assert!(h.getattr(ROOT_ID).is_ok(), "the device stopped serving");
    }

    #[test]
    fn truncated_header_is_dropped() {
        let mem = test_mem();
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::mounted(&mem, dir.path());
        let hdr = in_header(Opcode::Getattr as u32, 5, ROOT_ID, 16);
        let (len, _) = h.send_raw(&hdr.as_slice()[..20], 256);
        assert_eq!(len, 0);
        let (len, _) = h.send_raw(&[], 256);
        assert_eq!(len, 0, "empty request");
        still_serving(&mut h);
    }

    #[test]
    fn truncated_arguments_get_an_error_reply() {
        let mem = test_mem();
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::mounted(&mem, dir.path());
        // SETATTR whose argument struct is cut short.
        let hdr = in_header(Opcode::Setattr as u32, 9, ROOT_ID, 88);
        let mut req = hdr.as_slice().to_vec();
        req.extend_from_slice(&[0u8; 10]);
        let (len, reply) = h.send_raw(&req, 256);
        assert_eq!(len, 16);
        let out: OutHeader = obj(&reply);
        assert_eq!((out.error, out.unique), (-libc::EINVAL, 9));
        still_serving(&mut h);
    }

    #[test]
    fn bad_lengths_get_error_replies() {
        let mem = test_mem();
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::mounted(&mem, dir.path());

        // Header length far beyond the maximum message.
        let mut hdr = in_header(Opcode::Lookup as u32, 11, ROOT_ID, 2);
        hdr.len = u32::MAX;
        let mut req = hdr.as_slice().to_vec();
        req.extend_from_slice(b"a\0");
        let (_, reply) = h.send_raw(&req, 256);
        let out: OutHeader = obj(&reply);
        assert_eq!((out.error, out.unique), (-libc::ENOMEM, 11));

        // Header length smaller than the header.
        let mut hdr = in_header(Opcode::Lookup as u32, 12, ROOT_ID, 2);
        hdr.len = 3;
        let mut req = hdr.as_slice().to_vec();
        req.extend_from_slice(b"a\0");
        let (_, reply) = h.send_raw(&req, 256);
        let out: OutHeader = obj(&reply);
        assert_eq!((out.error, out.unique), (-libc::EINVAL, 12));

        // Header length larger than what the descriptors hold.
        let mut hdr = in_header(Opcode::Lookup as u32, 13, ROOT_ID, 2);
        hdr.len = 4096;
        let mut req = hdr.as_slice().to_vec();
        req.extend_from_slice(b"a\0");
        let (_, reply) = h.send_raw(&req, 256);
        let out: OutHeader = obj(&reply);
        assert_eq!((out.error, out.unique), (-libc::EINVAL, 13));

        // SETXATTR whose size disagrees with the value.
        let arg = fuse_backend_rs::abi::fuse_abi::SetxattrIn { size: 100, flags: 0 };
        let body = [arg.as_slice(), b"user.x\0", b"abc"].concat();
        let mut req = in_header(Opcode::Setxattr as u32, 14, ROOT_ID, body.len()).as_slice().to_vec();
        req.extend_from_slice(&body);
        let (_, reply) = h.send_raw(&req, 256);
        let out: OutHeader = obj(&reply);
        assert_eq!((out.error, out.unique), (-libc::EINVAL, 14));

        // GETXATTR without a NUL-terminated name.
        let arg = GetxattrIn { size: 10, padding: 0 };
        let body = [arg.as_slice(), b"user.x"].concat();
        let mut req = in_header(Opcode::Getxattr as u32, 15, ROOT_ID, body.len()).as_slice().to_vec();
        req.extend_from_slice(&body);
        let (_, reply) = h.send_raw(&req, 256);
        let out: OutHeader = obj(&reply);
        assert_eq!((out.error, out.unique), (-libc::EINVAL, 15));
        still_serving(&mut h);
    }

    #[test]
    fn unknown_opcodes_get_enosys() {
        let mem = test_mem();
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::mounted(&mem, dir.path());
        for (i, opcode) in [0u32, 7, 19, 50, 999, 4096, u32::MAX].into_iter().enumerate() {
            let unique = 1000 + i as u64;
            let req = in_header(opcode, unique, ROOT_ID, 0);
            let (len, reply) = h.send_raw(req.as_slice(), 64);
            assert_eq!(len, 16, "opcode {opcode}");
            let out: OutHeader = obj(&reply);
            assert_eq!((out.error, out.unique), (-libc::ENOSYS, unique), "opcode {opcode}");
        }
        still_serving(&mut h);
    }

    #[test]
    fn descriptors_outside_guest_memory_are_dropped() {
        let mem = test_mem();
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::mounted(&mem, dir.path());
        let outside = MEM_SIZE as u64 + 0x1000;
        // Request outside memory.
        h.push_chain(&[(outside, 64, false), (REPLY_ADDR, 256, true)]);
        // Reply outside memory.
        let req = in_header(Opcode::Getattr as u32, 21, ROOT_ID, 16);
        let mut bytes = req.as_slice().to_vec();
        bytes.extend_from_slice(&[0u8; 16]);
        vm_memory::Bytes::write_slice(&mem, &bytes, vm_memory::GuestAddress(REQ_ADDR)).unwrap();
        h.push_chain(&[(REQ_ADDR, bytes.len() as u32, false), (outside, 256, true)]);
        // A buffer straddling the end of memory.
        h.push_chain(&[(MEM_SIZE as u64 - 8, 64, false), (REPLY_ADDR, 256, true)]);
        // Address overflow.
        h.push_chain(&[(u64::MAX - 4, 64, false), (REPLY_ADDR, 256, true)]);
        let before = h.used_idx();
        h.process().unwrap();
        assert_eq!(h.used_idx(), before.wrapping_add(4), "every chain is given back");
        for back in 0..4 {
            assert_eq!(h.used(back).1, 0);
        }
        still_serving(&mut h);
    }

    #[test]
    fn wrong_descriptor_directions() {
        let mem = test_mem();
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::mounted(&mem, dir.path());
        let req = in_header(Opcode::Getattr as u32, 31, ROOT_ID, 16);
        let mut bytes = req.as_slice().to_vec();
        bytes.extend_from_slice(&[0u8; 16]);
        vm_memory::Bytes::write_slice(&mem, &bytes, vm_memory::GuestAddress(REQ_ADDR)).unwrap();
        let len = bytes.len() as u32;

        // No writable descriptor: nowhere to reply.
        h.push_chain(&[(REQ_ADDR, len, false)]);
        // The request in a write-only descriptor: nothing to read.
        h.push_chain(&[(REQ_ADDR, len, true), (REPLY_ADDR, 256, true)]);
        // Reply buffer too small for any reply.
        h.push_chain(&[(REQ_ADDR, len, false), (REPLY_ADDR, 8, true)]);
        let before = h.used_idx();
        h.process().unwrap();
        assert_eq!(h.used_idx(), before.wrapping_add(3));
        for back in 0..3 {
            assert_eq!(h.used(back).1, 0, "chain {back}");
        }
        // Reply buffer big enough for an error but not the attributes.
        let (len, reply) = h.send_raw(&bytes, 40);
        let out: OutHeader = obj(&reply);
        assert_eq!((len, out.unique, out.error), (16, 31, -libc::EIO));
        still_serving(&mut h);
    }

    #[test]
    fn looping_and_oversized_chains_terminate() {
        let mem = test_mem();
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::mounted(&mem, dir.path());
        // A descriptor whose `next` points at itself.
        let desc = virtio_queue::desc::RawDescriptor::from(virtio_queue::desc::split::Descriptor::new(
            REQ_ADDR,
            64,
            virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT as u16,
            5,
        ));
        h.vq.desc_table().store(5, desc).unwrap();
        h.push_head(5);
        // A head index beyond the queue.
        h.push_head(QSIZE + 3);
        // Overlapping descriptors whose lengths add up past 4 GiB.
        h.push_chain(&[(0, u32::MAX, false), (0, u32::MAX, false), (REPLY_ADDR, 256, true)]);
        let before = h.used_idx();
        let _ = h.process();
        assert!(h.used_idx().wrapping_sub(before) >= 2);
        still_serving(&mut h);
    }

    #[test]
    fn corrupt_avail_index_is_an_error_not_a_panic() {
        let mem = test_mem();
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::mounted(&mem, dir.path());
        let idx = h.vq.avail().idx().load();
        h.vq.avail().idx().store(idx.wrapping_add(QSIZE + 10));
        assert!(h.process().is_err());
    }
}
