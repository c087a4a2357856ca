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
    /// Grow the VM's disk to `size` bytes, live (QMP `block_resize`).
    /// Refused when smaller than the disk is now.
    Resize { size: u64 },
    /// Pause the guest and save its memory, device state and disk as the
    /// VM's snapshot; then resume it, or stop QEMU when `stop`.
    SaveMemory { stop: bool },
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
        network: crate::net::dataplane::stats::StatsView,
    },
    Info(Info),
    Done,
    /// The disk's size before and after a [`Request::Resize`].
    Resized {
        from: u64,
        to: u64,
    },
    /// A [`Request::SaveMemory`] done.
    MemorySaved {
        state_bytes: u64,
        disk_bytes: u64,
        paused_ms: u64,
        stopped: bool,
    },
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
        let r = Request::Resize { size: 1 << 30 };
        let s = serde_json::to_string(&r).unwrap_or_default();
        assert_eq!(s, r#"{"op":"resize","size":1073741824}"#);
        let a = Response::Resized { from: 1, to: 2 };
        let s = serde_json::to_string(&a).unwrap_or_default();
        assert_eq!(serde_json::from_str::<Response>(&s).ok(), Some(a));
    }
}
