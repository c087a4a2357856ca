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

use std::collections::BTreeMap;

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
        let Some(name) = e.name.as_deref() else {
            continue;
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if !name.contains('.') || name.starts_with('.') {
            continue;
        }
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
}
