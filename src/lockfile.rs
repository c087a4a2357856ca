//! Advisory file locks (flock(2)): the one helper behind every lock
//! migrant takes (a VM's lock, the VM id registry, an image download).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Open (creating, 0600) the lock file at `path`, never through a symlink.
pub fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Lock `file` exclusively: waiting for it (`wait`), or not, then
/// `Ok(false)` when another process holds it.
pub fn lock(file: &File, wait: bool) -> io::Result<bool> {
    let op = if wait {
        libc::LOCK_EX
    } else {
        libc::LOCK_EX | libc::LOCK_NB
    };
    loop {
        // SAFETY: flock(2) on a descriptor owned by `file`; no memory is
        // shared.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if !wait => return Ok(false),
            _ => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_is_reported_and_a_symlink_is_not_followed() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = d.path().join("lock");
        let a = open(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(lock(&a, false).unwrap_or(false));
        // A second open file description of the same file: held.
        let b = open(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(!lock(&b, false).unwrap_or(true));
        drop(a);
        assert!(lock(&b, false).unwrap_or(false));
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap_or_else(|e| panic!("{e}"));
        assert!(open(&link).is_err(), "followed a symlink");
    }
}
