//! The wg-quick configuration format (`wireguard.conf`): one `[Interface]`
//! and one or more `[Peer]` sections of `Key = Value` lines, `#` comments.
//! Keys and section names are matched case-insensitively, as wg(8) does.
//! Every error names the file, the line and the key; key material is never
//! echoed (not in errors, not in `Debug`).
//!
//! wg-quick's own keys that run commands or change the host's routing
//! (`PreUp`, `PostUp`, `PreDown`, `PostDown`, `Table`, `SaveConfig`,
//! `FwMark`) are ignored with a warning: migrant never runs commands from
//! this file, and the tunnel lives inside the VM's namespace.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::str::FromStr;

use base64::Engine;
use ipnet::{IpNet, Ipv4Net};

use crate::config::ConfigError;

/// A 32-byte WireGuard key. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Key(pub [u8; 32]);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(hidden)")
    }
}

/// A public key, shown as wg(8) shows it (base64).
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(pub [u8; 32]);

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&base64::engine::general_purpose::STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// Where a peer is reached: an address, or a name resolved at `up`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Addr(std::net::SocketAddr),
    Name { host: String, port: u16 },
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Addr(a) => write!(f, "{a}"),
            Endpoint::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub public_key: PublicKey,
    pub preshared_key: Option<Key>,
    pub endpoint: Option<Endpoint>,
    pub allowed_ips: Vec<IpNet>,
    /// Seconds; `None` when off.
    pub persistent_keepalive: Option<u16>,
    /// Line of its `[Peer]` header.
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgConfig {
    pub private_key: Key,
    /// IPv4 interface addresses.
    pub addresses: Vec<Ipv4Net>,
    /// IPv6 interface addresses (dual-stack provider files): kept, unused
    /// while the guest has no IPv6.
    pub addresses6: Vec<ipnet::Ipv6Net>,
    pub dns: Vec<IpAddr>,
    /// Non-address `DNS =` entries: search domains, as wg-quick reads them.
    pub dns_search: Vec<String>,
    pub mtu: Option<u16>,
    pub listen_port: Option<u16>,
    pub peers: Vec<Peer>,
    /// Things said about the file that do not stop it from working.
    pub warnings: Vec<String>,
    /// The file's IPv6 parts, described: said once at `up` as unused
    /// when the guest has no IPv6 ([`WgConfig::unused_ipv6`]).
    pub ipv6_parts: Vec<String>,
}

impl WgConfig {
    /// The warning for a dual-stack file when the guest has no IPv6.
    pub fn unused_ipv6(&self, file: &Path) -> Option<String> {
        (!self.ipv6_parts.is_empty()).then(|| {
            format!(
                "{}: its IPv6 parts are unused (the guest has no IPv6 unless `ipv6 = true`; IPv4 goes through the tunnel): {}",
                file.display(),
                self.ipv6_parts.join(", ")
            )
        })
    }
}

/// Read and parse `path`. A line of it is quoted in an error only once
/// it parsed as WireGuard syntax.
pub fn load(path: &Path) -> Result<WgConfig, ConfigError> {
    let text =
        crate::userfile::read_to_string(path, 1 << 20).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    parse(path, &text)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Section {
    None,
    Interface,
    Peer,
}

#[derive(Default)]
struct PeerDraft {
    line: usize,
    public_key: Option<PublicKey>,
    preshared_key: Option<Key>,
    endpoint: Option<Endpoint>,
    allowed_ips: Vec<IpNet>,
    persistent_keepalive: Option<Option<u16>>,
}

fn decode_key(value: &str) -> Option<[u8; 32]> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value)
        .ok()?;
    bytes.try_into().ok()
}

/// Parse the text of a wg-quick file; `file` names it in errors.
pub fn parse(file: &Path, text: &str) -> Result<WgConfig, ConfigError> {
    let mut d = Reading::new(file);
    for (i, raw) in text.lines().enumerate() {
        d.line(i + 1, raw)?;
    }
    d.finish()
}

