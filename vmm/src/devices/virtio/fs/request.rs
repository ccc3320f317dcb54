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
use tracing::{debug, warn};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{ByteValued, GuestMemoryMmap};

use super::FsError;

/// Handles every available chain of `queue`. Returns whether the driver
/// should be interrupted (something was used and the driver wants to hear
/// of it). An error means the queue itself is unusable (its available ring
/// is out of guest memory or corrupt); the chains used so far stay used.
pub(crate) fn process_queue<F: FileSystem + Sync>(
    server: &Server<F>,
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
) -> Result<bool, FsError> {
    let mut used_any = false;
    let mut result = Ok(());
    loop {
        let chain = match queue.iter(mem) {
            Ok(mut iter) => iter.next(),
            Err(e) => {
                result = Err(FsError::Queue(e));
                break;
            }
        };
        let Some(chain) = chain else { break };
        let head = chain.head_index();
        let len = handle_chain(server, mem, chain);
        match queue.add_used(mem, head, len) {
            Ok(()) => used_any = true,
            Err(e) => warn!("virtio-fs: cannot return descriptor {head}: {e}"),
        }
    }
    let notify = if used_any {
        queue.needs_notification(mem).map_err(FsError::Queue)?
    } else {
        false
    };
    result.map(|()| notify)
}

/// Opcodes that have no reply.
fn is_no_reply(opcode: u32) -> bool {
    opcode == Opcode::Forget as u32
        || opcode == Opcode::BatchForget as u32
        || opcode == Opcode::Interrupt as u32
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
) -> u32 {
    let reader = match Reader::from_descriptor_chain(mem, chain.clone()) {
        Ok(r) => r,
        Err(e) => {
            warn!("virtio-fs: dropping request with unreadable descriptors: {e}");
            return 0;
        }
    };
    let writer = match VirtioFsWriter::new(mem, chain) {
        Ok(w) => w,
        Err(e) => {
            warn!("virtio-fs: dropping request with unwritable descriptors: {e}");
            return 0;
        }
    };

    let mut peek = reader.clone();
    let header: InHeader = match peek.read_obj() {
        Ok(h) => h,
        Err(e) => {
            warn!("virtio-fs: dropping request without a complete header: {e}");
            return 0;
        }
    };
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
            warn!(
                "virtio-fs: bad request {} (unique {}): {e}",
                header.opcode, header.unique
            );
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
    const LEN: u32 = std::mem::size_of::<OutHeader>() as u32;
    let out = OutHeader {
        len: LEN,
        error: -errno,
        unique,
    };
    match writer.write_all(out.as_slice()) {
        Ok(()) => LEN,
        Err(e) => {
            warn!("virtio-fs: no room for an error reply: {e}");
            0
        }
    }
}
