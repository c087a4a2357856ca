//! What the broker does to one request, as pure functions of bytes:
//! find placeholders, put the real values into header values (and into
//! `Authorization: Basic` credentials), and say why a request is refused.
//! The rules:
//! - a placeholder is replaced only in a header value, only for a host
//!   listed for its secret, and only over TLS the broker terminated;
//! - anywhere else (the URL, the body, trailers, another host, plain
//!   HTTP) the request is refused.

use base64::Engine as _;
use http::header::{AUTHORIZATION, HeaderMap, HeaderValue, PROXY_AUTHORIZATION};

use super::super::policy::Denial;
use crate::config::domain_matches;

/// One secret as the dataplane holds it.
#[derive(Debug, Clone)]
pub struct Held {
    pub name: String,
    pub placeholder: Vec<u8>,
    pub value: crate::secrets::Value,
    pub hosts: Vec<String>,
}

impl Held {
    fn sent_to(&self, host: &str) -> bool {
        self.hosts.iter().any(|p| domain_matches(p, host))
    }
}

/// Why a request was refused, and which secret it carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub why: Denial,
    pub secret: String,
}

/// The placeholders of every secret, searched together.
#[derive(Debug)]
pub struct Secrets {
    pub held: Vec<Held>,
    /// The longest placeholder, in bytes.
    pub longest: usize,
    /// What every placeholder starts with (`migrant-secret-`): bytes
    /// without it (nearly all) are searched once, not once per secret.
    common: memchr::memmem::Finder<'static>,
}

impl Secrets {
    pub fn new(held: Vec<Held>) -> Secrets {
        let longest = held.iter().map(|h| h.placeholder.len()).max().unwrap_or(0);
        let mut common: &[u8] = held.first().map_or(&[], |h| &h.placeholder);
        for h in &held {
            let same = common
                .iter()
                .zip(&h.placeholder)
                .take_while(|(a, b)| a == b)
                .count();
            common = &common[..same];
        }
        let common = memchr::memmem::Finder::new(common).into_owned();
        Secrets {
            held,
            longest,
            common,
        }
    }

    /// The first placeholder in `hay`: (its secret, where).
    pub fn find(&self, hay: &[u8]) -> Option<(usize, usize)> {
        let from = self.common.find(hay)?;
        let hay = &hay[from..];
        self.held
            .iter()
            .enumerate()
            .filter_map(|(i, h)| memchr::memmem::find(hay, &h.placeholder).map(|at| (i, from + at)))
            .min_by_key(|&(_, at)| at)
    }

    fn refusal(&self, i: usize, why: Denial) -> Refusal {
        Refusal {
            why,
            secret: self.held[i].name.clone(),
        }
    }

    /// `hay` with every placeholder replaced by its value, if each may go
    /// to `host`; the secrets used are added to `used`.
    fn substitute(
        &self,
        hay: &[u8],
        host: &str,
        clear: bool,
        used: &mut Vec<usize>,
    ) -> Result<Option<Vec<u8>>, Refusal> {
        let mut out: Option<Vec<u8>> = None;
        let mut rest = hay;
        while let Some((i, at)) = self.find(rest) {
            if clear {
                return Err(self.refusal(i, Denial::SecretInClear));
            }
            let held = &self.held[i];
            if !held.sent_to(host) {
                return Err(self.refusal(i, Denial::SecretNotForHost));
            }
            let o = out.get_or_insert_with(Vec::new);
            o.extend_from_slice(&rest[..at]);
            o.extend_from_slice(held.value.expose().as_bytes());
            rest = &rest[at + held.placeholder.len()..];
            if !used.contains(&i) {
                used.push(i);
            }
        }
        if let Some(o) = &mut out {
            o.extend_from_slice(rest);
        }
        Ok(out)
    }

    /// Refuse a request whose target (path and query) holds a placeholder.
    pub fn check_target(&self, target: &[u8]) -> Result<(), Refusal> {
        match self.find(target) {
            Some((i, _)) => Err(self.refusal(i, Denial::SecretInUrl)),
            None => Ok(()),
        }
    }

