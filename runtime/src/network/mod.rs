//! Pod networking: the VM takes over the interfaces of the network
//! namespace CNI prepared for the pod.
//!
//! For each Ethernet interface in that namespace (the CNI veth, usually
//! eth0) a tap is created beside it and every frame is redirected between
//! the two with TC ([`tc`]), as Kata does. The VM gets a virtio-net device
//! on the tap with the veth's MAC, and the agent gives the guest interface
//! the veth's name, MTU, addresses and routes: the pod answers on its CNI
//! address, and the namespace's own stack never sees a frame. The tap lives
//! as long as the VMM holds it open; [`PodNetwork::detach`] removes the
//! redirect from the veth when the VM is gone.

mod netlink;
mod tc;

use std::collections::HashMap;
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use carapace_protocol::agent;
use carapace_vmm_config::tap;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use oci_spec::runtime::{LinuxNamespaceType, Spec};

use self::netlink::Netlink;
use crate::vm::NetDevice;

/// Taps are named this and their index among the pod's interfaces.
const TAP_PREFIX: &str = "cptap";

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("network namespace {}", path.display())]
    Namespace { path: PathBuf, source: std::io::Error },
    #[error("network namespace {}: {step}", path.display())]
    Netlink { path: PathBuf, step: String, source: std::io::Error },
    #[error("network namespace {}: the worker thread panicked", path.display())]
    Thread { path: PathBuf },
    #[error("cannot make taps in a network namespace of their own")]
    Isolated(#[source] std::io::Error),
}

/// Taps in a network namespace of their own, for a VM that must have NICs
/// but no network: a template VM (see [`crate::template`]). A thread stays
/// in the namespace, keeping it and the taps alive, until this is dropped.
#[derive(Debug)]
pub struct IsolatedTaps {
    pub taps: Vec<Arc<OwnedFd>>,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl IsolatedTaps {
    pub fn open(count: usize) -> Result<Self, NetworkError> {
        let (made_tx, made_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("isolated-taps".into())
            .spawn(move || {
                // A network namespace belongs to a thread: this one's only.
                let made = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)
                    .and_then(|()| (0..count).map(|i| tap::create(&format!("{TAP_PREFIX}{i}"))).collect::<std::io::Result<Vec<_>>>());
                let ok = made.is_ok();
                let _ = made_tx.send(made);
                if ok {
                    let _ = stop_rx.recv();
                }
            })
            .map_err(NetworkError::Isolated)?;
        let mut keeper = Self { taps: Vec::new(), stop: Some(stop_tx), thread: Some(thread) };
        match made_rx.recv() {
            Ok(Ok(taps)) => {
                keeper.taps = taps.into_iter().map(Arc::new).collect();
                Ok(keeper)
            }
            Ok(Err(e)) => Err(NetworkError::Isolated(e)),
            Err(_) => Err(NetworkError::Isolated(std::io::Error::other("the namespace thread died"))),
        }
    }
}

impl Drop for IsolatedTaps {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One interface of the pod's namespace and the tap that carries it into
/// the VM.
#[derive(Debug)]
pub struct Endpoint {
    /// The tap's file, for the VMM's virtio-net device. Drop it once the
    /// VMM has its copy, so that the tap dies with the VMM.
    pub tap: Option<OwnedFd>,
    pub tap_name: String,
    /// The veth's name in the namespace (also its name in the guest).
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    addresses: Vec<(IpAddr, u8)>,
}

/// The network a VM was given: its endpoints and the namespace's routes.
#[derive(Debug)]
pub struct PodNetwork {
    pub netns: PathBuf,
    pub endpoints: Vec<Endpoint>,
    routes: Vec<agent::Route>,
}

/// The network namespace a spec asks to join (`linux.namespaces` of type
/// network with a path), if any.
pub fn netns_path(spec: &Spec) -> Option<PathBuf> {
    spec.linux().as_ref()?.namespaces().as_ref()?.iter().find(|n| n.typ() == LinuxNamespaceType::Network).and_then(|n| n.path().clone())
}

/// Creates a tap for each Ethernet interface of `netns` and redirects the
/// interface's traffic to it. Nothing is left behind if it fails.
#[tracing::instrument(skip_all, fields(netns = %netns.display()))]
pub fn attach(netns: &Path) -> Result<PodNetwork, NetworkError> {
    let err = |step: &str| {
        let path = netns.to_path_buf();
        let step = step.to_string();
        move |source| NetworkError::Netlink { path, step, source }
    };
    in_netns(netns, || {
        let mut nl = Netlink::open().map_err(err("opening a netlink socket"))?;
        let (mut endpoints, names) = discover(&mut nl).map_err(err("listing interfaces"))?;
        let routes = routes(&mut nl, &names).map_err(err("listing routes"))?;
        let mut network = PodNetwork { netns: netns.to_path_buf(), endpoints: Vec::new(), routes };
        for (i, mut ep) in endpoints.drain(..).enumerate() {
            let tap_name = format!("{TAP_PREFIX}{i}");
            let wired = wire(&mut nl, &mut ep, &tap_name);
            ep.tap_name = tap_name;
            match wired {
                Ok(fd) => {
                    ep.tap = Some(fd);
                    network.endpoints.push(ep);
                }
                Err((step, source)) => {
                    undo(&mut nl, &network.endpoints, Some(&ep.name));
                    return Err(err(&step)(source));
                }
            }
        }
        tracing::info!(interfaces = network.endpoints.len(), routes = network.routes.len(), "pod network attached");
        Ok(network)
    })
}

impl PodNetwork {
    /// Fills in the guest's interfaces and routes.
    pub fn describe(&self, req: &mut agent::CreateSandboxRequest) {
        for ep in &self.endpoints {
            let mut iface = agent::Interface::new();
            iface.mac = format_mac(&ep.mac);
            iface.name = ep.name.clone();
            iface.mtu = ep.mtu;
            for (addr, prefix) in &ep.addresses {
                let mut a = agent::IpAddress::new();
                a.address = addr.to_string();
                a.prefix_len = u32::from(*prefix);
                iface.addresses.push(a);
            }
            req.interfaces.push(iface);
        }
        req.routes.extend(self.routes.iter().cloned());
    }

