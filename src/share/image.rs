//! Creating a store: a sparse file of the share's size holding an ext4
//! file system (e2fsprogs' `mkfs.ext4`), owned by the invoking user.
//! It is built under a temporary name and renamed into place, so a store
//! that exists is complete, and a failed allocation leaves nothing.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::unistd::{Gid, Uid};

/// Who owns the stores, their mount points and their root folders: the
/// user who ran migrant (`SUDO_USER` under sudo).
#[derive(Debug, Clone, Copy)]
pub struct Owner {
    pub uid: Uid,
    pub gid: Gid,
}

impl Owner {
    pub fn invoker() -> Owner {
        match crate::provision::keys::Invoker::current() {
            Ok(i) => Owner {
                uid: i.uid,
                gid: i.gid,
            },
            Err(_) => Owner {
                uid: Uid::effective(),
                gid: Gid::effective(),
            },
        }
    }

    /// Give `path` to the owner (best effort: the path stays usable by
    /// root either way).
    pub fn own(&self, path: &Path) {
        if self.uid == Uid::effective() {
            return;
        }
        if let Err(e) = nix::unistd::chown(path, Some(self.uid), Some(self.gid)) {
            tracing::warn!("chown {}: {e}", path.display());
        }
    }
}

fn partial(image: &Path) -> PathBuf {
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    image.with_file_name(format!(".{name}.partial"))
}

/// Create the store `image` of `size` bytes. On failure nothing is left
/// and the error says why, with an exit code.
pub fn create(image: &Path, size: u64, owner: &Owner) -> Result<(), (String, u8)> {
    let mkfs = crate::qemu::process::which("mkfs.ext4")
        .or_else(|| {
            ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
                .iter()
                .map(PathBuf::from)
                .find(|p| p.is_file())
        })
        .ok_or_else(|| {
            (
                "mkfs.ext4 not found; install e2fsprogs".to_string(),
                crate::exit::UNAVAILABLE,
            )
        })?;
    let tmp = partial(image);
    let _ = std::fs::remove_file(&tmp);
    let result = build(&mkfs, &tmp, size, owner).and_then(|()| {
        // Never replace a store that appeared meanwhile.
        std::fs::hard_link(&tmp, image).map_err(|e| format!("{}: {e}", image.display()))
    });
    let _ = std::fs::remove_file(&tmp);
    result.map_err(|why| (why, crate::exit::SOFTWARE))
}

fn build(mkfs: &Path, tmp: &Path, size: u64, owner: &Owner) -> Result<(), String> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    // Sparse: the cap is never paid up front.
    f.set_len(size)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    drop(f);
    let out = Command::new(mkfs)
        .args(["-F", "-q", "-t", "ext4", "-E"])
        .arg(format!(
            "root_owner={}:{},lazy_itable_init=1,lazy_journal_init=1",
            owner.uid, owner.gid
        ))
        .args(["-O", "^resize_inode", "-L", "migrant-share", "-m", "0"])
        .arg(tmp)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", mkfs.display()))?;
    if !out.status.success() {
        return Err(format!(
            "mkfs.ext4 failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    // The guest need not see an empty lost+found (best effort; e2fsck
    // recreates it when it needs one).
    let _ = Command::new("debugfs")
        .args(["-w", "-R", "rmdir lost+found"])
        .arg(tmp)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    owner.own(tmp);
    std::fs::File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("{}: {e}", tmp.display()))
}

/// A note when an existing store's size differs from the configured one
/// (stores are never resized behind the user's back).
pub fn size_note(image: &Path, size: u64) -> Option<String> {
    let actual = std::fs::metadata(image).ok()?.len();
    (actual != size).then(|| {
        format!(
            "{} is {} but the Migrantfile asks for {}; to resize, copy the data out, remove the image and run `migrant mount` or `migrant up`",
            image.display(),
            super::human(actual),
            super::human(size)
        )
    })
}
