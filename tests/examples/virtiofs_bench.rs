//! virtio-fs benchmark (figures, never assertions): the workloads of
//! `bench/fsbench.c` (sequential write and read in 1 MiB blocks; small-file
//! create, stat and unlink) on the host directly and, in the same run,
//! inside a microVM in a container whose directories are virtio-fs shares
//! of the same host file system, with cache=none and cache=auto. Prints
//! MiB/s or files/s side by side, the guest/host ratios, how many system
//! calls each workload made (counted by fsbench, the same in both places),
//! and how many FUSE requests the VMM served for each share.
//!
//! ```sh
//! cargo run --release -p carapace-tests --example virtiofs_bench -- [--mib 64] [--files 500]
//! ```
//! Needs root, /dev/kvm, gcc with a static libc, and the assets
//! `scripts/setup.sh` builds (or CARAPACE_KERNEL / CARAPACE_INITRAMFS /
//! CARAPACE_BIN_DIR).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use carapace_protocol::agent;
use carapace_runtime::assets::GuestAssets;
use carapace_runtime::vm::{FsCacheMode, FsConfig, Vm, VmOptions};
use carapace_tests::guest::{ctx, Guest};
use carapace_tests::{repo_root, Assets, BOOT_DEADLINE};
use serde_json::json;

/// Where the agent mounts the shares in the guest.
const MOUNTS: &str = "/run/carapace";
const WORKLOADS: [&str; 5] = ["seq-write", "seq-read", "create", "stat", "unlink"];

/// One line of fsbench's output.
#[derive(Debug, Clone, Copy)]
struct Sample {
    units: f64,
    seconds: f64,
    syscalls: u64,
}

impl Sample {
    fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.units / self.seconds
        } else {
            f64::INFINITY
        }
    }
}

fn parse(output: &str) -> Result<Results> {
    let mut m = BTreeMap::new();
    for line in output.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if let [name, units, seconds, syscalls] = f[..] {
            let s = Sample { units: units.parse()?, seconds: seconds.parse()?, syscalls: syscalls.parse()? };
            m.insert(name.to_string(), s);
        }
    }
    for w in WORKLOADS {
        if !m.contains_key(w) {
            bail!("fsbench printed no {w} line:\n{output}");
        }
    }
    Ok(m)
}

struct Args {
    mib: u32,
    files: u32,
    mem_mib: u32,
}

fn args() -> Result<Args> {
    let mut a = Args { mib: 64, files: 500, mem_mib: 256 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        let n: u32 = value.parse().with_context(|| format!("{flag} {value}"))?;
        match flag.as_str() {
            "--mib" => a.mib = n,
            "--files" => a.files = n,
            "--mem-mib" => a.mem_mib = n,
            _ => bail!("usage: virtiofs_bench [--mib N] [--files N] [--mem-mib N]"),
        }
    }
    Ok(a)
}

fn build_fsbench(out: &Path) -> Result<()> {
    let src = repo_root().join("bench/fsbench.c");
    let status = Command::new("gcc").args(["-static", "-O2", "-o"]).arg(out).arg(&src).status().context("gcc (apt gcc libc6-dev)")?;
    if !status.success() {
        bail!("gcc -static {}: {status}", src.display());
    }
    Ok(())
}

/// The shares of the guest run: the rootfs, and for each cache mode one
/// directory for the sequential workloads and one for the small files (a
/// device each, so the VMM's request counts separate them).
fn shares(base: &Path) -> Result<Vec<FsConfig>> {
    let mut v = vec![FsConfig { tag: "rootfs".into(), shared_dir: base.join("rootfs"), read_only: true, cache: FsCacheMode::Always }];
    for (mode, cache) in [("none", FsCacheMode::None), ("auto", FsCacheMode::Auto)] {
        for kind in ["seq", "files"] {
            let tag = format!("{mode}-{kind}");
            let dir = base.join(&tag);
            std::fs::create_dir_all(&dir)?;
            v.push(FsConfig { tag, shared_dir: dir, read_only: false, cache });
        }
    }
    Ok(v)
}

/// fsbench's results by workload.
type Results = BTreeMap<String, Sample>;

