//! Digests: `image_checksum` values, published checksum lists
//! (`SHA512SUMS`, `SHA256SUMS`), and incremental hashing.
//!
//! Everything here is pure (no I/O), so the Migrantfile reader can use it
//! to validate `image_checksum`.

use sha2::Digest as _;

/// A hash algorithm used to verify images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algo {
    Sha256,
    Sha512,
}

impl Algo {
    pub fn as_str(self) -> &'static str {
        match self {
            Algo::Sha256 => "sha256",
            Algo::Sha512 => "sha512",
        }
    }

    /// Length of the hex form.
    pub fn hex_len(self) -> usize {
        match self {
            Algo::Sha256 => 64,
            Algo::Sha512 => 128,
        }
    }

    pub fn hasher(self) -> Hasher {
        match self {
            Algo::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algo::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    fn from_name(name: &str) -> Option<Algo> {
        match name.to_ascii_lowercase().as_str() {
            "sha256" => Some(Algo::Sha256),
            "sha512" => Some(Algo::Sha512),
            _ => None,
        }
    }
}

/// A digest: algorithm and lower-case hex.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Digest {
    pub algo: Algo,
    pub hex: String,
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.algo.as_str(), self.hex)
    }
}

impl Digest {
    /// `sha256:<64 hex>` or `sha512:<128 hex>` (either case).
    pub fn parse(text: &str) -> Result<Digest, String> {
        let text = text.trim();
        let Some((name, hex)) = text.split_once(':') else {
            return Err(format!(
                "{text:?} is not a checksum: write \"sha256:<64 hex digits>\" or \"sha512:<128 hex digits>\""
            ));
        };
        let algo = Algo::from_name(name)
            .ok_or_else(|| format!("unknown checksum algorithm {name:?}: use sha256 or sha512"))?;
        Digest::from_hex(algo, hex)
    }

    pub fn from_hex(algo: Algo, hex: &str) -> Result<Digest, String> {
        if hex.len() != algo.hex_len() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "a {} checksum has {} hex digits; got {:?}",
                algo.as_str(),
                algo.hex_len(),
                hex
            ));
        }
        Ok(Digest {
            algo,
            hex: hex.to_ascii_lowercase(),
        })
    }

    /// The first 16 hex digits, for file names.
    pub fn short(&self) -> &str {
        &self.hex[..16.min(self.hex.len())]
    }
}

/// What `image_checksum` says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Checksum {
    /// The digest itself.
    Digest(Digest),
    /// A checksum list (`SHA256SUMS` style) to fetch and look the image's
    /// file name up in.
    List(String),
}

impl Checksum {
    /// Parse an `image_checksum` value.
    pub fn parse(text: &str) -> Result<Checksum, String> {
        let t = text.trim();
        if t.starts_with("http://") || t.starts_with("https://") {
            if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!("{t:?}: a URL cannot contain blanks"));
            }
            return Ok(Checksum::List(t.to_string()));
        }
        if t.contains("://") {
            return Err(format!(
                "{t:?}: a checksum list must be an http:// or https:// URL"
            ));
        }
        Digest::parse(t).map(Checksum::Digest)
    }
}

/// Find `file_name` in a checksum list. Both formats are read:
/// GNU (`<hex>  name`, `<hex> *name`, optionally `./name`) and BSD
/// (`SHA512 (name) = <hex>`). The algorithm comes from the BSD tag or
/// from the digest's length.
pub fn lookup(list: &str, file_name: &str) -> Option<Digest> {
    for line in list.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // BSD style.
        if let Some((tag, rest)) = line.split_once(" (")
            && let Some((name, hex)) = rest.split_once(") = ")
        {
            if name.trim_start_matches("./") == file_name
                && let Some(algo) = Algo::from_name(tag.trim())
                && let Ok(d) = Digest::from_hex(algo, hex.trim())
            {
                return Some(d);
            }
            continue;
        }
        // GNU style.
        let Some((hex, name)) = line.split_once(char::is_whitespace) else {
            continue;
        };
        let name = name.trim_start();
        let name = name.strip_prefix('*').unwrap_or(name);
        if name.trim_start_matches("./") != file_name {
            continue;
        }
        let algo = match hex.len() {
            64 => Algo::Sha256,
            128 => Algo::Sha512,
            _ => continue,
        };
        if let Ok(d) = Digest::from_hex(algo, hex) {
            return Some(d);
        }
    }
    None
}

