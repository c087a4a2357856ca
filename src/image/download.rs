//! HTTP(S) downloads (ureq, rustls): checksum lists, and images verified
//! while the bytes arrive, resumed with `Range` when the connection breaks,
//! renamed into the cache only once the digest matches.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::ImageError;
use super::cache::{self, FileLock, Meta};
use super::checksum::{Digest, Hasher};
use super::progress::Progress;
use crate::size::human;

/// Connection attempts in a row that may fail without any byte arriving.
const MAX_FAILURES: u32 = 5;
/// Largest checksum list read.
const MAX_LIST: u64 = 4 << 20;
const CHUNK: usize = 1 << 20;

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .user_agent(format!("migrant/{}", env!("CARGO_PKG_VERSION")))
        .http_status_as_error(false)
        .accept_encoding(ureq::config::AutoHeaderValue::None)
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .timeout_per_read(Some(Duration::from_secs(60)))
        .max_redirects(10)
        .build()
        .into()
}

/// Why a text fetch failed.
#[derive(Debug)]
pub enum FetchError {
    /// The server answered with this status.
    Status(u16),
    /// No answer (DNS, connection, TLS, timeout, broken body).
    Network(String),
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::Status(s) => write!(f, "HTTP status {s}"),
            FetchError::Network(m) => f.write_str(m),
        }
    }
}

/// GET a small text file (a checksum list).
pub fn fetch_text(agent: &ureq::Agent, url: &str) -> Result<String, FetchError> {
    let resp = agent
        .get(url)
        .call()
        .map_err(|e| FetchError::Network(e.to_string()))?;
    let status = resp.status().as_u16();
    if status != 200 {
        return Err(FetchError::Status(status));
    }
    let mut text = String::new();
    resp.into_body()
        .into_reader()
        .take(MAX_LIST)
        .read_to_string(&mut text)
        .map_err(|e| FetchError::Network(e.to_string()))?;
    Ok(text)
}

/// The last path segment of a URL, without query or fragment.
pub fn url_file_name(url: &str) -> String {
    let no_query = url.split(['?', '#']).next().unwrap_or(url);
    let after_scheme = no_query.split_once("://").map_or(no_query, |(_, r)| r);
    after_scheme
        .split_once('/')
        .map(|(_, path)| path.rsplit('/').next().unwrap_or(""))
        .unwrap_or("")
        .to_string()
}

/// The URL of `name` in the same folder as `url`.
pub fn sibling_url(url: &str, name: &str) -> String {
    let no_query = url.split(['?', '#']).next().unwrap_or(url);
    match no_query.rsplit_once('/') {
        Some((dir, _))
            if dir.contains("://") && dir.split_once("://").is_some_and(|(_, r)| !r.is_empty()) =>
        {
            format!("{dir}/{name}")
        }
        _ => format!("{no_query}/{name}"),
    }
}

/// Parse `Content-Range: bytes START-END/TOTAL`; TOTAL may be `*`.
fn content_range(value: &str) -> Option<(u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _) = range.split_once('-')?;
    let start = start.trim().parse().ok()?;
    let total = total.trim().parse().ok();
    Some((start, total))
}

/// What one request achieved.
enum Attempt {
    /// The body ended where it should.
    Complete,
    /// The connection broke (or never came up); worth another try.
    Broken(String),
}

struct Job<'a> {
    agent: &'a ureq::Agent,
    url: &'a str,
    expected: &'a Digest,
    file: File,
    have: u64,
    total: Option<u64>,
    hasher: Hasher,
    validator: Option<String>,
    progress: Progress,
}

