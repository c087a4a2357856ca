//! The one way migrant confines what it starts (crosvm's jail helper is
//! the model): descriptors a child
//! inherits (everything else closed), its network namespace, an identity
//! (groups resolved before the fork), no new privileges, death with the
//! parent ([`Confine`]: QEMU, hooks and Ansible as the user, and through
//! [`hand_over`] the self-exec helpers: the WireGuard loop, the dataplane,
//! virtiofsd); and, inside a self-exec helper, an empty file system, an
//! unprivileged identity without capabilities, and a seccomp allow-list
//! whose default is to kill the process.
//!
//! A helper's side runs, in this order,
//! [`close_strays`], [`inherited`] for each descriptor, [`empty_root`]
//! (while still root), [`drop_identity`], then [`Filter::load`] before it
//! reads a byte from the guest. The seccomp allow-lists are data, side by
//! side in [`lists`], each unusual call with its reason.

pub mod handover;
pub mod lists;
mod seccomp;

pub use seccomp::Filter;

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt as _;
use std::path::Path;

/// How a child is started, resolved before the fork (the forked child
/// may not allocate or read files: supplementary groups come resolved).
#[derive(Debug, Clone, Default)]
pub struct Confine {
    /// Descriptors the child inherits across exec (all others are
    /// close-on-exec).
    pub keep_fds: Vec<i32>,
    /// Network namespace (a descriptor) to enter.
    pub netns: Option<i32>,
    /// `(uid, gid, supplementary groups)` to become.
    pub identity: Option<(u32, u32, Vec<libc::gid_t>)>,
    /// Set no_new_privs.
    pub no_new_privs: bool,
    /// SIGKILL when the forking thread exits; the start fails if the
    /// parent is already gone.
    pub die_with_parent: bool,
    /// `RLIMIT_FSIZE`: the largest file the child may write (a write
    /// past it fails with EFBIG; SIGXFSZ is ignored in the child).
    pub max_file_size: Option<u64>,
    /// Start a new session (`setsid`): the child outlives its parent's
    /// terminal and process group (the supervisor, started by `up`).
    pub new_session: bool,
}

impl Confine {
    /// Apply to a tokio command.
    pub fn apply(self, cmd: &mut tokio::process::Command) {
        let parent = nix::unistd::getpid().as_raw();
        // SAFETY: `in_child` runs in the forked child before exec and only
        // makes async-signal-safe system calls on data prepared here.
        unsafe {
            cmd.pre_exec(move || self.in_child(parent));
        }
    }

    /// Apply to a std command.
    pub fn apply_std(self, cmd: &mut std::process::Command) {
        use std::os::unix::process::CommandExt as _;
        let parent = nix::unistd::getpid().as_raw();
        // SAFETY: as in [`Confine::apply`].
        unsafe {
            cmd.pre_exec(move || self.in_child(parent));
        }
    }

    /// In the forked child: setsid, fcntl, setns, setrlimit, signal, prctl,
    /// setgroups, setgid, setuid, getppid over data allocated before the
    /// fork; nothing
    /// allocates. The groups and gid go before the uid, since a non-root
    /// process may no longer change them; a failure aborts the spawn, so
    /// the program never runs with more than it was given.
    fn in_child(&self, parent: i32) -> std::io::Result<()> {
        let err = std::io::Error::last_os_error;
        // SAFETY: each call below is a system call on integers and on
        // buffers owned by `self`, valid for the call.
        unsafe {
            if self.new_session && libc::setsid() < 0 {
                return Err(err());
            }
            for &fd in &self.keep_fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(err());
                }
            }
            if let Some(ns) = self.netns
                && libc::setns(ns, libc::CLONE_NEWNET) < 0
            {
                return Err(err());
            }
            if let Some(max) = self.max_file_size {
                let limit = libc::rlimit {
                    rlim_cur: max,
                    rlim_max: max,
                };
                // EFBIG for the write, not a silent kill: the program
                // sees the error (QEMU reports it to the guest).
                if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) < 0
                    || libc::signal(libc::SIGXFSZ, libc::SIG_IGN) == libc::SIG_ERR
                {
                    return Err(err());
                }
            }
            if self.no_new_privs && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
                return Err(err());
            }
            if let Some((uid, gid, groups)) = &self.identity {
                if libc::setgroups(groups.len(), groups.as_ptr()) < 0
                    || libc::setgid(*gid) < 0
                    || libc::setuid(*uid) < 0
                {
                    return Err(err());
                }
                // Regaining root must now be impossible.
                if *uid != 0 && libc::setuid(0) == 0 {
                    return Err(std::io::Error::from_raw_os_error(libc::EPERM));
                }
            }
            // After the credential change, which clears it.
            if self.die_with_parent {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                    return Err(err());
                }
                if libc::getppid() != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
            }
        }
        Ok(())
    }
}

