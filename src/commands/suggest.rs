//! `migrant egress --suggest`: the `allow_domains` that would have
//! admitted what a VM did, from its egress journal. An agent's policy is
//! hard to write up front: run it once with direct egress, read what it
//! reached, keep what it should.
//!
//! Counted per name: connections (TCP and UDP flows the journal named by
//! SNI, HTTP Host or the DNS answer their address came from) and DNS
//! questions. Flows the wall refused whatever `allow_domains` says (the
//! host, the LAN, private answers) are not suggested: no setting would
//! admit them. Neither are names without a dot (local names).
//!
//! Secrets: per secret, the hosts the broker put it into requests for,
//! with counts; hosts it was refused at (its placeholder sent to another
//! secret's host) and hosts the Migrantfile lists that it never went to
//! are written commented out. A refused host is never suggested as an
//! entry: an agent sending a placeholder somewhere is no reason to lend
//! the secret there, so the user uncomments it knowingly.

use std::collections::BTreeMap;

use crate::config::{Secret, domain_matches};
use crate::net::dataplane::journal::{Decision, Entry};

/// What a name was used for.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Use {
    pub connections: u64,
    pub lookups: u64,
    /// Refused because `allow_domains` did not list it.
    pub refused: u64,
}

/// Refusals that `allow_domains` decides (and so a suggestion can lift).
const DOMAIN_REFUSALS: [&str; 2] = ["not-allowed-domain", "uninspectable"];

/// Every name the journal shows the guest using, with its counts.
pub fn uses(entries: &[Entry]) -> BTreeMap<String, Use> {
    let mut out: BTreeMap<String, Use> = BTreeMap::new();
    for e in entries {
        // A request the broker handled: its connection has a line of
        // its own; the request counts for its secret (`lent`).
        if e.secret.is_some() {
            continue;
        }
        let Some(name) = suggestable(e) else {
            continue;
        };
        let lifted = match e.decision {
            Decision::Allowed => false,
            Decision::Denied
                if e.reason
                    .as_deref()
                    .is_some_and(|r| DOMAIN_REFUSALS.contains(&r)) =>
            {
                true
            }
            Decision::Denied => continue,
        };
        let u = out.entry(name).or_default();
        let n = e.count.max(1);
        match (e.proto.as_str(), lifted) {
            ("dns", _) => u.lookups += n,
            (_, true) => {
                u.refused += n;
                u.connections += n;
            }
            (_, false) => u.connections += n,
        }
    }
    out
}

/// The journal's name for `e`, if a setting could name it: lower case,
/// without the root's dot, with a dot inside (not a local name).
fn suggestable(e: &Entry) -> Option<String> {
    let name = e
        .name
        .as_deref()?
        .trim_end_matches('.')
        .to_ascii_lowercase();
    (name.contains('.') && !name.starts_with('.')).then_some(name)
}

/// What a secret was sent with, to one host.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Lent {
    /// Requests the broker put the secret into.
    pub requests: u64,
    /// Requests refused because the host is not listed for the secret.
    pub refused: u64,
}

/// Per secret, per host: what the broker did with it.
pub fn lent(entries: &[Entry]) -> BTreeMap<String, BTreeMap<String, Lent>> {
    let mut out: BTreeMap<String, BTreeMap<String, Lent>> = BTreeMap::new();
    for e in entries {
        let (Some(secret), Some(host)) = (e.secret.as_deref(), suggestable(e)) else {
            continue;
        };
        let used = match (e.decision, e.reason.as_deref()) {
            (Decision::Allowed, _) => true,
            (Decision::Denied, Some("secret-not-for-host")) => false,
            // Refused whatever the hosts say (in a URL, a body, clear
            // text, an untrusted server): nothing to suggest.
            (Decision::Denied, _) => continue,
        };
        let l = out
            .entry(secret.to_string())
            .or_default()
            .entry(host)
            .or_default();
        let n = e.count.max(1);
        if used {
            l.requests += n;
        } else {
            l.refused += n;
        }
    }
    out
}

/// The `[secrets.NAME]` tables for `lent`, for the secrets `listed`
/// (the Migrantfile's): each host a secret went to, with its count; the
/// hosts it was refused at and the listed patterns it never went to,
/// commented out. A secret that went nowhere is said so in a comment (a
/// table without hosts would not load).
pub fn render_secrets(
    lent: &BTreeMap<String, BTreeMap<String, Lent>>,
    listed: &[Secret],
) -> String {
    let none = BTreeMap::new();
    let mut s = String::new();
    for secret in listed {
        let hosts = lent.get(&secret.name).unwrap_or(&none);
        let used: Vec<(&String, &Lent)> = hosts.iter().filter(|(_, l)| l.requests > 0).collect();
        s.push('\n');
        if used.is_empty() {
            s.push_str(&format!(
                "# [secrets.{}]: sent to no host in this journal\n",
                secret.name
            ));
        } else {
            s.push_str(&format!("[secrets.{}]\nhosts = [\n", secret.name));
            for (host, l) in &used {
                s.push_str(&format!("  \"{host}\", # {} requests\n", l.requests));
            }
        }
        for (host, l) in hosts.iter().filter(|(_, l)| l.refused > 0) {
            s.push_str(&format!(
                "  # \"{host}\", # refused {}: not listed for {}; list it only if this host should get the secret\n",
                l.refused, secret.name
            ));
        }
        for pattern in &secret.hosts {
            if !used.iter().any(|(h, _)| domain_matches(pattern, h)) {
                s.push_str(&format!("  # \"{pattern}\", # listed, never sent to\n"));
            }
        }
        if !used.is_empty() {
            s.push_str("]\n");
        }
    }
    if !s.is_empty() {
        s.insert_str(
            0,
            "\n# The hosts each secret was sent to (keep its `from` as it is).\n",
        );
    }
    s
}

