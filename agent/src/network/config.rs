//! The network part of a CreateSandbox request, checked and parsed before
//! the kernel is touched: a bad field is reported by name and nothing
//! changes.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};

use carapace_protocol::agent;

use super::NetworkError;

/// IFNAMSIZ minus the terminating NUL.
const MAX_NAME_LEN: usize = 15;

/// The smallest MTU the kernel accepts for an IPv4 device (ETH_MIN_MTU is
/// the same); the largest a 16-bit IP length can use.
const MIN_MTU: u32 = 68;
const MAX_MTU: u32 = 65535;

/// rtnetlink scopes a route can be added with: universe, site, link, host
/// (RT_SCOPE_NOWHERE is only for routes the kernel makes).
const ROUTE_SCOPES: [u8; 4] = [0, 200, 253, 254];

/// The guest network a CreateSandbox asks for, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkConfig {
    pub(crate) interfaces: Vec<InterfaceConfig>,
    pub(crate) routes: Vec<RouteConfig>,
}

/// One of the VMM's devices, found by MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InterfaceConfig {
    /// The address the device ends up with.
    pub(crate) mac: [u8; 6],
    /// The address the device is found by, when not `mac` (a VM restored
    /// from a snapshot presents the template's): it is changed to `mac`.
    pub(crate) device_mac: Option<[u8; 6]>,
    /// None: keep the kernel's name.
    pub(crate) name: Option<String>,
    /// None: leave the device's MTU.
    pub(crate) mtu: Option<u32>,
    pub(crate) addresses: Vec<Cidr>,
}

/// An address with its prefix length (host bits may be set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cidr {
    pub(crate) address: IpAddr,
    pub(crate) prefix_len: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RouteConfig {
    /// A network address (no host bits set).
    pub(crate) destination: Cidr,
    pub(crate) gateway: Option<IpAddr>,
    /// A guest interface name, as it is once the interfaces are renamed.
    pub(crate) device: Option<String>,
    pub(crate) source: Option<IpAddr>,
    pub(crate) scope: u8,
}

impl NetworkConfig {
    /// Checks the request's `interfaces` and `routes`.
    pub fn from_request(interfaces: &[agent::Interface], routes: &[agent::Route]) -> Result<Self, NetworkError> {
        let mut config = Self::default();
        let mut macs = HashSet::new();
        let mut device_macs = HashSet::new();
        let mut names = HashSet::new();
        for (i, iface) in interfaces.iter().enumerate() {
            let parsed = parse_interface(i, iface)?;
            if !macs.insert(parsed.mac) {
                return Err(NetworkError::invalid(format!("interfaces[{i}].mac"), &iface.mac, "given for an earlier interface too"));
            }
            if !device_macs.insert(parsed.device_mac()) {
                let field = if parsed.device_mac.is_some() { "device_mac" } else { "mac" };
                return Err(NetworkError::invalid(
                    format!("interfaces[{i}].{field}"),
                    format_mac(&parsed.device_mac()),
                    "an earlier interface's device is found by it too",
                ));
            }
            if let Some(name) = &parsed.name {
                if !names.insert(name.clone()) {
                    return Err(NetworkError::invalid(format!("interfaces[{i}].name"), name, "given to an earlier interface too"));
                }
            }
            config.interfaces.push(parsed);
        }
        for (i, route) in routes.iter().enumerate() {
            config.routes.push(parse_route(i, route)?);
        }
        Ok(config)
    }

    /// Nothing to do: the kernel is not asked anything.
    pub fn is_empty(&self) -> bool {
        self.interfaces.is_empty() && self.routes.is_empty()
    }
}

impl InterfaceConfig {
    /// The address the device is found by.
    pub(crate) fn device_mac(&self) -> [u8; 6] {
        self.device_mac.unwrap_or(self.mac)
    }
}

