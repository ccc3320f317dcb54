//! A virtio-net device's configuration: its tap, the guest's MAC address and
//! MTU, in JSON (the runtime's config file) or `--net` syntax.

use std::os::unix::io::RawFd;

use serde::{Deserialize, Serialize};

/// The smallest MTU accepted (the IPv4 minimum).
pub const MIN_MTU: u32 = 68;
/// The largest MTU accepted (the config space field is 16 bits, and
/// a tap allows no more).
pub const MAX_MTU: u32 = 65535;
/// The MTU when none is configured.
pub const DEFAULT_MTU: u32 = 1500;
/// Longest interface name (`IFNAMSIZ` minus the terminator).
pub const MAX_IFNAME_LEN: usize = 15;

/// A MAC address (six octets), written `02:00:00:00:00:01`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Whether the guest may use it as its own address: not multicast (the
    /// low bit of the first octet) and not all zeros.
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl std::str::FromStr for MacAddr {
    type Err = NetConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NetConfigError::BadMac(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for o in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

impl TryFrom<String> for MacAddr {
    type Error = NetConfigError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<MacAddr> for String {
    fn from(m: MacAddr) -> String {
        m.to_string()
    }
}

/// Where a device's tap comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum TapSource {
    /// An open tap file the VMM inherited (the runtime's way). The VMM
    /// works on a duplicate; the number itself is left as it is.
    Fd(RawFd),
    /// A tap interface by name, created (or attached to, if it exists with
    /// the same flags) in the VMM's network namespace.
    Name(String),
}

fn default_mtu() -> u32 {
    DEFAULT_MTU
}

/// One network device: what the VMM's configuration carries per device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The tap the frames go through.
    pub tap: TapSource,
    /// The guest's MAC address.
    pub mac: MacAddr,
    /// The MTU the guest is told to use (68..=65535).
    #[serde(default = "default_mtu")]
    pub mtu: u32,
}

impl NetConfig {
    /// Checks what can be checked without opening anything.
    pub fn validate(&self) -> Result<(), NetConfigError> {
        if !self.mac.is_unicast() {
            return Err(NetConfigError::MacNotUnicast(self.mac));
        }
        if !(MIN_MTU..=MAX_MTU).contains(&self.mtu) {
            return Err(NetConfigError::BadMtu(self.mtu));
        }
        match &self.tap {
            TapSource::Fd(fd) if *fd < 0 => Err(NetConfigError::BadFd(*fd)),
            TapSource::Name(n) if n.is_empty() => Err(NetConfigError::EmptyTapName),
            TapSource::Name(n) if n.len() > MAX_IFNAME_LEN || n.contains(['/', '\0', ' ', ':']) || n == "." || n == ".." => {
                Err(NetConfigError::BadTapName(n.clone()))
            }
            _ => Ok(()),
        }
    }
}

impl std::str::FromStr for NetConfig {
    type Err = NetConfigError;

    /// `fd=N,mac=MAC[,mtu=M]` or `tap=NAME,mac=MAC[,mtu=M]` (the
    /// `carapace-vmm --net` syntax).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut tap = None;
        let mut mac = None;
        let mut mtu = DEFAULT_MTU;
        for item in s.split(',') {
            let (key, value) = item.split_once('=').ok_or_else(|| NetConfigError::BadOption(item.to_string()))?;
            match key {
                "fd" | "tap" if tap.is_some() => return Err(NetConfigError::TwoTaps(s.to_string())),
                "fd" => tap = Some(TapSource::Fd(value.parse().map_err(|_| NetConfigError::BadFdValue(value.to_string()))?)),
                "tap" => tap = Some(TapSource::Name(value.to_string())),
                "mac" => mac = Some(value.parse()?),
                "mtu" => mtu = value.parse().map_err(|_| NetConfigError::BadMtuValue(value.to_string()))?,
                _ => return Err(NetConfigError::BadOption(item.to_string())),
            }
        }
        let config = NetConfig {
            tap: tap.ok_or_else(|| NetConfigError::NoTap(s.to_string()))?,
            mac: mac.ok_or_else(|| NetConfigError::NoMac(s.to_string()))?,
            mtu,
        };
        config.validate()?;
        Ok(config)
    }
}

