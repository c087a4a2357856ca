//! Firmware: SeaBIOS (QEMU's default) or UEFI (OVMF).
//!
//! OVMF is found, in this order, through
//!
//! 1. QEMU's firmware descriptors (the interop JSON files in
//!    `/etc/qemu/firmware` and `/usr/share/qemu/firmware`; a file in
//!    `/etc` hides the one of the same name in `/usr/share`, an empty one
//!    disables it; read in file-name order, as QEMU does);
//! 2. the usual distribution paths (Debian, Fedora, Arch);
//! 3. a copy of the `ovmf-prebuilt` crate's release in
//!    `$MIGRANT_HOME/firmware/ovmf-prebuilt`, fetched by `migrant up` the
//!    first time a UEFI VM needs it on a host that has none (no Secure
//!    Boot build there).
//!
//! Secure Boot is off unless the Migrantfile asks (`secure_boot = true`);
//! then only a descriptor with `secure-boot` and `enrolled-keys` is used,
//! and QEMU runs with SMM. Each VM gets its own copy of the variable store
//! (`nvram.fd` in its state folder, deleted with the VM).

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
    #[error(
        "secure_boot = true but no Secure Boot OVMF with enrolled keys was found (install the ovmf package); looked in {0}"
    )]
    NoSecureOvmf(String),
    #[error(
        "no OVMF on this host, and fetching the ovmf-prebuilt release into {dir} failed: {message}"
    )]
    Prebuilt { dir: PathBuf, message: String },
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
            FirmwareError::NoOvmf(_)
            | FirmwareError::NoSecureOvmf(_)
            | FirmwareError::Prebuilt { .. } => crate::exit::UNAVAILABLE,
            FirmwareError::Vars { .. } => crate::exit::SOFTWARE,
        }
    }
}

const DESCRIPTOR_DIRS: &[&str] = &["/etc/qemu/firmware", "/usr/share/qemu/firmware"];

/// Distribution paths of OVMF (code, variable template), in order.
const OVMF_PATHS: &str = include_str!("../firmware/ovmf-paths");

/// The descriptor written beside the `ovmf-prebuilt` release (`@DIR@`:
/// its folder).
const PREBUILT_DESCRIPTOR: &str = include_str!("../firmware/ovmf-prebuilt.json");

/// Its file name there.
const PREBUILT_DESCRIPTOR_FILE: &str = "migrant.json";

fn fallbacks() -> impl Iterator<Item = (PathBuf, PathBuf)> {
    OVMF_PATHS
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((PathBuf::from(w.next()?), PathBuf::from(w.next()?)))
        })
}

/// SeaBIOS as QEMU ships it (for `doctor`).
const SEABIOS: &[&str] = &[
    "/usr/share/seabios/bios-256k.bin",
    "/usr/share/qemu/bios-256k.bin",
    "/usr/share/qemu/bios.bin",
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
    #[serde(default)]
    mode: Option<String>,
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

/// OVMF code and the template of its variable store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ovmf {
    pub code: PathBuf,
    pub vars: PathBuf,
    pub secure_boot: bool,
    /// Where it was found (a descriptor file, "distribution path",
    /// "ovmf-prebuilt").
    pub origin: String,
}

/// An x86_64 q35 OVMF in split flash mode (code + variable template),
/// raw format. `secure`: with Secure Boot and enrolled keys (needs SMM);
/// otherwise without Secure Boot and without SMM.
fn usable(d: &Descriptor, secure: bool) -> Option<(PathBuf, PathBuf)> {
    if !d.interface_types.iter().any(|t| t == "uefi") || d.mapping.device != "flash" {
        return None;
    }
    if d.mapping.mode.as_deref().is_some_and(|m| m != "split") {
        return None;
    }
    let has = |f: &str| d.features.iter().any(|x| x == f);
    // Confidential-computing builds boot nothing else.
    if has("amd-sev-es") || has("amd-sev-snp") || has("intel-tdx") {
        return None;
    }
    if secure != (has("secure-boot") && has("enrolled-keys")) {
        return None;
    }
    if !secure && (has("secure-boot") || has("requires-smm")) {
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

/// Descriptor files in the order QEMU reads them: by file name, a file in
/// an earlier folder hiding one of the same name in a later folder.
fn descriptor_files(dirs: &[&Path]) -> Vec<PathBuf> {
    let mut by_name: std::collections::BTreeMap<std::ffi::OsString, PathBuf> =
        std::collections::BTreeMap::new();
    for dir in dirs {
        let Ok(rd) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "json") {
                by_name.entry(e.file_name()).or_insert(p);
            }
        }
    }
    by_name.into_values().collect()
}

fn from_descriptors(dirs: &[&Path], secure: bool) -> Option<Ovmf> {
    for f in descriptor_files(dirs) {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        if text.trim().is_empty() {
            continue; // an empty file masks the descriptor
        }
        if let Ok(d) = serde_json::from_str::<Descriptor>(&text)
            && let Some((code, vars)) = usable(&d, secure)
        {
            return Some(Ovmf {
                code,
                vars,
                secure_boot: secure,
                origin: f.display().to_string(),
            });
        }
    }
    None
}

