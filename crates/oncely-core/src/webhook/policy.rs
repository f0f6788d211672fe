//! Which endpoint URLs may be created: schemes the transport can send, and public addresses only
//! unless private networks are allowed (the stock transport's rule, checked again after DNS).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::error::{Error, Result};

/// Which endpoint URLs can be sent to: checked when an endpoint is created or its URL changed, so
/// that an endpoint the delivery transport would refuse is refused at once with a clear error
/// instead of failing at every delivery.
///
/// The address check here sees only the URL: an IP literal, or the name `localhost` (and
/// `*.localhost`). A host name that resolves to a private address can only be caught when it is
/// resolved, which the transport does before each connection.
///
/// # Example
///
/// ```
/// use oncely_core::webhook::EndpointPolicy;
/// let policy = EndpointPolicy::default();
/// assert!(policy.check("https://hooks.example.com/in").is_ok());
/// assert!(policy.check("http://169.254.169.254/latest").is_err());
/// assert!(policy.check("http://localhost:8080/").is_err());
/// assert!(EndpointPolicy::default().allow_private_networks(true).check("http://localhost:8080/").is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointPolicy {
    /// URL schemes the transport sends, lowercase. Defaults to `http` and `https`.
    pub schemes: Vec<String>,
    /// Accept loopback, private, link-local and other non-public addresses. Defaults to false.
    pub allow_private_networks: bool,
}

impl Default for EndpointPolicy {
    fn default() -> Self {
        EndpointPolicy { schemes: vec!["http".into(), "https".into()], allow_private_networks: false }
    }
}

impl EndpointPolicy {
    /// Accept (or not) non-public addresses.
    pub fn allow_private_networks(mut self, allow: bool) -> Self {
        self.allow_private_networks = allow;
        self
    }

    /// Accept only these schemes.
    pub fn schemes<S: Into<String>>(mut self, schemes: impl IntoIterator<Item = S>) -> Self {
        self.schemes = schemes.into_iter().map(|s| s.into().to_ascii_lowercase()).collect();
        self
    }

    /// Check `url` against the policy: [`Error::InvalidInput`] naming what is wrong.
    pub fn check(&self, url: &str) -> Result<()> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| Error::InvalidInput(format!("endpoint URL is not an absolute URL: {url:?}")))?;
        let scheme = scheme.to_ascii_lowercase();
        if !self.schemes.contains(&scheme) {
            return Err(Error::InvalidInput(format!(
                "endpoint URL scheme {scheme}:// cannot be sent by the delivery transport (it sends {})",
                self.schemes.iter().map(|s| format!("{s}://")).collect::<Vec<_>>().join(", ")
            )));
        }
        if self.allow_private_networks {
            return Ok(());
        }
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let host = if let Some(v6) = host_port.strip_prefix('[') {
            v6.split(']').next().unwrap_or("")
        } else {
            host_port.split(':').next().unwrap_or("")
        };
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let private = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => !is_public_address(ip),
            Err(_) => host == "localhost" || host.ends_with(".localhost"),
        };
        if private {
            return Err(Error::InvalidInput(format!(
                "endpoint URL {url:?} names a loopback or private address ({host}), which the delivery transport \
                 refuses; allow private networks on both the transport and the endpoint policy to use it"
            )));
        }
        Ok(())
    }
}

/// Whether an endpoint may be sent to at `ip`: false for loopback, private (RFC 1918, IPv6 unique
/// local), shared (100.64.0.0/10), link-local (which includes cloud metadata services at
/// 169.254.169.254), unspecified, broadcast, multicast, documentation, benchmarking and reserved
/// addresses, and for IPv6 addresses that embed such an IPv4 address.
pub fn is_public_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0 // "this network"
        || (a == 100 && (64..128).contains(&b)) // shared address space (carrier-grade NAT)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240) // reserved
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    let s = ip.segments();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00 // unique local
        || (s[0] & 0xffc0) == 0xfe80 // link-local
        || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated, still routed inside some networks)
        || (s[0] == 0x0064 && s[1] == 0xff9b && s[2] == 0x0001) // local-use NAT64 (RFC 8215)
        || (s[0] == 0x2002 && !is_public_v4(Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8))) // 6to4 of a non-public IPv4
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        || (s[0] == 0x0064 && s[1] == 0xff9b && !is_public_v4(embedded_v4(s))) // NAT64 of a non-public IPv4
        || (s[..6] == [0; 6] && !is_public_v4(embedded_v4(s)))) // IPv4-compatible (deprecated)
}

fn embedded_v4(s: [u16; 8]) -> Ipv4Addr {
    Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8)
}

pub(super) fn validate_url(url: &str) -> Result<()> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| Error::InvalidInput(format!("endpoint URL must start with http:// or https://, got {url:?}")))?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() || url.len() > 2048 || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::InvalidInput(format!("endpoint URL is not a valid absolute URL: {url:?}")));
    }
    Ok(())
}
