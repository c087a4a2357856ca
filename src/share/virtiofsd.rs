//! The embedded virtiofsd: `migrant __virtiofsd --fd N --shared-dir DIR
//! --tag TAG`, run by the supervisor once per share and handled by `main`
//! before any runtime starts (virtiofsd forks, unshares and blocks).
//!
//! It is the `virtiofsd` crate's own daemon, driven as a library with
//! fixed, conservative settings: the namespace sandbox (new mount, PID and
//! network namespaces, the share as the root), seccomp with `kill`, file
//! handles off, no xattrs, capabilities reduced to the set it needs to
//! create files as the guest's users.

use std::collections::HashSet;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use virtiofsd::passthrough::{self, CachePolicy, InodeFileHandlesMode, PassthroughFs};
use virtiofsd::sandbox::{Sandbox, SandboxMode};
use virtiofsd::vhost_user::VhostUserFsBackendBuilder;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// Arguments of the hidden `__virtiofsd` mode.
#[derive(Debug, Clone)]
pub struct Args {
    /// Inherited listening unix socket (vhost-user); the supervisor has
    /// already connected QEMU's end to it.
    pub fd: RawFd,
    /// The folder served as the file system's root.
    pub shared_dir: PathBuf,
    /// The virtiofs tag (logged; QEMU announces the tag itself).
    pub tag: String,
    /// `UID:GID`: the share's files all belong to this owner (the
    /// folder's) on the host, whatever guest user makes them.
    pub owner: String,
    /// `UID:GID`: the guest's login user, whom the guest sees owning the
    /// owner's files (so it writes there without `sudo`).
    pub guest_owner: String,
    /// The folder is an isolated share's store, capped at this many bytes
    /// (served through [`super::guard`]).
    pub cap: Option<u64>,
}

/// Descriptors reserved for the daemon itself (memory slots and threads),
/// as virtiofsd's own main does.
const INTERNAL_FD_RESERVE: u64 = 509 + 100 + 1;

/// Capabilities the sandboxed daemon keeps: what a passthrough file system
/// needs to act for the guest's users. Everything else is dropped.
const CAPS: [&str; 8] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "SETGID",
    "SETUID",
    "MKNOD",
    "SETFCAP",
];

extern "C" fn on_signal(_: libc::c_int) {
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(1) };
}

