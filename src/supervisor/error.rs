//! The supervisor's own failures (every other module's error reaches the
//! supervisor as [`crate::error::Error`], gathered there once).

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("VM {0} has no record; run `migrant up`")]
    NoRecord(String),
    #[error("the VM's record is damaged: {0}")]
    BadRecord(String),
    #[error("{0}")]
    Snapshot(String),
    #[error("QEMU exited during start-up ({status}); last lines of its log:\n{log}")]
    QemuExited { status: String, log: String },
}

impl SupervisorError {
    pub fn exit_code(&self) -> u8 {
        use crate::exit;
        match self {
            SupervisorError::NoRecord(_) => exit::USAGE,
            SupervisorError::BadRecord(_) => exit::DATAERR,
            SupervisorError::Snapshot(_) => exit::CONFIG,
            SupervisorError::QemuExited { .. } => exit::SOFTWARE,
        }
    }
}