/// A unicast MAC address, or an error naming `field`.
fn parse_unicast_mac(field: String, value: &str) -> Result<[u8; 6], NetworkError> {
    let mac = parse_mac(value).ok_or_else(|| NetworkError::invalid(&field, value, "not a MAC address (02:00:00:00:00:01)"))?;
    if mac == [0; 6] || mac[0] & 1 != 0 {
        return Err(NetworkError::invalid(field, value, "not the address of a single device (all zeros, or multicast)"));
    }
    Ok(mac)
}

fn parse_interface(i: usize, iface: &agent::Interface) -> Result<InterfaceConfig, NetworkError> {
    let mac = parse_unicast_mac(format!("interfaces[{i}].mac"), &iface.mac)?;
    let device_mac = if iface.device_mac.is_empty() {
        None
    } else {
        Some(parse_unicast_mac(format!("interfaces[{i}].device_mac"), &iface.device_mac)?).filter(|device_mac| *device_mac != mac)
    };
    let name = if iface.name.is_empty() {
        None
    } else {
        check_name(&iface.name).map_err(|reason| NetworkError::invalid(format!("interfaces[{i}].name"), &iface.name, reason))?;
        Some(iface.name.clone())
    };
    let mtu = match iface.mtu {
        0 => None,
        mtu if (MIN_MTU..=MAX_MTU).contains(&mtu) => Some(mtu),
        mtu => {
            return Err(NetworkError::invalid(
                format!("interfaces[{i}].mtu"),
                mtu.to_string(),
                format!("out of range ({MIN_MTU} to {MAX_MTU}, or 0 to leave it)"),
            ))
        }
    };
    let mut addresses = Vec::with_capacity(iface.addresses.len());
    for (j, a) in iface.addresses.iter().enumerate() {
        let field = || format!("interfaces[{i}].addresses[{j}]");
        let shown = || format!("{}/{}", a.address, a.prefix_len);
        let address: IpAddr = a.address.parse().map_err(|_| NetworkError::invalid(field(), &a.address, "not an IP address"))?;
        if address.is_unspecified() || address.is_multicast() {
            return Err(NetworkError::invalid(field(), shown(), "not an address a device can have"));
        }
        let max = max_prefix_len(address);
        let prefix_len = u8::try_from(a.prefix_len)
            .ok()
            .filter(|len| (1..=max).contains(len))
            .ok_or_else(|| NetworkError::invalid(field(), shown(), format!("prefix_len must be 1 to {max}")))?;
        addresses.push(Cidr { address, prefix_len });
    }
    Ok(InterfaceConfig { mac, device_mac, name, mtu, addresses })
}

fn parse_route(i: usize, route: &agent::Route) -> Result<RouteConfig, NetworkError> {
    let destination = if route.destination.is_empty() {
        Cidr { address: IpAddr::V4(Ipv4Addr::UNSPECIFIED), prefix_len: 0 }
    } else {
        parse_network(&route.destination)
            .map_err(|reason| NetworkError::invalid(format!("routes[{i}].destination"), &route.destination, reason))?
    };
    let family_ip = |field: &str, value: &str| -> Result<Option<IpAddr>, NetworkError> {
        if value.is_empty() {
            return Ok(None);
        }
        let ip: IpAddr = value.parse().map_err(|_| NetworkError::invalid(format!("routes[{i}].{field}"), value, "not an IP address"))?;
        if ip.is_ipv4() != destination.address.is_ipv4() {
            return Err(NetworkError::invalid(format!("routes[{i}].{field}"), value, "not of the destination's address family"));
        }
        if ip.is_unspecified() || ip.is_multicast() {
            return Err(NetworkError::invalid(format!("routes[{i}].{field}"), value, "not a host's address"));
        }
        Ok(Some(ip))
    };
    let gateway = family_ip("gateway", &route.gateway)?;
    let source = family_ip("source", &route.source)?;
    let device = if route.device.is_empty() {
        None
    } else {
        check_name(&route.device).map_err(|reason| NetworkError::invalid(format!("routes[{i}].device"), &route.device, reason))?;
        Some(route.device.clone())
    };
    if gateway.is_none() && device.is_none() {
        return Err(NetworkError::invalid(format!("routes[{i}]"), &route.destination, "needs a gateway or a device"));
    }
    let scope = u8::try_from(route.scope).ok().filter(|s| ROUTE_SCOPES.contains(s)).ok_or_else(|| {
        NetworkError::invalid(
            format!("routes[{i}].scope"),
            route.scope.to_string(),
            "not a route scope (0 universe, 200 site, 253 link, 254 host)",
        )
    })?;
    Ok(RouteConfig { destination, gateway, device, source, scope })
}

