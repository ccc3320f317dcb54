//! A hostile guest driving the virtio-fs device: requests whose sizes lie,
//! names without a terminator or with path separators, chains that loop or
//! nest indirect tables, and a corrupt queue. Every case ends in an error
//! reply, a chain given back with nothing written, or (for a corrupt queue)
//! the device marking itself DEVICE_NEEDS_RESET; never in a panic, a hang,
//! or a change outside the share.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation, clippy::cast_possible_wrap, clippy::cast_sign_loss)]

use std::fs;
use std::mem::size_of;
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{CreateIn, InHeader, LinkIn, MkdirIn, MknodIn, Opcode, OutHeader, ReadIn, RenameIn, WriteIn, ROOT_ID};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{ByteValued, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::test_utils::*;
use super::{CacheMode, Fs};
use crate::devices::virtio::{ActiveQueue, Interrupt, VirtioDevice};

/// Sends `opcode` with `body` after a header whose `len` is `len` (None:
/// the true length); returns the reply's errno (0: success), or None when
/// the chain came back with nothing written.
fn send(h: &mut Harness<'_>, opcode: u32, body: &[u8], len: Option<u32>) -> Option<i32> {
    let unique = h.next_unique();
    let mut hdr = in_header(opcode, unique, ROOT_ID, body.len());
    if let Some(l) = len {
        hdr.len = l;
    }
    let mut req = hdr.as_slice().to_vec();
    req.extend_from_slice(body);
    let (used, reply) = h.send_raw(&req, 4096);
    if used == 0 {
        return None;
    }
    let out: OutHeader = obj(&reply);
    assert_eq!(out.unique, unique);
    assert_eq!(out.len, used);
    Some(-out.error)
}

fn host_names(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

fn still_serving(h: &mut Harness<'_>) {
    assert!(h.getattr(ROOT_ID).is_ok(), "the device stopped serving");
}

/// Names that are not NUL-terminated, for every request that takes one.
#[test]
fn names_without_a_terminator_are_refused() {
    let mem = test_mem();
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("f"), b"x").unwrap();
    let mut h = Harness::mounted(&mem, dir.path());
    let f = h.lookup(ROOT_ID, "f").unwrap();
    let name = b"newname";
    let cases: Vec<(Opcode, Vec<u8>)> = vec![
        (Opcode::Lookup, name.to_vec()),
        (Opcode::Unlink, b"f".to_vec()),
        (Opcode::Rmdir, name.to_vec()),
        (Opcode::Mkdir, [MkdirIn { mode: 0o755, umask: 0 }.as_slice(), name].concat()),
        (Opcode::Mknod, [MknodIn { mode: libc::S_IFREG | 0o644, ..Default::default() }.as_slice(), name].concat()),
        (
            Opcode::Create,
            [CreateIn { flags: (libc::O_CREAT | libc::O_WRONLY) as u32, mode: 0o644, ..Default::default() }.as_slice(), name].concat(),
        ),
        // Symlink: name and target, the second without its NUL.
        (Opcode::Symlink, b"link\0target".to_vec()),
        // ...or with no NUL at all.
        (Opcode::Symlink, b"linktarget".to_vec()),
        (Opcode::Link, [LinkIn { oldnodeid: f.nodeid }.as_slice(), name].concat()),
        (Opcode::Rename, [RenameIn { newdir: ROOT_ID }.as_slice(), b"f\0g"].concat()),
        (Opcode::Rename, [RenameIn { newdir: ROOT_ID }.as_slice(), b"fg"].concat()),
        (Opcode::Getxattr, [[0u8; 8].as_slice(), b"user.a"].concat()),
        (Opcode::Removexattr, b"user.a".to_vec()),
    ];
    for (op, body) in cases {
        let errno = send(&mut h, op as u32, &body, None);
        assert!(matches!(errno, Some(e) if e != 0), "{op:?}: {errno:?}");
    }
    assert_eq!(host_names(dir.path()), vec!["f"], "nothing created or removed");
    still_serving(&mut h);
}

/// Path separators and dot names arriving as raw bytes (not through the
/// test client's helpers), including a NUL in the middle that would cut
/// a name short.
#[test]
fn raw_names_with_separators_are_refused() {
    let mem = test_mem();
    let tmp = tempfile::tempdir().unwrap();
    let share = tmp.path().join("share");
    fs::create_dir(&share).unwrap();
    fs::write(tmp.path().join("secret"), b"s").unwrap();
    let mut h = Harness::mounted(&mem, &share);
    for name in [&b"../secret\0"[..], b"a/b\0", b"/etc\0", b"..\0", b".\0", b"x/\0y\0"] {
        let mkdir = [MkdirIn { mode: 0o755, umask: 0 }.as_slice(), name].concat();
        assert_eq!(send(&mut h, Opcode::Mkdir as u32, &mkdir, None), Some(libc::EINVAL));
        assert_eq!(send(&mut h, Opcode::Unlink as u32, name, None), Some(libc::EINVAL));
        let create =
            [CreateIn { flags: (libc::O_CREAT | libc::O_WRONLY) as u32, mode: 0o644, ..Default::default() }.as_slice(), name].concat();
        assert_eq!(send(&mut h, Opcode::Create as u32, &create, None), Some(libc::EINVAL));
    }
    for name in [&b"../secret\0"[..], b"a/b\0", b"/etc\0"] {
        assert_eq!(send(&mut h, Opcode::Lookup as u32, name, None), Some(libc::EINVAL));
    }
    // `..` at the root is the root, never the parent.
    let e = h.lookup(ROOT_ID, "..").unwrap();
    assert_eq!(e.attr.ino, std::os::unix::fs::MetadataExt::ino(&fs::metadata(&share).unwrap()));
    assert!(host_names(&share).is_empty());
    assert_eq!(host_names(tmp.path()), vec!["secret", "share"]);
    still_serving(&mut h);
}

/// `in.len` that disagrees with the bytes sent: shorter (cutting the name's
/// NUL), exactly a header for a request that needs arguments, shorter than
/// the header, or longer than the chain.
#[test]
fn header_lengths_that_lie() {
    let mem = test_mem();
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("abc"), b"").unwrap();
    let mut h = Harness::mounted(&mem, dir.path());
    let hdr = size_of::<InHeader>() as u32;
    let cases: [(Opcode, &[u8], u32); 7] = [
        (Opcode::Lookup, b"abc\0", hdr + 2),
        (Opcode::Lookup, b"abc\0", hdr),
        (Opcode::Lookup, b"abc\0", 0),
        (Opcode::Lookup, b"abc\0", hdr + 4000),
        (Opcode::Mkdir, b"\xed\x01\0\0\0\0\0\0d\0", hdr + 4),
        (Opcode::Getattr, b"", hdr),
        (Opcode::Setattr, &[0u8; 8], hdr + 88),
    ];
    for (op, body, len) in cases {
        let errno = send(&mut h, op as u32, body, Some(len));
        // GETATTR needs no argument in this ABI version; the rest fail.
        if matches!(op, Opcode::Getattr) {
            assert!(errno.is_some(), "{op:?}");
        } else {
            assert!(matches!(errno, Some(e) if e != 0), "{op:?} len {len}: {errno:?}");
        }
    }
    assert_eq!(host_names(dir.path()), vec!["abc"]);
    still_serving(&mut h);
}

