//! `allow_domains`: which names the guest may reach, and which addresses
//! the supervisor's own DNS answers opened for them.
//!
//! An address is admitted only after the guest resolved an allowed name
//! through the gateway and got that address back. Where one address
//! serves several names (CDNs), the proxy also checks the name the client
//! asks for: the TLS SNI or the HTTP Host header.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Admitted addresses outlive their DNS TTL by this much: clients cache
/// answers a little longer than they should.
const GRACE: Duration = Duration::from_secs(300);

#[derive(Debug, Default)]
struct Learned {
    /// Names the gateway's DNS answered with this address, and until when.
    names: HashMap<String, Instant>,
}

#[derive(Debug, Clone)]
pub struct Allowlist {
    patterns: Arc<Vec<String>>,
    learned: Arc<Mutex<HashMap<Ipv4Addr, Learned>>>,
}

/// Lower-case, without a trailing dot.
pub fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl Allowlist {
    pub fn new(patterns: &[String]) -> Allowlist {
        Allowlist {
            patterns: Arc::new(patterns.iter().map(|p| normalize(p)).collect()),
            learned: Arc::default(),
        }
    }

    /// `api.example.com` matches itself; `*.example.com` matches names
    /// below example.com (not example.com itself).
    pub fn name_allowed(&self, name: &str) -> bool {
        let name = normalize(name);
        self.patterns.iter().any(|p| match p.strip_prefix("*.") {
            Some(suffix) => name.len() > suffix.len() + 1 && name.ends_with(&format!(".{suffix}")),
            None => *p == name,
        })
    }

    /// Record that DNS answered `name` with `ip` (for `ttl` seconds).
    pub fn learn(&self, name: &str, ip: Ipv4Addr, ttl: u32) {
        let until = Instant::now() + Duration::from_secs(u64::from(ttl)) + GRACE;
        if let Ok(mut map) = self.learned.lock() {
            let entry = map.entry(ip).or_default();
            let slot = entry.names.entry(normalize(name)).or_insert(until);
            if *slot < until {
                *slot = until;
            }
        }
    }

    fn live_names(&self, ip: Ipv4Addr) -> HashSet<String> {
        let now = Instant::now();
        self.learned
            .lock()
            .map(|map| {
                map.get(&ip)
                    .map(|l| {
                        l.names
                            .iter()
                            .filter(|(_, until)| **until > now)
                            .map(|(n, _)| n.clone())
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    }

    /// An allowed name resolved to `ip` recently.
    pub fn admits_addr(&self, ip: Ipv4Addr) -> bool {
        self.live_names(ip).iter().any(|n| self.name_allowed(n))
    }

    /// Names that are not allowed also resolved to `ip`: the proxy must
    /// check which name a connection is for.
    pub fn is_shared(&self, ip: Ipv4Addr) -> bool {
        self.live_names(ip).iter().any(|n| !self.name_allowed(n))
    }

    /// Whether a connection to `ip` that names `requested` (SNI or Host)
    /// is admitted.
    pub fn admits_request(&self, ip: Ipv4Addr, requested: &str) -> bool {
        self.name_allowed(requested) && self.admits_addr(ip)
    }

    /// Drop expired entries.
    pub fn expire(&self) {
        let now = Instant::now();
        if let Ok(mut map) = self.learned.lock() {
            map.retain(|_, l| {
                l.names.retain(|_, until| *until > now);
                !l.names.is_empty()
            });
        }
    }
}

/// What a client's first bytes say about the server it wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peek {
    /// The TLS SNI or HTTP Host name.
    Name(String),
    /// Neither TLS with SNI nor an HTTP request.
    NoName,
    /// A request has started; more bytes are needed.
    NeedMore,
}

/// The server name a client's first bytes ask for: the SNI of a TLS
/// ClientHello, or the Host header of an HTTP/1 request.
pub fn requested_name(first: &[u8]) -> Peek {
    match requested_name_inner(first) {
        Ok(Some(n)) => Peek::Name(n),
        Ok(None) => Peek::NoName,
        Err(()) => Peek::NeedMore,
    }
}

fn requested_name_inner(first: &[u8]) -> Result<Option<String>, ()> {
    if first.first() == Some(&0x16) {
        return tls_sni(first);
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(first) {
        Ok(httparse::Status::Complete(_)) => Ok(req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("host"))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(|h| strip_port(h.trim()))),
        Ok(httparse::Status::Partial) => {
            if req.method.is_some() {
                Err(())
            } else {
                Ok(None)
            }
        }
        Err(_) => Ok(None),
    }
}

fn strip_port(host: &str) -> String {
    match host.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) && !h.contains(':') => normalize(h),
        _ => normalize(host),
    }
}

fn tls_sni(first: &[u8]) -> Result<Option<String>, ()> {
    use tls_parser::{
        TlsExtension, TlsMessage, TlsMessageHandshake, parse_tls_extensions, parse_tls_plaintext,
    };
    let record = match parse_tls_plaintext(first) {
        Ok((_, r)) => r,
        Err(tls_parser::nom::Err::Incomplete(_)) => return Err(()),
        Err(_) => return Ok(None),
    };
    for msg in record.msg {
        if let TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)) = msg {
            let Some(ext) = hello.ext else {
                return Ok(None);
            };
            let Ok((_, exts)) = parse_tls_extensions(ext) else {
                return Ok(None);
            };
            for e in exts {
                if let TlsExtension::SNI(names) = e {
                    return Ok(names
                        .iter()
                        .find_map(|(_, n)| std::str::from_utf8(n).ok())
                        .map(normalize));
                }
            }
            return Ok(None);
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_subdomains_only() {
        let a = Allowlist::new(&["api.anthropic.com".into(), "*.npmjs.org".into()]);
        assert!(a.name_allowed("api.anthropic.com"));
        assert!(a.name_allowed("API.Anthropic.com."));
        assert!(!a.name_allowed("anthropic.com"));
        assert!(!a.name_allowed("evil-api.anthropic.com"));
        assert!(a.name_allowed("registry.npmjs.org"));
        assert!(!a.name_allowed("npmjs.org"));
        assert!(!a.name_allowed("npmjs.org.evil.com"));
        assert!(!a.name_allowed("xnpmjs.org"));
    }

    #[test]
    fn addresses_are_admitted_by_answers_only() {
        let a = Allowlist::new(&["api.example.com".into()]);
        let ip = Ipv4Addr::new(93, 184, 216, 34);
        assert!(!a.admits_addr(ip));
        a.learn("api.example.com", ip, 60);
        assert!(a.admits_addr(ip));
        assert!(!a.is_shared(ip));
        a.learn("other.example.net", ip, 60);
        assert!(a.is_shared(ip));
        assert!(a.admits_request(ip, "api.example.com"));
        assert!(!a.admits_request(ip, "other.example.net"));
        let other = Ipv4Addr::new(93, 184, 216, 35);
        a.learn("other.example.net", other, 60);
        assert!(!a.admits_addr(other));
    }

    #[test]
    fn http_host_is_read() {
        let req = b"GET / HTTP/1.1\r\nHost: Api.Example.com:8080\r\nUser-Agent: x\r\n\r\n";
        assert_eq!(requested_name(req), Peek::Name("api.example.com".into()));
        assert_eq!(requested_name(b"GET / HTTP/1.1\r\nHo"), Peek::NeedMore);
        assert_eq!(requested_name(b"SSH-2.0-OpenSSH_9.2\r\n"), Peek::NoName);
    }

    #[test]
    fn tls_sni_is_read() {
        // A minimal TLS 1.2 ClientHello with SNI "api.example.com".
        let name = b"api.example.com";
        let mut sni = vec![0x00, 0x00]; // extension type: server_name
        let list_len = name.len() + 3;
        let ext_len = list_len + 2;
        sni.extend_from_slice(&(ext_len as u16).to_be_bytes());
        sni.extend_from_slice(&(list_len as u16).to_be_bytes());
        sni.push(0); // host_name
        sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni.extend_from_slice(name);
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[0u8; 32]); // random
        body.push(0); // session id
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // cipher suites
        body.extend_from_slice(&[0x01, 0x00]); // compression
        body.extend_from_slice(&(sni.len() as u16).to_be_bytes());
        body.extend_from_slice(&sni);
        let mut hs = vec![0x01];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![0x16, 0x03, 0x01];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        assert_eq!(requested_name(&rec), Peek::Name("api.example.com".into()));
        assert_eq!(requested_name(&rec[..20]), Peek::NeedMore);
    }
}
