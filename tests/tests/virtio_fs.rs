//! Issue 4, end to end: host directories shared into a microVM over
//! virtio-fs are a container's root and volumes. One VM serves every check
//! (a boot costs 20-60 s on kvm_pvm hosts, every guest system call ~1 ms).
//!
//! Host layout (`dir/`):
//! - `share/` (tag `share`, read-write, cache auto; the guest mounts it
//!   nodev at /run/carapace/shared): `rootfs/`, the container root, and
//!   `vol/`, a volume;
//! - `ro/` (tag `ro`, read-only in the VMM; the guest mounts it *without*
//!   `ro`, so the refusal seen inside comes from the device);
//! - `outside/secret`, next to the share, which the guest must never reach.
//!
//! What busybox cannot do (mmap, xattrs) is done by `tests/c/fsprobe.c`,
//! built static on the host and copied into the rootfs. FUSE request
//! handling itself (every opcode, bad requests, `..` at the root, device
//! nodes never opened) is unit-tested over a virtqueue in
//! vmm/src/devices/virtio/fs/.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use carapace_protocol::agent;
use carapace_runtime::assets::GuestAssets;
use carapace_runtime::vm::{FsCacheMode, FsConfig, Vm, VmOptions};
use carapace_tests::guest::{ctx, guest_faults, ConsoleOnPanic, Finished, Guest};
use carapace_tests::{kvm_available, repo_root, Assets, BOOT_DEADLINE};
use serde_json::{json, Value};

/// Where the agent mounts the two shares in the guest.
const SHARE_MOUNT: &str = "/run/carapace/shared";
const RO_MOUNT: &str = "/run/carapace/ro";
/// Entries of the large directory the host creates.
const BIG_DIR_ENTRIES: usize = 5000;

const CAPS: &[&str] = &["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_MKNOD", "CAP_SETUID", "CAP_SETGID"];

fn cstr(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("path without NUL")
}

fn mknod_char(path: &Path, major: u32, minor: u32) {
    let c = cstr(path);
    // SAFETY: a valid NUL-terminated path; mknod reads it only.
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(major, minor)) };
    assert_eq!(rc, 0, "mknod {}: {}", path.display(), std::io::Error::last_os_error());
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let (p, n) = (cstr(path), CString::new(name).expect("name"));
    // SAFETY: valid NUL-terminated strings and a slice with its length.
    let rc = unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    assert_eq!(rc, 0, "setxattr {}: {}", path.display(), std::io::Error::last_os_error());
}

fn get_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let (p, n) = (cstr(path), CString::new(name).expect("name"));
    let mut buf = vec![0u8; 256];
    // SAFETY: valid NUL-terminated strings; the kernel writes at most
    // `buf.len()` bytes into `buf`.
    let rc = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    let len = usize::try_from(rc).ok()?;
    buf.truncate(len);
    Some(buf)
}

/// busybox (Debian's busybox-static) with an applet symlink each, fsprobe,
/// /etc/passwd and group, the mount points of the spec.
fn build_rootfs(root: &Path) {
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "vol", "data", "share", "big"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("/bin/busybox (apt busybox-static)");
    let list = std::process::Command::new("/bin/busybox").arg("--list").output().expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if !applet.is_empty() && applet != "busybox" {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).expect("applet symlink");
        }
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\nuser:x:1000:1000:user:/tmp:/bin/sh\n").expect("passwd");
    std::fs::write(root.join("etc/group"), "root:x:0:\nuser:x:1000:\n").expect("group");
    let src = repo_root().join("tests/c/fsprobe.c");
    let built = std::process::Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(root.join("bin/fsprobe"))
        .arg(&src)
        .status()
        .expect("gcc (apt gcc libc6-dev)");
    assert!(built.success(), "gcc -static {}: {built}", src.display());
    for i in 0..BIG_DIR_ENTRIES {
        std::fs::write(root.join("big").join(format!("entry-{i:05}")), b"").expect("big dir entry");
    }
}

