//! Base images: resolving the Migrantfile's `image`, caching, overlays.
//!
//! This stage handles local paths and `file://` URLs: the file is copied
//! into the cache under a name derived from its content, so a rebuilt
//! source never changes the base of an existing VM's overlay.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "image {0}: downloads and aliases are not supported yet; give a local path or a file:// URL"
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
    #[error("qemu-img {action} failed: {message}")]
    QemuImg { action: String, message: String },
    #[error("disk = {disk} bytes is smaller than the image's virtual size ({virtual_size} bytes)")]
    DiskTooSmall { disk: u64, virtual_size: u64 },
}

impl ImageError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ImageError::Unsupported(_) | ImageError::DiskTooSmall { .. } => crate::exit::CONFIG,
            ImageError::Missing { .. } => crate::exit::CONFIG,
            ImageError::Copy { .. } => crate::exit::SOFTWARE,
            ImageError::QemuImg { .. } => crate::exit::SOFTWARE,
        }
    }
}

/// A local source file for `image`, if it names one.
pub fn local_source(image: &str) -> Result<PathBuf, ImageError> {
    if let Some(rest) = image.strip_prefix("file://") {
        return Ok(PathBuf::from(rest));
    }
    if image.contains("://") || !image.starts_with('/') {
        return Err(ImageError::Unsupported(image.to_string()));
    }
    Ok(PathBuf::from(image))
}

/// Copy `src` into `cache`, named by its SHA-256, atomically. Returns the
/// cached path (reused when the same content is already there).
pub fn cache_local(src: &Path, cache: &Path) -> Result<PathBuf, ImageError> {
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
    let stem = src
        .file_stem()
        .map(|s| {
            s.to_string_lossy().replace(
                |c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_' && c != '.',
                "_",
            )
        })
        .unwrap_or_else(|| "image".into());
    let tmp = cache.join(format!(".{stem}.partial{}", std::process::id()));
    let result = (|| -> std::io::Result<PathBuf> {
        let mut input = std::fs::File::open(src)?;
        let mut out = std::fs::File::create(&tmp)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = input.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])?;
        }
        out.sync_all()?;
        let digest = hex::encode(hasher.finalize());
        let dest = cache.join(format!("{stem}-{}.img", &digest[..16]));
        if dest.exists() {
            std::fs::remove_file(&tmp)?;
        } else {
            std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
            std::fs::rename(&tmp, &dest)?;
        }
        Ok(dest)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(copy_err)
}

#[derive(Debug, serde::Deserialize)]
struct ImgInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
}

fn qemu_img(args: &[&std::ffi::OsStr], action: &str) -> Result<Vec<u8>, ImageError> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(|e| ImageError::QemuImg {
            action: action.into(),
            message: format!("cannot run qemu-img: {e}"),
        })?;
    if !out.status.success() {
        return Err(ImageError::QemuImg {
            action: action.into(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

/// Create `disk`, a qcow2 overlay on `base`, of `size` bytes (never
/// smaller than the base).
pub fn create_overlay(base: &Path, disk: &Path, size: u64) -> Result<(), ImageError> {
    let info = qemu_img(
        &["info".as_ref(), "--output=json".as_ref(), base.as_os_str()],
        "info",
    )?;
    let info: ImgInfo = serde_json::from_slice(&info).map_err(|e| ImageError::QemuImg {
        action: "info".into(),
        message: e.to_string(),
    })?;
    if size < info.virtual_size {
        return Err(ImageError::DiskTooSmall {
            disk: size,
            virtual_size: info.virtual_size,
        });
    }
    let size = size.to_string();
    qemu_img(
        &[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            info.format.as_ref(),
            "-b".as_ref(),
            base.as_os_str(),
            disk.as_os_str(),
            size.as_ref(),
        ],
        "create",
    )?;
    Ok(())
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
            local_source("debian-12"),
            Err(ImageError::Unsupported(_))
        ));
        assert!(matches!(
            local_source("https://x/y.qcow2"),
            Err(ImageError::Unsupported(_))
        ));
    }

    #[test]
    fn cache_is_content_addressed() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let src = dir.path().join("base.qcow2");
        std::fs::write(&src, b"one").unwrap_or_else(|e| panic!("{e}"));
        let cache = dir.path().join("cache");
        let a = cache_local(&src, &cache).unwrap_or_else(|e| panic!("{e}"));
        let b = cache_local(&src, &cache).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a, b);
        std::fs::write(&src, b"two").unwrap_or_else(|e| panic!("{e}"));
        let c = cache_local(&src, &cache).unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(a, c);
        assert_eq!(std::fs::read(&a).unwrap_or_default(), b"one");
        let leftovers: Vec<_> = std::fs::read_dir(&cache)
            .unwrap_or_else(|e| panic!("{e}"))
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("partial"))
            .collect();
        assert!(leftovers.is_empty());
        assert!(matches!(
            cache_local(&dir.path().join("nope"), &cache),
            Err(ImageError::Missing { .. })
        ));
    }
}
