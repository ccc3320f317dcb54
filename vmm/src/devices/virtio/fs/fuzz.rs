//! Fuzz harness for the virtio-fs device (see [`crate::fuzzing`]).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_possible_truncation)]

use std::mem::size_of;
use std::path::PathBuf;
use std::sync::Mutex;

use fuse_backend_rs::abi::fuse_abi::{InHeader, InitIn, Opcode, OutHeader, KERNEL_VERSION};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::Queue;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::backend::{build_server, FsServer};
use super::request::process_queue;
use super::stats::RequestStats;
use super::{CacheMode, FsConfig};
use crate::fuzzing::{queue_layout, ready_queue, Input};

const MEM_SIZE: usize = 4 << 20;
const QSIZE: u16 = 16;
const REQ_ADDR: u64 = 0x10_0000;
const REPLY_ADDR: u64 = 0x20_0000;
/// The largest reply buffer (room for a 1 MiB READ or READDIR).
const REPLY_MAX: u32 = 0x10_1000;

/// What the harness keeps between inputs: guest memory, a queue, and the
/// scratch share (its contents carry over; the server does not).
struct FuseRig {
    mem: GuestMemoryMmap,
    queue: Queue,
    avail_idx: u16,
    config: FsConfig,
    root: PathBuf,
    unique: u64,
}

static RIG: Mutex<Option<FuseRig>> = Mutex::new(None);

