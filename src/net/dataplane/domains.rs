//! `allow_domains`: which names the guest may reach, and which addresses
//! the supervisor's own DNS answers opened for them.
//!
//! An address is admitted only after the guest resolved an allowed name
//! through the gateway and got that address back. Where one address
//! serves several names (CDNs), the proxy also checks the name the client
//! asks for: the TLS SNI or the HTTP Host header.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Admitted addresses outlive their DNS TTL by this much: clients cache
/// answers a little longer than they should.
const GRACE: Duration = Duration::from_secs(300);
/// Addresses remembered at once, and names per address: a guest that
/// resolves endless names below an allowed wildcard cannot grow the map
/// without bound. Beyond them new answers are not admitted (fail closed).
pub const MAX_ADDRS: usize = 8192;
pub const MAX_NAMES_PER_ADDR: usize = 64;
/// TTLs above a day are taken as a day.
const MAX_TTL: u32 = 86_400;

#[derive(Debug, Default)]
struct Learned {
    /// Names the gateway's DNS answered with this address, and until when.
    names: HashMap<String, Instant>,
}

#[derive(Debug, Clone)]
pub struct Allowlist {
    patterns: Arc<Vec<String>>,
    learned: Arc<Mutex<HashMap<IpAddr, Learned>>>,
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
    pub fn learn(&self, name: &str, ip: impl Into<IpAddr>, ttl: u32) {
        let ip = ip.into();
        let now = Instant::now();
        let until = now + Duration::from_secs(u64::from(ttl.min(MAX_TTL))) + GRACE;
        let Ok(mut map) = self.learned.lock() else {
            return;
        };
        if !map.contains_key(&ip) && map.len() >= MAX_ADDRS {
            map.retain(|_, l| {
                l.names.retain(|_, t| *t > now);
                !l.names.is_empty()
            });
            if map.len() >= MAX_ADDRS {
                tracing::warn!(
                    "allow_domains: {MAX_ADDRS} addresses remembered; {ip} not admitted"
                );
                return;
            }
        }
        let entry = map.entry(ip).or_default();
        let name = normalize(name);
        if !entry.names.contains_key(&name) && entry.names.len() >= MAX_NAMES_PER_ADDR {
            entry.names.retain(|_, t| *t > now);
            if entry.names.len() >= MAX_NAMES_PER_ADDR {
                // Forget the name that expires first: the address stays
                // admitted (or shared) by the others.
                if let Some(first) = entry
                    .names
                    .iter()
                    .min_by_key(|(_, t)| **t)
                    .map(|(n, _)| n.clone())
                {
                    entry.names.remove(&first);
                }
            }
        }
        let slot = entry.names.entry(name).or_insert(until);
        if *slot < until {
            *slot = until;
        }
    }

