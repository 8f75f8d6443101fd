//! Who may send, and to whom: the `smtp.policy` section (allowed client networks, allowed
//! recipients), checked at RCPT TO.
//!
//! Pure: [`Policy::check_rcpt`] takes the client address, whether the client authenticated and
//! the recipient, and returns `Ok` or the refusal to send. The session only asks.
//!
//! Rules (documented in the README, section "Abuse limits, recipient policy and PROXY"):
//! - `allowed_networks` empty: any client. Otherwise a client outside every listed network gets
//!   `554 5.7.1 <rcpt>: Relay access denied` for each recipient, unless it authenticated.
//! - `allowed_recipients` empty: any recipient. Otherwise each entry is a domain (`example.org`:
//!   exactly that domain), a subdomain pattern (`.example.org`: every subdomain of it, not the
//!   domain itself) or an address (`ops@example.org`). A recipient whose domain is not matched
//!   by any entry gets `550 5.7.1 <rcpt>: Recipient domain not accepted here`; a recipient whose
//!   domain is known only through address entries, and that is not one of them, gets
//!   `550 5.1.1 <rcpt>: Recipient address rejected: unknown user`.
//! - Domains compare case-insensitively and in their A-label (punycode) form, so `bücher.example`
//!   and `xn--bcher-kva.example` are the same domain. Local parts compare case-insensitively,
//!   and a quoted local part that needs no quotes equals its unquoted form (`"ops"` = `ops`).
//! - `<Postmaster>` and `postmaster@<any accepted domain>` are always accepted as recipients
//!   (RFC 5321 4.5.1); the network rule still applies to them.
//!
//! Invariant: a `Policy` is only built from a configuration whose entries all parsed, so
//! checking never fails for a reason of its own.

use std::collections::HashSet;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::net::parse_networks;
pub use crate::config::net::PolicyError;
use crate::config::recipient::{normalize_domain, normalize_local, RecipientEntry};
use crate::config::PolicyConfig;
use crate::smtp::wire::command::ForwardPath;
use crate::smtp::wire::reply::Reply;

/// A list of networks; `contains` is a linear scan (lists are short: a few entries).
#[derive(Debug, Clone, Default)]
pub struct Networks(Vec<IpNet>);

impl Networks {
    pub fn new(nets: Vec<IpNet>) -> Networks {
        Networks(nets)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|n| n.contains(&ip))
    }
}

/// Why a recipient is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The client is outside `allowed_networks` and did not authenticate: 554 5.7.1.
    RelayDenied,
    /// No entry covers the recipient's domain: 550 5.7.1.
    DomainNotAccepted,
    /// The domain is known only through address entries and this address is not one: 550 5.1.1.
    UnknownUser,
}

impl Refusal {
    /// The reply for recipient `rcpt` (shown as the client wrote it).
    pub fn reply(self, rcpt: &ForwardPath) -> Reply {
        match self {
            Refusal::RelayDenied => Reply::new(
                554,
                Some((5, 7, 1)),
                format!("<{rcpt}>: Relay access denied"),
            ),
            Refusal::DomainNotAccepted => Reply::new(
                550,
                Some((5, 7, 1)),
                format!("<{rcpt}>: Recipient domain not accepted here"),
            ),
            Refusal::UnknownUser => Reply::new(
                550,
                Some((5, 1, 1)),
                format!("<{rcpt}>: Recipient address rejected: unknown user"),
            ),
        }
    }

    /// A short name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::RelayDenied => "relay_denied",
            Refusal::DomainNotAccepted => "domain_not_accepted",
            Refusal::UnknownUser => "unknown_user",
        }
    }
}

/// The compiled `smtp.policy`.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    networks: Networks,
    /// Any recipient when false.
    restrict_recipients: bool,
    domains: HashSet<String>,
    subdomains: Vec<String>,
    /// Domains that have address entries, and the addresses as (local, domain).
    address_domains: HashSet<String>,
    addresses: HashSet<(String, String)>,
}

impl Policy {
    /// Builds the policy; fails only on an entry that `PolicyConfig::validate` would report.
    pub fn compile(cfg: &PolicyConfig) -> Result<Policy, PolicyError> {
        let mut p = Policy {
            networks: Networks::new(parse_networks(&cfg.allowed_networks)?),
            restrict_recipients: !cfg.allowed_recipients.is_empty(),
            ..Policy::default()
        };
        for entry in &cfg.allowed_recipients {
            match RecipientEntry::parse(entry).map_err(|_| PolicyError(entry.clone()))? {
                RecipientEntry::Domain(d) => {
                    p.domains.insert(d);
                }
                RecipientEntry::Subdomains(d) => p.subdomains.push(d),
                RecipientEntry::Address { local, domain } => {
                    p.address_domains.insert(domain.clone());
                    p.addresses.insert((local, domain));
                }
            }
        }
        Ok(p)
    }

    /// Whether a client at `ip` may send at all (before authentication).
    pub fn client_allowed(&self, ip: IpAddr) -> bool {
        self.networks.is_empty() || self.networks.contains(ip)
    }

