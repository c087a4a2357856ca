//! What a VM keeps of its secrets, made by `up` with the VM and never
//! changed after: its [`Authority`] and one placeholder per secret (the
//! value the guest's variable holds). Both go into the guest at its first
//! boot (the seed: [`crate::seed::vendor_data`]), so the secrets' names
//! and hosts are fixed when the VM is made; changing them needs a new VM.
//! The file (`secrets.json`, 0600, the user's) holds no secret value.

use std::path::Path;

use super::authority::Authority;
use crate::config::Config;

/// The file in the VM's state folder.
pub const FILE: &str = "secrets.json";
/// Where the guest keeps the authority's certificate (Debian's folder
/// for local authorities, which `update-ca-certificates` adds to the
/// system bundle).
pub const GUEST_CA: &str = "/usr/local/share/ca-certificates/migrant-secrets.crt";
/// The system bundle clients read (with the authority, once added).
pub const GUEST_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// A secret as the guest knows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Placeholder {
    /// The guest's variable.
    pub name: String,
    /// Its value in the guest: `migrant-secret-NAME-<32 hex>`.
    pub text: String,
    pub hosts: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VmSecrets {
    pub authority: Authority,
    pub placeholders: Vec<Placeholder>,
}

/// Why a VM's secrets could not be made, read or used.
#[derive(Debug, thiserror::Error)]
pub enum VmSecretsError {
    #[error(
        "{file}: the secrets of the VM {vm} were fixed when it was made ({then}); the file now says {now}. Its guest trusts a certificate authority and holds placeholders made for those: run `migrant destroy` and `migrant up` to change them"
    )]
    Changed {
        file: String,
        vm: String,
        then: String,
        now: String,
    },
    #[error("cannot make the VM's certificate authority: {0}")]
    Authority(String),
    #[error("{path}: {why}")]
    File { path: String, why: String },
}

impl VmSecretsError {
    pub fn exit_code(&self) -> u8 {
        match self {
            VmSecretsError::Changed { .. } => crate::exit::CONFIG,
            VmSecretsError::Authority(_) => crate::exit::SOFTWARE,
            VmSecretsError::File { .. } => crate::exit::SOFTWARE,
        }
    }
}

/// `NAME → hosts` of each secret, as the error messages show them.
fn summary(secrets: impl Iterator<Item = (String, Vec<String>)>) -> String {
    let parts: Vec<String> = secrets
        .map(|(n, h)| format!("{n} for {}", h.join(", ")))
        .collect();
    if parts.is_empty() {
        "no secrets".into()
    } else {
        parts.join("; ")
    }
}

impl VmSecrets {
    /// New secrets for the VM of `cfg`: an authority for every secret
    /// host, a random placeholder per secret.
    pub fn make(cfg: &Config) -> Result<VmSecrets, VmSecretsError> {
        let mut hosts: Vec<String> = Vec::new();
        for s in &cfg.secrets {
            for h in &s.hosts {
                if !hosts.contains(h) {
                    hosts.push(h.clone());
                }
            }
        }
        let authority = Authority::make(&cfg.name, &hosts)
            .map_err(|e| VmSecretsError::Authority(e.to_string()))?;
        let mut placeholders = Vec::new();
        for s in &cfg.secrets {
            let mut random = [0u8; 16];
            getrandom::getrandom(&mut random)
                .map_err(|e| VmSecretsError::Authority(format!("no random bytes: {e}")))?;
            placeholders.push(Placeholder {
                name: s.name.clone(),
                text: format!("migrant-secret-{}-{}", s.name, hex::encode(random)),
                hosts: s.hosts.clone(),
            });
        }
        Ok(VmSecrets {
            authority,
            placeholders,
        })
    }

    pub fn save(&self, state: &Path) -> Result<(), VmSecretsError> {
        let path = state.join(FILE);
        let json = serde_json::to_vec_pretty(self).map_err(|e| VmSecretsError::File {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
        crate::state::write_private(&path, &json).map_err(|e| VmSecretsError::File {
            path: path.display().to_string(),
            why: e.to_string(),
        })
    }

    /// The secrets the VM was made with, checked against those `cfg`
    /// names now; `None` when `cfg` names none.
    pub fn load_for(cfg: &Config, state: &Path) -> Result<Option<VmSecrets>, VmSecretsError> {
        if cfg.secrets.is_empty() {
            return Ok(None);
        }
        let path = state.join(FILE);
        let now = || {
            summary(
                cfg.secrets
                    .iter()
                    .map(|s| (s.name.clone(), s.hosts.clone())),
            )
        };
        let changed = |then: String| VmSecretsError::Changed {
            file: cfg.file.display().to_string(),
            vm: cfg.name.clone(),
            then,
            now: now(),
        };
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(changed("no secrets".into()));
            }
            Err(e) => {
                return Err(VmSecretsError::File {
                    path: path.display().to_string(),
                    why: e.to_string(),
                });
            }
        };
        let vm: VmSecrets = serde_json::from_slice(&text).map_err(|e| VmSecretsError::File {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
        let same = vm.placeholders.len() == cfg.secrets.len()
            && vm
                .placeholders
                .iter()
                .zip(&cfg.secrets)
                .all(|(p, s)| p.name == s.name && p.hosts == s.hosts);
        if !same {
            return Err(changed(summary(
                vm.placeholders
                    .iter()
                    .map(|p| (p.name.clone(), p.hosts.clone())),
            )));
        }
        Ok(Some(vm))
    }

    /// The variables every login in the guest gets: each secret's
    /// placeholder, and where clients find the authority.
    pub fn guest_environment(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self
            .placeholders
            .iter()
            .map(|p| (p.name.clone(), p.text.clone()))
            .collect();
        for var in [
            "SSL_CERT_FILE",
            "REQUESTS_CA_BUNDLE",
            "CURL_CA_BUNDLE",
            "GIT_SSL_CAINFO",
        ] {
            env.push((var.into(), GUEST_BUNDLE.into()));
        }
        env.push(("NODE_EXTRA_CA_CERTS".into(), GUEST_CA.into()));
        env
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_random_and_name_their_secret() {
        let a = "migrant-secret-";
        let cfg = crate::config::tests_support::with_secrets(&[("TOKEN", &["api.example.com"])]);
        let one = VmSecrets::make(&cfg).unwrap();
        let two = VmSecrets::make(&cfg).unwrap();
        let p = &one.placeholders[0].text;
        assert!(p.starts_with(&format!("{a}TOKEN-")), "{p}");
        assert_eq!(p.len(), a.len() + "TOKEN-".len() + 32);
        assert_ne!(p, &two.placeholders[0].text);
    }

    #[test]
    fn changed_secrets_are_refused_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::config::tests_support::with_secrets(&[("TOKEN", &["api.example.com"])]);
        VmSecrets::make(&cfg).unwrap().save(dir.path()).unwrap();
        assert!(VmSecrets::load_for(&cfg, dir.path()).unwrap().is_some());
        let moved = crate::config::tests_support::with_secrets(&[("TOKEN", &["evil.example"])]);
        let e = VmSecrets::load_for(&moved, dir.path()).unwrap_err();
        assert_eq!(e.exit_code(), crate::exit::CONFIG);
        let text = e.to_string();
        assert!(text.contains("TOKEN for api.example.com"), "{text}");
        assert!(text.contains("TOKEN for evil.example"), "{text}");
        let none = tempfile::tempdir().unwrap();
        let e = VmSecrets::load_for(&cfg, none.path()).unwrap_err();
        assert!(e.to_string().contains("made (no secrets)"), "{e}");
    }
}
