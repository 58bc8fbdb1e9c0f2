//! MAC addresses, written `02:42:0a:00:00:02` in JSON as Docker does.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Docker's derivation for container interfaces: `02:42` followed by the IPv4 address,
    /// so a MAC is unique wherever the address is.
    pub fn from_ipv4(addr: std::net::Ipv4Addr) -> Self {
        let [a, b, c, d] = addr.octets();
        MacAddr([0x02, 0x42, a, b, c, d])
    }
}

/// A string that is not six colon-separated hex bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?}: want six hex bytes like 02:42:0a:00:00:02")]
pub struct ParseMacError(String);

impl FromStr for MacAddr {
    type Err = ParseMacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseMacError(s.to_owned());
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(bytes))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text() {
        let mac: MacAddr = "02:42:0a:00:00:02".parse().unwrap();
        assert_eq!(mac.0, [0x02, 0x42, 0x0a, 0, 0, 2]);
        assert_eq!(mac.to_string(), "02:42:0a:00:00:02");
    }

    #[test]
    fn rejects_malformed_text() {
        for bad in ["", "02:42:0a:00:00", "02:42:0a:00:00:02:03", "2:42:0a:00:00:02", "zz:42:0a:00:00:02"] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn derives_docker_style_from_ipv4() {
        let mac = MacAddr::from_ipv4("10.0.0.2".parse().unwrap());
        assert_eq!(mac.to_string(), "02:42:0a:00:00:02");
    }
}