fn set_signal_handlers() -> std::io::Result<()> {
    for sig in [libc::SIGHUP, libc::SIGTERM] {
        // SAFETY: installs a handler that only calls _exit; the sigaction
        // struct is zero-initialised and fully set before use.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn fail(tag: &str, what: impl std::fmt::Display) -> u8 {
    eprintln!("migrant virtiofsd [{tag}]: {what}");
    1
}

/// What no share's server may do, on top of [`CAPS`] (every guest id is
/// squashed to the folder's owner): make device nodes (a block device node the user owns is the host's disk) or
/// set file capabilities.
const SQUASHED_DROPS: [&str; 2] = ["MKNOD", "SETFCAP"];

/// `UID:GID` as the two ids.
fn parse_owner(text: &str) -> Option<(u32, u32)> {
    let (u, g) = text.split_once(':')?;
    Some((u.parse().ok()?, g.parse().ok()?))
}

/// Entry point of `migrant __virtiofsd`; returns the exit code. Never
/// returns in the sandbox's outer process (it waits for the inner one and
/// exits with its status).
pub fn main(args: Args) -> u8 {
    let tag = args.tag.clone();
    let Some((uid, gid)) = parse_owner(&args.owner) else {
        return fail(&tag, "--owner must be UID:GID");
    };
    let Some((guest_uid, guest_gid)) = parse_owner(&args.guest_owner) else {
        return fail(&tag, "--guest-owner must be UID:GID");
    };
    let uid_map = Some(owner_maps(uid, guest_uid));
    let gid_map = Some(owner_maps(gid, guest_gid));
    if let Err(e) = set_signal_handlers() {
        return fail(&tag, format!("signal handlers: {e}"));
    }
    // The listening socket the supervisor made for us.
    let listener = match crate::sandbox::inherited(args.fd) {
        Ok(fd) => Listener::from(std::os::unix::net::UnixListener::from(fd)),
        Err(e) => return fail(&tag, e.to_string()),
    };

    let shared_dir = match args.shared_dir.to_str() {
        Some(s) if Path::new(s).is_dir() => s.to_string(),
        _ => {
            return fail(
                &tag,
                format!("{} is not a folder", args.shared_dir.display()),
            );
        }
    };
    let fd_limit = match virtiofsd::limits::setup_rlimit_nofile(None) {
        Ok(n) => n,
        Err(e) => return fail(&tag, format!("raising the open-file limit: {e}")),
    };
    let guest_fd_limit = fd_limit.saturating_sub(INTERNAL_FD_RESERVE).max(128);

    let mut sandbox = Sandbox::new(
        shared_dir.clone(),
        SandboxMode::Namespace,
        Vec::new(),
        Vec::new(),
    );
    // Forks: the outer process waits for the sandboxed inner one and exits
    // with its status; only the inner process returns from `enter`.
    let listener = match sandbox.enter(listener) {
        Ok(l) => l,
        Err(e) => return fail(&tag, format!("entering the sandbox: {e}")),
    };

    let timeout = Duration::from_secs(1);
    let root = sandbox.get_root_dir();
    let cfg = passthrough::Config {
        entry_timeout: timeout,
        attr_timeout: timeout,
        // Direct I/O, when the guest's kernel allows it, comes from
        // `ByKernel`; this is the policy for every other kernel.
        cache_policy: CachePolicy::Auto,
        root_dir: root.clone(),
        mountinfo_prefix: None,
        xattr: false,
        proc_sfd_rawfd: sandbox.get_proc_self_fd(),
        proc_mountinfo_rawfd: sandbox.get_mountinfo_fd(),
        announce_submounts: true,
        inode_file_handles: InodeFileHandlesMode::Never,
        readdirplus: true,
        writeback: false,
        allow_direct_io: false,
        killpriv_v2: false,
        guest_fd_limit,
        // Without isolation every guest id is the folder owner's on the
        // host: a setuid file guest root leaves there runs as that user,
        // never as root.
        uid_map,
        gid_map,
        ..Default::default()
    };

    if let Err(e) =
        virtiofsd::seccomp::enable_seccomp(virtiofsd::seccomp::SeccompAction::Kill, false)
    {
        return fail(&tag, format!("seccomp: {e}"));
    }
    if let Err(e) = drop_capabilities() {
        return fail(&tag, format!("dropping capabilities: {e}"));
    }

    let fs = match PassthroughFs::new(cfg) {
        Ok(fs) => super::direct_io::ByKernel::new(fs),
        Err(e) => return fail(&tag, format!("file system: {e}")),
    };
    match args.cap {
        None => serve(fs, listener, &tag),
        // Measures the tree first: inside the sandbox, the share is `root`.
        Some(cap) => match super::guard::Guarded::new(fs, Path::new(&root), cap) {
            Ok(fs) => serve(fs, listener, &tag),
            Err(e) => fail(&tag, format!("measuring the store: {e}")),
        },
    }
}

/// Every guest id becomes the folder owner's, `host` (root of the VM's
/// user namespace: the user); the guest sees the owner's files as its
/// login user's, `guest`, who can then write there as itself.
fn owner_maps(host: u32, guest: u32) -> Vec<virtiofsd::soft_idmap::cmdline::IdMap> {
    use virtiofsd::soft_idmap::cmdline::IdMap;
    let mut maps = vec![IdMap::SquashGuest {
        from_guest: 0,
        to_host: host,
        count: u32::MAX,
    }];
    if guest != host {
        maps.push(IdMap::Host {
            from_host: host,
            to_guest: guest,
            count: 1,
        });
    }
    maps
}

fn drop_capabilities() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    let mut caps: HashSet<&str> = CAPS.into_iter().collect();
    for c in SQUASHED_DROPS {
        caps.remove(c);
    }
    capng::clear(capng::Set::BOTH);
    capng::updatev(
        capng::Action::ADD,
        capng::Type::PERMITTED | capng::Type::EFFECTIVE,
        caps.into_iter().collect(),
    )
    .map_err(|e| e.to_string())?;
    capng::apply(capng::Set::BOTH).map_err(|e| e.to_string())
}

