//! Base images: resolving the Migrantfile's `image`, downloading and
//! verifying, the cache, and the qcow2 files of a VM (overlay, snapshot,
//! resize).
//!
//! * an image name (`debian-12`, see [`alias`]) is the distribution's
//!   official cloud image, verified against the checksum list published
//!   beside it;
//! * an `http(s)://` URL is verified against `image_checksum` (a digest,
//!   or the URL of a checksum list), else against a `SHA512SUMS` or
//!   `SHA256SUMS` file in the same folder, or a checksum file of its own
//!   (`<image>.sha512`, `<image>.SHA256`, …);
//! * a local path or `file://` URL is copied into the cache each time
//!   (the source may have been rebuilt), named by its content.
//!
//! Downloads are verified while the bytes arrive and renamed into the
//! cache only when the digest matches; see [`download`] and [`cache`].

pub mod alias;
pub mod cache;
pub mod checksum;
pub mod download;
pub mod progress;
mod qemu_img;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub use checksum::{Algo, Checksum, Digest};
pub use qemu_img::{
    FORMATS, ImgInfo, check_disk_chain, convert_flat, convert_flat_shared, create_overlay, info,
    info_as, resize,
};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "unknown image name {name:?}; known names: {known} (or give an https:// URL or a local file)"
    )]
    UnknownAlias { name: String, known: String },
    #[error(
        "image {0}: only http://, https://, file:// URLs, local paths and image names are supported"
    )]
    Unsupported(String),
    #[error("image {path} does not exist or is not a regular file")]
    Missing { path: PathBuf },
    #[error("cannot copy image {path} into the cache")]
    Copy {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image cache: {path}")]
    Cache {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", http_message(url, *status, expected.as_ref()))]
    Http {
        url: String,
        status: u16,
        expected: Option<Digest>,
    },
    #[error("{}", download_message(url, message, expected, *received, actual.as_ref()))]
    Download {
        url: String,
        message: String,
        expected: Digest,
        received: u64,
        actual: Option<Digest>,
    },
    #[error(
        "checksum mismatch for {url}: expected {expected}, got {actual} ({size} bytes); nothing was kept"
    )]
    Mismatch {
        url: String,
        expected: Digest,
        actual: Digest,
        size: u64,
    },
    #[error("cannot fetch the checksum list {url}: {message}")]
    List { url: String, message: String },
    #[error("the checksum list {list} has no entry for {file}")]
    NotInList { list: String, file: String },
    #[error(
        "no checksum for {url}: set image_checksum = \"sha256:…\" (or \"sha512:…\", or the URL of a checksum list); \
         no SHA512SUMS or SHA256SUMS beside it lists {file}, and no {file}.sha512 or {file}.sha256 (either case) is published"
    )]
    NoChecksum { url: String, file: String },
    #[error("{source_name} is not a usable disk image: {message}")]
    BadImage {
        source_name: String,
        message: String,
    },
    #[error("qemu-img {action} failed: {message}")]
    QemuImg { action: String, message: String },
    #[error("disk = {disk} bytes is smaller than the image's virtual size ({virtual_size} bytes)")]
    DiskTooSmall { disk: u64, virtual_size: u64 },
    /// A VM disk whose header no longer says what migrant made (QEMU,
    /// which writes it, may be compromised).
    #[error("{}: {message}; refusing to use it (destroy the VM, or restore the disk from a backup)", path.display())]
    Tampered { path: PathBuf, message: String },
}

fn http_message(url: &str, status: u16, expected: Option<&Digest>) -> String {
    let mut s = format!("download of {url} failed: HTTP status {status}");
    if status == 404 {
        s.push_str(" (not found)");
    }
    if let Some(d) = expected {
        s.push_str(&format!("; expected {d}, got nothing; nothing was kept"));
    }
    s
}

