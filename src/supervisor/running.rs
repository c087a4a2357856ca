//! The running VM: QEMU, its helpers (virtiofsd, the WireGuard loop, the
//! dataplane) started and restarted, QMP events, the shares checked, until
//! QEMU stops, a halt is asked for or SIGTERM comes.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, watch};

use super::control::Response;
use super::prepare::{Prepared, bind_private, give_to_invoker};
use super::progress::{Progress, Reporter};
use super::restart::Restart;
use super::server::{Control, Shared, serve_control};
use super::{SupervisorError, cleanup, io, parse_mac, serial};
use crate::net::dataplane;
use crate::qemu::{self, process, qmp::Qmp};
use crate::state::{self, Record, VmPaths, VmState};

/// `boot_deadline`: (seconds, when) the guest must have answered SSH by;
/// past it QEMU is stopped, whether or not an `up` still waits.
pub(super) async fn supervise(
    p: Prepared,
    vm: &VmPaths,
    reporter: &mut Reporter,
    boot_deadline: Option<(u64, tokio::time::Instant)>,
) -> Result<(), SupervisorError> {
    let Prepared {
        cfg,
        mut rec,
        ns,
        tap,
        sockets,
        qmp_ours,
        qmp_theirs,
        console,
        serial,
        identity,
        mut spec,
        served,
        wg,
        incoming,
        backing,
        machine,
        disk_size,
    } = p;
    let exe = std::env::current_exe().map_err(io("cannot find the migrant executable"))?;

    // WireGuard first: fail closed before the guest exists.
    let mut tunnel = None;
    let mut wg_plan = None;
    if let Some((plan, tun, udp)) = wg {
        let up = crate::wireguard::bring_up(
            &exe,
            (&plan, tun, udp),
            &identity,
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
            rec.owner,
        ));
        tunnel = Some(up);
        wg_plan = Some(plan);
    }

    // One embedded virtiofsd per share, started before QEMU (from this
    // thread: they die with it).
    let mut daemons = Vec::new();
    let mut fs_ends = Vec::new();
    for s in &served {
        let (daemon, end) = crate::share::virtiofsd::spawn(
            &exe,
            &s.tag,
            &s.dir,
            &vm.run.join(format!("virtiofsd-{}.sock", s.tag)),
            &vm.state.join(format!("virtiofsd-{}.log", s.tag)),
            s.owner,
        )
        .map_err(io(format!("cannot start virtiofsd for share {:?}", s.tag)))?;
        tracing::info!(pid = ?daemon.child.id(), tag = %s.tag, dir = %s.dir.display(), "virtiofsd started");
        spec.shares.push(qemu::FsDevice {
            tag: s.tag.clone(),
            fd: end.as_raw_fd(),
        });
        daemons.push(daemon);
        fs_ends.push(end);
    }

    let qemu_log = vm.state.join("qemu.log");
    let mut keep_fds = vec![spec.tap_fd, spec.qmp_fd, spec.console_fd, spec.serial_fd];
    keep_fds.extend(spec.shares.iter().map(|s| s.fd));
    keep_fds.extend(spec.incoming_fd);
    keep_fds.extend(spec.backing_fd);
    let (mut child, qemu_log_drain) = process::spawn(process::Launch {
        argv: qemu::build_argv(&spec),
        netns: ns.fd(),
        identity: &identity,
        keep_fds,
        log: &qemu_log,
        max_file_size: process::max_file_size(disk_size),
    })?;
    let qemu_log = (qemu_log.as_path(), &qemu_log_drain);
    // QEMU holds its own copies now.
    let (serial_r, serial_w) = serial;
    drop((tap, qmp_theirs, console, fs_ends, serial_w, backing));
    serial::spawn(serial_r, vm.serial_log()).map_err(io("serial log thread"))?;
    let qemu_pid = child.id();
    tracing::info!(pid = ?qemu_pid, accel = spec.accel.as_str(), user = %identity.name, "QEMU started");

    rec.state = VmState::Starting;
    rec.supervisor_pid = Some(std::process::id());
    rec.qemu_pid = qemu_pid;
    rec.accel = Some(spec.accel.as_str().to_string());
    rec.cpus = Some(spec.cpus);
    rec.memory = Some(cfg.memory);
    rec.qemu_user = Some(identity.name.clone());
    rec.started_at = Some(state::now());
    // The disk diverges from the snapshot from now on: the next start
    // boots it, unless a reset makes it fresh again.
    rec.restore_memory = false;
    rec.save(&vm.record())?;
    reporter.send(&Progress::Qemu {
        pid: qemu_pid.unwrap_or(0),
        accel: spec.accel.as_str().to_string(),
        user: identity.name.clone(),
    });

    qmp_ours.set_nonblocking(true).map_err(io("QMP socket"))?;
    let stream = tokio::net::UnixStream::from_std(qmp_ours).map_err(io("QMP socket"))?;
    let (qmp, mut events) = match Qmp::open(stream).await {
        Ok(q) => q,
        Err(e) => {
            // QEMU closing the monitor usually means it exited: say why.
            if let Ok(Ok(status)) = tokio::time::timeout(Duration::from_secs(2), child.wait()).await
            {
                return Err(qemu_exited(Some(status), qemu_log));
            }
            return Err(e.into());
        }
    };

    let (event_tx, mut event_rx) = mpsc::unbounded_channel();
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

    // (after the event task: replies arrive through its polling)
    let restored = incoming.is_some();
    if let (Some(fd), Some(file)) = (spec.incoming_fd, incoming) {
        match super::memory::restore(&qmp, fd).await {
            Ok(took) => {
                tracing::info!("memory snapshot restored in {} ms", took.as_millis());
                reporter.send(&Progress::Restored {
                    ms: took.as_millis() as u64,
                });
            }
            Err(e) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(SupervisorError::Snapshot(format!(
                    "restoring the memory snapshot failed: {e}; `migrant up --cold` boots the disk instead"
                )));
            }
        }
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
    let mut plane_plan = dataplane::Plan::for_config(
        &cfg,
        parse_mac(&rec.mac),
        wg_plan
            .as_ref()
            .map(|p: &crate::wireguard::Plan| p.dns.as_slice()),
        &identity,
        &vm.run,
    );
    plane_plan.journal = true;
    plane_plan.probe_ssh = true;
    // A restored guest holds its lease already.
    plane_plan.lease_seen = restored;
    let mut plane = Some(
        dataplane::parent::start(&exe, &vm.state, plane_plan.clone(), &kept, &ns, &hub).await?,
    );
    tracing::info!(pid = ?plane.as_ref().and_then(|p| p.child.id()), user = %identity.name, "dataplane started");
    let mut plane_restart = Restart::new();
    let mut lease_rx = hub.lease.subscribe();
    let mut sshd_rx = hub.sshd.subscribe();

    let shared = Arc::new(Shared {
        qmp,
        rec: rec.clone(),
        accel: spec.accel,
        qemu_pid,
        hub: Arc::clone(&hub),
        ns: Arc::clone(&ns),
    });
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Control>(8);
    let control = bind_private(&vm.control_sock())?;
    control
        .set_nonblocking(true)
        .map_err(io("control socket"))?;
    let control = tokio::net::UnixListener::from_std(control).map_err(io("control socket"))?;
    tokio::spawn(serve_control(control, Arc::clone(&shared), ctl_tx));

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io("signal handler"))?;
    let mut ready = false;
    let mut lease_reported = false;
    // Fail closed while running: the stores must stay what was verified.
    let mut share_check = tokio::time::interval(Duration::from_secs(2));
    // A tunnel process that died is started again (a new TUN, a new
    // handshake), after a delay that doubles while it keeps dying.
    let mut tunnel_restart = Restart::new();

    // Events the guest can repeat at will are counted, not logged each.
    let mut event_counts = EventCounts::default();
    let stop_reason: String = loop {
        tokio::select! {
            status = child.wait() => {
                let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                if !ready {
                    return Err(qemu_exited(None, qemu_log).with_status(status));
                }
                break format!("QEMU exited ({status})");
            }
            Some(ctl) = ctl_rx.recv() => match ctl {
                Control::SaveMemory { stop, done, flushed } => {
                    let saved = super::memory::save(&shared.qmp, vm, &identity, &machine, rec.owner).await;
                    let answer = match &saved {
                        Ok(s) => {
                            tracing::info!(
                                state = s.state_bytes, disk = s.disk_bytes, paused_ms = s.paused.as_millis() as u64,
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
                        let status = halt(&shared.qmp, &mut child, true, Duration::ZERO).await;
                        crate::share::virtiofsd::stop_all(&mut daemons).await;
                        cleanup(vm);
                        let _ = done.send(answer);
                        let _ = tokio::time::timeout(Duration::from_secs(2), flushed).await;
                        break format!("stopped after a memory snapshot ({status})");
                    }
                    // Whatever happened, the guest runs on.
                    if let Err(e) = shared.qmp.run(qapi::qmp::cont {}).await {
                        tracing::error!("cannot resume the guest after the snapshot: {e}");
                    }
                    let _ = done.send(answer);
                }
                Control::Halt { force, timeout, done, flushed } => {
                    let status = halt(&shared.qmp, &mut child, force, timeout).await;
                    crate::share::virtiofsd::stop_all(&mut daemons).await;
                    let _ = Record::update(&vm.record(), |r| r.state = VmState::Stopped);
                    let reason = format!("halted by request ({status})");
                    // Answer after cleanup, so the caller sees a clean state.
                    cleanup(vm);
                    let _ = done.send(Response::Done);
                    let _ = tokio::time::timeout(Duration::from_secs(2), flushed).await;
                    break reason;
                }
            },
            _ = sigterm.recv() => {
                let status = halt(&shared.qmp, &mut child, false, Duration::from_secs(cfg.halt_timeout)).await;
                break format!("SIGTERM ({status})");
            }
            Some(ev) = event_rx.recv() => {
                on_event(&ev, vm, &mut event_counts);
            }
            status = exit_of(tunnel.as_mut().map(|t| &mut t.child)) => {
                // Fail closed: the TUN went with the process, so nothing
                // leaves until a new one runs; never any other way.
                let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                tunnel = None;
                let _ = std::fs::remove_file(crate::wireguard::Published::path(&vm.run));
                let delay = tunnel_restart.failed();
                tracing::error!(
                    "the WireGuard process exited ({status}); the guest has no egress; starting it again in {} s",
                    delay.as_secs()
                );
            }
            _ = tunnel_restart.due() => {
                if let Some(plan) = wg_plan.clone() {
                    let log = vm.state.join("wireguard.log");
                    match crate::wireguard::restart(&exe, &plan, &identity, &log, &ns).await {
                        Ok((t, plan)) => {
                            tracing::info!("WireGuard process started again");
                            tokio::spawn(publish_wg(t.reports.clone(), vm.run.clone(), plan.clone(), rec.owner));
                            tunnel = Some(t);
                            tunnel_restart.started();
                            wg_plan = Some(plan);
                        }
                        Err(e) => {
                            let delay = tunnel_restart.failed();
                            tracing::error!("cannot start the WireGuard process again: {e}; trying in {} s", delay.as_secs());
                        }
                    }
                }
            }
            _ = share_check.tick(), if !served.is_empty() => {
                if let Err(why) = crate::share::verify_served(&served) {
                    // Stop at once: no ACPI, no hooks, nothing the guest
                    // could use to write more through the share.
                    tracing::error!("{why}; stopping the VM now");
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    if !ready {
                        crate::share::virtiofsd::stop_all(&mut daemons).await;
                        return Err(crate::share::ShareError::Check(why).into());
                    }
                    break format!("stopped at once: {why}");
                }
                for d in daemons.iter_mut().filter(|d| !d.exited) {
                    if let Ok(Some(status)) = d.child.try_wait() {
                        d.exited = true;
                        tracing::error!("virtiofsd of share {:?} exited ({status}); the guest lost that share", d.tag);
                    }
                }
            }
            // Nobody may be waiting any more (an `up` killed by Ctrl-C or a
            // CI job's timeout): a boot that never finishes must not run
            // on, using a core, forever.
            _ = tokio::time::sleep_until(boot_deadline.map(|(_, at)| at).unwrap_or_else(tokio::time::Instant::now)), if !ready && boot_deadline.is_some() => {
                let secs = boot_deadline.map(|(s, _)| s).unwrap_or(0);
                tracing::error!("the guest did not answer SSH within {secs} s; stopping it (disk kept)");
                let _ = child.start_kill();
                let _ = child.wait().await;
                break format!("the guest did not answer SSH within {secs} s of starting; stopped (disk kept)");
            }
            Ok(()) = lease_rx.changed(), if !lease_reported => {
                lease_reported = true;
                reporter.send(&Progress::Lease { ip: guest_ip.to_string() });
            }
            Ok(()) = sshd_rx.changed(), if !ready => {
                if *sshd_rx.borrow_and_update() {
                    ready = true;
                    Record::update(&vm.record(), |r| r.state = VmState::Running)?;
                    reporter.send(&Progress::Sshd);
                    reporter.close();
                    tracing::info!("guest SSH server answers; VM is running");
                }
            }
            status = exit_of(plane.as_mut().map(|p| &mut p.child)) => {
                // Fail closed: the listeners stay here, unanswered, until
                // a new dataplane runs.
                let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                plane = None;
                hub.exited();
                let delay = plane_restart.failed();
                tracing::error!(
                    "the dataplane exited ({status}); the guest has no network; starting it again in {} s",
                    delay.as_secs()
                );
            }
            _ = plane_restart.due() => {
                let mut p = plane_plan.clone();
                p.probe_ssh = !ready;
                p.lease_seen = *hub.lease.borrow();
                match dataplane::parent::start(&exe, &vm.state, p, &kept, &ns, &hub).await {
                    Ok(running) => {
                        tracing::info!(pid = ?running.child.id(), "dataplane started again");
                        plane = Some(running);
                        plane_restart.started();
                    }
                    Err(e) => {
                        let delay = plane_restart.failed();
                        tracing::error!("cannot start the dataplane again: {e}; trying in {} s", delay.as_secs());
                    }
                }
            }
        }
    };
    crate::share::virtiofsd::stop_all(&mut daemons).await;
    tracing::info!("VM stopped: {stop_reason}");
    let _ = Record::update(&vm.record(), |r| r.last_stop = Some(stop_reason));
    Ok(())
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

/// The exit of `child`, if there is one; never, if not (a `select!` branch
/// for a helper that may not be running).
async fn exit_of(
    child: Option<&mut tokio::process::Child>,
) -> std::io::Result<std::process::ExitStatus> {
    match child {
        Some(c) => c.wait().await,
        None => std::future::pending().await,
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
