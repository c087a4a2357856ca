//! The running VM: QEMU, its helpers (virtiofsd, the WireGuard loop, the
//! dataplane) started and restarted, QMP events, the shares checked, until
//! QEMU stops, a halt is asked for or SIGTERM comes.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, watch};

use super::control::Response;
use super::prepare::{Prepared, bind_private, give_to_invoker};
use super::progress::{Progress, Reporter};
use super::restart::{Helper, Turn};
use super::server::{Control, Shared, serve_control};
use super::{SupervisorError, cleanup, io, serial};
use crate::error::Error;
use crate::net::dataplane;
use crate::qemu::{self, process, qmp::Qmp};
use crate::state::{self, Record, VmPaths, VmState};

/// A running VM as the supervisor sees it: QEMU, its helpers, and what
/// each event needs. [`Running::watch`] dispatches one event at a time to
/// one method each.
struct Running<'a> {
    vm: &'a VmPaths,
    reporter: &'a mut Reporter,
    /// (seconds, when) the guest must have answered SSH by.
    boot_deadline: Option<(u64, tokio::time::Instant)>,
    cfg: crate::config::Config,
    rec: Record,
    identity: process::Identity,
    machine: crate::memsnap::Machine,
    exe: std::path::PathBuf,
    ns: Arc<crate::net::netns::NetNs>,
    child: tokio::process::Child,
    qemu_log: (std::path::PathBuf, crate::rotate::Drain),
    daemons: Vec<crate::share::virtiofsd::Daemon>,
    served: Vec<crate::share::Served>,
    shared: Arc<Shared>,
    ctl_rx: mpsc::Receiver<Control>,
    event_rx: mpsc::UnboundedReceiver<qapi::qmp::Event>,
    sigterm: tokio::signal::unix::Signal,
    share_check: tokio::time::Interval,
    ready: bool,
    lease_reported: bool,
    event_counts: EventCounts,
    guest_ip: std::net::Ipv4Addr,
    hub: Arc<dataplane::parent::Hub>,
    kept: dataplane::parent::Kept,
    plane_plan: dataplane::Plan,
    plane: Helper<dataplane::parent::Running>,
    tunnel: Helper<crate::wireguard::child::Tunnel>,
    wg_plan: Option<crate::wireguard::Plan>,
    lease_rx: watch::Receiver<bool>,
    sshd_rx: watch::Receiver<bool>,
}

/// `boot_deadline`: (seconds, when) the guest must have answered SSH by;
/// past it QEMU is stopped, whether or not an `up` still waits.
pub(super) async fn supervise(
    p: Prepared,
    vm: &VmPaths,
    reporter: &mut Reporter,
    boot_deadline: Option<(u64, tokio::time::Instant)>,
) -> Result<(), Error> {
    let mut running = start(p, vm, reporter, boot_deadline).await?;
    let stop_reason = running.watch().await?;
    running.finish(stop_reason).await;
    Ok(())
}

