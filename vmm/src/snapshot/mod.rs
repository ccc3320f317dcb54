//! VM snapshots: a paused VM written to a directory, and a VM started from one.
//!
//! A snapshot directory holds two files:
//! - `memory`: guest RAM, region after region, as a sparse file: all-zero
//!   pages are holes and take no disk. A restore maps it `MAP_PRIVATE`, so
//!   the page cache holds its clean pages once for every VM started from it
//!   and each VM's writes stay its own (the file is never written).
//! - `state`: the [`VmState`] (vCPUs, in-kernel devices, UART, virtio-mmio
//!   transports), encoded with bincode through serde, framed as
//!   `magic | version | length | payload | crc32` (see [`encode_state`]).
//!
//! A snapshot is restored only into a VM of the same [`Shape`]: same vCPU
//! count, RAM, host kind and virtio devices (kinds, order, fs tags). The
//! device *backends* come from the restoring config: a new vsock socket, new
//! shared directories, new taps.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

pub mod state;
pub mod vcpu;

pub use state::{DeviceShape, KvmVmState, QueueSnapshot, SerialSnapshot, Shape, TransportState, VcpuState, VmState};

/// The guest memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// The state file in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The first bytes of a state file.
pub const STATE_MAGIC: [u8; 8] = *b"CRPCSNAP";
/// The state file format this VMM writes and reads. Bump it whenever
/// [`VmState`] or anything in it changes: an older file is refused (the
/// runtime then boots cold and makes a new template).
pub const STATE_VERSION: u32 = 1;
/// magic, version (u32 LE), payload length (u64 LE).
const HEADER_LEN: usize = 8 + 4 + 8;
/// crc32 (LE) of everything before it.
const TRAILER_LEN: usize = 4;
/// The unit in which memory is scanned for zeroes (and holes are left).
const PAGE_SIZE: usize = 4096;

