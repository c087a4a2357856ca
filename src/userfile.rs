//! Files a project names, opened with the rights of the user the project
//! belongs to, never with root's.
//!
//! Root runs migrant through `sudo` (for `SUDO_USER`), or directly in a
//! folder that another user owns (a CI runner in a project checkout). The
//! Migrantfile, `cloud-init.yml`, the WireGuard file, a local base image
//! and every other file that project names are that user's to choose: a
//! symlink to `/etc/shadow` must read as that user would read it (EACCES),
//! not as root. So when root reads for a user, the bytes come from `cat`
//! running as that user (their uid, primary gid and groups, no new
//! privileges), through a pipe: root never opens the path.
//!
//! Whose project it is: the `sudo` user; else, for root, the owner of the
//! nearest folder on the way to the project that is not root's (anyone
//! owning a folder on that path can swap what lies beneath it); else
//! root's own, read directly.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, ChildStderr, ChildStdout, Command, Stdio};

/// Whose rights a project's files are read with.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reader {
    /// `(uid, gid, groups)` to read as; `None`: this process reads.
    pub as_user: Option<(u32, u32, Vec<libc::gid_t>)>,
}

impl Reader {
    /// This process reads, with its own rights.
    pub fn ourselves() -> Reader {
        Reader::default()
    }

    /// The reader for a project in `dir` (see the module documentation).
    pub fn for_project(dir: &Path) -> Reader {
        if !nix::unistd::Uid::effective().is_root() {
            return Reader::ourselves();
        }
        let by_sudo = std::env::var("SUDO_USER")
            .ok()
            .filter(|u| !u.is_empty() && u != "root")
            .and_then(|u| nix::unistd::User::from_name(&u).ok().flatten());
        let user = match by_sudo {
            Some(u) => Some((u.uid.as_raw(), u.gid.as_raw(), Some(u.name))),
            None => controller(dir).map(|uid| {
                match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
                    Ok(Some(u)) => (uid, u.gid.as_raw(), Some(u.name)),
                    // A uid without a name: its own number as its group.
                    _ => (uid, uid, None),
                }
            }),
        };
        let Some((uid, gid, name)) = user else {
            return Reader::ourselves();
        };
        let groups = name
            .and_then(|n| std::ffi::CString::new(n).ok())
            .and_then(|n| nix::unistd::getgrouplist(&n, nix::unistd::Gid::from_raw(gid)).ok())
            .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
            .unwrap_or_else(|| vec![gid]);
        Reader {
            as_user: Some((uid, gid, groups)),
        }
    }

    /// The uid that reads, if not this process.
    pub fn uid(&self) -> Option<u32> {
        self.as_user.as_ref().map(|(u, _, _)| *u)
    }

    /// Open `path` for reading.
    pub fn open(&self, path: &Path) -> std::io::Result<UserFile> {
        let Some((uid, gid, groups)) = &self.as_user else {
            return Ok(UserFile::Direct(std::fs::File::open(path)?));
        };
        let mut cmd = Command::new("cat");
        cmd.arg("--")
            .arg(path)
            .current_dir("/")
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        crate::sandbox::Confine {
            identity: Some((*uid, *gid, groups.clone())),
            no_new_privs: true,
            ..crate::sandbox::Confine::default()
        }
        .apply_std(&mut cmd);
        let mut child = cmd.spawn()?;
        let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::other("cat without its pipes"));
        };
        Ok(UserFile::AsUser { child, out, err })
    }

    /// The whole of `path` as text, at most `max` bytes.
    pub fn read_to_string(&self, path: &Path, max: u64) -> std::io::Result<String> {
        let mut file = self.open(path)?;
        let mut bytes = Vec::new();
        (&mut file)
            .take(max.saturating_add(1))
            .read_to_end(&mut bytes)?;
        if bytes.len() as u64 > max {
            let _ = file.finish_early();
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("larger than {max} bytes"),
            ));
        }
        file.finish()?;
        String::from_utf8(bytes)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"))
    }
}

/// The user (not root) who controls `dir`: the owner of the nearest
/// folder on the path to it (itself included) that root does not own.
pub fn controller(dir: &Path) -> Option<u32> {
    dir.ancestors()
        .filter_map(|a| std::fs::symlink_metadata(a).ok())
        .map(|m| m.uid())
        .find(|uid| *uid != 0)
}

/// A file opened by [`Reader::open`].
pub enum UserFile {
    /// Opened by this process.
    Direct(std::fs::File),
    /// Read by `cat` running as the user.
    AsUser {
        child: Child,
        out: ChildStdout,
        err: ChildStderr,
    },
}

impl Read for UserFile {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            UserFile::Direct(f) => f.read(buf),
            UserFile::AsUser { out, .. } => out.read(buf),
        }
    }
}

impl UserFile {
    /// After the last byte: whether the user could read it all. A file
    /// the user may not read fails here with the user's own error
    /// (`Permission denied`, `No such file or directory`).
    pub fn finish(self) -> std::io::Result<()> {
        let UserFile::AsUser { mut child, err, .. } = self else {
            return Ok(());
        };
        let mut message = String::new();
        let _ = err.take(4096).read_to_string(&mut message);
        let status = child.wait()?;
        if status.success() {
            return Ok(());
        }
        // cat says "cat: PATH: REASON"; the caller names the path.
        let reason = message
            .lines()
            .next()
            .and_then(|l| l.rsplit(": ").next())
            .unwrap_or("cannot be read")
            .trim()
            .to_string();
        Err(match reason.as_str() {
            "Permission denied" => std::io::Error::from_raw_os_error(libc::EACCES),
            "No such file or directory" => std::io::Error::from_raw_os_error(libc::ENOENT),
            "Is a directory" => std::io::Error::from_raw_os_error(libc::EISDIR),
            "Too many levels of symbolic links" => std::io::Error::from_raw_os_error(libc::ELOOP),
            _ => std::io::Error::other(format!("as its owner: {reason}")),
        })
    }

    /// Stop reading before the end (the user's `cat` is ended).
    pub fn finish_early(self) -> std::io::Result<()> {
        if let UserFile::AsUser { mut child, .. } = self {
            let _ = child.kill();
            child.wait()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_files_are_read_directly() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = dir.path().join("f");
        std::fs::write(&p, "hello").unwrap_or_else(|e| panic!("{e}"));
        let r = Reader::ourselves();
        assert_eq!(r.read_to_string(&p, 100).ok().as_deref(), Some("hello"));
        assert!(r.read_to_string(&p, 3).is_err(), "the cap holds");
    }

    #[test]
    fn as_another_user_a_root_only_file_is_that_users_eacces() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("SKIPPED: needs root to read as another user");
            return;
        }
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "root only").unwrap_or_else(|e| panic!("{e}"));
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap_or_else(|e| panic!("{e}"));
        let open = dir.path().join("open");
        std::fs::write(&open, "anyone").unwrap_or_else(|e| panic!("{e}"));
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let nobody = Reader {
            as_user: Some((65534, 65534, vec![65534])),
        };
        let err = nobody
            .read_to_string(&secret, 100)
            .err()
            .unwrap_or_else(|| panic!("nobody read root's file"));
        assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
        let gone = nobody.read_to_string(&dir.path().join("nope"), 100).err();
        assert_eq!(gone.and_then(|e| e.raw_os_error()), Some(libc::ENOENT));
        assert_eq!(
            nobody.read_to_string(&open, 100).ok().as_deref(),
            Some("anyone")
        );
    }
}