/// Where the `ovmf-prebuilt` release is kept.
pub fn prebuilt_dir(home: &Path) -> PathBuf {
    home.join("firmware").join("ovmf-prebuilt")
}

/// The release's descriptor text for its folder `dir`.
fn prebuilt_descriptor(dir: &Path) -> String {
    let quoted = serde_json::to_string(&dir.to_string_lossy()).unwrap_or_default();
    let escaped = quoted.trim_start_matches('"').trim_end_matches('"');
    PREBUILT_DESCRIPTOR.replace("@DIR@", escaped)
}

/// The fetched release, through the descriptor written beside it (made
/// here for a copy fetched before descriptors were written).
fn from_prebuilt(home: &Path) -> Option<Ovmf> {
    let dir = prebuilt_dir(home);
    let descriptor = dir.join(PREBUILT_DESCRIPTOR_FILE);
    if !descriptor.is_file() && dir.join("x64").is_dir() {
        let _ =
            crate::state::write_atomic(&descriptor, prebuilt_descriptor(&dir).as_bytes(), 0o644);
    }
    from_descriptors(&[&dir], false).map(|o| Ovmf {
        origin: "ovmf-prebuilt".into(),
        ..o
    })
}

/// Find OVMF on this host (see the module documentation); `home` is
/// `$MIGRANT_HOME`, for the prebuilt copy.
pub fn find(secure: bool, home: &Path) -> Option<Ovmf> {
    let dirs: Vec<&Path> = DESCRIPTOR_DIRS.iter().map(Path::new).collect();
    if let Some(found) = from_descriptors(&dirs, secure) {
        return Some(found);
    }
    if secure {
        return None;
    }
    fallbacks()
        .find(|(c, v)| c.is_file() && v.is_file())
        .map(|(code, vars)| Ovmf {
            code,
            vars,
            secure_boot: false,
            origin: "distribution path".into(),
        })
        .or_else(|| from_prebuilt(home))
}

/// SeaBIOS, if QEMU's copy is where distributions put it.
pub fn find_seabios() -> Option<PathBuf> {
    SEABIOS.iter().map(PathBuf::from).find(|p| p.is_file())
}

fn looked() -> String {
    DESCRIPTOR_DIRS.join(", ") + " and the usual OVMF paths"
}

/// Make sure OVMF is there for a VM that needs it: on a host without any,
/// fetch the `ovmf-prebuilt` release (once) into `$MIGRANT_HOME`. Called
/// by `up` before the supervisor starts.
pub fn ensure(want: Firmware, secure: bool, home: &Path) -> Result<Option<Ovmf>, FirmwareError> {
    if want == Firmware::Bios {
        return Ok(None);
    }
    if let Some(found) = find(secure, home) {
        return Ok(Some(found));
    }
    if secure {
        return Err(FirmwareError::NoSecureOvmf(looked()));
    }
    let dir = prebuilt_dir(home);
    println!(
        "==> no OVMF on this host; fetching the ovmf-prebuilt release {} into {}",
        ovmf_prebuilt::Source::LATEST.tag,
        dir.display()
    );
    let prebuilt =
        ovmf_prebuilt::Prebuilt::fetch(ovmf_prebuilt::Source::LATEST, &dir).map_err(|e| {
            FirmwareError::Prebuilt {
                dir: dir.clone(),
                message: e.to_string(),
            }
        })?;
    let code = prebuilt.get_file(ovmf_prebuilt::Arch::X64, ovmf_prebuilt::FileType::Code);
    let vars = prebuilt.get_file(ovmf_prebuilt::Arch::X64, ovmf_prebuilt::FileType::Vars);
    if !(code.is_file() && vars.is_file()) {
        return Err(FirmwareError::Prebuilt {
            dir,
            message: "the release has no x64 code.fd and vars.fd".into(),
        });
    }
    Ok(from_prebuilt(home))
}