/// Why a snapshot could not be taken or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot state {path} is truncated: {len} bytes, expected {need}")]
    Truncated { path: PathBuf, len: u64, need: u64 },
    #[error("snapshot state {path} has {extra} bytes after its end")]
    TrailingBytes { path: PathBuf, extra: u64 },
    #[error("{path} is not a carapace snapshot state file (bad magic)")]
    NotASnapshot { path: PathBuf },
    #[error("snapshot state {path} has format version {found}; this VMM reads version {expected}")]
    WrongVersion { path: PathBuf, found: u32, expected: u32 },
    #[error("snapshot state {path} is corrupted: checksum {computed:#010x}, the file says {stored:#010x}")]
    Checksum { path: PathBuf, stored: u32, computed: u32 },
    #[error("snapshot state {path} cannot be decoded")]
    Decode {
        path: PathBuf,
        #[source]
        source: bincode::error::DecodeError,
    },
    #[error("cannot encode the snapshot state")]
    Encode(#[source] bincode::error::EncodeError),
    #[error("snapshot does not match the config: {what}: the snapshot has {snapshot}, the config {config}")]
    ShapeMismatch { what: String, snapshot: String, config: String },
    #[error("snapshot memory {path} is {len} bytes; the snapshot's {mem_mib} MiB of RAM need {expected}")]
    MemorySize { path: PathBuf, len: u64, expected: u64, mem_mib: u32 },
    #[error("cannot map snapshot memory {path}: {reason}")]
    MapMemory { path: PathBuf, reason: String },
    #[error("KVM: {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {cpu}: KVM refused to {op} MSR {index:#x} (not on the list of MSRs this host may refuse)")]
    MsrRefused { cpu: u8, op: &'static str, index: u32 },
    #[error("vCPU {cpu} did not stop for the snapshot")]
    VcpuNotStopped { cpu: u8 },
    #[error("device {index} ({device}): {reason}")]
    Device { index: usize, device: String, reason: String },
}

/// Encodes `state` as a state file: `STATE_MAGIC`, `STATE_VERSION` (u32
/// LE), the payload's length (u64 LE), the bincode payload, and the crc32
/// of all that (u32 LE).
pub fn encode_state(state: &VmState) -> Result<Vec<u8>, SnapshotError> {
    let payload = bincode::serde::encode_to_vec(state, bincode::config::standard()).map_err(SnapshotError::Encode)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + TRAILER_LEN);
    out.extend_from_slice(&STATE_MAGIC);
    out.extend_from_slice(&STATE_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Decodes a state file read from `path` (named in errors). Checks, in
/// this order: length of the header, magic, version, length, checksum.
pub fn decode_state(bytes: &[u8], path: &Path) -> Result<VmState, SnapshotError> {
    let path_buf = || path.to_path_buf();
    let len = bytes.len() as u64;
    if bytes.len() < HEADER_LEN + TRAILER_LEN {
        if bytes.len() >= 8 && bytes[..8] != STATE_MAGIC {
            return Err(SnapshotError::NotASnapshot { path: path_buf() });
        }
        return Err(SnapshotError::Truncated { path: path_buf(), len, need: (HEADER_LEN + TRAILER_LEN) as u64 });
    }
    if bytes[..8] != STATE_MAGIC {
        return Err(SnapshotError::NotASnapshot { path: path_buf() });
    }
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[8..12]);
    let version = u32::from_le_bytes(word);
    if version != STATE_VERSION {
        return Err(SnapshotError::WrongVersion { path: path_buf(), found: version, expected: STATE_VERSION });
    }
    let mut dword = [0u8; 8];
    dword.copy_from_slice(&bytes[12..20]);
    let payload_len = u64::from_le_bytes(dword);
    let need = payload_len.saturating_add((HEADER_LEN + TRAILER_LEN) as u64);
    if len < need {
        return Err(SnapshotError::Truncated { path: path_buf(), len, need });
    }
    if len > need {
        return Err(SnapshotError::TrailingBytes { path: path_buf(), extra: len - need });
    }
    // len == need, and need fits in memory: the cast is exact.
    let end = bytes.len() - TRAILER_LEN;
    word.copy_from_slice(&bytes[end..]);
    let stored = u32::from_le_bytes(word);
    let computed = crc32fast::hash(&bytes[..end]);
    if stored != computed {
        return Err(SnapshotError::Checksum { path: path_buf(), stored, computed });
    }
    let (state, used) = bincode::serde::decode_from_slice::<VmState, _>(&bytes[HEADER_LEN..end], bincode::config::standard())
        .map_err(|source| SnapshotError::Decode { path: path_buf(), source })?;
    if used != end - HEADER_LEN {
        return Err(SnapshotError::TrailingBytes { path: path_buf(), extra: (end - HEADER_LEN - used) as u64 });
    }
    Ok(state)
}

/// Writes the state file `dir/state` and flushes it to disk.
pub fn write_state(dir: &Path, state: &VmState) -> Result<(), SnapshotError> {
    let path = dir.join(STATE_FILE);
    let bytes = encode_state(state)?;
    let io = |source| SnapshotError::Io { what: "state", path: path.clone(), source };
    let mut f = File::create(&path).map_err(io)?;
    f.write_all(&bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(())
}

/// Reads and checks `dir/state`.
pub fn read_state(dir: &Path) -> Result<VmState, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(|source| SnapshotError::Io { what: "state", path: path.clone(), source })?;
    decode_state(&bytes, &path)
}

/// Checks that a snapshot of shape `snapshot` can be restored into a VM
/// configured as `config`; the error names the first difference.
pub fn check_shape(snapshot: &Shape, config: &Shape) -> Result<(), SnapshotError> {
    let mismatch = |what: &str, s: String, c: String| Err(SnapshotError::ShapeMismatch { what: what.to_string(), snapshot: s, config: c });
    if snapshot.vcpus != config.vcpus {
        return mismatch("vcpus", snapshot.vcpus.to_string(), config.vcpus.to_string());
    }
    if snapshot.mem_mib != config.mem_mib {
        return mismatch("mem_mib", snapshot.mem_mib.to_string(), config.mem_mib.to_string());
    }
    if snapshot.pvm != config.pvm {
        let kind = |pvm: bool| if pvm { "kvm_pvm" } else { "VMX/SVM KVM" }.to_string();
        return mismatch("host kind", kind(snapshot.pvm), kind(config.pvm));
    }
    let list = |d: &[DeviceShape]| {
        let names: Vec<String> = d.iter().map(DeviceShape::describe).collect();
        format!("[{}]", names.join(", "))
    };
    if snapshot.devices != config.devices {
        return mismatch("virtio devices", list(&snapshot.devices), list(&config.devices));
    }
    Ok(())
}

/// The host memory of every region of `mem`, for reading while nothing
/// else touches it.
fn region_bytes(region: &GuestRegionMmap) -> &[u8] {
    // The region is at most the guest's RAM, which fits the address space.
    #[allow(clippy::cast_possible_truncation)]
    let len = region.len() as usize;
    // SAFETY: the region maps `len` readable bytes at `as_ptr()` for as long
    // as `region` lives. The caller has stopped every vCPU and device
    // worker, so nothing writes the memory while the slice is used (and u8
    // has no invalid values anyway).
    unsafe { std::slice::from_raw_parts(region.as_ptr(), len) }
}

/// Whether a page is all zeroes.
fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only splits the
        // slice at alignment boundaries.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && tail.iter().all(|b| *b == 0)
}

