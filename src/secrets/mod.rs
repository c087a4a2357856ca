//! The values of a project's `[secrets]`, read by the invoking user's own
//! process each time the VM starts (so a rotated token is the one used),
//! and held only in memory: never written to a file, the seed, a log or
//! any output. A [`Value`] prints as `<secret>`.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::{Config, Secret, SecretSource};

pub mod authority;
pub mod vm;

/// How long a `command:` source may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest value accepted.
pub const MAX_LEN: usize = 64 * 1024;

/// A secret's value. Its `Debug` shows nothing of it.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Value(String);

impl Value {
    /// The value itself, for the one place it is used: a request header.
    pub fn expose(&self) -> &str {
        &self.0
    }

    #[cfg(test)]
    pub fn for_tests(text: &str) -> Value {
        Value(text.to_string())
    }
}

/// A PEM file of authorities the broker also trusts for the real servers
/// (a corporate root; a test's own authority), read by the user's process.
pub const UPSTREAM_CA_VAR: &str = "MIGRANT_UPSTREAM_CA";

/// The authorities the real servers of secret hosts must chain to (DER):
/// the host's trust store (`SSL_CERT_FILE` and `SSL_CERT_DIR` choose
/// another), and the file [`UPSTREAM_CA_VAR`] names.
pub fn upstream_roots() -> Result<Vec<Vec<u8>>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let found = rustls_native_certs::load_native_certs();
    let mut roots: Vec<Vec<u8>> = found.certs.into_iter().map(|c| c.to_vec()).collect();
    if let Some(path) = std::env::var_os(UPSTREAM_CA_VAR).filter(|p| !p.is_empty()) {
        let path = std::path::PathBuf::from(path);
        let text = crate::userfile::read_to_string(&path, 4 << 20)
            .map_err(|e| format!("{UPSTREAM_CA_VAR}={}: {e}", path.display()))?;
        let before = roots.len();
        for cert in CertificateDer::pem_slice_iter(text.as_bytes()) {
            let cert = cert.map_err(|e| format!("{UPSTREAM_CA_VAR}={}: {e}", path.display()))?;
            roots.push(cert.to_vec());
        }
        if roots.len() == before {
            return Err(format!(
                "{UPSTREAM_CA_VAR}={}: no PEM certificate in it",
                path.display()
            ));
        }
    }
    if roots.is_empty() {
        let why: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
        return Err(format!(
            "no trusted authorities for the secrets' servers: the host's trust store is empty or unreadable ({}); install ca-certificates, or name a PEM file in {UPSTREAM_CA_VAR}",
            why.join("; ")
        ));
    }
    Ok(roots)
}

impl std::fmt::Debug for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<secret>")
    }
}

/// A secret that could not be read: the Migrantfile's line and field, and
/// why (never the value).
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {field}: {why}")]
pub struct SecretError {
    pub file: std::path::PathBuf,
    pub line: usize,
    pub field: String,
    pub why: String,
}

impl SecretError {
    pub fn exit_code(&self) -> u8 {
        crate::exit::CONFIG
    }
}

/// Every secret of `cfg`, by name, in file order.
pub fn read_all(cfg: &Config) -> Result<Vec<(String, Value)>, SecretError> {
    cfg.secrets
        .iter()
        .map(|s| {
            read(s, COMMAND_TIMEOUT)
                .map(|v| (s.name.clone(), v))
                .map_err(|why| SecretError {
                    file: cfg.file.clone(),
                    line: s.line,
                    field: s.field(),
                    why,
                })
        })
        .collect()
}

/// One secret's value, read with this process's (the user's) rights.
pub fn read(secret: &Secret, timeout: Duration) -> Result<Value, String> {
    let raw = match &secret.from {
        SecretSource::Env(var) => match std::env::var(var) {
            Ok(v) => v,
            Err(std::env::VarError::NotPresent) => {
                return Err(format!("the environment variable {var} is not set"));
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(format!("the environment variable {var} is not UTF-8 text"));
            }
        },
        SecretSource::File(path) => crate::userfile::read_to_string(path, MAX_LEN as u64)
            .map_err(|e| format!("{}: {e}", path.display()))?,
        SecretSource::Command(line) => run(line, timeout)?,
    };
    value(raw)
}

/// The value of a source's text: one trailing line break dropped (files
/// and commands end with one); empty, or a line break or other control
/// character inside, refused (it goes into an HTTP header).
fn value(mut raw: String) -> Result<Value, String> {
    if raw.ends_with('\n') {
        raw.pop();
        if raw.ends_with('\r') {
            raw.pop();
        }
    }
    if raw.is_empty() {
        return Err("the secret is empty".into());
    }
    if raw.len() > MAX_LEN {
        return Err(format!("the secret is longer than {MAX_LEN} bytes"));
    }
    if raw.chars().any(char::is_control) {
        return Err("the secret contains a line break or another control character".into());
    }
    Ok(Value(raw))
}

