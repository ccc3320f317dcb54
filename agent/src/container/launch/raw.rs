//! System calls for the launcher's children, without glibc.
//!
//! The children share the agent's memory, and glibc's wrappers write
//! `errno`, which lives in the thread-local block of the agent thread that
//! cloned them: a container's init keeps running beside that thread, and
//! would change its `errno` under it. These return the kernel's result as
//! it is (`Err(errno)` for -4095..-1) and touch no memory of their own.
//! Each wrapper takes only what the kernel can check or what Rust types
//! guarantee (C strings, integers, references), and so is safe to call.

use std::ffi::{c_char, c_int, c_long, c_void, CStr};

/// Result of a raw system call: the value, or the errno.
pub type Sys = Result<usize, i32>;

fn result(ret: isize) -> Sys {
    if (-4095..0).contains(&ret) {
        Err(i32::try_from(-ret).unwrap_or(libc::EIO))
    } else {
        Ok(ret.cast_unsigned())
    }
}

/// `syscall(nr, args...)`.
///
/// # Safety
/// As for the system call `nr` with these arguments: pointers must be
/// valid for what the kernel reads or writes through them.
unsafe fn call(nr: c_long, args: &[usize]) -> Sys {
    let a = |i: usize| args.get(i).copied().unwrap_or(0);
    let ret: isize;
    // SAFETY: the `syscall` instruction with the x86-64 Linux convention
    // (number in rax, arguments in rdi, rsi, rdx, r10, r8, r9; rcx and
    // r11 clobbered); what it does is the caller's contract.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") isize::try_from(nr).unwrap_or(-1) => ret,
            in("rdi") a(0),
            in("rsi") a(1),
            in("rdx") a(2),
            in("r10") a(3),
            in("r8") a(4),
            in("r9") a(5),
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    result(ret)
}

/// A signed int argument, sign-extended as the kernel reads it.
fn int(v: c_int) -> usize {
    isize::try_from(v).unwrap_or(-1).cast_unsigned()
}

