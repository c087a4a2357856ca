//! Shared folders: size-capped, symlink-safe stores served by the embedded
//! virtiofsd.
//!
//! With isolation (the default) a share is a store the guest cannot
//! overfill or use against the host: its folder, served through [`guard`]
//! (the kernel mounts no ext4 image in a user namespace): a cap (`size`)
//! the guest cannot write past, no symlink that leads out of the share,
//! no device nodes, no set-id bits. Host programs never follow symlinks
//! out of the share or open device nodes the guest planted. Without
//! isolation the folder itself is served (set-id bits still stripped).

/// Methods of a file-system wrapper that go to the file system it wraps
/// (`self.fs`) unchanged.
macro_rules! pass_through {
    ($(fn $name:ident $(<$g:ident: $bound:path>)? (&self $(, $arg:ident: $ty:ty)* $(,)?) $(-> $ret:ty)?;)*) => {
        $(
            fn $name $(<$g: $bound>)? (&self $(, $arg: $ty)*) $(-> $ret)? {
                self.fs.$name($($arg),*)
            }
        )*
    };
}

pub mod direct_io;
pub mod guard;
pub mod seed;
pub mod virtiofsd;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{Config, Share};
use crate::exit;
use crate::state::VmPaths;

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("share {tag:?}: {why}")]
    Forbidden { tag: String, why: String },
    #[error(
        "share {tag:?}: {image} is an ext4 store made by a run as root, and only root can mount it. \
         Without root the share's folder is its store: copy the files out as yourself with \
         `debugfs -R 'rdump / {host}' {image}` (e2fsprogs), then move the image away (docs/shares.md)"
    )]
    ImageNeedsRoot {
        tag: String,
        image: PathBuf,
        host: PathBuf,
    },
    #[error(
        "share {tag:?}: its host folder moved: the VM was built with {recorded}, the Migrantfile now gives {current}; \
         move it back, or rebuild the VM with `migrant destroy` then `migrant up` (stores are kept)"
    )]
    Drift {
        tag: String,
        recorded: PathBuf,
        current: PathBuf,
    },
    #[error(
        "the shares changed since the VM was built ({what}); rebuild it with `migrant destroy` then `migrant up` (stores are kept)"
    )]
    Changed { what: String },
    /// The check while running failed.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("share {tag:?}: {dir} {why}")]
    Foreign {
        tag: String,
        dir: PathBuf,
        why: String,
    },
    #[error(transparent)]
    State(#[from] crate::state::StateError),
}

impl ShareError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ShareError::Forbidden { .. }
            | ShareError::Drift { .. }
            | ShareError::Changed { .. }
            | ShareError::Foreign { .. }
            | ShareError::ImageNeedsRoot { .. } => exit::CONFIG,
            ShareError::Io { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                exit::NOPERM
            }
            ShareError::Io { .. } => exit::SOFTWARE,
            ShareError::State(e) => e.exit_code(),
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ShareError {
    let what = what.into();
    move |source| ShareError::Io { what, source }
}

/// Where a run as root (before migrant ran without root) kept an isolated
/// share's ext4 store: `<host>.img` beside its folder.
pub fn image_path(host: &Path) -> PathBuf {
    let mut s = host.as_os_str().to_os_string();
    // A trailing slash cannot survive Path, but be explicit.
    while s.len() > 1 && s.to_string_lossy().ends_with('/') {
        let t = s.to_string_lossy().trim_end_matches('/').to_string();
        s = t.into();
    }
    s.push(".img");
    PathBuf::from(s)
}

/// The cap of an isolated share (its folder is its store), in bytes.
pub fn folder_cap(s: &Share) -> Option<u64> {
    s.isolation.then_some(s.size)
}

// ---------------------------------------------------------------------
// Path rules
// ---------------------------------------------------------------------

/// `path` made absolute and free of symlinks as far as it exists.
fn real(path: &Path) -> PathBuf {
    let mut existing = path;
    let mut rest = Vec::new();
    loop {
        if let Ok(r) = existing.canonicalize() {
            let mut out = r;
            out.extend(rest.iter().rev());
            return out;
        }
        match (existing.parent(), existing.file_name()) {
            (Some(p), Some(n)) => {
                rest.push(n);
                existing = p;
            }
            _ => return path.to_path_buf(),
        }
    }
}

