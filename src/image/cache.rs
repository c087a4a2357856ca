//! The image cache (`$MIGRANT_HOME/images`).
//!
//! * `<stem>-<digest16>.<ext>`: a verified base image, never changed once
//!   there (VM overlays point at it);
//! * `<image>.json`: what it is ([`Meta`]: source, image name, digest,
//!   size, when it was added);
//! * `.<image>.partial`: a download in progress, or one interrupted by a
//!   kill (the next download of the same image resumes it); a download
//!   that fails removes it;
//! * `.<image>.lock`: held (flock) by the process downloading that image,
//!   so concurrent `up`s download it once; removed by its holder.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::checksum::Digest;

/// What the cache knows about one image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Meta {
    /// URL or local path it came from.
    pub source: String,
    /// The image name it was pulled as (`debian-12`), if any.
    #[serde(default)]
    pub alias: Option<String>,
    /// The verified digest.
    pub digest: Digest,
    /// Bytes.
    pub size: u64,
    /// Unix seconds.
    pub added_at: u64,
    /// qemu-img's format name (`qcow2`, `raw`).
    #[serde(default)]
    pub format: Option<String>,
}

/// One cached image.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub path: PathBuf,
    pub meta: Option<Meta>,
}

impl Entry {
    pub fn file_name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// A file name safe for the cache: letters, digits, `-`, `_`, `.`; never
/// starting with a dot.
pub fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let s = s.trim_start_matches('.').to_string();
    if s.is_empty() { "image".into() } else { s }
}

/// `debian-12-genericcloud-amd64.qcow2` + digest →
/// `debian-12-genericcloud-amd64-<16 hex>.qcow2`.
pub fn cache_name(file_name: &str, digest: &Digest) -> String {
    let clean = sanitize(file_name);
    let (stem, ext) = match clean.rsplit_once('.') {
        Some((s, e)) if !s.is_empty() && e.len() <= 8 => (s.to_string(), format!(".{e}")),
        _ => (clean.clone(), String::new()),
    };
    format!("{stem}-{}{ext}", digest.short())
}

pub fn meta_path(image: &Path) -> PathBuf {
    sidecar(image, "", ".json")
}

pub fn partial_path(image: &Path) -> PathBuf {
    sidecar(image, ".", ".partial")
}

pub fn lock_path(image: &Path) -> PathBuf {
    sidecar(image, ".", ".lock")
}

fn sidecar(image: &Path, prefix: &str, suffix: &str) -> PathBuf {
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    image.with_file_name(format!("{prefix}{name}{suffix}"))
}

/// What kind of file this is, by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Image,
    Meta,
    Partial,
    Lock,
    /// A temporary file of an atomic write or copy.
    Temporary,
    Other,
}

pub fn kind(name: &str) -> Kind {
    if name.starts_with('.') {
        if name.ends_with(".partial") {
            Kind::Partial
        } else if name.ends_with(".lock") {
            Kind::Lock
        } else if name.contains(".tmp") || name.contains(".partial") {
            Kind::Temporary
        } else {
            Kind::Other
        }
    } else if name.ends_with(".json") {
        Kind::Meta
    } else {
        Kind::Image
    }
}

pub fn load_meta(image: &Path) -> Option<Meta> {
    let text = std::fs::read(meta_path(image)).ok()?;
    serde_json::from_slice(&text).ok()
}

pub fn save_meta(image: &Path, meta: &Meta) -> Result<(), crate::state::StateError> {
    let mut data = serde_json::to_vec_pretty(meta).unwrap_or_default();
    data.push(b'\n');
    crate::state::write_atomic(&meta_path(image), &data, 0o600)
}

