//! Shared folders: size-capped, symlink-safe stores served by the embedded
//! virtiofsd.
//!
//! With isolation (the default) a share is a store the guest cannot
//! overfill or use against the host. Run as root, the store is a sparse
//! ext4 image `<host>.img` beside its folder: while the VM runs (or after
//! `migrant mount`) the image is attached to a loop device and mounted on
//! the share's folder with `nosymfollow,nodev,nosuid`, and virtiofsd
//! serves that folder. Run as a user (no loop mounts in a user namespace)
//! the store is the folder itself, served through [`guard`]: the same cap
//! (`size`), no symlink that leads out of the share, no device nodes.
//! Either way the guest can never write more than the cap, and host
//! programs never follow symlinks out of the share or open device nodes
//! the guest planted. Without isolation the folder itself is served.
//!
//! Everything fails closed: what is mounted at a share folder must be the
//! recorded image, mounted with those options, or the VM does not start
//! (exit 78), and a running VM is stopped if that changes.

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
pub mod image;
pub mod loopdev;
pub mod mountinfo;
pub mod seed;
pub mod virtiofsd;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
    #[error(
        "share {tag:?}: its store {image} is missing; the VM was built with it and refuses to start without it \
         (restore it, or `migrant mount` creates an empty one)"
    )]
    Missing { tag: String, image: PathBuf },
    #[error("share {tag:?}: {dir} {why}; unmount it, then try again")]
    Foreign {
        tag: String,
        dir: PathBuf,
        why: String,
    },
    #[error("share {tag:?}: cannot mount {image} on {dir}")]
    Mount {
        tag: String,
        image: PathBuf,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("share {tag:?}: cannot unmount {dir}")]
    Unmount {
        tag: String,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("share {tag:?}: cannot create the store {image}: {why}")]
    Create {
        tag: String,
        image: PathBuf,
        why: String,
        code: u8,
    },
    /// The check while running failed.
    #[error("{0}")]
    Check(String),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
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
            | ShareError::Missing { .. }
            | ShareError::Foreign { .. }
            | ShareError::Mount { .. }
            | ShareError::Check(_) => exit::CONFIG,
            ShareError::Unmount { .. } => exit::TEMPFAIL,
            ShareError::ImageNeedsRoot { .. } => exit::CONFIG,
            ShareError::Create { code, .. } => *code,
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

/// The store of a share folder: `<host>.img` beside it.
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

/// The ext4 image holding an isolated share's files (run as root).
pub fn image_of(s: &Share) -> Option<PathBuf> {
    (s.isolation && !crate::userns::rootless()).then(|| image_path(&s.host))
}

/// The cap of an isolated share whose folder is its store (run as a
/// user), in bytes.
pub fn folder_cap(s: &Share) -> Option<u64> {
    (s.isolation && crate::userns::rootless()).then_some(s.size)
}

/// Options every store mount carries, as mountinfo shows them.
pub const MOUNT_OPTIONS: [&str; 3] = ["nosymfollow", "nodev", "nosuid"];

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

/// Without root: refuse an isolated share whose files are in an ext4
/// image from a run as root (only root can mount it; nothing is created).
pub fn check_rootless(cfg: &Config) -> Result<(), ShareError> {
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
    /// The store, for isolated shares run as root.
    pub image: Option<PathBuf>,
    /// The cap, for isolated shares whose folder is the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cap: Option<u64>,
    pub guest: Option<String>,
}

