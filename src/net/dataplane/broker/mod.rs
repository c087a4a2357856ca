//! The credential broker, in the dataplane: the guest holds placeholders
//! for the user's secrets; connections to a secret's hosts are terminated
//! here with a certificate from the VM's own authority, and each request
//! goes on over the broker's own TLS to the real server, verified against
//! the host's trust store, with the placeholders in its headers replaced
//! by the values ([`rewrite`] says where they may go; [`intercept`] runs
//! the connections). Every other connection stays end to end.
//!
//! Which connections are looked at: every connection to ports 443 and 80
//! (HTTPS, and HTTP where a placeholder would travel in clear), and any
//! port of an address a secret's host resolved to (the resolver tells
//! [`Broker::learn`]). The ports matter on their own: a guest resumed
//! from memory, or a dataplane restarted, meets addresses the guest's own
//! DNS cache kept.

pub mod intercept;
pub mod rewrite;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::{Deserialize, Serialize};

use super::domains::Allowlist;
use crate::secrets::authority::{Authority, Issuing};

/// Connections terminated at once for one VM; beyond it new ones to a
/// secret's host are reset and counted. Each holds two TLS sessions and
/// HTTP buffers (README's bounds table has the figure).
pub const MAX_INTERCEPTED: usize = 256;
/// Certificates kept for names under a `*.suffix` host at most.
const MAX_CERTS: usize = 256;

/// What the dataplane needs to broker a VM's secrets, handed down from
/// `up` through the supervisor, in memory only.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub authority: Authority,
    pub secrets: Vec<Lent>,
    /// Authorities the real servers must chain to (DER, base64): the
    /// host's trust store, and the operator's extra file.
    pub roots: Vec<String>,
}

/// One secret: the guest's placeholder, the value, where it may go.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lent {
    pub name: String,
    pub placeholder: String,
    pub value: crate::secrets::Value,
    pub hosts: Vec<String>,
}

impl Plan {
    /// The plan for a VM's secrets with their current values (`values`
    /// in the order of `vm`'s placeholders) and the upstream roots (DER).
    pub fn new(
        vm: &crate::secrets::vm::VmSecrets,
        values: Vec<(String, crate::secrets::Value)>,
        roots: &[Vec<u8>],
    ) -> Plan {
        let secrets = vm
            .placeholders
            .iter()
            .filter_map(|p| {
                let value = values.iter().find(|(n, _)| *n == p.name)?.1.clone();
                Some(Lent {
                    name: p.name.clone(),
                    placeholder: p.text.clone(),
                    value,
                    hosts: p.hosts.clone(),
                })
            })
            .collect();
        Plan {
            authority: vm.authority.clone(),
            secrets,
            roots: roots
                .iter()
                .map(|d| base64::engine::general_purpose::STANDARD.encode(d))
                .collect(),
        }
    }
}

/// The broker of one dataplane.
pub struct Broker {
    pub secrets: rewrite::Secrets,
    /// The secrets' hosts, and the addresses they resolved to.
    hosts: Allowlist,
    issuing: Issuing,
    certs: Mutex<HashMap<String, Arc<rustls::sign::CertifiedKey>>>,
    roots: Arc<rustls::RootCertStore>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    pub slots: Arc<tokio::sync::Semaphore>,
}

/// The ALPN protocols the broker speaks, in its order of preference.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

impl Broker {
    pub fn new(plan: &Plan) -> Result<Broker, String> {
        let mut roots = rustls::RootCertStore::empty();
        for r in &plan.roots {
            let der = base64::engine::general_purpose::STANDARD
                .decode(r)
                .map_err(|e| format!("an upstream root: {e}"))?;
            // The host's store may hold certificates webpki cannot use
            // (old formats); those are skipped, as rustls' own loader does.
            let _ = roots.add(CertificateDer::from(der));
        }
        if roots.is_empty() {
            return Err("no usable upstream root certificates".into());
        }
        let mut patterns: Vec<String> = Vec::new();
        let mut held = Vec::new();
        for s in &plan.secrets {
            patterns.extend(s.hosts.iter().cloned());
            held.push(rewrite::Held {
                name: s.name.clone(),
                placeholder: s.placeholder.as_bytes().to_vec(),
                value: s.value.clone(),
                hosts: s.hosts.clone(),
            });
        }
        Ok(Broker {
            secrets: rewrite::Secrets::new(held),
            hosts: Allowlist::new(&patterns),
            issuing: plan.authority.issuing()?,
            certs: Mutex::default(),
            roots: Arc::new(roots),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_INTERCEPTED)),
        })
    }

    /// Whether connections for `name` are terminated here.
    pub fn covers(&self, name: &str) -> bool {
        self.hosts.name_allowed(name)
    }

    /// DNS answered `name` with `ip`: connections to it are looked at.
    pub fn learn(&self, name: &str, ip: IpAddr, ttl: u32) {
        if self.hosts.name_allowed(name) {
            self.hosts.learn(name, ip, ttl);
        }
    }

    /// Whether a connection to `ip`:`port` is looked at before it is
    /// relayed.
    pub fn watches(&self, ip: IpAddr, port: u16) -> bool {
        port == 443 || port == 80 || self.hosts.admits_addr(ip)
    }

    /// Drop expired addresses.
    pub fn expire(&self) {
        self.hosts.expire();
    }

    /// The certificate the guest is shown for `name`.
    fn certified(&self, name: &str) -> Result<Arc<rustls::sign::CertifiedKey>, String> {
        if let Some(c) = self.certs.lock().ok().and_then(|m| m.get(name).cloned()) {
            return Ok(c);
        }
        let (chain, key) = self
            .issuing
            .issue(name)
            .map_err(|e| format!("certificate for {name}: {e}"))?;
        let key = self
            .provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| format!("certificate key: {e}"))?;
        let certified = Arc::new(rustls::sign::CertifiedKey::new(chain, key));
        if let Ok(mut m) = self.certs.lock() {
            if m.len() >= MAX_CERTS {
                m.clear();
            }
            m.insert(name.to_string(), Arc::clone(&certified));
        }
        Ok(certified)
    }

    /// The guest side's TLS configuration for `name`, speaking `alpn`
    /// (what the real server chose), if anything.
    pub fn server_config(
        &self,
        name: &str,
        alpn: Option<&[u8]>,
    ) -> Result<Arc<rustls::ServerConfig>, String> {
        let certified = self.certified(name)?;
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Fixed(certified)));
        config.alpn_protocols = alpn.map(|p| vec![p.to_vec()]).unwrap_or_default();
        Ok(Arc::new(config))
    }

    /// The real server's side: verified against the roots, offering
    /// `alpn` (what the guest offered that the broker speaks).
    pub fn client_config(&self, alpn: &[&[u8]]) -> Result<Arc<rustls::ClientConfig>, String> {
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(Arc::clone(&self.roots))
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    /// `name` as a server name to verify.
    pub fn server_name(name: &str) -> Option<ServerName<'static>> {
        ServerName::try_from(name.to_string()).ok()
    }
}

/// A certificate resolver with one answer.
#[derive(Debug)]
struct Fixed(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}
