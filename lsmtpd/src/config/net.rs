//! Networks in the configuration (`smtp.policy.allowed_networks`, `smtp.limits.rate_limit_exempt`,
//! `smtp.limits.trusted_networks`, `smtp.proxy_protocol.trusted_proxies`): CIDR or single
//! addresses. Pure.

use std::net::IpAddr;

use ipnet::IpNet;

use super::Problem;

/// Parses a network: CIDR (`10.0.0.0/8`, `2001:db8::/32`) or a single address (`192.0.2.1`,
/// meaning /32 or /128). Host bits set below the prefix are ignored (`10.1.2.3/8` is `10.0.0.0/8`).
pub fn parse_network(s: &str) -> Option<IpNet> {
    let s = s.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        return Some(canonical_net(net.trunc()));
    }
    s.parse::<IpAddr>()
        .ok()
        .map(|ip| IpNet::from(ip.to_canonical()))
}

/// An IPv4-mapped IPv6 network (`::ffff:10.0.0.0/104`) becomes the IPv4 network it means, since
/// the listener reports IPv4-mapped peers as IPv4.
fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net {
        if let (Some(v4), true) = (v6.addr().to_ipv4_mapped(), v6.prefix_len() >= 96) {
            if let Ok(n) = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96) {
                return IpNet::V4(n);
            }
        }
    }
    net
}

/// Adds a problem for each entry of `list` that is not a network, naming `setting`.
pub fn check_networks(setting: &str, list: &[String], problems: &mut Vec<Problem>) {
    for entry in list {
        if parse_network(entry).is_none() {
            problems.push(Problem::new(
                setting,
                format!(
                    "{entry:?} is not a network (CIDR such as 192.0.2.0/24 or 2001:db8::/32, or one address)"
                ),
            ));
        }
    }
}

/// Parses a list that was validated with [`check_networks`]; a bad entry is an error naming it.
pub fn parse_networks(list: &[String]) -> Result<Vec<IpNet>, PolicyError> {
    list.iter()
        .map(|e| parse_network(e).ok_or_else(|| PolicyError(e.clone())))
        .collect()
}

/// A configuration entry that did not parse (only possible when `validate` was skipped).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad policy entry {0:?}")]
pub struct PolicyError(pub String);
