//! `[secrets.NAME]`: credentials the guest uses without holding them.
//!
//! ```toml
//! [secrets.GITHUB_TOKEN]
//! from  = "env:GITHUB_TOKEN"        # or "file:~/.config/gh/token", "command:pass show github"
//! hosts = ["api.github.com", "github.com"]
//! ```
//!
//! Only where the value comes from is part of the configuration; the
//! value itself is read by the invoking user's own process when the VM
//! starts (`crate::secrets`), and never enters a `Config`.

use super::draft::{At, Ctx, DraftSecret};
use super::{ConfigError, Egress, Network};

/// One secret: the guest's variable `name` holds a placeholder, which the
/// dataplane replaces in request headers to `hosts` only.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Secret {
    /// The guest's environment variable (`[A-Za-z_][A-Za-z0-9_]*`).
    pub name: String,
    pub from: SecretSource,
    /// Exact names or `*.suffix` (lower case), never empty.
    pub hosts: Vec<String>,
    /// The line of its `from`, for errors about the value.
    pub line: usize,
}

/// Where a secret's value is read, by the invoking user's own process.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum SecretSource {
    /// An environment variable of the command that starts the VM.
    Env(String),
    /// A file (absolute), read with the user's rights.
    File(std::path::PathBuf),
    /// A shell command line run as the user; its standard output.
    Command(String),
}

impl Secret {
    /// The field naming where the value comes from, as the file spells it.
    pub fn field(&self) -> String {
        format!("secrets.{}.from", self.name)
    }

    /// Whether a request to `host` (lower case) may carry this secret.
    pub fn sent_to(&self, host: &str) -> bool {
        self.hosts.iter().any(|p| domain_matches(p, host))
    }
}

/// Whether `pattern` (a name, or `*.suffix` for the suffix's subdomains)
/// matches `host`.
pub fn domain_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .strip_suffix(suffix)
            .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        None => pattern == host,
    }
}

/// Variables the guest's environment already gives a meaning (the
/// login's own, and those migrant sets to make clients trust its CA): a
/// secret may not take their name.
const TAKEN: [&str; 16] = [
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "PWD",
    "TERM",
    "LANG",
    "MAIL",
    "SSH_CONNECTION",
    "SSH_CLIENT",
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
];

/// An environment variable's name: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_variable_name(text: &str) -> bool {
    let mut bytes = text.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// The secrets, checked against each other and against the network
/// policy that must let their hosts be reached.
pub(super) fn check(
    drafts: &[DraftSecret],
    network: &Network,
    ctx: &Ctx,
) -> Result<Vec<Secret>, ConfigError> {
    let mut out: Vec<Secret> = Vec::new();
    for d in drafts {
        let name = &d.name.value;
        if !is_variable_name(name) {
            return Err(ctx.err_at(
                &d.name,
                format!("{name:?} is not an environment variable's name (letters, digits, '_'; not a digit first)"),
            ));
        }
        if TAKEN.contains(&name.as_str()) || name.starts_with("MIGRANT_") {
            return Err(ctx.err_at(
                &d.name,
                format!(
                    "{name} is a variable the guest already uses; give the secret another name"
                ),
            ));
        }
        let from = source(&d.from, ctx)?;
        if d.hosts.is_empty() {
            return Err(ctx.err_at(
                &d.name,
                "no hosts: list the API hosts that may receive it (`hosts = [\"api.example.com\"]`)",
            ));
        }
        let mut hosts: Vec<String> = Vec::new();
        for at in &d.hosts {
            let host = host_pattern(&at.value).map_err(|e| ctx.err_at(at, e))?;
            reachable(&host, network).map_err(|e| ctx.err_at(at, e))?;
            if !hosts.contains(&host) {
                hosts.push(host);
            }
        }
        out.push(Secret {
            name: name.clone(),
            from,
            hosts,
            line: d.from.line,
        });
    }
    Ok(out)
}

