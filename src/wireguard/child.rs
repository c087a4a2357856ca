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

/// What the packet loop may ask of the kernel once it runs
/// ([`crate::sandbox::lists::WIREGUARD`]): anything else (opening files,
/// new sockets, exec, ptrace, ...) kills the process, and with it the TUN:
/// fail closed.
const SYSCALLS: &[&str] = crate::sandbox::lists::WIREGUARD;

/// Sending system calls the loop needs when its UDP socket is not
/// connected (several peers: any of them, and roaming).
const SEND_ANYWHERE: &[&str] = crate::sandbox::lists::WIREGUARD_SEND_ANYWHERE;

/// `setsockopt(fd, SOL_UDP, UDP_SEGMENT, …)`: GSO on a connected socket.
const SOL_UDP: u64 = 17;
const UDP_SEGMENT: u64 = 103;

/// Install the seccomp filter: [`SYSCALLS`], and for sending either
/// [`SEND_ANYWHERE`] or, when the UDP socket is connected to the one peer,
/// only `sendto` without a destination address (and `setsockopt` for
/// UDP_SEGMENT alone): an exploited packet loop then cannot send a
/// datagram anywhere but to the peer (a filter cannot read a `sendmsg`
/// destination, so that call is not allowed at all).
pub(crate) fn confine(connected: bool) -> std::io::Result<()> {
    let filter = crate::sandbox::Filter::new().allow(SYSCALLS);
    let filter = if connected {
        // sendto(fd, buf, len, flags, NULL, 0) only.
        filter
            .allow_if("sendto", &[(4, 0)])
            .allow_if("setsockopt", &[(1, SOL_UDP), (2, UDP_SEGMENT)])
    } else {
        filter.allow(SEND_ANYWHERE)
    };
    filter.load()
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

fn run(args: &Args) -> std::io::Result<()> {
    crate::sandbox::close_strays(&[args.tun_fd, args.udp_fd, args.report_fd]);
    let tun = std::fs::File::from(crate::sandbox::inherited(args.tun_fd)?);
    let udp = std::net::UdpSocket::from(crate::sandbox::inherited(args.udp_fd)?);
    let report = std::os::unix::net::UnixStream::from(crate::sandbox::inherited(args.report_fd)?);
    crate::sandbox::drop_identity(args.uid, args.gid, args.parent)?;
    let mut text = Vec::new();
    std::io::stdin().lock().read_to_end(&mut text)?;
    let spec: Spec = serde_json::from_slice(&text).map_err(std::io::Error::other)?;
    text.iter_mut().for_each(|b| *b = 0);
    // Connected by the supervisor when there is one peer: then it may
    // send only there.
    let connected = udp.peer_addr().is_ok();
    confine(connected)?;
    tracing::info!(
        peers = spec.peers.len(),
        uid = args.uid,
        connected,
        "wireguard packet loop started"
    );
    super::tunnel::run(spec, tun, udp, report, connected)
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
    let (out, _drain) =
        crate::rotate::capped_log("wireguard-log", log, crate::rotate::HELPER_LOG_CAP)
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
    crate::sandbox::hand_over(&mut cmd, fds.to_vec());
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

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::os::unix::process::ExitStatusExt;

    /// The half of [`a_connected_loop_may_send_only_to_its_peer`] that
    /// runs in a child process (the same test, run again with
    /// `MIGRANT_SECCOMP_CHILD` set): confined as a one-peer loop, it sends
    /// to its peer, then tries what `mode` names.
    fn seccomp_child(mode: &str) -> ! {
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let other = UdpSocket::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let peer_addr = peer.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let other_addr = other.local_addr().unwrap_or_else(|e| panic!("{e}"));
        udp.connect(peer_addr).unwrap_or_else(|e| panic!("{e}"));
        super::confine(true).unwrap_or_else(|e| panic!("{e}"));
        let gso = nix::sys::socket::sockopt::UdpGsoSegment;
        let sent = udp.send(b"to the peer").is_ok()
            && nix::sys::socket::setsockopt(&udp, gso, &1000).is_ok();
        println!("sent to peer: {sent}");
        match mode {
            "elsewhere" => {
                let _ = udp.send_to(b"x", other_addr);
            }
            "sendmsg" => {
                use nix::sys::socket::{MsgFlags, SockaddrIn, sendmsg};
                use std::os::fd::AsRawFd;
                let to = match other_addr {
                    std::net::SocketAddr::V4(a) => SockaddrIn::from(a),
                    std::net::SocketAddr::V6(_) => panic!("v6"),
                };
                let iov = [std::io::IoSlice::new(b"x")];
                let _ = sendmsg(udp.as_raw_fd(), &iov, &[], MsgFlags::empty(), Some(&to));
            }
            "socket" => {
                let _ = UdpSocket::bind("127.0.0.1:0");
            }
            "setsockopt" => {
                let _ =
                    nix::sys::socket::setsockopt(&udp, nix::sys::socket::sockopt::Broadcast, &true);
            }
            _ => {}
        }
        println!("survived");
        // SAFETY: _exit ends the process at once (the test harness would
        // make calls the filter does not allow).
        unsafe { libc::_exit(0) };
    }

    /// With one peer the tunnel's socket is connected, and the filter lets
    /// it send only there: sending elsewhere (`sendto` with an address,
    /// `sendmsg`), opening a socket or setting another socket option kills
    /// the process. What an exploited packet loop could do is therefore
    /// talk to the peer, never to the host or its LAN.
    #[test]
    fn a_connected_loop_may_send_only_to_its_peer() {
        if let Ok(mode) = std::env::var("MIGRANT_SECCOMP_CHILD") {
            seccomp_child(&mode);
        }
        let exe = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
        let run = |mode: &str| {
            std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "wireguard::child::tests::a_connected_loop_may_send_only_to_its_peer",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("MIGRANT_SECCOMP_CHILD", mode)
                .output()
                .unwrap_or_else(|e| panic!("{e}"))
        };
        let ok = run("peer");
        let text = String::from_utf8_lossy(&ok.stdout).into_owned();
        assert!(text.contains("sent to peer: true"), "{text}");
        assert!(text.contains("survived"), "{text}");
        assert_eq!(ok.status.code(), Some(0));
        for mode in ["elsewhere", "sendmsg", "socket", "setsockopt"] {
            let out = run(mode);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(text.contains("sent to peer: true"), "{mode}: {text}");
            assert!(!text.contains("survived"), "{mode} was allowed: {text}");
            assert_eq!(
                out.status.signal(),
                Some(libc::SIGSYS),
                "{mode}: {:?}",
                out.status
            );
        }
    }
}