/// Sizes in arguments that lie: a WRITE announcing more bytes than it
/// carries (or 4 GiB) writes at most what it carries and says so, or fails;
/// a READ asking for 4 GiB fails.
#[test]
fn argument_sizes_that_lie() {
    let mem = test_mem();
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::mounted(&mem, dir.path());
    let (e, open) = h.create(ROOT_ID, "f", libc::O_RDWR | libc::O_CREAT, libc::S_IFREG | 0o644).unwrap();
    for size in [100u32, 1 << 20, u32::MAX] {
        let w = WriteIn { fh: open.fh, offset: 0, size, ..Default::default() };
        let body = [w.as_slice(), b"only a few bytes"].concat();
        let unique = h.next_unique();
        let mut hdr = in_header(Opcode::Write as u32, unique, e.nodeid, body.len());
        hdr.nodeid = e.nodeid;
        let mut req = hdr.as_slice().to_vec();
        req.extend_from_slice(&body);
        let (used, reply) = h.send_raw(&req, 256);
        assert!(used >= 16, "size {size}");
        let out: OutHeader = obj(&reply);
        if out.error == 0 {
            let w: fuse_backend_rs::abi::fuse_abi::WriteOut = obj(&reply[16..]);
            assert!(w.size <= 16, "WRITE of {size} claims {} bytes written", w.size);
        }
        assert!(fs::metadata(dir.path().join("f")).unwrap().len() <= 16);
    }
    let r = ReadIn { fh: open.fh, offset: 0, size: u32::MAX, ..Default::default() };
    let unique = h.next_unique();
    let mut hdr = in_header(Opcode::Read as u32, unique, e.nodeid, size_of::<ReadIn>());
    hdr.nodeid = e.nodeid;
    let req = [hdr.as_slice(), r.as_slice()].concat();
    let (_, reply) = h.send_raw(&req, 256);
    let out: OutHeader = obj(&reply);
    assert_ne!(out.error, 0);
    still_serving(&mut h);
}

