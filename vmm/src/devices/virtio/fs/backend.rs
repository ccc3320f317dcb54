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
//! - no DAX: mapping requests are refused.

use std::ffi::CStr;
use std::io;
use std::path::Path;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn};
use fuse_backend_rs::abi::virtio_fs::RemovemappingOne;
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, FsOptions, GetxattrReply, ListxattrReply,
    OpenOptions, SetattrValid, ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::FsCacheReqHandler;

use super::defs::{READDIR_SIZE_MAX, XATTR_SIZE_MAX};
use super::{CacheMode, FsConfig, FsError};

/// The FUSE server the device runs.
pub(crate) type FsServer = Server<ShareFs<PassthroughFs>>;

/// How long the guest keeps attributes and names in [`CacheMode::Auto`].
const AUTO_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the guest keeps attributes and names in [`CacheMode::Always`].
const ALWAYS_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);

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
    let root_str = root
        .to_str()
        .ok_or_else(|| FsError::SharedDirNotUtf8(root.to_path_buf()))?;
    let fs =
        PassthroughFs::<()>::new(passthrough_config(root_str, config.cache)).map_err(|source| {
            FsError::Backend {
                path: root.to_path_buf(),
                source,
            }
        })?;
    Ok(Server::new(ShareFs::new(fs, config.read_only)))
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

/// The guard around the passthrough file system (see the module docs).
#[derive(Debug)]
pub(crate) struct ShareFs<F> {
    inner: F,
    read_only: bool,
}

impl<F> ShareFs<F> {
    pub(crate) fn new(inner: F, read_only: bool) -> Self {
        Self { inner, read_only }
    }

    fn writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(errno(libc::EROFS))
        } else {
            Ok(())
        }
    }
}

impl<F: FileSystem<Inode = u64, Handle = u64>> ShareFs<F> {
    /// The "nodev" rule: only regular files and directories are opened.
    fn check_openable(&self, ctx: &Context, inode: u64) -> io::Result<()> {
        let (st, _) = self.inner.getattr(ctx, inode, None)?;
        match st.st_mode & libc::S_IFMT {
            libc::S_IFREG | libc::S_IFDIR => Ok(()),
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
        self.inner.lookup(ctx, parent, name)
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        self.inner.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        self.inner.batch_forget(ctx, requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        attr: stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.writable()?;
        self.inner.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.writable()?;
        check_entry_name(name)?;
        self.inner.symlink(ctx, linkname, parent, name)
    }

    fn mknod(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.writable()?;
        check_entry_name(name)?;
        self.inner.mknod(ctx, inode, name, mode, rdev, umask)
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.writable()?;
        check_entry_name(name)?;
        self.inner.mkdir(ctx, parent, name, mode, umask)
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

    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.writable()?;
        check_entry_name(oldname)?;
        check_entry_name(newname)?;
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        self.writable()?;
        check_entry_name(newname)?;
        self.inner.link(ctx, inode, newparent, newname)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        if open_flags_write(flags) {
            self.writable()?;
        }
        self.check_openable(ctx, inode)?;
        self.inner.open(ctx, inode, flags, fuse_flags)
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
        self.inner.create(ctx, parent, name, args)
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
        self.inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
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
        self.inner.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.writable()?;
        self.inner
            .fallocate(ctx, inode, handle, mode, offset, length)
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
        self.inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }

    fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        self.inner.statfs(ctx, inode)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.writable()?;
        self.inner.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.inner
            .getxattr(ctx, inode, name, size.min(XATTR_SIZE_MAX))
    }

    fn listxattr(&self, ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        self.inner.listxattr(ctx, inode, size.min(XATTR_SIZE_MAX))
    }

    fn removexattr(&self, ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        self.inner.removexattr(ctx, inode, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
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
        self.inner.readdir(
            ctx,
            inode,
            handle,
            size.min(READDIR_SIZE_MAX),
            offset,
            add_entry,
        )
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
        self.inner.readdirplus(
            ctx,
            inode,
            handle,
            size.min(READDIR_SIZE_MAX),
            offset,
            add_entry,
        )
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

    fn lseek(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }

    fn getlk(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<FileLock> {
        self.inner.getlk(ctx, inode, handle, owner, lock, flags)
    }

    fn setlk(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.inner.setlk(ctx, inode, handle, owner, lock, flags)
    }

    // SETLKW would block the worker until another holder lets go: refused,
    // the guest kernel then keeps locks locally (as without POSIX_LOCKS).
    fn setlkw(
        &self,
        _ctx: &Context,
        _inode: u64,
        _handle: u64,
        _owner: u64,
        _lock: FileLock,
        _flags: u32,
    ) -> io::Result<()> {
        Err(errno(libc::ENOSYS))
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;

    use super::*;

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
}