/// What the host puts in the rootfs before the read-write container runs;
/// also undoes that container's changes, so the step can run again.
fn reset_rw_state(rootfs: &Path, vol: &Path, outside: &Path) {
    for f in ["guestfile", "hardlink", "symlink", "renamed", "trunc", "escape", "hostzero", "mmap.bin", "xattr.txt"] {
        let _ = std::fs::remove_file(rootfs.join(f));
    }
    let _ = std::fs::remove_dir_all(rootfs.join("newdir"));
    let _ = std::fs::remove_file(vol.join("v.txt"));
    std::fs::write(rootfs.join("hostfile"), "from-host\n").expect("hostfile");
    std::os::unix::fs::symlink(outside.join("secret"), rootfs.join("escape")).expect("escape symlink");
    mknod_char(&rootfs.join("hostzero"), 1, 5); // the host's /dev/zero
    let mut mm = b"host-mmap-line\n".to_vec();
    mm.resize(8192, b'.');
    std::fs::write(rootfs.join("mmap.bin"), mm).expect("mmap.bin");
    std::fs::write(rootfs.join("xattr.txt"), "x\n").expect("xattr.txt");
    set_xattr(&rootfs.join("xattr.txt"), "user.host", b"host-value");
}

fn spec(root_readonly: bool, script: &str) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "user": {"uid": 0, "gid": 0}, "args": ["sh", "-c", script], "cwd": "/",
            "env": ["PATH=/bin"],
            "capabilities": {"bounding": CAPS, "effective": CAPS, "permitted": CAPS}
        },
        "root": {"path": format!("{SHARE_MOUNT}/rootfs"), "readonly": root_readonly},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]},
            {"destination": "/vol", "type": "bind", "source": format!("{SHARE_MOUNT}/vol"), "options": ["rbind", "rw"]},
            {"destination": "/data", "type": "bind", "source": RO_MOUNT, "options": ["rbind", "rw"]},
            {"destination": "/share", "type": "bind", "source": SHARE_MOUNT, "options": ["rbind", "ro"]}
        ],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}]}
    })
}

/// The read-write container: both directions, metadata, links, rename,
/// truncate, volumes, mmap, xattrs, a large directory, and the guest kept
/// inside the share. Each check prints a line the host looks for.
const RW_SCRIPT: &str = r#"
cat /hostfile
echo from-guest > /guestfile
chmod 640 /guestfile && chown 1000:1000 /guestfile
ln /guestfile /hardlink && ln -s guestfile /symlink
stat -c 'guest-stat: %a %u %g %h' /guestfile
echo "readlink: $(readlink /symlink)"
mv /hostfile /renamed && echo "renamed: $(cat /renamed)"
echo 0123456789 > /trunc && truncate -s 4 /trunc && echo "truncated: $(cat /trunc)"
mkdir -p /newdir/sub && echo mkdir-ok
echo to-volume > /vol/v.txt && echo volume-write-ok
echo "ro-volume-read: $(cat /data/data.txt)"
{ echo x > /data/nope; } 2>&1 || echo ro-volume-refused
cat /escape 2>&1 || echo escape-not-followed
{ echo pwned > /escape; } 2>&1 || echo escape-write-refused
cat /share/rootfs/../../outside/secret 2>&1 || echo dotdot-stayed
[ /share/.. -ef / ] && echo dotdot-is-the-container-root
head -c 4 /hostzero > /tmp/zero 2>/tmp/err && echo "device-opened: $(wc -c < /tmp/zero) bytes" || echo "device-refused: $(cat /tmp/err)"
fsprobe mmap /mmap.bin
fsprobe xattr /xattr.txt
echo "big-dir: $(ls /big | wc -l)"
echo rw-done
"#;

fn check(cond: bool, what: &str, run: &Finished) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(format!("{what}\n--- stdout:\n{}\n--- stderr:\n{}", run.output, run.stderr))
    }
}

