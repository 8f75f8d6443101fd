//! Which exchange / routing key each recipient goes to.
//!
//! Pure. Rules: an exact address entry (`user@domain`) beats a domain entry; among equals the
//! first rule wins; a recipient matching no rule goes to the default `exchange`/`routing_key`.
//! Matching is ASCII case-insensitive; a domain entry matches the domain exactly (no subdomains).
//!
//! A message is published once per distinct target, carrying only that target's recipients, and
//! leaves the spool only when every target has confirmed. Targets are listed in the order of
//! their first recipient, so the target index of a message is stable across attempts.

use crate::config::amqp::RouteRule;

/// Where one copy of a message is published, and for whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub exchange: String,
    pub routing_key: String,
    /// The message's recipients that route here, in envelope order.
    pub recipients: Vec<String>,
}

/// The domain of an address (after the last `@`), or `None` for a local-only address.
fn domain_of(address: &str) -> Option<&str> {
    address
        .rsplit_once('@')
        .map(|(_, d)| d)
        .filter(|d| !d.is_empty())
}

/// The rule index a recipient routes to, or `None` for the default target.
pub fn rule_for(recipient: &str, rules: &[RouteRule]) -> Option<usize> {
    let by_address = rules.iter().position(|r| {
        r.recipients
            .iter()
            .any(|e| e.contains('@') && e.eq_ignore_ascii_case(recipient))
    });
    if by_address.is_some() {
        return by_address;
    }
    let domain = domain_of(recipient)?;
    rules.iter().position(|r| {
        r.recipients
            .iter()
            .any(|e| !e.contains('@') && e.eq_ignore_ascii_case(domain))
    })
}

/// Groups `recipients` into targets. Never empty: with no recipients (or no rules) there is one
/// target, the default, carrying all recipients.
pub fn targets(
    recipients: &[String],
    rules: &[RouteRule],
    default_exchange: &str,
    default_routing_key: &str,
) -> Vec<Target> {
    let mut out: Vec<Target> = Vec::new();
    for rcpt in recipients {
        let (exchange, routing_key) = match rule_for(rcpt, rules).and_then(|i| rules.get(i)) {
            Some(rule) => (rule.exchange.as_str(), rule.routing_key.as_str()),
            None => (default_exchange, default_routing_key),
        };
        match out
            .iter_mut()
            .find(|t| t.exchange == exchange && t.routing_key == routing_key)
        {
            Some(t) => t.recipients.push(rcpt.clone()),
            None => out.push(Target {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
                recipients: vec![rcpt.clone()],
            }),
        }
    }
    if out.is_empty() {
        out.push(Target {
            exchange: default_exchange.to_owned(),
            routing_key: default_routing_key.to_owned(),
            recipients: Vec::new(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rule(entries: &[&str], rk: &str) -> RouteRule {
        RouteRule {
            recipients: entries.iter().map(|s| s.to_string()).collect(),
            exchange: "x".into(),
            routing_key: rk.into(),
        }
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn no_rules_means_one_default_target() {
        let t = targets(&s(&["a@b", "c@d"]), &[], "", "lsmtpd");
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].routing_key, "lsmtpd");
        assert_eq!(t[0].recipients, s(&["a@b", "c@d"]));
    }

    #[test]
    fn address_beats_domain_and_first_rule_wins() {
        let rules = [
            rule(&["Example.org"], "dom"),
            rule(&["boss@example.org"], "boss"),
            rule(&["example.org"], "never"),
        ];
        assert_eq!(rule_for("x@EXAMPLE.org", &rules), Some(0));
        assert_eq!(rule_for("BOSS@example.org", &rules), Some(1));
        assert_eq!(rule_for("x@sub.example.org", &rules), None);
        assert_eq!(rule_for("postmaster", &rules), None);
    }

    #[test]
    fn split_recipients_make_one_target_each() {
        let rules = [rule(&["a.test"], "a"), rule(&["b.test"], "b")];
        let t = targets(
            &s(&["1@b.test", "2@other", "3@a.test", "4@b.test"]),
            &rules,
            "",
            "def",
        );
        let keys: Vec<&str> = t.iter().map(|t| t.routing_key.as_str()).collect();
        assert_eq!(keys, ["b", "def", "a"]);
        assert_eq!(t[0].recipients, s(&["1@b.test", "4@b.test"]));
    }

    #[test]
    fn no_recipients_still_publishes_once() {
        assert_eq!(targets(&[], &[], "e", "k").len(), 1);
    }

    proptest! {
        #[test]
        fn every_recipient_lands_in_exactly_one_target(
            rcpts in proptest::collection::vec("[a-c]{1,2}@[a-c]\\.test", 0..8),
            doms in proptest::collection::vec("[a-c]\\.test", 0..3),
        ) {
            let rules: Vec<RouteRule> = doms.iter().enumerate()
                .map(|(i, d)| rule(&[d.as_str()], &i.to_string())).collect();
            let t = targets(&rcpts, &rules, "", "def");
            prop_assert!(!t.is_empty());
            let total: usize = t.iter().map(|t| t.recipients.len()).sum();
            prop_assert_eq!(total, rcpts.len());
            for (i, a) in t.iter().enumerate() {
                for b in &t[i + 1..] {
                    prop_assert!(a.exchange != b.exchange || a.routing_key != b.routing_key);
                }
            }
        }
    }
}
