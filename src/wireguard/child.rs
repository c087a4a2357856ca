//! `migrant __wg`: the WireGuard packet loop in its own process.
//!
//! The supervisor starts it (self-exec, from the thread that lives as long
//! as the VM) with three inherited descriptors — the TUN, the UDP socket,
//! one end of a report socket pair — and the tunnel's keys on stdin. The
//! child drops to the unprivileged QEMU user (no capabilities, no new
//! privileges) before it reads anything from the network or the guest,
//! confines itself with a seccomp filter to the system calls the loop
//! needs,
//! dies with the supervisor, and exits when the report socket closes.
//! Its exit removes the TUN, and with it every route out of the namespace.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::tunnel::{Report, Spec};
use super::{Plan, WgError};

pub struct Args {
    pub tun_fd: i32,
    pub udp_fd: i32,
    pub report_fd: i32,
    pub uid: u32,
    pub gid: u32,
    pub parent: i32,
}

fn drop_privileges(args: &Args) -> std::io::Result<()> {
    use nix::unistd::{Gid, Uid, setgid, setgroups, setuid};
    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    setgroups(&[]).map_err(std::io::Error::from)?;
    setgid(Gid::from_raw(args.gid)).map_err(std::io::Error::from)?;
    setuid(Uid::from_raw(args.uid)).map_err(std::io::Error::from)?;
    if nix::unistd::geteuid().is_root() || args.uid == 0 {
        return Err(std::io::Error::other("refusing to run the tunnel as root"));
    }
    // A change of credentials clears the parent-death signal: set it again,
    // then make sure the parent did not already go.
    // SAFETY: prctl with PR_SET_PDEATHSIG takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if nix::unistd::getppid().as_raw() != args.parent {
        return Err(std::io::Error::other("the supervisor is gone"));
    }
    Ok(())
}

/// What the packet loop may ask of the kernel once it runs: I/O on the
/// descriptors it holds, waiting, memory, randomness for handshakes,
/// exiting. Anything else (opening files, new sockets, exec, ptrace, ...)
/// kills the process, and with it the TUN: fail closed.
const SYSCALLS: &[&str] = &[
    "read",
    "write",
    "readv",
    "writev",
    "recvfrom",
    "recvmsg",
    "recvmmsg",
    "sendto",
    "sendmsg",
    "sendmmsg",
    "poll",
    "ppoll",
    "fcntl",
    "close",
    "clock_gettime",
    "clock_nanosleep",
    "nanosleep",
    "futex",
    "getrandom",
    "mmap",
    "munmap",
    "mremap",
    "mprotect",
    "madvise",
    "brk",
    "rt_sigreturn",
    "rt_sigprocmask",
    "rt_sigaction",
    "sigaltstack",
    "sched_yield",
    "getpid",
    "gettid",
    "tgkill",
    "exit",
    "exit_group",
];

/// Install the seccomp filter for [`SYSCALLS`] (libseccomp, as the
/// embedded virtiofsd uses).
pub(crate) fn confine() -> std::io::Result<()> {
    use libseccomp_sys::*;
    // SAFETY: seccomp_init allocates a filter context or returns null; it
    // is released below on every path.
    let ctx = unsafe { seccomp_init(SCMP_ACT_KILL_PROCESS) };
    if ctx.is_null() {
        return Err(std::io::Error::other("seccomp_init failed"));
    }
    let mut result = Ok(());
    for name in SYSCALLS {
        let Ok(cname) = std::ffi::CString::new(*name) else {
            continue;
        };
        // SAFETY: `cname` is a valid NUL-terminated string for the call.
        let nr = unsafe { seccomp_syscall_resolve_name(cname.as_ptr()) };
        if nr == __NR_SCMP_ERROR {
            // Not a system call on this architecture.
            continue;
        }
        // SAFETY: `ctx` is a live filter context; no argument filters
        // follow (count 0), so no variadic arguments are read.
        if unsafe { seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0) } < 0 {
            result = Err(std::io::Error::other(format!(
                "seccomp: cannot allow {name}"
            )));
            break;
        }
    }
    if result.is_ok() {
        // SAFETY: `ctx` is a live, complete filter context.
        let rc = unsafe { seccomp_load(ctx) };
        if rc < 0 {
            result = Err(std::io::Error::from_raw_os_error(-rc));
        }
    }
    // SAFETY: `ctx` came from seccomp_init and is not used after this.
    unsafe { seccomp_release(ctx) };
    result
}

/// Take ownership of an inherited descriptor, refusing the standard ones.
fn inherited(fd: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: F_GETFD only asks whether `fd` is open; it changes nothing.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(std::io::Error::other(format!(
            "descriptor {fd} is not open"
        )));
    }
    // SAFETY: `fd` was checked open above and was passed to this process
    // for it alone; nothing else in the process owns or closes it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn main(args: Args) -> u8 {
    match run(&args) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("wireguard: {e}");
            crate::exit::SOFTWARE
        }
    }
}

