//! Guest network setup for real, on the host, as root: each test runs in a
//! thread of its own that has moved to a new network namespace (they are
//! per thread), makes veth pairs there with iproute2 and checks with
//! `ip -j` what the agent's configuration did. The host's own network is
//! never touched: commands are spawned from that thread, so they run in its
//! namespace too, and the namespace goes away with the thread.

use std::path::Path;
use std::process::Command;

use carapace_agent::network::{self, NetworkConfig, NetworkError};
use carapace_agent::sandbox::Sandbox;
use carapace_protocol::agent;
use serde_json::Value;

const MAC_A: &str = "02:00:00:c0:ff:0a";
const MAC_B: &str = "02:00:00:c0:ff:0b";

/// This build's agent, or the one `CARAPACE_AGENT_BIN` names (e.g. the
/// static build that goes into the initramfs).
fn agent_bin() -> String {
    std::env::var("CARAPACE_AGENT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_carapace-agent").to_string())
}

fn ip_bin() -> Option<&'static str> {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"].into_iter().find(|p| Path::new(p).exists())
}

/// Root (network namespaces) and iproute2's `ip`; skips, or fails under
/// CARAPACE_REQUIRE_KVM=1.
fn can_run(test: &str) -> bool {
    use carapace_test_support::{can_run, skip, Need};
    if !can_run(test, &[Need::Root]) {
        return false;
    }
    ip_bin().is_some() || skip(test, "iproute2's ip")
}

/// Runs `f` in a new thread in a new network namespace.
fn in_new_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
            f()
        })
        .join()
        .expect("the test thread")
    })
}

/// `ip ARGS` in the calling thread's namespace; its stdout.
fn ip(args: &[&str]) -> String {
    let out = Command::new(ip_bin().expect("ip")).args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip_json(args: &[&str]) -> Value {
    let mut all = vec!["-j"];
    all.extend_from_slice(args);
    serde_json::from_str(&ip(&all)).expect("ip -j output")
}

/// A veth pair: `name` with `mac` (the "guest device"), and its peer up, so
/// that the device has a carrier once it is up.
fn veth(name: &str, mac: &str) {
    let peer = format!("{name}p");
    ip(&["link", "add", name, "address", mac, "type", "veth", "peer", "name", &peer]);
    ip(&["link", "set", &peer, "up"]);
}

fn interface(mac: &str, name: &str, addresses: &[(&str, u32)], mtu: u32) -> agent::Interface {
    let mut i = agent::Interface::new();
    i.mac = mac.into();
    i.name = name.into();
    i.mtu = mtu;
    for (a, len) in addresses {
        let mut ip = agent::IpAddress::new();
        ip.address = (*a).into();
        ip.prefix_len = *len;
        i.addresses.push(ip);
    }
    i
}

fn route(destination: &str, gateway: &str, device: &str, scope: u32) -> agent::Route {
    let mut r = agent::Route::new();
    r.destination = destination.into();
    r.gateway = gateway.into();
    r.device = device.into();
    r.scope = scope;
    r
}

/// The link called `name` in `ip -j addr` output.
fn link<'a>(addrs: &'a Value, name: &str) -> &'a Value {
    addrs.as_array().expect("array").iter().find(|l| l["ifname"] == name).unwrap_or_else(|| panic!("no {name} in {addrs:#}"))
}

fn has_flag(link: &Value, flag: &str) -> bool {
    link["flags"].as_array().is_some_and(|f| f.iter().any(|x| x == flag))
}

fn addresses(link: &Value) -> Vec<String> {
    link["addr_info"]
        .as_array()
        .expect("addr_info")
        .iter()
        // Not the fe80:: address the kernel adds itself.
        .filter(|a| a["scope"] == "global")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap_or("?"), a["prefixlen"]))
        .collect()
}

