//! The managed SSH key `~/.ssh/migrant` of the invoking user.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub use super::as_user::Invoker;
use super::as_user::{self, AsUserError};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(transparent)]
    AsUser(#[from] AsUserError),
    #[error("ssh-keygen failed: {0}")]
    Keygen(String),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl KeyError {
    pub fn exit_code(&self) -> u8 {
        match self {
            KeyError::Keygen(_) => crate::exit::UNAVAILABLE,
            KeyError::AsUser(AsUserError::Write { .. }) => crate::exit::NOPERM,
            _ => crate::exit::SOFTWARE,
        }
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

/// Public key text of `private` (`<private>.pub`), read with the invoking
/// user's rights: the file is in a folder the user controls, and a
/// symlink planted there could make root read any file into the guest's
/// seed. `None` when it does not exist.
pub fn public_key_as(who: &Invoker, private: &Path) -> Result<Option<String>, KeyError> {
    if !as_user::must_switch(who) {
        return public_key(private);
    }
    let public = pub_path(private);
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "test -e \"$1\" || exit 3; exec head -c 16384 -- \"$1\"",
        "sh",
    ])
    .arg(&public);
    let out = run_as(who, cmd)?;
    match out.status.code() {
        Some(0) => Ok(Some(
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        )),
        Some(3) => Ok(None),
        _ => Err(KeyError::Io {
            path: public,
            source: std::io::Error::other(format!(
                "cannot be read as {}: {}",
                who.name,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        }),
    }
}

/// Run `cmd` as `who`, collecting its output.
fn run_as(who: &Invoker, mut cmd: Command) -> Result<std::process::Output, KeyError> {
    as_user::apply(&mut cmd, who)?;
    cmd.stdin(Stdio::null())
        .output()
        .map_err(|e| KeyError::Keygen(e.to_string()))
}

/// Create the ed25519 key pair at `key` if it is missing; return its public
/// half.
/// Everything happens as the invoking user (folder, key, reading it back):
/// root never creates, follows or chowns a path in the user's home.
pub fn ensure_key(who: &Invoker, key: &Path) -> Result<String, KeyError> {
    if let Some(p) = public_key_as(who, key)? {
        return Ok(p);
    }
    let dir = key.parent().unwrap_or(Path::new("/"));
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "umask 077 && mkdir -p -- \"$1\" && exec ssh-keygen -q -t ed25519 -N '' -C \"$2\" -f \"$3\"",
        "sh",
    ])
    .arg(dir)
    .arg(format!("migrant@{}", who.name))
    .arg(key);
    let out = run_as(who, cmd)?;
    if !out.status.success() {
        return Err(KeyError::Keygen(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    public_key_as(who, key)?.ok_or_else(|| KeyError::Keygen("no public key written".into()))
}
