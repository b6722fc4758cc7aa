//! Destination addresses: which ones are private (loopback, RFC 1918, link-local, metadata, ULA, …) and
//! therefore denied unless a CIDR in the policy allows them.
//!
//! SECURITY: this table is what stops DNS rebinding and SSRF into the host's own services. A range missing here is
//! a range the bottle can reach by naming an allowed host that resolves into it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// Shortest prefixes accepted in `allow_cidr`: anything wider is "allow the internet by address".
pub const MIN_V4_PREFIX: u8 = 8;
pub const MIN_V6_PREFIX: u8 = 8;

/// Why an address counts as private, for error messages and the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrivateKind {
    Unspecified,
    Loopback,
    Rfc1918,
    SharedCgnat,
    LinkLocal,
    Metadata,
    UniqueLocal,
    Multicast,
    Broadcast,
    Reserved,
    Documentation,
    Ipv4Mapped,
}

impl PrivateKind {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Unspecified => "an unspecified address",
            Self::Loopback => "a loopback address",
            Self::Rfc1918 => "an RFC 1918 private address",
            Self::SharedCgnat => "a shared (CGNAT, RFC 6598) address",
            Self::LinkLocal => "a link-local address",
            Self::Metadata => "a cloud metadata address",
            Self::UniqueLocal => "an IPv6 unique-local address",
            Self::Multicast => "a multicast address",
            Self::Broadcast => "the broadcast address",
            Self::Reserved => "a reserved address",
            Self::Documentation => "a documentation address",
            Self::Ipv4Mapped => {
                "an IPv6 address that embeds a private IPv4 address (mapped, translated, NAT64, 6to4 or Teredo)"
            }
        }
    }
}

/// Classifies an address; `None` means public.
pub fn private_kind(ip: IpAddr) -> Option<PrivateKind> {
    match ip {
        IpAddr::V4(v4) => private_v4(v4),
        IpAddr::V6(v6) => private_v6(v6),
    }
}

fn private_v4(ip: Ipv4Addr) -> Option<PrivateKind> {
    let o = ip.octets();
    let kind = match o {
        [169, 254, 169, 254] | [100, 100, 100, 200] => PrivateKind::Metadata,
        [0, ..] => PrivateKind::Unspecified,
        [127, ..] => PrivateKind::Loopback,
        [10, ..] => PrivateKind::Rfc1918,
        [172, b, ..] if (16..=31).contains(&b) => PrivateKind::Rfc1918,
        [192, 168, ..] => PrivateKind::Rfc1918,
        [100, b, ..] if (64..=127).contains(&b) => PrivateKind::SharedCgnat,
        [169, 254, ..] => PrivateKind::LinkLocal,
        [192, 0, 0, _] | [198, 18..=19, ..] => PrivateKind::Reserved,
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => PrivateKind::Documentation,
        [255, 255, 255, 255] => PrivateKind::Broadcast,
        [224..=239, ..] => PrivateKind::Multicast,
        [240..=255, ..] => PrivateKind::Reserved,
        _ => return None,
    };
    Some(kind)
}

fn private_v6(ip: Ipv6Addr) -> Option<PrivateKind> {
    if ip.is_unspecified() {
        return Some(PrivateKind::Unspecified);
    }
    if ip.is_loopback() {
        return Some(PrivateKind::Loopback);
    }
    // SECURITY: every IPv6 form that carries an IPv4 address is judged by that address (a translator or relay on
    // the path would deliver it there): IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d`, SIIT's
    // IPv4-translated `::ffff:0:a.b.c.d` (RFC 7915), the NAT64 well-known prefix `64:ff9b::/96` (RFC 6052),
    // 6to4 `2002:aabb:ccdd::/48` (RFC 3056) and Teredo `2001:0::/32` (RFC 4380: server and obfuscated client).
    // The local-use NAT64 prefix `64:ff9b:1::/48` (RFC 8215) may embed the IPv4 address in any RFC 6052 layout
    // chosen by the network, so the whole prefix is refused.
    let seg = ip.segments();
    if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2] == 1 {
        return Some(PrivateKind::Ipv4Mapped);
    }
    let v4 = |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    let embedded: Vec<Ipv4Addr> = if let Some(mapped) = ip.to_ipv4_mapped() {
        vec![mapped]
    } else if seg[..6] == [0, 0, 0, 0, 0, 0]
        || seg[..6] == [0, 0, 0, 0, 0xffff, 0]
        || (seg[0] == 0x64 && seg[1] == 0xff9b && seg[2..6] == [0, 0, 0, 0])
    {
        vec![v4(seg[6], seg[7])]
    } else if seg[0] == 0x2002 {
        vec![v4(seg[1], seg[2])]
    } else if seg[0] == 0x2001 && seg[1] == 0 {
        vec![v4(seg[2], seg[3]), v4(!seg[6], !seg[7])]
    } else {
        Vec::new()
    };
    if !embedded.is_empty() {
        return embedded
            .into_iter()
            .any(|v4| private_v4(v4).is_some())
            .then_some(PrivateKind::Ipv4Mapped);
    }
    let kind = match seg[0] {
        0xfd00 if seg[1..] == [0x0ec2, 0, 0, 0, 0, 0, 0x254] => PrivateKind::Metadata, // AWS IMDS over IPv6
        s if s & 0xfe00 == 0xfc00 => PrivateKind::UniqueLocal,
        s if s & 0xffc0 == 0xfe80 => PrivateKind::LinkLocal,
        s if s & 0xffc0 == 0xfec0 => PrivateKind::Reserved, // deprecated site-local
        s if s & 0xff00 == 0xff00 => PrivateKind::Multicast,
        0x2001 if seg[1] == 0x0db8 => PrivateKind::Documentation,
        0x0100 if seg[1..4] == [0, 0, 0] => PrivateKind::Reserved, // discard-only 100::/64
        _ => return None,
    };
    Some(kind)
}

