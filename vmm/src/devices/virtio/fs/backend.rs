//! The file system behind the FUSE server: `fuse-backend-rs`'s
//! [`PassthroughFs`] rooted at the shared directory, wrapped in [`ShareFs`],
//! a guard that enforces what the passthrough file system leaves to its
//! user:
//!
//! - read-only sharing: every request that would change the share fails with
//!   `EROFS` before it reaches the host;
//! - "nodev": only regular files and directories are opened on the host;
//!   opening anything else (device nodes, FIFOs, sockets, symlinks) fails
//!   with `EACCES`, so a device node in the share never opens a host device
//!   and a FIFO never blocks the worker;
//! - names: every name that creates, removes or renames an entry must be a
//!   single path component (no `/`, not `.` or `..`); lookups may not
//!   contain `/` (`..` at the root stays at the root);
//! - sizes: buffer sizes the guest asks for (xattr values and lists,
//!   directory listings) are clamped before the backend allocates them;
//! - no DAX: mapping requests are refused;
//! - callers: entries are created as the guest caller, with the DAC
//!   capabilities the guest kernel has already checked (see `creds`).
//!
//! It also keeps the guest's page cache of a file across opens in
//! [`CacheMode::Auto`] when the file has not changed on the host since the
//! guest last opened it (see [`Versions`]).

use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn};
use fuse_backend_rs::abi::virtio_fs::RemovemappingOne;
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, FsOptions, GetxattrReply, ListxattrReply, OpenOptions, SetattrValid, ZeroCopyReader,
    ZeroCopyWriter,
};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::FsCacheReqHandler;

use super::creds::CallerCreds;
use super::defs::{READDIR_SIZE_MAX, XATTR_SIZE_MAX};
use super::{CacheMode, FsConfig, FsConfigError, FsError};

/// The FUSE server the device runs.
pub(crate) type FsServer = Server<ShareFs<PassthroughFs>>;

/// How long the guest keeps attributes and names in [`CacheMode::Auto`].
const AUTO_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the guest keeps attributes and names in [`CacheMode::Always`].
const ALWAYS_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);
/// How long the guest keeps the absence of a name (both caching modes):
/// a lookup that fails is answered as a negative entry, which the guest
/// caches, instead of ENOENT, which it does not. Where a guest request
/// costs tens of milliseconds (kvm_pvm hosts) a container's create looks
/// the same missing names up again and again (PATH's directories, the
/// files it may have). No longer than `auto` keeps names that exist: a
/// file made on the host shows within as long either way.
const NEGATIVE_TIMEOUT: Duration = AUTO_TIMEOUT;

/// The passthrough configuration for a share rooted at `root` (a canonical,
/// UTF-8 path) with the given cache mode.
pub(crate) fn passthrough_config(root: &str, cache: CacheMode) -> Config {
    let (cache_policy, timeout) = match cache {
        CacheMode::None => (CachePolicy::Never, Duration::ZERO),
        CacheMode::Auto => (CachePolicy::Auto, AUTO_TIMEOUT),
        CacheMode::Always => (CachePolicy::Always, ALWAYS_TIMEOUT),
    };
    Config {
        root_dir: root.to_owned(),
        cache_policy,
        attr_timeout: timeout,
        entry_timeout: timeout,
        // Extended attributes (file capabilities, ACLs, overlayfs metadata).
        xattr: true,
        // The backend opens its root (and checks names itself) on INIT.
        do_import: true,
        // Writeback caching needs exclusive access and read access to
        // write-only files; keep the kernel's write-through behaviour.
        writeback: false,
        // Inodes are held as O_PATH descriptors.
        inode_file_handles: false,
        no_open: false,
        no_opendir: false,
        // No DAX window.
        dax_file_size: None,
        ..Default::default()
    }
}

/// Builds the FUSE server for a validated configuration (`root` is
/// [`FsConfig::validate`]'s result).
pub(crate) fn build_server(config: &FsConfig, root: &Path) -> Result<FsServer, FsError> {
    let root_str = root.to_str().ok_or_else(|| FsError::from(FsConfigError::SharedDirNotUtf8(root.to_path_buf())))?;
    let fs = PassthroughFs::<()>::new(passthrough_config(root_str, config.cache))
        .map_err(|source| FsError::Backend { path: root.to_path_buf(), source })?;
    Ok(Server::new(ShareFs::new(fs, config.read_only, config.cache)))
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// A name that creates, removes or renames a directory entry: one
/// non-empty path component other than `.` and `..`.
fn check_entry_name(name: &CStr) -> io::Result<()> {
    let b = name.to_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(errno(libc::EINVAL));
    }
    Ok(())
}

/// A name looked up in a directory: no `/` (`.` and `..` are resolved by
/// the backend; `..` at the root is the root).
fn check_lookup_name(name: &CStr) -> io::Result<()> {
    let b = name.to_bytes();
    if b.is_empty() || b.contains(&b'/') {
        return Err(errno(libc::EINVAL));
    }
    Ok(())
}

/// Whether `open(2)` flags ask for write access or would change the file.
fn open_flags_write(flags: u32) -> bool {
    // Reinterpreting the kernel's flag word.
    #[allow(clippy::cast_possible_wrap)]
    let flags = flags as i32;
    (flags & libc::O_ACCMODE) != libc::O_RDONLY || flags & (libc::O_TRUNC | libc::O_CREAT) != 0
}

/// What identifies one content of a file: when none of it moved between
/// two opens, the pages the guest cached stay good. (The kernel's change
/// counter is not visible to user space; ctime moves on every write,
/// truncate and attribute change, at the host's timestamp granularity.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Version {
    ino: u64,
    size: i64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Version {
    fn of(st: &stat64) -> Self {
        Self { ino: st.st_ino, size: st.st_size, mtime: (st.st_mtime, st.st_mtime_nsec), ctime: (st.st_ctime, st.st_ctime_nsec) }
    }
}