/// Close every descriptor the process inherited by accident (the
/// supervisor's progress pipe and the like), keeping stdio and `keep`.
fn close_strays(keep: &[i32]) {
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

fn run(args: &Args) -> std::io::Result<()> {
    close_strays(&[args.tun_fd, args.udp_fd, args.report_fd]);
    let tun = std::fs::File::from(inherited(args.tun_fd)?);
    let udp = std::net::UdpSocket::from(inherited(args.udp_fd)?);
    let report = std::os::unix::net::UnixStream::from(inherited(args.report_fd)?);
    drop_privileges(args)?;
    let mut text = Vec::new();
    std::io::stdin().lock().read_to_end(&mut text)?;
    let spec: Spec = serde_json::from_slice(&text).map_err(std::io::Error::other)?;
    text.iter_mut().for_each(|b| *b = 0);
    confine()?;
    tracing::info!(
        peers = spec.peers.len(),
        uid = args.uid,
        "wireguard packet loop started"
    );
    super::tunnel::run(spec, tun, udp, report)
}

/// The running tunnel, from the supervisor's side.
pub struct Tunnel {
    pub child: tokio::process::Child,
    pub reports: watch::Receiver<Option<Report>>,
    /// Endpoints to wait for (peers without one can only be waited on
    /// when no peer has one).
    expected: Vec<(usize, String)>,
    log: String,
}

/// Start the packet loop. Must be called from the thread that lives as
/// long as the VM (the child gets SIGKILL when it exits).
pub async fn start(
    exe: &Path,
    plan: &Plan,
    tun: std::fs::File,
    udp: std::net::UdpSocket,
    identity: &crate::qemu::process::Identity,
    log: &Path,
) -> Result<Tunnel, WgError> {
    use std::os::fd::AsRawFd;
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(WgError::Spawn)?;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(WgError::Spawn)?;
    let err = out.try_clone().map_err(WgError::Spawn)?;
    let fds = [tun.as_raw_fd(), udp.as_raw_fd(), theirs.as_raw_fd()];
    let parent = nix::unistd::getpid();
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("__wg")
        .arg("--tun-fd")
        .arg(fds[0].to_string())
        .arg("--udp-fd")
        .arg(fds[1].to_string())
        .arg("--report-fd")
        .arg(fds[2].to_string())
        .arg("--uid")
        .arg(identity.uid.as_raw().to_string())
        .arg("--gid")
        .arg(identity.gid.as_raw().to_string())
        .arg("--parent")
        .arg(parent.as_raw().to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true);
    crate::supervisor::hand_over(&mut cmd, fds.to_vec());
    let mut child = cmd.spawn().map_err(WgError::Spawn)?;
    // The child holds the only copies now: when it exits, the TUN (and
    // every route out of the namespace) goes with it.
    drop((tun, udp, theirs));
    let mut spec = serde_json::to_vec(&plan.spec()).map_err(|e| WgError::Spawn(e.into()))?;
    if let Some(mut stdin) = child.stdin.take() {
        let written = stdin.write_all(&spec).await;
        spec.iter_mut().for_each(|b| *b = 0);
        written.map_err(WgError::Spawn)?;
    }
    ours.set_nonblocking(true).map_err(WgError::Spawn)?;
    let ours = tokio::net::UnixStream::from_std(ours).map_err(WgError::Spawn)?;
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        // Keep the write half open: the child exits when it closes.
        let (read, write) = ours.into_split();
        let mut lines = tokio::io::BufReader::new(read).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            match serde_json::from_str::<Report>(&line) {
                Ok(r) => {
                    if tx.send(Some(r)).is_err() {
                        break;
                    }
                }
                Err(e) => tracing::warn!("wireguard: malformed report: {e}"),
            }
        }
        tracing::error!("wireguard: the packet loop stopped; nothing leaves the VM any more");
        drop(write);
    });
    let with_endpoint = plan
        .peers
        .iter()
        .enumerate()
        .filter_map(|(i, p)| p.endpoint.map(|e| (i, e.to_string())))
        .collect();
    Ok(Tunnel {
        child,
        reports: rx,
        expected: with_endpoint,
        log: log.display().to_string(),
    })
}

impl Tunnel {
    /// Peers (by endpoint) still without a handshake in `r`.
    fn pending(&self, r: &Report) -> Vec<String> {
        if self.expected.is_empty() {
            return if r.peers.iter().any(|p| p.last_handshake_ms.is_some()) {
                Vec::new()
            } else {
                vec!["any peer".to_string()]
            };
        }
        self.expected
            .iter()
            .filter(|(i, _)| {
                r.peers
                    .get(*i)
                    .is_none_or(|p| p.last_handshake_ms.is_none())
            })
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// Wait until every peer with an endpoint completed a handshake.
    pub async fn wait_handshake(&mut self, timeout: Duration) -> Result<(), WgError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let pending = match self.reports.borrow().as_ref() {
                Some(r) => self.pending(r),
                None => self.expected.iter().map(|(_, e)| e.clone()).collect(),
            };
            if pending.is_empty() {
                return Ok(());
            }
            tokio::select! {
                changed = self.reports.changed() => {
                    if changed.is_err() {
                        return Err(WgError::Died { log: self.log.clone() });
                    }
                }
                _ = self.child.wait() => {
                    return Err(WgError::Died { log: self.log.clone() });
                }
                _ = tokio::time::sleep_until(deadline) => {
                    let _ = self.child.start_kill();
                    let _ = self.child.wait().await;
                    return Err(WgError::NoHandshake {
                        pending: pending.join(", "),
                        secs: timeout.as_secs(),
                    });
                }
            }
        }
    }
}