fn word(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

fn s(c: &CStr) -> usize {
    c.as_ptr() as usize
}

fn opt_s(c: Option<&CStr>) -> usize {
    c.map_or(0, s)
}

fn ptr<T>(p: *const T) -> usize {
    p as usize
}

fn unit(r: Sys) -> Result<(), i32> {
    r.map(|_| ())
}

/// A system call whose arguments are integers only.
fn ints(nr: c_long, args: &[usize]) -> Sys {
    // SAFETY: no argument is a pointer; the kernel checks the values.
    unsafe { call(nr, args) }
}

/// A system call whose arguments are integers and C strings (passed as
/// `s`), alive for the call.
fn strs(nr: c_long, args: &[usize]) -> Sys {
    // SAFETY: the pointers among `args` come from `&CStr`s the caller
    // holds across the call (NUL-terminated, read only).
    unsafe { call(nr, args) }
}

/// `struct clone_args` of clone3(2), as of Linux 5.7 (with `cgroup`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// linux/sched.h: the child starts in the cgroup of `clone_args.cgroup`.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// clone3(2) of a child born in the cgroup whose directory `cgroup` is
/// open (CLONE_INTO_CGROUP) that runs `f(arg)` on the stack ending at `top`
/// and exits with its result; `flags` as for clone(2), with CLONE_PARENT
/// (clone3 refuses an exit signal with it: the child's is ours). Being
/// born there spares a migration into the cgroup (cgroup.procs), which
/// cost ~0.1 s of emulated guest kernel an exec on kvm_pvm hosts. glibc
/// has no clone3 wrapper that runs a function.
///
/// # Safety
/// `top` must be the 16-byte aligned end of `size` bytes of writable
/// memory that only the child uses until it has exec'd or exited; `f`
/// must be safe to run with `arg` in a child sharing whatever `flags`
/// share (with CLONE_VM: our memory, so system calls only, as [`call`]).
pub unsafe fn clone_into_cgroup(
    flags: c_int,
    cgroup: c_int,
    f: extern "C" fn(*mut c_void) -> c_int,
    arg: *mut c_void,
    top: *mut c_void,
    size: usize,
) -> Sys {
    let args = CloneArgs {
        flags: u64::from(flags.cast_unsigned()) | CLONE_INTO_CGROUP,
        stack: (top as u64).wrapping_sub(size as u64),
        stack_size: size as u64,
        cgroup: u64::from(cgroup.cast_unsigned()),
        ..CloneArgs::default()
    };
    let ret: isize;
    // SAFETY: clone3 with the x86-64 convention. In the parent rax is
    // the child's PID (or -errno), and only rax, rcx and r11 change. The
    // child (rax 0) runs on its own stack, which the kernel points rsp at
    // (16-byte aligned, as a call needs), with r12 and r13 as the parent
    // had them: it calls `f(arg)` and exits with its result, never coming
    // back into this function; the caller vouches for the stack and `f`.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "mov rdi, r13",
            "call r12",
            "mov edi, eax",
            "mov eax, {exit}",
            "syscall",
            "ud2",
            "2:",
            exit = const libc::SYS_exit,
            inlateout("rax") isize::try_from(libc::SYS_clone3).unwrap_or(-1) => ret,
            in("rdi") &raw const args,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") f,
            in("r13") arg,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    result(ret)
}

pub fn read(fd: c_int, buf: &mut [u8]) -> Sys {
    // SAFETY: the kernel writes at most buf.len() bytes into buf.
    unsafe { call(libc::SYS_read, &[int(fd), ptr(buf.as_mut_ptr()), buf.len()]) }
}

pub fn write(fd: c_int, buf: &[u8]) -> Sys {
    // SAFETY: the kernel reads buf.len() bytes from buf.
    unsafe { call(libc::SYS_write, &[int(fd), ptr(buf.as_ptr()), buf.len()]) }
}

pub fn close(fd: c_int) {
    let _ = ints(libc::SYS_close, &[int(fd)]);
}

pub fn open(path: &CStr, flags: c_int, mode: u32) -> Result<c_int, i32> {
    let r = strs(libc::SYS_openat, &[int(libc::AT_FDCWD), s(path), int(flags), mode as usize])?;
    c_int::try_from(r).map_err(|_| libc::EBADF)
}

pub fn mount(source: Option<&CStr>, target: &CStr, fstype: Option<&CStr>, flags: libc::c_ulong, data: Option<&CStr>) -> Result<(), i32> {
    unit(strs(libc::SYS_mount, &[opt_s(source), s(target), opt_s(fstype), word(flags), opt_s(data)]))
}

pub fn umount2(target: &CStr, flags: c_int) -> Result<(), i32> {
    unit(strs(libc::SYS_umount2, &[s(target), int(flags)]))
}

pub fn mkdir(path: &CStr, mode: u32) -> Result<(), i32> {
    unit(strs(libc::SYS_mkdir, &[s(path), mode as usize]))
}

pub fn mknod(path: &CStr, mode: u32, dev: u64) -> Result<(), i32> {
    unit(strs(libc::SYS_mknod, &[s(path), mode as usize, word(dev)]))
}

pub fn chown(path: &CStr, uid: u32, gid: u32) -> Result<(), i32> {
    unit(strs(libc::SYS_chown, &[s(path), uid as usize, gid as usize]))
}

pub fn symlink(target: &CStr, link: &CStr) -> Result<(), i32> {
    unit(strs(libc::SYS_symlink, &[s(target), s(link)]))
}

pub fn unlink(path: &CStr) -> Result<(), i32> {
    unit(strs(libc::SYS_unlink, &[s(path)]))
}

pub fn chdir(path: &CStr) -> Result<(), i32> {
    unit(strs(libc::SYS_chdir, &[s(path)]))
}

pub fn fchdir(fd: c_int) -> Result<(), i32> {
    unit(ints(libc::SYS_fchdir, &[int(fd)]))
}

pub fn pivot_root(new_root: &CStr, put_old: &CStr) -> Result<(), i32> {
    unit(strs(libc::SYS_pivot_root, &[s(new_root), s(put_old)]))
}

pub fn sethostname(name: &CStr) -> Result<(), i32> {
    unit(strs(libc::SYS_sethostname, &[s(name), name.to_bytes().len()]))
}

pub fn setdomainname(name: &CStr) -> Result<(), i32> {
    unit(strs(libc::SYS_setdomainname, &[s(name), name.to_bytes().len()]))
}

/// Sets the umask; returns the old one.
pub fn umask(mask: u32) -> u32 {
    ints(libc::SYS_umask, &[mask as usize]).ok().and_then(|m| u32::try_from(m).ok()).unwrap_or(0o022)
}

pub fn setns(fd: c_int, nstype: c_int) -> Result<(), i32> {
    unit(ints(libc::SYS_setns, &[int(fd), int(nstype)]))
}

pub fn unshare(flags: c_int) -> Result<(), i32> {
    unit(ints(libc::SYS_unshare, &[int(flags)]))
}

pub fn setsid() -> Result<(), i32> {
    unit(ints(libc::SYS_setsid, &[]))
}

pub fn dup2(old: c_int, new: c_int) -> Result<(), i32> {
    unit(ints(libc::SYS_dup2, &[int(old), int(new)]))
}

pub fn clear_cloexec(fd: c_int) -> Result<(), i32> {
    unit(ints(libc::SYS_fcntl, &[int(fd), int(libc::F_SETFD), 0]))
}

/// An ioctl whose argument is an integer (TIOCGPTPEER, TIOCSCTTY).
pub fn ioctl_int(fd: c_int, request: libc::c_ulong, arg: c_int) -> Sys {
    ints(libc::SYS_ioctl, &[int(fd), word(request), int(arg)])
}

/// An ioctl that reads an int (TIOCSPTLCK).
pub fn ioctl_set_int(fd: c_int, request: libc::c_ulong, value: &c_int) -> Result<(), i32> {
    // SAFETY: the kernel reads one int through the reference.
    unit(unsafe { call(libc::SYS_ioctl, &[int(fd), word(request), ptr(value)]) })
}

pub fn prlimit(resource: c_int, limit: &libc::rlimit64) -> Result<(), i32> {
    // SAFETY: the kernel reads one rlimit64; no old limit is written.
    unit(unsafe { call(libc::SYS_prlimit64, &[0, int(resource), ptr(limit), 0]) })
}

pub fn prctl(option: c_int, a: usize, b: usize) -> Result<(), i32> {
    unit(ints(libc::SYS_prctl, &[int(option), a, b, 0, 0]))
}

pub fn setgroups(groups: &[libc::gid_t]) -> Result<(), i32> {
    // SAFETY: the kernel reads groups.len() gids.
    unit(unsafe { call(libc::SYS_setgroups, &[groups.len(), ptr(groups.as_ptr())]) })
}

pub fn setresgid(gid: libc::gid_t) -> Result<(), i32> {
    let g = gid as usize;
    unit(ints(libc::SYS_setresgid, &[g, g, g]))
}

pub fn setresuid(uid: libc::uid_t) -> Result<(), i32> {
    let u = uid as usize;
    unit(ints(libc::SYS_setresuid, &[u, u, u]))
}

/// Marks every descriptor from `first` close-on-exec.
pub fn cloexec_from(first: u32) -> Result<(), i32> {
    const CLOSE_RANGE_CLOEXEC: usize = 1 << 2;
    unit(ints(libc::SYS_close_range, &[first as usize, u32::MAX as usize, CLOSE_RANGE_CLOEXEC]))
}

/// capget/capset's header and data (version 3: two 32-bit halves).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct CapData {
    pub effective: u32,
    pub permitted: u32,
    pub inheritable: u32,
}