/// Start everything the VM runs on: the tunnel (fail closed before the
/// guest exists), the shares' daemons, QEMU, the dataplane, the control
/// socket.
async fn start<'a>(
    p: Prepared,
    vm: &'a VmPaths,
    reporter: &'a mut Reporter,
    boot_deadline: Option<(u64, tokio::time::Instant)>,
) -> Result<Running<'a>, Error> {
    let Prepared {
        cfg,
        mut rec,
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
    } = p;
    let exe = std::env::current_exe().map_err(io("cannot find the migrant executable"))?;

    // WireGuard first: fail closed before the guest exists.
    let (tunnel, wg_plan) =
        start_tunnel(&exe, wg, &identity, vm, &cfg, reporter, rec.owner).await?;

    // One embedded virtiofsd per share, started before QEMU (from this
    // thread: they die with it).
    let (daemons, fs_ends) = start_daemons(&exe, &served, fs_ends, vm)?;

    let qemu_log = vm.state.join("qemu.log");
    let (mut child, qemu_log_drain) = spawn_qemu(&spec, &ns, &identity, &qemu_log, disk_size)?;
    // QEMU holds its own copies now.
    let (serial_r, serial_w) = serial;
    drop((tap, qmp_theirs, console, fs_ends, serial_w, backing));
    serial::spawn(serial_r, vm.serial_log()).map_err(io("serial log thread"))?;
    let qemu_pid = child.id();
    tracing::info!(pid = ?qemu_pid, accel = spec.accel.as_str(), user = %identity.name, "QEMU started");
    mark_started(&mut rec, (&spec, cfg.memory), &identity, qemu_pid, vm)?;
    reporter.send(&Progress::Qemu {
        pid: qemu_pid.unwrap_or(0),
        accel: spec.accel.as_str().to_string(),
        user: identity.name.clone(),
    });

    let (qmp, event_rx) = open_qmp(qmp_ours, &mut child, (&qemu_log, &qemu_log_drain)).await?;
    // (after the event task: replies arrive through its polling)
    let restored = incoming.is_some();
    if let (Some(fd), Some(file)) = (spec.incoming_fd, incoming) {
        restore_memory(&qmp, fd, &mut child, reporter).await?;
        drop(file);
    }

    // The dataplane: unprivileged, in its own process, restarted when it
    // dies (the sockets stay here, so nothing leaves meanwhile).
    let guest_ip = cfg.guest_ip();
    let ssh_listener = bind_private(&vm.ssh_sock())?;
    give_to_invoker(&vm.ssh_sock())?;
    let kept = dataplane::parent::Kept {
        sockets,
        ssh: Some(ssh_listener),
    };
    let hub = dataplane::parent::Hub::new(
        Some(vm.state.join(crate::net::dataplane::journal::FILE)),
        rec.owner,
    );
    let plane_plan = dataplane::Plan::new(&cfg.name, net, rec.mac, &identity, &vm.run);
    // A restored guest holds its lease already.
    let first = dataplane::Start {
        probe_ssh: true,
        lease_seen: restored,
    };
    let plane =
        dataplane::parent::start(&exe, &vm.state, &plane_plan, first, &kept, &ns, &hub).await?;
    tracing::info!(pid = ?plane.child.id(), user = %identity.name, "dataplane started");
    let lease_rx = hub.lease.subscribe();
    let sshd_rx = hub.sshd.subscribe();

    let shared = Arc::new(Shared {
        qmp,
        rec: rec.clone(),
        accel: spec.accel,
        qemu_pid,
        hub: Arc::clone(&hub),
        ns: Arc::clone(&ns),
    });
    let (ctl_tx, ctl_rx) = mpsc::channel::<Control>(8);
    let control = bind_private(&vm.control_sock())?;
    control
        .set_nonblocking(true)
        .map_err(io("control socket"))?;
    let control = tokio::net::UnixListener::from_std(control).map_err(io("control socket"))?;
    tokio::spawn(serve_control(control, Arc::clone(&shared), ctl_tx));

    let sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io("signal handler"))?;
    Ok(Running {
        vm,
        reporter,
        boot_deadline,
        cfg,
        rec,
        identity,
        machine,
        exe,
        ns,
        child,
        qemu_log: (qemu_log, qemu_log_drain),
        daemons,
        served,
        shared,
        ctl_rx,
        event_rx,
        sigterm,
        // Fail closed while running: the stores must stay what was
        // verified.
        share_check: tokio::time::interval(Duration::from_secs(2)),
        ready: false,
        lease_reported: false,
        // Events the guest can repeat at will are counted, not logged each.
        event_counts: EventCounts::default(),
        guest_ip,
        hub,
        kept,
        plane_plan,
        plane: Helper::new("the dataplane", "network", Some(plane)),
        // A tunnel process that died is started again (a new TUN, a new
        // handshake).
        tunnel: Helper::new("the WireGuard process", "egress", tunnel),
        wg_plan,
        lease_rx,
        sshd_rx,
    })
}