/// Writes guest memory to `path` as a sparse file (regions one after the
/// other; runs of non-zero pages written, zero pages left as holes), sized
/// to the whole of RAM, and flushes it. Every vCPU and device worker must
/// be stopped. Returns the bytes written (the rest are holes).
pub fn write_memory(mem: &GuestMemoryMmap, path: &Path) -> Result<u64, SnapshotError> {
    let io = |source| SnapshotError::Io { what: "memory", path: path.to_path_buf(), source };
    let file = File::create(path).map_err(io)?;
    let mut file_off = 0u64;
    let mut written = 0u64;
    for region in mem.iter() {
        let bytes = region_bytes(region);
        let mut run: Option<usize> = None;
        let mut flush = |start: usize, end: usize| -> Result<(), SnapshotError> {
            file.write_all_at(&bytes[start..end], file_off + start as u64).map_err(io)?;
            written += (end - start) as u64;
            Ok(())
        };
        let mut pos = 0;
        while pos < bytes.len() {
            let end = (pos + PAGE_SIZE).min(bytes.len());
            if is_zero(&bytes[pos..end]) {
                if let Some(start) = run.take() {
                    flush(start, pos)?;
                }
            } else if run.is_none() {
                run = Some(pos);
            }
            pos = end;
        }
        if let Some(start) = run {
            flush(start, bytes.len())?;
        }
        file_off += bytes.len() as u64;
    }
    // Trailing zero pages: the length makes them holes too.
    file.set_len(file_off).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(written)
}

/// Maps the memory file `path` as guest memory at `ranges` (guest address,
/// length; the file holds them one after the other), copy-on-write: the
/// guest's writes go to private pages and never reach the file, which is
/// opened read-only.
pub fn map_memory(path: &Path, ranges: &[(GuestAddress, usize)], mem_mib: u32) -> Result<GuestMemoryMmap, SnapshotError> {
    let io = |source| SnapshotError::Io { what: "memory", path: path.to_path_buf(), source };
    let file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let expected: u64 = ranges.iter().map(|(_, l)| *l as u64).sum();
    if len != expected {
        return Err(SnapshotError::MemorySize { path: path.to_path_buf(), len, expected, mem_mib });
    }
    let map_err = |reason: String| SnapshotError::MapMemory { path: path.to_path_buf(), reason };
    let file = std::sync::Arc::new(file);
    let mut regions = Vec::new();
    let mut off = 0u64;
    for &(addr, size) in ranges {
        let region = MmapRegionBuilder::<()>::new(size)
            .with_file_offset(FileOffset::from_arc(file.clone(), off))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| map_err(e.to_string()))?;
        let region = GuestRegionMmap::new(region, addr).ok_or_else(|| map_err(format!("region at {addr:#x?} overflows")))?;
        regions.push(region);
        off += size as u64;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| map_err(e.to_string()))
}

#[cfg(test)]
mod tests;