fn rw_step(g: &Guest, rootfs: &Path, vol: &Path, outside: &Path, ro: &Path) -> Result<(), String> {
    let run = g.run("rw", &spec(false, RW_SCRIPT))?;
    eprintln!("read-write container, stdout:\n{}--- stderr:\n{}", run.output, run.stderr);
    let out = run.output.as_str();
    let has = |line: &str| out.lines().any(|l| l.trim() == line);
    check(run.status.exit_code == 0 && has("rw-done"), "the script ran to its end", &run)?;
    check(out.starts_with("from-host\n"), "host → guest", &run)?;
    check(has("guest-stat: 640 1000 1000 2"), "mode, owner and link count, as the guest sees them", &run)?;
    check(has("readlink: guestfile"), "symlink", &run)?;
    check(has("renamed: from-host"), "rename", &run)?;
    check(has("truncated: 0123"), "truncate", &run)?;
    check(has("mkdir-ok") && has("volume-write-ok"), "mkdir, volume write", &run)?;
    check(has("ro-volume-read: read-only data"), "the read-only volume is readable", &run)?;
    check(
        has("ro-volume-refused") && out.contains("Read-only file system"),
        "the read-only share refuses writes (EROFS from the device: the guest mount is rw)",
        &run,
    )?;
    check(
        has("escape-not-followed") && has("escape-write-refused") && !out.contains("host-secret"),
        "an absolute symlink is resolved in the guest, never to the host file",
        &run,
    )?;
    check(has("dotdot-stayed") && has("dotdot-is-the-container-root"), "`..` at the share root stays in the guest", &run)?;
    check(
        out.contains("device-refused:") && out.contains("Permission denied") && !out.contains("device-opened"),
        "a device node in the share opens nothing (the share is mounted nodev)",
        &run,
    )?;
    check(has("mmap-read: host-mmap-line") && has("mmap: ok"), "mmap of a shared file", &run)?;
    check(has("xattr-get: host-value") && has("xattr-list: user.host user.guest") && has("xattr: ok"), "xattrs, host → guest", &run)?;
    check(has(&format!("big-dir: {BIG_DIR_ENTRIES}")), "a large directory is listed whole", &run)?;

    // Guest → host.
    let host = |what: &str, ok: bool| if ok { Ok(()) } else { Err(format!("on the host: {what}")) };
    let guestfile = rootfs.join("guestfile");
    host("guestfile", std::fs::read_to_string(&guestfile).ok().as_deref() == Some("from-guest\n"))?;
    let meta = std::fs::metadata(&guestfile).map_err(|e| format!("guestfile: {e}"))?;
    let got = (meta.permissions().mode() & 0o777, meta.uid(), meta.gid(), meta.nlink());
    host(&format!("guestfile mode {:o}, owner and links {:?}", got.0, (got.1, got.2, got.3)), got == (0o640, 1000, 1000, 2))?;
    host("hard link", std::fs::metadata(rootfs.join("hardlink")).is_ok_and(|m| m.ino() == meta.ino()))?;
    host("symlink", std::fs::read_link(rootfs.join("symlink")).ok().as_deref() == Some(Path::new("guestfile")))?;
    host("rename", !rootfs.join("hostfile").exists() && rootfs.join("renamed").exists())?;
    host("truncate", std::fs::read(rootfs.join("trunc")).ok().as_deref() == Some(b"0123".as_slice()))?;
    host("mkdir", rootfs.join("newdir/sub").is_dir())?;
    host("volume", std::fs::read_to_string(vol.join("v.txt")).ok().as_deref() == Some("to-volume\n"))?;
    host("the read-only share is untouched", std::fs::read_dir(ro).map(Iterator::count).ok() == Some(1))?;
    host("the secret is untouched", std::fs::read_to_string(outside.join("secret")).ok().as_deref() == Some("host-secret\n"))?;
    host("the escape link is still a link", std::fs::symlink_metadata(rootfs.join("escape")).is_ok_and(|m| m.file_type().is_symlink()))?;
    let mm = std::fs::read(rootfs.join("mmap.bin")).map_err(|e| format!("mmap.bin: {e}"))?;
    host("written through the guest's mapping", mm.get(4096..4107) == Some(b"guest-mmap\n".as_slice()) && mm.len() == 8192)?;
    let x = rootfs.join("xattr.txt");
    host("xattr set in the guest", get_xattr(&x, "user.guest").as_deref() == Some(b"guest-value".as_slice()))?;
    host("xattr removed in the guest", get_xattr(&x, "user.host").is_none())?;
    Ok(())
}

fn ro_root_step(g: &Guest, rootfs: &Path) -> Result<(), String> {
    // Host changes are seen by a new container; a read-only root refuses writes.
    std::fs::write(rootfs.join("later"), "written-later\n").map_err(|e| e.to_string())?;
    let run = g.run("ro-root", &spec(true, "cat /later; { echo x > /rootwrite; } 2>&1 || echo root-refused"))?;
    check(run.output.starts_with("written-later\n"), "host → guest, later", &run)?;
    check(run.output.contains("root-refused") && run.output.contains("Read-only file system"), "read-only root", &run)?;
    if rootfs.join("rootwrite").exists() {
        return Err("a read-only root was written".into());
    }
    Ok(())
}