    fn live_names(&self, ip: IpAddr) -> HashSet<String> {
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
    pub fn admits_addr(&self, ip: impl Into<IpAddr>) -> bool {
        self.live_names(ip.into())
            .iter()
            .any(|n| self.name_allowed(n))
    }

    /// Names that are not allowed also resolved to `ip`: the proxy must
    /// check which name a connection is for.
    pub fn is_shared(&self, ip: impl Into<IpAddr>) -> bool {
        self.live_names(ip.into())
            .iter()
            .any(|n| !self.name_allowed(n))
    }

    /// Whether a connection to `ip` that names `requested` (SNI or Host)
    /// is admitted.
    pub fn admits_request(&self, ip: impl Into<IpAddr>, requested: &str) -> bool {
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

/// Largest TLS ClientHello reassembled (post-quantum key shares make
/// them a few KiB; 64 KiB is far beyond any real one).
pub const HELLO_LIMIT: usize = 64 * 1024;
/// Largest HTTP request head read.
pub const HEAD_LIMIT: usize = 64 * 1024;
/// Headers per request head (browsers send about 20).
const MAX_HEADERS: usize = 128;

/// What a client's first bytes are, for `allow_domains`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstFlight {
    /// Not enough bytes yet to tell.
    NeedMore,
    /// A complete TLS ClientHello, however many records and segments it
    /// came in: its SNI, and whether it carries an encrypted inner hello.
    Tls { sni: Option<String>, ech: bool },
    /// A complete HTTP/1 request head.
    Http(RequestHead),
    /// Starts like TLS or an HTTP request but cannot be read whole:
    /// refused, never treated as naming nothing.
    Bad(&'static str),
    /// Neither TLS nor text: a binary protocol, or an SSH banner.
    Opaque,
}

/// A checked HTTP/1 request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// The Host header, lower-case, without port.
    pub host: String,
    /// Bytes of the head, blank line included.
    pub len: usize,
    pub body: Body,
}

/// How a request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    None,
    Length(u64),
    Chunked,
}

/// Classify a client's first bytes (see [`FirstFlight`]). Text that
/// starts with a letter is taken for HTTP, which must then parse: a
/// lenient server could read what a strict parser gave up on.
pub fn first_flight(bytes: &[u8]) -> FirstFlight {
    let start = bytes
        .iter()
        .position(|b| !matches!(b, b'\r' | b'\n' | b' ' | b'\t'))
        .unwrap_or(bytes.len());
    let rest = &bytes[start..];
    match rest.first() {
        None => FirstFlight::NeedMore,
        Some(0x16) => match client_hello(rest) {
            Ok(Some((sni, ech))) => FirstFlight::Tls { sni, ech },
            Ok(None) if rest.len() > HELLO_LIMIT => FirstFlight::Bad("ClientHello too large"),
            Ok(None) => FirstFlight::NeedMore,
            Err(why) => FirstFlight::Bad(why),
        },
        Some(_) if rest.starts_with(b"SSH-") => FirstFlight::Opaque,
        Some(b) if b.is_ascii_alphabetic() => match request_head(rest) {
            Ok(Some(mut head)) => {
                head.len += start;
                FirstFlight::Http(head)
            }
            Ok(None) => FirstFlight::NeedMore,
            Err(why) => FirstFlight::Bad(why),
        },
        Some(_) => FirstFlight::Opaque,
    }
}

/// The SNI of a ClientHello reassembled from the handshake records at the
/// start of `bytes`, and whether it offers ECH; `Ok(None)`: incomplete.
pub fn client_hello(bytes: &[u8]) -> Result<Option<(Option<String>, bool)>, &'static str> {
    let mut hs: Vec<u8> = Vec::new();
    let mut rest = bytes;
    let need = loop {
        if hs.len() >= 4 {
            if hs[0] != 1 {
                return Err("TLS handshake that is not a ClientHello");
            }
            let need =
                4 + (usize::from(hs[1]) << 16 | usize::from(hs[2]) << 8 | usize::from(hs[3]));
            if need > HELLO_LIMIT {
                return Err("ClientHello too large");
            }
            if hs.len() >= need {
                break need;
            }
        }
        let Some(header) = rest.get(..5) else {
            return Ok(None);
        };
        if header[0] != 0x16 {
            return Err("ClientHello interrupted by another TLS record");
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > 16 * 1024 {
            return Err("TLS record length out of range");
        }
        let Some(fragment) = rest.get(5..5 + len) else {
            return Ok(None);
        };
        hs.extend_from_slice(fragment);
        rest = &rest[5 + len..];
    };
    let body = &hs[4..need];
    let (_, hello) =
        tls_parser::parse_tls_handshake_client_hello(body).map_err(|_| "malformed ClientHello")?;
    let mut exts = hello.ext.unwrap_or_default();
    let mut sni = None;
    let mut ech = false;
    while !exts.is_empty() {
        let (Some(ty), Some(len)) = (exts.get(..2), exts.get(2..4)) else {
            return Err("malformed ClientHello extensions");
        };
        let ty = u16::from_be_bytes([ty[0], ty[1]]);
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        let data = exts
            .get(4..4 + len)
            .ok_or("malformed ClientHello extensions")?;
        exts = &exts[4 + len..];
        match ty {
            0 => {
                if sni.is_some() {
                    return Err("two server_name extensions");
                }
                let Ok((_, tls_parser::TlsExtension::SNI(names))) =
                    tls_parser::parse_tls_extension_sni_content(data)
                else {
                    return Err("malformed server_name extension");
                };
                let mut hosts = names.iter().filter(|(t, _)| t.0 == 0);
                let name = hosts
                    .next()
                    .and_then(|(_, n)| std::str::from_utf8(n).ok())
                    .filter(|n| valid_host(n))
                    .ok_or("malformed server name")?;
                if hosts.next().is_some() {
                    return Err("two server names");
                }
                sni = Some(normalize(name));
            }
            // encrypted_client_hello, and the draft ESNI before it.
            0xfe0d | 0xffce => ech = true,
            _ => {}
        }
    }
    Ok(Some((sni, ech)))
}

fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

/// A complete, checked HTTP/1 request head at the start of `bytes`;
/// `Ok(None)`: incomplete. Refused (Err): more headers than
/// [`MAX_HEADERS`], a head over [`HEAD_LIMIT`], CONNECT, targets that are
/// not origin-form (a server prefers an absolute URI's host to the Host
/// header), no or several Host headers, protocol upgrades (the rest of
/// the connection could not be inspected), and bodies framed two ways.
pub fn request_head(bytes: &[u8]) -> Result<Option<RequestHead>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if bytes.len() > HEAD_LIMIT => {
            return Err("request head too large");
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err("too many request headers"),
        Err(_) => return Err("malformed HTTP request"),
    };
    if len > HEAD_LIMIT {
        return Err("request head too large");
    }
    let method = req.method.unwrap_or("");
    if method.eq_ignore_ascii_case("CONNECT") {
        return Err("CONNECT");
    }
    match req.path {
        Some(p) if p.starts_with('/') => {}
        Some("*") if method == "OPTIONS" => {}
        _ => return Err("request target not in origin form"),
    }
    let mut host = None;
    let mut length: Option<u64> = None;
    let mut chunked = false;
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value)
            .map_err(|_| "header value not text")?
            .trim();
        if h.name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return Err("two Host headers");
            }
            let name = strip_port(value);
            if !valid_host(&name) {
                return Err("malformed Host header");
            }
            host = Some(name);
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            return Err("protocol upgrade");
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if chunked || !value.eq_ignore_ascii_case("chunked") {
                return Err("unsupported Transfer-Encoding");
            }
            chunked = true;
        } else if h.name.eq_ignore_ascii_case("content-length") {
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err("malformed Content-Length");
            }
            let n = value.parse().map_err(|_| "malformed Content-Length")?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting Content-Length");
            }
            length = Some(n);
        }
    }
    let host = host.ok_or("no Host header")?;
    let body = match (chunked, length) {
        (true, Some(_)) => return Err("both Transfer-Encoding and Content-Length"),
        (true, None) => Body::Chunked,
        (false, Some(n)) => Body::Length(n),
        (false, None) => Body::None,
    };
    Ok(Some(RequestHead { host, len, body }))
}

