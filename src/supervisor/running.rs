//! The running VM, watched: one method per event — QEMU exited, a helper
//! (the WireGuard loop, the dataplane) died or is due again, a control
//! request, a QMP event, the shares' check, the boot deadline, SIGTERM —
//! until QEMU stops, a halt is asked for or SIGTERM comes. Starting it is
//! [`super::start`]'s.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::control::Response;
use super::progress::{Progress, Reporter};
use super::restart::{Helper, Turn};
use super::server::{Control, Shared};
use super::{SupervisorError, cleanup};
use crate::error::Error;
use crate::net::dataplane;
use crate::qemu::{process, qmp::Qmp};
use crate::state::{self, Record, VmPaths, VmState};

/// A running VM as the supervisor sees it: QEMU, its helpers, and what
/// each event needs. [`Running::watch`] dispatches one event at a time to
/// one method each.
pub(super) struct Running<'a> {
    pub(super) vm: &'a VmPaths,
    pub(super) reporter: &'a mut Reporter,
    /// (seconds, when) the guest must have answered SSH by.
    pub(super) boot_deadline: Option<(u64, tokio::time::Instant)>,
    pub(super) cfg: crate::config::Config,
    pub(super) identity: process::Identity,
    pub(super) machine: crate::memsnap::Machine,
    pub(super) exe: std::path::PathBuf,
    pub(super) ns: Arc<crate::net::netns::NetNs>,
    pub(super) child: tokio::process::Child,
    pub(super) qemu_log: (std::path::PathBuf, crate::rotate::Drain),
    pub(super) daemons: Vec<crate::share::virtiofsd::Daemon>,
    pub(super) served: Vec<crate::share::Served>,
    pub(super) shared: Arc<Shared>,
    pub(super) ctl_rx: mpsc::Receiver<Control>,
    pub(super) event_rx: mpsc::UnboundedReceiver<qapi::qmp::Event>,
    pub(super) sigterm: tokio::signal::unix::Signal,
    pub(super) share_check: tokio::time::Interval,
    pub(super) ready: bool,
    pub(super) lease_reported: bool,
    pub(super) event_counts: EventCounts,
    pub(super) guest_ip: std::net::Ipv4Addr,
    pub(super) hub: Arc<dataplane::parent::Hub>,
    pub(super) kept: dataplane::parent::Kept,
    pub(super) plane_plan: dataplane::Plan,
    pub(super) plane: Helper<dataplane::parent::Running>,
    pub(super) tunnel: Helper<crate::wireguard::child::Tunnel>,
    pub(super) wg_plan: Option<crate::wireguard::Plan>,
    pub(super) lease_rx: watch::Receiver<bool>,
    pub(super) sshd_rx: watch::Receiver<bool>,
}

/// What an event handler decided: go on, or stop the VM (why).
type Next = Result<Option<String>, Error>;

impl Running<'_> {
    /// Dispatch events until the VM stops; returns why it stopped.
    pub(super) async fn watch(&mut self) -> Result<String, Error> {
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
                let saved =
                    super::memory::save(&self.shared.qmp, self.vm, &self.identity, &self.machine)
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

    /// Each share's daemon must keep running (its exit is logged once).
    async fn check_shares(&mut self) -> Next {
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
    pub(super) async fn finish(&mut self, stop_reason: String) {
        crate::share::virtiofsd::stop_all(&mut self.daemons).await;
        tracing::info!("VM stopped: {stop_reason}");
        let _ = Record::update(&self.vm.record(), |r| r.last_stop = Some(stop_reason));
    }
}

/// Publish the packet loop's reports for `migrant wg` and `status` (no
/// secrets in them), private like the VM's record.
pub(super) async fn publish_wg(
    mut reports: watch::Receiver<Option<crate::wireguard::tunnel::Report>>,
    run: std::path::PathBuf,
    plan: crate::wireguard::Plan,
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
                && let Err(e) = state::write_private(&path, &json)
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
    pub(super) fn with_status(self, s: String) -> Self {
        match self {
            SupervisorError::QemuExited { log, .. } => {
                SupervisorError::QemuExited { status: s, log }
            }
            other => other,
        }
    }
}

/// QEMU's last words: its log, once the pipe into it is drained.
pub(super) fn qemu_exited(
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
pub(super) struct EventCounts(std::collections::HashMap<&'static str, u64>);

impl EventCounts {
    /// Count one `kind`; `Some(count)` when this one is to be logged.
    fn count(&mut self, kind: &'static str) -> Option<u64> {
        let n = self.0.entry(kind).or_insert(0);
        *n = n.saturating_add(1);
        n.is_power_of_two().then_some(*n)
    }
}

pub(super) fn on_event(ev: &qapi::qmp::Event, vm: &VmPaths, counts: &mut EventCounts) {
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
