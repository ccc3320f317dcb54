//! A pod network namespace the way CNI's bridge plugin leaves it: a host
//! bridge with the gateway address, a veth pair from it into the namespace,
//! the pod's end named eth0 with an address and a default route.

use std::process::Command;

/// The gateway's (bridge's) address.
pub const HOST_IP: &str = "10.231.0.1";
/// The pod's eth0 address.
pub const POD_IP: &str = "10.231.0.2";

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("ip (iproute2)");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Netns `cp-<tag>-<pid>` behind bridge `cpbr<n>`; both removed on drop.
#[derive(Debug)]
pub struct PodNetns {
    pub name: String,
    bridge: String,
}

impl PodNetns {
    pub fn create(tag: &str) -> Self {
        let n = std::process::id() % 100_000;
        let (name, bridge, host_end) = (format!("cp-{tag}-{n}"), format!("cpbr{n}"), format!("cpv{n}"));
        let ns = Self { name, bridge };
        ip(&["netns", "add", &ns.name]);
        ip(&["link", "add", &ns.bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", &ns.bridge]);
        ip(&["link", "set", &ns.bridge, "up"]);
        ip(&["link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns.name]);
        ip(&["link", "set", &host_end, "master", &ns.bridge, "up"]);
        ip(&["-n", &ns.name, "addr", "add", &format!("{POD_IP}/24"), "dev", "eth0"]);
        ip(&["-n", &ns.name, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns.name, "route", "add", "default", "via", HOST_IP]);
        ns
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// The namespace's links (`ip link show`).
    pub fn links(&self) -> String {
        ip(&["-n", &self.name, "link", "show"])
    }

    /// The TC filters on eth0's ingress.
    pub fn eth0_filters(&self) -> String {
        let out = Command::new("tc").args(["-n", &self.name, "filter", "show", "dev", "eth0", "ingress"]).output().expect("tc");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).status();
    }
}