/// QEMU for `spec`, in the VM's namespace, as its identity, with the
/// descriptors the spec names and its writes bounded by the disk's size;
/// its output goes to a capped `log`.
fn spawn_qemu(
    spec: &qemu::VmSpec,
    ns: &crate::net::netns::NetNs,
    identity: &process::Identity,
    log: &Path,
    disk_size: u64,
) -> Result<(tokio::process::Child, crate::rotate::Drain), Error> {
    let mut keep_fds = vec![spec.tap_fd, spec.qmp_fd, spec.console_fd, spec.serial_fd];
    keep_fds.extend(spec.shares.iter().map(|s| s.fd));
    keep_fds.extend(spec.incoming_fd);
    keep_fds.extend(spec.backing_fd);
    Ok(process::spawn(process::Launch {
        argv: qemu::build_argv(spec),
        netns: ns.fd(),
        identity,
        keep_fds,
        log,
        max_file_size: process::max_file_size(disk_size),
    })?)
}

/// The record of a VM whose QEMU just started (with `memory` bytes).
fn mark_started(
    rec: &mut Record,
    (spec, memory): (&qemu::VmSpec, u64),
    identity: &process::Identity,
    qemu_pid: Option<u32>,
    vm: &VmPaths,
) -> Result<(), Error> {
    rec.state = VmState::Starting;
    rec.supervisor_pid = Some(std::process::id());
    rec.qemu_pid = qemu_pid;
    rec.accel = Some(spec.accel.as_str().to_string());
    rec.cpus = Some(spec.cpus);
    rec.memory = Some(memory);
    rec.qemu_user = Some(identity.name.clone());
    rec.started_at = Some(state::now());
    // The disk diverges from the snapshot from now on: the next start
    // boots it, unless a reset makes it fresh again.
    rec.restore_memory = false;
    Ok(rec.save(&vm.record())?)
}

/// Have the waiting QEMU read the memory snapshot from `fd`; on failure
/// QEMU is stopped (a half-restored guest never runs).
async fn restore_memory(
    qmp: &Qmp,
    fd: i32,
    child: &mut tokio::process::Child,
    reporter: &mut Reporter,
) -> Result<(), Error> {
    match super::memory::restore(qmp, fd).await {
        Ok(took) => {
            tracing::info!("memory snapshot restored in {} ms", took.as_millis());
            reporter.send(&Progress::Restored {
                ms: took.as_millis() as u64,
            });
            Ok(())
        }
        Err(e) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            Err(SupervisorError::Snapshot(format!(
                "restoring the memory snapshot failed: {e}; `migrant up --cold` boots the disk instead"
            )).into())
        }
    }
}

/// The WireGuard loop, up and handshaken before the guest exists (fail
/// closed), with its reports published.
async fn start_tunnel(
    exe: &Path,
    wg: Option<(crate::wireguard::Plan, std::fs::File, std::net::UdpSocket)>,
    identity: &process::Identity,
    vm: &VmPaths,
    cfg: &crate::config::Config,
    reporter: &mut Reporter,
    owner: Option<u32>,
) -> Result<
    (
        Option<crate::wireguard::child::Tunnel>,
        Option<crate::wireguard::Plan>,
    ),
    Error,
> {
    if let Some((plan, tun, udp)) = wg {
        let up = crate::wireguard::bring_up(
            exe,
            (&plan, tun, udp),
            identity,
            &vm.state.join("wireguard.log"),
            cfg.network.wireguard_timeout,
        )
        .await?;
        let peers = plan
            .peers
            .iter()
            .map(|p| match (&p.written, p.endpoint) {
                (Some(w), Some(e)) if *w != e.to_string() => format!("{w} ({e})"),
                (_, Some(e)) => e.to_string(),
                _ => format!("{} (no endpoint)", p.public_key),
            })
            .collect();
        reporter.send(&Progress::Tunnel {
            peers,
            dns: plan.dns.iter().map(|d| d.to_string()).collect(),
        });
        tokio::spawn(publish_wg(
            up.reports.clone(),
            vm.run.clone(),
            plan.clone(),
            owner,
        ));
        return Ok((Some(up), Some(plan)));
    }
    Ok((None, None))
}

