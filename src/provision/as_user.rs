//! The user running migrant, and what a project may run as them.
//!
//! migrant runs as the user whose VMs they are (`sudo migrant` is
//! refused, root runs its own VMs): hooks, Ansible, `ssh`, key generation
//! and every file written in the project run and are made by that user's
//! own process, with nothing to switch.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Uid, User};

/// The user running migrant.
#[derive(Debug, Clone)]
pub struct Invoker {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    pub home: PathBuf,
}

impl Invoker {
    pub fn current() -> Result<Invoker, AsUserError> {
        let user = User::from_uid(Uid::current())
            .ok()
            .flatten()
            .ok_or_else(|| AsUserError::NoUser(Uid::current().to_string()))?;
        // `$HOME` wins, as with ssh.
        let home = crate::config::invoking_user_home().unwrap_or(user.dir);
        Ok(Invoker {
            name: user.name,
            uid: user.uid,
            gid: user.gid,
            home,
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
    #[error("cannot inspect {path}")]
    Stat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} belongs to uid {owner} or may be changed by others (group or world writable), and would run as uid {runner}: make it yours and `chmod go-w` it"
    )]
    NotOurs {
        path: PathBuf,
        owner: u32,
        runner: u32,
    },
    #[error("cannot write {path}: {why}")]
    Write { path: PathBuf, why: String },
}

/// Refuse a program (hook, playbook) someone else could have changed:
/// it must belong to `who` (or root) and be writable by nobody else.
/// (Whoever can change it would run code as `who`.)
pub fn check_runnable(path: &Path, who: &Invoker) -> Result<(), AsUserError> {
    let meta = std::fs::metadata(path).map_err(|source| AsUserError::Stat {
        path: path.to_path_buf(),
        source,
    })?;
    let owner = meta.uid();
    if (owner != who.uid.as_raw() && owner != 0) || meta.mode() & 0o022 != 0 {
        return Err(AsUserError::NotOurs {
            path: path.to_path_buf(),
            owner,
            runner: who.uid.as_raw(),
        });
    }
    Ok(())
}

/// Write `data` to `path` (atomically: a temporary file renamed over it).
pub fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), AsUserError> {
    crate::state::write_atomic(path, data, mode).map_err(|e| AsUserError::Write {
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_others_may_change_is_refused() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let hook = dir.path().join("hook");
        std::fs::write(&hook, "#!/bin/sh\n").unwrap_or_else(|e| panic!("{e}"));
        let me = Invoker::current().unwrap_or_else(|e| panic!("{e}"));
        let mode = |m: u32| {
            std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(m))
                .unwrap_or_else(|e| panic!("{e}"));
        };
        mode(0o755);
        assert!(check_runnable(&hook, &me).is_ok());
        for m in [0o775, 0o757] {
            mode(m);
            assert!(
                matches!(check_runnable(&hook, &me), Err(AsUserError::NotOurs { .. })),
                "mode {m:o} was accepted"
            );
        }
        // Another user's program, however it is mode'd.
        mode(0o755);
        let other = Invoker {
            uid: Uid::from_raw(me.uid.as_raw().wrapping_add(1).max(1)),
            ..me
        };
        let owned_by_root = std::fs::metadata(&hook)
            .map(|m| m.uid() == 0)
            .unwrap_or(false);
        assert_eq!(check_runnable(&hook, &other).is_ok(), owned_by_root);
    }
}
