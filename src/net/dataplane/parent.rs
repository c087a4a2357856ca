//! The supervisor's side of the dataplane child: starting it with the
//! sockets the supervisor keeps, serving its socket link, and gathering
//! what it reports (lease, SSH readiness, counters, journal lines) across
//! restarts.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use super::link::{Event, MAX_MESSAGE, STATS_REQUEST};
use super::{DataplaneError, Handover, Plan, Start, io};
use crate::net::dataplane::stats::StatsView;
use crate::net::netns::NetNs;
use crate::net::setup::Sockets;

/// What the dataplane children of one VM reported, kept by the supervisor.
pub struct Hub {
    /// Counters of the running child, as last reported.
    current: watch::Sender<StatsView>,
    /// Counters of children that exited, summed.
    past: Mutex<StatsView>,
    /// The guest acknowledged its lease / its SSH server answered.
    pub lease: watch::Sender<bool>,
    pub sshd: watch::Sender<bool>,
    journal: Option<Mutex<crate::rotate::Rotating>>,
    /// The running child's event socket; `None` while none runs.
    link: Mutex<Option<Arc<tokio::net::UnixDatagram>>>,
}

/// The sockets a dataplane child gets, kept by the supervisor.
pub struct Kept {
    pub sockets: Sockets,
    pub ssh: Option<std::os::unix::net::UnixListener>,
}

impl Hub {
    /// `journal`: the egress journal file to append to, if any, readable
    /// by root and `owner`.
    pub fn new(journal: Option<PathBuf>) -> Arc<Hub> {
        Arc::new(Hub {
            current: watch::channel(StatsView::default()).0,
            past: Mutex::new(StatsView::default()),
            lease: watch::channel(false).0,
            sshd: watch::channel(false).0,
            journal: journal.map(|p| Mutex::new(crate::net::dataplane::journal::file(p))),
            link: Mutex::new(None),
        })
    }

    /// Whether a dataplane child runs.
    pub fn running(&self) -> bool {
        self.link.lock().map(|l| l.is_some()).unwrap_or(false)
    }

    /// The counters of every child so far, asking the running one for its
    /// latest (waiting at most a second for the answer).
    pub async fn stats(&self) -> StatsView {
        let link = self.link.lock().ok().and_then(|l| l.clone());
        let mut rx = self.current.subscribe();
        rx.mark_unchanged();
        if let Some(link) = link
            && link.send(STATS_REQUEST).await.is_ok()
        {
            let _ = tokio::time::timeout(Duration::from_secs(1), rx.changed()).await;
        }
        let mut sum = self.past.lock().map(|p| p.clone()).unwrap_or_default();
        add(&mut sum, &rx.borrow());
        sum
    }

    /// Send `request` to the running child (see [`super::link`]).
    pub async fn ask(&self, request: &[u8]) {
        let link = self.link.lock().ok().and_then(|l| l.clone());
        if let Some(link) = link {
            let _ = link.send(request).await;
        }
    }

    fn on_event(&self, e: Event) {
        match e {
            Event::Lease => {
                self.lease.send_replace(true);
            }
            Event::Sshd => {
                self.sshd.send_replace(true);
            }
            Event::Stats(v) => {
                self.current.send_replace(v);
            }
            Event::Journal(lines) => {
                if let Some(j) = &self.journal
                    && let Ok(mut j) = j.lock()
                    && let Err(e) = j.write_lines(&lines)
                {
                    tracing::warn!("egress journal: {e}");
                }
            }
        }
    }

    /// The running child exited: keep its counters, forget its link.
    pub fn exited(&self) {
        if let Ok(mut l) = self.link.lock() {
            *l = None;
        }
        let last = self.current.send_replace(StatsView::default());
        if let Ok(mut p) = self.past.lock() {
            add(&mut p, &last);
        }
    }
}