/// Why a net device's configuration was rejected.
#[derive(Debug, thiserror::Error)]
pub enum NetConfigError {
    /// A MAC address that is not six colon-separated hex octets.
    #[error("invalid MAC address {0:?} (expected six hex octets like 02:00:00:00:00:01)")]
    BadMac(String),
    /// A multicast or all-zero MAC address.
    #[error("MAC address {0} is not a unicast address (multicast bit set, or all zeros)")]
    MacNotUnicast(MacAddr),
    /// An MTU out of range.
    #[error("net mtu {0} is out of range ({min}..={max})", min = MIN_MTU, max = MAX_MTU)]
    BadMtu(u32),
    /// An MTU that is not a number.
    #[error("net mtu {0:?} is not a number")]
    BadMtuValue(String),
    /// A negative fd.
    #[error("net fd {0} is not a file descriptor number")]
    BadFd(RawFd),
    /// An fd that is not a number.
    #[error("net fd {0:?} is not a file descriptor number")]
    BadFdValue(String),
    /// An empty tap name.
    #[error("net tap name is empty")]
    EmptyTapName,
    /// A tap name the kernel would refuse.
    #[error("net tap name {0:?} is not a valid interface name (1-15 bytes, no '/', ':', space or NUL)")]
    BadTapName(String),
    /// A `--net` item that is not `key=value` or has an unknown key.
    #[error("net option {0:?} is unknown (expected fd=N or tap=NAME, mac=MAC, mtu=M)")]
    BadOption(String),
    /// Neither `fd=` nor `tap=`.
    #[error("net {0:?}: missing fd=N or tap=NAME")]
    NoTap(String),
    /// Both `fd=` and `tap=` (or one twice).
    #[error("net {0:?}: give one of fd=N or tap=NAME, once")]
    TwoTaps(String),
    /// No `mac=`.
    #[error("net {0:?}: missing mac=MAC")]
    NoMac(String),
    /// Two devices with one MAC or one fd.
    #[error("net: {0} is used by more than one device")]
    Duplicate(String),
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn config_syntax_and_errors_name_the_value() {
        let c: NetConfig = "fd=3,mac=02:00:00:00:00:01".parse().expect("parse");
        assert_eq!(c, NetConfig { tap: TapSource::Fd(3), mac: MacAddr([2, 0, 0, 0, 0, 1]), mtu: 1500 });
        let c: NetConfig = "tap=tap0,mac=02:AB:cd:00:00:01,mtu=9000".parse().expect("parse");
        assert_eq!(c, NetConfig { tap: TapSource::Name("tap0".into()), mac: MacAddr([2, 0xab, 0xcd, 0, 0, 1]), mtu: 9000 });
        for (bad, needle) in [
            ("fd=3,mac=02:00:00:00:00", "02:00:00:00:00"),
            ("fd=3,mac=02:00:00:00:00:01:02", "02:00:00:00:00:01:02"),
            ("fd=3,mac=zz:00:00:00:00:01", "zz:00:00:00:00:01"),
            ("fd=3,mac=2:0:0:0:0:1", "2:0:0:0:0:1"),
            ("fd=3,mac=01:00:00:00:00:01", "not a unicast"),
            ("fd=3,mac=00:00:00:00:00:00", "not a unicast"),
            ("fd=x,mac=02:00:00:00:00:01", "\"x\""),
            ("fd=-1,mac=02:00:00:00:00:01", "-1"),
            ("tap=,mac=02:00:00:00:00:01", "tap name is empty"),
            ("tap=a/b,mac=02:00:00:00:00:01", "a/b"),
            ("tap=sixteen_chars_xx,mac=02:00:00:00:00:01", "sixteen_chars_xx"),
            ("mac=02:00:00:00:00:01", "missing fd=N or tap=NAME"),
            ("fd=3", "missing mac"),
            ("fd=3,tap=x,mac=02:00:00:00:00:01", "one of"),
            ("fd=3,mac=02:00:00:00:00:01,mtu=70000", "mtu 70000"),
            ("fd=3,mac=02:00:00:00:00:01,mtu=big", "\"big\""),
            ("fd=3,mac=02:00:00:00:00:01,speed=10", "speed=10"),
            ("fd=3,mac=02:00:00:00:00:01,", "\"\""),
        ] {
            let e = bad.parse::<NetConfig>().expect_err(bad).to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
        // JSON, as the runtime writes it.
        let c: NetConfig = serde_json::from_str(r#"{"tap": {"fd": 7}, "mac": "02:00:00:00:00:09"}"#).expect("json");
        assert_eq!(c.mtu, 1500);
        assert_eq!(serde_json::from_str::<NetConfig>(&serde_json::to_string(&c).unwrap()).unwrap(), c);
        assert!(serde_json::to_string(&c).unwrap().contains(r#""mac":"02:00:00:00:00:09""#));
        assert!(serde_json::from_str::<NetConfig>(r#"{"tap": {"fd": 7}, "mac": "nope"}"#).is_err());
        assert!(serde_json::from_str::<NetConfig>(r#"{"tap": {"fd": 7}, "mac": "02:00:00:00:00:09", "x": 1}"#).is_err());
    }
}