/// Resolve the firmware for a VM; for UEFI, the VM's variable store at
/// `nvram` is created from the template on first use.
pub fn resolve(want: Firmware, secure: bool, nvram: &Path) -> Result<FirmwareFiles, FirmwareError> {
    match want {
        Firmware::Bios => Ok(FirmwareFiles::Bios),
        Firmware::Uefi => {
            let home = crate::state::Paths::from_env().home;
            let ovmf = find(secure, &home).ok_or_else(|| {
                if secure {
                    FirmwareError::NoSecureOvmf(looked())
                } else {
                    FirmwareError::NoOvmf(looked())
                }
            })?;
            if !nvram.exists() {
                std::fs::copy(&ovmf.vars, nvram).map_err(|source| FirmwareError::Vars {
                    path: nvram.to_path_buf(),
                    source,
                })?;
            }
            Ok(FirmwareFiles::Uefi {
                code: ovmf.code,
                vars: nvram.to_path_buf(),
                secure_boot: ovmf.secure_boot,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn descriptor(features: &str, code: &str, machines: &str) -> Descriptor {
        serde_json::from_str(&format!(
            r#"{{"interface-types":["uefi"],"mapping":{{"device":"flash",
            "executable":{{"filename":"{code}","format":"raw"}},
            "nvram-template":{{"filename":"/bin/ls","format":"raw"}}}},
            "targets":[{{"architecture":"x86_64","machines":[{machines}]}}],
            "features":[{features}]}}"#
        ))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn secure_boot_descriptors_only_when_asked() {
        let d = descriptor(
            r#""secure-boot","enrolled-keys","requires-smm""#,
            "/bin/sh",
            r#""pc-q35-*""#,
        );
        assert!(usable(&d, false).is_none());
        assert_eq!(usable(&d, true), Some(("/bin/sh".into(), "/bin/ls".into())));
        // Secure Boot without keys is no use for distribution images.
        let d = descriptor(
            r#""secure-boot","requires-smm""#,
            "/bin/sh",
            r#""pc-q35-*""#,
        );
        assert!(usable(&d, true).is_none());
    }

    #[test]
    fn plain_q35_descriptor_is_used() {
        // Debian's plain descriptor lists amd-sev: it still boots anything.
        let d = descriptor(
            r#""acpi-s3","amd-sev","verbose-dynamic""#,
            "/bin/sh",
            r#""pc-i440fx-*","pc-q35-*""#,
        );
        assert_eq!(
            usable(&d, false),
            Some(("/bin/sh".into(), "/bin/ls".into()))
        );
        assert!(usable(&d, true).is_none());
        let d = descriptor(r#""amd-sev-es""#, "/bin/sh", r#""pc-q35-*""#);
        assert!(usable(&d, false).is_none());
        let d = descriptor("", "/bin/sh", r#""pc-i440fx-*""#);
        assert!(usable(&d, false).is_none());
        let d = descriptor("", "/nonexistent/code.fd", r#""pc-q35-*""#);
        assert!(usable(&d, false).is_none());
    }

    #[test]
    fn etc_hides_usr_share_and_order_is_by_name() {
        let root = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let etc = root.path().join("etc");
        let usr = root.path().join("usr");
        for d in [&etc, &usr] {
            std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("{e}"));
        }
        let plain = |code: &str| {
            format!(
                r#"{{"interface-types":["uefi"],"mapping":{{"device":"flash",
                "executable":{{"filename":"{code}"}},"nvram-template":{{"filename":"/bin/ls"}}}},
                "targets":[{{"architecture":"x86_64","machines":["pc-q35-8.0"]}}],"features":[]}}"#
            )
        };
        let write = |p: PathBuf, s: &str| std::fs::write(p, s).unwrap_or_else(|e| panic!("{e}"));
        write(usr.join("50-a.json"), &plain("/bin/sh"));
        write(usr.join("60-b.json"), &plain("/bin/cat"));
        let dirs = [etc.as_path(), usr.as_path()];
        let found = from_descriptors(&dirs, false).map(|o| o.code);
        assert_eq!(found, Some(PathBuf::from("/bin/sh")));
        // An empty file in /etc masks 50-a.json.
        write(etc.join("50-a.json"), "");
        let found = from_descriptors(&dirs, false).map(|o| o.code);
        assert_eq!(found, Some(PathBuf::from("/bin/cat")));
    }

    #[test]
    fn prebuilt_copy_is_found_in_home() {
        let home = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        assert!(from_prebuilt(home.path()).is_none());
        let x64 = prebuilt_dir(home.path()).join("x64");
        std::fs::create_dir_all(&x64).unwrap_or_else(|e| panic!("{e}"));
        for f in ["code.fd", "vars.fd"] {
            std::fs::write(x64.join(f), b"x").unwrap_or_else(|e| panic!("{e}"));
        }
        let o = from_prebuilt(home.path()).unwrap_or_else(|| panic!("not found"));
        assert_eq!(o.origin, "ovmf-prebuilt");
        assert!(!o.secure_boot);
        assert_eq!(o.code, x64.join("code.fd"));
        assert_eq!(o.vars, x64.join("vars.fd"));
        // Found through the descriptor written beside the release.
        assert!(
            prebuilt_dir(home.path())
                .join(PREBUILT_DESCRIPTOR_FILE)
                .is_file()
        );
    }

    #[test]
    fn prebuilt_descriptor_escapes_its_folder() {
        let text = prebuilt_descriptor(Path::new("/home/a \"b\"/fw"));
        let d: Descriptor = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(
            d.mapping.executable.map(|f| f.filename),
            Some(PathBuf::from("/home/a \"b\"/fw/x64/code.fd"))
        );
    }

    #[test]
    fn distribution_paths_are_pairs() {
        let all: Vec<_> = fallbacks().collect();
        assert_eq!(all.len(), 4);
        assert!(all.iter().all(|(c, v)| c.is_absolute() && v.is_absolute()));
        assert_eq!(all[0].0, PathBuf::from("/usr/share/OVMF/OVMF_CODE_4M.fd"));
    }
}
