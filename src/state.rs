//! Where things live, per-VM locks and records.
//!
//! * images cache: `$MIGRANT_HOME/images` (default
//!   `$XDG_DATA_HOME/migrant`, i.e. `~/.local/share/migrant`)
//! * per-VM state: `$MIGRANT_HOME/vms/<name>/`
//! * runtime: `$MIGRANT_RUNTIME/<name>/` (default
//!   `$XDG_RUNTIME_DIR/migrant` when that is the user's alone, else
//!   `$MIGRANT_HOME/run`)
//! * VM identities in use (their VMs' indexes in the user's subordinate
//!   range): `.local/share/migrant/ids` in the user's passwd home, one
//!   registry per user whatever the environment says
//!
//! Every record write is write-temp, fsync, rename.

use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: permission denied: a VM's state belongs to the user who made it; run migrant as that user"
    )]
    Denied {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("VM {name} is busy: another migrant command or its supervisor holds {lock}")]
    Locked { name: String, lock: PathBuf },
    #[error("corrupt record {path}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl StateError {
    pub fn exit_code(&self) -> u8 {
        match self {
            StateError::Denied { .. } => crate::exit::NOPERM,
            StateError::Io { .. } => crate::exit::SOFTWARE,
            StateError::Locked { .. } => crate::exit::TEMPFAIL,
            StateError::Corrupt { .. } => crate::exit::DATAERR,
        }
    }
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| {
        let path = path.to_path_buf();
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            StateError::Denied { path, source }
        } else {
            StateError::Io { path, source }
        }
    }
}

/// The directories migrant uses, resolved once from the environment.
#[derive(Debug, Clone)]
pub struct Paths {
    pub home: PathBuf,
    pub runtime: PathBuf,
}

impl Paths {
    pub fn from_env() -> Self {
        let home = std::env::var_os("MIGRANT_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| user_data_home().join("migrant"));
        let runtime = std::env::var_os("MIGRANT_RUNTIME")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                user_runtime_dir()
                    .map(|d| d.join("migrant"))
                    .unwrap_or_else(|| home.join("run"))
            });
        Paths { home, runtime }
    }
    /// Where the VM identities in use are registered (indexes into the
    /// user's subordinate range): one registry per user, in their passwd
    /// home whatever `HOME`, `XDG_DATA_HOME` or `MIGRANT_HOME` say, so two
    /// VMs of one user never share an identity (a CI runner's jobs may
    /// each have a home of their own). Under `MIGRANT_HOME` only for a
    /// user without a passwd entry.
    pub fn ids(&self) -> PathBuf {
        nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten()
            .map(|u| u.dir.join(".local/share/migrant/ids"))
            .unwrap_or_else(|| self.home.join("ids"))
    }
    pub fn images(&self) -> PathBuf {
        self.home.join("images")
    }
    pub fn vms(&self) -> PathBuf {
        self.home.join("vms")
    }
    pub fn vm(&self, name: &str) -> VmPaths {
        VmPaths {
            name: name.to_string(),
            state: self.vms().join(name),
            run: self.runtime.join(name),
        }
    }
}

/// `$XDG_DATA_HOME` when absolute, else `~/.local/share` (the home from
/// `$HOME`, else the password database).
fn user_data_home() -> PathBuf {
    let absolute = |v: Option<std::ffi::OsString>| v.map(PathBuf::from).filter(|p| p.is_absolute());
    if let Some(d) = absolute(std::env::var_os("XDG_DATA_HOME")) {
        return d;
    }
    let home = absolute(std::env::var_os("HOME")).unwrap_or_else(|| {
        nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten()
            .map(|u| u.dir)
            .unwrap_or_else(|| PathBuf::from("/nonexistent"))
    });
    home.join(".local/share")
}

/// `$XDG_RUNTIME_DIR` when it is a folder of this user's that nobody
/// else may enter (an inherited one, e.g. root's through `runuser`, is
/// not).
fn user_runtime_dir() -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    let dir = PathBuf::from(std::env::var_os("XDG_RUNTIME_DIR")?);
    let meta = std::fs::symlink_metadata(&dir).ok()?;
    (dir.is_absolute()
        && meta.is_dir()
        && meta.uid() == nix::unistd::getuid().as_raw()
        && meta.mode() & 0o077 == 0)
        .then_some(dir)
}

/// The files of one VM.
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub name: String,
    pub state: PathBuf,
    pub run: PathBuf,
}