/// Refuse an isolated share whose files are in an ext4 image from a run
/// as root (only root can mount it; nothing is created).
pub fn check_old_images(cfg: &Config) -> Result<(), ShareError> {
    let old = cfg
        .shares
        .iter()
        .filter(|s| folder_cap(s).is_some())
        .map(|s| (s, image_path(&s.host)))
        .find(|(_, img)| std::fs::symlink_metadata(img).is_ok());
    match old {
        Some((s, image)) => Err(ShareError::ImageNeedsRoot {
            tag: s.tag.clone(),
            image,
            host: s.host.clone(),
        }),
        None => Ok(()),
    }
}

/// The shares may not be the project folder, a parent of it, `hooks/`,
/// inside `hooks/`, or contain `hooks/` (hooks run on the host: a guest
/// able to write them would run code there).
pub fn check_paths(cfg: &Config) -> Result<(), ShareError> {
    let project = real(&cfg.dir);
    let hooks = real(&project.join("hooks"));
    for s in &cfg.shares {
        let host = real(&s.host);
        let why = if project.starts_with(&host) {
            Some(format!(
                "{} is the project folder or a parent of it; share a subfolder instead",
                s.host.display()
            ))
        } else if host.starts_with(&hooks) || hooks.starts_with(&host) {
            Some(format!(
                "{} is, contains or is inside the project's hooks/ folder ({}); hooks run on the host",
                s.host.display(),
                hooks.display()
            ))
        } else {
            None
        };
        if let Some(why) = why {
            return Err(ShareError::Forbidden {
                tag: s.tag.clone(),
                why,
            });
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------
// What the VM was built with
// ---------------------------------------------------------------------

/// A share as recorded when the VM was built (`shares.json` in the VM's
/// state folder).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecordedShare {
    pub tag: String,
    /// Absolute host folder.
    pub host: PathBuf,
    /// The cap, for isolated shares.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cap: Option<u64>,
    pub guest: Option<String>,
}

impl RecordedShare {
    pub fn of(s: &Share) -> RecordedShare {
        RecordedShare {
            tag: s.tag.clone(),
            host: s.host.clone(),
            cap: folder_cap(s),
            guest: s.guest.clone(),
        }
    }
}

/// The file holding a VM's recorded shares.
pub fn record_file(vm: &VmPaths) -> PathBuf {
    vm.state.join("shares.json")
}

pub fn load_recorded(vm: &VmPaths) -> Result<Option<Vec<RecordedShare>>, ShareError> {
    let path = record_file(vm);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| ShareError::Io {
                what: format!("corrupt {}", path.display()),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path.display().to_string())(e)),
    }
}

pub fn save_recorded(vm: &VmPaths, cfg: &Config) -> Result<(), ShareError> {
    let shares: Vec<RecordedShare> = cfg.shares.iter().map(RecordedShare::of).collect();
    let mut data = serde_json::to_vec_pretty(&shares).map_err(|e| ShareError::Io {
        what: "shares record".into(),
        source: std::io::Error::other(e),
    })?;
    data.push(b'\n');
    crate::state::write_private(&record_file(vm), &data)?;
    Ok(())
}

/// Compare the Migrantfile's shares with what the VM was built with.
pub fn check_drift(cfg: &Config, recorded: &[RecordedShare]) -> Result<(), ShareError> {
    for r in recorded {
        match cfg.shares.iter().find(|s| s.tag == r.tag) {
            Some(s) if s.host != r.host => {
                return Err(ShareError::Drift {
                    tag: r.tag.clone(),
                    recorded: r.host.clone(),
                    current: s.host.clone(),
                });
            }
            Some(s) if s.isolation != r.cap.is_some() => {
                return Err(ShareError::Changed {
                    what: format!("isolation of {:?} changed", r.tag),
                });
            }
            Some(s) if s.guest != r.guest => {
                return Err(ShareError::Changed {
                    what: format!("guest mount point of {:?} changed", r.tag),
                });
            }
            Some(_) => {}
            None => {
                return Err(ShareError::Changed {
                    what: format!("{:?} ({}) was removed", r.tag, r.host.display()),
                });
            }
        }
    }
    if let Some(s) = cfg
        .shares
        .iter()
        .find(|s| !recorded.iter().any(|r| r.tag == s.tag))
    {
        return Err(ShareError::Changed {
            what: format!("{:?} ({}) was added", s.tag, s.host.display()),
        });
    }
    Ok(())
}