impl Job<'_> {
    fn restart(&mut self) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        self.have = 0;
        self.hasher = self.expected.algo.hasher();
        Ok(())
    }

    fn failure(&self, message: String) -> ImageError {
        ImageError::Download {
            url: self.url.to_string(),
            message,
            expected: self.expected.clone(),
            received: self.have,
            actual: Some(self.hasher.clone().finish()),
        }
    }

    /// One GET (with `Range` when bytes are already there).
    fn attempt(&mut self) -> Result<Attempt, ImageError> {
        let mut req = self.agent.get(self.url);
        if self.have > 0 {
            req = req.header("Range", &format!("bytes={}-", self.have));
            if let Some(v) = &self.validator {
                req = req.header("If-Range", v);
            }
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(e) => return Ok(Attempt::Broken(e.to_string())),
        };
        let status = resp.status().as_u16();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        match status {
            200 => {
                if self.have > 0 {
                    self.progress.note(&format!(
                        "    {}: the server does not resume downloads; starting over",
                        self.url
                    ));
                    self.restart()
                        .map_err(|e| self.failure(format!("partial file: {e}")))?;
                }
                self.total = header("content-length").and_then(|v| v.parse().ok());
            }
            206 => {
                let range = header("content-range").and_then(|v| content_range(&v));
                match range {
                    Some((start, total)) if start == self.have => {
                        if total.is_some() {
                            self.total = total;
                        }
                    }
                    _ => {
                        // Not the range we asked for: start over.
                        self.restart()
                            .map_err(|e| self.failure(format!("partial file: {e}")))?;
                        return Ok(Attempt::Broken(format!(
                            "the server answered a different range ({})",
                            header("content-range").unwrap_or_default()
                        )));
                    }
                }
            }
            416 if self.have > 0 => {
                // Everything is already there (a download killed before
                // its rename), or the file shrank: the digest decides.
                let total = header("content-range").and_then(|v| {
                    v.trim()
                        .strip_prefix("bytes */")
                        .and_then(|t| t.parse().ok())
                });
                if total == Some(self.have) {
                    self.total = total;
                    return Ok(Attempt::Complete);
                }
                self.restart()
                    .map_err(|e| self.failure(format!("partial file: {e}")))?;
                return Ok(Attempt::Broken(
                    "the partial download is longer than the file".into(),
                ));
            }
            500..=599 | 408 | 429 => {
                return Ok(Attempt::Broken(format!("HTTP status {status}")));
            }
            _ => {
                return Err(ImageError::Http {
                    url: self.url.to_string(),
                    status,
                    expected: Some(self.expected.clone()),
                });
            }
        }
        if self.validator.is_none() {
            self.validator = header("etag")
                .filter(|v| !v.starts_with("W/"))
                .or_else(|| header("last-modified"));
        }
        self.progress.set_total(self.total);
        self.progress.update(self.have);

        let mut reader = resp.into_body().into_reader();
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Ok(Attempt::Broken(e.to_string())),
            };
            let chunk = &buf[..n];
            self.hasher.update(chunk);
            self.file
                .write_all(chunk)
                .map_err(|e| self.failure(format!("writing the partial file: {e}")))?;
            self.have += n as u64;
            self.progress.update(self.have);
            if let Some(t) = self.total
                && self.have > t
            {
                return Err(self.failure(format!(
                    "the server sent more than the {t} bytes it announced"
                )));
            }
        }
        match self.total {
            Some(t) if self.have < t => Ok(Attempt::Broken(format!(
                "the connection closed after {} of {} bytes",
                self.have, t
            ))),
            _ => Ok(Attempt::Complete),
        }
    }
}