impl VmPaths {
    pub fn lock(&self) -> PathBuf {
        self.state.join("lock")
    }
    pub fn record(&self) -> PathBuf {
        self.state.join("record.json")
    }
    pub fn disk(&self) -> PathBuf {
        self.state.join("disk.qcow2")
    }
    pub fn seed(&self) -> PathBuf {
        self.state.join("seed.img")
    }
    pub fn nvram(&self) -> PathBuf {
        self.state.join("nvram.fd")
    }
    /// The flattened disk `migrant snapshot` saved.
    pub fn snapshot(&self) -> PathBuf {
        self.state.join("snapshot.qcow2")
    }
    /// The UEFI variables saved with the snapshot.
    pub fn snapshot_nvram(&self) -> PathBuf {
        self.state.join("snapshot-nvram.fd")
    }
    /// A memory snapshot's saved memory and device state (QEMU's
    /// migration stream), beside the disk it belongs to.
    pub fn snapshot_state(&self) -> PathBuf {
        self.state.join("snapshot.vmstate")
    }
    /// What a memory snapshot was taken with (see `crate::memsnap`); its
    /// presence makes the snapshot a memory snapshot.
    pub fn snapshot_meta(&self) -> PathBuf {
        self.state.join("snapshot.json")
    }
    pub fn serial_log(&self) -> PathBuf {
        self.state.join("serial.log")
    }
    pub fn supervisor_log(&self) -> PathBuf {
        self.state.join("supervisor.log")
    }
    pub fn control_sock(&self) -> PathBuf {
        self.run.join("control.sock")
    }
    pub fn qmp_sock(&self) -> PathBuf {
        self.run.join("qmp.sock")
    }
    pub fn ssh_sock(&self) -> PathBuf {
        self.run.join("ssh.sock")
    }
    pub fn console_sock(&self) -> PathBuf {
        self.run.join("console.sock")
    }
}

/// Open a log in a VM's state folder for appending: 0600 (an older one
/// is made 0600 too: logs hold what the guest did and said), never
/// through a symlink.
pub fn open_log(path: &Path) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

/// Create `dir` (and parents) with `mode` on the last component.
pub fn ensure_dir(dir: &Path, mode: u32) -> Result<(), StateError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(io_err(dir))
}

/// Atomically replace `path` with `data`: write a temporary file beside it,
/// fsync it, rename it over `path`, fsync the directory.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), StateError> {
    write_replacing(path, data, mode, |_| ())
}

/// [`write_atomic`] for a file only root and the VM's owner (`reader`, if
/// any) may read: 0600 plus an ACL entry for the owner ([`crate::acl`]).
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), StateError> {
    write_replacing(path, data, 0o600, |_| {})
}

fn write_replacing(
    path: &Path,
    data: &[u8],
    mode: u32,
    prepare: impl FnOnce(&File),
) -> Result<(), StateError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        prepare(&f);
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

/// What the VM is doing, as last recorded.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Disk exists, nothing runs.
    Stopped,
    /// The supervisor is starting QEMU or waiting for the guest.
    Starting,
    Running,
    Paused,
    /// The supervisor is stopping the VM.
    Stopping,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            VmState::Stopped => "stopped",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
        };
        f.write_str(s)
    }
}

