//! Creating a store: a sparse file of the share's size holding an ext4
//! file system (e2fsprogs' `mkfs.ext4`), owned by the invoking user.
//! It is built under a temporary name and renamed into place, so a store
//! that exists is complete, and a failed allocation leaves nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::unistd::{Gid, Uid};

/// Who owns the stores, their mount points and their root folders: the
/// user who ran migrant (`SUDO_USER` under sudo). Every file operation in
/// the project folder (a folder that user, and through a share the guest,
/// may write) runs as that user, by programs started with the user's
/// identity: root never creates, formats, links or chowns a path there, so
/// a symlink planted on the way leads only where the user could go anyway.
#[derive(Debug, Clone)]
pub struct Owner {
    pub uid: Uid,
    pub gid: Gid,
    who: Option<crate::provision::keys::Invoker>,
}

impl Owner {
    pub fn invoker() -> Owner {
        match crate::provision::keys::Invoker::current() {
            Ok(i) => Owner {
                uid: i.uid,
                gid: i.gid,
                who: Some(i),
            },
            Err(_) => Owner {
                uid: Uid::effective(),
                gid: Gid::effective(),
                who: None,
            },
        }
    }

    /// `program` to be run as the owner.
    fn command(&self, program: &Path) -> Result<Command, String> {
        let mut cmd = Command::new(program);
        cmd.stdin(Stdio::null());
        if let Some(who) = &self.who {
            crate::provision::as_user::apply(&mut cmd, who).map_err(|e| e.to_string())?;
        }
        Ok(cmd)
    }

    /// Run `program` with `args` as the owner; its error output on failure.
    fn run<S: AsRef<std::ffi::OsStr>>(
        &self,
        program: &str,
        args: impl IntoIterator<Item = S>,
    ) -> Result<(), String> {
        let out = self
            .command(Path::new(program))?
            .args(args)
            .output()
            .map_err(|e| format!("cannot run {program}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{program} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Create `dir` (and its missing parents) as the owner.
    pub fn mkdir(&self, dir: &Path) -> Result<(), String> {
        self.run(
            "mkdir",
            [std::ffi::OsStr::new("-p"), "--".as_ref(), dir.as_os_str()],
        )
    }
}

fn partial(image: &Path) -> PathBuf {
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    image.with_file_name(format!(".{name}.partial"))
}

/// Create the store `image` of `size` bytes, as its owner. On failure
/// nothing is left and the error says why, with an exit code.
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
    // The owner must be able to write there: root does not do it for them.
    let parent = image.parent().unwrap_or(Path::new("."));
    if owner
        .run("test", [std::ffi::OsStr::new("-w"), parent.as_os_str()])
        .is_err()
    {
        return Err((
            format!(
                "uid {} may not write in {}, where the store would go",
                owner.uid,
                parent.display()
            ),
            crate::exit::NOPERM,
        ));
    }
    let tmp = partial(image);
    let remove = || {
        owner.run(
            "rm",
            [std::ffi::OsStr::new("-f"), "--".as_ref(), tmp.as_os_str()],
        )
    };
    let result = remove()
        .and_then(|()| build(&mkfs, &tmp, size, owner))
        .and_then(|()| {
            // Never replace a store that appeared meanwhile (`ln` without -f).
            owner.run(
                "ln",
                [
                    std::ffi::OsStr::new("--"),
                    tmp.as_os_str(),
                    image.as_os_str(),
                ],
            )
        });
    let _ = remove();
    result.map_err(|why| (why, crate::exit::SOFTWARE))
}

fn build(mkfs: &Path, tmp: &Path, size: u64, owner: &Owner) -> Result<(), String> {
    // mke2fs creates the file (sparse: the cap is never paid up front).
    let out = owner
        .command(mkfs)?
        .args(["-F", "-q", "-t", "ext4", "-E"])
        .arg(format!(
            "root_owner={}:{},lazy_itable_init=1,lazy_journal_init=1",
            owner.uid, owner.gid
        ))
        .args([
            "-O",
            "^resize_inode",
            "-L",
            "migrant-share",
            "-m",
            "0",
            "--",
        ])
        .arg(tmp)
        .arg(format!("{}k", size / 1024))
        .output()
        .map_err(|e| format!("cannot run {}: {e}", mkfs.display()))?;
    if !out.status.success() {
        return Err(format!(
            "mkfs.ext4 failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    owner.run(
        "chmod",
        [std::ffi::OsStr::new("0600"), "--".as_ref(), tmp.as_os_str()],
    )?;
    // The guest need not see an empty lost+found (best effort; e2fsck
    // recreates it when it needs one).
    let _ = owner.run(
        "debugfs",
        [
            std::ffi::OsStr::new("-w"),
            "-R".as_ref(),
            "rmdir lost+found".as_ref(),
            tmp.as_os_str(),
        ],
    );
    owner.run("sync", [std::ffi::OsStr::new("--"), tmp.as_os_str()])
}

/// A note when an existing store's size differs from the configured one
/// (stores are never resized behind the user's back).
pub fn size_note(image: &Path, size: u64) -> Option<String> {
    let actual = std::fs::metadata(image).ok()?.len();
    (actual != size).then(|| {
        format!(
            "{} is {} but the Migrantfile asks for {}; to resize, copy the data out, remove the image and run `migrant mount` or `migrant up`",
            image.display(),
            crate::size::as_written(actual),
            crate::size::as_written(size)
        )
    })
}