fn max_prefix_len(address: IpAddr) -> u8 {
    if address.is_ipv4() {
        32
    } else {
        128
    }
}

/// "02:00:00:00:00:0a", either case.
pub(crate) fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        // from_str_radix alone would take "+a".
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

pub(crate) fn format_mac(mac: &[u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

/// What the kernel takes as a device name (dev_valid_name), less '%',
/// which would make it pick a name itself.
fn check_name(name: &str) -> Result<(), String> {
    if name.len() > MAX_NAME_LEN {
        return Err(format!("longer than {MAX_NAME_LEN} bytes"));
    }
    if name == "." || name == ".." {
        return Err("not a device name".into());
    }
    if let Some(c) = name.chars().find(|c| matches!(c, '/' | ':' | '%' | '\0') || c.is_whitespace()) {
        return Err(format!("contains {c:?}"));
    }
    Ok(())
}

/// "10.88.0.0/16" or "fd00::/64": the prefix length is required, and host
/// bits must be clear (the kernel would refuse them for IPv4 and silently
/// clear them for IPv6).
fn parse_network(s: &str) -> Result<Cidr, String> {
    let (address, len) = s.split_once('/').ok_or_else(|| "not a CIDR (address/prefix length)".to_string())?;
    let address: IpAddr = address.parse().map_err(|_| "not a CIDR: bad address".to_string())?;
    let max = max_prefix_len(address);
    let prefix_len = Some(len)
        .filter(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|l| l.parse::<u8>().ok())
        .filter(|l| *l <= max)
        .ok_or_else(|| format!("not a CIDR: the prefix length must be 0 to {max}"))?;
    if !host_bits_clear(address, prefix_len) {
        return Err("host bits are set".into());
    }
    Ok(Cidr { address, prefix_len })
}

fn host_bits_clear(address: IpAddr, prefix_len: u8) -> bool {
    match address {
        IpAddr::V4(a) => u32::from(a).checked_shl(u32::from(prefix_len)).unwrap_or(0) == 0,
        IpAddr::V6(a) => u128::from(a).checked_shl(u32::from(prefix_len)).unwrap_or(0) == 0,
    }
}

/// The IPv4 broadcast address of a subnet, for prefixes that have one.
pub(crate) fn broadcast(address: Ipv4Addr, prefix_len: u8) -> Option<Ipv4Addr> {
    if prefix_len >= 31 {
        return None;
    }
    let host_mask = u32::MAX >> prefix_len;
    Some(Ipv4Addr::from(u32::from(address) | host_mask))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    fn iface(mac: &str, name: &str, addresses: &[(&str, u32)], mtu: u32) -> agent::Interface {
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

    fn route(destination: &str, gateway: &str, device: &str) -> agent::Route {
        let mut r = agent::Route::new();
        r.destination = destination.into();
        r.gateway = gateway.into();
        r.device = device.into();
        r
    }

    fn error(interfaces: &[agent::Interface], routes: &[agent::Route]) -> String {
        let e = NetworkConfig::from_request(interfaces, routes).expect_err("refused");
        assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT, "{e}");
        e.to_string()
    }

    #[test]
    fn macs() {
        assert_eq!(parse_mac("02:00:00:00:00:0a"), Some([2, 0, 0, 0, 0, 10]));
        assert_eq!(parse_mac("02:AB:cd:00:00:FF"), Some([2, 0xab, 0xcd, 0, 0, 0xff]));
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "2:00:00:00:00:00",
            "02-00-00-00-00-00",
            "+2:00:00:00:00:00",
            "02:00:00:00:00:0g",
            "02:00:00:00:00:00:",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad:?}");
        }
        assert_eq!(format_mac(&[2, 0xab, 0, 0, 0, 1]), "02:ab:00:00:00:01");
    }

    #[test]
    fn a_full_request_parses() {
        let config = NetworkConfig::from_request(
            &[iface("02:00:00:00:00:01", "eth0", &[("10.88.0.5", 16), ("fd00::5", 64)], 1400)],
            &[route("", "10.88.0.1", ""), route("10.88.0.1/32", "", "eth0"), route("::/0", "fd00::1", "eth0")],
        )
        .expect("valid");
        assert_eq!(config.interfaces[0].mac, [2, 0, 0, 0, 0, 1]);
        assert_eq!(config.interfaces[0].name.as_deref(), Some("eth0"));
        assert_eq!(config.interfaces[0].mtu, Some(1400));
        assert_eq!(
            config.interfaces[0].addresses[1],
            Cidr { address: IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 5)), prefix_len: 64 }
        );
        let default = &config.routes[0];
        assert_eq!(default.destination.address, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert_eq!(default.destination.prefix_len, 0);
        assert_eq!(default.gateway, Some(IpAddr::V4(Ipv4Addr::new(10, 88, 0, 1))));
        assert_eq!(config.routes[1].device.as_deref(), Some("eth0"));
        assert_eq!(config.routes[2].destination.prefix_len, 0);
        assert!(!config.is_empty());
        assert!(NetworkConfig::from_request(&[], &[]).expect("empty").is_empty());
    }

    #[test]
    fn bad_interfaces_are_named() {
        let ok = ("10.0.0.2", 24);
        let cases: &[(agent::Interface, &str)] = &[
            (iface("02:00:00:00:00", "", &[ok], 0), "interfaces[0].mac \"02:00:00:00:00\": not a MAC address"),
            (iface("01:00:5e:00:00:01", "", &[ok], 0), "interfaces[0].mac \"01:00:5e:00:00:01\": not the address of a single device"),
            (iface("00:00:00:00:00:00", "", &[ok], 0), "interfaces[0].mac"),
            (iface("02:00:00:00:00:01", "a-very-long-name0", &[ok], 0), "interfaces[0].name \"a-very-long-name0\": longer than 15 bytes"),
            (iface("02:00:00:00:00:01", "a/b", &[ok], 0), "interfaces[0].name \"a/b\": contains '/'"),
            (iface("02:00:00:00:00:01", "eth%d", &[ok], 0), "contains '%'"),
            (iface("02:00:00:00:00:01", "et h", &[ok], 0), "contains ' '"),
            (iface("02:00:00:00:00:01", "..", &[ok], 0), "not a device name"),
            (iface("02:00:00:00:00:01", "", &[ok], 67), "interfaces[0].mtu \"67\": out of range"),
            (iface("02:00:00:00:00:01", "", &[ok, ("10.0.0.300", 24)], 0), "interfaces[0].addresses[1] \"10.0.0.300\": not an IP address"),
            (iface("02:00:00:00:00:01", "", &[("10.0.0.2/24", 24)], 0), "interfaces[0].addresses[0] \"10.0.0.2/24\": not an IP address"),
            (
                iface("02:00:00:00:00:01", "", &[("10.0.0.2", 33)], 0),
                "interfaces[0].addresses[0] \"10.0.0.2/33\": prefix_len must be 1 to 32",
            ),
            (iface("02:00:00:00:00:01", "", &[("fd00::2", 129)], 0), "prefix_len must be 1 to 128"),
            (iface("02:00:00:00:00:01", "", &[("10.0.0.2", 0)], 0), "prefix_len must be 1 to 32"),
            (iface("02:00:00:00:00:01", "", &[("10.0.0.2", 256 + 24)], 0), "prefix_len must be 1 to 32"),
            (iface("02:00:00:00:00:01", "", &[("0.0.0.0", 8)], 0), "not an address a device can have"),
        ];
        for (bad, expected) in cases {
            let message = error(std::slice::from_ref(bad), &[]);
            assert!(message.contains(expected), "{message:?} lacks {expected:?}");
        }
        let twice = [iface("02:00:00:00:00:01", "eth0", &[], 0), iface("02:00:00:00:00:01", "eth1", &[], 0)];
        assert!(error(&twice, &[]).starts_with("interfaces[1].mac"));
        let twice = [iface("02:00:00:00:00:01", "eth0", &[], 0), iface("02:00:00:00:00:02", "eth0", &[], 0)];
        assert!(error(&twice, &[]).starts_with("interfaces[1].name"));
    }

    #[test]
    fn bad_routes_are_named() {
        let cases: &[(agent::Route, &str)] = &[
            (route("10.88.0.0", "10.0.0.1", ""), "routes[1].destination \"10.88.0.0\": not a CIDR"),
            (route("10.88.0.0/33", "10.0.0.1", ""), "prefix length must be 0 to 32"),
            (route("10.88.0.0/+8", "10.0.0.1", ""), "prefix length"),
            (route("10.88.0.0/", "10.0.0.1", ""), "prefix length"),
            (route("10.88.0.1/16", "10.0.0.1", ""), "routes[1].destination \"10.88.0.1/16\": host bits are set"),
            (route("fd00::1/64", "fd00::2", ""), "host bits are set"),
            (route("x/8", "10.0.0.1", ""), "bad address"),
            (route("", "x", ""), "routes[1].gateway \"x\": not an IP address"),
            (route("", "fd00::1", ""), "routes[1].gateway \"fd00::1\": not of the destination's address family"),
            (route("10.0.0.0/8", "", ""), "routes[1] \"10.0.0.0/8\": needs a gateway or a device"),
            (route("10.0.0.0/8", "", "a/b"), "routes[1].device \"a/b\""),
        ];
        let good = route("", "10.0.0.1", "");
        for (bad, expected) in cases {
            let message = error(&[], &[good.clone(), bad.clone()]);
            assert!(message.contains(expected), "{message:?} lacks {expected:?}");
        }
        let mut with_source = route("10.0.0.0/8", "", "eth0");
        with_source.source = "fd00::1".into();
        assert!(error(&[], &[with_source]).starts_with("routes[0].source"));
        let mut with_scope = route("10.0.0.0/8", "", "eth0");
        with_scope.scope = 255;
        assert!(error(&[], &[with_scope.clone()]).starts_with("routes[0].scope \"255\""));
        with_scope.scope = 253;
        NetworkConfig::from_request(&[], &[with_scope]).expect("link scope");
    }

    #[test]
    fn networks_and_broadcasts() {
        assert!(host_bits_clear("0.0.0.0".parse().expect("ip"), 0));
        assert!(host_bits_clear("10.1.0.0".parse().expect("ip"), 16));
        assert!(!host_bits_clear("10.1.0.1".parse().expect("ip"), 16));
        assert!(host_bits_clear("10.1.0.1".parse().expect("ip"), 32));
        assert!(host_bits_clear("fd00::".parse().expect("ip"), 16));
        assert!(!host_bits_clear("fd00::1".parse().expect("ip"), 127));
        assert_eq!(broadcast(Ipv4Addr::new(10, 88, 0, 5), 16), Some(Ipv4Addr::new(10, 88, 255, 255)));
        assert_eq!(broadcast(Ipv4Addr::new(10, 88, 0, 5), 30), Some(Ipv4Addr::new(10, 88, 0, 7)));
        assert_eq!(broadcast(Ipv4Addr::new(10, 88, 0, 5), 31), None);
        assert_eq!(broadcast(Ipv4Addr::new(10, 88, 0, 5), 32), None);
    }
}