fn download_message(
    url: &str,
    message: &str,
    expected: &Digest,
    received: u64,
    actual: Option<&Digest>,
) -> String {
    let got = match actual {
        Some(a) if received > 0 => format!("got {a} of the {received} bytes received"),
        _ => "got nothing".to_string(),
    };
    format!("download of {url} failed: {message}; expected {expected}, {got}; nothing was kept")
}

impl ImageError {
    pub fn exit_code(&self) -> u8 {
        use crate::exit;
        match self {
            ImageError::UnknownAlias { .. }
            | ImageError::Unsupported(_)
            | ImageError::Missing { .. }
            | ImageError::NoChecksum { .. }
            | ImageError::DiskTooSmall { .. } => exit::CONFIG,
            ImageError::Http { .. } | ImageError::Download { .. } | ImageError::List { .. } => {
                exit::UNAVAILABLE
            }
            ImageError::Mismatch { .. }
            | ImageError::NotInList { .. }
            | ImageError::BadImage { .. }
            | ImageError::Tampered { .. } => exit::DATAERR,
            ImageError::Cache { source, .. } | ImageError::Copy { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                exit::NOPERM
            }
            ImageError::Copy { .. } | ImageError::Cache { .. } | ImageError::QemuImg { .. } => {
                exit::SOFTWARE
            }
        }
    }
}

/// How a remote image is verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verify {
    /// The digest is known.
    Digest(Digest),
    /// Look the file name up in this checksum list.
    List(String),
    /// Look for `SHA512SUMS`, then `SHA256SUMS`, beside the image.
    Beside,
}

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A local file, copied into the cache each time.
    Local {
        path: PathBuf,
        checksum: Option<Digest>,
    },
    /// A download.
    Remote {
        url: String,
        /// The image name it was given as.
        alias: Option<String>,
        verify: Verify,
    },
}

impl Source {
    /// What to call it in messages.
    pub fn describe(&self) -> String {
        match self {
            Source::Local { path, .. } => path.display().to_string(),
            Source::Remote {
                alias: Some(a),
                url,
                ..
            } => format!("{a} ({url})"),
            Source::Remote { url, .. } => url.clone(),
        }
    }
}

/// Resolve the Migrantfile's `image` (as the config module left it: local
/// paths absolute, URLs and names as written) and `image_checksum`.
pub fn resolve(image: &str, checksum: Option<&Checksum>) -> Result<Source, ImageError> {
    if let Some(rest) = image.strip_prefix("file://") {
        return local(PathBuf::from(rest), checksum, image);
    }
    if image.starts_with('/') {
        return local(PathBuf::from(image), checksum, image);
    }
    if image.starts_with("http://") || image.starts_with("https://") {
        let verify = match checksum {
            Some(Checksum::Digest(d)) => Verify::Digest(d.clone()),
            Some(Checksum::List(l)) => Verify::List(l.clone()),
            None => Verify::Beside,
        };
        return Ok(Source::Remote {
            url: image.to_string(),
            alias: None,
            verify,
        });
    }
    if image.contains("://") {
        return Err(ImageError::Unsupported(image.to_string()));
    }
    let entry = alias::find(image).ok_or_else(|| ImageError::UnknownAlias {
        name: image.to_string(),
        known: alias::names(),
    })?;
    let mirror = alias::mirror_from_env();
    let verify = match checksum {
        // A pinned digest for a name: use it instead of the list.
        Some(Checksum::Digest(d)) => Verify::Digest(d.clone()),
        Some(Checksum::List(l)) => Verify::List(l.clone()),
        None => Verify::List(entry.list_url(mirror.as_deref())),
    };
    Ok(Source::Remote {
        url: entry.image_url(mirror.as_deref()),
        alias: Some(entry.name.to_string()),
        verify,
    })
}

fn local(path: PathBuf, checksum: Option<&Checksum>, image: &str) -> Result<Source, ImageError> {
    let checksum = match checksum {
        None => None,
        Some(Checksum::Digest(d)) => Some(d.clone()),
        Some(Checksum::List(_)) => {
            return Err(ImageError::Unsupported(format!(
                "{image} with a checksum list URL (give the digest itself for a local file)"
            )));
        }
    };
    Ok(Source::Local { path, checksum })
}