    /// The VM's network devices: the taps (taken from here) with each
    /// interface's MAC and MTU.
    pub fn take_taps(&mut self) -> Vec<NetDevice> {
        self.endpoints.iter_mut().filter_map(|ep| Some(NetDevice { tap: Arc::new(ep.tap.take()?), mac: ep.mac, mtu: ep.mtu })).collect()
    }

    /// Removes the redirects from the namespace's interfaces (dropping it
    /// does too); the taps go with the VMM, their last holder. Best effort:
    /// the namespace may be gone already.
    pub fn detach(&mut self) {
        self.endpoints.iter_mut().for_each(|ep| drop(ep.tap.take()));
        let endpoints = &self.endpoints;
        let done = in_netns(&self.netns, || match Netlink::open() {
            Ok(mut nl) => {
                undo(&mut nl, endpoints, None);
                Ok(())
            }
            Err(e) => Err(NetworkError::Netlink { path: self.netns.clone(), step: "opening a netlink socket".into(), source: e }),
        });
        if let Err(e) = done {
            tracing::debug!(error = %crate::error::Chain(&e), "pod network not detached");
        }
        self.endpoints.clear();
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        if !self.endpoints.is_empty() {
            self.detach();
        }
    }
}

/// Runs `f` on a thread of its own in network namespace `path` (a network
/// namespace belongs to a thread, so the caller's stays as it is).
fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> Result<T, NetworkError> + Send) -> Result<T, NetworkError> {
    let ns_err = |source| NetworkError::Namespace { path: path.to_path_buf(), source };
    let ns = File::open(path).map_err(ns_err)?;
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| ns_err(std::io::Error::from(e)))?;
            f()
        })
        .join()
        .map_err(|_| NetworkError::Thread { path: path.to_path_buf() })?
    })
}

/// The namespace's Ethernet interfaces (not loopback, not our taps) with
/// their addresses, and a map of every interface index to its name.
fn discover(nl: &mut Netlink) -> std::io::Result<(Vec<Endpoint>, HashMap<u32, String>)> {
    let mut names = HashMap::new();
    let mut endpoints = Vec::new();
    let mut indexes = Vec::new();
    for msg in nl.dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))? {
        let RouteNetlinkMessage::NewLink(link) = msg else { continue };
        let mut name = None;
        let mut mac = None;
        let mut mtu = 0;
        for attr in &link.attributes {
            match attr {
                LinkAttribute::IfName(n) => name = Some(n.clone()),
                LinkAttribute::Address(a) => mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
                LinkAttribute::Mtu(m) => mtu = *m,
                _ => {}
            }
        }
        let Some(name) = name else { continue };
        names.insert(link.header.index, name.clone());
        let ethernet = link.header.link_layer_type == LinkLayerType::Ether && !link.header.flags.contains(LinkFlags::Loopback);
        if let (true, false, Some(mac)) = (ethernet, name.starts_with(TAP_PREFIX), mac) {
            indexes.push(link.header.index);
            endpoints.push(Endpoint { tap: None, tap_name: String::new(), name, mac, mtu, addresses: Vec::new() });
        }
    }
    for msg in nl.dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))? {
        let RouteNetlinkMessage::NewAddress(addr) = msg else { continue };
        let Some(pos) = indexes.iter().position(|i| *i == addr.header.index) else { continue };
        let local = addr.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        let address = local.or_else(|| {
            addr.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        });
        // The guest makes its own link-local address from the same MAC.
        if let Some(ip) = address.filter(|ip| !is_link_local(ip)) {
            endpoints[pos].addresses.push((ip, addr.header.prefix_len));
        }
    }
    Ok((endpoints, names))
}