/// Copy `from` to `to` through a temporary file beside it, fsync and a
/// rename: `to` is the old file or the whole new one.
pub fn copy_atomic(from: &Path, to: &Path) -> std::io::Result<()> {
    let tmp = to.with_file_name(format!(
        ".{}.tmp",
        to.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let r = std::fs::copy(from, &tmp)
        .and_then(|_| File::open(&tmp)?.sync_all())
        .and_then(|_| std::fs::rename(&tmp, to));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// A MAC address: six octets, written `52:54:00:ab:cd:ef` (a record that
/// holds anything else is damaged, never read as a made-up address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Mac(pub [u8; 6]);

impl std::str::FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Mac, String> {
        let bad = || format!("{s:?} is not a MAC address (six pairs of hex digits)");
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for octet in &mut mac {
            let part = parts
                .next()
                .filter(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(bad)?;
            *octet = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        match parts.next() {
            Some(_) => Err(bad()),
            None => Ok(Mac(mac)),
        }
    }
}

impl TryFrom<String> for Mac {
    type Error = String;
    fn try_from(s: String) -> Result<Mac, String> {
        s.parse()
    }
}

impl From<Mac> for String {
    fn from(m: Mac) -> String {
        m.to_string()
    }
}

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// The persistent record of one VM (`record.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub name: String,
    /// Project folder that holds the Migrantfile.
    pub project_dir: PathBuf,
    /// Cached base image the disk overlays.
    pub base_image: PathBuf,
    pub mac: Mac,
    pub guest_ip: std::net::Ipv4Addr,
    /// Unix seconds.
    pub created_at: u64,
    pub state: VmState,
    #[serde(default)]
    pub supervisor_pid: Option<u32>,
    #[serde(default)]
    pub qemu_pid: Option<u32>,
    /// Accelerator the running QEMU uses ("kvm"/"tcg").
    #[serde(default)]
    pub accel: Option<String>,
    /// User QEMU runs as.
    #[serde(default)]
    pub qemu_user: Option<String>,
    /// Unix seconds when the current boot started.
    #[serde(default)]
    pub started_at: Option<u64>,
    /// The last reason the VM stopped (guest power-off, halt, crash...).
    #[serde(default)]
    pub last_stop: Option<String>,
    /// Provisioning (playbook) completed once.
    #[serde(default)]
    pub provisioned: bool,
    /// CPUs of the current (or last) boot.
    #[serde(default)]
    pub cpus: Option<u32>,
    /// Memory in bytes of the current (or last) boot.
    #[serde(default)]
    pub memory: Option<u64>,
    /// The VM's own uid and gid (QEMU and its tunnel run as it), from
    /// [`allocate_vm_id`]; released with the record at `destroy`.
    #[serde(default)]
    pub vm_id: Option<u32>,
    /// cloud-init has finished its first run in this VM: later boots do
    /// not wait for it.
    #[serde(default)]
    pub cloud_init_done: bool,
    /// The disk is a fresh overlay on a memory snapshot: the next start
    /// restores the saved memory instead of booting (cleared once QEMU
    /// runs on that disk).
    #[serde(default)]
    pub restore_memory: bool,
    /// A clone (`run --clone`): the VM whose snapshot its disk overlays.
    #[serde(default)]
    pub template: Option<String>,
}

/// The identity (index) of the VM at `vm`, in the registry `dir` of
/// [`Paths::ids`] (one file per id in use, holding the VM's state
/// folder): the one it has if the registry still gives it that id, else the lowest id of
/// `base .. base + count` that no live VM holds. An entry whose VM is gone
/// (no record, or a record with another id) is free: a VM destroyed
/// without releasing its id, or a registry from before, cannot block one.
/// Serialised by a lock on the registry, so two `up`s cannot take one id.
pub fn allocate_vm_id(
    dir: &Path,
    vm: &VmPaths,
    current: Option<u32>,
    (base, count): (u32, u32),
) -> Result<u32, StateError> {
    ensure_dir(dir, 0o700)?;
    let lock_path = dir.join(".lock");
    let lock = crate::lockfile::open(&lock_path).map_err(io_err(&lock_path))?;
    crate::lockfile::lock(&lock, true).map_err(io_err(&lock_path))?;
    let me = vm.state.to_string_lossy().into_owned();
    // Who holds `id`: a VM whose record still says so.
    let holder = |id: u32| -> Option<String> {
        let owner = std::fs::read_to_string(dir.join(id.to_string())).ok()?;
        let rec = Record::load(&Path::new(&owner).join("record.json")).ok()??;
        (rec.vm_id == Some(id) || owner == me).then_some(owner)
    };
    let id = match current {
        Some(id) if holder(id).is_none_or(|o| o == me) => id,
        _ => (base..base.saturating_add(count))
            .find(|id| holder(*id).is_none())
            .ok_or_else(|| {
                io_err(dir)(std::io::Error::other(format!(
                    "all {count} VM identities are in use"
                )))
            })?,
    };
    write_atomic(&dir.join(id.to_string()), me.as_bytes(), 0o600)?;
    // Recorded before the lock goes, so the next allocation sees it.
    if let Some(mut rec) = Record::load(&vm.record())? {
        rec.vm_id = Some(id);
        rec.save(&vm.record())?;
    }
    drop(lock);
    Ok(id)
}

/// Give the VM's identity back (at `destroy`); an entry another VM holds
/// is left alone.
pub fn release_vm_id(dir: &Path, vm: &VmPaths, id: u32) {
    let entry = dir.join(id.to_string());
    if std::fs::read_to_string(&entry).is_ok_and(|owner| Path::new(&owner) == vm.state) {
        let _ = std::fs::remove_file(entry);
    }
}

impl Record {
    /// The VM whose snapshot this VM's disk may overlay: itself, or a
    /// clone's template.
    pub fn snapshot_owner(&self, vm: &VmPaths) -> VmPaths {
        match &self.template {
            Some(t) => Paths::from_env().vm(t),
            None => vm.clone(),
        }
    }

    pub fn load(path: &Path) -> Result<Option<Record>, StateError> {
        match std::fs::read(path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|source| StateError::Corrupt {
                        path: path.to_path_buf(),
                        source,
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(path)(e)),
        }
    }
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let mut data = serde_json::to_vec_pretty(self).map_err(|source| StateError::Corrupt {
            path: path.to_path_buf(),
            source,
        })?;
        data.push(b'\n');
        write_private(path, &data)
    }
    /// Load, change and save the record at `path`.
    pub fn update(path: &Path, f: impl FnOnce(&mut Record)) -> Result<Option<Record>, StateError> {
        let Some(mut rec) = Record::load(path)? else {
            return Ok(None);
        };
        f(&mut rec);
        rec.save(path)?;
        Ok(Some(rec))
    }
}

/// An exclusive `flock` on a VM's lock file, held until dropped. The
/// supervisor inherits it for the VM's whole life, so "lock free" means
/// "nothing runs this VM".
#[derive(Debug)]
pub struct VmLock {
    file: File,
}

impl VmLock {
    /// Take the lock without waiting; a held lock is [`StateError::Locked`].
    pub fn try_acquire(vm: &VmPaths) -> Result<VmLock, StateError> {
        if !vm.state.exists() {
            // Traverse-only for others: QEMU, unprivileged, opens the files
            // it owns in here by name; it cannot list the folder.
            ensure_dir(&vm.state, 0o711)?;
        }
        let path = vm.lock();
        let file = crate::lockfile::open(&path).map_err(io_err(&path))?;
        if crate::lockfile::lock(&file, false).map_err(io_err(&path))? {
            Ok(VmLock { file })
        } else {
            Err(StateError::Locked {
                name: vm.name.clone(),
                lock: path,
            })
        }
    }

    /// Whether some process holds the lock now (without keeping it).
    pub fn is_held(vm: &VmPaths) -> bool {
        if !vm.lock().exists() {
            return false;
        }
        match VmLock::try_acquire(vm) {
            Err(StateError::Locked { .. }) => true,
            // Not root (a hook running `migrant ssh` as the invoking
            // user): the recorded supervisor, if it still runs, stands in
            // for the lock it holds.
            Err(StateError::Denied { .. }) => recorded_supervisor_runs(vm),
            _ => false,
        }
    }

    /// The descriptor, to be inherited by the supervisor. The lock belongs
    /// to the open file description: it stays held while any process keeps
    /// a descriptor of it open.
    pub fn as_file(&self) -> &File {
        &self.file
    }

    /// Adopt a lock descriptor inherited from the parent (`migrant up`).
    pub fn from_inherited(file: File) -> VmLock {
        VmLock { file }
    }
}

fn recorded_supervisor_runs(vm: &VmPaths) -> bool {
    let Ok(Some(rec)) = Record::load(&vm.record()) else {
        return false;
    };
    let Some(pid) = rec.supervisor_pid else {
        return false;
    };
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let args: Vec<&[u8]> = c.split(|&b| b == 0).collect();
            args.contains(&b"__supervisor".as_slice()) && args.contains(&vm.name.as_bytes())
        })
        .unwrap_or(false)
}

/// Seconds since the Unix epoch.
/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        let m: Mac = "52:54:00:AB:cd:ef"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m, Mac([0x52, 0x54, 0, 0xab, 0xcd, 0xef]));
        assert_eq!(m.to_string(), "52:54:00:ab:cd:ef");
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:01",
            "52:54:00:ab:cd:zz",
            "5:54:00:ab:cd:ef",
            "52:54:00:ab:cd:+f",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
        // In a record: a damaged one is refused, never read as zeros.
        assert!(serde_json::from_str::<Mac>("\"52:54:00:ab:cd\"").is_err());
        assert_eq!(
            serde_json::to_string(&m).unwrap_or_default(),
            "\"52:54:00:ab:cd:ef\""
        );
    }
}
