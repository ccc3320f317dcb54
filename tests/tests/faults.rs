//! Issue 7, faults at lifecycle steps: the CLI killed during create, the
//! VMM killed while the container runs, the guest's PID 1 going away. Each
//! time the state reads `stopped` with a reason (or the create is gone), and
//! `delete` leaves nothing: no process, mount, socket or state directory,
//! and no tap in the pod network namespace the sleeper joins.

use std::time::Duration;

use carapace_tests::cli::{bundle, Cli};
use carapace_tests::netns::PodNetns;
use carapace_tests::{kvm_available, processes_matching, wait_for, BOOT_DEADLINE};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(180);

fn kill9(pid: u32) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill -9");
}

#[test]
fn killed_cli_vmm_and_guest_init_leave_nothing_behind() {
    if !kvm_available("killed_cli_vmm_and_guest_init_leave_nothing_behind") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    // Cold boots: step 1 kills `create` while the guest kernel boots.
    let config = tmp.path().join("cold.toml");
    std::fs::write(&config, "vm_templates = false\n").expect("config");
    let cli = Cli::new(&tmp.path().join("root")).with_env("CARAPACE_CONFIG", &config);
    let netns = PodNetns::create("faults");
    let sleeper = bundle(&cli, &tmp.path().join("sleeper"), |s| {
        s["process"]["args"] = json!(["sleep", "100000"]);
        let ns = s["linux"]["namespaces"].as_array_mut().expect("namespaces");
        ns.retain(|n| n["type"] != "network");
        ns.push(json!({"type": "network", "path": netns.path()}));
    });
    let no_tap = || {
        let links = netns.links();
        assert!(!links.contains("cptap"), "a tap left in the pod's netns:\n{links}");
    };
    let b = sleeper.display().to_string();

    // 1. `create` killed while the VM boots: delete stops the half-made sandbox.
    let mut create = cli.command(&["create", "--bundle", &b, "f1"]).spawn().expect("create");
    let vmm_of_f1 = format!("{}/f1/vmm.json", cli.root.display());
    let booting = wait_for(BOOT_DEADLINE, || processes_matching(&vmm_of_f1).first().copied());
    assert!(booting.is_some(), "the VMM of f1 started");
    kill9(create.id());
    let _ = create.wait();
    let status = cli.state("f1")["status"].clone();
    assert!(status == "creating" || status == "stopped", "{status}");
    cli.ok(&["delete", "--force", "f1"]);
    cli.assert_nothing_left();
    no_tap();

    // 2. The VMM killed under a running container: stopped, with a reason.
    cli.ok_detached(&["run", "--detach", "--bundle", &b, "f2"]);
    let vmm = cli.vmm_pid("f2");
    kill9(vmm);
    assert!(cli.wait_status("f2", "stopped", DEADLINE), "{}", cli.state("f2"));
    let reason = cli.state("f2")["stopReason"].as_str().unwrap_or_default().to_string();
    assert!(reason.contains("VM"), "stop reason: {reason:?}");
    cli.ok(&["delete", "f2"]);
    cli.assert_nothing_left();
    no_tap();
    assert!(!netns.eth0_filters().contains("mirred"), "the redirect outlived the VM");

    // 3. The guest's PID 1 (the agent) goes away: a container sharing its pid
    // namespace sends it SIGTERM, the agent stops and the VM with it.
    let shared_pid = bundle(&cli, &tmp.path().join("shared-pid"), |s| {
        s["process"]["args"] = json!(["sh", "-c", "sleep 5; kill -TERM 1; sleep 100000"]);
        let ns = s["linux"]["namespaces"].as_array_mut().expect("namespaces");
        ns.retain(|n| n["type"] != "pid");
    });
    cli.ok_detached(&["run", "--detach", "--bundle", &shared_pid.display().to_string(), "f3"]);
    assert!(cli.wait_status("f3", "stopped", DEADLINE), "{}", cli.state("f3"));
    let reason = cli.state("f3")["stopReason"].as_str().unwrap_or_default().to_string();
    assert!(!reason.is_empty(), "a stop reason is given");
    cli.ok(&["delete", "f3"]);
    cli.assert_nothing_left();

    // 4. The monitor killed: its VMM dies with it (PDEATHSIG), the state
    // says so, and delete cleans up.
    cli.ok_detached(&["run", "--detach", "--bundle", &b, "f4"]);
    let vmm = cli.vmm_pid("f4");
    let monitor = processes_matching("_monitor --ready-fd")
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.contains(&cli.root.display().to_string()) && c.ends_with("f4\0"))
        })
        .expect("the monitor of f4");
    kill9(monitor);
    assert!(cli.wait_status("f4", "stopped", DEADLINE), "{}", cli.state("f4"));
    assert!(
        wait_for(Duration::from_secs(30), || (!std::path::Path::new(&format!("/proc/{vmm}")).exists()).then_some(())).is_some(),
        "the VMM died with its monitor"
    );
    cli.ok(&["delete", "f4"]);
    cli.assert_nothing_left();
    no_tap();
}