/// A local source file for `image`, if it names one.
pub fn local_source(image: &str) -> Result<PathBuf, ImageError> {
    match resolve(image, None)? {
        Source::Local { path, .. } => Ok(path),
        Source::Remote { url, .. } => Err(ImageError::Unsupported(url)),
    }
}

/// The base image in the cache for `source`: copied (local), found in the
/// cache, or downloaded. `label` prefixes messages (the VM name).
pub fn obtain(source: &Source, cache_dir: &Path, label: &str) -> Result<PathBuf, ImageError> {
    std::fs::create_dir_all(cache_dir).map_err(|source| ImageError::Cache {
        path: cache_dir.to_path_buf(),
        source,
    })?;
    match source {
        Source::Local { path, checksum } => {
            println!("==> {label}: copying image {}", path.display());
            cache_local_checked(path, cache_dir, checksum.as_ref())
        }
        Source::Remote { url, alias, verify } => {
            let agent = download::agent();
            let expected = match expected_digest(&agent, url, verify) {
                Ok(d) => d,
                Err(e @ ImageError::List { .. }) => {
                    // Offline: the newest copy of this URL still serves.
                    if let Some(entry) = cache::newest_from(cache_dir, url) {
                        eprintln!(
                            "warning: {e}; using the cached {} (added {})",
                            entry.file_name(),
                            entry
                                .meta
                                .as_ref()
                                .map(|m| age(m.added_at))
                                .unwrap_or_default()
                        );
                        return Ok(entry.path);
                    }
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            if let Some(found) = cache::find_digest(cache_dir, &expected) {
                println!(
                    "==> {label}: using cached image {}",
                    found.file_name().unwrap_or_default().to_string_lossy()
                );
                return Ok(found);
            }
            let file = download::url_file_name(url);
            let name = cache::cache_name(&file, &expected);
            download::download(
                &agent,
                url,
                &expected,
                cache_dir,
                &name,
                alias.as_deref(),
                label,
            )
        }
    }
}

/// `3 days ago`, `5 minutes ago`.
pub fn age(unix: u64) -> String {
    let secs = crate::state::now().saturating_sub(unix);
    match secs {
        0..=119 => format!("{secs} seconds ago"),
        120..=7199 => format!("{} minutes ago", secs / 60),
        7200..=172_799 => format!("{} hours ago", secs / 3600),
        _ => format!("{} days ago", secs / 86400),
    }
}

/// The digest a remote image must have.
fn expected_digest(agent: &ureq::Agent, url: &str, verify: &Verify) -> Result<Digest, ImageError> {
    let file = download::url_file_name(url);
    if file.is_empty() {
        return Err(ImageError::Unsupported(format!(
            "{url} (the URL names no file)"
        )));
    }
    let from_list = |list: &str| -> Result<Option<Digest>, download::FetchError> {
        let text = download::fetch_text(agent, list)?;
        Ok(checksum::lookup(&text, &file))
    };
    match verify {
        Verify::Digest(d) => Ok(d.clone()),
        Verify::List(list) => match from_list(list) {
            Ok(Some(d)) => Ok(d),
            Ok(None) => Err(ImageError::NotInList {
                list: list.clone(),
                file,
            }),
            Err(e) => Err(ImageError::List {
                url: list.clone(),
                message: e.to_string(),
            }),
        },
        Verify::Beside => {
            for name in ["SHA512SUMS", "SHA256SUMS"] {
                let list = download::sibling_url(url, name);
                match from_list(&list) {
                    Ok(Some(d)) => return Ok(d),
                    Ok(None) | Err(download::FetchError::Status(_)) => continue,
                    Err(e) => {
                        return Err(ImageError::List {
                            url: list,
                            message: e.to_string(),
                        });
                    }
                }
            }
            // One checksum file per image, named after it.
            for (suffix, algo) in PER_FILE {
                let single = download::sibling_url(url, &format!("{file}.{suffix}"));
                match download::fetch_text(agent, &single) {
                    Ok(text) => {
                        return checksum::lookup_single(&text, &file, algo)
                            .ok_or(ImageError::NotInList { list: single, file });
                    }
                    Err(download::FetchError::Status(_)) => continue,
                    Err(e) => {
                        return Err(ImageError::List {
                            url: single,
                            message: e.to_string(),
                        });
                    }
                }
            }
            Err(ImageError::NoChecksum {
                url: url.to_string(),
                file,
            })
        }
    }
}

/// Checksum files published one per image, beside it, in the order they
/// are tried (after `SHA512SUMS` and `SHA256SUMS`).
const PER_FILE: [(&str, checksum::Algo); 4] = [
    ("SHA512", checksum::Algo::Sha512),
    ("sha512", checksum::Algo::Sha512),
    ("SHA256", checksum::Algo::Sha256),
    ("sha256", checksum::Algo::Sha256),
];

/// Check that `path` is a disk image QEMU can use as a base: a format
/// qemu-img recognises, and no backing or external data file (which
/// would make QEMU open other host files). Returns the format.
pub fn check_image(path: &Path, source_name: &str) -> Result<String, ImageError> {
    let info = info(path, false).map_err(|e| ImageError::BadImage {
        source_name: source_name.to_string(),
        message: e.to_string(),
    })?;
    if let Some(b) = &info.backing_filename {
        return Err(ImageError::BadImage {
            source_name: source_name.to_string(),
            message: format!("it refers to a backing file ({b}); give a standalone image"),
        });
    }
    if info.has_data_file {
        return Err(ImageError::BadImage {
            source_name: source_name.to_string(),
            message: "it refers to an external data file; give a standalone image".into(),
        });
    }
    if !FORMATS.contains(&info.format.as_str()) {
        return Err(ImageError::BadImage {
            source_name: source_name.to_string(),
            message: format!(
                "unsupported format {} (qcow2 and raw only: other formats can name host files; convert it with qemu-img convert -O qcow2)",
                info.format
            ),
        });
    }
    Ok(info.format)
}

/// Copy `src` into `cache`, named by its SHA-256, atomically. Returns the
/// cached path (reused when the same content is already there).
pub fn cache_local(src: &Path, cache: &Path) -> Result<PathBuf, ImageError> {
    cache_local_checked(src, cache, None)
}

/// `Missing` for a file that is not there, else `other`'s error.
fn missing_or(
    e: std::io::Error,
    src: &Path,
    other: impl FnOnce(std::io::Error) -> ImageError,
) -> ImageError {
    match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::EISDIR) => ImageError::Missing {
            path: src.to_path_buf(),
        },
        _ => other(e),
    }
}