impl RecordedShare {
    pub fn of(s: &Share) -> RecordedShare {
        RecordedShare {
            tag: s.tag.clone(),
            host: s.host.clone(),
            image: image_of(s),
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
    let owner = crate::state::Record::load(&vm.record())
        .ok()
        .flatten()
        .and_then(|r| r.owner);
    crate::state::write_private(&record_file(vm), &data, owner)?;
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
            Some(s) if s.isolation != (r.image.is_some() || r.cap.is_some()) => {
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
    let owner = image::Owner::invoker();
    for s in &cfg.shares {
        ensure_folder(&s.host, &owner)?;
        let Some(img) = image_of(s) else { continue };
        if !img.exists() {
            if building {
                println!(
                    "==> {}: creating the {} store {}",
                    cfg.name,
                    crate::size::as_written(s.size),
                    img.display()
                );
                image::create(&img, s.size, &owner).map_err(|(why, code)| ShareError::Create {
                    tag: s.tag.clone(),
                    image: img.clone(),
                    why,
                    code,
                })?;
            } else {
                return Err(ShareError::Missing {
                    tag: s.tag.clone(),
                    image: img,
                });
            }
        } else if let Some(note) = image::size_note(&img, s.size) {
            eprintln!("note: share {:?}: {note}", s.tag);
        }
        // Something already mounted there must be this store, mounted
        // the safe way; anything else is refused before we build.
        if let Some(why) = mounted_problem(&s.host, &img) {
            return Err(ShareError::Foreign {
                tag: s.tag.clone(),
                dir: s.host.clone(),
                why,
            });
        }
    }
    Ok(())
}

/// Create the share folder if missing (owned by the invoking user); refuse
/// a symlink in its place.
fn ensure_folder(dir: &Path, owner: &image::Owner) -> Result<(), ShareError> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(ShareError::Foreign {
            tag: String::new(),
            dir: dir.to_path_buf(),
            why: "is not a folder (a symlink or a file)".into(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => owner
            .mkdir(dir)
            .map_err(|why| io(format!("create {}", dir.display()))(std::io::Error::other(why))),
        Err(e) => Err(io(dir.display().to_string())(e)),
    }
}

// ---------------------------------------------------------------------
// Mounting and checking
// ---------------------------------------------------------------------

/// Whether `dir` has something mounted on it, and if so what is wrong with
/// it (`None`: nothing mounted, or `image` mounted correctly).
fn mounted_problem(dir: &Path, image: &Path) -> Option<String> {
    let real_dir = dir.canonicalize().ok()?;
    let mounts = mountinfo::read().ok()?;
    mountinfo::top_at(&mounts, &real_dir)?;
    check_mount(&mounts, &real_dir, image).err()
}

/// The fail-closed check: the mount visible at `dir` is `image` on a loop
/// device, ext4, with nosymfollow, nodev and nosuid, and nothing is
/// mounted below it.
pub fn check_mount(mounts: &[mountinfo::Mount], dir: &Path, image: &Path) -> Result<(), String> {
    let Some(top) = mountinfo::top_at(mounts, dir) else {
        return Err("has nothing mounted on it (the store is not mounted)".into());
    };
    let dev = PathBuf::from(&top.source);
    let is_loop = top.source.starts_with("/dev/loop");
    let backing = is_loop.then(|| loopdev::backing_file(&dev)).flatten();
    if !is_loop || top.fs_type != "ext4" {
        return Err(format!(
            "has {} ({}) mounted on it, not the store {}",
            top.source,
            top.fs_type,
            image.display()
        ));
    }
    if loopdev::dev_numbers(&dev) != Some(top.dev) || !loopdev::backed_by(&dev, image) {
        return Err(format!(
            "is mounted from {} backed by {}, not the store {}",
            top.source,
            backing
                .map(|b| b.display().to_string())
                .unwrap_or_else(|| "an unknown file".into()),
            image.display()
        ));
    }
    let missing: Vec<&str> = MOUNT_OPTIONS
        .into_iter()
        .filter(|o| !top.options.iter().any(|x| x == o))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "is the store mounted without {}",
            missing.join(",")
        ));
    }
    if let Some(below) = mountinfo::at_or_below(mounts, dir)
        .into_iter()
        .find(|m| m.mount_point != dir)
    {
        return Err(format!(
            "has another file system mounted inside it, at {}",
            below.mount_point.display()
        ));
    }
    Ok(())
}

/// Mount `image` on `dir` (loop, auto-clear, ext4, nosymfollow, nodev,
/// nosuid), unless it is mounted there correctly already. Returns whether
/// this call mounted it.
pub fn mount_store(tag: &str, image: &Path, dir: &Path) -> Result<bool, ShareError> {
    let meta = std::fs::symlink_metadata(image).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ShareError::Missing {
            tag: tag.to_string(),
            image: image.to_path_buf(),
        },
        _ => io(image.display().to_string())(e),
    })?;
    if !meta.file_type().is_file() {
        return Err(ShareError::Foreign {
            tag: tag.into(),
            dir: image.to_path_buf(),
            why: "is not a regular file".into(),
        });
    }
    let dir_meta =
        std::fs::symlink_metadata(dir).map_err(io(format!("share folder {}", dir.display())))?;
    if !dir_meta.is_dir() {
        return Err(ShareError::Foreign {
            tag: tag.into(),
            dir: dir.to_path_buf(),
            why: "is not a folder (a symlink or a file)".into(),
        });
    }
    // The mount point, opened once with no symlink followed anywhere on its
    // path: the mount is made on this descriptor, so a project folder
    // swapped for a link (to a host folder, or through a user's namespace
    // at /proc/PID/root) is refused, never followed.
    let through_link = |e: std::io::Error, what: &Path| {
        if crate::nofollow::is_link_refusal(&e) {
            ShareError::Foreign {
                tag: tag.into(),
                dir: what.to_path_buf(),
                why: "is not a folder, or has a symbolic link on its path (was the project folder moved or replaced?)"
                    .into(),
            }
        } else {
            io(format!("share folder {}", what.display()))(e)
        }
    };
    let dir_fd = crate::nofollow::open_dir(dir).map_err(|e| through_link(e, dir))?;
    let real_dir = dir.to_path_buf();
    let mounts = mountinfo::read().map_err(io("/proc/self/mountinfo"))?;
    if mountinfo::top_at(&mounts, &real_dir).is_some() {
        return check_mount(&mounts, &real_dir, image)
            .map(|()| false)
            .map_err(|why| ShareError::Foreign {
                tag: tag.into(),
                dir: dir.to_path_buf(),
                why,
            });
    }
    let mount_err = |source: std::io::Error| ShareError::Mount {
        tag: tag.into(),
        image: image.to_path_buf(),
        dir: dir.to_path_buf(),
        source,
    };
    let file = std::fs::File::from(
        crate::nofollow::open(image, nix::fcntl::OFlag::O_RDWR)
            .map_err(|e| through_link(e, image))?,
    );
    let dev = loopdev::attach(&file).map_err(mount_err)?;
    let flags = nix::mount::MsFlags::from_bits_retain(
        libc::MS_NOSYMFOLLOW | libc::MS_NODEV | libc::MS_NOSUID,
    );
    let mounted = nix::mount::mount(
        Some(dev.path.as_path()),
        &crate::nofollow::proc_path(&dir_fd),
        Some("ext4"),
        flags,
        Some("errors=remount-ro"),
    );
    if let Err(e) = mounted {
        // Auto-clear only fires on a last close after a mount; a device
        // that never got one is detached here.
        let _ = loopdev::detach(&dev.path);
        return Err(mount_err(e.into()));
    }
    drop(dev);
    // The new mount's root, reached the same way (no link followed): the
    // rest acts on it, never on a path that could have changed.
    let root_fd = match crate::nofollow::open_dir(&real_dir) {
        Ok(fd) => fd,
        Err(e) => {
            let _ = nix::mount::umount2(
                &crate::nofollow::proc_path(&dir_fd),
                nix::mount::MntFlags::MNT_DETACH,
            );
            return Err(through_link(e, dir));
        }
    };
    // Shared: a mount namespace created while the store is mounted (`ip
    // netns exec`, a systemd service) gets a copy in the same peer group,
    // so our unmount reaches that copy too instead of leaving it holding
    // the file system and its loop device.
    if let Err(e) = nix::mount::mount(
        None::<&str>,
        &crate::nofollow::proc_path(&root_fd),
        None::<&str>,
        nix::mount::MsFlags::MS_SHARED,
        None::<&str>,
    ) {
        tracing::warn!("cannot make {} a shared mount: {e}", real_dir.display());
    }
    let mounts = mountinfo::read().map_err(io("/proc/self/mountinfo"))?;
    if let Err(why) = check_mount(&mounts, &real_dir, image) {
        let _ = nix::mount::umount2(
            &crate::nofollow::proc_path(&root_fd),
            nix::mount::MntFlags::MNT_DETACH,
        );
        return Err(ShareError::Foreign {
            tag: tag.into(),
            dir: dir.to_path_buf(),
            why,
        });
    }
    Ok(true)
}