/// The version of each regular file at its last open, by FUSE inode.
///
/// In [`CacheMode::Auto`] the passthrough backend leaves KEEP_CACHE out of
/// every open, so the guest kernel drops the file's page cache each time:
/// every `exec` of the same binary reads it again through virtio-fs and
/// faults it in anew (milliseconds a page on a kvm_pvm host). Opening a
/// file whose version has not moved since the previous open keeps the
/// cache; a changed file is opened without it, so the guest sees what the
/// host wrote (close-to-open consistency, as before).
#[derive(Debug, Default)]
struct Versions(Mutex<HashMap<u64, Version>>);

/// Past this many files the table starts over (it only costs the next open
/// of each a re-read).
const VERSIONS_MAX: usize = 1 << 16;

impl Versions {
    /// Records `now` as `inode`'s version; whether it is the one recorded at
    /// the previous open.
    fn unchanged(&self, inode: u64, now: Version) -> bool {
        let Ok(mut seen) = self.0.lock() else {
            return false;
        };
        if seen.len() >= VERSIONS_MAX && !seen.contains_key(&inode) {
            seen.clear();
        }
        seen.insert(inode, now) == Some(now)
    }

    fn forget(&self, inode: u64) {
        if let Ok(mut seen) = self.0.lock() {
            seen.remove(&inode);
        }
    }
}

/// The guard around the passthrough file system (see the module docs).
#[derive(Debug)]
pub(crate) struct ShareFs<F> {
    inner: F,
    read_only: bool,
    /// Versions of opened files, in [`CacheMode::Auto`] only.
    versions: Option<Versions>,
    /// How long the guest may cache a name's absence (zero: not at all).
    negative_timeout: Duration,
}

impl<F> ShareFs<F> {
    pub(crate) fn new(inner: F, read_only: bool, cache: CacheMode) -> Self {
        let versions = matches!(cache, CacheMode::Auto).then(Versions::default);
        let negative_timeout = if cache == CacheMode::None { Duration::ZERO } else { NEGATIVE_TIMEOUT };
        Self { inner, read_only, versions, negative_timeout }
    }

    fn writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(errno(libc::EROFS))
        } else {
            Ok(())
        }
    }
}

/// Runs `op`, a request that creates an entry, as the guest caller `ctx`
/// names (see `creds`). The backend gets a root context, so it does not
/// switch again (it would drop the capabilities the caller keeps).
fn as_caller<T>(ctx: &Context, op: impl FnOnce(&Context) -> io::Result<T>) -> io::Result<T> {
    let _caller = CallerCreds::switch(ctx.uid, ctx.gid)?;
    op(&Context { uid: 0, gid: 0, ..*ctx })
}

impl<F: FileSystem<Inode = u64, Handle = u64>> ShareFs<F> {
    /// The "nodev" rule: only regular files and directories are opened.
    /// Returns the attributes it checked.
    fn check_openable(&self, ctx: &Context, inode: u64) -> io::Result<stat64> {
        let (st, _) = self.inner.getattr(ctx, inode, None)?;
        match st.st_mode & libc::S_IFMT {
            libc::S_IFREG | libc::S_IFDIR => Ok(st),
            _ => Err(errno(libc::EACCES)),
        }
    }
}