/// Indirect descriptor tables (the device offers them): a table that loops
/// back on itself, a nested table, a table whose size is not a multiple of
/// a descriptor, one outside guest memory, an empty one, and a chain longer
/// than the queue. Each chain is given back; the device keeps serving.
#[test]
fn hostile_indirect_and_long_chains() {
    let mem = test_mem();
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::mounted(&mem, dir.path());
    let table = 0x60_0000u64;
    let nested = 0x70_0000u64;
    // A GETATTR request the tables point at.
    let req = in_header(Opcode::Getattr as u32, 99, ROOT_ID, 16);
    let mut bytes = req.as_slice().to_vec();
    bytes.extend_from_slice(&[0u8; 16]);
    mem.write_slice(&bytes, GuestAddress(REQ_ADDR)).unwrap();
    let write_desc = |at: u64, d: Descriptor| {
        mem.write_obj(RawDescriptor::from(d), GuestAddress(at)).unwrap();
    };
    // 4096 one-byte readable descriptors, the last pointing at the first.
    let next = VRING_DESC_F_NEXT as u16;
    for i in 0..4096u16 {
        write_desc(table + 16 * u64::from(i), Descriptor::new(REQ_ADDR, 1, next, (i + 1) % 4096));
    }
    write_desc(nested, Descriptor::new(table, 64, VRING_DESC_F_INDIRECT as u16, 0));
    let indirect = VRING_DESC_F_INDIRECT as u16;
    let chains: [(u64, u32); 5] = [(table, 16 * 4096), (nested, 16), (table, 24), (MEM_SIZE as u64 + 0x1000, 64), (table, 0)];
    let before = h.used_idx();
    for (addr, len) in chains {
        let head = h.push_chain(&[(REPLY_ADDR, 0x1000, true)]);
        h.vq.desc_table().store(head, RawDescriptor::from(Descriptor::new(addr, len, indirect, 0))).unwrap();
    }
    // A chain through every descriptor of the ring, in a cycle.
    for i in 0..QSIZE {
        h.vq.desc_table().store(i, RawDescriptor::from(Descriptor::new(REQ_ADDR, 1, next, (i + 1) % QSIZE))).unwrap();
    }
    h.push_head(3);
    let _ = h.process();
    assert_eq!(h.used_idx(), before.wrapping_add(6), "every chain is given back");
    for back in 0..6 {
        assert_eq!(h.used(back).1, 0, "chain {back}: nowhere to reply, nothing written");
    }
    // push_chain lays out fresh descriptors over the cycle.
    still_serving(&mut h);
}

/// The worker thread of a device whose request queue is corrupt marks the
/// device DEVICE_NEEDS_RESET and stops; a reset brings it back.
#[test]
fn corrupt_queue_marks_the_device_broken() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = Fs::new(fs_config("t", dir.path(), false, CacheMode::Auto)).unwrap();
    let mem = test_mem();
    let hiprio = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
    let req = MockSplitQueue::create(&mem, GuestAddress(0x10000), 16);
    let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let kick = notify.try_clone().unwrap();
    let queues = vec![
        ActiveQueue { queue: hiprio.create_queue().unwrap(), notify: EventFd::new(libc::EFD_NONBLOCK).unwrap() },
        ActiveQueue { queue: req.create_queue().unwrap(), notify },
    ];
    dev.activate(mem.clone(), interrupt.clone(), queues).unwrap();
    // The available index jumps more than a queue size ahead.
    req.avail().idx().store(100);
    kick.write(1).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !interrupt.needs_reset() {
        assert!(std::time::Instant::now() < deadline, "the device never reported the corrupt queue");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert_ne!(interrupt.status() & crate::devices::virtio::VIRTIO_MMIO_INT_CONFIG, 0);
    assert!(dev.is_active(), "parked until the driver resets it");
    assert!(dev.reset());
    assert!(!dev.is_active());
}
