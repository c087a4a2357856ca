//! Opening a path that nobody can redirect: every component is resolved
//! without following a symbolic link (`openat2` with
//! `RESOLVE_NO_SYMLINKS`, which also refuses `/proc/PID/root`-style magic
//! links). A privileged action on a path a user can change (a mount point
//! in a project folder, a store image) opens it this way once and then
//! acts on the descriptor, so a folder swapped for a symlink between a
//! check and the act is refused (`ELOOP`) instead of followed.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, OpenHow, ResolveFlag};

/// Open `path` (absolute) with `flags`, following no symbolic link on the
/// way.
pub fn open(path: &Path, flags: OFlag) -> std::io::Result<OwnedFd> {
    if !path.is_absolute() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not an absolute path", path.display()),
        ));
    }
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    nix::fcntl::openat2(nix::fcntl::AT_FDCWD, path, how).map_err(std::io::Error::from)
}

/// A folder opened with [`open`] (`O_PATH`), to act on by descriptor.
pub fn open_dir(path: &Path) -> std::io::Result<OwnedFd> {
    open(path, OFlag::O_PATH | OFlag::O_DIRECTORY)
}

/// The path through which a system call that takes only a path (mount)
/// reaches exactly the file `fd` is open on.
pub fn proc_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Whether `e` says a symbolic link was on the way (`ELOOP`, `EXDEV` for
/// a magic link) or, for [`open_dir`], in the last place (`ENOTDIR`).
pub fn is_link_refusal(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ELOOP) | Some(libc::EXDEV) | Some(libc::ENOTDIR)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlink_anywhere_on_the_path_is_refused() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let real = dir.path().join("real");
        std::fs::create_dir_all(real.join("ws")).unwrap_or_else(|e| panic!("{e}"));
        std::os::unix::fs::symlink(&real, dir.path().join("link"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(open_dir(&real.join("ws")).is_ok());
        let err = open_dir(&dir.path().join("link/ws"))
            .err()
            .unwrap_or_else(|| panic!("followed a symlink"));
        assert!(is_link_refusal(&err), "{err}");
        let err = open_dir(&dir.path().join("link"))
            .err()
            .unwrap_or_else(|| panic!("followed a symlink"));
        assert!(is_link_refusal(&err), "{err}");
        // A magic link (what a user's namespace offers) is refused too.
        let err = open_dir(Path::new("/proc/self/root/tmp"))
            .err()
            .unwrap_or_else(|| panic!("followed /proc/self/root"));
        assert!(is_link_refusal(&err), "{err}");
        assert!(open_dir(Path::new("relative")).is_err());
    }
}