/// Download `url` into the cache folder `dir` as `name`, verifying
/// `expected` while the bytes arrive. Concurrent callers for the same
/// image wait for the first one and use its result.
pub fn download(
    agent: &ureq::Agent,
    url: &str,
    expected: &Digest,
    dir: &Path,
    name: &str,
    alias: Option<&str>,
    label: &str,
) -> Result<PathBuf, ImageError> {
    let dest = dir.join(name);
    let cache_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ImageError::Cache { path, source }
    };
    let lock = FileLock::acquire(&cache::lock_path(&dest), || {
        println!("==> {label}: waiting for another migrant process downloading {url}");
    })
    .map_err(cache_err(&cache::lock_path(&dest)))?;
    if let Some(found) = cache::find_digest(dir, expected) {
        lock.release();
        return Ok(found);
    }
    let partial = cache::partial_path(&dest);
    let result = fetch_into(agent, url, expected, &partial, label);
    let outcome = result.and_then(|size| {
        let format = super::check_image(&partial, url)?;
        // Root's alone (whatever the umask) until a VM starts on it: the
        // supervisor then gives it to the VM users' group, read-only.
        std::fs::set_permissions(
            &partial,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .map_err(cache_err(&partial))?;
        std::fs::rename(&partial, &dest).map_err(cache_err(&dest))?;
        let meta = Meta {
            source: url.to_string(),
            alias: alias.map(str::to_string),
            digest: expected.clone(),
            size,
            added_at: crate::state::now(),
            format: Some(format),
        };
        cache::save_meta(&dest, &meta).map_err(|e| ImageError::Cache {
            path: cache::meta_path(&dest),
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(dest.clone())
    });
    if outcome.is_err() {
        // A failed or wrong download leaves nothing behind.
        let _ = std::fs::remove_file(&partial);
        if !cache::meta_path(&dest).exists() {
            let _ = std::fs::remove_file(&dest);
        }
    }
    lock.release();
    outcome
}

/// Fetch into `partial` (resuming what is there) and check the digest.
/// Returns the size.
fn fetch_into(
    agent: &ureq::Agent,
    url: &str,
    expected: &Digest,
    partial: &Path,
    label: &str,
) -> Result<u64, ImageError> {
    let io_err = |source| ImageError::Cache {
        path: partial.to_path_buf(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(partial)
        .map_err(io_err)?;
    let mut hasher = expected.algo.hasher();
    let mut have = 0u64;
    // A download interrupted by a kill: hash what is there, go on from it.
    let existing = file.metadata().map_err(io_err)?.len();
    if existing > 0 {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = file.read(&mut buf).map_err(io_err)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            have += n as u64;
        }
        println!(
            "==> {label}: resuming an interrupted download of {url} at {}",
            human(have)
        );
    }
    file.seek(SeekFrom::Start(have)).map_err(io_err)?;
    println!("==> {label}: downloading {url}");
    let mut job = Job {
        agent,
        url,
        expected,
        file,
        have,
        total: None,
        hasher,
        validator: None,
        progress: Progress::new(label),
    };
    let mut failures = 0u32;
    loop {
        let before = job.have;
        match job.attempt()? {
            Attempt::Complete => break,
            Attempt::Broken(why) => {
                if job.have > before {
                    failures = 0;
                }
                failures += 1;
                if failures >= MAX_FAILURES {
                    let message = match job.total {
                        Some(t) => format!(
                            "{why}; gave up after {failures} attempts with {} of {} bytes",
                            job.have, t
                        ),
                        None => format!("{why}; gave up after {failures} attempts"),
                    };
                    return Err(job.failure(message));
                }
                let wait = Duration::from_millis(500 << (failures - 1).min(4));
                job.progress.note(&format!(
                    "    {url}: {why}; resuming at {} in {:.1} s",
                    human(job.have),
                    wait.as_secs_f32()
                ));
                std::thread::sleep(wait);
            }
        }
    }
    job.progress.finish();
    job.file.sync_all().map_err(io_err)?;
    let size = job.have;
    let actual = job.hasher.finish();
    if actual != *expected {
        return Err(ImageError::Mismatch {
            url: url.to_string(),
            expected: expected.clone(),
            actual,
            size,
        });
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parts() {
        assert_eq!(
            url_file_name("https://h/a/b/disk.qcow2?x=1#f"),
            "disk.qcow2"
        );
        assert_eq!(url_file_name("https://h"), "");
        assert_eq!(url_file_name("https://h/"), "");
        assert_eq!(
            sibling_url("https://h/a/b/disk.qcow2", "SHA512SUMS"),
            "https://h/a/b/SHA512SUMS"
        );
        assert_eq!(sibling_url("https://h/disk.img?x", "S"), "https://h/S");
    }

    #[test]
    fn content_ranges() {
        assert_eq!(content_range("bytes 100-199/200"), Some((100, Some(200))));
        assert_eq!(content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(content_range("items 1-2/3"), None);
    }
}