/// One embedded virtiofsd per share, each serving its end of the share's
/// socket; QEMU's ends come back, kept until QEMU holds its own copies.
fn start_daemons(
    exe: &Path,
    served: &[crate::share::Served],
    ends: Vec<crate::share::virtiofsd::Ends>,
    vm: &VmPaths,
) -> Result<
    (
        Vec<crate::share::virtiofsd::Daemon>,
        Vec<std::os::unix::net::UnixStream>,
    ),
    Error,
> {
    let mut daemons = Vec::new();
    let mut qemu_ends = Vec::new();
    for (s, end) in served.iter().zip(ends) {
        let daemon = crate::share::virtiofsd::spawn(
            exe,
            &s.tag,
            &s.dir,
            end.listener,
            &vm.state.join(format!("virtiofsd-{}.log", s.tag)),
            s.owner,
        )
        .map_err(io(format!("cannot start virtiofsd for share {:?}", s.tag)))?;
        tracing::info!(pid = ?daemon.child.id(), tag = %s.tag, dir = %s.dir.display(), "virtiofsd started");
        daemons.push(daemon);
        qemu_ends.push(end.qemu);
    }
    Ok((daemons, qemu_ends))
}

/// QEMU's monitor, and its events forwarded into a channel.
async fn open_qmp(
    qmp_ours: std::os::unix::net::UnixStream,
    child: &mut tokio::process::Child,
    qemu_log: (&Path, &crate::rotate::Drain),
) -> Result<(Qmp, mpsc::UnboundedReceiver<qapi::qmp::Event>), Error> {
    qmp_ours.set_nonblocking(true).map_err(io("QMP socket"))?;
    let stream = tokio::net::UnixStream::from_std(qmp_ours).map_err(io("QMP socket"))?;
    let (qmp, mut events) = match Qmp::open(stream).await {
        Ok(q) => q,
        Err(e) => {
            // QEMU closing the monitor usually means it exited: say why.
            if let Ok(Ok(status)) = tokio::time::timeout(Duration::from_secs(2), child.wait()).await
            {
                return Err(qemu_exited(Some(status), qemu_log).into());
            }
            return Err(e.into());
        }
    };

    let (event_tx, event_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(ev) = events.next().await {
            match ev {
                Ok(ev) => {
                    if event_tx.send(ev).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!("QMP event stream: {e}");
                    break;
                }
            }
        }
    });
    Ok((qmp, event_rx))
}

/// What an event handler decided: go on, or stop the VM (why).
type Next = Result<Option<String>, Error>;

