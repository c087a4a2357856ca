//! Running host programs (hooks, `ansible-playbook`) as the invoking
//! user rather than as root.
//!
//! migrant runs as root through `sudo`; what it starts on the user's
//! behalf must not: the child gets the user's uid, primary gid and
//! supplementary groups, and the user's `HOME`, `USER`, `LOGNAME` (and
//! `XDG_RUNTIME_DIR` when the user has one, so `systemctl --user` works
//! from a hook). When migrant already runs as that user nothing changes.

use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::unistd::{Gid, Uid, User};

/// The user who invoked migrant: `SUDO_USER` when run through sudo.
#[derive(Debug, Clone)]
pub struct Invoker {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    pub home: PathBuf,
}

impl Invoker {
    pub fn current() -> Result<Invoker, AsUserError> {
        let by_sudo = std::env::var("SUDO_USER")
            .ok()
            .filter(|u| !u.is_empty() && u != "root")
            .and_then(|u| User::from_name(&u).ok().flatten());
        let user = match by_sudo {
            Some(u) => u,
            None => User::from_uid(Uid::current())
                .ok()
                .flatten()
                .ok_or_else(|| AsUserError::NoUser(Uid::current().to_string()))?,
        };
        // Without sudo, respect $HOME like ssh does.
        let home = if std::env::var_os("SUDO_USER").is_none() {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or(user.dir.clone())
        } else {
            user.dir.clone()
        };
        Ok(Invoker {
            name: user.name,
            uid: user.uid,
            gid: user.gid,
            home,
        })
    }

    /// Who a project's programs (hooks, Ansible) run as: the sudo user;
    /// for root in a folder another user controls (a CI runner in a
    /// checkout), that user (see [`crate::userfile::controller`]), so
    /// that root never runs what the folder's owner chose; else us.
    pub fn for_project(dir: &Path) -> Result<Invoker, AsUserError> {
        let me = Invoker::current()?;
        if !Uid::effective().is_root() || !me.uid.is_root() {
            return Ok(me);
        }
        let Some(uid) = crate::userfile::controller(dir) else {
            return Ok(me);
        };
        let user = User::from_uid(Uid::from_raw(uid))
            .ok()
            .flatten()
            .ok_or_else(|| AsUserError::NoUser(uid.to_string()))?;
        Ok(Invoker {
            name: user.name,
            uid: user.uid,
            gid: user.gid,
            home: user.dir,
        })
    }

    pub fn managed_key(&self) -> PathBuf {
        self.home.join(".ssh").join("migrant")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AsUserError {
    #[error("cannot find the user {0} in the user database")]
    NoUser(String),
    #[error("cannot look up the groups of {user}")]
    Groups {
        user: String,
        #[source]
        source: nix::Error,
    },
    #[error("user name {0:?} contains a NUL byte")]
    Name(String),
    #[error("cannot inspect {path}")]
    Stat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} belongs to uid {owner} (or is writable by others) but would run as root; run migrant through sudo as that user, or make the file root's"
    )]
    NotRootOwned { path: PathBuf, owner: u32 },
    #[error("cannot write {path} as the invoking user: {why}")]
    Write { path: PathBuf, why: String },
}

/// Whether starting a program for `who` needs a change of identity.
pub fn must_switch(who: &Invoker) -> bool {
    Uid::effective().is_root() && !who.uid.is_root()
}