#[test]
fn configures_interfaces_and_routes_in_a_private_netns() {
    if !can_run("configures_interfaces_and_routes_in_a_private_netns") {
        return;
    }
    in_new_netns(|| {
        veth("veth-a", MAC_A);
        veth("veth-b", MAC_B);
        // Up already: it must be taken down to be renamed.
        ip(&["link", "set", "veth-b", "up"]);

        let interfaces = [
            interface(&MAC_A.to_uppercase(), "eth0", &[("10.88.0.5", 16), ("fd00::5", 64)], 1400),
            interface(MAC_B, "eth1", &[("192.168.7.2", 24)], 0),
        ];
        let routes = [
            route("", "10.88.0.1", "", 0),
            // An on-link /32, then a network behind it.
            route("10.200.0.1/32", "", "eth1", 253),
            route("10.201.0.0/16", "10.200.0.1", "eth1", 0),
            route("::/0", "fd00::1", "eth0", 0),
        ];
        network::configure(&interfaces, &routes).expect("configure");

        let addrs = ip_json(&["addr", "show"]);
        let lo = link(&addrs, "lo");
        assert!(has_flag(lo, "UP"), "lo: {lo:#}");
        let eth0 = link(&addrs, "eth0");
        assert_eq!(eth0["address"], MAC_A);
        assert_eq!(eth0["mtu"], 1400);
        assert!(has_flag(eth0, "UP"), "eth0: {eth0:#}");
        let eth0_addrs = addresses(eth0);
        assert!(eth0_addrs.contains(&"10.88.0.5/16".to_string()), "{eth0_addrs:?}");
        assert!(eth0_addrs.contains(&"fd00::5/64".to_string()), "{eth0_addrs:?}");
        let v6 = eth0["addr_info"].as_array().expect("addr_info").iter().find(|a| a["local"] == "fd00::5").expect("fd00::5");
        // NODAD: usable at once, never tentative.
        assert!(v6.get("tentative").is_none() && v6.get("nodad") == Some(&Value::Bool(true)), "{v6:#}");
        let eth1 = link(&addrs, "eth1");
        assert_eq!(eth1["address"], MAC_B);
        assert_eq!(eth1["mtu"], 1500);
        assert!(has_flag(eth1, "UP"), "eth1: {eth1:#}");
        assert_eq!(addresses(eth1), ["192.168.7.2/24"]);
        assert!(link(&addrs, "veth-ap").get("ifname").is_some(), "the peers keep their names");

        let routes4 = ip_json(&["-4", "route", "show"]);
        let find = |routes: &Value, dst: &str| -> Value {
            routes
                .as_array()
                .expect("routes")
                .iter()
                .find(|r| r["dst"] == dst)
                .cloned()
                .unwrap_or_else(|| panic!("no route to {dst} in {routes:#}"))
        };
        let default = find(&routes4, "default");
        assert_eq!((default["gateway"].as_str(), default["dev"].as_str()), (Some("10.88.0.1"), Some("eth0")));
        let onlink = find(&routes4, "10.200.0.1");
        assert_eq!((onlink["dev"].as_str(), onlink["scope"].as_str()), (Some("eth1"), Some("link")));
        assert!(onlink.get("gateway").is_none(), "{onlink:#}");
        let behind = find(&routes4, "10.201.0.0/16");
        assert_eq!((behind["gateway"].as_str(), behind["dev"].as_str()), (Some("10.200.0.1"), Some("eth1")));
        let routes6 = ip_json(&["-6", "route", "show"]);
        let default6 = find(&routes6, "default");
        assert_eq!((default6["gateway"].as_str(), default6["dev"].as_str()), (Some("fd00::1"), Some("eth0")));

        // A gateway on no subnet of the guest: the kernel refuses.
        let err = network::configure(&[], &[route("10.50.0.0/16", "10.99.0.1", "", 0)]).expect_err("unreachable");
        assert_eq!(err.to_string(), "routes[0] (10.50.0.0/16 via 10.99.0.1): Network is unreachable");
        assert_eq!(err.code(), ttrpc::Code::INTERNAL);

        // The same again: the devices are found by MAC under their new
        // names, and the first address already there is the error.
        let err = network::configure(&interfaces, &routes).expect_err("addresses exist");
        assert_eq!(err.to_string(), "interfaces[0].addresses[0]: File exists");
        assert_eq!(err.code(), ttrpc::Code::INTERNAL);
        assert!(matches!(err, NetworkError::Refused { .. }));
    });
}