impl Running<'_> {
    /// Dispatch events until the VM stops; returns why it stopped.
    async fn watch(&mut self) -> Result<String, Error> {
        loop {
            let deadline = self
                .boot_deadline
                .map(|(_, at)| at)
                .unwrap_or_else(tokio::time::Instant::now);
            let stop = tokio::select! {
                status = self.child.wait() => self.qemu_exited(status),
                Some(ctl) = self.ctl_rx.recv() => self.control(ctl).await,
                _ = self.sigterm.recv() => Ok(Some(self.sigterm_received().await)),
                Some(ev) = self.event_rx.recv() => {
                    on_event(&ev, self.vm, &mut self.event_counts);
                    Ok(None)
                }
                turn = self.tunnel.next() => {
                    match turn {
                        // Fail closed: the TUN went with the process, so
                        // nothing leaves until a new one runs.
                        Turn::Exited(status) => {
                            let _ = std::fs::remove_file(crate::wireguard::Published::path(&self.vm.run));
                            self.tunnel.exited(status);
                        }
                        Turn::Due => self.restart_tunnel().await,
                    }
                    Ok(None)
                }
                _ = self.share_check.tick(), if !self.served.is_empty() => self.check_shares().await,
                // Nobody may be waiting any more (an `up` killed by Ctrl-C
                // or a CI job's timeout): a boot that never finishes must
                // not run on, using a core, forever.
                _ = tokio::time::sleep_until(deadline), if !self.ready && self.boot_deadline.is_some() => {
                    Ok(Some(self.boot_timed_out().await))
                }
                Ok(()) = self.lease_rx.changed(), if !self.lease_reported => {
                    self.lease_reported = true;
                    self.reporter.send(&Progress::Lease { ip: self.guest_ip.to_string() });
                    Ok(None)
                }
                Ok(()) = self.sshd_rx.changed(), if !self.ready => self.sshd_changed(),
                turn = self.plane.next() => {
                    match turn {
                        // Fail closed: the listeners stay here, unanswered,
                        // until a new dataplane runs.
                        Turn::Exited(status) => {
                            self.hub.exited();
                            self.plane.exited(status);
                        }
                        Turn::Due => self.restart_plane().await,
                    }
                    Ok(None)
                }
            };
            if let Some(reason) = stop? {
                return Ok(reason);
            }
        }
    }

    /// QEMU exited on its own.
    fn qemu_exited(&mut self, status: std::io::Result<std::process::ExitStatus>) -> Next {
        let status = status
            .map(|s| s.to_string())
            .unwrap_or_else(|e| e.to_string());
        if !self.ready {
            let (log, drain) = &self.qemu_log;
            return Err(qemu_exited(None, (log, drain)).with_status(status).into());
        }
        Ok(Some(format!("QEMU exited ({status})")))
    }

    /// A request on the control socket.
    async fn control(&mut self, ctl: Control) -> Next {
        match ctl {
            Control::SaveMemory {
                stop,
                done,
                flushed,
            } => {
                let saved = super::memory::save(
                    &self.shared.qmp,
                    self.vm,
                    &self.identity,
                    &self.machine,
                    self.rec.owner,
                )
                .await;
                let answer = match &saved {
                    Ok(s) => {
                        tracing::info!(
                            state = s.state_bytes,
                            disk = s.disk_bytes,
                            paused_ms = s.paused.as_millis() as u64,
                            "memory snapshot saved"
                        );
                        s.response(stop)
                    }
                    Err(e) => {
                        tracing::error!("memory snapshot failed: {e}");
                        Response::Error { message: e.clone() }
                    }
                };
                if saved.is_ok() && stop {
                    let status =
                        halt(&self.shared.qmp, &mut self.child, true, Duration::ZERO).await;
                    crate::share::virtiofsd::stop_all(&mut self.daemons).await;
                    cleanup(self.vm);
                    let _ = done.send(answer);
                    let _ = tokio::time::timeout(Duration::from_secs(2), flushed).await;
                    return Ok(Some(format!("stopped after a memory snapshot ({status})")));
                }
                // Whatever happened, the guest runs on.
                if let Err(e) = self.shared.qmp.run(qapi::qmp::cont {}).await {
                    tracing::error!("cannot resume the guest after the snapshot: {e}");
                }
                let _ = done.send(answer);
                Ok(None)
            }
            Control::Halt {
                force,
                timeout,
                done,
                flushed,
            } => {
                let status = halt(&self.shared.qmp, &mut self.child, force, timeout).await;
                crate::share::virtiofsd::stop_all(&mut self.daemons).await;
                let _ = Record::update(&self.vm.record(), |r| r.state = VmState::Stopped);
                let reason = format!("halted by request ({status})");
                // Answer after cleanup, so the caller sees a clean state.
                cleanup(self.vm);
                let _ = done.send(Response::Done);
                let _ = tokio::time::timeout(Duration::from_secs(2), flushed).await;
                Ok(Some(reason))
            }
        }
    }

    async fn sigterm_received(&mut self) -> String {
        let timeout = Duration::from_secs(self.cfg.halt_timeout);
        let status = halt(&self.shared.qmp, &mut self.child, false, timeout).await;
        format!("SIGTERM ({status})")
    }

    async fn restart_tunnel(&mut self) {
        let Some(plan) = self.wg_plan.clone() else {
            return;
        };
        let log = self.vm.state.join("wireguard.log");
        let started =
            crate::wireguard::restart(&self.exe, &plan, &self.identity, &log, &self.ns).await;
        let started = started.map(|(t, plan)| {
            tokio::spawn(publish_wg(
                t.reports.clone(),
                self.vm.run.clone(),
                plan.clone(),
                self.rec.owner,
            ));
            self.wg_plan = Some(plan);
            t
        });
        self.tunnel.restarted(started);
    }

    async fn restart_plane(&mut self) {
        let start = dataplane::Start {
            probe_ssh: !self.ready,
            lease_seen: *self.hub.lease.borrow(),
        };
        let started = dataplane::parent::start(
            &self.exe,
            &self.vm.state,
            &self.plane_plan,
            start,
            &self.kept,
            &self.ns,
            &self.hub,
        )
        .await;
        if let Ok(r) = &started {
            tracing::info!(pid = ?r.child.id(), "dataplane started");
        }
        self.plane.restarted(started);
    }

    /// The stores must stay what was verified, and each share's daemon
    /// running.
    async fn check_shares(&mut self) -> Next {
        if let Err(why) = crate::share::verify_served(&self.served) {
            // Stop at once: no ACPI, no hooks, nothing the guest could use
            // to write more through the share.
            tracing::error!("{why}; stopping the VM now");
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
            if !self.ready {
                crate::share::virtiofsd::stop_all(&mut self.daemons).await;
                return Err(crate::share::ShareError::Check(why).into());
            }
            return Ok(Some(format!("stopped at once: {why}")));
        }
        for d in self.daemons.iter_mut().filter(|d| !d.exited) {
            if let Ok(Some(status)) = d.child.try_wait() {
                d.exited = true;
                tracing::error!(
                    "virtiofsd of share {:?} exited ({status}); the guest lost that share",
                    d.tag
                );
            }
        }
        Ok(None)
    }

    async fn boot_timed_out(&mut self) -> String {
        let secs = self.boot_deadline.map(|(s, _)| s).unwrap_or(0);
        tracing::error!("the guest did not answer SSH within {secs} s; stopping it (disk kept)");
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        format!("the guest did not answer SSH within {secs} s of starting; stopped (disk kept)")
    }

    fn sshd_changed(&mut self) -> Next {
        if *self.sshd_rx.borrow_and_update() {
            self.ready = true;
            Record::update(&self.vm.record(), |r| r.state = VmState::Running)?;
            self.reporter.send(&Progress::Sshd);
            self.reporter.close();
            tracing::info!("guest SSH server answers; VM is running");
        }
        Ok(None)
    }

    /// After the VM stopped: the shares' daemons, the record.
    async fn finish(&mut self, stop_reason: String) {
        crate::share::virtiofsd::stop_all(&mut self.daemons).await;
        tracing::info!("VM stopped: {stop_reason}");
        let _ = Record::update(&self.vm.record(), |r| r.last_stop = Some(stop_reason));
    }
}