/// Every image in `dir` (files that are neither metadata nor hidden), by name.
pub fn entries(dir: &Path) -> Vec<Entry> {
    let mut out: Vec<Entry> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .filter(|e| kind(&e.file_name().to_string_lossy()) == Kind::Image)
        .map(|e| {
            let path = e.path();
            let meta = load_meta(&path);
            Entry { path, meta }
        })
        .collect();
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// The cached image with `digest`, if any (its size must still match).
pub fn find_digest(dir: &Path, digest: &Digest) -> Option<PathBuf> {
    entries(dir).into_iter().find_map(|e| {
        let m = e.meta.as_ref()?;
        let size = std::fs::metadata(&e.path).ok()?.len();
        (m.digest == *digest && m.size == size).then_some(e.path)
    })
}

/// The newest cached image downloaded from `source`.
pub fn newest_from(dir: &Path, source: &str) -> Option<Entry> {
    entries(dir)
        .into_iter()
        .filter(|e| e.meta.as_ref().is_some_and(|m| m.source == source))
        .max_by_key(|e| e.meta.as_ref().map(|m| m.added_at).unwrap_or(0))
}

/// Bytes a file takes on disk (allocated blocks), 0 if it is gone.
pub fn disk_usage(path: &Path) -> u64 {
    std::fs::symlink_metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// An exclusive `flock` on a lock file, held until dropped. The lock file
/// is removed by [`FileLock::release`]; acquiring checks that the file it
/// locked is still the one at the path (a holder may have removed it).
#[derive(Debug)]
pub struct FileLock {
    file: File,
    path: PathBuf,
}

impl FileLock {
    /// Take the lock, waiting as long as it takes; `on_wait` runs once if
    /// another process holds it.
    pub fn acquire(path: &Path, mut on_wait: impl FnMut()) -> io::Result<FileLock> {
        let mut waited = false;
        loop {
            let file = crate::lockfile::open(path)?;
            if !crate::lockfile::lock(&file, false)? {
                if !waited {
                    waited = true;
                    on_wait();
                }
                crate::lockfile::lock(&file, true)?;
            }
            let ours = file.metadata()?;
            match std::fs::metadata(path) {
                Ok(now) if now.ino() == ours.ino() && now.dev() == ours.dev() => {
                    return Ok(FileLock {
                        file,
                        path: path.to_path_buf(),
                    });
                }
                // The holder removed it when done: lock the new one.
                _ => continue,
            }
        }
    }

    /// Whether some process holds the lock at `path` now.
    pub fn is_held(path: &Path) -> bool {
        let Ok(file) = OpenOptions::new().read(true).open(path) else {
            return false;
        };
        matches!(crate::lockfile::lock(&file, false), Ok(false))
    }

    /// Remove the lock file, then unlock.
    pub fn release(self) {
        let _ = std::fs::remove_file(&self.path);
        drop(self.file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::checksum::Algo;

    fn digest(c: char) -> Digest {
        Digest {
            algo: Algo::Sha256,
            hex: c.to_string().repeat(64),
        }
    }

    #[test]
    fn names() {
        let d = digest('a');
        assert_eq!(
            cache_name("debian-12-genericcloud-amd64.qcow2", &d),
            "debian-12-genericcloud-amd64-aaaaaaaaaaaaaaaa.qcow2"
        );
        assert_eq!(cache_name("disk", &d), "disk-aaaaaaaaaaaaaaaa");
        assert_eq!(cache_name("../x y.img", &d), "_x_y-aaaaaaaaaaaaaaaa.img");
        assert_eq!(cache_name("", &d), "image-aaaaaaaaaaaaaaaa");
        let img = Path::new("/c/a.qcow2");
        assert_eq!(meta_path(img), Path::new("/c/a.qcow2.json"));
        assert_eq!(partial_path(img), Path::new("/c/.a.qcow2.partial"));
        assert_eq!(lock_path(img), Path::new("/c/.a.qcow2.lock"));
        assert_eq!(kind("a.qcow2"), Kind::Image);
        assert_eq!(kind("a.qcow2.json"), Kind::Meta);
        assert_eq!(kind(".a.qcow2.partial"), Kind::Partial);
        assert_eq!(kind(".a.qcow2.lock"), Kind::Lock);
        assert_eq!(kind(".a.qcow2.json.tmp12"), Kind::Temporary);
    }

    #[test]
    fn entries_and_lookup() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let img = dir.path().join("x-aaaa.img");
        std::fs::write(&img, b"abc").unwrap_or_else(|e| panic!("{e}"));
        let meta = Meta {
            source: "https://example.org/x.img".into(),
            alias: None,
            digest: digest('a'),
            size: 3,
            added_at: 5,
            format: Some("raw".into()),
        };
        save_meta(&img, &meta).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dir.path().join(".y.partial"), b"").unwrap_or_else(|e| panic!("{e}"));
        let all = entries(dir.path());
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].meta.as_ref(), Some(&meta));
        assert_eq!(find_digest(dir.path(), &digest('a')), Some(img.clone()));
        assert_eq!(find_digest(dir.path(), &digest('b')), None);
        assert_eq!(
            newest_from(dir.path(), "https://example.org/x.img").map(|e| e.path),
            Some(img.clone())
        );
        // A size that no longer matches is not a hit.
        std::fs::write(&img, b"abcd").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(find_digest(dir.path(), &digest('a')), None);
    }

    #[test]
    fn locks_exclude_and_vanish() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join(".a.lock");
        let lock = FileLock::acquire(&path, || {}).unwrap_or_else(|e| panic!("{e}"));
        assert!(FileLock::is_held(&path));
        let (tx, rx) = std::sync::mpsc::channel();
        let p2 = path.clone();
        let t = std::thread::spawn(move || {
            let l = FileLock::acquire(&p2, || {
                let _ = tx.send(());
            });
            l.map(|l| l.release()).is_ok()
        });
        // The second taker waits, and gets the lock once it is released.
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("no wait: {e}"));
        lock.release();
        assert!(t.join().unwrap_or(false));
        assert!(!path.exists());
        assert!(!FileLock::is_held(&path));
    }
}