/// The Migrantfile lines for `uses`, each name with its counts.
pub fn render(uses: &BTreeMap<String, Use>) -> String {
    let mut s = String::from(
        "# What this VM reached, as the allow_domains that would admit it\n# (from its egress journal; keep what it should reach).\n[network]\nallow_domains = [\n",
    );
    for (name, u) in uses {
        let mut what = vec![format!("{} connections", u.connections)];
        if u.lookups > 0 {
            what.push(format!("{} lookups", u.lookups));
        }
        if u.refused > 0 {
            what.push(format!("{} refused", u.refused));
        }
        s.push_str(&format!("  \"{name}\", # {}\n", what.join(", ")));
    }
    s.push_str("]\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(proto: &str, name: Option<&str>, decision: Decision, reason: Option<&str>) -> Entry {
        let mut e = Entry::new(proto, "1.2.3.4:443".to_string(), decision);
        e.name = name.map(str::to_string);
        e.reason = reason.map(str::to_string);
        e
    }

    #[test]
    fn a_journal_becomes_the_domains_that_admit_it() {
        let journal = vec![
            entry("dns", Some("api.github.com"), Decision::Allowed, None),
            entry("tcp", Some("api.github.com"), Decision::Allowed, None),
            entry("tcp", Some("API.GitHub.com."), Decision::Allowed, None),
            entry(
                "tcp",
                Some("pypi.org"),
                Decision::Denied,
                Some("not-allowed-domain"),
            ),
            // The wall refuses these whatever the setting says.
            entry(
                "tcp",
                Some("printer.lan.test"),
                Decision::Denied,
                Some("private"),
            ),
            entry(
                "dns",
                Some("localhost"),
                Decision::Denied,
                Some("dns-query"),
            ),
            entry("tcp", None, Decision::Allowed, None),
            entry("dns", Some("wpad"), Decision::Allowed, None),
        ];
        let u = uses(&journal);
        assert_eq!(u.keys().collect::<Vec<_>>(), ["api.github.com", "pypi.org"]);
        assert_eq!(
            u["api.github.com"],
            Use {
                connections: 2,
                lookups: 1,
                refused: 0
            }
        );
        assert_eq!(u["pypi.org"].refused, 1);
        let text = render(&u);
        assert!(
            text.contains("\"api.github.com\", # 2 connections, 1 lookups"),
            "{text}"
        );
        // What it writes is a Migrantfile section migrant reads.
        let parsed: toml::Value = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(
            parsed["network"]["allow_domains"]
                .as_array()
                .map(|a| a.len()),
            Some(2)
        );
    }

    fn request(host: &str, secret: &str, decision: Decision, reason: Option<&str>) -> Entry {
        let mut e = entry("tcp", Some(host), decision, reason);
        e.secret = Some(secret.to_string());
        e.method = Some("GET".to_string());
        e
    }

    #[test]
    fn the_secrets_hosts_are_those_it_went_to() {
        let cfg = crate::config::tests_support::with_secrets(&[
            ("GH", &["api.github.com", "*.githubusercontent.com"]),
            ("NPM", &["registry.npmjs.org"]),
            ("IDLE", &["idle.example.com"]),
        ]);
        let journal = vec![
            // The connection's own line, and two requests on it.
            entry("tcp", Some("api.github.com"), Decision::Allowed, None),
            request("api.github.com", "GH", Decision::Allowed, None),
            request("API.github.com.", "GH", Decision::Allowed, None),
            // GH's placeholder sent to NPM's host: refused, not suggested.
            request(
                "registry.npmjs.org",
                "GH",
                Decision::Denied,
                Some("secret-not-for-host"),
            ),
            // Refused whatever the hosts say.
            request(
                "api.github.com",
                "GH",
                Decision::Denied,
                Some("secret-in-body"),
            ),
            request("registry.npmjs.org", "NPM", Decision::Allowed, None),
        ];
        // The requests are not connections.
        assert_eq!(uses(&journal)["api.github.com"].connections, 1);
        let lent = lent(&journal);
        assert_eq!(
            lent["GH"]["api.github.com"],
            Lent {
                requests: 2,
                refused: 0
            }
        );
        assert_eq!(lent["GH"]["registry.npmjs.org"].refused, 1);
        let text = render_secrets(&lent, &cfg.secrets);
        assert!(text.contains("\"api.github.com\", # 2 requests"), "{text}");
        assert!(
            text.contains("# \"registry.npmjs.org\", # refused 1: not listed for GH"),
            "{text}"
        );
        assert!(
            text.contains("# \"*.githubusercontent.com\", # listed, never sent to"),
            "{text}"
        );
        assert!(text.contains("# [secrets.IDLE]: sent to no host"), "{text}");
        // It loads as TOML: GH and NPM with exactly the hosts they used.
        let parsed: toml::Value = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let hosts = |name: &str| {
            parsed["secrets"][name]["hosts"]
                .as_array()
                .map(|a| a.iter().filter_map(|h| h.as_str()).collect::<Vec<_>>())
        };
        assert_eq!(hosts("GH"), Some(vec!["api.github.com"]));
        assert_eq!(hosts("NPM"), Some(vec!["registry.npmjs.org"]));
        assert!(parsed["secrets"].get("IDLE").is_none(), "{text}");
    }
}