/// Make `cmd` run as `who` (see the module documentation).
pub fn apply(cmd: &mut Command, who: &Invoker) -> Result<(), AsUserError> {
    if !must_switch(who) {
        return Ok(());
    }
    let name = CString::new(who.name.clone()).map_err(|_| AsUserError::Name(who.name.clone()))?;
    // Everything that reads /etc/group or allocates happens here, before
    // the fork; the child only makes three system calls.
    let groups: Vec<libc::gid_t> = nix::unistd::getgrouplist(&name, who.gid)
        .map_err(|source| AsUserError::Groups {
            user: who.name.clone(),
            source,
        })?
        .into_iter()
        .map(Gid::as_raw)
        .collect();
    let uid = who.uid.as_raw();
    let gid = who.gid.as_raw();
    cmd.env("HOME", &who.home)
        .env("USER", &who.name)
        .env("LOGNAME", &who.name);
    let runtime = PathBuf::from(format!("/run/user/{uid}"));
    if runtime.is_dir() {
        cmd.env("XDG_RUNTIME_DIR", runtime);
    } else {
        cmd.env_remove("XDG_RUNTIME_DIR");
    }
    crate::sandbox::Confine {
        identity: Some((uid, gid, groups)),
        ..crate::sandbox::Confine::default()
    }
    .apply_std(cmd);
    Ok(())
}

/// When a program runs as root, refuse one that someone else controls:
/// the file must belong to root and not be writable by group or others.
/// (Root running `migrant up` in another user's folder must not run that
/// user's hook as root.) No-op when the program runs as a normal user.
pub fn check_runnable(path: &Path, who: &Invoker) -> Result<(), AsUserError> {
    if !Uid::effective().is_root() || !who.uid.is_root() {
        return Ok(());
    }
    let meta = std::fs::metadata(path).map_err(|source| AsUserError::Stat {
        path: path.to_path_buf(),
        source,
    })?;
    if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        return Err(AsUserError::NotRootOwned {
            path: path.to_path_buf(),
            owner: meta.uid(),
        });
    }
    Ok(())
}

/// Write `data` to `path` as `who` (`cat > PATH`, then `chmod`, run as
/// that user: a symlink planted at `path` is followed, if at all, with the
/// user's rights only); as us, atomically in-process.
pub fn write_file(who: &Invoker, path: &Path, data: &[u8], mode: u32) -> Result<(), AsUserError> {
    let failed = |why: String| AsUserError::Write {
        path: path.to_path_buf(),
        why,
    };
    if !must_switch(who) {
        return crate::state::write_atomic(path, data, mode).map_err(|e| failed(e.to_string()));
    }
    // The pipe is root's: the user's program reads it as its stdin, never
    // by name.
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "cat > \"$1\" && chmod \"$2\" \"$1\"", "sh"])
        .arg(path)
        .arg(format!("{mode:o}"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    apply(&mut cmd, who)?;
    let mut child = cmd
        .spawn()
        .map_err(|e| failed(format!("cannot run sh: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        stdin.write_all(data).map_err(|e| failed(e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| failed(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(failed(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// Give `path` to `who` (a no-op when that is us).
pub fn chown_to(path: &Path, who: &Invoker) -> std::io::Result<()> {
    if !must_switch(who) {
        return Ok(());
    }
    nix::unistd::chown(path, Some(who.uid), Some(who.gid)).map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Invoker {
        let uid = Uid::effective();
        Invoker {
            name: "whoever".into(),
            uid,
            gid: Gid::effective(),
            home: PathBuf::from("/nonexistent"),
        }
    }

    #[test]
    fn no_switch_for_ourselves() {
        let who = me();
        assert!(!must_switch(&who));
        let mut cmd = Command::new("true");
        apply(&mut cmd, &who).unwrap_or_else(|e| panic!("{e}"));
        // Nothing was set: no HOME override.
        assert!(cmd.get_envs().next().is_none());
    }

    #[test]
    fn switching_sets_the_users_environment() {
        if !Uid::effective().is_root() {
            return;
        }
        let who = Invoker {
            name: "nobody".into(),
            uid: Uid::from_raw(65534),
            gid: Gid::from_raw(65534),
            home: PathBuf::from("/nonexistent"),
        };
        let mut cmd = Command::new("id");
        apply(&mut cmd, &who).unwrap_or_else(|e| panic!("{e}"));
        let out = cmd.arg("-u").output().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "65534");
        let envs: Vec<_> = cmd.get_envs().collect();
        assert!(envs.contains(&(
            std::ffi::OsStr::new("HOME"),
            Some(std::ffi::OsStr::new("/nonexistent"))
        )));
    }
}