/// `env:NAME`, `file:PATH` or `command:LINE`.
fn source(at: &At<String>, ctx: &Ctx) -> Result<SecretSource, ConfigError> {
    let (kind, rest) = at.value.split_once(':').ok_or_else(|| {
        ctx.err_at(
            at,
            format!("{:?}: say where the value comes from: \"env:VARIABLE\", \"file:PATH\" or \"command:COMMAND\"", at.value),
        )
    })?;
    match kind {
        "env" if is_variable_name(rest) => Ok(SecretSource::Env(rest.to_string())),
        "env" => Err(ctx.err_at(
            at,
            format!("{rest:?} is not an environment variable's name"),
        )),
        "file" => {
            let path = At::new(rest.to_string(), at.line, at.field.clone());
            Ok(SecretSource::File(ctx.resolve(&path)?))
        }
        "command" if !rest.trim().is_empty() => Ok(SecretSource::Command(rest.to_string())),
        "command" => Err(ctx.err_at(at, "the command is empty")),
        other => Err(ctx.err_at(
            at,
            format!("unknown source kind {other:?}: use \"env:\", \"file:\" or \"command:\""),
        )),
    }
}

/// A host a secret may go to: a name, or `*.suffix` under a name of at
/// least two labels (`*` and `*.com` are too broad: a secret for every
/// site is a secret for any site).
fn host_pattern(text: &str) -> Result<String, String> {
    let suffix = text.strip_prefix("*.");
    if text == "*" || suffix.is_some_and(|s| !s.contains('.')) {
        return Err(format!(
            "{text:?} is too broad: name the API hosts (\"api.example.com\") or the subdomains of one site (\"*.example.com\")"
        ));
    }
    super::values::check_domain(text)
}

/// A secret's host must be one the guest may reach: not with `egress =
/// "none"`, and with `allow_domains`, covered by one of them.
fn reachable(host: &str, network: &Network) -> Result<(), String> {
    if network.egress == Egress::None {
        return Err(format!(
            "{host} cannot be reached: network.egress is \"none\""
        ));
    }
    if network.allow_domains.is_empty() {
        return Ok(());
    }
    let covered = network.allow_domains.iter().any(|allow| {
        domain_matches(allow, host)
            || match (allow.strip_prefix("*."), host.strip_prefix("*.")) {
                // `*.a.example.com` is inside `*.example.com`.
                (Some(a), Some(h)) => h == a || domain_matches(allow, h),
                _ => false,
            }
    });
    match covered {
        true => Ok(()),
        false => Err(format!(
            "{host} is not in network.allow_domains: the guest could not reach it; add it there too"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_names_and_subdomains() {
        assert!(domain_matches("api.github.com", "api.github.com"));
        assert!(!domain_matches("api.github.com", "github.com"));
        assert!(domain_matches("*.github.com", "api.github.com"));
        assert!(domain_matches("*.github.com", "a.b.github.com"));
        assert!(!domain_matches("*.github.com", "github.com"));
        assert!(!domain_matches("*.github.com", "evilgithub.com"));
        assert!(!domain_matches("*.github.com", ".github.com"));
    }

    #[test]
    fn hosts_too_broad_or_malformed_are_refused() {
        for bad in [
            "*",
            "*.com",
            "com",
            "*.*.example.com",
            "a*.example.com",
            "10.0.0.1",
            "",
        ] {
            assert!(host_pattern(bad).is_err(), "{bad:?}");
        }
        assert!(host_pattern("*.com").is_err_and(|e| e.contains("too broad")));
        assert_eq!(
            host_pattern("API.GitHub.com").ok().as_deref(),
            Some("api.github.com")
        );
        assert_eq!(host_pattern("*.co.uk").ok().as_deref(), Some("*.co.uk"));
    }

    #[test]
    fn variable_names() {
        for good in ["GITHUB_TOKEN", "_x", "a1"] {
            assert!(is_variable_name(good), "{good}");
        }
        for bad in ["", "1A", "A-B", "A B", "Ä"] {
            assert!(!is_variable_name(bad), "{bad}");
        }
    }
}
