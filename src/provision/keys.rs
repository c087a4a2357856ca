//! The managed SSH key `~/.ssh/migrant` of the invoking user.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::unistd::{Gid, Uid, User};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot find the home directory of {0}")]
    NoHome(String),
    #[error("ssh-keygen failed: {0}")]
    Keygen(String),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the managed SSH key {path} does not exist, and {file} uses __MIGRANT_PUBKEY__; run `migrant pubkey` to create it"
    )]
    Missing { path: PathBuf, file: PathBuf },
}

impl KeyError {
    pub fn exit_code(&self) -> u8 {
        match self {
            KeyError::Missing { .. } => crate::exit::CONFIG,
            KeyError::Keygen(_) => crate::exit::UNAVAILABLE,
            _ => crate::exit::SOFTWARE,
        }
    }
}

/// The user who invoked migrant: `SUDO_USER` when run through sudo.
#[derive(Debug, Clone)]
pub struct Invoker {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    pub home: PathBuf,
}

impl Invoker {
    pub fn current() -> Result<Invoker, KeyError> {
        let by_sudo = std::env::var("SUDO_USER")
            .ok()
            .filter(|u| !u.is_empty() && u != "root")
            .and_then(|u| User::from_name(&u).ok().flatten());
        let user = match by_sudo {
            Some(u) => u,
            None => User::from_uid(Uid::current())
                .ok()
                .flatten()
                .ok_or_else(|| KeyError::NoHome(Uid::current().to_string()))?,
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

    /// Give `path` to the invoking user (a no-op when that is us).
    pub fn own(&self, path: &Path) -> Result<(), KeyError> {
        if self.uid == Uid::effective() {
            return Ok(());
        }
        nix::unistd::chown(path, Some(self.uid), Some(self.gid)).map_err(|e| KeyError::Io {
            path: path.to_path_buf(),
            source: e.into(),
        })
    }

    pub fn managed_key(&self) -> PathBuf {
        self.home.join(".ssh").join("migrant")
    }
}

/// Public key text of `private` (`<private>.pub`), if it exists.
pub fn public_key(private: &Path) -> Result<Option<String>, KeyError> {
    let public = pub_path(private);
    match std::fs::read_to_string(&public) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(KeyError::Io {
            path: public,
            source,
        }),
    }
}

fn pub_path(private: &Path) -> PathBuf {
    let mut s = private.as_os_str().to_os_string();
    s.push(".pub");
    PathBuf::from(s)
}

/// Create the managed ed25519 key if missing; return its public half.
pub fn ensure_managed_key(who: &Invoker) -> Result<String, KeyError> {
    let key = who.managed_key();
    if key.exists()
        && let Some(p) = public_key(&key)?
    {
        return Ok(p);
    }
    let dir = key.parent().unwrap_or(Path::new("/"));
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(|source| KeyError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(|source| KeyError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        who.own(dir)?;
    }
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C"])
        .arg(format!("migrant@{}", who.name))
        .arg("-f")
        .arg(&key)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| KeyError::Keygen(e.to_string()))?;
    if !out.status.success() {
        return Err(KeyError::Keygen(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    who.own(&key)?;
    who.own(&pub_path(&key))?;
    public_key(&key)?.ok_or_else(|| KeyError::Keygen("no public key written".into()))
}
