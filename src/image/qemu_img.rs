//! `qemu-img`: image facts, overlays, flattening, offline growth.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

use super::ImageError;

/// What `qemu-img info` says about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImgInfo {
    pub format: String,
    pub virtual_size: u64,
    pub backing_filename: Option<String>,
    pub has_data_file: bool,
}

#[derive(Debug, serde::Deserialize)]
struct RawInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
    #[serde(rename = "format-specific")]
    format_specific: Option<serde_json::Value>,
}

fn run(args: &[&OsStr], action: &str) -> Result<Vec<u8>, ImageError> {
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

/// Facts about `path`. `shared` reads an image a running QEMU has open
/// (`-U`).
pub fn info(path: &Path, shared: bool) -> Result<ImgInfo, ImageError> {
    let mut args: Vec<&OsStr> = vec!["info".as_ref(), "--output=json".as_ref()];
    if shared {
        args.push("-U".as_ref());
    }
    args.push(path.as_os_str());
    let out = run(&args, "info")?;
    let raw: RawInfo = serde_json::from_slice(&out).map_err(|e| ImageError::QemuImg {
        action: "info".into(),
        message: e.to_string(),
    })?;
    let has_data_file = raw
        .format_specific
        .as_ref()
        .and_then(|v| v.get("data"))
        .and_then(|d| d.get("data-file"))
        .is_some();
    Ok(ImgInfo {
        format: raw.format,
        virtual_size: raw.virtual_size,
        backing_filename: raw.backing_filename,
        has_data_file,
    })
}

/// Create `disk`, a qcow2 overlay on `base`, of `size` bytes (never
/// smaller than the base).
pub fn create_overlay(base: &Path, disk: &Path, size: u64) -> Result<(), ImageError> {
    let base_info = info(base, false)?;
    if size < base_info.virtual_size {
        return Err(ImageError::DiskTooSmall {
            disk: size,
            virtual_size: base_info.virtual_size,
        });
    }
    let size = size.to_string();
    run(
        &[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            base_info.format.as_ref(),
            "-b".as_ref(),
            base.as_os_str(),
            disk.as_os_str(),
            size.as_ref(),
        ],
        "create",
    )?;
    Ok(())
}

/// Write `disk` with its whole backing chain folded in to `out`, a
/// standalone qcow2 of the same virtual size.
pub fn convert_flat(disk: &Path, out: &Path) -> Result<(), ImageError> {
    run(
        &[
            "convert".as_ref(),
            "-q".as_ref(),
            "-O".as_ref(),
            "qcow2".as_ref(),
            disk.as_os_str(),
            out.as_os_str(),
        ],
        "convert",
    )?;
    Ok(())
}

/// Grow the (not running) image at `disk` to `size` bytes.
pub fn resize(disk: &Path, size: u64) -> Result<(), ImageError> {
    let size = size.to_string();
    run(
        &[
            "resize".as_ref(),
            "-q".as_ref(),
            disk.as_os_str(),
            size.as_ref(),
        ],
        "resize",
    )?;
    Ok(())
}
