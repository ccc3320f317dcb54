//! From a checked request and the guest's links to the rtnetlink requests
//! that make the change, in order. Pure: the devices the request names
//! are all found here, so that a request naming a missing one is refused
//! before anything is sent.

use std::collections::HashMap;
use std::net::IpAddr;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::address::{AddressAttribute, AddressHeaderFlags, AddressMessage, AddressScope};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use super::config::{broadcast, format_mac, Cidr, NetworkConfig, RouteConfig};
use super::NetworkError;

/// A link (network device) of the guest, as the dump shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Link {
    pub(crate) index: u32,
    pub(crate) name: String,
    /// The hardware address, if it is an Ethernet-sized one.
    pub(crate) mac: Option<[u8; 6]>,
    pub(crate) up: bool,
}

/// One rtnetlink request, and what to call it in an error.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub(crate) item: String,
    pub(crate) message: RouteNetlinkMessage,
    /// NLM_F_* flags besides REQUEST and ACK, which every request has.
    pub(crate) flags: u16,
}

const LOOPBACK: &str = "lo";

/// The requests, in the order they must be made: `lo` up, then per
/// interface (down if it must be renamed while up), rename, MTU, addresses,
/// up; then the routes.
pub(crate) fn plan(config: &NetworkConfig, links: &[Link]) -> Result<Vec<Request>, NetworkError> {
    // Names as they will be once the renames before are done.
    let mut names: HashMap<String, u32> = links.iter().map(|l| (l.name.clone(), l.index)).collect();
    let mut requests = Vec::new();

    match links.iter().find(|l| l.name == LOOPBACK) {
        Some(lo) if !lo.up => requests.push(set_up(lo.index, true, "lo: bringing it up".into())),
        Some(_) => {}
        None => tracing::warn!("no loopback device"),
    }

    for (i, iface) in config.interfaces.iter().enumerate() {
        let found_by = iface.device_mac();
        let field = if iface.device_mac.is_some() { "device_mac" } else { "mac" };
        let mut matching = links.iter().filter(|l| l.mac == Some(found_by));
        let Some(link) = matching.next() else {
            return Err(NetworkError::NoSuchDevice { field: format!("interfaces[{i}].{field}"), value: format_mac(&found_by) });
        };
        if let Some(other) = matching.next() {
            return Err(NetworkError::invalid(
                format!("interfaces[{i}].{field}"),
                format_mac(&found_by),
                format!("matches several devices ({}, {})", link.name, other.name),
            ));
        }
        let mut up = link.up;
        let mut name = link.name.as_str();
        if iface.device_mac.is_some() {
            if let Some(other) = links.iter().find(|l| l.mac == Some(iface.mac)) {
                return Err(NetworkError::invalid(
                    format!("interfaces[{i}].mac"),
                    format_mac(&iface.mac),
                    format!("already the address of another device ({})", other.name),
                ));
            }
            // Not every driver changes the address of a running device.
            if up {
                requests.push(set_up(link.index, false, format!("interfaces[{i}]: taking {name} down to change its address")));
                up = false;
            }
            requests.push(set_link(
                link.index,
                LinkAttribute::Address(iface.mac.to_vec()),
                format!("interfaces[{i}].mac {} (on {name})", format_mac(&iface.mac)),
            ));
        }
        if let Some(new) = iface.name.as_deref().filter(|new| *new != link.name) {
            if names.get(new).is_some_and(|index| *index != link.index) {
                return Err(NetworkError::invalid(format!("interfaces[{i}].name"), new, "already the name of another device"));
            }
            // The kernel renames only devices that are down.
            if up {
                requests.push(set_up(link.index, false, format!("interfaces[{i}]: taking {name} down to rename it")));
                up = false;
            }
            requests.push(set_link(
                link.index,
                LinkAttribute::IfName(new.to_string()),
                format!("interfaces[{i}].name {new:?} (renaming {name})"),
            ));
            names.remove(name);
            names.insert(new.to_string(), link.index);
            name = new;
        }
        if let Some(mtu) = iface.mtu {
            requests.push(set_link(link.index, LinkAttribute::Mtu(mtu), format!("interfaces[{i}].mtu {mtu} ({name})")));
        }
        for (j, cidr) in iface.addresses.iter().enumerate() {
            requests.push(add_address(link.index, *cidr, format!("interfaces[{i}].addresses[{j}]")));
        }
        if !up {
            requests.push(set_up(link.index, true, format!("interfaces[{i}]: bringing {name} up")));
        }
    }

    for (i, route) in config.routes.iter().enumerate() {
        let oif = match &route.device {
            None => None,
            Some(device) => Some(
                *names
                    .get(device)
                    .ok_or_else(|| NetworkError::NoSuchDevice { field: format!("routes[{i}].device"), value: device.clone() })?,
            ),
        };
        requests.push(add_route(route, oif, format!("routes[{i}] ({})", describe(route))));
    }
    Ok(requests)
}

