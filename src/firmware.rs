//! Firmware: SeaBIOS (QEMU's default) or UEFI (OVMF).
//!
//! OVMF is found through QEMU's firmware descriptors
//! (`/usr/share/qemu/firmware/*.json`, the interop format), then the usual
//! distribution paths. Each VM gets its own copy of the variable store.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::Firmware;
use crate::qemu::FirmwareFiles;

#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error(
        "firmware = \"uefi\" but no OVMF firmware was found (install the ovmf package); looked in {0}"
    )]
    NoOvmf(String),
    #[error("cannot create the UEFI variable store {path}")]
    Vars {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl FirmwareError {
    pub fn exit_code(&self) -> u8 {
        match self {
            FirmwareError::NoOvmf(_) => crate::exit::UNAVAILABLE,
            FirmwareError::Vars { .. } => crate::exit::SOFTWARE,
        }
    }
}

const DESCRIPTOR_DIRS: &[&str] = &["/etc/qemu/firmware", "/usr/share/qemu/firmware"];

const FALLBACKS: &[(&str, &str)] = &[
    (
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.fd",
    ),
    (
        "/usr/share/OVMF/OVMF_CODE.fd",
        "/usr/share/OVMF/OVMF_VARS.fd",
    ),
    (
        "/usr/share/edk2/ovmf/OVMF_CODE.fd",
        "/usr/share/edk2/ovmf/OVMF_VARS.fd",
    ),
    (
        "/usr/share/edk2/x64/OVMF_CODE.4m.fd",
        "/usr/share/edk2/x64/OVMF_VARS.4m.fd",
    ),
];

#[derive(Debug, Deserialize)]
struct Descriptor {
    #[serde(rename = "interface-types", default)]
    interface_types: Vec<String>,
    mapping: Mapping,
    #[serde(default)]
    targets: Vec<Target>,
    #[serde(default)]
    features: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Mapping {
    #[serde(default)]
    device: String,
    #[serde(rename = "executable")]
    executable: Option<FileRef>,
    #[serde(rename = "nvram-template")]
    nvram_template: Option<FileRef>,
    #[serde(default)]
    format: Option<String>,
}

#[derive(Debug, Deserialize)]
struct FileRef {
    filename: PathBuf,
    #[serde(default)]
    format: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Target {
    architecture: String,
    #[serde(default)]
    machines: Vec<String>,
}

/// A plain (no Secure Boot) x86_64 q35 OVMF with a separate variable store.
fn usable(d: &Descriptor) -> Option<(PathBuf, PathBuf)> {
    if !d.interface_types.iter().any(|t| t == "uefi") || d.mapping.device != "flash" {
        return None;
    }
    if d.features
        .iter()
        .any(|f| f == "secure-boot" || f == "enrolled-keys" || f == "amd-sev")
    {
        return None;
    }
    let q35 = d
        .targets
        .iter()
        .any(|t| t.architecture == "x86_64" && t.machines.iter().any(|m| m.starts_with("pc-q35")));
    let raw = |f: &FileRef| {
        f.format
            .as_deref()
            .or(d.mapping.format.as_deref())
            .unwrap_or("raw")
            == "raw"
    };
    let exe = d.mapping.executable.as_ref().filter(|f| raw(f))?;
    let vars = d.mapping.nvram_template.as_ref().filter(|f| raw(f))?;
    (q35 && exe.filename.is_file() && vars.filename.is_file())
        .then(|| (exe.filename.clone(), vars.filename.clone()))
}

/// Find OVMF: descriptors first (sorted by file name, as QEMU does), then
/// the usual paths.
pub fn find_ovmf() -> Option<(PathBuf, PathBuf)> {
    let mut files: Vec<PathBuf> = DESCRIPTOR_DIRS
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort_by_key(|p| p.file_name().map(|n| n.to_os_string()));
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        if let Ok(d) = serde_json::from_str::<Descriptor>(&text)
            && let Some(found) = usable(&d)
        {
            return Some(found);
        }
    }
    FALLBACKS
        .iter()
        .map(|(c, v)| (PathBuf::from(c), PathBuf::from(v)))
        .find(|(c, v)| c.is_file() && v.is_file())
}

/// Resolve the firmware for a VM; for UEFI, the VM's variable store at
/// `nvram` is created from the template on first use.
pub fn resolve(want: Firmware, nvram: &Path) -> Result<FirmwareFiles, FirmwareError> {
    match want {
        Firmware::Bios => Ok(FirmwareFiles::Bios),
        Firmware::Uefi => {
            let (code, template) = find_ovmf().ok_or_else(|| {
                FirmwareError::NoOvmf(DESCRIPTOR_DIRS.join(", ") + " and the usual OVMF paths")
            })?;
            if !nvram.exists() {
                std::fs::copy(&template, nvram).map_err(|source| FirmwareError::Vars {
                    path: nvram.to_path_buf(),
                    source,
                })?;
            }
            Ok(FirmwareFiles::Uefi {
                code,
                vars: nvram.to_path_buf(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secure_boot_descriptors_are_skipped() {
        let d: Descriptor = serde_json::from_str(
            r#"{"interface-types":["uefi"],"mapping":{"device":"flash",
            "executable":{"filename":"/bin/sh","format":"raw"},
            "nvram-template":{"filename":"/bin/sh","format":"raw"}},
            "targets":[{"architecture":"x86_64","machines":["pc-q35-*"]}],
            "features":["secure-boot","requires-smm"]}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(usable(&d).is_none());
    }

    #[test]
    fn plain_q35_descriptor_is_used() {
        let d: Descriptor = serde_json::from_str(
            r#"{"interface-types":["uefi"],"mapping":{"device":"flash",
            "executable":{"filename":"/bin/sh","format":"raw"},
            "nvram-template":{"filename":"/bin/ls","format":"raw"}},
            "targets":[{"architecture":"x86_64","machines":["pc-q35-*"]}],
            "features":["acpi-s3"]}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(usable(&d), Some(("/bin/sh".into(), "/bin/ls".into())));
    }
}