/// The guest's results by cache mode, and the VMM's request-count lines.
fn run_guest(a: &Args, base: &Path) -> Result<(BTreeMap<String, Results>, Vec<String>)> {
    let assets = Assets::get();
    let guest_assets = GuestAssets { kernel: assets.kernel.clone(), initramfs: assets.initramfs.clone(), vmm: assets.bin("carapace-vmm") };
    let fs = shares(base)?;
    let vm_dir = base.join("vm");
    std::fs::create_dir_all(&vm_dir)?;
    let opts = VmOptions { vcpus: 1, mem_mib: a.mem_mib, fs: fs.clone(), ..VmOptions::default() };
    let boot = Instant::now();
    let mut vm = Vm::start(&guest_assets, &vm_dir, &opts)?;
    let conn = vm.wait_for_agent(BOOT_DEADLINE)?;
    eprintln!("guest booted in {:.1}s", boot.elapsed().as_secs_f64());
    // Each guest workload takes minutes where the guest kernel is emulated.
    let g = Guest::new(conn, Vm::vsock_path(&vm_dir), 7000).with_wait_timeout(Duration::from_secs(3600));

    let mut req = agent::CreateSandboxRequest::new();
    req.sandbox_id = "virtiofs-bench".into();
    for f in &fs {
        let mut s = agent::SharedFs::new();
        s.tag = f.tag.clone();
        s.mount_point = format!("{MOUNTS}/{}", f.tag);
        s.options = vec!["nodev".into()];
        req.shared_fs.push(s);
    }
    g.agent.create_sandbox(ctx(), &req).map_err(|e| anyhow::anyhow!("CreateSandbox: {e:?}"))?;

    let mut results = BTreeMap::new();
    for mode in ["none", "auto"] {
        let spec = json!({
            "ociVersion": "1.0.2",
            "process": {"user": {"uid": 0, "gid": 0}, "cwd": "/", "env": ["PATH=/"],
                        "args": ["/fsbench", "/seq", "/files", a.mib.to_string(), a.files.to_string()]},
            "root": {"path": format!("{MOUNTS}/rootfs"), "readonly": true},
            "mounts": [
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
                {"destination": "/seq", "type": "bind", "source": format!("{MOUNTS}/{mode}-seq"), "options": ["rbind", "rw"]},
                {"destination": "/files", "type": "bind", "source": format!("{MOUNTS}/{mode}-files"), "options": ["rbind", "rw"]}
            ],
            "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}
        });
        let t = Instant::now();
        let run = g.run(&format!("bench-{mode}"), &spec).map_err(anyhow::Error::msg)?;
        if run.status.exit_code != 0 {
            bail!("guest fsbench (cache={mode}) exited {:?}: {}{}", run.status, run.output, run.stderr);
        }
        eprintln!("guest cache={mode}: container ran in {:.1}s", t.elapsed().as_secs_f64());
        results.insert(mode.to_string(), parse(&run.output)?);
    }

    g.agent.destroy_sandbox(ctx(), &agent::DestroySandboxRequest::new()).map_err(|e| anyhow::anyhow!("DestroySandbox: {e:?}"))?;
    carapace_runtime::agent::shutdown(&g.conn)?;
    if vm.wait_timeout(Duration::from_secs(120))?.is_none() {
        vm.kill();
        bail!("the VMM did not exit after Shutdown");
    }
    // The device's request counts, logged as each worker stops.
    let log = std::fs::read_to_string(vm_dir.join("vmm.log")).unwrap_or_default();
    let served =
        log.lines().filter_map(|l| l.find("virtio-fs ").map(|i| &l[i..])).filter(|l| l.contains(" served ")).map(str::to_string).collect();
    Ok((results, served))
}

fn rate(s: &Sample, workload: &str) -> String {
    let unit = if workload.starts_with("seq") { "MiB/s" } else { "files/s" };
    format!("{:.1} {unit}", s.rate())
}

fn main_inner() -> Result<()> {
    let a = args()?;
    // The VMM logs each virtio-fs device's request counts at info level
    // when it stops; the VMM inherits this environment. Set before any
    // thread starts.
    std::env::set_var("CARAPACE_VMM_LOG", "warn,carapace_vmm::devices::virtio::fs=info");
    let tmp = tempfile::tempdir()?;
    let base = tmp.path();
    let rootfs = base.join("rootfs");
    for d in ["dev", "seq", "files"] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    build_fsbench(&rootfs.join("fsbench"))?;

    // The host, on the file system that backs the shares.
    let host_dir = base.join("host");
    std::fs::create_dir(&host_dir)?;
    let out = Command::new(rootfs.join("fsbench")).arg(&host_dir).arg(&host_dir).args([a.mib.to_string(), a.files.to_string()]).output()?;
    if !out.status.success() {
        bail!("host fsbench: {}", String::from_utf8_lossy(&out.stdout));
    }
    let host = parse(&String::from_utf8_lossy(&out.stdout))?;

    let (guest, served) = run_guest(&a, base)?;

    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    println!(
        "virtio-fs: {} MiB sequential in 1 MiB blocks, {} small files; guest 1 vCPU, {} MiB{}",
        a.mib,
        a.files,
        a.mem_mib,
        if pvm { "; kvm_pvm host (guest kernel emulated, ~0.6 ms per guest syscall)" } else { "" }
    );
    println!(
        "{:<10} {:>15} {:>17} {:>8} {:>17} {:>8} {:>9}",
        "workload", "host", "guest cache=none", "ratio", "guest cache=auto", "ratio", "syscalls"
    );
    for w in WORKLOADS {
        let h = &host[w];
        let mut line = format!("{w:<10} {:>15}", rate(h, w));
        for mode in ["none", "auto"] {
            let g = &guest[mode][w];
            line.push_str(&format!(" {:>17} {:>8.4}", rate(g, w), g.rate() / h.rate()));
        }
        let counts: Vec<u64> = ["none", "auto"].iter().map(|m| guest[*m][w].syscalls).collect();
        // fsbench counts its own calls: the same program, so the same
        // count on the host and in the guest.
        if counts.iter().any(|&c| c != h.syscalls) {
            line.push_str(&format!(" {:>9} (guest {counts:?})", h.syscalls));
        } else {
            line.push_str(&format!(" {:>9}", h.syscalls));
        }
        println!("{line}");
    }
    println!("FUSE requests the VMM served per share (including the mount's INIT and the container's bind mount):");
    for s in served {
        println!("  {s}");
    }
    Ok(())
}

fn main() -> ExitCode {
    match main_inner() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("virtiofs_bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
