//! Test fixtures: guest memory, a driver-side virtqueue built with
//! virtio-queue's `MockSplitQueue`, and a FUSE client that writes real
//! requests into descriptors, runs them through [`process_queue`] and
//! decodes the replies.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation, clippy::cast_possible_wrap, clippy::cast_sign_loss)]

use std::mem::size_of;
use std::path::Path;

use fuse_backend_rs::abi::fuse_abi::{
    AttrOut, CreateIn, EntryOut, FallocateIn, GetattrIn, GetxattrIn, GetxattrOut, InHeader, InitIn, InitOut, LinkIn, MkdirIn, MknodIn,
    Opcode, OpenIn, OpenOut, OutHeader, ReadIn, ReleaseIn, Rename2In, RenameIn, SetattrIn, SetxattrIn, StatfsOut, WriteIn, WriteOut,
    KERNEL_VERSION,
};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::{Descriptor as SplitDescriptor, VirtqUsedElem};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::backend::{build_server, FsServer};
use super::request::process_queue;
use super::stats::RequestStats;
use super::{CacheMode, FsConfig, FsError};

/// Size of the test guest memory.
pub(crate) const MEM_SIZE: usize = 8 << 20;
/// Size of the test virtqueue.
pub(crate) const QSIZE: u16 = 64;
/// The test queue's used ring.
pub(crate) const USED_ADDR: u64 = 0x1_0000;
/// Where requests are written.
pub(crate) const REQ_ADDR: u64 = 0x10_0000;
/// Where reply buffers start.
pub(crate) const REPLY_ADDR: u64 = 0x40_0000;
/// Default reply buffer size (room for a 128 KiB read).
pub(crate) const REPLY_LEN: u32 = 0x2_1000;

/// FUSE minor version the test client speaks (Linux 6.1 sends 7.36+; the
/// server answers in its own 7.33 layout either way).
const CLIENT_MINOR: u32 = 33;

pub(crate) fn test_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

pub(crate) fn fs_config(tag: &str, dir: &Path, read_only: bool, cache: CacheMode) -> FsConfig {
    FsConfig { tag: tag.to_owned(), shared_dir: dir.to_path_buf(), read_only, cache }
}

/// A FUSE request header for `args_len` bytes of arguments.
pub(crate) fn in_header(opcode: u32, unique: u64, nodeid: u64, args_len: usize) -> InHeader {
    InHeader { len: (size_of::<InHeader>() + args_len) as u32, opcode, unique, nodeid, uid: 0, gid: 0, pid: 1, padding: 0 }
}

/// A name as FUSE sends it: NUL terminated.
pub(crate) fn cname(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.push(0);
    v
}

/// A decoded reply.
#[derive(Debug)]
pub(crate) struct Reply {
    pub header: OutHeader,
    pub body: Vec<u8>,
}

impl Reply {
    /// The body on success, the (positive) errno otherwise.
    pub fn result(self) -> Result<Vec<u8>, i32> {
        if self.header.error == 0 {
            Ok(self.body)
        } else {
            Err(-self.header.error)
        }
    }
}

pub(crate) fn obj<T: ByteValued>(body: &[u8]) -> T {
    assert!(body.len() >= size_of::<T>(), "reply body too short: {} < {}", body.len(), size_of::<T>());
    T::from_slice(&body[..size_of::<T>()]).copied().unwrap()
}

/// One READDIR(PLUS) entry.
#[derive(Debug, Clone)]
pub(crate) struct DirItem {
    pub name: String,
    pub ino: u64,
    pub off: u64,
    pub type_: u32,
    pub entry: Option<EntryOut>,
}