/// Prepare a self-exec helper: it inherits `fds` across exec, gets SIGKILL
/// when the calling thread exits, and refuses to start if the parent is
/// already gone.
pub fn hand_over(cmd: &mut tokio::process::Command, fds: Vec<i32>) {
    Confine {
        keep_fds: fds,
        die_with_parent: true,
        ..Confine::default()
    }
    .apply(cmd);
}

/// Take ownership of an inherited descriptor, refusing the standard ones.
pub fn inherited(fd: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: F_GETFD only asks whether `fd` is open; it changes nothing.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(std::io::Error::other(format!(
            "descriptor {fd} is not open"
        )));
    }
    // SAFETY: `fd` was checked open above and was passed to this process
    // for it alone; nothing else in the process owns or closes it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: F_SETFD on a descriptor this process owns.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(owned)
}

/// Close every descriptor the process inherited by accident (the
/// supervisor's progress pipe and the like), keeping stdio and `keep`.
/// Reads `/proc`: call before [`empty_root`].
pub fn close_strays(keep: &[i32]) {
    let open: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    for fd in open.into_iter().filter(|fd| *fd > 2 && !keep.contains(fd)) {
        // SAFETY: `fd` is not one this process uses (not stdio, not one of
        // `keep`, which are all it owns); closing a stale number (the
        // directory listing's own descriptor) fails harmlessly with EBADF.
        unsafe { libc::close(fd) };
    }
}

/// Make the root directory an empty, deleted directory: a fresh one is
/// made in `parent` (a folder only root writes), entered, removed and
/// made the root. Nothing can be created in a deleted directory, so the
/// process has no file system at all. Needs root (CAP_SYS_CHROOT): call
/// before [`drop_identity`].
pub fn empty_root(parent: &Path) -> std::io::Result<()> {
    let dir = parent.join(format!(".empty-{}", std::process::id()));
    let _ = std::fs::remove_dir(&dir);
    std::fs::DirBuilder::new().mode(0o500).create(&dir)?;
    let entered = std::env::set_current_dir(&dir);
    std::fs::remove_dir(&dir)?;
    entered?;
    nix::unistd::chroot(".").map_err(std::io::Error::from)?;
    std::env::set_current_dir("/")
}

/// Become `uid`:`gid` with no supplementary groups: every capability goes
/// with uid 0, no_new_privs is set, the process is not dumpable (no other
/// process of that uid may ptrace it or read its memory), and it dies with
/// its parent (checked: `parent` must still be it).
pub fn drop_identity(uid: u32, gid: u32, parent: i32) -> std::io::Result<()> {
    use nix::unistd::{Gid, Uid, setgid, setgroups, setuid};
    if uid == 0 || gid == 0 {
        return Err(std::io::Error::other("refusing to run a helper as root"));
    }
    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    setgroups(&[]).map_err(std::io::Error::from)?;
    setgid(Gid::from_raw(gid)).map_err(std::io::Error::from)?;
    setuid(Uid::from_raw(uid)).map_err(std::io::Error::from)?;
    if nix::unistd::geteuid().is_root() || nix::unistd::getegid().as_raw() == 0 {
        return Err(std::io::Error::other(
            "still root after the identity change",
        ));
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // A change of credentials clears the parent-death signal: set it again,
    // then make sure the parent did not already go.
    // SAFETY: prctl with PR_SET_PDEATHSIG takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if nix::unistd::getppid().as_raw() != parent {
        return Err(std::io::Error::other("the parent process is gone"));
    }
    Ok(())
}
