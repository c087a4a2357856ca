//! Before anything runs: the VM's files checked and handed to its
//! identity, its stores mounted, its namespace with the TAP, the tunnel's
//! TUN and every socket the dataplane will get, QEMU's descriptors.

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use super::{Args, SupervisorError, io};
use crate::config::{self, Config};
use crate::error::Error;
use crate::net::netns::NetNs;
use crate::net::plan::NetPlan;
use crate::net::{setup, tap};
use crate::qemu::{self, process};
use crate::state::{self, Record, VmPaths};

pub(super) struct Prepared {
    pub(super) cfg: Config,
    pub(super) rec: Record,
    pub(super) ns: Arc<NetNs>,
    pub(super) tap: std::fs::File,
    /// The VM's network, projected once: the namespace was made from it,
    /// the dataplane gets it.
    pub(super) net: NetPlan,
    pub(super) sockets: setup::Sockets,
    pub(super) qmp_ours: std::os::unix::net::UnixStream,
    pub(super) qmp_theirs: std::os::unix::net::UnixStream,
    pub(super) console: std::os::unix::net::UnixListener,
    /// The serial log's pipe: read end (ours), write end (QEMU's).
    pub(super) serial: (std::os::fd::OwnedFd, std::os::fd::OwnedFd),
    pub(super) identity: process::Identity,
    pub(super) spec: qemu::VmSpec,
    /// Shares to serve, their stores mounted.
    pub(super) served: Vec<crate::share::Served>,
    /// Each share's socket (in `served`'s order): QEMU's end is in `spec`.
    pub(super) fs_ends: Vec<crate::share::virtiofsd::Ends>,
    /// WireGuard mode: the plan, the TUN (in the namespace) and the UDP
    /// socket (in the host's).
    pub(super) wg: Option<(crate::wireguard::Plan, std::fs::File, std::net::UdpSocket)>,
    /// A memory snapshot to restore: its state, open read-only for QEMU.
    pub(super) incoming: Option<std::fs::File>,
    /// A clone: the template's snapshot, open read-only for QEMU.
    pub(super) backing: Option<std::fs::File>,
    /// The machine facts a memory snapshot of this run records (QEMU's
    /// version only after a restore; a snapshot asks for it).
    pub(super) machine: crate::memsnap::Machine,
    /// The disk's virtual size, which bounds the files QEMU may write.
    pub(super) disk_size: u64,
    /// The secrets the dataplane brokers, values included (memory only).
    pub(super) broker: Option<crate::net::dataplane::broker::Plan>,
}