/// The digest in a checksum file published for one image
/// (`<image>.SHA256`, `<image>.sha512`, as Arch Linux and others do): a
/// line naming `file_name` as in a list, or a bare digest alone on its
/// first line. `algo` is the one the file's name says.
pub fn lookup_single(text: &str, file_name: &str, algo: Algo) -> Option<Digest> {
    if let Some(d) = lookup(text, file_name) {
        return (d.algo == algo).then_some(d);
    }
    let first = text.lines().map(str::trim).find(|l| !l.is_empty())?;
    let mut words = first.split_whitespace();
    let hex = words.next()?;
    // A name other than this file's is not this file's digest.
    if words.next().is_some() {
        return None;
    }
    Digest::from_hex(algo, hex).ok()
}

/// An incremental hash of one of the supported algorithms.
#[derive(Clone)]
pub enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    pub fn finish(self) -> Digest {
        match self {
            Hasher::Sha256(h) => Digest {
                algo: Algo::Sha256,
                hex: hex::encode(h.finalize()),
            },
            Hasher::Sha512(h) => Digest {
                algo: Algo::Sha512,
                hex: hex::encode(h.finalize()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checksum_file_of_one_image() {
        let hex = "ab".repeat(32);
        let d = |t: &str, algo| lookup_single(t, "img.qcow2", algo).map(|d| d.hex);
        assert_eq!(
            d(&format!("{hex}  img.qcow2\n"), Algo::Sha256),
            Some(hex.clone())
        );
        assert_eq!(d(&format!("{hex}\n"), Algo::Sha256), Some(hex.clone()));
        assert_eq!(
            d(&format!("\n  {hex}  \n"), Algo::Sha256),
            Some(hex.clone())
        );
        // Another file's line, or a digest of the other algorithm: none.
        assert_eq!(d(&format!("{hex}  other.qcow2\n"), Algo::Sha256), None);
        assert_eq!(d(&format!("{hex}\n"), Algo::Sha512), None);
        assert_eq!(d("not a digest\n", Algo::Sha256), None);
    }

    const EMPTY_256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn digests_parse() {
        let d = Digest::parse(&format!("SHA256:{}", EMPTY_256.to_uppercase()))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.algo, Algo::Sha256);
        assert_eq!(d.hex, EMPTY_256);
        assert_eq!(d.to_string(), format!("sha256:{EMPTY_256}"));
        assert_eq!(d.short(), &EMPTY_256[..16]);
        for bad in [
            "",
            "sha256",
            "md5:d41d8cd98f00b204e9800998ecf8427e",
            "sha256:abc",
            &format!("sha512:{EMPTY_256}"),
            &format!("sha256:{}g", &EMPTY_256[..63]),
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn checksum_values() {
        assert_eq!(
            Checksum::parse("https://example.org/SHA512SUMS"),
            Ok(Checksum::List("https://example.org/SHA512SUMS".into()))
        );
        assert!(matches!(
            Checksum::parse(&format!("sha256:{EMPTY_256}")),
            Ok(Checksum::Digest(_))
        ));
        assert!(Checksum::parse("ftp://x/SUMS").is_err());
        assert!(Checksum::parse("https://x/a b").is_err());
    }

    #[test]
    fn hashing_matches_known_values() {
        let h = Algo::Sha256.hasher();
        assert_eq!(h.finish().hex, EMPTY_256);
        let mut h = Algo::Sha512.hasher();
        h.update(b"ab");
        h.update(b"c");
        assert!(h.finish().hex.starts_with("ddaf35a193617aba"));
    }

    #[test]
    fn lists_are_read_in_both_formats() {
        let a = "a".repeat(128);
        let b = "b".repeat(64);
        let c = "c".repeat(128);
        let gnu = format!(
            "# comment\n{a}  debian-12-genericcloud-amd64.json\n{c}  debian-12-genericcloud-amd64.qcow2\n{b} *ubuntu.img\n"
        );
        assert_eq!(
            lookup(&gnu, "debian-12-genericcloud-amd64.qcow2"),
            Some(Digest {
                algo: Algo::Sha512,
                hex: c.clone()
            })
        );
        assert_eq!(
            lookup(&gnu, "ubuntu.img").map(|d| d.algo),
            Some(Algo::Sha256)
        );
        assert_eq!(lookup(&gnu, "debian-12-genericcloud-amd64"), None);
        assert_eq!(lookup(&gnu, "missing.qcow2"), None);
        let bsd = format!("SHA256 (other.img) = {b}\nSHA512 (./disk.qcow2) = {c}\n");
        assert_eq!(lookup(&bsd, "disk.qcow2").map(|d| d.hex), Some(c));
        assert_eq!(
            lookup(&bsd, "other.img").map(|d| d.algo),
            Some(Algo::Sha256)
        );
        assert_eq!(lookup("garbage\n\n", "x"), None);
    }
}