/// A wg-quick file being read, line by line.
struct Reading<'a> {
    file: &'a Path,
    section: Section,
    interface_line: usize,
    private_key: Option<Key>,
    addresses: Vec<ipnet::Ipv4Net>,
    dns: Vec<IpAddr>,
    dns_search: Vec<String>,
    mtu: Option<u16>,
    listen_port: Option<u16>,
    warnings: Vec<String>,
    addresses6: Vec<ipnet::Ipv6Net>,
    /// The file's IPv6 parts, said once: the guest has no IPv6.
    unused6: Vec<String>,
    peers: Vec<PeerDraft>,
    /// Keys of the current section set so far (each may be set once).
    seen: Vec<String>,
}

impl<'a> Reading<'a> {
    fn new(file: &'a Path) -> Reading<'a> {
        Reading {
            file,
            section: Section::None,
            interface_line: 0,
            private_key: None,
            addresses: Vec::new(),
            dns: Vec::new(),
            dns_search: Vec::new(),
            mtu: None,
            listen_port: None,
            warnings: Vec::new(),
            addresses6: Vec::new(),
            unused6: Vec::new(),
            peers: Vec::new(),
            seen: Vec::new(),
        }
    }

    /// One line of the file (`line` is its number).
    fn line(&mut self, line: usize, raw: &str) -> Result<(), ConfigError> {
        let file = self.file;
        let err =
            |line: usize, field: &str, msg: String| ConfigError::invalid(file, line, field, msg);
        let content = raw.split('#').next().unwrap_or_default().trim();
        if content.is_empty() {
            return Ok(());
        }
        if content.starts_with('[') {
            let name = content
                .strip_prefix('[')
                .and_then(|c| c.strip_suffix(']'))
                .map(str::trim)
                .ok_or_else(|| err(line, "", format!("{content:?} is not a section header")))?;
            self.seen.clear();
            if name.eq_ignore_ascii_case("interface") {
                if self.interface_line != 0 {
                    return Err(err(
                        line,
                        "[Interface]",
                        format!(
                            "a second [Interface] section (the first is on line {})",
                            self.interface_line
                        ),
                    ));
                }
                self.interface_line = line;
                self.section = Section::Interface;
            } else if name.eq_ignore_ascii_case("peer") {
                self.peers.push(PeerDraft {
                    line,
                    ..PeerDraft::default()
                });
                self.section = Section::Peer;
            } else {
                return Err(err(
                    line,
                    "",
                    format!("unknown section [{name}] (expected [Interface] or [Peer])"),
                ));
            }
            return Ok(());
        }
        let Some((key, value)) = content.split_once('=') else {
            return Err(err(line, "", format!("{content:?} is not `Key = Value`")));
        };
        let key = key.trim();
        let value = value.trim();
        let lower = key.to_ascii_lowercase();
        if value.is_empty() {
            return Err(err(line, key, "has no value".into()));
        }
        let repeatable = matches!(lower.as_str(), "address" | "dns" | "allowedips");
        if !repeatable {
            if self.seen.contains(&lower) {
                return Err(err(line, key, "is set twice in this section".into()));
            }
            self.seen.push(lower.clone());
        }
        match self.section {
            Section::None => Err(err(
                line,
                key,
                "comes before any [Interface] or [Peer] section".into(),
            )),
            Section::Interface => self.interface_key(line, key, &lower, value),
            Section::Peer => self.peer_key(line, key, &lower, value),
        }
    }

    /// A key of the [Interface] section.
    fn interface_key(
        &mut self,
        line: usize,
        key: &str,
        lower: &str,
        value: &str,
    ) -> Result<(), ConfigError> {
        let file = self.file;
        let err =
            |line: usize, field: &str, msg: String| ConfigError::invalid(file, line, field, msg);
        match lower {
            "privatekey" => {
                self.private_key = Some(Key(decode_key(value).ok_or_else(|| {
                    err(
                line,
                key,
                "is not a WireGuard key (44 characters of base64, 32 bytes); `wg genkey` makes one"
                    .into(),
            )
                })?));
            }
            "address" => {
                for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let net = parse_net(item)
                        .ok_or_else(|| err(line, key, format!("{item:?} is not an address")))?;
                    match net {
                        IpNet::V4(v4) => self.addresses.push(v4),
                        IpNet::V6(v6) => {
                            self.addresses6.push(v6);
                            self.unused6.push(format!("Address {v6} (line {line})"));
                        }
                    }
                }
            }
            "dns" => {
                for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    match IpAddr::from_str(item) {
                        Ok(IpAddr::V4(a)) => self.dns.push(IpAddr::V4(a)),
                        Ok(IpAddr::V6(a)) => {
                            self.dns.push(IpAddr::V6(a));
                            self.unused6.push(format!("DNS {a} (line {line})"));
                        }
                        Err(_) if valid_domain(item) => self.dns_search.push(item.to_string()),
                        Err(_) => {
                            return Err(err(
                                line,
                                key,
                                format!("{item:?} is neither an address nor a search domain"),
                            ));
                        }
                    }
                }
            }
            "mtu" => {
                self.mtu = Some(
                    value
                        .parse::<u16>()
                        .ok()
                        .filter(|m| (576..=9000).contains(m))
                        .ok_or_else(|| {
                            err(
                                line,
                                key,
                                format!("{value:?} is not an MTU from 576 to 9000"),
                            )
                        })?,
                );
            }
            "listenport" => {
                self.listen_port = Some(
                    value
                        .parse::<u16>()
                        .map_err(|_| err(line, key, format!("{value:?} is not a port number")))?,
                );
            }
            "preup" | "postup" | "predown" | "postdown" => {
                self.warnings.push(format!(
                    "{}:{line}: {key} ignored: migrant never runs commands from a WireGuard config",
                    file.display()
                ));
            }
            "table" | "saveconfig" | "fwmark" => {
                self.warnings.push(format!(
                    "{}:{line}: {key} ignored: the tunnel lives in the VM's own network namespace",
                    file.display()
                ));
            }
            _ => {
                return Err(err(line, key, "is not an [Interface] setting".into()));
            }
        }
        Ok(())
    }

    /// A key of the current [Peer] section.
    fn peer_key(
        &mut self,
        line: usize,
        key: &str,
        lower: &str,
        value: &str,
    ) -> Result<(), ConfigError> {
        let file = self.file;
        let err =
            |line: usize, field: &str, msg: String| ConfigError::invalid(file, line, field, msg);
        let Some(peer) = self.peers.last_mut() else {
            return Err(err(line, key, "is outside a [Peer] section".into()));
        };
        match lower {
            "publickey" => {
                peer.public_key = Some(PublicKey(decode_key(value).ok_or_else(|| {
                    err(
                        line,
                        key,
                        format!(
                            "{value:?} is not a WireGuard public key (44 characters of base64)"
                        ),
                    )
                })?));
            }
            "presharedkey" => {
                peer.preshared_key = Some(Key(decode_key(value).ok_or_else(|| {
                    err(
                        line,
                        key,
                        "is not a WireGuard key (44 characters of base64); `wg genpsk` makes one"
                            .into(),
                    )
                })?));
            }
            "endpoint" => {
                peer.endpoint = Some(parse_endpoint(value).ok_or_else(|| {
                    err(
                        line,
                        key,
                        format!("{value:?} is not HOST:PORT (an IPv6 address in brackets)"),
                    )
                })?);
            }
            "allowedips" => {
                for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let net = parse_net(item).ok_or_else(|| {
                        err(
                            line,
                            key,
                            format!("{item:?} is not an address or ADDRESS/PREFIX"),
                        )
                    })?;
                    // IPv6 ranges are kept: they route nothing
                    // while the guest has no IPv6.
                    if net.addr().is_ipv6() {
                        self.unused6
                            .push(format!("AllowedIPs {} (line {line})", net.trunc()));
                    }
                    peer.allowed_ips.push(net.trunc());
                }
            }
            "persistentkeepalive" => {
                peer.persistent_keepalive = Some(if value.eq_ignore_ascii_case("off") {
                    None
                } else {
                    match value.parse::<u16>() {
                        Ok(0) => None,
                        Ok(s) => Some(s),
                        Err(_) => {
                            return Err(err(
                                line,
                                key,
                                format!("{value:?} is not a number of seconds (or off)"),
                            ));
                        }
                    }
                });
            }
            _ => return Err(err(line, key, "is not a [Peer] setting".into())),
        }
        Ok(())
    }

    /// The whole file read: what it must have, the peers checked.
    fn finish(mut self) -> Result<WgConfig, ConfigError> {
        let file = self.file;
        let err =
            |line: usize, field: &str, msg: String| ConfigError::invalid(file, line, field, msg);
        if self.interface_line == 0 {
            return Err(err(0, "[Interface]", "missing".into()));
        }
        let interface_line = self.interface_line;
        let private_key = self.private_key.take().ok_or_else(|| {
            err(
                interface_line,
                "PrivateKey",
                "missing in [Interface]".into(),
            )
        })?;
        if self.addresses.is_empty() {
            let why = match self.addresses6.first() {
                Some(v6) => format!(
                    "only IPv6 ({v6}); the guest's IPv4 goes through the tunnel, so it needs the tunnel's IPv4 address too, like 10.64.0.2/32"
                ),
                None => {
                    "missing in [Interface] (the tunnel's IPv4 address, like 10.64.0.2/32)".into()
                }
            };
            return Err(err(self.interface_line, "Address", why));
        }
        if self.peers.is_empty() {
            return Err(err(
                0,
                "[Peer]",
                "missing: the tunnel needs at least one peer".into(),
            ));
        }
        let mut out = Vec::new();
        for p in std::mem::take(&mut self.peers) {
            let public_key = p
                .public_key
                .ok_or_else(|| err(p.line, "PublicKey", "missing in [Peer]".into()))?;
            if out.iter().any(|q: &Peer| q.public_key == public_key) {
                return Err(err(
                    p.line,
                    "PublicKey",
                    format!("{public_key}: the same peer twice"),
                ));
            }
            if p.endpoint.is_none() {
                return Err(err(
                    p.line,
                    "Endpoint",
                    "missing in [Peer]: migrant only connects out, so every peer needs one".into(),
                ));
            }
            out.push(Peer {
                public_key,
                preshared_key: p.preshared_key,
                endpoint: p.endpoint,
                allowed_ips: p.allowed_ips,
                persistent_keepalive: p.persistent_keepalive.flatten(),
                line: p.line,
            });
        }
        if self.dns.is_empty() {
            self.warnings.push(format!(
                "{}: no DNS in [Interface]: the guest's DNS queries go to the host's resolvers, outside the tunnel",
                file.display()
            ));
        }
        Ok(WgConfig {
            private_key,
            addresses: self.addresses,
            addresses6: self.addresses6,
            ipv6_parts: self.unused6,
            dns: self.dns,
            dns_search: self.dns_search,
            mtu: self.mtu,
            listen_port: self.listen_port,
            peers: out,
            warnings: self.warnings,
        })
    }
}

/// `10.0.0.2/32`, or a bare address (a host route).
fn parse_net(s: &str) -> Option<IpNet> {
    if let Ok(net) = IpNet::from_str(s) {
        return Some(net);
    }
    IpAddr::from_str(s).ok().map(IpNet::from)
}

fn valid_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn parse_endpoint(s: &str) -> Option<Endpoint> {
    if let Ok(addr) = std::net::SocketAddr::from_str(s) {
        return (addr.port() != 0).then_some(Endpoint::Addr(addr));
    }
    let (host, port) = s.rsplit_once(':')?;
    let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
    if host.contains(':') || Ipv4Addr::from_str(host).is_ok() || !valid_domain(host) {
        return None;
    }
    Some(Endpoint::Name {
        host: host.to_string(),
        port,
    })
}

#[cfg(test)]
mod tests;