#[test]
fn bad_input_is_named_and_changes_nothing() {
    if !can_run("bad_input_is_named_and_changes_nothing") {
        return;
    }
    in_new_netns(|| {
        veth("veth-a", MAC_A);
        let before = (ip(&["addr", "show"]), ip(&["route", "show", "table", "all"]));
        let good = || interface(MAC_A, "eth0", &[("10.88.0.5", 16)], 0);
        let cases: Vec<(Vec<agent::Interface>, Vec<agent::Route>, &str)> = vec![
            (
                vec![good(), interface("02:00:00:00:00:99", "eth1", &[], 0)],
                vec![],
                "interfaces[1].mac \"02:00:00:00:00:99\": no such device",
            ),
            (
                vec![good()],
                vec![route("10.0.0.0/33", "10.88.0.1", "", 0)],
                "routes[0].destination \"10.0.0.0/33\": not a CIDR: the prefix length must be 0 to 32",
            ),
            (vec![good()], vec![route("", "10.88.0.1", "", 0), route("", "gw", "", 0)], "routes[1].gateway \"gw\": not an IP address"),
            (vec![good()], vec![route("10.9.0.0/16", "", "veth-a", 0)], "routes[0].device \"veth-a\": no such device"),
            (
                vec![interface(MAC_A, "", &[("10.88.0.5", 40)], 0)],
                vec![],
                "interfaces[0].addresses[0] \"10.88.0.5/40\": prefix_len must be 1 to 32",
            ),
        ];
        for (interfaces, routes, expected) in cases {
            let err = network::configure(&interfaces, &routes).expect_err(expected);
            assert_eq!(err.to_string(), expected);
            assert_eq!(err.code(), ttrpc::Code::INVALID_ARGUMENT, "{err}");
        }
        let after = (ip(&["addr", "show"]), ip(&["route", "show", "table", "all"]));
        assert_eq!(before, after, "bad input changed the network");

        // Empty asks for nothing (and opens no socket).
        NetworkConfig::from_request(&[], &[]).expect("empty").apply().expect("nothing");
        assert_eq!(before.0, ip(&["addr", "show"]));
    });
}

#[test]
fn create_sandbox_configures_only_in_a_guest() {
    if !can_run("create_sandbox_configures_only_in_a_guest") {
        return;
    }
    in_new_netns(|| {
        veth("veth-a", MAC_A);
        let dir = tempfile::tempdir().expect("tempdir");
        let mut req = agent::CreateSandboxRequest::new();
        req.sandbox_id = "net".into();
        req.interfaces.push(interface(MAC_A, "eth0", &[("10.88.0.5", 16)], 0));
        req.routes.push(route("", "10.88.0.1", "", 0));

        // Serving on a host, the agent leaves the network alone.
        let before = ip(&["addr", "show"]);
        Sandbox::new(dir.path().join("host-etc"), false).create(&req).expect("create on a host");
        assert_eq!(before, ip(&["addr", "show"]));

        // As the guest's agent (this thread's namespace stands for the
        // guest; nothing else of the request touches the host).
        let guest = Sandbox::new(dir.path().join("etc"), true);
        let mut unknown = req.clone();
        unknown.interfaces[0].mac = "02:00:00:00:00:99".into();
        let err = guest.create(&unknown).expect_err("unknown MAC");
        assert_eq!(err.code(), ttrpc::Code::INVALID_ARGUMENT);
        assert_eq!(err.to_string(), "interfaces[0].mac \"02:00:00:00:00:99\": no such device");

        guest.create(&req).expect("create");
        let addrs = ip_json(&["addr", "show"]);
        assert_eq!(addresses(link(&addrs, "eth0")), ["10.88.0.5/16"]);
        assert!(ip(&["route", "show"]).contains("default via 10.88.0.1 dev eth0"));
        guest.destroy(0).expect("destroy");
    });
}