/// The standard output of `sh -c LINE`, run in a process group of its own, killed with everything it started after
/// `timeout`.
fn run(line: &str, timeout: Duration) -> Result<String, String> {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(line)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run the command: {e}"))?;
    let pgid = child.id() as i32;
    let (Some(mut out), Some(mut err)) = (child.stdout.take(), child.stderr.take()) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err("the command has no output pipes".into());
    };
    // Read both pipes beside the wait: a full pipe would stall the child.
    // A channel, not a join: a process that left the group may keep the
    // pipe open.
    let (tx, stdout) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut b = Vec::new();
        let r = (&mut out).take(MAX_LEN as u64 + 2).read_to_end(&mut b);
        let _ = tx.send(r.map(|_| b));
    });
    let stderr = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = (&mut err).take(4096).read_to_end(&mut b);
        b
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() >= deadline => break None,
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("waiting for the command: {e}")),
        }
    };
    // Whatever the command left running goes with it (and closes the
    // pipes the readers wait on).
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pgid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let Some(status) = status else {
        let _ = child.wait();
        return Err(format!(
            "the command did not finish within {} s",
            timeout.as_secs()
        ));
    };
    let out = stdout
        .recv_timeout(Duration::from_secs(2))
        .map_err(|_| "the command left a process holding its output open".to_string())?
        .map_err(|e| format!("reading the command's output: {e}"))?;
    let err = stderr.join().unwrap_or_default();
    if !status.success() {
        let said = String::from_utf8_lossy(&err);
        let said = said.trim();
        return Err(match said.is_empty() {
            true => format!("the command failed ({status})"),
            false => format!("the command failed ({status}): {said}"),
        });
    }
    String::from_utf8(out).map_err(|_| "the command's output is not UTF-8 text".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(from: SecretSource) -> Secret {
        Secret {
            name: "TOKEN".into(),
            from,
            hosts: vec!["api.example.com".into()],
            line: 3,
        }
    }

    fn read_cmd(line: &str, timeout: Duration) -> Result<Value, String> {
        read(&secret(SecretSource::Command(line.into())), timeout)
    }

    #[test]
    fn sources_give_their_value_without_the_line_break() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cr3t\n").unwrap_or_else(|e| panic!("{e}"));
        let v = read(&secret(SecretSource::File(file)), COMMAND_TIMEOUT);
        assert_eq!(v.map(|v| v.expose().to_string()), Ok("s3cr3t".into()));
        let v = read_cmd("printf 'from-command\\r\\n'", COMMAND_TIMEOUT);
        assert_eq!(v.map(|v| v.expose().to_string()), Ok("from-command".into()));
        assert_eq!(format!("{:?}", Value("x".into())), "<secret>");
    }

    #[test]
    fn a_bad_source_says_why_and_never_the_value() {
        let unset = read(
            &secret(SecretSource::Env("MIGRANT_TEST_UNSET_VARIABLE".into())),
            COMMAND_TIMEOUT,
        );
        assert!(unset.is_err_and(|e| e.contains("is not set")));
        let missing = read(
            &secret(SecretSource::File("/nonexistent/token".into())),
            COMMAND_TIMEOUT,
        );
        assert!(missing.is_err_and(|e| e.contains("/nonexistent/token")));
        assert!(read_cmd("true", COMMAND_TIMEOUT).is_err_and(|e| e == "the secret is empty"));
        let failed = read_cmd("echo hunter2; echo nope >&2; exit 3", COMMAND_TIMEOUT);
        assert!(
            failed.is_err_and(|e| e.contains("failed")
                && e.contains("nope")
                && !e.contains("hunter2"))
        );
        let two = read_cmd("printf 'a\\nb'", COMMAND_TIMEOUT);
        assert!(two.is_err_and(|e| e.contains("line break")));
    }

    #[test]
    fn a_hanging_command_is_killed_with_what_it_started() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mark = dir.path().join("survived");
        let start = Instant::now();
        let hung = read_cmd(
            &format!("(sleep 2; touch {}) & sleep 60", mark.display()),
            Duration::from_millis(300),
        );
        assert!(hung.is_err_and(|e| e.contains("did not finish")));
        assert!(start.elapsed() < Duration::from_secs(2));
        std::thread::sleep(Duration::from_millis(2500));
        assert!(!mark.exists(), "a process of the command outlived it");
    }
}
