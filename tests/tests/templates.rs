//! Issue 12, end to end: sandboxes start from a VM template instead of a
//! kernel boot, as a user of the `carapace` CLI sees it.
//!
//! One session against a private template directory (a config file with
//! `template_dir`) and a private copy of the initramfs: the first `run`
//! makes the template and starts from it; later runs restore from it, two
//! at once are two machines (their own output, exit code, entropy, uuid,
//! memory) with the host's time; a corrupted template falls back to a cold
//! boot and the container still runs; a rebuilt initramfs makes a new
//! template that replaces the old; `template rm` drops it; nothing is left.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use carapace_tests::cli::{bundle, Cli};
use carapace_tests::{kvm_available, processes_matching, wait_for, Assets, BOOT_DEADLINE};
use serde_json::{json, Value};

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs()
}

/// `carapace --debug --log LOG run --bundle B ID`, started.
fn spawn_run(cli: &Cli, bundle: &Path, id: &str, log: &Path, out: &Path) -> Child {
    let file = std::fs::File::create(out).expect("out file");
    cli.command(&["--debug", "--log", &log.display().to_string(), "run", "--bundle", &bundle.display().to_string(), id])
        .stdout(file.try_clone().expect("dup"))
        .stderr(file)
        .stdin(Stdio::null())
        .spawn()
        .expect("carapace run")
}

/// Waits for a `run`; returns its exit code, output and log.
fn finish(mut child: Child, out: &Path, log: &Path) -> (i32, String, String) {
    let status = wait_for(BOOT_DEADLINE * 2, || child.try_wait().expect("wait").map(Some)).flatten();
    let Some(status) = status else {
        let _ = child.kill();
        panic!("`carapace run` did not end\n{}", std::fs::read_to_string(log).unwrap_or_default());
    };
    let text = std::fs::read_to_string(out).unwrap_or_default();
    let log = std::fs::read_to_string(log).unwrap_or_default();
    (status.code().unwrap_or(-1), text, log)
}

fn run(cli: &Cli, bundle: &Path, id: &str, dir: &Path) -> (i32, String, String) {
    let (out, log) = (dir.join(format!("{id}.out")), dir.join(format!("{id}.log")));
    finish(spawn_run(cli, bundle, id, &log, &out), &out, &log)
}

fn templates(cli: &Cli) -> Vec<Value> {
    let listed: Value = serde_json::from_str(&cli.ok(&["template", "list", "--format", "json"])).expect("template list JSON");
    listed.as_array().expect("array").clone()
}

/// The value after `name=` on the output's line that starts with it.
fn field<'a>(out: &'a str, name: &str) -> &'a str {
    let prefix = format!("{name}=");
    out.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap_or_else(|| panic!("no {name}= in the output: {out}"))
}

/// A fresh file with the initramfs's bytes at `path` (a rebuild, as far
/// as file identity goes).
fn copy_initramfs(from: &Path, path: &Path) {
    let tmp = path.with_extension("tmp");
    std::fs::copy(from, &tmp).expect("copy initramfs");
    std::fs::rename(&tmp, path).expect("rename initramfs");
}

fn template_vmms(template_dir: &Path) -> Vec<u32> {
    processes_matching(&template_dir.display().to_string())
}