    /// Put the values into the header values of a request to `host`
    /// (lower case); `clear`: the request travels in plain text, where
    /// no placeholder may go. The secrets used, in order.
    pub fn headers(
        &self,
        headers: &mut HeaderMap,
        host: &str,
        clear: bool,
    ) -> Result<Vec<usize>, Refusal> {
        let mut used = Vec::new();
        for (name, value) in headers.iter_mut() {
            let credentials = name == AUTHORIZATION || name == PROXY_AUTHORIZATION;
            let bytes = value.as_bytes();
            let mut new = self.substitute(bytes, host, clear, &mut used)?;
            if credentials && new.is_none() {
                new = self.basic(bytes, host, clear, &mut used)?;
            }
            if let Some(new) = new {
                // The values hold no control characters (checked when
                // read), so this cannot fail; if it did, nothing is sent.
                *value = HeaderValue::from_bytes(&new).map_err(|_| {
                    self.refusal(used.last().copied().unwrap_or(0), Denial::SecretNotForHost)
                })?;
                value.set_sensitive(true);
            }
        }
        Ok(used)
    }

    /// `Basic <base64 of user:password>` with placeholders in the
    /// decoded credentials (git over HTTPS sends a token so): decoded,
    /// replaced, encoded again.
    fn basic(
        &self,
        value: &[u8],
        host: &str,
        clear: bool,
        used: &mut Vec<usize>,
    ) -> Result<Option<Vec<u8>>, Refusal> {
        let Some(scheme_end) = value.iter().position(|&b| b == b' ') else {
            return Ok(None);
        };
        if !value[..scheme_end].eq_ignore_ascii_case(b"basic") {
            return Ok(None);
        }
        let encoded = value[scheme_end..].trim_ascii();
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
            return Ok(None);
        };
        let Some(replaced) = self.substitute(&decoded, host, clear, used)? else {
            return Ok(None);
        };
        let mut out = b"Basic ".to_vec();
        out.extend_from_slice(
            base64::engine::general_purpose::STANDARD
                .encode(replaced)
                .as_bytes(),
        );
        Ok(Some(out))
    }

    /// Refuse trailers holding a placeholder.
    pub fn check_trailers(&self, trailers: &HeaderMap) -> Result<(), Refusal> {
        for value in trailers.values() {
            if let Some((i, _)) = self.find(value.as_bytes()) {
                return Err(self.refusal(i, Denial::SecretInBody));
            }
        }
        Ok(())
    }
}

/// Finds a placeholder in a body read in pieces: a placeholder split
/// across two pieces is found too.
#[derive(Debug, Default)]
pub struct Scanner {
    /// The last bytes of what was fed, shorter than the longest
    /// placeholder.
    tail: Vec<u8>,
}