fn add(sum: &mut StatsView, v: &StatsView) {
    sum.tcp_connections += v.tcp_connections;
    sum.udp_flows += v.udp_flows;
    for (k, n) in &v.denied {
        *sum.denied.entry(k.clone()).or_default() += n;
    }
}

/// Start a dataplane child for `plan` (its descriptor numbers are filled
/// in here) with the sockets in `kept`, named by `label` (the VM's state
/// folder) on its command line; the socket link is served by a
/// thread inside `ns`. Call from the thread that lives as long as the VM:
/// the child gets SIGKILL when it exits.
pub async fn start(
    exe: &Path,
    label: &Path,
    plan: &Plan,
    start: Start,
    kept: &Kept,
    ns: &NetNs,
    hub: &Arc<Hub>,
) -> Result<Running, DataplaneError> {
    let (factory_ours, factory_theirs) =
        crate::net::netns::link_pair().map_err(io("dataplane socket link"))?;
    let (events_ours, events_theirs) =
        std::os::unix::net::UnixDatagram::pair().map_err(io("dataplane event socket"))?;
    let s = &kept.sockets;
    let fds = super::Fds {
        dhcp: s.dhcp.as_raw_fd(),
        dns: s.dns.as_raw_fd(),
        dns_tcp: s.dns_tcp.as_raw_fd(),
        tcp: s.listeners.as_ref().map(|(t, _)| t.as_raw_fd()),
        udp: s.listeners.as_ref().map(|(_, u)| u.as_raw_fd()),
        tcp6: s.listeners6.as_ref().map(|(t, _)| t.as_raw_fd()),
        udp6: s.listeners6.as_ref().map(|(_, u)| u.as_raw_fd()),
        tunnel_routes: s.routes.as_ref().map(|r| r.as_raw_fd()),
        ssh: kept.ssh.as_ref().map(|l| l.as_raw_fd()),
        factory: factory_theirs.as_raw_fd(),
        events: events_theirs.as_raw_fd(),
    };
    let keep = fds.all();
    // Reply sockets may speak to the guest's addresses only.
    let mut guests = vec![std::net::IpAddr::V4(plan.net.guest)];
    guests.extend(plan.net.net6.map(|n| std::net::IpAddr::V6(n.guest)));
    let handover = Handover {
        plan: plan.clone(),
        guest_link: s.guest_link,
        fds,
        start,
    };
    let text = serde_json::to_vec(&handover).map_err(|e| io("dataplane plan")(e.into()))?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("__dataplane")
        .arg("--vm")
        .arg(label)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true);
    crate::sandbox::hand_over(&mut cmd, keep);
    let mut child = cmd.spawn().map_err(io("cannot start the dataplane"))?;
    drop((factory_theirs, events_theirs));
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(&text).await.map_err(io("dataplane plan"))?;
    }
    crate::net::netns::serve(ns, factory_ours, guests)
        .map_err(|e| io("dataplane socket factory")(std::io::Error::other(e)))?;
    events_ours
        .set_nonblocking(true)
        .map_err(io("dataplane event socket"))?;
    let events = Arc::new(
        tokio::net::UnixDatagram::from_std(events_ours).map_err(io("dataplane event socket"))?,
    );
    if let Ok(mut l) = hub.link.lock() {
        *l = Some(Arc::clone(&events));
    }
    let reader = tokio::spawn(read_events(events, Arc::clone(hub)));
    Ok(Running { child, reader })
}

/// A running dataplane child.
pub struct Running {
    pub child: tokio::process::Child,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        // A datagram socket never reads end-of-file: stop its reader.
        self.reader.abort();
    }
}

async fn read_events(events: Arc<tokio::net::UnixDatagram>, hub: Arc<Hub>) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        match events.recv(&mut buf).await {
            Ok(n) => match Event::decode(&buf[..n]) {
                Some(e) => hub.on_event(e),
                None => tracing::debug!("dataplane: malformed event ({n} bytes) ignored"),
            },
            Err(_) => return,
        }
    }
}