/// The whole path: the agent binary as PID 1 of new PID, mount and network
/// namespaces (its "guest"), CreateSandbox over ttrpc, the result seen
/// from outside with nsenter.
#[test]
fn create_sandbox_over_ttrpc_configures_the_agents_namespace() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::time::Duration;

    if !can_run("create_sandbox_over_ttrpc_configures_the_agents_namespace") {
        return;
    }
    let (Some(unshare), Some(nsenter)) = (
        ["/usr/bin/unshare", "/bin/unshare"].into_iter().find(|p| Path::new(p).exists()),
        ["/usr/bin/nsenter", "/bin/nsenter"].into_iter().find(|p| Path::new(p).exists()),
    ) else {
        carapace_test_support::skip("create_sandbox_over_ttrpc_configures_the_agents_namespace", "unshare and nsenter (util-linux)");
        return;
    };
    // Not under /tmp or /run (the agent mounts tmpfs there in its
    // namespace), nor under the target dir, which may itself be in /tmp.
    std::fs::create_dir_all("/var/tmp").expect("/var/tmp");
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let sock = dir.path().join("agent.sock");
    let mut child = Command::new(unshare)
        // --kill-child: the agent goes with unshare if the test fails.
        .args(["--pid", "--fork", "--kill-child", "--mount", "--propagation", "private", "--net"])
        .arg(agent_bin())
        .arg("--listen")
        .arg(format!("unix://{}", sock.display()))
        .stdout(Stdio::piped())
        .spawn()
        .expect("start unshare");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().expect("stdout");
    let unshare_pid = child.id();
    let _child = Kill(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(20)).expect("the agent's first line");
    assert!(line.contains("serving on unix://"), "{line:?}");
    let children = std::fs::read_to_string(format!("/proc/{unshare_pid}/task/{unshare_pid}/children")).expect("unshare's children");
    let agent_pid = children.split_whitespace().next().expect("the agent's pid").to_string();
    let netns = format!("--net=/proc/{agent_pid}/ns/net");
    let in_guest = |args: &[&str]| -> String {
        let out = Command::new(nsenter).arg(&netns).arg(ip_bin().expect("ip")).args(args).output().expect("nsenter");
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    in_guest(&["link", "add", "veth-a", "address", MAC_A, "type", "veth", "peer", "name", "veth-ap"]);
    in_guest(&["link", "set", "veth-ap", "up"]);

    let conn = carapace_protocol::client::connect_unix(&sock).expect("connect");
    let agent = carapace_protocol::AgentClient::new(conn);
    let ctx = || ttrpc::context::with_timeout(10_000_000_000);
    let mut req = agent::CreateSandboxRequest::new();
    req.sandbox_id = "net".into();
    req.interfaces.push(interface("02:00:00:00:00:99", "eth0", &[("10.88.0.5", 16)], 0));
    let err = agent.create_sandbox(ctx(), &req).expect_err("unknown MAC");
    assert_eq!(carapace_protocol::rpc_code(&err), Some(ttrpc::Code::INVALID_ARGUMENT), "{err:?}");
    assert!(format!("{err:?}").contains("interfaces[0].mac"), "{err:?}");

    req.interfaces[0].mac = MAC_A.into();
    req.routes.push(route("", "10.88.0.1", "", 0));
    agent.create_sandbox(ctx(), &req).expect("CreateSandbox");
    let addrs: Value = serde_json::from_str(&in_guest(&["-j", "addr", "show"])).expect("json");
    assert!(has_flag(link(&addrs, "lo"), "UP"));
    assert_eq!(addresses(link(&addrs, "eth0")), ["10.88.0.5/16"]);
    assert!(in_guest(&["route", "show"]).contains("default via 10.88.0.1 dev eth0"));
    let _ = agent.shutdown(ctx(), &agent::ShutdownRequest::new());
}

#[test]
fn a_device_found_by_device_mac_takes_the_sandboxs_mac() {
    if !can_run("a_device_found_by_device_mac_takes_the_sandboxs_mac") {
        return;
    }
    in_new_netns(|| {
        // As after a snapshot restore: the device presents the template's
        // MAC (MAC_A) and must become this sandbox's (MAC_B).
        veth("tmpl0", MAC_A);
        ip(&["link", "set", "tmpl0", "up"]);
        let mut iface = interface(MAC_B, "eth0", &[("10.77.0.2", 24)], 0);
        iface.device_mac = MAC_A.into();
        NetworkConfig::from_request(&[iface], &[]).expect("valid").apply().expect("apply");
        let addrs = ip_json(&["addr"]);
        let eth0 = link(&addrs, "eth0");
        assert_eq!(eth0["address"], MAC_B, "{eth0:#}");
        assert!(has_flag(eth0, "UP"), "{eth0:#}");
        assert_eq!(addresses(eth0), ["10.77.0.2/24"]);
    });
}