fn rig() -> FuseRig {
    // The worker thread's umask handling, on this thread.
    super::event_loop::isolate_umask();
    let dir = std::env::temp_dir().join(format!("carapace-fuzz-fs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let share = dir.join("share");
    std::fs::create_dir_all(share.join("dir")).expect("scratch share");
    std::fs::write(share.join("file"), b"0123456789").expect("file");
    std::fs::write(dir.join("outside"), b"secret").expect("file");
    // A symlink out of the share: the server must never follow it.
    let _ = std::os::unix::fs::symlink("../outside", share.join("link"));
    let config = FsConfig { tag: "fuzz".into(), shared_dir: share, read_only: false, cache: CacheMode::Auto };
    let root = config.validate().expect("share");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    let queue = ready_queue(&mem, 0, QSIZE, false).expect("queue");
    FuseRig { mem, queue, avail_idx: 0, config, root, unique: 0 }
}

impl FuseRig {
    /// Publishes one chain: readable pieces of the request, then one
    /// writable reply buffer (if `reply_len` > 0). Returns the head.
    fn push(&mut self, pieces: &[(u64, u32)], reply_len: u32) -> u16 {
        let (desc, avail, _) = queue_layout(0, QSIZE);
        let mut descs: Vec<(u64, u32, u16)> = pieces.iter().map(|&(a, l)| (a, l, 0)).collect();
        if reply_len > 0 {
            descs.push((REPLY_ADDR, reply_len, VRING_DESC_F_WRITE as u16));
        }
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let flags = if last { flags } else { flags | VRING_DESC_F_NEXT as u16 };
            let d = RawDescriptor::from(Descriptor::new(addr, len, flags, i as u16 + 1));
            self.mem.write_obj(d, desc.unchecked_add(16 * i as u64)).expect("desc");
        }
        let slot = avail.unchecked_add(4 + 2 * u64::from(self.avail_idx % QSIZE));
        self.mem.write_obj(0u16, slot).expect("avail ring");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem.write_obj(self.avail_idx.to_le(), avail.unchecked_add(2)).expect("avail idx");
        0
    }

    fn used(&self) -> (u16, u32) {
        let (_, _, used) = queue_layout(0, QSIZE);
        let idx: u16 = self.mem.read_obj(used.unchecked_add(2)).expect("used idx");
        let slot = used.unchecked_add(4 + 8 * u64::from(idx.wrapping_sub(1) % QSIZE));
        let len: u32 = self.mem.read_obj(slot.unchecked_add(4)).expect("used len");
        (idx, len)
    }

    /// Runs one request; returns the used length.
    fn run(&mut self, server: &FsServer, request: &[u8], cuts: [usize; 2], reply_len: u32) -> u32 {
        self.mem.write_slice(request, GuestAddress(REQ_ADDR)).expect("request");
        let mut bounds = vec![0, cuts[0].min(request.len()), cuts[1].min(request.len()), request.len()];
        bounds.sort_unstable();
        bounds.dedup();
        let pieces: Vec<(u64, u32)> = if bounds.len() < 2 {
            vec![(REQ_ADDR, 0)]
        } else {
            bounds.windows(2).map(|w| (REQ_ADDR + w[0] as u64, (w[1] - w[0]) as u32)).collect()
        };
        self.push(&pieces, reply_len);
        let (before, _) = self.used();
        let mut stats = RequestStats::default();
        let result = process_queue(server, &self.mem, &mut self.queue, &mut stats);
        assert!(result.is_ok(), "a well-formed queue broke: {result:?}");
        let (after, len) = self.used();
        assert_eq!(after, before.wrapping_add(1), "the chain was not given back");
        len
    }
}

/// Opcodes the guest kernel sends, for inputs that ask for a valid one.
const OPCODES: [Opcode; 38] = [
    Opcode::Lookup,
    Opcode::Forget,
    Opcode::Getattr,
    Opcode::Setattr,
    Opcode::Readlink,
    Opcode::Symlink,
    Opcode::Mknod,
    Opcode::Mkdir,
    Opcode::Unlink,
    Opcode::Rmdir,
    Opcode::Rename,
    Opcode::Link,
    Opcode::Open,
    Opcode::Read,
    Opcode::Write,
    Opcode::Statfs,
    Opcode::Release,
    Opcode::Fsync,
    Opcode::Setxattr,
    Opcode::Getxattr,
    Opcode::Listxattr,
    Opcode::Removexattr,
    Opcode::Flush,
    Opcode::Opendir,
    Opcode::Readdir,
    Opcode::Releasedir,
    Opcode::Fsyncdir,
    Opcode::Getlk,
    Opcode::Setlk,
    Opcode::Setlkw,
    Opcode::Access,
    Opcode::Create,
    Opcode::Interrupt,
    Opcode::Destroy,
    Opcode::BatchForget,
    Opcode::Fallocate,
    Opcode::Readdirplus,
    Opcode::Rename2,
];

/// The FUSE request parser: one request (header and arguments from the
/// input, optionally with a consistent length, a valid opcode and a known
/// inode) cut into up to three readable descriptors, with a reply buffer
/// of fuzzed size, served by a fresh server over the scratch share after
/// INIT. The reply must fit its buffer and answer the request.
pub fn fuse_request(data: &[u8]) {
    let mut guard = RIG.lock().unwrap_or_else(|e| e.into_inner());
    let rig = guard.get_or_insert_with(rig);
    let server = build_server(&rig.config, &rig.root).expect("server");
    let mut inp = Input::new(data);
    let ctl = inp.u8();
    let reply_len = match ctl >> 6 {
        0 => u32::from(inp.u8()),
        1 => u32::from(inp.u16()),
        _ => REPLY_MAX,
    };
    let cuts = [usize::from(inp.u8()), usize::from(inp.u16())];

    // INIT first, as the guest kernel does.
    rig.unique += 1;
    let init = InitIn { major: KERNEL_VERSION, minor: 33, max_readahead: 0, flags: inp.u32() };
    let hdr = header(Opcode::Init as u32, rig.unique, 0, size_of::<InitIn>());
    let req = [hdr.as_slice(), init.as_slice()].concat();
    rig.run(&server, &req, [0, 0], 4096);

    let mut request = inp.bytes(usize::MAX).to_vec();
    if request.len() >= size_of::<InHeader>() {
        let mut h = InHeader::from_slice(&request[..size_of::<InHeader>()]).copied().expect("header");
        if ctl & 1 != 0 {
            h.len = request.len() as u32;
        }
        if ctl & 2 != 0 {
            h.opcode = OPCODES[h.opcode as usize % OPCODES.len()] as u32;
        }
        if ctl & 4 != 0 {
            // The root, or an inode the server likely handed out.
            h.nodeid = 1 + h.nodeid % 4;
        }
        request[..size_of::<InHeader>()].copy_from_slice(h.as_slice());
    }
    let used = rig.run(&server, &request, cuts, reply_len);
    assert!(used <= reply_len, "used {used} > buffer {reply_len}");
    if used > 0 && request.len() >= size_of::<InHeader>() {
        let h = InHeader::from_slice(&request[..size_of::<InHeader>()]).copied().expect("header");
        let out: OutHeader = rig.mem.read_obj(GuestAddress(REPLY_ADDR)).expect("reply");
        assert_eq!(out.len, used, "reply length and used length differ");
        assert_eq!(out.unique, h.unique, "reply to another request");
        assert!(out.error <= 0);
    }
}

fn header(opcode: u32, unique: u64, nodeid: u64, args: usize) -> InHeader {
    InHeader { len: (size_of::<InHeader>() + args) as u32, opcode, unique, nodeid, uid: 0, gid: 0, pid: 1, padding: 0 }
}