const CAP_V3: u32 = 0x2008_0522;

pub fn capget() -> Result<[CapData; 2], i32> {
    let mut header = CapHeader { version: CAP_V3, pid: 0 };
    let mut data = [CapData::default(); 2];
    let header: *mut CapHeader = &mut header;
    // SAFETY: capget reads the header (and may write its version back)
    // and writes two CapData.
    unsafe { call(libc::SYS_capget, &[ptr(header), ptr(data.as_mut_ptr())]) }?;
    Ok(data)
}

pub fn capset(data: &[CapData; 2]) -> Result<(), i32> {
    let mut header = CapHeader { version: CAP_V3, pid: 0 };
    let header: *mut CapHeader = &mut header;
    // SAFETY: capset reads the header (and may write its version back)
    // and reads two CapData.
    unit(unsafe { call(libc::SYS_capset, &[ptr(header), ptr(data.as_ptr())]) })
}

/// `stat(path)`'s mode, or the errno.
pub fn mode_of(path: &CStr) -> Result<u32, i32> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: newfstatat fills a `struct stat` (libc's layout is the
    // kernel's on x86-64).
    unsafe { call(libc::SYS_newfstatat, &[int(libc::AT_FDCWD), s(path), ptr(st.as_mut_ptr()), 0]) }?;
    // SAFETY: zeroed, then filled by a successful newfstatat.
    Ok(unsafe { st.assume_init() }.st_mode)
}