fn unmount_dir(dir: &Path) -> std::io::Result<()> {
    // A link planted at the last component is not followed.
    match nix::mount::umount2(dir, nix::mount::MntFlags::UMOUNT_NOFOLLOW) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EBUSY) => {
            // A host program has a file open in it: detach the mount now;
            // the file system and its loop device go when it lets go.
            tracing::warn!(
                "{} is busy; detaching it (it is freed when the last program using it exits)",
                dir.display()
            );
            nix::mount::umount2(
                dir,
                nix::mount::MntFlags::MNT_DETACH | nix::mount::MntFlags::UMOUNT_NOFOLLOW,
            )
            .map_err(Into::into)
        }
        Err(e) => Err(e.into()),
    }
}

/// Unmount the store `image` from `dir` if it is mounted there, then make
/// sure no loop device stays attached to it. Idempotent.
pub fn unmount_store(tag: &str, image: &Path, dir: &Path) -> Result<bool, ShareError> {
    let mut did = false;
    if let Ok(real_dir) = dir.canonicalize() {
        // Unmount only what is ours: the store, on a loop device.
        while let Some(top) = mountinfo::top_at(&mounts_now()?, &real_dir).cloned() {
            let ours = top.source.starts_with("/dev/loop")
                && loopdev::backed_by(Path::new(&top.source), image);
            if !ours {
                break;
            }
            unmount_dir(&real_dir).map_err(|source| ShareError::Unmount {
                tag: tag.into(),
                dir: dir.to_path_buf(),
                source,
            })?;
            did = true;
        }
    }
    release_loops(image, Duration::from_secs(5));
    Ok(did)
}

