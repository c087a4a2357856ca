//! Starting a prepared VM: the tunnel first (fail closed before the
//! guest exists), the shares' daemons, QEMU (its memory snapshot restored
//! when there is one), the dataplane, the control socket; what is
//! running is then handed to [`super::running`], which watches it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;

use super::prepare::{Prepared, bind_private};
use super::progress::{Progress, Reporter};
use super::restart::Helper;
use super::running::{EventCounts, Running, publish_wg, qemu_exited};
use super::server::{Control, Shared, serve_control};
use super::{SupervisorError, io, serial};
use crate::error::Error;
use crate::net::dataplane;
use crate::qemu::{self, process, qmp::Qmp};
use crate::state::{self, Record, VmPaths, VmState};

/// Start the VM, watch it until it stops, and stop what runs.
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
        broker,
    } = p;
    let exe = std::env::current_exe().map_err(io("cannot find the migrant executable"))?;

    // WireGuard first: fail closed before the guest exists.
    let (tunnel, wg_plan) = start_tunnel(&exe, wg, &identity, vm, &cfg, reporter).await?;

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
    let kept = dataplane::parent::Kept {
        sockets,
        ssh: Some(ssh_listener),
    };
    let hub =
        dataplane::parent::Hub::new(Some(vm.state.join(crate::net::dataplane::journal::FILE)));
    let mut plane_plan = dataplane::Plan::new(&cfg.name, net, rec.mac, &identity, &vm.run);
    plane_plan.broker = broker;
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
        tokio::spawn(publish_wg(up.reports.clone(), vm.run.clone(), plan.clone()));
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
            s,
            end.listener,
            &vm.state.join(format!("virtiofsd-{}.log", s.tag)),
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