    /// Decides one RCPT TO. `authenticated` is true when the client authenticated (SMTP AUTH):
    /// such a client may send from any network.
    pub fn check_rcpt(
        &self,
        client: IpAddr,
        authenticated: bool,
        rcpt: &ForwardPath,
    ) -> Result<(), Refusal> {
        if !authenticated && !self.client_allowed(client) {
            return Err(Refusal::RelayDenied);
        }
        if !self.restrict_recipients {
            return Ok(());
        }
        let addr = match rcpt {
            ForwardPath::Postmaster => return Ok(()),
            ForwardPath::Mailbox(a) => a,
        };
        let Some(domain) = normalize_domain(&addr.domain) else {
            return Err(Refusal::DomainNotAccepted);
        };
        let whole_domain = self.domains.contains(&domain)
            || self.subdomains.iter().any(|parent| {
                domain.len() > parent.len() + 1
                    && domain.ends_with(parent.as_str())
                    && domain.as_bytes()[domain.len() - parent.len() - 1] == b'.'
            });
        if whole_domain {
            return Ok(());
        }
        if !self.address_domains.contains(&domain) {
            return Err(Refusal::DomainNotAccepted);
        }
        let local = normalize_local(&addr.local);
        if local == "postmaster" || self.addresses.contains(&(local, domain)) {
            Ok(())
        } else {
            Err(Refusal::UnknownUser)
        }
    }
}

/// Everything the listener and the sessions consult about abuse: the recipient policy, the
/// rate limits and the trusted PROXY peers. Built once at startup from `smtp`.
pub struct Guard {
    pub policy: Policy,
    pub limits: crate::smtp::ratelimit::RateLimits,
    /// Peers allowed to send a PROXY header (`smtp.proxy_protocol.trusted_proxies`).
    pub trusted_proxies: Networks,
}