/// Runs a step; retries it once if it failed after the guest kernel
/// reported a user-mode fault (a kvm_pvm guest defect, see
/// [`guest_faults`]). Any other failure fails the test.
fn step(console: &Path, name: &str, mut f: impl FnMut() -> Result<(), String>) {
    for attempt in 1..=2 {
        let before = guest_faults(console);
        let started = std::time::Instant::now();
        match f() {
            Ok(()) => {
                eprintln!("step {name}: ok in {:?}", started.elapsed());
                return;
            }
            Err(e) if attempt == 1 && guest_faults(console) > before => {
                eprintln!("step {name}: failed ({e}) after the guest kernel reported a user-mode fault; retrying once");
            }
            Err(e) => panic!("step {name}: {e}"),
        }
    }
}

#[test]
fn shares_are_root_and_volumes_and_keep_the_guest_inside() {
    if !kvm_available("shares_are_root_and_volumes_and_keep_the_guest_inside") {
        return;
    }
    let assets = Assets::get();
    let dir = tempfile::tempdir().expect("tempdir");
    let share = dir.path().join("share");
    let rootfs = share.join("rootfs");
    build_rootfs(&rootfs);
    let vol = share.join("vol");
    std::fs::create_dir(&vol).expect("vol");
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).expect("ro");
    std::fs::write(ro.join("data.txt"), "read-only data\n").expect("write");
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).expect("outside");
    std::fs::write(outside.join("secret"), "host-secret\n").expect("secret");

    let vm_dir: PathBuf = dir.path().join("vm");
    std::fs::create_dir(&vm_dir).expect("vm dir");
    let guest_assets = GuestAssets { kernel: assets.kernel.clone(), initramfs: assets.initramfs.clone(), vmm: assets.bin("carapace-vmm") };
    let fs = vec![
        FsConfig { tag: "share".into(), shared_dir: share.clone(), read_only: false, cache: FsCacheMode::Auto },
        FsConfig { tag: "ro".into(), shared_dir: ro.clone(), read_only: true, cache: FsCacheMode::Auto },
    ];
    // ignore_loglevel: the kernel's reports of faulting user processes
    // reach the console (see `step`).
    let opts = VmOptions { vcpus: 1, mem_mib: 256, extra_cmdline: "ignore_loglevel".into(), fs, ..VmOptions::default() };
    let mut vm = Vm::start(&guest_assets, &vm_dir, &opts).expect("start the VM");
    let console = Vm::console_path(&vm_dir);
    let _console = ConsoleOnPanic(console.clone());
    let conn = vm.wait_for_agent(BOOT_DEADLINE).unwrap_or_else(|e| panic!("agent: {e}"));
    let g = Guest::new(conn, Vm::vsock_path(&vm_dir), 6000);

    let mut req = agent::CreateSandboxRequest::new();
    req.sandbox_id = "fs-e2e".into();
    req.hostname = "fs-e2e".into();
    // Both nodev, as the runtime mounts shares. "ro" is mounted read-write
    // on purpose: its writes must be refused by the VMM, not the guest.
    for (tag, at) in [("share", SHARE_MOUNT), ("ro", RO_MOUNT)] {
        let mut s = agent::SharedFs::new();
        s.tag = tag.into();
        s.mount_point = at.into();
        s.options = vec!["nodev".into()];
        req.shared_fs.push(s);
    }
    g.agent.create_sandbox(ctx(), &req).expect("CreateSandbox mounts both shares");

    step(&console, "read-write root", || {
        reset_rw_state(&rootfs, &vol, &outside);
        rw_step(&g, &rootfs, &vol, &outside, &ro)
    });
    step(&console, "read-only root", || ro_root_step(&g, &rootfs));

    g.agent.destroy_sandbox(ctx(), &agent::DestroySandboxRequest::new()).expect("DestroySandbox");
    carapace_runtime::agent::shutdown(&g.conn).expect("Shutdown");
    let status = vm.wait_timeout(Duration::from_secs(120)).expect("wait").expect("VMM exits");
    assert!(status.success(), "{status}");
}
