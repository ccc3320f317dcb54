//! Attaching to a real network namespace (root only): two namespaces joined
//! by a veth pair stand for the pod's CNI namespace and its bridge side.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use super::*;

/// A scratch namespace under /var/run/netns, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("cp-{tag}-{}", std::process::id());
        sh(&["ip", "netns", "add", &name]);
        Self(name)
    }
    fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.0)
    }
    fn ip(&self, args: &str) -> String {
        let mut argv = vec!["ip", "-n", &self.0];
        argv.extend(args.split_whitespace());
        sh(&argv)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn sh(argv: &[&str]) -> String {
    let out = Command::new(argv[0]).args(&argv[1..]).output().expect("run");
    assert!(out.status.success(), "{argv:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn rx_packets(ns: &Netns, dev: &str) -> u64 {
    let json = ns.ip(&format!("-j -s link show {dev}"));
    let v: serde_json::Value = serde_json::from_str(&json).expect("ip -j");
    v[0]["stats64"]["rx"]["packets"].as_u64().expect("rx packets")
}

/// A pod namespace with eth0 (10.200.0.2/24, default via .1) whose peer
/// sits in a second namespace as 10.200.0.1.
fn pod_and_bridge() -> (Netns, Netns) {
    let pod = Netns::new("pod");
    let bridge = Netns::new("br");
    sh(&["ip", "link", "add", "eth0", "netns", &pod.0, "mtu", "1400", "type", "veth", "peer", "name", "peer0", "netns", &bridge.0]);
    pod.ip("addr add 10.200.0.2/24 dev eth0");
    pod.ip("link set eth0 up");
    pod.ip("route add default via 10.200.0.1");
    pod.ip("route add 192.168.50.0/24 via 10.200.0.1 dev eth0");
    bridge.ip("addr add 10.200.0.1/24 dev peer0");
    bridge.ip("link set peer0 up");
    (pod, bridge)
}

/// Root and a tap device (skips, or fails under CARAPACE_REQUIRE_KVM=1).
fn root(test: &str) -> bool {
    use carapace_test_support::{can_run, Need};
    can_run(test, &[Need::Root, Need::Tun])
}

#[test]
fn a_pod_namespace_is_wired_to_a_tap_and_unwired_on_detach() {
    if !root("a_pod_namespace_is_wired_to_a_tap_and_unwired_on_detach") {
        return;
    }
    let (pod, bridge) = pod_and_bridge();
    let mac_text = pod.ip("-j link show eth0");
    let link: serde_json::Value = serde_json::from_str(&mac_text).expect("json");
    let mac = link[0]["address"].as_str().expect("mac").to_string();

    let mut net = attach(&pod.path()).expect("attach");

    // What the guest will be told: eth0 with the veth's MAC, MTU, address
    // and the namespace's routes (not the kernel's prefix route).
    let mut req = agent::CreateSandboxRequest::new();
    net.describe(&mut req);
    assert_eq!(req.interfaces.len(), 1, "{:?}", req.interfaces);
    let iface = &req.interfaces[0];
    assert_eq!((iface.name.as_str(), iface.mac.as_str(), iface.mtu), ("eth0", mac.as_str(), 1400));
    let addrs: Vec<_> = iface.addresses.iter().map(|a| format!("{}/{}", a.address, a.prefix_len)).collect();
    assert_eq!(addrs, ["10.200.0.2/24"]);
    let routes: Vec<_> = req.routes.iter().map(|r| (r.destination.as_str(), r.gateway.as_str(), r.device.as_str())).collect();
    assert!(routes.contains(&("", "10.200.0.1", "eth0")), "{routes:?}");
    assert!(routes.contains(&("192.168.50.0/24", "10.200.0.1", "eth0")), "{routes:?}");
    assert!(!routes.iter().any(|r| r.0 == "10.200.0.0/24"), "kernel prefix route passed on: {routes:?}");

    // The tap is up beside eth0, and TC redirects both ways.
    assert!(pod.ip("link show cptap0").contains("UP"));
    let filters = sh(&["tc", "-n", &pod.0, "filter", "show", "dev", "eth0", "ingress"]);
    assert!(filters.contains("mirred") && filters.contains("cptap0"), "{filters}");
    let filters = sh(&["tc", "-n", &pod.0, "filter", "show", "dev", "cptap0", "ingress"]);
    assert!(filters.contains("mirred") && filters.contains("eth0"), "{filters}");

    // A frame sent to the pod's address arrives on the tap (the ARP request
    // for 10.200.0.2), behind the tap's 10-byte virtio-net header.
    let taps = net.take_taps();
    let dev = taps.into_iter().next().expect("tap");
    assert_eq!((format_mac(&dev.mac), dev.mtu), (mac.clone(), 1400));
    let mut tap = std::fs::File::from(std::sync::Arc::into_inner(dev.tap).expect("the only holder"));
    nix::fcntl::fcntl(&tap, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK)).expect("nonblock");
    let send = "import socket; socket.socket(2, 2).sendto(b'x', ('10.200.0.2', 9))";
    sh(&["ip", "netns", "exec", &bridge.0, "python3", "-c", send]);
    let mut frame = vec![0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(10);
    let n = loop {
        match tap.read(&mut frame) {
            Ok(n) if n > 10 + 14 && frame[10 + 12..10 + 14] == [0x08, 0x06] => break n,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no ARP frame reached the tap");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("reading the tap: {e}"),
        }
    };
    assert!(n >= 10 + 42, "short ARP frame: {n} bytes");

    // A frame written to the tap leaves by eth0 and reaches the peer.
    let before = rx_packets(&bridge, "peer0");
    let mut out = vec![0u8; 10];
    out.extend_from_slice(&[0xff; 6]); // broadcast
    out.extend_from_slice(&frame[10 + 6..10 + 12]); // from the sender, as a reply would
    out.extend_from_slice(&[0x88, 0xb5]); // local experimental ethertype
    out.extend_from_slice(&[0u8; 46]);
    tap.write_all(&out).expect("write to the tap");
    let deadline = Instant::now() + Duration::from_secs(10);
    while rx_packets(&bridge, "peer0") <= before {
        assert!(Instant::now() < deadline, "the frame written to the tap did not reach the peer");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(tap.as_raw_fd() >= 0);

    // Detach removes the redirects; the tap goes with its last file.
    net.detach();
    drop(tap);
    let filters = sh(&["tc", "-n", &pod.0, "filter", "show", "dev", "eth0", "ingress"]);
    assert!(!filters.contains("mirred"), "{filters}");
    assert!(!pod.ip("link show").contains("cptap0"), "tap left behind");
}

#[test]
fn attaching_to_something_that_is_not_a_network_namespace_names_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("no-such-netns");
    let e = attach(&missing).expect_err("missing path");
    assert!(e.to_string().contains(&missing.display().to_string()), "{e}");
    if root("attaching_to_something_that_is_not_a_network_namespace_names_it (a plain file)") {
        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"").expect("write");
        let e = attach(&file).expect_err("a plain file");
        assert!(e.to_string().contains(&file.display().to_string()), "{e}");
    }
}

#[test]
fn a_spec_names_its_network_namespace_path() {
    let spec: Spec = serde_json::from_str(
        r#"{"ociVersion": "1.0.2", "linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/x"}]}}"#,
    )
    .expect("spec");
    assert_eq!(netns_path(&spec), Some(PathBuf::from("/var/run/netns/x")));
    let fresh: Spec = serde_json::from_str(r#"{"ociVersion": "1.0.2", "linux": {"namespaces": [{"type": "network"}]}}"#).expect("spec");
    assert_eq!(netns_path(&fresh), None);
    assert_eq!(format_mac(&[2, 0, 0xab, 0, 0, 1]), "02:00:ab:00:00:01");
}