fn mounts_now() -> Result<Vec<mountinfo::Mount>, ShareError> {
    mountinfo::read().map_err(io("/proc/self/mountinfo"))
}

/// Wait for the loop devices of `image` to clear themselves (a file system
/// still held by an exiting virtiofsd keeps its device for a moment), then
/// detach the ones no mount uses.
fn release_loops(image: &Path, wait: Duration) {
    let deadline = Instant::now() + wait;
    loop {
        let devs = loopdev::devices_backed_by(image);
        if devs.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            let mounts = mountinfo::read().unwrap_or_default();
            for d in devs {
                let in_use = loopdev::dev_numbers(&d)
                    .map(|n| mounts.iter().any(|m| m.dev == n))
                    .unwrap_or(true);
                if !in_use && let Err(e) = loopdev::detach(&d) {
                    tracing::warn!("cannot detach {}: {e}", d.display());
                }
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A share the supervisor serves.
#[derive(Debug, Clone)]
pub struct Served {
    pub tag: String,
    /// The folder virtiofsd serves (the store's mount point, or the plain
    /// folder without isolation).
    pub dir: PathBuf,
    pub image: Option<PathBuf>,
    /// Without isolation, or with the folder as the store: the folder's
    /// owner (uid, gid), to whom every file the guest makes there belongs.
    pub owner: Option<(u32, u32)>,
    /// With the folder as the store: its cap in bytes.
    pub cap: Option<u64>,
}

/// Supervisor, before QEMU starts: re-check the rules and the record, then
/// mount every store. On error, whatever this call mounted is unmounted.
pub fn mount_for_vm(cfg: &Config, vm: &VmPaths) -> Result<Vec<Served>, ShareError> {
    check_paths(cfg)?;
    if let Some(rec) = load_recorded(vm)? {
        check_drift(cfg, &rec)?;
    }
    let mut served = Vec::new();
    for s in &cfg.shares {
        let image = image_of(s);
        if let Some(img) = &image
            && let Err(e) = mount_store(&s.tag, img, &s.host)
        {
            unmount_served(&served);
            return Err(e);
        }
        let owner = match std::fs::symlink_metadata(&s.host) {
            _ if image.is_some() => None,
            Ok(m) if m.is_dir() => Some((m.uid(), m.gid())),
            _ => {
                unmount_served(&served);
                return Err(ShareError::Foreign {
                    tag: s.tag.clone(),
                    dir: s.host.clone(),
                    why: "is not a folder".into(),
                });
            }
        };
        served.push(Served {
            tag: s.tag.clone(),
            dir: s.host.clone(),
            image,
            owner,
            cap: folder_cap(s),
        });
    }
    Ok(served)
}

/// The periodic check while the VM runs; the first problem found.
pub fn verify_served(served: &[Served]) -> Result<(), String> {
    let mounts = mountinfo::read().map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
    for s in served {
        let Some(img) = &s.image else { continue };
        let is_dir = std::fs::symlink_metadata(&s.dir).is_ok_and(|m| m.is_dir());
        if !is_dir {
            return Err(format!(
                "share {:?}: {} is no longer a folder",
                s.tag,
                s.dir.display()
            ));
        }
        let dir = s
            .dir
            .canonicalize()
            .map_err(|e| format!("share {:?}: {}: {e}", s.tag, s.dir.display()))?;
        check_mount(&mounts, &dir, img)
            .map_err(|why| format!("share {:?}: {} {why}", s.tag, s.dir.display()))?;
    }
    Ok(())
}

/// Unmount the stores of `served` (supervisor, when the VM stops).
pub fn unmount_served(served: &[Served]) {
    for s in served {
        if let Some(img) = &s.image
            && let Err(e) = unmount_store(&s.tag, img, &s.dir)
        {
            tracing::error!("{}", crate::exit::chain(&e));
        }
    }
}

/// After the VM stopped, or its supervisor died: unmount the recorded
/// stores and free their loop devices. Never deletes anything.
pub fn cleanup_recorded(vm: &VmPaths) {
    let Ok(Some(rec)) = load_recorded(vm) else {
        return;
    };
    for r in rec {
        if let Some(img) = &r.image {
            match unmount_store(&r.tag, img, &r.host) {
                Ok(true) => tracing::info!("unmounted the store of share {:?}", r.tag),
                Ok(false) => {}
                Err(e) => tracing::error!("{}", crate::exit::chain(&e)),
            }
        }
    }
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
    pub image: Option<String>,
    /// The store is mounted on the share folder (correctly).
    pub mounted: bool,
    /// Bytes in use: of the mounted file system, else of the image on disk.
    pub used: Option<u64>,
    /// The cap in bytes (the image's size).
    pub cap: Option<u64>,
    /// A problem with what is mounted there.
    pub problem: Option<String>,
}

pub fn views(cfg: &Config) -> Vec<ShareView> {
    let mounts = mountinfo::read().unwrap_or_default();
    cfg.shares
        .iter()
        .map(|s| {
            let img = image_of(s);
            let dir = s.host.canonicalize().ok();
            let mut v = ShareView {
                tag: s.tag.clone(),
                host: s.host.display().to_string(),
                guest: s.guest.clone(),
                isolation: s.isolation,
                image: img.as_ref().map(|i| i.display().to_string()),
                mounted: false,
                used: None,
                cap: None,
                problem: None,
            };
            if let Some(cap) = folder_cap(s) {
                // The folder is the store: what its tree holds, charged
                // as the guard charges it.
                v.cap = Some(cap);
                v.used = guard::measure(&s.host).ok();
                return v;
            }
            let Some(img) = img else { return v };
            let meta = std::fs::metadata(&img).ok();
            v.cap = meta.as_ref().map(|m| m.len());
            let present = dir
                .as_ref()
                .is_some_and(|d| mountinfo::top_at(&mounts, d).is_some());
            if present && let Some(d) = &dir {
                match check_mount(&mounts, d, &img) {
                    Ok(()) => {
                        v.mounted = true;
                        if let Ok(st) = nix::sys::statvfs::statvfs(d) {
                            let used = st.blocks().saturating_sub(st.blocks_free());
                            v.used = Some(used * st.fragment_size());
                        }
                    }
                    Err(why) => v.problem = Some(why),
                }
            }
            if !v.mounted {
                v.used = meta.map(|m| m.blocks() * 512);
            }
            if v.cap.is_none() {
                v.problem
                    .get_or_insert_with(|| "the store does not exist yet".into());
            }
            v
        })
        .collect()
}

#[cfg(test)]
mod tests;
