//! Entries of `smtp.policy.allowed_recipients`, parsed and normalized, and the normal forms of
//! domains and local parts that the policy compares recipients in. Pure.

use crate::smtp::wire::address::{is_valid_domain, Address};

/// One `allowed_recipients` entry, normalized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecipientEntry {
    Domain(String),
    Subdomains(String),
    Address { local: String, domain: String },
}

impl RecipientEntry {
    pub fn parse(entry: &str) -> Result<RecipientEntry, &'static str> {
        let entry = entry.trim();
        if entry.contains('@') {
            let addr = Address::parse(entry)
                .map_err(|_| "is not an address (expected local@domain, e.g. ops@example.org)")?;
            let domain = normalize_domain(&addr.domain)
                .ok_or("has a domain that is not a valid (internationalised) domain name")?;
            return Ok(RecipientEntry::Address {
                local: normalize_local(&addr.local),
                domain,
            });
        }
        let (pattern, name) = match entry.strip_prefix('.') {
            Some(rest) => (true, rest),
            None => (false, entry),
        };
        if !is_valid_domain(name) || name.starts_with('[') {
            return Err("is not a domain (e.g. example.org, .example.org or ops@example.org)");
        }
        let domain =
            normalize_domain(name).ok_or("is not a valid (internationalised) domain name")?;
        Ok(if pattern {
            RecipientEntry::Subdomains(domain)
        } else {
            RecipientEntry::Domain(domain)
        })
    }
}

/// The comparable form of a domain: lower case, A-labels (punycode) for internationalised names.
/// Address literals (`[192.0.2.1]`) are kept, lower-cased. `None` when the name cannot be
/// converted (then it matches nothing).
pub fn normalize_domain(domain: &str) -> Option<String> {
    if domain.starts_with('[') {
        return Some(domain.to_ascii_lowercase());
    }
    if domain.is_ascii() {
        return Some(domain.to_ascii_lowercase());
    }
    idna::domain_to_ascii(domain).ok()
}

/// The comparable form of a local part: unquoted when the quotes are not needed (backslash
/// pairs resolved), then lower-cased (Unicode lower case, so UTF-8 local parts fold too).
pub fn normalize_local(local: &str) -> String {
    let unquoted = match local.strip_prefix('"').and_then(|l| l.strip_suffix('"')) {
        Some(inner) => {
            let mut out = String::with_capacity(inner.len());
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                if c == '\\' {
                    if let Some(next) = chars.next() {
                        out.push(next);
                    }
                } else {
                    out.push(c);
                }
            }
            out
        }
        None => local.to_string(),
    };
    unquoted.to_lowercase()
}