impl Guard {
    /// Fails only on an entry that `Config::validate` would have reported.
    pub fn new(smtp: &crate::config::SmtpConfig) -> Result<Guard, PolicyError> {
        Ok(Guard {
            policy: Policy::compile(&smtp.policy)?,
            limits: crate::smtp::ratelimit::RateLimits::new(&smtp.limits)?,
            trusted_proxies: Networks::new(parse_networks(&smtp.proxy_protocol.trusted_proxies)?),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::net::parse_network;
    use crate::smtp::wire::address::Address;
    use proptest::prelude::*;

    fn policy(nets: &[&str], rcpts: &[&str]) -> Policy {
        Policy::compile(&PolicyConfig {
            allowed_networks: nets.iter().map(|s| s.to_string()).collect(),
            allowed_recipients: rcpts.iter().map(|s| s.to_string()).collect(),
        })
        .unwrap()
    }

    fn rcpt(s: &str) -> ForwardPath {
        if s.eq_ignore_ascii_case("postmaster") {
            return ForwardPath::Postmaster;
        }
        ForwardPath::Mailbox(Address::parse(s).unwrap())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn empty_policy_accepts_any_client_and_any_recipient() {
        let p = policy(&[], &[]);
        assert_eq!(
            p.check_rcpt(ip("203.0.113.9"), false, &rcpt("a@b.example")),
            Ok(())
        );
        assert_eq!(
            p.check_rcpt(ip("::1"), false, &rcpt("x@[192.0.2.1]")),
            Ok(())
        );
    }

    #[test]
    fn client_outside_the_networks_is_refused_as_relay_unless_authenticated() {
        let p = policy(&["10.0.0.0/8", "2001:db8::/32"], &[]);
        let r = rcpt("a@example.org");
        assert_eq!(p.check_rcpt(ip("10.1.2.3"), false, &r), Ok(()));
        assert_eq!(p.check_rcpt(ip("2001:db8::5"), false, &r), Ok(()));
        assert_eq!(p.check_rcpt(ip("::ffff:10.9.9.9"), false, &r), Ok(()));
        assert_eq!(
            p.check_rcpt(ip("127.0.0.1"), false, &r),
            Err(Refusal::RelayDenied)
        );
        assert_eq!(p.check_rcpt(ip("127.0.0.1"), true, &r), Ok(()));
        assert_eq!(
            p.check_rcpt(ip("127.0.0.1"), false, &ForwardPath::Postmaster),
            Err(Refusal::RelayDenied)
        );
    }

    #[test]
    fn relay_denied_reply_uses_postfix_wording() {
        let r = rcpt("a@example.org");
        assert_eq!(
            Refusal::RelayDenied.reply(&r).to_string(),
            "554 5.7.1 <a@example.org>: Relay access denied"
        );
        assert_eq!(
            Refusal::DomainNotAccepted.reply(&r).to_string(),
            "550 5.7.1 <a@example.org>: Recipient domain not accepted here"
        );
        assert_eq!(
            Refusal::UnknownUser.reply(&r).to_string(),
            "550 5.1.1 <a@example.org>: Recipient address rejected: unknown user"
        );
    }

    #[test]
    fn domains_addresses_and_subdomain_patterns() {
        let p = policy(
            &[],
            &[
                "Example.ORG",
                ".corp.example",
                "ops@shop.example",
                "\"Sales\"@shop.example",
            ],
        );
        let c = ip("192.0.2.1");
        let check = |s: &str| p.check_rcpt(c, false, &rcpt(s));
        assert_eq!(check("anyone@example.org"), Ok(()));
        assert_eq!(check("anyone@EXAMPLE.org"), Ok(()));
        assert_eq!(check("a@sub.example.org"), Err(Refusal::DomainNotAccepted));
        assert_eq!(check("a@mail.corp.example"), Ok(()));
        assert_eq!(check("a@x.y.corp.example"), Ok(()));
        assert_eq!(check("a@corp.example"), Err(Refusal::DomainNotAccepted));
        assert_eq!(check("a@evilcorp.example"), Err(Refusal::DomainNotAccepted));
        assert_eq!(check("ops@shop.example"), Ok(()));
        assert_eq!(check("OPS@Shop.Example"), Ok(()));
        assert_eq!(check("\"ops\"@shop.example"), Ok(()));
        assert_eq!(check("sales@shop.example"), Ok(()));
        assert_eq!(check("postmaster@shop.example"), Ok(()));
        assert_eq!(check("postmaster"), Ok(()));
        assert_eq!(check("dev@shop.example"), Err(Refusal::UnknownUser));
        assert_eq!(check("ops@other.example"), Err(Refusal::DomainNotAccepted));
        assert_eq!(check("ops@[192.0.2.1]"), Err(Refusal::DomainNotAccepted));
    }

    #[test]
    fn internationalised_domains_match_in_either_form() {
        let p = policy(&[], &["bücher.example", "info@xn--mller-kva.example"]);
        let c = ip("192.0.2.1");
        assert_eq!(
            p.check_rcpt(c, false, &rcpt("a@xn--bcher-kva.example")),
            Ok(())
        );
        assert_eq!(p.check_rcpt(c, false, &rcpt("a@BÜCHER.example")), Ok(()));
        assert_eq!(p.check_rcpt(c, false, &rcpt("info@müller.example")), Ok(()));
        assert_eq!(
            p.check_rcpt(c, false, &rcpt("x@müller.example")),
            Err(Refusal::UnknownUser)
        );
    }

    #[test]
    fn bad_entries_name_the_setting() {
        let cfg = PolicyConfig {
            allowed_networks: vec!["10.0.0/8".into(), "10.0.0.0/33".into(), "::1".into()],
            allowed_recipients: vec!["a@".into(), "exa mple.org".into(), "ok.example".into()],
        };
        let mut problems = Vec::new();
        cfg.validate(&mut problems);
        let names: Vec<_> = problems.iter().map(|p| p.setting.as_str()).collect();
        assert_eq!(
            names,
            [
                "smtp.policy.allowed_networks",
                "smtp.policy.allowed_networks",
                "smtp.policy.allowed_recipients",
                "smtp.policy.allowed_recipients"
            ]
        );
        assert!(problems[0].message.contains("10.0.0/8"), "{}", problems[0]);
        assert!(Policy::compile(&cfg).is_err());
    }

    #[test]
    fn single_addresses_and_mapped_networks_are_networks() {
        assert_eq!(parse_network("192.0.2.7"), "192.0.2.7/32".parse().ok());
        assert_eq!(parse_network("10.1.2.3/8"), "10.0.0.0/8".parse().ok());
        assert_eq!(
            parse_network("::ffff:10.0.0.0/104"),
            "10.0.0.0/8".parse().ok()
        );
        let n = Networks::new(vec![parse_network("::1").unwrap()]);
        assert!(n.contains(ip("::1")));
        assert!(!n.contains(ip("127.0.0.1")));
    }

    proptest! {
        #[test]
        fn an_address_in_a_v4_network_matches_and_mapped_form_too(a: u32, len in 0u8..=32) {
            let addr = std::net::Ipv4Addr::from(a);
            let net = ipnet::Ipv4Net::new(addr, len).unwrap().trunc();
            let nets = Networks::new(vec![IpNet::V4(net)]);
            prop_assert!(nets.contains(IpAddr::V4(addr)));
            prop_assert!(nets.contains(IpAddr::V6(addr.to_ipv6_mapped())));
        }

        #[test]
        fn recipient_check_is_case_insensitive(local in "[a-z]{1,10}", domain in "[a-z]{1,10}\\.[a-z]{2,5}") {
            let p = policy(&[], &[&format!("{local}@{domain}")]);
            let upper = format!("{}@{}", local.to_uppercase(), domain.to_uppercase());
            prop_assert_eq!(p.check_rcpt(ip("192.0.2.1"), false, &rcpt(&upper)), Ok(()));
        }

        #[test]
        fn any_entry_text_is_validated_without_panicking(s in "\\PC{0,40}") {
            let cfg = PolicyConfig { allowed_networks: vec![s.clone()], allowed_recipients: vec![s] };
            let mut problems = Vec::new();
            cfg.validate(&mut problems);
            prop_assert_eq!(problems.is_empty(), Policy::compile(&cfg).is_ok());
        }
    }
}