/// A route as `ip route` shows it, for errors.
fn describe(route: &RouteConfig) -> String {
    let d = route.destination;
    let mut out = if d.prefix_len == 0 { "default".to_string() } else { format!("{}/{}", d.address, d.prefix_len) };
    if let Some(gateway) = route.gateway {
        out += &format!(" via {gateway}");
    }
    if let Some(device) = &route.device {
        out += &format!(" dev {device}");
    }
    if let Some(source) = route.source {
        out += &format!(" src {source}");
    }
    if route.scope != 0 {
        out += &format!(" scope {}", route.scope);
    }
    out
}

fn family(address: IpAddr) -> AddressFamily {
    match address {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn set_up(index: u32, up: bool, item: String) -> Request {
    let mut link = LinkMessage::default();
    link.header.index = index;
    link.header.flags = if up { LinkFlags::Up } else { LinkFlags::empty() };
    link.header.change_mask = LinkFlags::Up;
    Request { item, message: RouteNetlinkMessage::SetLink(link), flags: 0 }
}

fn set_link(index: u32, attribute: LinkAttribute, item: String) -> Request {
    let mut link = LinkMessage::default();
    link.header.index = index;
    link.attributes.push(attribute);
    Request { item, message: RouteNetlinkMessage::SetLink(link), flags: 0 }
}

fn add_address(index: u32, cidr: Cidr, item: String) -> Request {
    let mut message = AddressMessage::default();
    message.header.family = family(cidr.address);
    message.header.prefix_len = cidr.prefix_len;
    message.header.scope = AddressScope::Universe;
    message.header.index = index;
    // Usable at once: the VMM gave the guest its addresses, nobody else on
    // the link has them, and duplicate detection would hold them back for
    // a second or more.
    if cidr.address.is_ipv6() {
        message.header.flags = AddressHeaderFlags::Nodad;
    }
    message.attributes.push(AddressAttribute::Local(cidr.address));
    message.attributes.push(AddressAttribute::Address(cidr.address));
    if let IpAddr::V4(v4) = cidr.address {
        if let Some(brd) = broadcast(v4, cidr.prefix_len) {
            message.attributes.push(AddressAttribute::Broadcast(brd));
        }
    }
    Request {
        item,
        message: RouteNetlinkMessage::NewAddress(message),
        // An address already there is an error: the guest is fresh, so
        // it means the request has it twice or another device has it.
        flags: NLM_F_CREATE | NLM_F_EXCL,
    }
}

fn add_route(route: &RouteConfig, oif: Option<u32>, item: String) -> Request {
    let mut message = RouteMessage::default();
    let destination = route.destination;
    message.header.address_family = family(destination.address);
    message.header.destination_prefix_length = destination.prefix_len;
    message.header.table = RouteHeader::RT_TABLE_MAIN;
    // As `ip route add` does: "boot", a route set up at start.
    message.header.protocol = RouteProtocol::Boot;
    message.header.scope = RouteScope::from(route.scope);
    message.header.kind = RouteType::Unicast;
    if destination.prefix_len > 0 {
        message.attributes.push(RouteAttribute::Destination(destination.address.into()));
    }
    if let Some(gateway) = route.gateway {
        message.attributes.push(RouteAttribute::Gateway(gateway.into()));
    }
    if let Some(oif) = oif {
        message.attributes.push(RouteAttribute::Oif(oif));
    }
    if let Some(source) = route.source {
        message.attributes.push(RouteAttribute::PrefSource(source.into()));
    }
    Request {
        item,
        message: RouteNetlinkMessage::NewRoute(message),
        // Replace, as `ip route replace`: a route the kernel made from an
        // address (the subnet's) may be asked for again with other details.
        flags: NLM_F_CREATE | NLM_F_REPLACE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use carapace_protocol::agent;

    const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
    const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];

    fn links() -> Vec<Link> {
        vec![
            Link { index: 1, name: "lo".into(), mac: Some([0; 6]), up: false },
            Link { index: 2, name: "eth0".into(), mac: Some(MAC_A), up: true },
            Link { index: 3, name: "eth1".into(), mac: Some(MAC_B), up: false },
            Link { index: 4, name: "tunl0".into(), mac: None, up: false },
        ]
    }

    /// MAC, name, addresses with prefix lengths, MTU.
    type Iface<'a> = (&'a str, &'a str, &'a [(&'a str, u32)], u32);

    fn config(interfaces: &[Iface<'_>], routes: &[(&str, &str, &str)]) -> NetworkConfig {
        let interfaces: Vec<agent::Interface> = interfaces
            .iter()
            .map(|(mac, name, addresses, mtu)| {
                let mut i = agent::Interface::new();
                i.mac = (*mac).into();
                i.name = (*name).into();
                i.mtu = *mtu;
                for (a, len) in *addresses {
                    let mut ip = agent::IpAddress::new();
                    ip.address = (*a).into();
                    ip.prefix_len = *len;
                    i.addresses.push(ip);
                }
                i
            })
            .collect();
        let routes: Vec<agent::Route> = routes
            .iter()
            .map(|(destination, gateway, device)| {
                let mut r = agent::Route::new();
                r.destination = (*destination).into();
                r.gateway = (*gateway).into();
                r.device = (*device).into();
                r
            })
            .collect();
        NetworkConfig::from_request(&interfaces, &routes).expect("valid")
    }

    /// What each request does, briefly.
    fn summary(requests: &[Request]) -> Vec<String> {
        requests
            .iter()
            .map(|r| match &r.message {
                RouteNetlinkMessage::SetLink(l) => {
                    let what = if l.header.change_mask.contains(LinkFlags::Up) {
                        if l.header.flags.contains(LinkFlags::Up) {
                            "up".to_string()
                        } else {
                            "down".to_string()
                        }
                    } else {
                        match l.attributes.as_slice() {
                            [LinkAttribute::IfName(n)] => format!("name {n}"),
                            [LinkAttribute::Mtu(m)] => format!("mtu {m}"),
                            [LinkAttribute::Address(a)] => format!("address {a:02x?}"),
                            other => format!("{other:?}"),
                        }
                    };
                    format!("link {} {what}", l.header.index)
                }
                RouteNetlinkMessage::NewAddress(a) => {
                    let ip = a.attributes.iter().find_map(|a| match a {
                        AddressAttribute::Local(ip) => Some(*ip),
                        _ => None,
                    });
                    format!("addr {} {:?}/{} {:?}", a.header.index, ip, a.header.prefix_len, a.header.flags)
                }
                RouteNetlinkMessage::NewRoute(m) => {
                    format!("route /{} {:?}", m.header.destination_prefix_length, m.attributes)
                }
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn renames_sizes_addresses_and_routes_in_order() {
        let config = config(
            &[("02:00:00:00:00:0A", "net0", &[("10.88.0.5", 16), ("fd00::5", 64)], 1400), ("02:00:00:00:00:0b", "", &[], 0)],
            &[("", "10.88.0.1", ""), ("10.99.0.1/32", "", "net0"), ("10.98.0.0/16", "", "eth1")],
        );
        let requests = plan(&config, &links()).expect("plan");
        assert_eq!(
            summary(&requests),
            [
                "link 1 up",
                "link 2 down",
                "link 2 name net0",
                "link 2 mtu 1400",
                "addr 2 Some(10.88.0.5)/16 AddressHeaderFlags(0x0)",
                "addr 2 Some(fd00::5)/64 AddressHeaderFlags(Nodad)",
                "link 2 up",
                "link 3 up",
                "route /0 [Gateway(Inet(10.88.0.1))]",
                "route /32 [Destination(Inet(10.99.0.1)), Oif(2)]",
                "route /16 [Destination(Inet(10.98.0.0)), Oif(3)]",
            ]
        );
        assert_eq!(requests[0].item, "lo: bringing it up");
        assert_eq!(requests[2].item, "interfaces[0].name \"net0\" (renaming eth0)");
        assert_eq!(requests[5].item, "interfaces[0].addresses[1]");
        assert_eq!(requests[8].item, "routes[0] (default via 10.88.0.1)");
        assert_eq!(requests[10].item, "routes[2] (10.98.0.0/16 dev eth1)");
        let RouteNetlinkMessage::NewAddress(v4) = &requests[4].message else { panic!("not an address") };
        assert!(v4.attributes.contains(&AddressAttribute::Broadcast("10.88.255.255".parse().expect("ip"))));
    }

    #[test]
    fn an_up_device_that_keeps_its_name_stays_up() {
        let mut links = links();
        links[0].up = true;
        let config = config(&[("02:00:00:00:00:0a", "eth0", &[("10.0.0.2", 24)], 0)], &[]);
        let requests = plan(&config, &links).expect("plan");
        assert_eq!(summary(&requests), ["addr 2 Some(10.0.0.2)/24 AddressHeaderFlags(0x0)"]);
    }

    #[test]
    fn names_can_move_along() {
        // eth1 gives its name up before eth0 takes it.
        let config = config(&[("02:00:00:00:00:0b", "eth2", &[], 0), ("02:00:00:00:00:0a", "eth1", &[], 0)], &[("10.0.0.0/8", "", "eth2")]);
        let requests = plan(&config, &links()).expect("plan");
        assert_eq!(
            summary(&requests),
            [
                "link 1 up",
                "link 3 name eth2",
                "link 3 up",
                "link 2 down",
                "link 2 name eth1",
                "link 2 up",
                "route /8 [Destination(Inet(10.0.0.0)), Oif(3)]",
            ]
        );
    }

    #[test]
    fn a_device_found_by_its_device_mac_gets_the_sandboxs_mac_first() {
        let mut interfaces = Vec::new();
        let mut i = agent::Interface::new();
        i.device_mac = "02:00:00:00:00:0a".into();
        i.mac = "02:00:00:00:00:42".into();
        i.name = "eth0".into();
        let mut ip = agent::IpAddress::new();
        ip.address = "10.0.0.2".into();
        ip.prefix_len = 24;
        i.addresses.push(ip);
        interfaces.push(i);
        let config = NetworkConfig::from_request(&interfaces, &[]).expect("valid");
        let requests = plan(&config, &links()).expect("plan");
        assert_eq!(
            summary(&requests),
            [
                "link 1 up",
                "link 2 down",
                "link 2 address [02, 00, 00, 00, 00, 42]",
                "addr 2 Some(10.0.0.2)/24 AddressHeaderFlags(0x0)",
                "link 2 up",
            ]
        );
        assert_eq!(requests[2].item, "interfaces[0].mac 02:00:00:00:00:42 (on eth0)");

        // The device must be there under its device_mac...
        interfaces[0].device_mac = "02:00:00:00:00:0c".into();
        let config = NetworkConfig::from_request(&interfaces, &[]).expect("valid");
        let e = plan(&config, &links()).expect_err("no such device");
        assert_eq!(e.to_string(), "interfaces[0].device_mac \"02:00:00:00:00:0c\": no such device");
        // ...and the new address not another device's.
        interfaces[0].device_mac = "02:00:00:00:00:0a".into();
        interfaces[0].mac = "02:00:00:00:00:0b".into();
        let config = NetworkConfig::from_request(&interfaces, &[]).expect("valid");
        let e = plan(&config, &links()).expect_err("taken");
        assert!(e.to_string().contains("already the address of another device (eth1)"), "{e}");
        // The same address twice is just a lookup by it.
        interfaces[0].device_mac = "02:00:00:00:00:0b".into();
        let config = NetworkConfig::from_request(&interfaces, &[]).expect("valid");
        assert_eq!(config.interfaces[0].device_mac, None);
        // A bad device_mac is named.
        interfaces[0].device_mac = "01:00:00:00:00:01".into();
        let e = NetworkConfig::from_request(&interfaces, &[]).expect_err("multicast");
        assert!(e.to_string().starts_with("interfaces[0].device_mac"), "{e}");
    }

    #[test]
    fn missing_devices_and_taken_names_are_refused() {
        let unknown = config(&[("02:00:00:00:00:0c", "", &[], 0)], &[]);
        let e = plan(&unknown, &links()).expect_err("unknown MAC");
        assert_eq!(e.to_string(), "interfaces[0].mac \"02:00:00:00:00:0c\": no such device");
        assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT);

        let taken = config(&[("02:00:00:00:00:0a", "eth1", &[], 0)], &[]);
        let e = plan(&taken, &links()).expect_err("name taken");
        assert_eq!(e.to_string(), "interfaces[0].name \"eth1\": already the name of another device");

        // Routes name devices by their new names only.
        let old_name = config(&[("02:00:00:00:00:0a", "net0", &[], 0)], &[("10.0.0.0/8", "", "eth0")]);
        let e = plan(&old_name, &links()).expect_err("old name");
        assert_eq!(e.to_string(), "routes[0].device \"eth0\": no such device");

        let mut twins = links();
        twins[3].mac = Some(MAC_A);
        let e = plan(&config(&[("02:00:00:00:00:0a", "", &[], 0)], &[]), &twins).expect_err("two devices");
        assert!(e.to_string().contains("matches several devices (eth0, tunl0)"), "{e}");
    }
}