/// `statfs(path)`'s `f_flags` (ST_* bits).
pub fn statfs_flags(path: &CStr) -> Result<u64, i32> {
    // The kernel's struct statfs on x86-64: 15 words, f_flags the 11th.
    let mut st = [0u64; 15];
    // SAFETY: statfs writes one struct statfs (120 bytes) into `st`.
    unsafe { call(libc::SYS_statfs, &[s(path), ptr(st.as_mut_ptr())]) }?;
    Ok(st[10])
}

/// Sets the signal mask to every signal, or to none.
pub fn sigmask(all: bool) {
    let set: u64 = if all { u64::MAX } else { 0 };
    // SAFETY: the kernel reads an 8-byte sigset; no old mask is written.
    let _ = unsafe { call(libc::SYS_rt_sigprocmask, &[int(libc::SIG_SETMASK), ptr(&set), 0, 8]) };
}

/// Resets `signal`'s disposition to the default.
pub fn default_action(signal: c_int) {
    // The kernel's struct sigaction: handler, flags, restorer, mask.
    let action: [u64; 4] = [0; 4];
    // SAFETY: the kernel reads one sigaction; no old action is written.
    let _ = unsafe { call(libc::SYS_rt_sigaction, &[int(signal), ptr(action.as_ptr()), 0, 8]) };
}

/// `seccomp(SECCOMP_SET_MODE_FILTER, flags, prog)`.
///
/// # Safety
/// `prog.filter` must point to `prog.len` instructions, alive for the call.
pub unsafe fn seccomp_filter(flags: libc::c_ulong, prog: &libc::sock_fprog) -> Result<(), i32> {
    // SAFETY: the kernel reads the sock_fprog and the instructions it
    // points to (the caller's contract).
    unit(unsafe { call(libc::SYS_seccomp, &[libc::SECCOMP_SET_MODE_FILTER as usize, word(flags), ptr(prog)]) })
}

/// `execve`; returns the errno if it fails.
///
/// # Safety
/// `argv` and `envp` must be NULL-terminated arrays of NUL-terminated
/// strings, alive until the exec.
pub unsafe fn execve(path: &CStr, argv: *const *const c_char, envp: *const *const c_char) -> i32 {
    // SAFETY: the caller's contract for argv and envp; path is a CStr.
    match unsafe { call(libc::SYS_execve, &[s(path), ptr(argv), ptr(envp)]) } {
        Ok(_) => 0,
        Err(e) => e,
    }
}