/// Publish the packet loop's reports for `migrant wg` and `status` (no
/// secrets in them), readable like the VM's record: by root and its owner.
async fn publish_wg(
    mut reports: watch::Receiver<Option<crate::wireguard::tunnel::Report>>,
    run: std::path::PathBuf,
    plan: crate::wireguard::Plan,
    owner: Option<u32>,
) {
    let path = crate::wireguard::Published::path(&run);
    loop {
        let report = reports.borrow_and_update().clone();
        if let Some(r) = report {
            let p = crate::wireguard::Published {
                written_ms: state::now_ms(),
                address: match &plan.v6 {
                    Some((a6, _)) => format!("{}, {a6}", plan.address),
                    None => plan.address.to_string(),
                },
                dns: plan.dns.iter().map(|d| d.to_string()).collect(),
                peers: r.peers,
                written_endpoints: plan.peers.iter().map(|p| p.written.clone()).collect(),
            };
            if let Ok(json) = serde_json::to_vec_pretty(&p)
                && let Err(e) = state::write_private(&path, &json, owner)
            {
                tracing::warn!("cannot write {}: {e}", path.display());
            }
        }
        if reports.changed().await.is_err() {
            let _ = std::fs::remove_file(&path);
            return;
        }
    }
}

impl SupervisorError {
    fn with_status(self, s: String) -> Self {
        match self {
            SupervisorError::QemuExited { log, .. } => {
                SupervisorError::QemuExited { status: s, log }
            }
            other => other,
        }
    }
}