/// Before `up` builds or boots the VM: the path rules, drift against the
/// record, and the stores: created when the VM is being built, required
/// afterwards. Nothing is deleted, whatever fails.
pub fn prepare_for_up(cfg: &Config, vm: &VmPaths, building: bool) -> Result<(), ShareError> {
    check_paths(cfg)?;
    if !building && let Some(rec) = load_recorded(vm)? {
        check_drift(cfg, &rec)?;
    }
    for s in &cfg.shares {
        ensure_folder(s)?;
    }
    Ok(())
}

/// Create the share folder if missing; refuse a symlink in its place, or
/// a folder of someone else's.
fn ensure_folder(s: &Share) -> Result<(), ShareError> {
    let dir = &s.host;
    match std::fs::symlink_metadata(dir) {
        Ok(m) => ours(s, &m).map(|_| ()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))
        }
        Err(e) => Err(io(dir.display().to_string())(e)),
    }
}

/// The share's folder, as `meta` describes it, must be a folder of the
/// user running migrant (inside the VM's user namespace: of its root):
/// the guest's files there are that user's, and a share is no way to
/// write into someone else's folder. Its owner (uid, gid).
fn ours(s: &Share, meta: &std::fs::Metadata) -> Result<(u32, u32), ShareError> {
    let why = if !meta.is_dir() {
        "is not a folder (a symlink or a file)".to_string()
    } else if meta.uid() != nix::unistd::geteuid().as_raw() {
        format!(
            "belongs to uid {}: a share is a folder of the user running migrant",
            meta.uid()
        )
    } else {
        return Ok((meta.uid(), meta.gid()));
    };
    Err(ShareError::Foreign {
        tag: s.tag.clone(),
        dir: s.host.clone(),
        why,
    })
}

/// A share the supervisor serves.
#[derive(Debug, Clone)]
pub struct Served {
    pub tag: String,
    /// The folder virtiofsd serves.
    pub dir: PathBuf,
    /// The folder's owner (uid, gid), to whom every file the guest makes
    /// there belongs.
    pub owner: (u32, u32),
    /// The guest's login user (uid, gid), whom the guest sees owning the
    /// owner's files.
    pub guest_owner: (u32, u32),
    /// With isolation: the cap in bytes.
    pub cap: Option<u64>,
}

/// Supervisor, before QEMU starts: re-check the rules and the record;
/// what each share serves.
pub fn served_by_vm(cfg: &Config, vm: &VmPaths) -> Result<Vec<Served>, ShareError> {
    check_paths(cfg)?;
    if let Some(rec) = load_recorded(vm)? {
        check_drift(cfg, &rec)?;
    }
    cfg.shares
        .iter()
        .map(|s| {
            let meta = std::fs::symlink_metadata(&s.host).map_err(io(format!(
                "share {:?}: {}",
                s.tag,
                s.host.display()
            )))?;
            Ok(Served {
                tag: s.tag.clone(),
                dir: s.host.clone(),
                owner: ours(s, &meta)?,
                guest_owner: cfg.ssh.ids,
                cap: folder_cap(s),
            })
        })
        .collect()
}

// ---------------------------------------------------------------------
// Status
// ---------------------------------------------------------------------

/// One share, as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ShareView {
    pub tag: String,
    pub host: String,
    pub guest: Option<String>,
    pub isolation: bool,
    /// Bytes in use, as the guard charges them (isolated shares).
    pub used: Option<u64>,
    /// The cap in bytes (isolated shares).
    pub cap: Option<u64>,
}

pub fn views(cfg: &Config) -> Vec<ShareView> {
    cfg.shares
        .iter()
        .map(|s| ShareView {
            tag: s.tag.clone(),
            host: s.host.display().to_string(),
            guest: s.guest.clone(),
            isolation: s.isolation,
            used: folder_cap(s).and_then(|_| guard::measure(&s.host).ok()),
            cap: folder_cap(s),
        })
        .collect()
}

#[cfg(test)]
mod tests;
