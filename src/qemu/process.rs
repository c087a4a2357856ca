//! Starting QEMU: unprivileged, inside the VM's namespace, tied to the
//! supervisor's life.

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::Path;
use std::process::Stdio;

use nix::unistd::{Gid, Uid, User};

/// The user QEMU runs as. Created on first use when missing.
pub const QEMU_USER: &str = "migrant-qemu";

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
    #[error("cannot look up or create the unprivileged user {QEMU_USER}: {0}")]
    User(String),
}

impl ProcessError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ProcessError::NotFound => crate::exit::UNAVAILABLE,
            ProcessError::Spawn(_) | ProcessError::User(_) => crate::exit::SOFTWARE,
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

/// The first uid (and gid) of the range VM identities come from: numbers
/// no distribution gives to users or subordinate id ranges (those start at
/// 100000 and grow by 65536 per user).
pub const VM_ID_BASE: u32 = 0x6d00_0000;
/// How many VM identities there can be at once.
pub const VM_ID_COUNT: u32 = 65_536;
/// The group whose members may read the image cache (base images).
pub const IMAGE_GROUP: &str = "migrant-vm";

/// A group's id, creating the system group when missing.
pub fn system_group(name: &str) -> Result<Gid, ProcessError> {
    let find = || {
        nix::unistd::Group::from_name(name)
            .map_err(|e| ProcessError::User(e.to_string()))
            .map(|g| g.map(|g| g.gid))
    };
    if let Some(g) = find()? {
        return Ok(g);
    }
    let status = std::process::Command::new("groupadd")
        .args(["--system", name])
        .stdin(Stdio::null())
        .status()
        .map_err(|e| ProcessError::User(format!("groupadd: {e}")))?;
    if !status.success() && find()?.is_none() {
        return Err(ProcessError::User(format!(
            "groupadd {name} exited with {status}"
        )));
    }
    find()?.ok_or_else(|| ProcessError::User(format!("group {name} missing after groupadd")))
}

/// The identity of one VM: its own uid and gid (numbers from the VM range,
/// without a passwd entry), and the groups that let it use /dev/kvm and
/// read base images. QEMU and the tunnel of that VM run as it, so a
/// compromised QEMU cannot read, signal or ptrace another VM's files and
/// processes.
pub fn vm_identity(id: u32) -> Result<Identity, ProcessError> {
    let mut groups = vec![system_group(IMAGE_GROUP)?];
    if let Ok(Some(kvm)) = nix::unistd::Group::from_name("kvm") {
        groups.push(kvm.gid);
    }
    Ok(Identity {
        name: format!("vm-{id}"),
        uid: Uid::from_raw(id),
        gid: Gid::from_raw(id),
        groups,
    })
}

fn lookup(name: &str) -> Result<Option<Identity>, ProcessError> {
    let Some(u) = User::from_name(name).map_err(|e| ProcessError::User(e.to_string()))? else {
        return Ok(None);
    };
    let cname = CString::new(u.name.clone()).map_err(|e| ProcessError::User(e.to_string()))?;
    let groups = nix::unistd::getgrouplist(&cname, u.gid)
        .map_err(|e| ProcessError::User(format!("groups of {}: {e}", u.name)))?;
    Ok(Some(Identity {
        name: u.name,
        uid: u.uid,
        gid: u.gid,
        groups,
    }))
}

/// The identity QEMU runs as; the system user is created if missing.
pub fn qemu_identity() -> Result<Identity, ProcessError> {
    if let Some(id) = lookup(QEMU_USER)? {
        return Ok(id);
    }
    tracing::info!("creating system user {QEMU_USER} for QEMU");
    let status = std::process::Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            "--user-group",
            QEMU_USER,
        ])
        .stdin(Stdio::null())
        .status()
        .map_err(|e| ProcessError::User(format!("useradd: {e}")))?;
    if !status.success() && lookup(QEMU_USER)?.is_none() {
        return Err(ProcessError::User(format!("useradd exited with {status}")));
    }
    lookup(QEMU_USER)?.ok_or_else(|| ProcessError::User("user missing after useradd".into()))
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