fn strip_port(host: &str) -> String {
    match host.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) && !h.contains(':') => normalize(h),
        _ => normalize(host),
    }
}

/// Follows a chunked request body (RFC 9112 §7.1) byte by byte, so the
/// relay knows where the next request starts. Strict where servers
/// disagree: CRLF line ends only, hexadecimal sizes without sign or
/// space, lines of at most 4 KiB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunked {
    state: ChunkState,
    line: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading a chunk-size line (with extensions).
    Size,
    /// `n` data bytes left, then CRLF.
    Data(u64),
    DataCr,
    DataLf,
    /// Reading trailer lines until an empty one.
    Trailer,
    Done,
}

const CHUNK_LINE_LIMIT: usize = 4096;

impl Default for Chunked {
    fn default() -> Self {
        Chunked {
            state: ChunkState::Size,
            line: Vec::new(),
        }
    }
}

impl Chunked {
    /// Consume body bytes from `data`; returns how many belong to the
    /// body (the rest starts the next request) and whether it ended.
    pub fn feed(&mut self, data: &[u8]) -> Result<(usize, bool), &'static str> {
        let mut i = 0;
        while i < data.len() {
            match self.state {
                ChunkState::Done => break,
                ChunkState::Data(n) => {
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(data.len() - i);
                    i += take;
                    let left = n - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataCr
                    } else {
                        ChunkState::Data(left)
                    };
                }
                ChunkState::DataCr => {
                    if data[i] != b'\r' {
                        return Err("chunk not followed by CRLF");
                    }
                    i += 1;
                    self.state = ChunkState::DataLf;
                }
                ChunkState::DataLf => {
                    if data[i] != b'\n' {
                        return Err("chunk not followed by CRLF");
                    }
                    i += 1;
                    self.state = ChunkState::Size;
                }
                ChunkState::Size | ChunkState::Trailer => {
                    let b = data[i];
                    i += 1;
                    self.line.push(b);
                    if self.line.len() > CHUNK_LINE_LIMIT {
                        return Err("chunk line too long");
                    }
                    if b != b'\n' {
                        continue;
                    }
                    let Some(line) = self.line.strip_suffix(b"\r\n") else {
                        return Err("bare LF in chunked body");
                    };
                    if line.contains(&b'\r') {
                        return Err("bare CR in chunked body");
                    }
                    self.state = if self.state == ChunkState::Size {
                        let size = line.split(|&b| b == b';').next().unwrap_or_default();
                        if size.is_empty()
                            || size.len() > 15
                            || !size.iter().all(u8::is_ascii_hexdigit)
                        {
                            return Err("malformed chunk size");
                        }
                        let text = std::str::from_utf8(size).map_err(|_| "malformed chunk size")?;
                        let n =
                            u64::from_str_radix(text, 16).map_err(|_| "malformed chunk size")?;
                        if n == 0 {
                            ChunkState::Trailer
                        } else {
                            ChunkState::Data(n)
                        }
                    } else if line.is_empty() {
                        ChunkState::Done
                    } else {
                        ChunkState::Trailer
                    };
                    self.line.clear();
                }
            }
        }
        Ok((i, self.state == ChunkState::Done))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

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
    fn the_learned_map_is_bounded() {
        let a = Allowlist::new(&["*.example.com".into()]);
        for i in 0..(MAX_ADDRS + 10) as u32 {
            a.learn("x.example.com", Ipv4Addr::from(0x2d00_0000 + i), 60);
        }
        assert!(a.admits_addr(Ipv4Addr::from(0x2d00_0000)));
        assert!(!a.admits_addr(Ipv4Addr::from(0x2d00_0000 + MAX_ADDRS as u32)));
        let a = Allowlist::new(&["*.example.com".into()]);
        let ip = Ipv4Addr::new(93, 184, 216, 34);
        for i in 0..(MAX_NAMES_PER_ADDR * 3) {
            a.learn(&format!("n{i}.example.com"), ip, 60);
        }
        let names = a
            .learned
            .lock()
            .map(|m| m.get(&IpAddr::V4(ip)).map_or(0, |l| l.names.len()))
            .unwrap_or(0);
        assert_eq!(names, MAX_NAMES_PER_ADDR);
        assert!(a.admits_addr(ip));
    }

    #[test]
    fn http_host_is_read() {
        let req = b"GET / HTTP/1.1\r\nHost: Api.Example.com:8080\r\nUser-Agent: x\r\n\r\n";
        let FirstFlight::Http(head) = first_flight(req) else {
            panic!("{:?}", first_flight(req));
        };
        assert_eq!(head.host, "api.example.com");
        assert_eq!(head.len, req.len());
        assert_eq!(head.body, Body::None);
        assert_eq!(first_flight(b"GET / HTTP/1.1\r\nHo"), FirstFlight::NeedMore);
        assert_eq!(
            first_flight(b"SSH-2.0-OpenSSH_9.2 Debian\r\n"),
            FirstFlight::Opaque
        );
        assert_eq!(
            first_flight(b"\x00\x00\x00\x08\x04\xd2\x16\x2f"),
            FirstFlight::Opaque
        );
        // Leading blank lines, which servers skip, do not hide a request.
        let req = b"\r\n\r\nGET / HTTP/1.1\r\nHost: a.test\r\n\r\nGET /next";
        let FirstFlight::Http(head) = first_flight(req) else {
            panic!("leading CRLF");
        };
        assert_eq!(&req[head.len..], b"GET /next");
    }

    #[test]
    fn requests_that_cannot_be_checked_are_refused() {
        let bad = |r: &[u8]| matches!(first_flight(r), FirstFlight::Bad(_));
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..200 {
            many.extend_from_slice(format!("X-Pad-{i}: {i}\r\n").as_bytes());
        }
        many.extend_from_slice(b"Host: evil.test\r\n\r\n");
        assert!(bad(&many), "too many headers");
        let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
        huge.resize(HEAD_LIMIT + 10, b'a');
        assert!(bad(&huge), "head too large");
        assert!(bad(
            b"GET http://evil.test/ HTTP/1.1\r\nHost: ok.test\r\n\r\n"
        ));
        assert!(bad(
            b"CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test\r\n\r\n"
        ));
        assert!(bad(b"GET / HTTP/1.1\r\n\r\n"), "no Host");
        assert!(bad(
            b"GET / HTTP/1.1\r\nHost: ok.test\r\nHost: evil.test\r\n\r\n"
        ));
        assert!(bad(
            b"GET / HTTP/1.1\r\nHost: ok.test\r\nUpgrade: h2c\r\n\r\n"
        ));
        assert!(bad(
            b"POST / HTTP/1.1\r\nHost: ok.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(bad(
            b"POST / HTTP/1.1\r\nHost: ok.test\r\nTransfer-Encoding: gzip\r\n\r\n"
        ));
        assert!(bad(
            b"POST / HTTP/1.1\r\nHost: ok.test\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"
        ));
        assert!(bad(b"GET / HTTP/1.1\r\nHost: ok.test/evil\r\n\r\n"));
        assert!(bad(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        assert!(bad(b"GET / HTTP/1.1\r\nHost : evil.test\r\n\r\n"));
        // Well-formed framing is read.
        let FirstFlight::Http(h) =
            first_flight(b"POST /x HTTP/1.1\r\nHost: ok.test\r\nContent-Length: 12\r\n\r\n")
        else {
            panic!("length");
        };
        assert_eq!(h.body, Body::Length(12));
        let FirstFlight::Http(h) = first_flight(
            b"POST /x HTTP/1.1\r\nHost: ok.test\r\nTransfer-Encoding: Chunked\r\n\r\n",
        ) else {
            panic!("chunked");
        };
        assert_eq!(h.body, Body::Chunked);
    }

    #[test]
    fn chunked_bodies_end_where_they_end() {
        let body = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nTrailer: x\r\n\r\nGET /next";
        let mut c = Chunked::default();
        // Byte by byte, as segments may split it anywhere.
        let mut used = 0;
        let mut done = false;
        for b in body.iter() {
            let (n, d) = c
                .feed(std::slice::from_ref(b))
                .unwrap_or_else(|e| panic!("{e}"));
            used += n;
            if d {
                done = true;
                break;
            }
        }
        assert!(done);
        assert_eq!(&body[used..], b"GET /next");
        let mut c = Chunked::default();
        assert_eq!(c.feed(body), Ok((body.len() - 9, true)));
        for bad in [
            &b"4\nWiki\r\n0\r\n\r\n"[..],
            b"+4\r\nWiki\r\n",
            b"4 \r\nWiki\r\n",
            b"4\r\nWikiXX",
            b"ffffffffffffffffff\r\n",
        ] {
            assert!(Chunked::default().feed(bad).is_err(), "{bad:?}");
        }
    }

    /// A ClientHello for `name` with extra extensions, as handshake bytes.
    fn hello(name: &str, extra: &[u8]) -> Vec<u8> {
        let name = name.as_bytes();
        let mut sni = vec![0x00, 0x00]; // extension type: server_name
        let list_len = name.len() + 3;
        let ext_len = list_len + 2;
        sni.extend_from_slice(&(ext_len as u16).to_be_bytes());
        sni.extend_from_slice(&(list_len as u16).to_be_bytes());
        sni.push(0); // host_name
        sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni.extend_from_slice(name);
        sni.extend_from_slice(extra);
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
        hs
    }

    fn records(hs: &[u8], sizes: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = hs;
        for &n in sizes.iter().chain(std::iter::once(&usize::MAX)) {
            if rest.is_empty() {
                break;
            }
            let (part, r) = rest.split_at(n.min(rest.len()));
            out.extend_from_slice(&[0x16, 0x03, 0x01]);
            out.extend_from_slice(&(part.len() as u16).to_be_bytes());
            out.extend_from_slice(part);
            rest = r;
        }
        out
    }

    #[test]
    fn tls_sni_is_read_from_one_record_or_many() {
        let hs = hello("api.example.com", &[]);
        let want = FirstFlight::Tls {
            sni: Some("api.example.com".into()),
            ech: false,
        };
        assert_eq!(first_flight(&records(&hs, &[])), want);
        let split = records(&hs, &[1, 3, 9, 20]);
        assert_eq!(first_flight(&split), want);
        // Every prefix is incomplete, never a verdict.
        for n in 0..split.len() {
            assert_eq!(first_flight(&split[..n]), FirstFlight::NeedMore, "{n}");
        }
        let ech = records(&hello("api.example.com", &[0xfe, 0x0d, 0, 2, 0, 0]), &[]);
        assert_eq!(
            first_flight(&ech),
            FirstFlight::Tls {
                sni: Some("api.example.com".into()),
                ech: true
            }
        );
    }

    #[test]
    fn tls_that_cannot_be_read_is_refused() {
        let bad = |r: &[u8]| matches!(first_flight(r), FirstFlight::Bad(_));
        let hs = hello("api.example.com", &[]);
        // Another record type in the middle of the hello.
        let mut mixed = records(&hs[..10], &[]);
        mixed.extend_from_slice(&[0x17, 0x03, 0x03, 0x00, 0x01, 0x00]);
        assert!(bad(&mixed));
        // A handshake message that is not a ClientHello.
        let mut other = hs.clone();
        other[0] = 2;
        assert!(bad(&records(&other, &[])));
        // A hello declared larger than the limit.
        let mut big = hs.clone();
        big[1] = 0x10;
        assert!(bad(&records(&big, &[])));
        // Two server_name extensions.
        let twice = hello(
            "a.test",
            &[0, 0, 0, 9, 0, 7, 0, 0, 4, b'b', b'.', b't', b'e'],
        );
        assert!(bad(&records(&twice, &[])));
    }
}
