//! `qemu-img`: image facts, overlays, flattening, offline growth.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

use super::ImageError;

/// The image formats migrant accepts. Others (vmdk, vhdx, vpc, qed, …)
/// can name further host files from inside the image, which a root
/// `qemu-img` would then open.
pub const FORMATS: [&str; 2] = ["qcow2", "raw"];

/// What `qemu-img info` says about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImgInfo {
    pub format: String,
    pub virtual_size: u64,
    pub backing_filename: Option<String>,
    pub backing_format: Option<String>,
    pub has_data_file: bool,
}

#[derive(Debug, serde::Deserialize)]
struct RawInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
    #[serde(rename = "backing-filename-format")]
    backing_format: Option<String>,
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

/// Facts about `path`, its format probed: only for an image the user
/// gives (checked by `check_image` before use). `shared` reads an image a
/// running QEMU has open (`-U`).
pub fn info(path: &Path, shared: bool) -> Result<ImgInfo, ImageError> {
    info_as(path, None, shared)
}

/// Facts about `path`, read as `format` when given: every file migrant
/// made (VM disks, snapshots) is read with its format named, never
/// probed from bytes QEMU wrote. qemu-img info does not open backing
/// files.
pub fn info_as(path: &Path, format: Option<&str>, shared: bool) -> Result<ImgInfo, ImageError> {
    let mut args: Vec<&OsStr> = vec!["info".as_ref(), "--output=json".as_ref()];
    if shared {
        args.push("-U".as_ref());
    }
    if let Some(f) = format {
        args.push("-f".as_ref());
        args.push(f.as_ref());
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
        backing_format: raw.backing_format,
        has_data_file,
    })
}

/// Create `disk`, a qcow2 overlay on `base`, of `size` bytes (never
/// smaller than the base).
pub fn create_overlay(base: &Path, disk: &Path, size: u64) -> Result<(), ImageError> {
    // The base is root's (the checked cache, or a snapshot root wrote):
    // standalone, in a format that names no other file.
    let base_info = info(base, false)?;
    if base_info.backing_filename.is_some()
        || base_info.has_data_file
        || !FORMATS.contains(&base_info.format.as_str())
    {
        return Err(ImageError::Tampered {
            path: base.to_path_buf(),
            message: format!(
                "a base image must be a standalone qcow2 or raw image (it is {})",
                base_info.format
            ),
        });
    }
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

/// Check that the VM disk at `disk` is the qcow2 overlay migrant made:
/// no external data file, and a backing file (if any) that is one of
/// `backings`, read as qcow2 or raw. QEMU writes this file and may be
/// compromised: a header rewritten to name `/etc/shadow` would make root's
/// `qemu-img convert` fold that file into a snapshot the guest then reads.
/// Returns the disk's virtual size.
pub fn check_disk_chain(disk: &Path, backings: &[&Path], shared: bool) -> Result<u64, ImageError> {
    let tampered = |message: String| ImageError::Tampered {
        path: disk.to_path_buf(),
        message,
    };
    let info = info_as(disk, Some("qcow2"), shared)
        .map_err(|e| tampered(format!("not a readable qcow2 image ({e})")))?;
    if info.has_data_file {
        return Err(tampered("it names an external data file".into()));
    }
    let Some(backing) = &info.backing_filename else {
        return Ok(info.virtual_size);
    };
    if !backings
        .iter()
        .any(|b| b.as_os_str() == OsStr::new(backing))
    {
        return Err(tampered(format!(
            "its backing file is {backing:?}, not the VM's base image or snapshot"
        )));
    }
    match info.backing_format.as_deref() {
        Some(f) if FORMATS.contains(&f) => Ok(info.virtual_size),
        other => Err(tampered(format!(
            "its backing file's format is {other:?}, not qcow2 or raw"
        ))),
    }
}

/// Write `disk` (a qcow2 whose chain [`check_disk_chain`] accepted) with
/// its whole backing chain folded in to `out`, a standalone qcow2 of the
/// same virtual size.
pub fn convert_flat(disk: &Path, out: &Path) -> Result<(), ImageError> {
    convert(disk, out, false)
}

/// [`convert_flat`] of a disk a paused QEMU still has open (`-U`): only
/// while that guest cannot write (a memory snapshot in progress).
pub fn convert_flat_shared(disk: &Path, out: &Path) -> Result<(), ImageError> {
    convert(disk, out, true)
}

fn convert(disk: &Path, out: &Path, shared: bool) -> Result<(), ImageError> {
    let mut args: Vec<&OsStr> = vec!["convert".as_ref(), "-q".as_ref()];
    if shared {
        args.push("-U".as_ref());
    }
    args.extend([
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-O".as_ref(),
        "qcow2".as_ref(),
        disk.as_os_str(),
        out.as_os_str(),
    ]);
    run(&args, "convert")?;
    Ok(())
}

/// Grow the (not running) qcow2 image at `disk` to `size` bytes.
pub fn resize(disk: &Path, size: u64) -> Result<(), ImageError> {
    let size = size.to_string();
    run(
        &[
            "resize".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            disk.as_os_str(),
            size.as_ref(),
        ],
        "resize",
    )?;
    Ok(())
}
