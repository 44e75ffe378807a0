//! Where notifications may go. A pusher's URL is the user's to choose, and the server posts
//! to it: without these checks any user could make the server probe its own network (a
//! 404/410 removes the pusher, which the user sees). By default a target must be `https`,
//! and every address its host resolves to must be public: not loopback, private,
//! link-local, unique-local, shared (CGNAT), multicast or unspecified. The check runs when a
//! pusher is registered and again, through [`PublicOnly`], at every connection a request
//! makes; redirects are not followed at all. `push.allow_private_targets = true` lifts both
//! (development, and the tests' receivers on 127.0.0.1).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};

use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::NextTimeout;

/// Whether an address is one the server may post to on a user's behalf.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => public_v4(v4),
            None => public_v6(v6),
        },
    }
}

fn public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        // Shared address space (RFC 6598), the carrier's own network.
        || (a == 100 && (64..128).contains(&b))
        // Reserved for future use (240/4).
        || a >= 240)
}

fn public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        // Unique local (fc00::/7) and link-local (fe80::/10).
        || (first & 0xfe00) == 0xfc00
        || (first & 0xffc0) == 0xfe80
        // Documentation (2001:db8::/32).
        || (first == 0x2001 && ip.segments()[1] == 0x0db8))
}

/// Checks a pusher's URL when it is registered: its scheme, and (unless private targets are
/// allowed) every address its host resolves to now. Blocking (a DNS lookup).
pub fn check_url(url: &str, allow_private: bool) -> Result<(), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("{url:?} is not an absolute URL"))?;
    match scheme {
        "https" => {}
        "http" if allow_private => {}
        _ => return Err("a pusher's URL must be https".into()),
    }
    if allow_private {
        return Ok(());
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err("a pusher's URL may not carry credentials".into());
    }
    let with_port = if authority.starts_with('[') {
        // An IPv6 literal, with or without a port.
        if authority.contains("]:") {
            authority.to_owned()
        } else {
            format!("{authority}:443")
        }
    } else if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:443")
    };
    let addrs: Vec<SocketAddr> = with_port
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {authority:?}: {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("{authority:?} resolves to no address"));
    }
    if let Some(private) = addrs.iter().find(|a| !is_public(a.ip())) {
        return Err(format!(
            "{authority:?} resolves to {}, which is not a public address",
            private.ip()
        ));
    }
    Ok(())
}

/// A resolver that drops every address that is not public, and fails when none is left: the
/// check again at each connection, so a host that changes its DNS after registration still
/// cannot point the server inward.
#[derive(Debug, Default)]
pub struct PublicOnly {
    inner: DefaultResolver,
}

impl Resolver for PublicOnly {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let all = self.inner.resolve(uri, config, timeout)?;
        let mut public = self.empty();
        for addr in all.iter().filter(|a| is_public(a.ip())) {
            public.push(*addr);
        }
        if public.is_empty() {
            return Err(ureq::Error::HostNotFound);
        }
        Ok(public)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inward_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_public(ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["93.184.216.34", "8.8.8.8", "2606:4700::1111"] {
            assert!(is_public(ip.parse().expect("ip")), "{ip}");
        }
    }

    #[test]
    fn urls_are_checked_by_scheme_and_address() {
        assert!(check_url("http://push.example/x", false).is_err(), "http");
        assert!(check_url("https://127.0.0.1/x", false).is_err());
        assert!(check_url("https://[::1]:8443/x", false).is_err());
        assert!(check_url("https://localhost/x", false).is_err());
        assert!(check_url("https://user@8.8.8.8/x", false).is_err());
        assert!(check_url("ftp://8.8.8.8/x", false).is_err());
        assert!(check_url("https://8.8.8.8/_matrix/push/v1/notify", false).is_ok());
        assert!(check_url("http://127.0.0.1:9/x", true).is_ok(), "allowed");
    }
}
