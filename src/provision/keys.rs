//! The managed SSH key `~/.ssh/migrant` of the invoking user.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::as_user::AsUserError;
pub use super::as_user::Invoker;

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

/// Run `cmd`, collecting its output.
fn output(mut cmd: Command) -> Result<std::process::Output, KeyError> {
    cmd.stdin(Stdio::null())
        .output()
        .map_err(|e| KeyError::Keygen(e.to_string()))
}

/// Create the ed25519 key pair at `key` if it is missing; return its public
/// half.
pub fn ensure_key(who: &Invoker, key: &Path) -> Result<String, KeyError> {
    if let Some(p) = public_key(key)? {
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
    let out = output(cmd)?;
    if !out.status.success() {
        return Err(KeyError::Keygen(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    public_key(key)?.ok_or_else(|| KeyError::Keygen("no public key written".into()))
}