/// QEMU's last words: its log, once the pipe into it is drained.
fn qemu_exited(
    status: Option<std::process::ExitStatus>,
    (log, drain): (&Path, &crate::rotate::Drain),
) -> SupervisorError {
    drain.wait(Duration::from_secs(2));
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n");
    SupervisorError::QemuExited {
        status: status
            .map(|s| s.to_string())
            .unwrap_or_else(|| "unknown status".into()),
        log: tail,
    }
}

/// How often each guest-repeatable QMP event came: the 1st, 2nd, 4th,
/// 8th… of a kind is logged (with its count), the rest only counted, so a
/// guest resetting itself in a loop writes a few dozen lines a year, not
/// one per reset.
#[derive(Debug, Default)]
struct EventCounts(std::collections::HashMap<&'static str, u64>);

impl EventCounts {
    /// Count one `kind`; `Some(count)` when this one is to be logged.
    fn count(&mut self, kind: &'static str) -> Option<u64> {
        let n = self.0.entry(kind).or_insert(0);
        *n = n.saturating_add(1);
        n.is_power_of_two().then_some(*n)
    }
}

fn on_event(ev: &qapi::qmp::Event, vm: &VmPaths, counts: &mut EventCounts) {
    use qapi::qmp::Event;
    match ev {
        Event::STOP { .. } => {
            if let Some(n) = counts.count("STOP") {
                tracing::info!("QMP: STOP (#{n})");
            }
            let _ = Record::update(&vm.record(), |r| {
                if r.state == VmState::Running {
                    r.state = VmState::Paused
                }
            });
        }
        Event::RESUME { .. } => {
            if let Some(n) = counts.count("RESUME") {
                tracing::info!("QMP: RESUME (#{n})");
            }
            let _ = Record::update(&vm.record(), |r| {
                if r.state == VmState::Paused {
                    r.state = VmState::Running
                }
            });
        }
        Event::SHUTDOWN { data, .. } => tracing::info!("QMP: SHUTDOWN {data:?}"),
        Event::RESET { data, .. } => {
            if let Some(n) = counts.count("RESET") {
                tracing::info!("QMP: RESET {data:?} (#{n}; logged at powers of two)");
            }
        }
        Event::GUEST_PANICKED { data, .. } => {
            if let Some(n) = counts.count("GUEST_PANICKED") {
                tracing::error!("QMP: GUEST_PANICKED {data:?} (#{n})");
            }
        }
        Event::BLOCK_IO_ERROR { data, .. } => {
            if let Some(n) = counts.count("BLOCK_IO_ERROR") {
                tracing::error!("QMP: BLOCK_IO_ERROR {data:?} (#{n}; logged at powers of two)");
            }
        }
        other => tracing::debug!("QMP event: {other:?}"),
    }
}

/// Stop QEMU: ACPI power-down (unless forced), then `quit`, then SIGKILL.
pub(super) async fn halt(
    qmp: &Qmp,
    child: &mut tokio::process::Child,
    force: bool,
    timeout: Duration,
) -> String {
    if !force {
        match qmp.run(qapi::qmp::system_powerdown {}).await {
            Ok(_) => {
                if let Ok(Ok(s)) = tokio::time::timeout(timeout, child.wait()).await {
                    return format!("guest powered off, {s}");
                }
                tracing::warn!("guest did not power off within {timeout:?}; forcing");
            }
            Err(e) => tracing::warn!("system_powerdown: {e}"),
        }
    }
    if let Err(e) = qmp.run(qapi::qmp::quit {}).await {
        tracing::warn!("quit: {e}");
    }
    if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
        return format!("stopped, {s}");
    }
    let _ = child.start_kill();
    match child.wait().await {
        Ok(s) => format!("killed, {s}"),
        Err(e) => format!("kill: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_events_are_logged_at_powers_of_two() {
        let mut c = EventCounts::default();
        let logged: Vec<u64> = (0..1000).filter_map(|_| c.count("RESET")).collect();
        assert_eq!(logged, vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 512]);
        assert_eq!(c.count("STOP"), Some(1));
    }
}