/// [`cache_local`], also checking `expected` when given.
pub fn cache_local_checked(
    src: &Path,
    cache: &Path,
    expected: Option<&Digest>,
) -> Result<PathBuf, ImageError> {
    if !src.is_file() {
        return Err(ImageError::Missing {
            path: src.to_path_buf(),
        });
    }
    let copy_err = |source| ImageError::Copy {
        path: src.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(cache).map_err(copy_err)?;
    let file_name = src
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    let tmp = cache.join(format!(
        ".{}.partial{}",
        cache::sanitize(&file_name),
        std::process::id()
    ));
    let result = (|| -> Result<PathBuf, ImageError> {
        let mut input = std::fs::File::open(src).map_err(|e| missing_or(e, src, copy_err))?;
        let mut out = std::fs::File::create(&tmp).map_err(copy_err)?;
        let mut naming = Algo::Sha256.hasher();
        let mut check = expected
            .filter(|d| d.algo != Algo::Sha256)
            .map(|d| d.algo.hasher());
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = input.read(&mut buf).map_err(copy_err)?;
            if n == 0 {
                break;
            }
            naming.update(&buf[..n]);
            if let Some(h) = check.as_mut() {
                h.update(&buf[..n]);
            }
            out.write_all(&buf[..n]).map_err(copy_err)?;
            size += n as u64;
        }
        out.sync_all().map_err(copy_err)?;
        let digest = naming.finish();
        if let Some(want) = expected {
            let got = match check {
                Some(h) => h.finish(),
                None => digest.clone(),
            };
            if got != *want {
                return Err(ImageError::Mismatch {
                    url: src.display().to_string(),
                    expected: want.clone(),
                    actual: got,
                    size,
                });
            }
        }
        let dest = cache.join(cache::cache_name(&file_name, &digest));
        if dest.exists() && cache::load_meta(&dest).is_some_and(|m| m.digest == digest) {
            std::fs::remove_file(&tmp).map_err(copy_err)?;
            return Ok(dest);
        }
        let format = check_image(&tmp, &src.display().to_string())?;
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(copy_err)?;
        std::fs::rename(&tmp, &dest).map_err(copy_err)?;
        let meta = cache::Meta {
            source: src.display().to_string(),
            alias: None,
            digest,
            size,
            added_at: crate::state::now(),
            format: Some(format),
        };
        cache::save_meta(&dest, &meta)
            .map_err(|e| copy_err(std::io::Error::other(e.to_string())))?;
        Ok(dest)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references() {
        assert_eq!(
            local_source("file:///srv/a.qcow2").ok(),
            Some("/srv/a.qcow2".into())
        );
        assert_eq!(
            local_source("/srv/a.qcow2").ok(),
            Some("/srv/a.qcow2".into())
        );
        assert!(matches!(
            resolve("debian-99", None),
            Err(ImageError::UnknownAlias { .. })
        ));
        assert!(matches!(
            resolve("ftp://x/y.qcow2", None),
            Err(ImageError::Unsupported(_))
        ));
        assert_eq!(
            resolve("https://x/y.qcow2", None).ok(),
            Some(Source::Remote {
                url: "https://x/y.qcow2".into(),
                alias: None,
                verify: Verify::Beside
            })
        );
        let list = Checksum::List("https://x/SUMS".into());
        assert!(matches!(
            resolve("https://x/y.qcow2", Some(&list)),
            Ok(Source::Remote { verify: Verify::List(l), .. }) if l == "https://x/SUMS"
        ));
        assert!(resolve("/srv/a.qcow2", Some(&list)).is_err());
    }

    #[test]
    fn aliases_resolve_to_their_list() {
        // Only checked when no mirror is configured in this environment.
        if alias::mirror_from_env().is_some() {
            return;
        }
        match resolve("debian-12", None) {
            Ok(Source::Remote { url, alias, verify }) => {
                assert!(url.ends_with("/bookworm/latest/debian-12-genericcloud-amd64.qcow2"));
                assert_eq!(alias.as_deref(), Some("debian-12"));
                assert_eq!(
                    verify,
                    Verify::List(
                        "https://cloud.debian.org/images/cloud/bookworm/latest/SHA512SUMS".into()
                    )
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_name_url_and_both_digests() {
        let expected = Digest {
            algo: Algo::Sha256,
            hex: "a".repeat(64),
        };
        let actual = Digest {
            algo: Algo::Sha256,
            hex: "b".repeat(64),
        };
        let e = ImageError::Mismatch {
            url: "http://h/x.img".into(),
            expected: expected.clone(),
            actual: actual.clone(),
            size: 3,
        };
        let s = e.to_string();
        assert!(
            s.contains("http://h/x.img") && s.contains(&expected.hex) && s.contains(&actual.hex)
        );
        assert_eq!(e.exit_code(), crate::exit::DATAERR);
        let e = ImageError::Download {
            url: "http://h/x.img".into(),
            message: "closed".into(),
            expected: expected.clone(),
            received: 10,
            actual: Some(actual.clone()),
        };
        let s = e.to_string();
        assert!(s.contains(&expected.hex) && s.contains(&actual.hex) && s.contains("10 bytes"));
        assert_eq!(e.exit_code(), crate::exit::UNAVAILABLE);
        let e = ImageError::Http {
            url: "http://h/x.img".into(),
            status: 404,
            expected: Some(expected),
        };
        assert!(e.to_string().contains("404"));
    }

    #[test]
    fn images_that_name_host_files_are_refused() {
        if crate::qemu::process::which("qemu-img").is_none() {
            eprintln!("SKIPPED: no qemu-img");
            return;
        }
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let img = |name: &str, args: &[&str]| {
            let p = dir.path().join(name);
            let ok = std::process::Command::new("qemu-img")
                .arg("create")
                .arg("-q")
                .args(args)
                .arg(&p)
                .arg("1M")
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "qemu-img create {name}");
            p
        };
        let base = img("base.qcow2", &["-f", "qcow2"]);
        assert_eq!(check_image(&base, "base").ok().as_deref(), Some("qcow2"));
        let vmdk = img("x.vmdk", &["-f", "vmdk"]);
        let backed = img(
            "backed.qcow2",
            &["-f", "qcow2", "-b", "/etc/hostname", "-F", "raw"],
        );
        for p in [&vmdk, &backed] {
            let e = check_image(p, "x")
                .err()
                .unwrap_or_else(|| panic!("{p:?} accepted"));
            assert_eq!(e.exit_code(), crate::exit::DATAERR, "{e}");
        }
        // A VM disk: an overlay on its base passes; its header rewritten
        // to name a host file does not, and neither does a non-qcow2 file.
        let disk = dir.path().join("disk.qcow2");
        create_overlay(&base, &disk, 1 << 20).unwrap_or_else(|e| panic!("{e}"));
        check_disk_chain(&disk, &[&base], false).unwrap_or_else(|e| panic!("{e}"));
        let other = dir.path().join("snapshot.qcow2");
        assert!(check_disk_chain(&disk, &[&other], false).is_err());
        let rebased = std::process::Command::new("qemu-img")
            .args([
                "rebase",
                "-u",
                "-f",
                "qcow2",
                "-F",
                "raw",
                "-b",
                "/etc/shadow",
            ])
            .arg(&disk)
            .status()
            .is_ok_and(|s| s.success());
        assert!(rebased);
        let e = check_disk_chain(&disk, &[&base], false)
            .err()
            .unwrap_or_else(|| panic!("a tampered chain passed"));
        assert!(e.to_string().contains("/etc/shadow"), "{e}");
        assert_eq!(e.exit_code(), crate::exit::DATAERR);
        assert!(check_disk_chain(&vmdk, &[&base], false).is_err());
    }

    #[test]
    fn local_copies_are_content_addressed_and_checked() {
        // Copies are checked with qemu-img; skip where it is not installed.
        if crate::qemu::process::which("qemu-img").is_none() {
            eprintln!("SKIPPED: no qemu-img");
            return;
        }
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let src = dir.path().join("base.img");
        std::fs::write(&src, b"one").unwrap_or_else(|e| panic!("{e}"));
        let cache = dir.path().join("cache");
        let a = cache_local(&src, &cache).unwrap_or_else(|e| panic!("{e}"));
        let b = cache_local(&src, &cache).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a, b);
        assert!(cache::load_meta(&a).is_some());
        std::fs::write(&src, b"two").unwrap_or_else(|e| panic!("{e}"));
        let c = cache_local(&src, &cache).unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(a, c);
        assert_eq!(std::fs::read(&a).unwrap_or_default(), b"one");
        // A wrong digest is refused and leaves nothing.
        let wrong = Digest {
            algo: Algo::Sha512,
            hex: "0".repeat(128),
        };
        std::fs::write(&src, b"three").unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            cache_local_checked(&src, &cache, Some(&wrong)),
            Err(ImageError::Mismatch { .. })
        ));
        let leftovers: Vec<_> = std::fs::read_dir(&cache)
            .unwrap_or_else(|e| panic!("{e}"))
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        assert!(matches!(
            cache_local(&dir.path().join("nope"), &cache),
            Err(ImageError::Missing { .. })
        ));
    }
}