/// The main table's routes through the pod's interfaces, minus those the
/// guest kernel makes itself (prefix routes of its addresses, link-local).
fn routes(nl: &mut Netlink, names: &HashMap<u32, String>) -> std::io::Result<Vec<agent::Route>> {
    let mut out = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut query = RouteMessage::default();
        query.header.address_family = family;
        for msg in nl.dump(RouteNetlinkMessage::GetRoute(query))? {
            let RouteNetlinkMessage::NewRoute(route) = msg else { continue };
            if let Some(r) = guest_route(&route, names) {
                out.push(r);
            }
        }
    }
    Ok(out)
}

fn guest_route(route: &RouteMessage, names: &HashMap<u32, String>) -> Option<agent::Route> {
    let h = &route.header;
    let table = route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(h.table));
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) || h.kind != RouteType::Unicast || h.protocol == RouteProtocol::Kernel {
        return None;
    }
    let ip = |a: &RouteAddress| match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    };
    let mut r = agent::Route::new();
    let mut device = None;
    for attr in &route.attributes {
        match attr {
            RouteAttribute::Destination(a) => {
                let dst = ip(a)?;
                if is_link_local(&dst) {
                    return None;
                }
                r.destination = format!("{dst}/{}", h.destination_prefix_length);
            }
            RouteAttribute::Gateway(a) => r.gateway = ip(a)?.to_string(),
            RouteAttribute::PrefSource(a) => r.source = ip(a)?.to_string(),
            RouteAttribute::Oif(i) => device = names.get(i).cloned(),
            _ => {}
        }
    }
    // Routes through other devices (or none) do not reach the guest.
    r.device = device.filter(|d| !d.starts_with(TAP_PREFIX))?;
    if r.destination.is_empty() && h.address_family == AddressFamily::Inet6 {
        r.destination = "::/0".into();
    }
    r.scope = u32::from(u8::from(h.scope));
    Some(r)
}

/// Creates the tap of `ep`, sets its MTU, brings it up and redirects both
/// ways. On failure says which step failed; the caller undoes.
fn wire(nl: &mut Netlink, ep: &mut Endpoint, tap_name: &str) -> Result<OwnedFd, (String, std::io::Error)> {
    let step = |s: String| move |e| (s, e);
    let fd = tap::create(tap_name).map_err(step(format!("creating tap {tap_name}")))?;
    let tap_index = if_index(tap_name).map_err(step(format!("finding tap {tap_name}")))?;
    let veth_index = if_index(&ep.name).map_err(step(format!("finding {}", ep.name)))?;
    let mut up = LinkMessage::default();
    up.header.index = tap_index;
    up.header.flags = LinkFlags::Up;
    up.header.change_mask = LinkFlags::Up;
    if ep.mtu != 0 {
        up.attributes.push(LinkAttribute::Mtu(ep.mtu));
    }
    nl.call(RouteNetlinkMessage::SetLink(up), 0).map_err(step(format!("bringing tap {tap_name} up")))?;
    // A redirect left by a VM that died without detaching is replaced.
    tc::remove_redirect(nl, veth_index).map_err(step(format!("clearing {}'s ingress qdisc", ep.name)))?;
    tc::redirect(nl, veth_index, tap_index).map_err(step(format!("redirecting {} to {tap_name}", ep.name)))?;
    tc::redirect(nl, tap_index, veth_index).map_err(step(format!("redirecting {tap_name} to {}", ep.name)))?;
    Ok(fd)
}

/// Removes the redirects of `endpoints` (and of `also`, an interface being
/// wired); their taps vanish with their last file.
fn undo(nl: &mut Netlink, endpoints: &[Endpoint], also: Option<&str>) {
    let names = endpoints.iter().map(|e| e.name.as_str()).chain(also);
    for name in names {
        if let Ok(index) = if_index(name) {
            if let Err(e) = tc::remove_redirect(nl, index) {
                tracing::warn!(interface = name, error = %e, "could not remove the redirect");
            }
        }
    }
}

fn if_index(name: &str) -> std::io::Result<u32> {
    nix::net::if_::if_nametoindex(name).map_err(std::io::Error::from)
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// "02:00:00:00:00:01".
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
mod tests;
