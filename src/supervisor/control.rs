//! The supervisor's control socket: one JSON request per line, one JSON
//! response per line. The CLI side is synchronous (no runtime needed).

use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Liveness and state.
    Status,
    /// Facts from QMP.
    Info,
    /// Stop the VM: ACPI power-down first unless `force`; forced stop after
    /// `timeout_secs`. Answered once QEMU has exited.
    Halt { force: bool, timeout_secs: u64 },
    /// Resume a paused VM.
    Resume,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Info {
    pub status: String,
    pub running: bool,
    pub accelerator: String,
    pub kvm_enabled: bool,
    pub cpus: usize,
    pub memory_bytes: u64,
    pub qemu_pid: Option<u32>,
    pub supervisor_pid: u32,
    pub qemu_user: String,
    pub uptime_secs: u64,
    pub guest_ip: String,
    pub lease_seen: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status {
        state: String,
        lease_seen: bool,
        /// Egress counters.
        network: crate::net::proxy::StatsView,
    },
    Info(Info),
    Done,
    Error {
        message: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the VM's supervisor does not answer on {path}")]
    Connect {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the VM's supervisor")]
    Io(#[from] std::io::Error),
    #[error("the supervisor sent a malformed answer")]
    Protocol(#[from] serde_json::Error),
    #[error("the supervisor refused: {0}")]
    Refused(String),
}

impl ControlError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ControlError::Connect { .. } => crate::exit::TEMPFAIL,
            _ => crate::exit::SOFTWARE,
        }
    }
}

/// Send one request and wait up to `timeout` for the answer.
pub fn request(sock: &Path, req: &Request, timeout: Duration) -> Result<Response, ControlError> {
    let mut stream = UnixStream::connect(sock).map_err(|source| ControlError::Connect {
        path: sock.to_path_buf(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    if answer.is_empty() {
        return Err(ControlError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "supervisor closed the connection",
        )));
    }
    match serde_json::from_str(&answer)? {
        Response::Error { message } => Err(ControlError::Refused(message)),
        r => Ok(r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_json_lines() {
        let r = Request::Halt {
            force: false,
            timeout_secs: 60,
        };
        let s = serde_json::to_string(&r).unwrap_or_default();
        assert_eq!(s, r#"{"op":"halt","force":false,"timeout_secs":60}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).ok(), Some(r));
        assert!(serde_json::from_str::<Request>(r#"{"op":"format_disk"}"#).is_err());
    }
}