pub(super) fn bind_private(path: &Path) -> Result<std::os::unix::net::UnixListener, Error> {
    let _ = std::fs::remove_file(path);
    let l = std::os::unix::net::UnixListener::bind(path)
        .map_err(io(format!("cannot listen on {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io(format!("chmod {}", path.display())))?;
    Ok(l)
}

/// Give `path` (root's, in the VM's state folder or the image cache) to
/// `uid`:`gid` with `mode`.
fn set_owner(path: &Path, uid: u32, gid: u32, mode: u32) -> Result<(), Error> {
    nix::unistd::chown(
        path,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
    )
    .map_err(|e| io(format!("chown {}", path.display()))(e.into()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io(format!("chmod {}", path.display())))
}

pub(super) fn prepare(args: &Args, vm: &VmPaths) -> Result<Prepared, Error> {
    let cfg = taken_over(args)?;
    let broker = secrets_handed_down(args)?;
    let rec =
        Record::load(&vm.record())?.ok_or_else(|| SupervisorError::NoRecord(vm.name.clone()))?;
    // QEMU, unprivileged and possibly compromised, wrote this disk last
    // time: before it opens it again, its header must still name only the
    // backing file migrant made (not another VM's disk, not a host file).
    let owner = rec.snapshot_owner(vm);
    let snapshot = owner.snapshot();
    let disk_size =
        crate::image::check_disk_chain(&vm.disk(), &[&rec.base_image, &snapshot], false)?;
    // Traverse-only for others: the SSH socket inside belongs to the
    // invoking user (hooks, Ansible and `ssh-config` users reach it).
    state::ensure_dir(&vm.run, 0o711)?;
    // Fail closed before anything runs: drift, forbidden paths, and each
    // store mounted and verified (unmounted again by `cleanup`).
    let served = crate::share::served_by_vm(&cfg, vm)?;
    // QEMU runs unprivileged and opens its files here by name.
    state::ensure_dir(&vm.state, 0o711)?;

    let Network {
        net,
        ns,
        tap,
        sockets,
        wg,
    } = network(&cfg)?;

    let (qmp_ours, qmp_theirs) =
        std::os::unix::net::UnixStream::pair().map_err(io("QMP socket pair"))?;
    let console = bind_private(&vm.console_sock())?;
    let serial = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| io("serial log pipe")(e.into()))?;
    // Each share's socket: QEMU's end goes into its command line, the
    // daemon's is served once the daemons start.
    let fs_ends = served
        .iter()
        .map(|s| {
            crate::share::virtiofsd::socket_ends(&vm.run.join(format!("virtiofsd-{}.sock", s.tag)))
                .map_err(io(format!("cannot make the socket of share {:?}", s.tag)))
        })
        .collect::<Result<Vec<_>, _>>()?;

    // The VM's own identity: QEMU and its tunnel run as it.
    // Without root, the VM's identity is id 1 of the user namespace this
    // process entered (its index was taken then).
    let identity = super::identity::vm_identity();
    let firmware = crate::firmware::resolve(cfg.firmware, cfg.secure_boot, &vm.nvram())?;
    hand_files_to(&identity, &rec, vm, &firmware)?;

    // A clone's QEMU never opens the template's files by name: root opens
    // the snapshot its disk overlays and hands the descriptor over.
    let backing = match &rec.template {
        Some(_) => Some(open_read_only(&snapshot)?),
        None => None,
    };
    let accel = qemu::accel::resolve(cfg.accel)?;
    let size = (cfg.cpus, cfg.memory / (1024 * 1024));
    // QEMU's version is asked only when it matters (a restore here, a
    // memory snapshot later): not at every start.
    let version = match rec.restore_memory {
        true => crate::memsnap::qemu_version().map_err(io("cannot run QEMU for its version"))?,
        false => String::new(),
    };
    let machine = crate::memsnap::Machine::of(&firmware, accel, size, served.len(), version);
    // A memory snapshot is restored only into the machine it was taken
    // on (`up` checked this too, and offers `--cold`).
    let incoming = match rec.restore_memory {
        true => Some(memory_to_restore(&owner, &machine)?),
        false => None,
    };
    let spec = qemu::VmSpec {
        name: cfg.name.clone(),
        cpus: size.0,
        memory_mib: size.1,
        accel,
        firmware,
        disk: vm.disk(),
        seed: vm.seed(),
        mac: rec.mac,
        tap_fd: tap.as_raw_fd(),
        qmp_fd: qmp_theirs.as_raw_fd(),
        console_fd: console.as_raw_fd(),
        serial_fd: serial.1.as_raw_fd(),
        shares: served
            .iter()
            .zip(&fs_ends)
            .map(|(s, e)| qemu::FsDevice {
                tag: s.tag.clone(),
                fd: e.qemu.as_raw_fd(),
            })
            .collect(),
        extra: crate::qemu::extra::for_vm(vm).map_err(io("the VM's extra QEMU arguments"))?,
        incoming_fd: incoming.as_ref().map(|f| f.as_raw_fd()),
        backing_fd: backing.as_ref().map(|f| f.as_raw_fd()),
    };
    Ok(Prepared {
        cfg,
        rec,
        ns,
        tap,
        net,
        sockets,
        qmp_ours,
        qmp_theirs,
        console,
        serial,
        identity,
        spec,
        served,
        fs_ends,
        wg,
        incoming,
        backing,
        machine,
        disk_size,
        broker,
    })
}

/// The config `up` validated, handed down: never the Migrantfile again
/// (it may have changed since, and it is the user's file).
fn taken_over(args: &Args) -> Result<Config, Error> {
    let fd = crate::sandbox::inherited(args.config_fd).map_err(|e| Error::Io {
        what: "the config from `up`".into(),
        source: e,
    })?;
    let cfg = config::Config::taken_over(fd)?;
    if cfg.dir != args.project {
        return Err(SupervisorError::BadRecord(format!(
            "the config handed down is for {}, not {}",
            cfg.dir.display(),
            args.project.display()
        ))
        .into());
    }
    Ok(cfg)
}

/// The secrets `up` read, handed down in memory (never a file).
fn secrets_handed_down(args: &Args) -> Result<Option<crate::net::dataplane::broker::Plan>, Error> {
    let Some(fd) = args.secrets_fd else {
        return Ok(None);
    };
    let what = || "the secrets from `up`".to_string();
    let fd = crate::sandbox::inherited(fd).map_err(|e| Error::Io {
        what: what(),
        source: e,
    })?;
    let json = crate::sandbox::handover::read_back(fd, 16 << 20).map_err(|e| Error::Io {
        what: what(),
        source: e,
    })?;
    serde_json::from_slice(&json)
        .map(Some)
        .map_err(|e| Error::Io {
            what: what(),
            source: std::io::Error::other(e),
        })
}

/// The VM's network as [`network`] makes it.
struct Network {
    net: NetPlan,
    ns: Arc<NetNs>,
    tap: std::fs::File,
    sockets: setup::Sockets,
    wg: Option<(crate::wireguard::Plan, std::fs::File, std::net::UdpSocket)>,
}

/// The VM's namespace with its TAP, the tunnel's TUN and every socket the
/// dataplane will get, all from one [`NetPlan`]; the tunnel's endpoint
/// names are resolved here, once, in the host's namespace.
fn network(cfg: &Config) -> Result<Network, Error> {
    let wg_plan = crate::wireguard::plan_for(cfg)?;
    let net = NetPlan::of(
        cfg,
        wg_plan.as_ref().map(crate::wireguard::Plan::net),
        setup::host_upstreams(),
    );
    let ns = Arc::new(NetNs::create()?);
    let (tap, sockets, tun) = ns.run(|| -> Result<_, Error> {
        let tap = tap::create_tap(tap::TAP_NAME)?;
        let tun = wg_plan
            .as_ref()
            .map(crate::wireguard::create_tun_in_ns)
            .transpose()?;
        let sockets = setup::setup_in_ns(tap::TAP_NAME, &net)?;
        Ok((tap, sockets, tun))
    })??;
    let wg = match (wg_plan, tun) {
        (Some(plan), Some(tun)) => {
            let udp = crate::wireguard::bind_udp(&plan)?;
            Some((plan, tun, udp))
        }
        _ => None,
    };
    Ok(Network {
        net,
        ns,
        tap,
        sockets,
        wg,
    })
}

/// Base images are readable by VM identities only; the snapshot a reset
/// disk overlays, by this VM only; QEMU opens its disk, seed and UEFI
/// variables itself, as `identity`: 0600, its own.
fn hand_files_to(
    identity: &process::Identity,
    rec: &Record,
    vm: &VmPaths,
    firmware: &qemu::FirmwareFiles,
) -> Result<(), Error> {
    set_owner(&rec.base_image, 0, crate::userns::IMAGES_GID, 0o640)?;
    if vm.snapshot().exists() {
        set_owner(&vm.snapshot(), 0, identity.gid.as_raw(), 0o640)?;
    }
    let mut owned = vec![vm.disk(), vm.seed()];
    if let qemu::FirmwareFiles::Uefi { vars, .. } = firmware {
        owned.push(vars.clone());
    }
    // The user's own files (root here), which the VM's identity may
    // use: the user keeps them, outside the namespace too.
    for f in &owned {
        share_with(f, identity.uid.as_raw())?;
    }
    Ok(())
}

/// Make `path` this process's, 0600, with `uid` allowed to read and
/// write it (an ACL entry).
fn share_with(path: &Path, uid: u32) -> Result<(), Error> {
    let file = open_read_only(path)?;
    std::os::unix::fs::fchown(&file, Some(0), Some(0))
        .and_then(|()| crate::acl::let_write(&file, uid))
        .map_err(io(format!("cannot let the VM use {}", path.display())))
}

/// The memory snapshot of `owner` (the VM, or a clone's template), open
/// read-only for QEMU, if `machine` is the one it was taken on.
fn memory_to_restore(
    owner: &VmPaths,
    machine: &crate::memsnap::Machine,
) -> Result<std::fs::File, Error> {
    let meta = crate::memsnap::load(owner).ok_or(SupervisorError::Snapshot(
        "the memory snapshot to restore is gone; `migrant up --cold` boots the disk".into(),
    ))?;
    if let Some(why) = meta.mismatch(machine) {
        return Err(SupervisorError::Snapshot(format!(
            "the memory snapshot cannot be restored: {why}; `migrant up --cold` boots the disk instead"
        )).into());
    }
    open_read_only(&owner.snapshot_state())
}

/// Open one of the supervisor's files read-only, never through a symlink.
fn open_read_only(path: &Path) -> Result<std::fs::File, Error> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io(format!("cannot open {}", path.display())))
}