/// Refuses CIDRs so wide that they amount to "any address".
pub fn check_allow_cidr(net: &IpNet) -> Result<(), String> {
    let (min, family) = match net {
        IpNet::V4(_) => (MIN_V4_PREFIX, "IPv4"),
        IpNet::V6(_) => (MIN_V6_PREFIX, "IPv6"),
    };
    if net.prefix_len() < min {
        return Err(format!(
            "`{net}` is too broad: an {family} allow_cidr needs a prefix of /{min} or longer"
        ));
    }
    if net.trunc() != *net {
        return Err(format!(
            "`{net}` has host bits set; write the network address, `{}`",
            net.trunc()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(s: &str) -> Option<PrivateKind> {
        private_kind(s.parse().unwrap())
    }

    #[test]
    fn private_ranges_are_recognised() {
        let cases = [
            ("127.0.0.1", PrivateKind::Loopback),
            ("127.0.0.9", PrivateKind::Loopback),
            ("10.1.2.3", PrivateKind::Rfc1918),
            ("172.16.0.1", PrivateKind::Rfc1918),
            ("172.31.255.255", PrivateKind::Rfc1918),
            ("192.168.1.1", PrivateKind::Rfc1918),
            ("169.254.169.254", PrivateKind::Metadata),
            ("169.254.1.1", PrivateKind::LinkLocal),
            ("100.64.0.1", PrivateKind::SharedCgnat),
            ("0.0.0.0", PrivateKind::Unspecified),
            ("::", PrivateKind::Unspecified),
            ("::1", PrivateKind::Loopback),
            ("fd00::1", PrivateKind::UniqueLocal),
            ("fc00::1", PrivateKind::UniqueLocal),
            ("fe80::1", PrivateKind::LinkLocal),
            ("fd00:ec2::254", PrivateKind::Metadata),
            ("::ffff:127.0.0.1", PrivateKind::Ipv4Mapped),
            ("::ffff:10.0.0.1", PrivateKind::Ipv4Mapped),
            ("64:ff9b::a9fe:a9fe", PrivateKind::Ipv4Mapped),
            ("64:ff9b:1::a00:1", PrivateKind::Ipv4Mapped),
            ("64:ff9b:1:a00:1::", PrivateKind::Ipv4Mapped),
            ("::ffff:0:a00:1", PrivateKind::Ipv4Mapped),
            ("::ffff:0:7f00:1", PrivateKind::Ipv4Mapped),
            ("::a00:1", PrivateKind::Ipv4Mapped),
            ("2002:a00:1::1", PrivateKind::Ipv4Mapped),
            ("2002:c0a8:101::", PrivateKind::Ipv4Mapped),
            ("2001:0:4136:e378:8000:63bf:f5ff:fffe", PrivateKind::Ipv4Mapped),
            ("2001:0:a00:1::1", PrivateKind::Ipv4Mapped),
            ("224.0.0.1", PrivateKind::Multicast),
            ("255.255.255.255", PrivateKind::Broadcast),
            ("ff02::1", PrivateKind::Multicast),
        ];
        for (ip, want) in cases {
            assert_eq!(kind(ip), Some(want), "{ip}");
        }
    }

    #[test]
    fn public_addresses_are_public() {
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "2001:0:4136:e378:8000:63bf:f7f7:f7f7",
        ] {
            assert_eq!(kind(ip), None, "{ip}");
        }
    }

    #[test]
    fn over_broad_cidrs_are_refused() {
        assert!(check_allow_cidr(&"0.0.0.0/0".parse().unwrap()).is_err());
        assert!(check_allow_cidr(&"::/0".parse().unwrap()).is_err());
        assert!(check_allow_cidr(&"10.0.0.0/8".parse().unwrap()).is_ok());
        assert!(check_allow_cidr(&"127.0.0.1/8".parse().unwrap()).is_err());
        assert!(check_allow_cidr(&"127.0.0.1/32".parse().unwrap()).is_ok());
    }
}
