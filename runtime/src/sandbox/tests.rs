//! The sandbox sequence against the fake VM and agent. Binds need root and
//! a mount namespace of the test's own (taken per test thread).

use std::path::Path;
use std::sync::Arc;

use carapace_test_support::{can_run, Need};

use super::*;
use crate::test_utils::{FakeLauncher, VMM_PID};

/// A bundle in `dir` with a rootfs and one bind mount of `dir/data`.
fn bundle(dir: &Path, annotations: serde_json::Value, namespaces: serde_json::Value) -> Bundle {
    std::fs::create_dir_all(dir.join("rootfs")).expect("rootfs");
    std::fs::create_dir_all(dir.join("data")).expect("data");
    let spec = serde_json::json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "process": {"args": ["/bin/true"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
        "hostname": "box",
        "annotations": annotations,
        "mounts": [{"destination": "/data", "type": "bind", "source": dir.join("data"), "options": ["rbind"]}],
        "linux": {"namespaces": namespaces}
    });
    std::fs::write(dir.join("config.json"), spec.to_string()).expect("config.json");
    Bundle::load(dir).expect("bundle")
}

/// Boots sandbox `id` for bundle `b` in `tmp/sb` on a fake VM.
fn boot(launcher: &Arc<FakeLauncher>, tmp: &Path, id: &str, b: &Bundle) -> Sandbox {
    let config = Config::default();
    let dir = tmp.join("sb");
    let spec = SandboxSpec { id, dir: &dir, spec: &b.spec, bundle_dir: &b.dir, config: &config };
    Sandbox::boot(launcher, spec).expect("boot")
}

/// Runs `f` in a thread with a mount namespace of its own.
fn in_mount_ns(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare");
        nix::mount::mount(None::<&str>, "/", None::<&str>, nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE, None::<&str>)
            .expect("private");
        f();
    })
    .join()
    .expect("test thread");
}

#[test]
fn boot_creates_the_sandbox_then_containers_join_the_pods_namespaces() {
    if !can_run(module_path!(), &[Need::Root]) {
        return;
    }
    in_mount_ns(|| {
        let tmp = tempfile::tempdir().expect("tempdir");
        let launcher = Arc::new(FakeLauncher::default());
        let pause =
            bundle(&tmp.path().join("pause"), serde_json::json!({"io.kubernetes.cri.container-type": "sandbox"}), serde_json::json!([]));
        let sb = boot(&launcher, tmp.path(), "pod", &pause);
        assert_eq!(sb.vmm_pid(), VMM_PID);
        let guest = launcher.guest(0);
        let sandboxes = guest.sandboxes.lock().expect("sandboxes").clone();
        assert_eq!(sandboxes.len(), 1);
        assert_eq!(sandboxes[0].hostname, "box");
        assert_eq!(sandboxes[0].shared_fs[0].tag, share::SHARE_TAG);

        let app = bundle(
            &tmp.path().join("app"),
            serde_json::json!({"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "pod"}),
            serde_json::json!([{"type": "ipc", "path": "/proc/1/ns/ipc"}, {"type": "uts", "path": "/proc/1/ns/uts"}]),
        );
        let prepared = sb.prepare_container("app", &app, 7).expect("prepare");
        let data = sb.shared.join("app/mounts/0/data");
        assert!(data.is_dir(), "the bind keeps its source's name");
        assert!(crate::share::mounts_under(&sb.shared).iter().any(|m| m == &data), "bound");
        let pid = sb.create_container(&prepared, agent::StdioStreams::new()).expect("create");
        assert!(pid > 0);
        let created = guest.created.lock().expect("created").clone();
        assert_eq!(created[0].container_id, "app");
        assert_eq!(created[0].rootfs_path, "/run/carapace/shared/app/rootfs");

        sb.remove_binds(&prepared.view.binds);
        assert!(crate::share::mounts_under(&sb.shared).is_empty(), "binds undone");
        sb.stop();
        assert!(launcher.stopped(0));
        assert_eq!(guest.calls.lock().expect("calls").last().map(String::as_str), Some("Shutdown"));
    });
}

#[test]
fn a_failing_hook_undoes_the_binds() {
    if !can_run(module_path!(), &[Need::Root]) {
        return;
    }
    in_mount_ns(|| {
        let tmp = tempfile::tempdir().expect("tempdir");
        let launcher = Arc::new(FakeLauncher::default());
        let b = bundle(&tmp.path().join("c"), serde_json::json!({}), serde_json::json!([]));
        let mut spec = b.spec.clone();
        let hook: oci_spec::runtime::Hook = serde_json::from_value(serde_json::json!({"path": "/bin/false"})).expect("hook");
        let mut hooks = oci_spec::runtime::Hooks::default();
        hooks.set_create_runtime(Some(vec![hook]));
        spec.set_hooks(Some(hooks));
        let b = Bundle { spec, ..b };
        let sb = boot(&launcher, tmp.path(), "c", &b);
        let e = sb.prepare_container("c", &b, 7).expect_err("hook fails");
        assert!(matches!(e, SandboxError::Hook(_)), "{e}");
        assert!(crate::share::mounts_under(&sb.shared).is_empty(), "binds undone");
        sb.stop();
    });
}

#[test]
fn agent_errors_keep_the_status_code() {
    let status = ttrpc::Error::RpcStatus(ttrpc::get_status(ttrpc::Code::INVALID_ARGUMENT, "process: missing"));
    let e = SandboxError::agent("CreateContainer", status);
    assert!(matches!(e, SandboxError::Agent { code: Some(ttrpc::Code::INVALID_ARGUMENT), .. }));
    assert_eq!(e.to_string(), "CreateContainer: process: missing");
    let e = SandboxError::agent("CreateSandbox", ttrpc::Error::LocalClosed);
    assert!(matches!(e, SandboxError::Agent { code: None, .. }));
}

/// A restored VM's NICs are found by the template's MACs, in order.
#[test]
fn a_restored_vms_nics_are_found_by_the_template_macs() {
    let mut req = agent::CreateSandboxRequest::new();
    for mac in ["0a:00:00:00:00:01", "0a:00:00:00:00:02"] {
        let mut iface = agent::Interface::new();
        iface.mac = mac.into();
        req.interfaces.push(iface);
    }
    super::bind_template_nics(&mut req);
    let found: Vec<(&str, &str)> = req.interfaces.iter().map(|i| (i.device_mac.as_str(), i.mac.as_str())).collect();
    assert_eq!(found, [("02:ca:fe:00:00:00", "0a:00:00:00:00:01"), ("02:ca:fe:00:00:01", "0a:00:00:00:00:02")]);
}