/// A guest-side FUSE client over a mock split virtqueue.
pub(crate) struct Harness<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub vq: MockSplitQueue<'a, GuestMemoryMmap>,
    pub queue: Queue,
    pub server: FsServer,
    /// Credentials put in request headers.
    pub uid: u32,
    pub gid: u32,
    /// What the device counted.
    pub stats: RequestStats,
    unique: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl<'a> Harness<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, server: FsServer) -> Self {
        let vq = MockSplitQueue::create(mem, GuestAddress(0), QSIZE);
        // The mock reserves `len` bytes for the available ring's entries
        // (they take `2 * len`) and puts the used ring right after, so the
        // upper half of its available ring overlaps the used ring. Use the
        // mock's descriptor table and available ring, and our own used ring.
        let mut queue = Queue::new(QSIZE).unwrap();
        queue.set_size(QSIZE);
        queue.set_desc_table_address(Some(vq.desc_table_addr().0 as u32), Some(0));
        queue.set_avail_ring_address(Some(vq.avail_addr().0 as u32), Some(0));
        queue.set_used_ring_address(Some(USED_ADDR as u32), Some(0));
        queue.set_ready(true);
        assert!(queue.is_valid(mem));
        Harness { mem, vq, queue, server, uid: 0, gid: 0, stats: RequestStats::default(), unique: 0, next_desc: 0, avail_idx: 0 }
    }

    /// A harness over a share of `dir`, without INIT.
    pub fn share(mem: &'a GuestMemoryMmap, dir: &Path, read_only: bool, cache: CacheMode) -> Self {
        // Requests run on this thread: keep the backend's umask change here,
        // as the worker thread does.
        super::event_loop::isolate_umask();
        let cfg = fs_config("test", dir, read_only, cache);
        let root = cfg.validate().unwrap();
        Self::new(mem, build_server(&cfg, &root).unwrap())
    }

    /// A harness over a share of `dir`, after INIT.
    pub fn mounted(mem: &'a GuestMemoryMmap, dir: &Path) -> Self {
        let mut h = Self::share(mem, dir, false, CacheMode::Auto);
        h.init().unwrap();
        h
    }

    /// Puts a chain of `(addr, len, device-writable)` descriptors on the
    /// available ring; returns its head index.
    pub fn push_chain(&mut self, descs: &[(u64, u32, bool)]) -> u16 {
        assert!(!descs.is_empty() && descs.len() < usize::from(QSIZE));
        let indices: Vec<u16> = (0..descs.len() as u16).map(|i| (self.next_desc + i) % QSIZE).collect();
        self.next_desc = (self.next_desc + descs.len() as u16) % QSIZE;
        for (pos, &(addr, len, writable)) in descs.iter().enumerate() {
            let mut flags = if writable { VRING_DESC_F_WRITE as u16 } else { 0 };
            let next = if pos + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
                indices[pos + 1]
            } else {
                0
            };
            let desc = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            self.vq.desc_table().store(indices[pos], desc).unwrap();
        }
        self.push_head(indices[0]);
        indices[0]
    }

    /// Publishes `head` on the available ring.
    pub fn push_head(&mut self, head: u16) {
        let slot = usize::from(self.avail_idx % QSIZE);
        self.vq.avail().ring().ref_at(slot).unwrap().store(head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.vq.avail().idx().store(self.avail_idx);
    }

    /// Runs the device's queue processing once.
    pub fn process(&mut self) -> Result<bool, FsError> {
        process_queue(&self.server, self.mem, &mut self.queue, &mut self.stats)
    }

    /// The used ring's index.
    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED_ADDR + 2)).unwrap()
    }

    /// The used element `back` places back from the newest: (head, length).
    pub fn used(&self, back: u16) -> (u32, u32) {
        let idx = self.used_idx().wrapping_sub(1 + back) % QSIZE;
        let elem: VirtqUsedElem = self.mem.read_obj(GuestAddress(USED_ADDR + 4 + 8 * u64::from(idx))).unwrap();
        (elem.id(), elem.len())
    }

    pub fn next_unique(&mut self) -> u64 {
        self.unique += 1;
        self.unique
    }

    /// Sends raw request bytes with a reply buffer of `reply_len` bytes;
    /// returns the used length and the reply buffer's contents.
    pub fn send_raw(&mut self, request: &[u8], reply_len: u32) -> (u32, Vec<u8>) {
        self.mem.write_slice(request, GuestAddress(REQ_ADDR)).unwrap();
        let mut descs = vec![(REQ_ADDR, request.len() as u32, false)];
        if reply_len > 0 {
            // Zero the reply area so stale replies cannot pass for new ones.
            self.mem.write_slice(&vec![0u8; reply_len as usize], GuestAddress(REPLY_ADDR)).unwrap();
            descs.push((REPLY_ADDR, reply_len, true));
        }
        let head = self.push_chain(&descs);
        let before = self.used_idx();
        self.process().unwrap();
        assert_eq!(self.used_idx(), before.wrapping_add(1), "the chain was not returned");
        let (id, len) = self.used(0);
        assert_eq!(id, u32::from(head));
        let mut reply = vec![0u8; reply_len as usize];
        self.mem.read_slice(&mut reply, GuestAddress(REPLY_ADDR)).unwrap();
        (len, reply)
    }

    /// Sends a request made of `args` after a header; decodes the reply.
    pub fn call_with(&mut self, opcode: Opcode, nodeid: u64, args: &[&[u8]], reply_len: u32) -> Reply {
        let args_len: usize = args.iter().map(|a| a.len()).sum();
        let unique = self.next_unique();
        let mut hdr = in_header(opcode as u32, unique, nodeid, args_len);
        hdr.uid = self.uid;
        hdr.gid = self.gid;
        let mut req = hdr.as_slice().to_vec();
        for a in args {
            req.extend_from_slice(a);
        }
        let (used_len, reply) = self.send_raw(&req, reply_len);
        assert!(used_len as usize >= size_of::<OutHeader>(), "no reply to {opcode:?} (used {used_len})");
        let header: OutHeader = obj(&reply);
        assert_eq!(header.unique, unique, "reply to another request");
        assert_eq!(header.len, used_len, "header length and used length differ");
        let body = reply[size_of::<OutHeader>()..used_len as usize].to_vec();
        Reply { header, body }
    }

    pub fn call(&mut self, opcode: Opcode, nodeid: u64, args: &[&[u8]]) -> Reply {
        self.call_with(opcode, nodeid, args, REPLY_LEN)
    }

    // --- typed requests -------------------------------------------------

    pub fn init(&mut self) -> Result<InitOut, i32> {
        let init = InitIn { major: KERNEL_VERSION, minor: CLIENT_MINOR, max_readahead: 0x2_0000, flags: 0 };
        self.call(Opcode::Init, 0, &[init.as_slice()]).result().map(|b| obj(&b))
    }

    /// A lookup; a negative entry (node 0) is ENOENT, as the guest takes it.
    pub fn lookup(&mut self, parent: u64, name: &str) -> Result<EntryOut, i32> {
        let entry: EntryOut = self.call(Opcode::Lookup, parent, &[&cname(name)]).result().map(|b| obj(&b))?;
        if entry.nodeid == 0 {
            return Err(libc::ENOENT);
        }
        Ok(entry)
    }

    pub fn forget(&mut self, node: u64, nlookup: u64) -> u32 {
        let arg = fuse_backend_rs::abi::fuse_abi::ForgetIn { nlookup };
        let unique = self.next_unique();
        let mut req = in_header(Opcode::Forget as u32, unique, node, size_of_val(&arg)).as_slice().to_vec();
        req.extend_from_slice(arg.as_slice());
        self.send_raw(&req, 0).0
    }

    pub fn getattr(&mut self, node: u64) -> Result<AttrOut, i32> {
        let arg = GetattrIn::default();
        self.call(Opcode::Getattr, node, &[arg.as_slice()]).result().map(|b| obj(&b))
    }

    pub fn setattr(&mut self, node: u64, arg: SetattrIn) -> Result<AttrOut, i32> {
        self.call(Opcode::Setattr, node, &[arg.as_slice()]).result().map(|b| obj(&b))
    }

    pub fn mkdir(&mut self, parent: u64, name: &str, mode: u32) -> Result<EntryOut, i32> {
        let arg = MkdirIn { mode, umask: 0o022 };
        self.call(Opcode::Mkdir, parent, &[arg.as_slice(), &cname(name)]).result().map(|b| obj(&b))
    }

    pub fn mknod(&mut self, parent: u64, name: &str, mode: u32, rdev: u32) -> Result<EntryOut, i32> {
        let arg = MknodIn { mode, rdev, umask: 0, padding: 0 };
        self.call(Opcode::Mknod, parent, &[arg.as_slice(), &cname(name)]).result().map(|b| obj(&b))
    }

    pub fn create(&mut self, parent: u64, name: &str, flags: i32, mode: u32) -> Result<(EntryOut, OpenOut), i32> {
        let arg = CreateIn { flags: flags as u32, mode, umask: 0o022, fuse_flags: 0 };
        self.call(Opcode::Create, parent, &[arg.as_slice(), &cname(name)]).result().map(|b| {
            let entry: EntryOut = obj(&b);
            let open: OpenOut = obj(&b[size_of::<EntryOut>()..]);
            (entry, open)
        })
    }

    pub fn open(&mut self, node: u64, flags: i32) -> Result<OpenOut, i32> {
        let arg = OpenIn { flags: flags as u32, fuse_flags: 0 };
        self.call(Opcode::Open, node, &[arg.as_slice()]).result().map(|b| obj(&b))
    }

    pub fn opendir(&mut self, node: u64) -> Result<OpenOut, i32> {
        let arg = OpenIn { flags: libc::O_RDONLY as u32, fuse_flags: 0 };
        self.call(Opcode::Opendir, node, &[arg.as_slice()]).result().map(|b| obj(&b))
    }

    pub fn release(&mut self, node: u64, fh: u64) -> Result<(), i32> {
        let arg = ReleaseIn { fh, ..Default::default() };
        self.call(Opcode::Release, node, &[arg.as_slice()]).result().map(|_| ())
    }

    pub fn releasedir(&mut self, node: u64, fh: u64) -> Result<(), i32> {
        let arg = ReleaseIn { fh, ..Default::default() };
        self.call(Opcode::Releasedir, node, &[arg.as_slice()]).result().map(|_| ())
    }

    pub fn read(&mut self, node: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
        let arg = ReadIn { fh, offset, size, ..Default::default() };
        self.call(Opcode::Read, node, &[arg.as_slice()]).result()
    }

    pub fn write(&mut self, node: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32, i32> {
        let arg = WriteIn { fh, offset, size: data.len() as u32, ..Default::default() };
        self.call(Opcode::Write, node, &[arg.as_slice(), data]).result().map(|b| obj::<WriteOut>(&b).size)
    }

    pub fn fallocate(&mut self, node: u64, fh: u64, offset: u64, length: u64) -> Result<(), i32> {
        let arg = FallocateIn { fh, offset, length, mode: 0, padding: 0 };
        self.call(Opcode::Fallocate, node, &[arg.as_slice()]).result().map(|_| ())
    }

    fn parse_dirents(body: &[u8], plus: bool) -> Vec<DirItem> {
        let mut items = Vec::new();
        let mut at = 0;
        while at < body.len() {
            let entry = if plus {
                let e: EntryOut = obj(&body[at..]);
                at += size_of::<EntryOut>();
                Some(e)
            } else {
                None
            };
            let ino = u64::from_ne_bytes(body[at..at + 8].try_into().unwrap());
            let off = u64::from_ne_bytes(body[at + 8..at + 16].try_into().unwrap());
            let namelen = u32::from_ne_bytes(body[at + 16..at + 20].try_into().unwrap()) as usize;
            let type_ = u32::from_ne_bytes(body[at + 20..at + 24].try_into().unwrap());
            let name = String::from_utf8(body[at + 24..at + 24 + namelen].to_vec()).unwrap();
            at += (24 + namelen + 7) & !7;
            items.push(DirItem { name, ino, off, type_, entry });
        }
        items
    }

    pub fn readdir(&mut self, node: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<DirItem>, i32> {
        let arg = ReadIn { fh, offset, size, ..Default::default() };
        self.call(Opcode::Readdir, node, &[arg.as_slice()]).result().map(|b| Self::parse_dirents(&b, false))
    }

    pub fn readdirplus(&mut self, node: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<DirItem>, i32> {
        let arg = ReadIn { fh, offset, size, ..Default::default() };
        self.call(Opcode::Readdirplus, node, &[arg.as_slice()]).result().map(|b| Self::parse_dirents(&b, true))
    }

    /// Lists a whole directory with READDIR, page by page.
    pub fn list_dir(&mut self, node: u64) -> Vec<String> {
        let fh = self.opendir(node).unwrap().fh;
        let mut names = Vec::new();
        let mut offset = 0;
        loop {
            let items = self.readdir(node, fh, offset, 4096).unwrap();
            let Some(last) = items.last() else { break };
            offset = last.off;
            names.extend(items.into_iter().map(|i| i.name));
        }
        self.releasedir(node, fh).unwrap();
        names.sort();
        names
    }

    pub fn unlink(&mut self, parent: u64, name: &str) -> Result<(), i32> {
        self.call(Opcode::Unlink, parent, &[&cname(name)]).result().map(|_| ())
    }

    pub fn rmdir(&mut self, parent: u64, name: &str) -> Result<(), i32> {
        self.call(Opcode::Rmdir, parent, &[&cname(name)]).result().map(|_| ())
    }

    pub fn rename(&mut self, olddir: u64, old: &str, newdir: u64, new: &str) -> Result<(), i32> {
        let arg = RenameIn { newdir };
        self.call(Opcode::Rename, olddir, &[arg.as_slice(), &cname(old), &cname(new)]).result().map(|_| ())
    }

    pub fn rename2(&mut self, olddir: u64, old: &str, newdir: u64, new: &str, flags: u32) -> Result<(), i32> {
        let arg = Rename2In { newdir, flags, padding: 0 };
        self.call(Opcode::Rename2, olddir, &[arg.as_slice(), &cname(old), &cname(new)]).result().map(|_| ())
    }

    pub fn symlink(&mut self, parent: u64, name: &str, target: &str) -> Result<EntryOut, i32> {
        self.call(Opcode::Symlink, parent, &[&cname(name), &cname(target)]).result().map(|b| obj(&b))
    }

    pub fn readlink(&mut self, node: u64) -> Result<Vec<u8>, i32> {
        self.call(Opcode::Readlink, node, &[]).result()
    }

    pub fn link(&mut self, node: u64, newparent: u64, name: &str) -> Result<EntryOut, i32> {
        let arg = LinkIn { oldnodeid: node };
        self.call(Opcode::Link, newparent, &[arg.as_slice(), &cname(name)]).result().map(|b| obj(&b))
    }

    pub fn setxattr(&mut self, node: u64, name: &str, value: &[u8]) -> Result<(), i32> {
        let arg = SetxattrIn { size: value.len() as u32, flags: 0 };
        self.call(Opcode::Setxattr, node, &[arg.as_slice(), &cname(name), value]).result().map(|_| ())
    }

    pub fn getxattr(&mut self, node: u64, name: &str, size: u32) -> Result<Vec<u8>, i32> {
        let arg = GetxattrIn { size, padding: 0 };
        self.call(Opcode::Getxattr, node, &[arg.as_slice(), &cname(name)]).result()
    }

    /// GETXATTR with size 0: the value's length.
    pub fn getxattr_len(&mut self, node: u64, name: &str) -> Result<u32, i32> {
        self.getxattr(node, name, 0).map(|b| obj::<GetxattrOut>(&b).size)
    }

    pub fn listxattr(&mut self, node: u64, size: u32) -> Result<Vec<u8>, i32> {
        let arg = GetxattrIn { size, padding: 0 };
        self.call(Opcode::Listxattr, node, &[arg.as_slice()]).result()
    }

    pub fn removexattr(&mut self, node: u64, name: &str) -> Result<(), i32> {
        self.call(Opcode::Removexattr, node, &[&cname(name)]).result().map(|_| ())
    }

    pub fn statfs(&mut self, node: u64) -> Result<StatfsOut, i32> {
        self.call(Opcode::Statfs, node, &[]).result().map(|b| obj(&b))
    }

    pub fn access(&mut self, node: u64, mask: i32) -> Result<(), i32> {
        let arg = fuse_backend_rs::abi::fuse_abi::AccessIn { mask: mask as u32, padding: 0 };
        self.call(Opcode::Access, node, &[arg.as_slice()]).result().map(|_| ())
    }
}

/// A SETATTR argument with `valid` bits set.
pub(crate) fn setattr_in(valid: u32) -> SetattrIn {
    SetattrIn { valid, ..Default::default() }
}