fn serve<F>(fs: F, mut listener: Listener, tag: &str) -> u8
where
    F: virtiofsd::filesystem::FileSystem
        + virtiofsd::filesystem::SerializableFileSystem
        + Send
        + Sync
        + 'static,
{
    let backend = match VhostUserFsBackendBuilder::default()
        .set_thread_pool_size(0)
        .set_tag(None)
        .build(fs)
    {
        Ok(b) => Arc::new(b),
        Err(e) => return fail(tag, format!("vhost-user backend: {e}")),
    };
    let mut daemon = match VhostUserDaemon::new(
        String::from("migrant-virtiofsd"),
        backend,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    ) {
        Ok(d) => d,
        Err(e) => return fail(tag, format!("vhost-user daemon: {e:?}")),
    };
    if let Err(e) = daemon.start(&mut listener) {
        return fail(tag, format!("accepting QEMU's connection: {e:?}"));
    }
    match daemon.wait() {
        Ok(()) => 0,
        Err(vhost_user_backend::Error::HandleRequest(vhost::vhost_user::Error::Disconnected)) => 0,
        Err(e) => fail(tag, format!("serving: {e:?}")),
    }
}

/// A running `migrant __virtiofsd`, seen from the supervisor.
pub struct Daemon {
    pub tag: String,
    pub child: tokio::process::Child,
    /// Set once its exit was reported.
    pub exited: bool,
}

/// The two ends of one share's vhost-user socket: the listener its
/// virtiofsd accepts on, and the connection QEMU gets (`-chardev
/// socket,fd=`).
pub struct Ends {
    pub listener: std::os::unix::net::UnixListener,
    pub qemu: std::os::unix::net::UnixStream,
}

/// Make a share's [`Ends`]: a listening socket at `socket_path`, a
/// connection to it (which waits in the backlog until virtiofsd accepts
/// it), and the path removed at once, so nothing else can ever connect.
pub fn socket_ends(socket_path: &Path) -> std::io::Result<Ends> {
    use std::os::unix::fs::PermissionsExt;

    let _ = std::fs::remove_file(socket_path);
    let listener = std::os::unix::net::UnixListener::bind(socket_path)?;
    let result = (|| {
        std::fs::set_permissions(socket_path, std::fs::Permissions::from_mode(0o600))?;
        std::os::unix::net::UnixStream::connect(socket_path)
    })();
    let _ = std::fs::remove_file(socket_path);
    Ok(Ends {
        listener,
        qemu: result?,
    })
}

/// Start the embedded virtiofsd for one share, serving on `listener` (of
/// [`socket_ends`]). Must be called from the thread that lives as long as
/// the VM: the daemon gets SIGKILL when that thread exits.
pub fn spawn(
    exe: &Path,
    share: &super::Served,
    listener: std::os::unix::net::UnixListener,
    log: &Path,
) -> std::io::Result<Daemon> {
    let super::Served {
        tag,
        dir,
        owner,
        guest_owner,
        cap,
    } = share;
    use std::os::fd::AsRawFd;

    let (out, _drain) =
        crate::rotate::capped_log("virtiofsd-log", log, crate::rotate::HELPER_LOG_CAP)?;
    let err = out.try_clone()?;
    let fd = listener.as_raw_fd();
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("__virtiofsd")
        .arg("--fd")
        .arg(fd.to_string())
        .arg("--shared-dir")
        .arg(dir)
        .arg("--tag")
        .arg(tag)
        .arg(format!("--owner={}:{}", owner.0, owner.1))
        .arg(format!("--guest-owner={}:{}", guest_owner.0, guest_owner.1))
        .args(cap.map(|c| format!("--cap={c}")))
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true);
    crate::sandbox::hand_over(&mut cmd, vec![fd]);
    let child = cmd.spawn()?;
    drop(listener);
    Ok(Daemon {
        tag: tag.to_string(),
        child,
        exited: false,
    })
}

/// Stop the daemons and wait for them (a file system they hold keeps its
/// loop device attached).
pub async fn stop_all(daemons: &mut [Daemon]) {
    for d in daemons.iter_mut() {
        let _ = d.child.start_kill();
    }
    for d in daemons.iter_mut() {
        let _ = tokio::time::timeout(Duration::from_secs(5), d.child.wait()).await;
    }
}
