//! Start-up progress, sent by the supervisor to `migrant up` over a pipe,
//! one JSON object per line. EOF before `Sshd` means the start failed.

use serde::{Deserialize, Serialize};
use std::io::Write;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Progress {
    /// QEMU runs.
    Qemu {
        pid: u32,
        accel: String,
        user: String,
    },
    /// The WireGuard tunnel completed its first handshakes (before QEMU).
    Tunnel {
        peers: Vec<String>,
        dns: Vec<String>,
    },
    /// A memory snapshot was loaded and the guest resumed.
    Restored { ms: u64 },
    /// The guest took its DHCP lease.
    Lease { ip: String },
    /// The guest's SSH server answers.
    Sshd,
    /// Start-up failed; the supervisor is exiting.
    Failed { message: String, code: u8 },
}

/// The supervisor's end of the pipe. Writes are best effort: if `up` went
/// away, the VM keeps running.
pub struct Reporter {
    out: Option<std::fs::File>,
}

impl Reporter {
    pub fn new(out: Option<std::fs::File>) -> Self {
        Reporter { out }
    }
    pub fn send(&mut self, p: &Progress) {
        if let Some(out) = self.out.as_mut() {
            let mut line = serde_json::to_vec(p).unwrap_or_default();
            line.push(b'\n');
            if out.write_all(&line).is_err() {
                self.out = None;
            }
        }
    }
    /// Close the pipe: `up` stops listening.
    pub fn close(&mut self) {
        self.out = None;
    }
}