impl<F: FileSystem<Inode = u64, Handle = u64>> FileSystem for ShareFs<F> {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let mut opts = self.inner.init(capable)?;
        // There is no DAX window to map files into.
        opts.remove(FsOptions::PERFILE_DAX);
        // Requests of up to 1 MiB (256 pages) instead of one page per
        // WRITE and 32 pages per READ: every request costs the guest a
        // round trip (milliseconds when its kernel is emulated), and the
        // server reads and writes guest memory in place at any size. The
        // server enables only what the guest offers.
        opts |= FsOptions::BIG_WRITES | FsOptions::MAX_PAGES;
        if self.read_only {
            opts.remove(FsOptions::WRITEBACK_CACHE);
        }
        Ok(opts)
    }

    fn destroy(&self) {
        self.inner.destroy()
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        check_lookup_name(name)?;
        match self.inner.lookup(ctx, parent, name) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && !self.negative_timeout.is_zero() => Ok(Entry {
                inode: 0,
                generation: 0,
                // SAFETY: stat64 is plain integers; all-zero is a valid value.
                attr: unsafe { std::mem::zeroed() },
                attr_flags: 0,
                attr_timeout: Duration::ZERO,
                entry_timeout: self.negative_timeout,
            }),
            other => other,
        }
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        // The guest forgets an inode only when it drops it, page cache and
        // all: its next open starts from nothing anyway.
        if let Some(v) = &self.versions {
            v.forget(inode);
        }
        self.inner.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        if let Some(v) = &self.versions {
            requests.iter().for_each(|(inode, _)| v.forget(*inode));
        }
        self.inner.batch_forget(ctx, requests)
    }

    fn getattr(&self, ctx: &Context, inode: u64, handle: Option<u64>) -> io::Result<(stat64, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(&self, ctx: &Context, inode: u64, attr: stat64, handle: Option<u64>, valid: SetattrValid) -> io::Result<(stat64, Duration)> {
        self.writable()?;
        self.inner.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn symlink(&self, ctx: &Context, linkname: &CStr, parent: u64, name: &CStr) -> io::Result<Entry> {
        self.writable()?;
        check_entry_name(name)?;
        as_caller(ctx, |ctx| self.inner.symlink(ctx, linkname, parent, name))
    }

    fn mknod(&self, ctx: &Context, inode: u64, name: &CStr, mode: u32, rdev: u32, umask: u32) -> io::Result<Entry> {
        self.writable()?;
        check_entry_name(name)?;
        as_caller(ctx, |ctx| self.inner.mknod(ctx, inode, name, mode, rdev, umask))
    }

    fn mkdir(&self, ctx: &Context, parent: u64, name: &CStr, mode: u32, umask: u32) -> io::Result<Entry> {
        self.writable()?;
        check_entry_name(name)?;
        as_caller(ctx, |ctx| self.inner.mkdir(ctx, parent, name, mode, umask))
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        check_entry_name(name)?;
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        check_entry_name(name)?;
        self.inner.rmdir(ctx, parent, name)
    }

    fn rename(&self, ctx: &Context, olddir: u64, oldname: &CStr, newdir: u64, newname: &CStr, flags: u32) -> io::Result<()> {
        self.writable()?;
        check_entry_name(oldname)?;
        check_entry_name(newname)?;
        self.inner.rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        self.writable()?;
        check_entry_name(newname)?;
        self.inner.link(ctx, inode, newparent, newname)
    }

    fn open(&self, ctx: &Context, inode: u64, flags: u32, fuse_flags: u32) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        if open_flags_write(flags) {
            self.writable()?;
        }
        let st = self.check_openable(ctx, inode)?;
        let (handle, mut opts, passthrough) = self.inner.open(ctx, inode, flags, fuse_flags)?;
        if let Some(v) = &self.versions {
            if st.st_mode & libc::S_IFMT == libc::S_IFREG && v.unchanged(inode, Version::of(&st)) {
                opts |= OpenOptions::KEEP_CACHE;
            }
        }
        Ok((handle, opts, passthrough))
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        self.writable()?;
        check_entry_name(name)?;
        as_caller(ctx, |ctx| self.inner.create(ctx, parent, name, args))
    }

    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.inner.read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.writable()?;
        self.inner.write(ctx, inode, handle, r, size, offset, lock_owner, delayed_write, flags, fuse_flags)
    }

    fn flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(&self, ctx: &Context, inode: u64, handle: u64, mode: u32, offset: u64, length: u64) -> io::Result<()> {
        self.writable()?;
        self.inner.fallocate(ctx, inode, handle, mode, offset, length)
    }

    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.inner.release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }

    fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        self.inner.statfs(ctx, inode)
    }

    fn setxattr(&self, ctx: &Context, inode: u64, name: &CStr, value: &[u8], flags: u32) -> io::Result<()> {
        self.writable()?;
        self.inner.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(&self, ctx: &Context, inode: u64, name: &CStr, size: u32) -> io::Result<GetxattrReply> {
        self.inner.getxattr(ctx, inode, name, size.min(XATTR_SIZE_MAX))
    }

    fn listxattr(&self, ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        self.inner.listxattr(ctx, inode, size.min(XATTR_SIZE_MAX))
    }

    fn removexattr(&self, ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        self.inner.removexattr(ctx, inode, name)
    }

    fn opendir(&self, ctx: &Context, inode: u64, flags: u32) -> io::Result<(Option<u64>, OpenOptions)> {
        if open_flags_write(flags) {
            self.writable()?;
        }
        self.check_openable(ctx, inode)?;
        self.inner.opendir(ctx, inode, flags)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner.readdir(ctx, inode, handle, size.min(READDIR_SIZE_MAX), offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner.readdirplus(ctx, inode, handle, size.min(READDIR_SIZE_MAX), offset, add_entry)
    }

    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        self.inner.releasedir(ctx, inode, flags, handle)
    }

    fn setupmapping(
        &self,
        _ctx: &Context,
        _inode: u64,
        _handle: u64,
        _foffset: u64,
        _len: u64,
        _flags: u64,
        _moffset: u64,
        _vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        Err(errno(libc::ENOSYS))
    }

    fn removemapping(
        &self,
        _ctx: &Context,
        _inode: u64,
        _requests: Vec<RemovemappingOne>,
        _vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        Err(errno(libc::ENOSYS))
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        // Reinterpreting the kernel's mask word.
        #[allow(clippy::cast_possible_wrap)]
        if self.read_only && (mask as i32) & libc::W_OK != 0 {
            return Err(errno(libc::EROFS));
        }
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(&self, ctx: &Context, inode: u64, handle: u64, offset: u64, whence: u32) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }

    fn getlk(&self, ctx: &Context, inode: u64, handle: u64, owner: u64, lock: FileLock, flags: u32) -> io::Result<FileLock> {
        self.inner.getlk(ctx, inode, handle, owner, lock, flags)
    }

    fn setlk(&self, ctx: &Context, inode: u64, handle: u64, owner: u64, lock: FileLock, flags: u32) -> io::Result<()> {
        self.inner.setlk(ctx, inode, handle, owner, lock, flags)
    }

    // SETLKW would block the worker until another holder lets go: refused,
    // the guest kernel then keeps locks locally (as without POSIX_LOCKS).
    fn setlkw(&self, _ctx: &Context, _inode: u64, _handle: u64, _owner: u64, _lock: FileLock, _flags: u32) -> io::Result<()> {
        Err(errno(libc::ENOSYS))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation, clippy::cast_possible_wrap, clippy::cast_sign_loss)]
mod tests {
    use std::collections::BTreeMap;
    use std::ffi::CString;
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::path::Path;

    use fuse_backend_rs::abi::fuse_abi::{InitIn, InitIn2, InitOut, Opcode, KERNEL_VERSION, ROOT_ID};
    use vm_memory::ByteValued;

    use super::*;
    use crate::devices::virtio::fs::test_utils::*;

    fn erofs() -> i32 {
        libc::EROFS
    }

    fn mknod_host(path: &Path, kind: u32, dev: libc::dev_t) {
        let p = CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path; mknod reads it only.
        let rc = unsafe { libc::mknod(p.as_ptr(), kind | 0o666, dev) };
        assert_eq!(rc, 0, "mknod {}: {}", path.display(), io::Error::last_os_error());
    }