impl Scanner {
    /// Feed the next piece; the secret whose placeholder it completes.
    pub fn feed(&mut self, secrets: &Secrets, piece: &[u8]) -> Option<usize> {
        let keep = secrets.longest.saturating_sub(1);
        if keep == 0 {
            return None;
        }
        // Across the seam: the tail and the start of the piece.
        let mut seam = std::mem::take(&mut self.tail);
        seam.extend_from_slice(&piece[..piece.len().min(keep)]);
        if let Some((i, _)) = secrets.find(&seam) {
            return Some(i);
        }
        if let Some((i, _)) = secrets.find(piece) {
            return Some(i);
        }
        self.tail = if piece.len() >= keep {
            piece[piece.len() - keep..].to_vec()
        } else {
            let start = seam.len().saturating_sub(keep);
            seam[start..].to_vec()
        };
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GH: &str = "migrant-secret-GH-00112233445566778899aabbccddeeff";
    const NPM: &str = "migrant-secret-NPM-ffeeddccbbaa99887766554433221100";

    fn secrets() -> Secrets {
        let held = |name: &str, p: &str, v: &str, hosts: &[&str]| Held {
            name: name.into(),
            placeholder: p.as_bytes().to_vec(),
            value: crate::secrets::Value::for_tests(v),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
        };
        Secrets::new(vec![
            held("GH", GH, "ghp_real", &["github.com", "*.github.com"]),
            held("NPM", NPM, "npm_real", &["registry.npmjs.org"]),
        ])
    }

    fn map(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, HeaderValue::from_str(v).unwrap());
        }
        m
    }

    #[test]
    fn header_values_get_the_value_for_listed_hosts() {
        let s = secrets();
        let mut h = map(&[
            ("authorization", &format!("Bearer {GH}")),
            ("x-other", "plain"),
            ("x-twice", &format!("{GH}:{GH}")),
        ]);
        assert_eq!(s.headers(&mut h, "api.github.com", false), Ok(vec![0]));
        assert_eq!(h["authorization"], "Bearer ghp_real");
        assert_eq!(h["x-twice"], "ghp_real:ghp_real");
        assert_eq!(h["x-other"], "plain");
        let mut h = map(&[("authorization", &format!("token {GH}"))]);
        assert_eq!(s.headers(&mut h, "uploads.github.com", false), Ok(vec![0]));
    }

    #[test]
    fn basic_credentials_are_decoded_replaced_and_encoded() {
        let s = secrets();
        let b64 = |t: &str| base64::engine::general_purpose::STANDARD.encode(t);
        let mut h = map(&[(
            "authorization",
            &format!("Basic {}", b64(&format!("x-access-token:{GH}"))),
        )]);
        assert_eq!(s.headers(&mut h, "github.com", false), Ok(vec![0]));
        assert_eq!(
            h["authorization"],
            format!("Basic {}", b64("x-access-token:ghp_real")).as_str()
        );
        // To another host, refused even inside Basic.
        let mut h = map(&[(
            "authorization",
            &format!("basic {}", b64(&format!("u:{GH}"))),
        )]);
        let r = s.headers(&mut h, "registry.npmjs.org", false).unwrap_err();
        assert_eq!((r.why, r.secret.as_str()), (Denial::SecretNotForHost, "GH"));
    }

    #[test]
    fn a_placeholder_for_another_host_or_in_clear_is_refused() {
        let s = secrets();
        for (host, clear, why) in [
            ("evil.example", false, Denial::SecretNotForHost),
            ("github.com.evil.example", false, Denial::SecretNotForHost),
            ("api.github.com", true, Denial::SecretInClear),
        ] {
            let mut h = map(&[("x-token", GH)]);
            let r = s.headers(&mut h, host, clear).unwrap_err();
            assert_eq!(r.why, why, "{host}");
            assert_eq!(h["x-token"], GH, "unchanged");
        }
        // A request with no placeholder passes, in clear too.
        let mut h = map(&[("accept", "*/*")]);
        assert_eq!(s.headers(&mut h, "evil.example", true), Ok(vec![]));
    }

    #[test]
    fn targets_and_trailers_with_a_placeholder_are_refused() {
        let s = secrets();
        let r = s
            .check_target(format!("/search?q={NPM}").as_bytes())
            .unwrap_err();
        assert_eq!((r.why, r.secret.as_str()), (Denial::SecretInUrl, "NPM"));
        assert!(s.check_target(b"/user/repos?page=2").is_ok());
        let r = s.check_trailers(&map(&[("x-sum", GH)])).unwrap_err();
        assert_eq!(r.why, Denial::SecretInBody);
    }

    #[test]
    fn the_scanner_finds_a_placeholder_split_anywhere() {
        let s = secrets();
        let body = format!("{{\"text\": \"{GH}\"}}").into_bytes();
        for cut_a in 0..body.len() {
            for cut_b in [cut_a, (cut_a + 7).min(body.len()), body.len()] {
                let mut sc = Scanner::default();
                let found = [&body[..cut_a], &body[cut_a..cut_b], &body[cut_b..]]
                    .iter()
                    .find_map(|p| sc.feed(&s, p));
                assert_eq!(found, Some(0), "cuts {cut_a} {cut_b}");
            }
        }
        // One byte at a time.
        let mut sc = Scanner::default();
        assert_eq!(body.chunks(1).find_map(|p| sc.feed(&s, p)), Some(0));
        // A body without one passes, however cut.
        let clean = b"migrant-secret-GH-0011 and nothing more".repeat(50);
        let mut sc = Scanner::default();
        assert_eq!(clean.chunks(13).find_map(|p| sc.feed(&s, p)), None);
    }
}
