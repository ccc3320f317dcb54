//! Issue 7, load: a short run of `bench/soak.py` (sequential run/delete
//! cycles, sandboxes at once, an exec loop in a long-running sandbox),
//! which fails on any leak of state, processes, mounts, file handles or
//! VMM memory. The full size is a benchmark: `python3 bench/soak.py`.

use carapace_tests::{kvm_available, repo_root, Assets};

#[test]
fn a_short_soak_leaks_nothing() {
    if !kvm_available("a_short_soak_leaks_nothing") {
        return;
    }
    let assets = Assets::get();
    let out = std::process::Command::new("python3")
        .arg(repo_root().join("bench/soak.py"))
        .args(["--cycles", "3", "--parallel", "2", "--execs", "8"])
        .env("CARAPACE_KERNEL", &assets.kernel)
        .env("CARAPACE_INITRAMFS", &assets.initramfs)
        .env("CARAPACE_BIN_DIR", &assets.bin_dir)
        .output()
        .expect("python3 bench/soak.py");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{text}");
    assert!(out.status.success(), "soak found a leak or a failure:\n{text}");
    assert!(text.contains("ok: nothing leaked"), "{text}");
}