    fn host_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
        let p = CString::new(path.to_str().unwrap()).unwrap();
        let n = CString::new(name).unwrap();
        let mut buf = [0u8; 256];
        // SAFETY: valid NUL-terminated strings and a buffer of the given size.
        let rc = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        usize::try_from(rc).ok().map(|len| buf[..len].to_vec())
    }

    #[test]
    fn cache_modes_map_to_policies_and_timeouts() {
        let none = passthrough_config("/x", CacheMode::None);
        assert_eq!(none.cache_policy, CachePolicy::Never);
        assert_eq!(none.attr_timeout, Duration::ZERO);
        assert_eq!(none.entry_timeout, Duration::ZERO);

        let auto = passthrough_config("/x", CacheMode::Auto);
        assert_eq!(auto.cache_policy, CachePolicy::Auto);
        assert_eq!(auto.attr_timeout, AUTO_TIMEOUT);

        let always = passthrough_config("/x", CacheMode::Always);
        assert_eq!(always.cache_policy, CachePolicy::Always);
        assert_eq!(always.entry_timeout, ALWAYS_TIMEOUT);

        for c in [none, auto, always] {
            assert!(c.xattr, "xattrs must be on");
            assert!(c.do_import);
            assert!(!c.writeback);
            assert_eq!(c.root_dir, "/x");
            assert_eq!(c.dax_file_size, None);
        }
    }

    #[test]
    fn cache_modes_reach_the_guest() {
        let direct_io = OpenOptions::DIRECT_IO.bits();
        let keep_cache = OpenOptions::KEEP_CACHE.bits();
        for (mode, valid, direct, keep) in [
            (CacheMode::None, 0, true, false),
            (CacheMode::Auto, 1, false, false),
            (CacheMode::Always, ALWAYS_TIMEOUT.as_secs(), false, true),
        ] {
            let mem = test_mem();
            let dir = tempfile::tempdir().unwrap();
            fs::write(dir.path().join("f"), b"x").unwrap();
            let mut h = Harness::share(&mem, dir.path(), false, mode);
            h.init().unwrap();
            let e = h.lookup(ROOT_ID, "f").unwrap();
            assert_eq!((e.entry_valid, e.attr_valid), (valid, valid), "{mode:?}");
            assert_eq!(h.getattr(e.nodeid).unwrap().attr_valid, valid, "{mode:?}");
            let open = h.open(e.nodeid, libc::O_RDONLY).unwrap();
            assert_eq!(open.open_flags & direct_io != 0, direct, "{mode:?}");
            assert_eq!(open.open_flags & keep_cache != 0, keep, "{mode:?}");
        }
    }

    #[test]
    fn a_missing_name_is_a_negative_entry_the_guest_may_cache_except_uncached() {
        for (mode, valid) in [(CacheMode::None, None), (CacheMode::Auto, Some(1)), (CacheMode::Always, Some(1))] {
            let mem = test_mem();
            let dir = tempfile::tempdir().unwrap();
            let mut h = Harness::share(&mem, dir.path(), false, mode);
            h.init().unwrap();
            let reply = h.call(Opcode::Lookup, ROOT_ID, &[&cname("missing")]).result();
            match valid {
                None => assert_eq!(reply.unwrap_err(), libc::ENOENT),
                Some(secs) => {
                    let e: fuse_backend_rs::abi::fuse_abi::EntryOut = obj(&reply.unwrap());
                    assert_eq!((e.nodeid, e.entry_valid, e.attr_valid), (0, secs, 0), "{mode:?}");
                }
            }
            // Other errors stay errors.
            fs::write(dir.path().join("f"), b"x").unwrap();
            let f = h.lookup(ROOT_ID, "f").unwrap();
            assert_eq!(h.lookup(f.nodeid, "x").unwrap_err(), libc::ENOTDIR, "{mode:?}");
        }
    }

    #[test]
    fn auto_keeps_the_guest_cache_of_a_file_that_did_not_change() {
        let mem = test_mem();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bin");
        fs::write(&file, b"version 1").unwrap();
        fs::create_dir(dir.path().join("d")).unwrap();
        let mut h = Harness::share(&mem, dir.path(), false, CacheMode::Auto);
        h.init().unwrap();
        let keep = |h: &mut Harness, node| {
            let open = h.open(node, libc::O_RDONLY).unwrap();
            h.release(node, open.fh).unwrap();
            open.open_flags & OpenOptions::KEEP_CACHE.bits() != 0
        };
        let e = h.lookup(ROOT_ID, "bin").unwrap();
        assert!(!keep(&mut h, e.nodeid), "first open: nothing cached is known good");
        assert!(keep(&mut h, e.nodeid), "unchanged since the last open");
        assert!(keep(&mut h, e.nodeid));

        fs::write(&file, b"version 2, longer").unwrap();
        assert!(!keep(&mut h, e.nodeid), "changed on the host: the guest must read it again");
        assert!(keep(&mut h, e.nodeid));

        // A write through the guest changes it too (the size, here: a
        // same-size rewrite within one host timestamp tick goes unseen).
        let open = h.open(e.nodeid, libc::O_WRONLY).unwrap();
        h.write(e.nodeid, open.fh, 100, b"V").unwrap();
        h.release(e.nodeid, open.fh).unwrap();
        assert!(!keep(&mut h, e.nodeid));

        // Forgotten: the guest dropped its cache with the inode.
        assert!(keep(&mut h, e.nodeid));
        h.forget(e.nodeid, 1);
        let e = h.lookup(ROOT_ID, "bin").unwrap();
        assert!(!keep(&mut h, e.nodeid));

        // Directories are not tracked.
        let d = h.lookup(ROOT_ID, "d").unwrap();
        let open = h.opendir(d.nodeid).unwrap();
        assert_eq!(open.open_flags & OpenOptions::KEEP_CACHE.bits(), 0);
    }

    #[test]
    fn versions_table_starts_over_when_full() {
        let v = Versions::default();
        let ver = Version { ino: 1, size: 1, mtime: (1, 1), ctime: (1, 1) };
        for inode in 0..VERSIONS_MAX as u64 {
            assert!(!v.unchanged(inode, ver));
        }
        assert!(v.unchanged(7, ver));
        assert!(!v.unchanged(u64::MAX, ver), "a new file past the limit");
        assert!(!v.unchanged(7, ver), "the table started over");
        assert_eq!(v.0.lock().unwrap().len(), 2);
    }

    #[test]
    fn init_negotiates_one_mib_requests() {
        let mem = test_mem();
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::share(&mem, dir.path(), false, CacheMode::Auto);
        let init = InitIn {
            major: KERNEL_VERSION,
            minor: 38,
            max_readahead: 0x2_0000,
            flags: (FsOptions::ASYNC_READ | FsOptions::BIG_WRITES | FsOptions::MAX_PAGES).bits() as u32,
        };
        let out: InitOut = obj(&h.call(Opcode::Init, 0, &[init.as_slice()]).result().unwrap());
        let big = (FsOptions::BIG_WRITES | FsOptions::MAX_PAGES).bits() as u32;
        assert_eq!(out.flags & big, big);
        assert_eq!((out.max_write, out.max_pages), (1 << 20, 256));

        // A guest that offers neither gets neither (one-page writes).
        let mem = test_mem();
        let mut h = Harness::share(&mem, dir.path(), false, CacheMode::Auto);
        let init = InitIn { flags: FsOptions::ASYNC_READ.bits() as u32, ..init };
        let out: InitOut = obj(&h.call(Opcode::Init, 0, &[init.as_slice()]).result().unwrap());
        assert_eq!(out.flags & big, 0);
        assert_eq!(out.max_pages, 0);
    }

    /// A write of 1 MiB travels in one request and lands whole.
    #[test]
    fn one_mib_write_in_one_request() {
        let mem = test_mem();
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::mounted(&mem, dir.path());
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        let (entry, open) = h.create(ROOT_ID, "big", libc::O_RDWR, 0o644).unwrap();
        let written = h.write(entry.nodeid, open.fh, 0, &data).unwrap();
        assert_eq!(written as usize, data.len());
        assert_eq!(std::fs::read(dir.path().join("big")).unwrap(), data);
    }

    #[test]
    fn init_never_offers_dax() {
        let mem = test_mem();
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::share(&mem, dir.path(), false, CacheMode::Always);
        let init = InitIn {
            major: KERNEL_VERSION,
            minor: 38,
            max_readahead: 0,
            flags: (FsOptions::INIT_EXT | FsOptions::ASYNC_READ).bits() as u32,
        };
        let init2 = InitIn2 { flags2: (FsOptions::PERFILE_DAX.bits() >> 32) as u32, unused: [0; 11] };
        let out: InitOut = obj(&h.call(Opcode::Init, 0, &[init.as_slice(), init2.as_slice()]).result().unwrap());
        let enabled = u64::from(out.flags) | (u64::from(out.flags2) << 32);
        assert_eq!(enabled & FsOptions::PERFILE_DAX.bits(), 0);
        assert_eq!(h.call(Opcode::SetupMapping, ROOT_ID, &[&[0u8; 40]]).result().unwrap_err(), libc::EINVAL);
    }

    #[test]
    fn entry_names() {
        let ok = |s: &str| check_entry_name(&CString::new(s).unwrap()).is_ok();
        assert!(ok("file"));
        assert!(ok("..."));
        assert!(ok(".hidden"));
        assert!(!ok(""));
        assert!(!ok("."));
        assert!(!ok(".."));
        assert!(!ok("a/b"));
        assert!(!ok("/"));
        assert!(!ok("../etc"));

        let lookup_ok = |s: &str| check_lookup_name(&CString::new(s).unwrap()).is_ok();
        assert!(lookup_ok(".."));
        assert!(lookup_ok("."));
        assert!(!lookup_ok("../x"));
        assert!(!lookup_ok(""));
    }

    #[test]
    fn write_flags() {
        let w = |f: i32| open_flags_write(f as u32);
        assert!(!w(libc::O_RDONLY));
        assert!(!w(libc::O_RDONLY | libc::O_NONBLOCK | libc::O_DIRECTORY));
        assert!(w(libc::O_WRONLY));
        assert!(w(libc::O_RDWR));
        assert!(w(libc::O_RDONLY | libc::O_TRUNC));
        assert!(w(libc::O_RDONLY | libc::O_CREAT));
        assert!(w(libc::O_TMPFILE | libc::O_RDWR));
    }

    // --- security: the guest never reaches outside the share ------------

    /// `<tmp>/share` is shared; `<tmp>/outside` holds a secret.
    fn share_with_outside() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let share = tmp.path().join("share");
        let outside = tmp.path().join("outside");
        fs::create_dir(&share).unwrap();
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("secret"), b"top secret").unwrap();
        fs::set_permissions(outside.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(tmp.path().join("sibling"), b"not shared").unwrap();
        (tmp, share, outside)
    }

    #[test]
    fn symlinks_are_not_followed_on_the_host() {
        let (_tmp, share, outside) = share_with_outside();
        let secret = outside.join("secret");
        std::os::unix::fs::symlink(&secret, share.join("abs")).unwrap();
        std::os::unix::fs::symlink("../outside/secret", share.join("rel")).unwrap();
        std::os::unix::fs::symlink(&outside, share.join("dirlink")).unwrap();
        let mem = test_mem();
        let mut h = Harness::mounted(&mem, &share);

        for name in ["abs", "rel"] {
            let e = h.lookup(ROOT_ID, name).unwrap();
            // The entry is the link itself, not its target.
            assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFLNK, "{name}");
            assert_eq!(e.attr.ino, fs::symlink_metadata(share.join(name)).unwrap().ino(), "{name}");
            assert_ne!(e.attr.ino, fs::metadata(&secret).unwrap().ino(), "{name}");
            // Its text goes to the guest, which resolves it in its own mount.
            assert!(h.readlink(e.nodeid).is_ok());

            // Nothing reaches the target.
            assert_eq!(h.open(e.nodeid, libc::O_RDONLY).unwrap_err(), libc::EACCES, "{name}");
            assert_eq!(h.open(e.nodeid, libc::O_WRONLY | libc::O_TRUNC).unwrap_err(), libc::EACCES, "{name}");
            let mut trunc = setattr_in(SetattrValid::SIZE.bits());
            trunc.size = 0;
            assert!(h.setattr(e.nodeid, trunc).is_err(), "{name}: truncate through a link");
            let mut chmod = setattr_in(SetattrValid::MODE.bits());
            chmod.mode = libc::S_IFREG | 0o666;
            let _ = h.setattr(e.nodeid, chmod);
            let mut chown = setattr_in(SetattrValid::UID.bits());
            chown.uid = 4321;
            let _ = h.setattr(e.nodeid, chown);
            assert!(h.setxattr(e.nodeid, "user.evil", b"1").is_err(), "{name}: user xattrs on a link");
            assert!(h.getxattr(e.nodeid, "user.evil", 64).is_err());
            assert!(h.opendir(e.nodeid).is_err());
        }
        let meta = fs::metadata(&secret).unwrap();
        assert_eq!(fs::read(&secret).unwrap(), b"top secret");
        assert_eq!(meta.mode() & 0o7777, 0o600);
        assert_eq!(meta.uid(), 0);
        assert_eq!(host_xattr(&secret, "user.evil"), None);

        // A link to a directory is not a directory to the server.
        let d = h.lookup(ROOT_ID, "dirlink").unwrap();
        assert_eq!(d.attr.mode & libc::S_IFMT, libc::S_IFLNK);
        assert_eq!(h.lookup(d.nodeid, "secret").unwrap_err(), libc::ENOTDIR);
        assert!(h.create(d.nodeid, "planted", libc::O_WRONLY | libc::O_CREAT, libc::S_IFREG | 0o644).is_err());
        assert!(h.mkdir(d.nodeid, "planted-dir", 0o755).is_err());
        assert!(h.symlink(d.nodeid, "planted-link", "x").is_err());
        assert!(h.unlink(d.nodeid, "secret").is_err());
        assert!(h.rename(d.nodeid, "secret", ROOT_ID, "stolen").is_err());
        assert!(h.opendir(d.nodeid).is_err());
        let fh = 1;
        assert!(h.readdir(d.nodeid, fh, 0, 4096).is_err());
        let names: Vec<_> = fs::read_dir(&outside).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec!["secret"]);
        assert!(!share.join("stolen").exists());
    }

    #[test]
    fn dotdot_at_the_root_stays_in_the_share() {
        let (tmp, share, _outside) = share_with_outside();
        fs::create_dir(share.join("sub")).unwrap();
        let mem = test_mem();
        let mut h = Harness::mounted(&mem, &share);
        let root_ino = fs::metadata(&share).unwrap().ino();

        let up = h.lookup(ROOT_ID, "..").unwrap();
        assert_eq!(up.attr.ino, root_ino, ".. of the root is the root");
        assert_eq!(h.lookup(ROOT_ID, ".").unwrap().attr.ino, root_ino);
        let upup = h.lookup(up.nodeid, "..").unwrap();
        assert_eq!(upup.attr.ino, root_ino);
        assert_eq!(h.lookup(up.nodeid, "sibling").unwrap_err(), libc::ENOENT);
        assert_eq!(h.lookup(up.nodeid, "outside").unwrap_err(), libc::ENOENT);
        assert!(tmp.path().join("sibling").exists());

        // `..` below the root is the parent, inside the share.
        let sub = h.lookup(ROOT_ID, "sub").unwrap();
        assert_eq!(h.lookup(sub.nodeid, "..").unwrap().attr.ino, root_ino);

        // Names with `/` are refused everywhere.
        assert_eq!(h.lookup(ROOT_ID, "../sibling").unwrap_err(), libc::EINVAL);
        assert_eq!(h.lookup(ROOT_ID, "../outside/secret").unwrap_err(), libc::EINVAL);
        assert_eq!(h.lookup(ROOT_ID, "sub/..").unwrap_err(), libc::EINVAL);
        assert_eq!(h.lookup(ROOT_ID, "/etc").unwrap_err(), libc::EINVAL);
    }

    #[test]
    fn entry_names_with_slashes_or_dots_are_refused() {
        let (tmp, share, _outside) = share_with_outside();
        fs::write(share.join("f"), b"f").unwrap();
        let mem = test_mem();
        let mut h = Harness::mounted(&mem, &share);
        let f = h.lookup(ROOT_ID, "f").unwrap();
        let creat = libc::O_WRONLY | libc::O_CREAT;
        for bad in ["../escape", "a/b", "/abs", ".", "..", "sub/"] {
            assert_eq!(h.create(ROOT_ID, bad, creat, libc::S_IFREG | 0o644).unwrap_err(), libc::EINVAL, "{bad}");
            assert_eq!(h.mkdir(ROOT_ID, bad, 0o755).unwrap_err(), libc::EINVAL, "{bad}");
            assert_eq!(h.mknod(ROOT_ID, bad, libc::S_IFIFO | 0o644, 0).unwrap_err(), libc::EINVAL, "{bad}");
            assert_eq!(h.symlink(ROOT_ID, bad, "f").unwrap_err(), libc::EINVAL, "{bad}");
            assert_eq!(h.link(f.nodeid, ROOT_ID, bad).unwrap_err(), libc::EINVAL, "{bad}");
            assert_eq!(h.rename(ROOT_ID, "f", ROOT_ID, bad).unwrap_err(), libc::EINVAL, "{bad}");
            assert_eq!(h.rename(ROOT_ID, bad, ROOT_ID, "g").unwrap_err(), libc::EINVAL, "{bad}");
            assert_eq!(h.unlink(ROOT_ID, bad).unwrap_err(), libc::EINVAL, "{bad}");
            assert_eq!(h.rmdir(ROOT_ID, bad).unwrap_err(), libc::EINVAL, "{bad}");
        }
        // Nothing appeared next to the share, and the share is as it was.
        let mut around: Vec<_> = fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        around.sort();
        assert_eq!(around, vec!["outside", "share", "sibling"]);
        let inside: Vec<_> = fs::read_dir(&share).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(inside, vec!["f"]);
    }

    #[test]
    fn device_nodes_and_fifos_are_never_opened() {
        let dir = tempfile::tempdir().unwrap();
        // /dev/null's and /dev/loop0's numbers; the FIFO would block an open.
        mknod_host(&dir.path().join("null"), libc::S_IFCHR, libc::makedev(1, 3));
        mknod_host(&dir.path().join("loop"), libc::S_IFBLK, libc::makedev(7, 0));
        mknod_host(&dir.path().join("fifo"), libc::S_IFIFO, 0);
        let mem = test_mem();
        let mut h = Harness::mounted(&mem, dir.path());

        for (name, kind) in [("null", libc::S_IFCHR), ("loop", libc::S_IFBLK), ("fifo", libc::S_IFIFO)] {
            let e = h.lookup(ROOT_ID, name).unwrap();
            assert_eq!(e.attr.mode & libc::S_IFMT, kind, "{name}: the guest sees the node");
            for flags in [libc::O_RDONLY, libc::O_WRONLY, libc::O_RDWR, libc::O_RDONLY | libc::O_NONBLOCK] {
                assert_eq!(h.open(e.nodeid, flags).unwrap_err(), libc::EACCES, "{name} {flags:#o}");
            }
            assert_eq!(h.opendir(e.nodeid).unwrap_err(), libc::EACCES, "{name}");
            let mut trunc = setattr_in(SetattrValid::SIZE.bits());
            trunc.size = 0;
            assert!(h.setattr(e.nodeid, trunc).is_err(), "{name}: truncate opens the node");
            // Handles are per inode: a guessed handle does not work either.
            assert_eq!(h.read(e.nodeid, 1, 0, 16).unwrap_err(), libc::EBADF, "{name}");
            // CREATE of an existing node (no O_EXCL) must not open it.
            assert!(h.create(ROOT_ID, name, libc::O_RDWR | libc::O_CREAT, libc::S_IFREG | 0o644).is_err(), "{name}");
            // Metadata still works.
            h.getattr(e.nodeid).unwrap();
        }

        // A node the guest makes (overlayfs whiteouts are 0:0 char devices)
        // exists on the host but is not opened either.
        let wh = h.mknod(ROOT_ID, "whiteout", libc::S_IFCHR | 0o600, 0).unwrap();
        assert!(fs::symlink_metadata(dir.path().join("whiteout")).is_ok());
        assert_eq!(h.open(wh.nodeid, libc::O_RDONLY).unwrap_err(), libc::EACCES);
        let mem_dev = h.mknod(ROOT_ID, "mem", libc::S_IFCHR | 0o600, libc::makedev(1, 1) as u32).unwrap();
        assert_eq!(h.open(mem_dev.nodeid, libc::O_RDWR).unwrap_err(), libc::EACCES);
    }

    #[test]
    fn inodes_and_handles_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), b"aaaa").unwrap();
        fs::write(dir.path().join("b"), b"bbbb").unwrap();
        let mem = test_mem();
        let mut h = Harness::mounted(&mem, dir.path());
        let a = h.lookup(ROOT_ID, "a").unwrap();
        let b = h.lookup(ROOT_ID, "b").unwrap();
        let fh_a = h.open(a.nodeid, libc::O_RDONLY).unwrap().fh;
        // a's handle with b's inode.
        assert_eq!(h.read(b.nodeid, fh_a, 0, 4).unwrap_err(), libc::EBADF);
        assert_eq!(h.read(a.nodeid, fh_a + 1000, 0, 4).unwrap_err(), libc::EBADF);
        for node in [0, 2_000_000, u64::MAX] {
            assert_eq!(h.getattr(node).unwrap_err(), libc::EBADF, "{node}");
            assert_eq!(h.lookup(node, "a").unwrap_err(), libc::EBADF, "{node}");
        }
    }

    // --- read-only sharing ---------------------------------------------

    /// Mode, size, content and `user.tag` xattr of one host file.
    type FileState = (u32, u64, Vec<u8>, Option<Vec<u8>>);

    /// The state of everything under `dir`, by relative path.
    fn snapshot(dir: &Path) -> BTreeMap<String, FileState> {
        let mut out = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                let meta = fs::symlink_metadata(&path).unwrap();
                let content = if meta.is_file() { fs::read(&path).unwrap() } else { Vec::new() };
                if meta.is_dir() {
                    stack.push(path.clone());
                }
                let key = path.strip_prefix(dir).unwrap().to_str().unwrap().to_owned();
                out.insert(key, (meta.mode(), meta.len(), content, host_xattr(&path, "user.tag")));
            }
        }
        out
    }

    #[test]
    fn read_only_share_refuses_every_change() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("f"), b"content").unwrap();
        fs::create_dir(dir.path().join("d")).unwrap();
        fs::write(dir.path().join("d/inner"), b"i").unwrap();
        std::os::unix::fs::symlink("f", dir.path().join("l")).unwrap();
        let fpath = CString::new(dir.path().join("f").to_str().unwrap()).unwrap();
        // SAFETY: valid NUL-terminated strings and a value of the given length.
        let rc = unsafe { libc::setxattr(fpath.as_ptr(), c"user.tag".as_ptr(), b"v".as_ptr().cast(), 1, 0) };
        assert_eq!(rc, 0);
        let before = snapshot(dir.path());

        let mem = test_mem();
        let mut h = Harness::share(&mem, dir.path(), true, CacheMode::Auto);
        h.init().unwrap();

        // Reading works.
        let f = h.lookup(ROOT_ID, "f").unwrap();
        let d = h.lookup(ROOT_ID, "d").unwrap();
        let l = h.lookup(ROOT_ID, "l").unwrap();
        let fh = h.open(f.nodeid, libc::O_RDONLY).unwrap().fh;
        assert_eq!(h.read(f.nodeid, fh, 0, 100).unwrap(), b"content");
        assert_eq!(h.list_dir(ROOT_ID), vec!["d", "f", "l"]);
        assert_eq!(h.readlink(l.nodeid).unwrap(), b"f");
        assert_eq!(h.getxattr(f.nodeid, "user.tag", 16).unwrap(), b"v");
        assert!(!h.listxattr(f.nodeid, 256).unwrap().is_empty());
        h.statfs(ROOT_ID).unwrap();
        h.access(f.nodeid, libc::R_OK).unwrap();

        // Every change is refused with EROFS.
        let creat = libc::O_WRONLY | libc::O_CREAT;
        assert_eq!(h.write(f.nodeid, fh, 0, b"XX").unwrap_err(), erofs(), "write");
        assert_eq!(h.create(ROOT_ID, "new", creat, libc::S_IFREG | 0o644).unwrap_err(), erofs(), "create");
        assert_eq!(h.create(ROOT_ID, "f", libc::O_RDONLY, libc::S_IFREG | 0o644).unwrap_err(), erofs(), "create existing");
        assert_eq!(h.mkdir(ROOT_ID, "nd", 0o755).unwrap_err(), erofs(), "mkdir");
        assert_eq!(h.mknod(ROOT_ID, "nod", libc::S_IFIFO | 0o644, 0).unwrap_err(), erofs(), "mknod");
        assert_eq!(h.unlink(ROOT_ID, "f").unwrap_err(), erofs(), "unlink");
        assert_eq!(h.unlink(d.nodeid, "inner").unwrap_err(), erofs(), "unlink in a subdir");
        assert_eq!(h.rmdir(ROOT_ID, "d").unwrap_err(), erofs(), "rmdir");
        assert_eq!(h.rename(ROOT_ID, "f", ROOT_ID, "g").unwrap_err(), erofs(), "rename");
        assert_eq!(h.rename2(ROOT_ID, "f", ROOT_ID, "l", libc::RENAME_EXCHANGE).unwrap_err(), erofs(), "rename2");
        assert_eq!(h.link(f.nodeid, ROOT_ID, "hl").unwrap_err(), erofs(), "link");
        assert_eq!(h.symlink(ROOT_ID, "sl", "f").unwrap_err(), erofs(), "symlink");
        for valid in [
            SetattrValid::SIZE,
            SetattrValid::MODE,
            SetattrValid::UID | SetattrValid::GID,
            SetattrValid::MTIME_NOW | SetattrValid::ATIME_NOW,
        ] {
            let mut arg = setattr_in(valid.bits());
            arg.mode = libc::S_IFREG | 0o777;
            assert_eq!(h.setattr(f.nodeid, arg).unwrap_err(), erofs(), "setattr {valid:?}");
        }
        assert_eq!(h.setxattr(f.nodeid, "user.tag", b"changed").unwrap_err(), erofs(), "setxattr");
        assert_eq!(h.removexattr(f.nodeid, "user.tag").unwrap_err(), erofs(), "removexattr");
        assert_eq!(h.fallocate(f.nodeid, fh, 0, 1 << 20).unwrap_err(), erofs(), "fallocate");
        for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_RDONLY | libc::O_TRUNC, libc::O_WRONLY | libc::O_APPEND] {
            assert_eq!(h.open(f.nodeid, flags).unwrap_err(), erofs(), "open {flags:#o}");
        }
        assert_eq!(h.access(f.nodeid, libc::W_OK).unwrap_err(), erofs(), "access W_OK");

        assert_eq!(snapshot(dir.path()), before, "the host directory changed");
    }

    #[test]
    fn writable_share_allows_fallocate() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("f"), b"").unwrap();
        let mem = test_mem();
        let mut h = Harness::mounted(&mem, dir.path());
        let f = h.lookup(ROOT_ID, "f").unwrap();
        let fh = h.open(f.nodeid, libc::O_RDWR).unwrap().fh;
        h.fallocate(f.nodeid, fh, 0, 1 << 16).unwrap();
        assert_eq!(fs::metadata(dir.path().join("f")).unwrap().len(), 1 << 16);
    }

    // --- the guest caller's identity -----------------------------------

    /// This thread's effective ids and effective and permitted capabilities.
    fn thread_creds() -> (u32, u32, caps::CapsHashSet, caps::CapsHashSet) {
        // SAFETY: geteuid and getegid only read this thread's credentials.
        let ids = unsafe { (libc::geteuid(), libc::getegid()) };
        (ids.0, ids.1, caps::read(None, caps::CapSet::Effective).unwrap(), caps::read(None, caps::CapSet::Permitted).unwrap())
    }

    /// The guest kernel checks permissions itself (virtio-fs mounts with
    /// `default_permissions`) and sends a request only when its caller may
    /// make it, capabilities included: a uid-1000 caller the guest let
    /// through (CAP_DAC_OVERRIDE, as runc's containers get) creates entries
    /// in a root-owned 0755 directory of the share. The entries belong to
    /// the caller on the host, and the worker is root with all its
    /// capabilities again after each request.
    #[test]
    fn guest_callers_dac_capabilities_count_in_root_owned_dirs() {
        let (tmp, share, _outside) = share_with_outside();
        let locked = share.join("locked");
        fs::create_dir(&locked).unwrap();
        fs::set_permissions(&locked, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(locked.join("existing"), b"").unwrap();
        fs::set_permissions(locked.join("existing"), fs::Permissions::from_mode(0o644)).unwrap();
        let mem = test_mem();
        let mut h = Harness::mounted(&mem, &share);
        let before = thread_creds();
        let d = h.lookup(ROOT_ID, "locked").unwrap();
        h.uid = 1000;
        h.gid = 1000;

        let creat = libc::O_WRONLY | libc::O_CREAT;
        let (f, open) = h.create(d.nodeid, "file", creat, libc::S_IFREG | 0o644).unwrap();
        assert_eq!(h.write(f.nodeid, open.fh, 0, b"hi").unwrap(), 2);
        assert_eq!(thread_creds(), before, "after CREATE");
        h.mkdir(d.nodeid, "dir", 0o755).unwrap();
        h.symlink(d.nodeid, "link", "file").unwrap();
        h.mknod(d.nodeid, "fifo", libc::S_IFIFO | 0o644, 0).unwrap();
        assert_eq!(thread_creds(), before, "after MKDIR, SYMLINK, MKNOD");
        for name in ["file", "dir", "link", "fifo"] {
            let meta = fs::symlink_metadata(locked.join(name)).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (1000, 1000), "{name}");
        }
        assert_eq!(fs::read(locked.join("file")).unwrap(), b"hi");
        // CREATE without O_EXCL of a root-owned 0644 file opens it.
        let (e, _) = h.create(d.nodeid, "existing", creat, libc::S_IFREG | 0o644).unwrap();
        assert_eq!(e.attr.uid, 0);

        // The same caller is still held to the share: names are checked
        // and nothing appears outside it.
        for bad in ["../escape", "a/b", ".."] {
            assert_eq!(h.create(d.nodeid, bad, creat, libc::S_IFREG | 0o644).unwrap_err(), libc::EINVAL, "{bad}");
            assert_eq!(h.mkdir(d.nodeid, bad, 0o755).unwrap_err(), libc::EINVAL, "{bad}");
        }
        let mut around: Vec<_> = fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        around.sort();
        assert_eq!(around, vec!["outside", "share", "sibling"]);
        assert_eq!(thread_creds(), before, "after refused requests");
    }
}