#[test]
fn sandboxes_start_from_a_template_the_first_run_made() {
    if !kvm_available("sandboxes_start_from_a_template_the_first_run_made") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let t = tmp.path();
    let template_dir = t.join("templates");
    let initramfs: PathBuf = t.join("initramfs.cpio");
    copy_initramfs(&Assets::get().initramfs, &initramfs);
    let config = t.join("config.toml");
    std::fs::write(&config, format!("vm_templates = true\ntemplate_dir = {:?}\n", template_dir.display().to_string())).expect("config");
    let cli = Cli::new(&t.join("root")).with_env("CARAPACE_CONFIG", &config).with_env("CARAPACE_INITRAMFS", &initramfs);
    assert!(templates(&cli).is_empty());

    // Each container reports what makes a machine itself.
    let script = "echo uuid=$(cat /proc/sys/kernel/random/uuid); \
                  echo random=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'); \
                  echo date=$(date +%s); \
                  echo $1 > /dev/shm/mine; echo shm=$(ls /dev/shm | tr '\\n' ,); exit $2";
    let make_bundle = |name: &str, code: i32| {
        bundle(&cli, &t.join(name), |s| {
            s["process"]["args"] = json!(["sh", "-c", script, "sh", name, code.to_string()]);
        })
    };

    // 1. The first run makes the template, then starts from it.
    let first = make_bundle("first", 0);
    let (code, out, log) = run(&cli, &first, "first", t);
    assert_eq!(code, 0, "first run: {out}\n{log}");
    assert!(log.contains("template made"), "the first run made no template:\n{log}");
    assert!(log.contains("restored from template"), "the first run did not start from the template:\n{log}");
    let listed = templates(&cli);
    assert_eq!(listed.len(), 1, "{listed:?}");
    let key = listed[0]["key"].as_str().expect("key").to_string();
    assert_eq!(listed[0]["complete"], true, "{listed:?}");
    eprintln!("template {key}: cold boot {} ms, {} bytes on disk", listed[0]["boot_ms"], listed[0]["disk_bytes"]);

    // 2. Two at once, both restored from it: two machines.
    let (a, b) = (make_bundle("a", 3), make_bundle("b", 4));
    let before = now();
    let runs = [("a", &a), ("b", &b)].map(|(id, bundle)| {
        let (out, log) = (t.join(format!("{id}.out")), t.join(format!("{id}.log")));
        (spawn_run(&cli, bundle, id, &log, &out), out, log)
    });
    let [(ca, oa, la), (cb, ob, lb)] = runs;
    let (code_a, out_a, log_a) = finish(ca, &oa, &la);
    let (code_b, out_b, log_b) = finish(cb, &ob, &lb);
    let after = now();
    assert_eq!((code_a, code_b), (3, 4), "each returns its own exit code\n{out_a}\n{log_a}\n{out_b}\n{log_b}");
    for (out, log) in [(&out_a, &log_a), (&out_b, &log_b)] {
        assert!(log.contains("restored from template") && !log.contains("template made"), "not restored:\n{log}");
        let date: u64 = field(out, "date").trim().parse().expect("date +%s");
        assert!(before.saturating_sub(2) <= date && date <= after + 2, "guest date {date} outside the host's {before}..{after}");
    }
    assert_ne!(field(&out_a, "uuid"), field(&out_b, "uuid"), "the two clones have one uuid source");
    assert_ne!(field(&out_a, "random"), field(&out_b, "random"), "the two clones read the same /dev/urandom bytes");
    assert_eq!(field(&out_a, "shm"), "mine,", "a sees only its own file: {out_a}");
    assert_eq!(field(&out_b, "shm"), "mine,", "b sees only its own file: {out_b}");
    eprintln!("a: {out_a}b: {out_b}");

    // 3. A corrupted template: a cold boot, the container still runs, and
    // the template is dropped.
    let state = template_dir.join(&key).join("state");
    let mut bytes = std::fs::read(&state).expect("template state");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&state, bytes).expect("corrupt the state");
    let (code, out, log) = run(&cli, &first, "corrupted", t);
    assert_eq!(code, 0, "with a corrupted template: {out}\n{log}");
    assert!(log.contains("booting cold"), "no cold boot logged:\n{log}");
    assert!(log.contains("corrupted") || log.contains("checksum"), "the reason is not named:\n{log}");
    assert!(!template_dir.join(&key).exists(), "the corrupted template is still there");

    // 4. A rebuilt initramfs: a new template (another key).
    copy_initramfs(&Assets::get().initramfs, &initramfs);
    let (code, out, log) = run(&cli, &first, "rebuilt", t);
    assert_eq!(code, 0, "after the rebuild: {out}\n{log}");
    assert!(log.contains("template made") && log.contains("restored from template"), "{log}");
    let listed = templates(&cli);
    assert_eq!(listed.len(), 1, "{listed:?}");
    let new_key = listed[0]["key"].as_str().expect("key").to_string();
    assert_ne!(new_key, key, "the rebuilt initramfs did not make a new template");

    // 5. `template rm`, and nothing left behind.
    assert!(cli.fails(&["template", "rm", "0123456789abcdef"]).contains("no template 0123456789abcdef"));
    cli.ok(&["template", "rm", &new_key]);
    assert!(templates(&cli).is_empty());
    cli.assert_nothing_left();
    let left = wait_for(Duration::from_secs(30), || template_vmms(&template_dir).is_empty().then_some(()));
    assert!(left.is_some(), "template VMMs left: {:?}", template_vmms(&template_dir));
}
