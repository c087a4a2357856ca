//! Starting QEMU: unprivileged, inside the VM's namespace, tied to the
//! supervisor's life.

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::Path;
use std::process::Stdio;

use nix::unistd::{Gid, Uid};

/// The QEMU binary used for every VM.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error(
        "{QEMU_BINARY} not found in PATH; install it (scripts/setup or apt-get install qemu-system-x86)"
    )]
    NotFound,
    #[error("cannot start {QEMU_BINARY}")]
    Spawn(#[source] std::io::Error),
}

impl ProcessError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ProcessError::NotFound => crate::exit::UNAVAILABLE,
            ProcessError::Spawn(_) => crate::exit::SOFTWARE,
        }
    }
}

/// An unprivileged identity, its supplementary groups resolved (before
/// any fork: a forked child may not read /etc/group).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    pub groups: Vec<Gid>,
}

/// Find `program` in PATH.
pub fn which(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// What to start and how.
pub struct Launch<'a> {
    pub argv: Vec<String>,
    /// Enter this network namespace before exec.
    pub netns: BorrowedFd<'a>,
    /// Drop to this identity before exec.
    pub identity: &'a Identity,
    /// Descriptors QEMU must inherit (they are named in the argv).
    pub keep_fds: Vec<RawFd>,
    /// QEMU's stdout and stderr go here, through a pipe (rotated at
    /// [`LOG_CAP`]).
    pub log: &'a Path,
    /// The largest file QEMU may write (`RLIMIT_FSIZE`): its disk's
    /// virtual size and the image format's metadata, so that a
    /// compromised QEMU cannot grow a file it writes past what the guest
    /// was given.
    pub max_file_size: u64,
}

/// `qemu.log` is rotated at this size (QEMU writes a pipe, never the
/// file).
pub const LOG_CAP: u64 = crate::rotate::HELPER_LOG_CAP;

/// The largest file a QEMU whose disk has `virtual_size` bytes may
/// write: every cluster of the disk allocated, the format's tables for
/// them (a qcow2 L2 entry and a refcount per 64 KiB cluster: under 1/4096
/// of the size), leaked clusters of interrupted writes and the NVRAM
/// variables, with room to spare (1/64 + 256 MiB).
pub fn max_file_size(virtual_size: u64) -> u64 {
    virtual_size
        .saturating_add(virtual_size / 64)
        .saturating_add(256 << 20)
}

/// Start QEMU. Must be called from the thread that lives as long as the VM
/// (the supervisor's main thread): the parent-death signal fires when the
/// thread that forked exits.
pub fn spawn(
    launch: Launch<'_>,
) -> Result<(tokio::process::Child, crate::rotate::Drain), ProcessError> {
    let program = which(QEMU_BINARY).ok_or(ProcessError::NotFound)?;
    let (log, drain) =
        crate::rotate::capped_log("qemu-log", launch.log, LOG_CAP).map_err(ProcessError::Spawn)?;
    let log2 = log.try_clone().map_err(ProcessError::Spawn)?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(&launch.argv)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .kill_on_drop(true);
    crate::sandbox::Confine {
        keep_fds: launch.keep_fds.clone(),
        netns: Some(launch.netns.as_raw_fd()),
        identity: Some((
            launch.identity.uid.as_raw(),
            launch.identity.gid.as_raw(),
            launch.identity.groups.iter().map(|g| g.as_raw()).collect(),
        )),
        no_new_privs: true,
        die_with_parent: true,
        max_file_size: Some(launch.max_file_size),
        new_session: false,
    }
    .apply(&mut cmd);
    let child = cmd.spawn().map_err(ProcessError::Spawn)?;
    Ok((child, drain))
}
