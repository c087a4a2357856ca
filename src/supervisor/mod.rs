//! The per-VM supervisor: owns the VM's network namespace, its dataplane
//! and QEMU. Started by `migrant up` as `migrant __supervisor …` in a new
//! session; lives exactly as long as the VM.

pub mod control;
pub mod progress;
mod restart;
mod serial;
use restart::Restart;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{self, Config};
use crate::net::netns::NetNs;
use crate::net::{dataplane, proxy, tap};
use crate::qemu::{self, Accelerator, process, qmp::Qmp};
use crate::state::{self, Paths, Record, VmPaths, VmState};
use control::{Info, Request, Response};
use progress::{Progress, Reporter};

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error("VM {0} has no record; run `migrant up`")]
    NoRecord(String),
    #[error(transparent)]
    Netns(#[from] crate::net::netns::NetnsError),
    #[error(transparent)]
    Tap(#[from] tap::TapError),
    #[error(transparent)]
    Dataplane(#[from] dataplane::DataplaneError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Process(#[from] process::ProcessError),
    #[error(transparent)]
    Qmp(#[from] qemu::qmp::QmpError),
    #[error(transparent)]
    Accel(#[from] qemu::accel::AccelError),
    #[error(transparent)]
    Firmware(#[from] crate::firmware::FirmwareError),
    #[error(transparent)]
    Share(#[from] crate::share::ShareError),
    #[error(transparent)]
    Wireguard(#[from] crate::wireguard::WgError),
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error("QEMU exited during start-up ({status}); last lines of its log:\n{log}")]
    QemuExited { status: String, log: String },
}

impl SupervisorError {
    pub fn exit_code(&self) -> u8 {
        use crate::exit;
        match self {
            SupervisorError::Config(e) => e.exit_code(),
            SupervisorError::State(e) => e.exit_code(),
            SupervisorError::NoRecord(_) => exit::USAGE,
            SupervisorError::Process(e) => e.exit_code(),
            SupervisorError::Accel(e) => e.exit_code(),
            SupervisorError::Firmware(e) => e.exit_code(),
            SupervisorError::Share(e) => e.exit_code(),
            SupervisorError::Wireguard(e) => e.exit_code(),
            SupervisorError::Image(e) => e.exit_code(),
            SupervisorError::Tap(tap::TapError::Open(_)) => exit::UNAVAILABLE,
            SupervisorError::Dataplane(e) => e.exit_code(),
            _ => exit::SOFTWARE,
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SupervisorError {
    let what = what.into();
    move |source| SupervisorError::Io { what, source }
}

/// Arguments of the hidden `__supervisor` mode.
#[derive(Debug, Clone)]
pub struct Args {
    pub name: String,
    pub project: PathBuf,
    /// Inherited descriptor holding the VM's lock.
    pub lock_fd: Option<i32>,
    /// Inherited write end of the progress pipe.
    pub progress_fd: Option<i32>,
}

/// Adopt a descriptor number given on our command line by our parent.
fn adopt(fd: Option<i32>) -> Option<std::fs::File> {
    let fd = fd?;
    // SAFETY: `migrant up` opened this descriptor for us, left it open
    // across exec and passed its number; nothing else in this process owns
    // it. fcntl checks that it is really open before we take ownership.
    unsafe {
        if libc::fcntl(fd, libc::F_GETFD) < 0 {
            return None;
        }
        let owned = OwnedFd::from_raw_fd(fd);
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        Some(std::fs::File::from(owned))
    }
}

/// Entry point of `migrant __supervisor`. Returns the process exit code.
pub fn main(args: Args) -> u8 {
    let _lock = adopt(args.lock_fd).map(state::VmLock::from_inherited);
    let mut reporter = Reporter::new(adopt(args.progress_fd));
    crate::net::dataplane::raise_fd_limit();
    let paths = Paths::from_env();
    let vm = paths.vm(&args.name);
    let result = run(&args, &vm, &mut reporter);
    let code = match &result {
        Ok(()) => 0,
        Err(e) => {
            let message = crate::error::chain(e);
            tracing::error!("{message}");
            reporter.send(&Progress::Failed {
                message,
                code: e.exit_code(),
            });
            e.exit_code()
        }
    };
    cleanup(&vm);
    code
}

/// Remove the runtime files and mark the record stopped.
fn cleanup(vm: &VmPaths) {
    for sock in [
        vm.control_sock(),
        vm.ssh_sock(),
        vm.console_sock(),
        vm.qmp_sock(),
    ] {
        let _ = std::fs::remove_file(sock);
    }
    let _ = std::fs::remove_dir(&vm.run);
    // The stores: unmounted, their loop devices freed (never deleted).
    crate::share::cleanup_recorded(vm);
    let _ = Record::update(&vm.record(), |r| {
        r.state = VmState::Stopped;
        r.supervisor_pid = None;
        r.qemu_pid = None;
        r.started_at = None;
    });
}

struct Prepared {
    cfg: Config,
    rec: Record,
    ns: Arc<NetNs>,
    tap: std::fs::File,
    sockets: dataplane::Sockets,
    qmp_ours: std::os::unix::net::UnixStream,
    qmp_theirs: std::os::unix::net::UnixStream,
    console: std::os::unix::net::UnixListener,
    /// The serial log's pipe: read end (ours), write end (QEMU's).
    serial: (std::os::fd::OwnedFd, std::os::fd::OwnedFd),
    identity: process::Identity,
    spec: qemu::VmSpec,
    /// Shares to serve, their stores mounted.
    served: Vec<crate::share::Served>,
    /// WireGuard mode: the plan, the TUN (in the namespace) and the UDP
    /// socket (in the host's).
    wg: Option<(crate::wireguard::Plan, std::fs::File, std::net::UdpSocket)>,
}

fn bind_private(path: &Path) -> Result<std::os::unix::net::UnixListener, SupervisorError> {
    let _ = std::fs::remove_file(path);
    let l = std::os::unix::net::UnixListener::bind(path)
        .map_err(io(format!("cannot listen on {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io(format!("chmod {}", path.display())))?;
    Ok(l)
}

/// The SSH socket belongs to the user who ran `migrant up` (still 0600).
fn give_to_invoker(path: &Path) -> Result<(), SupervisorError> {
    let Ok(who) = crate::provision::keys::Invoker::current() else {
        return Ok(());
    };
    crate::provision::as_user::chown_to(path, &who).map_err(io(format!(
        "chown {} to {}",
        path.display(),
        who.name
    )))
}

/// Give `path` (root's, in the VM's state folder or the image cache) to
/// `uid`:`gid` with `mode`.
fn set_owner(path: &Path, uid: u32, gid: u32, mode: u32) -> Result<(), SupervisorError> {
    nix::unistd::chown(
        path,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
    )
    .map_err(|e| io(format!("chown {}", path.display()))(e.into()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io(format!("chmod {}", path.display())))
}

fn prepare(args: &Args, vm: &VmPaths) -> Result<Prepared, SupervisorError> {
    let cfg = config::load(&args.project)?;
    let mut rec =
        Record::load(&vm.record())?.ok_or_else(|| SupervisorError::NoRecord(vm.name.clone()))?;
    // QEMU, unprivileged and possibly compromised, wrote this disk last
    // time: before it opens it again, its header must still name only the
    // backing file migrant made (not another VM's disk, not a host file).
    crate::image::check_disk_chain(&vm.disk(), &[&rec.base_image, &vm.snapshot()], false)?;
    // Traverse-only for others: the SSH socket inside belongs to the
    // invoking user (hooks, Ansible and `ssh-config` users reach it).
    state::ensure_dir(&vm.run, 0o711)?;
    // Fail closed before anything runs: drift, forbidden paths, and each
    // store mounted and verified (unmounted again by `cleanup`).
    let served = crate::share::mount_for_vm(&cfg, vm)?;
    // QEMU runs unprivileged and opens its files here by name.
    state::ensure_dir(&vm.state, 0o711)?;

    // Endpoint names are resolved here, once, in the host's namespace.
    let wg_plan = crate::wireguard::plan_for(&cfg)?;
    let ns = Arc::new(NetNs::create()?);
    let setup = dataplane::Setup::for_config(&cfg);
    let (tap, sockets, tun) = ns.run(|| -> Result<_, SupervisorError> {
        let tap = tap::create_tap(tap::TAP_NAME)?;
        let tun = wg_plan
            .as_ref()
            .map(crate::wireguard::create_tun_in_ns)
            .transpose()?;
        let sockets = dataplane::setup_in_ns(tap::TAP_NAME, &setup)?;
        Ok((tap, sockets, tun))
    })??;
    let wg = match (wg_plan, tun) {
        (Some(plan), Some(tun)) => {
            let udp = crate::wireguard::bind_udp(&plan)?;
            Some((plan, tun, udp))
        }
        _ => None,
    };

    let (qmp_ours, qmp_theirs) =
        std::os::unix::net::UnixStream::pair().map_err(io("QMP socket pair"))?;
    let console = bind_private(&vm.console_sock())?;

    // The VM's own identity: QEMU and its tunnel run as it.
    let vm_id = state::allocate_vm_id(vm, rec.vm_id, process::VM_ID_BASE, process::VM_ID_COUNT)?;
    rec.vm_id = Some(vm_id);
    let identity = process::vm_identity(vm_id)?;
    // Base images are readable by VM identities only; the snapshot a
    // reset disk overlays, by this VM only.
    let images = process::system_group(process::IMAGE_GROUP)?;
    set_owner(&rec.base_image, 0, images.as_raw(), 0o640)?;
    if vm.snapshot().exists() {
        set_owner(&vm.snapshot(), 0, identity.gid.as_raw(), 0o640)?;
    }
    // QEMU opens its disks itself, as the unprivileged user: 0600, its own.
    let mut owned = vec![vm.disk(), vm.seed()];
    let serial = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| io("serial log pipe")(e.into()))?;
    let firmware = crate::firmware::resolve(cfg.firmware, cfg.secure_boot, &vm.nvram())?;
    if let qemu::FirmwareFiles::Uefi { vars, .. } = &firmware {
        owned.push(vars.clone());
    }
    for f in &owned {
        set_owner(f, identity.uid.as_raw(), identity.gid.as_raw(), 0o600)?;
    }

    let accel = qemu::accel::resolve(cfg.accel)?;
    let spec = qemu::VmSpec {
        name: cfg.name.clone(),
        cpus: cfg.cpus,
        memory_mib: cfg.memory / (1024 * 1024),
        accel,
        firmware,
        disk: vm.disk(),
        seed: vm.seed(),
        mac: rec.mac.clone(),
        tap_fd: tap.as_raw_fd(),
        qmp_fd: qmp_theirs.as_raw_fd(),
        console_fd: console.as_raw_fd(),
        serial_fd: serial.1.as_raw_fd(),
        shares: Vec::new(),
        // What a pre-up hook gave on creation (see provision::hooks), then
        // MIGRANT_QEMU_EXTRA_ARGS (benchmarks, debugging).
        extra: {
            let mut extra = crate::provision::hooks::stored_extra_args(vm)
                .map_err(io("the VM's extra QEMU arguments"))?;
            extra.extend(crate::share::extra_qemu_args());
            extra
        },
    };
    Ok(Prepared {
        cfg,
        rec,
        ns,
        tap,
        sockets,
        qmp_ours,
        qmp_theirs,
        console,
        serial,
        identity,
        spec,
        served,
        wg,
    })
}

fn run(args: &Args, vm: &VmPaths, reporter: &mut Reporter) -> Result<(), SupervisorError> {
    let p = prepare(args, vm)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io("tokio runtime"))?;
    // block_on runs the root future on this (the main) thread, so QEMU is
    // forked by the thread that lives as long as the VM.
    rt.block_on(supervise(p, vm, reporter))
}

enum Control {
    Halt {
        force: bool,
        timeout: Duration,
        done: oneshot::Sender<Response>,
        /// Fired once the answer was written to the client.
        flushed: oneshot::Receiver<()>,
    },
}

struct Shared {
    qmp: Qmp,
    rec: Record,
    accel: Accelerator,
    qemu_pid: Option<u32>,
    hub: Arc<dataplane::parent::Hub>,
    ns: Arc<NetNs>,
}

async fn supervise(
    p: Prepared,
    vm: &VmPaths,
    reporter: &mut Reporter,
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
        tokio::spawn(publish_wg(up.reports.clone(), vm.run.clone(), plan.clone()));
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
    let mut child = process::spawn(process::Launch {
        argv: qemu::build_argv(&spec),
        netns: ns.fd(),
        identity: &identity,
        keep_fds,
        log: &qemu_log,
    })?;
    // QEMU holds its own copies now.
    let (serial_r, serial_w) = serial;
    drop((tap, qmp_theirs, console, fs_ends, serial_w));
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
                return Err(qemu_exited(Some(status), &qemu_log));
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

    // The dataplane: unprivileged, in its own process, restarted when it
    // dies (the sockets stay here, so nothing leaves meanwhile).
    let guest_ip = cfg.guest_ip();
    let ssh_listener = bind_private(&vm.ssh_sock())?;
    give_to_invoker(&vm.ssh_sock())?;
    let kept = dataplane::parent::Kept {
        sockets,
        ssh: Some(ssh_listener),
    };
    let hub = dataplane::parent::Hub::new(Some(vm.state.join(crate::net::journal::FILE)));
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

    let stop_reason: String = loop {
        tokio::select! {
            status = child.wait() => {
                let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                if !ready {
                    return Err(qemu_exited(None, &qemu_log).with_status(status));
                }
                break format!("QEMU exited ({status})");
            }
            Some(ctl) = ctl_rx.recv() => {
                let Control::Halt { force, timeout, done, flushed } = ctl;
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
            _ = sigterm.recv() => {
                let status = halt(&shared.qmp, &mut child, false, Duration::from_secs(cfg.halt_timeout)).await;
                break format!("SIGTERM ({status})");
            }
            Some(ev) = event_rx.recv() => {
                on_event(&ev, vm);
            }
            status = async {
                match tunnel.as_mut() {
                    Some(t) => t.child.wait().await,
                    None => std::future::pending().await,
                }
            } => {
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
                            tokio::spawn(publish_wg(t.reports.clone(), vm.run.clone(), plan.clone()));
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
            status = async {
                match plane.as_mut() {
                    Some(p) => p.child.wait().await,
                    None => std::future::pending().await,
                }
            } => {
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
/// secrets in them), world-readable like the VM's record.
async fn publish_wg(
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
                address: plan.address.to_string(),
                dns: plan.dns.iter().map(|d| d.to_string()).collect(),
                peers: r.peers,
                written_endpoints: plan.peers.iter().map(|p| p.written.clone()).collect(),
            };
            if let Ok(json) = serde_json::to_vec_pretty(&p)
                && let Err(e) = state::write_atomic(&path, &json, 0o644)
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

fn qemu_exited(status: Option<std::process::ExitStatus>, log: &Path) -> SupervisorError {
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

fn on_event(ev: &qapi::qmp::Event, vm: &VmPaths) {
    use qapi::qmp::Event;
    match ev {
        Event::STOP { .. } => {
            tracing::info!("QMP: STOP");
            let _ = Record::update(&vm.record(), |r| {
                if r.state == VmState::Running {
                    r.state = VmState::Paused
                }
            });
        }
        Event::RESUME { .. } => {
            tracing::info!("QMP: RESUME");
            let _ = Record::update(&vm.record(), |r| {
                if r.state == VmState::Paused {
                    r.state = VmState::Running
                }
            });
        }
        Event::SHUTDOWN { data, .. } => tracing::info!("QMP: SHUTDOWN {data:?}"),
        Event::RESET { data, .. } => tracing::info!("QMP: RESET {data:?}"),
        Event::GUEST_PANICKED { data, .. } => tracing::error!("QMP: GUEST_PANICKED {data:?}"),
        Event::BLOCK_IO_ERROR { data, .. } => tracing::error!("QMP: BLOCK_IO_ERROR {data:?}"),
        other => tracing::debug!("QMP event: {other:?}"),
    }
}

/// Stop QEMU: ACPI power-down (unless forced), then `quit`, then SIGKILL.
async fn halt(
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

async fn serve_control(
    listener: tokio::net::UnixListener,
    shared: Arc<Shared>,
    ctl: mpsc::Sender<Control>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = Arc::clone(&shared);
        let ctl = ctl.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let (flushed_tx, flushed_rx) = oneshot::channel();
                let resp = match serde_json::from_str::<Request>(&line) {
                    Ok(req) => handle(req, &shared, &ctl, flushed_rx).await,
                    Err(e) => Response::Error {
                        message: format!("bad request: {e}"),
                    },
                };
                let mut out = serde_json::to_vec(&resp).unwrap_or_default();
                out.push(b'\n');
                let written = w.write_all(&out).await;
                let _ = w.flush().await;
                let _ = flushed_tx.send(());
                if written.is_err() {
                    break;
                }
            }
        });
    }
}

/// The proxy's counters plus the refusals nftables counted itself
/// (connections to closed gateway ports never reach the proxy, spoofed
/// packets are dropped before it).
async fn network_view(shared: &Shared) -> proxy::StatsView {
    use crate::net::{nft, policy::Denial};
    let mut view = shared.hub.stats().await;
    if !shared.hub.running() {
        view.dataplane = Some("stopped; nothing leaves the VM until it is started again".into());
    }
    let ns = Arc::clone(&shared.ns);
    let read = tokio::task::spawn_blocking(move || {
        ns.run(|| nft::read_counters([nft::GATEWAY_REFUSED, nft::SPOOFED]))
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r.map_err(|e| e.to_string()))
    .and_then(|r| r.map_err(|e| e.to_string()));
    match read {
        Ok(counts) => {
            for (n, why) in counts
                .into_iter()
                .zip([Denial::GatewayPort, Denial::SpoofedSource])
            {
                if n > 0 {
                    *view.denied.entry(why.as_str().to_string()).or_default() += n;
                }
            }
        }
        Err(e) => tracing::warn!("reading nftables' counters: {e}"),
    }
    view
}

async fn handle(
    req: Request,
    shared: &Shared,
    ctl: &mpsc::Sender<Control>,
    flushed: oneshot::Receiver<()>,
) -> Response {
    match req {
        Request::Status => match shared.qmp.run(qapi::qmp::query_status {}).await {
            Ok(s) => {
                let network = network_view(shared).await;
                Response::Status {
                    state: format!("{:?}", s.status).to_lowercase(),
                    lease_seen: *shared.hub.lease.borrow(),
                    network,
                }
            }
            Err(e) => Response::Error {
                message: e.to_string(),
            },
        },
        Request::Info => match info(shared).await {
            Ok(i) => Response::Info(i),
            Err(e) => Response::Error {
                message: e.to_string(),
            },
        },
        Request::Resume => match shared.qmp.run(qapi::qmp::cont {}).await {
            Ok(_) => Response::Done,
            Err(e) => Response::Error {
                message: e.to_string(),
            },
        },
        Request::Resize { size } => resize(shared, size).await,
        Request::Halt {
            force,
            timeout_secs,
        } => {
            let (done, wait) = oneshot::channel();
            let sent = ctl
                .send(Control::Halt {
                    force,
                    timeout: Duration::from_secs(timeout_secs),
                    done,
                    flushed,
                })
                .await;
            if sent.is_err() {
                return Response::Error {
                    message: "the VM is already stopping".into(),
                };
            }
            wait.await.unwrap_or(Response::Done)
        }
    }
}

/// The drive id of the VM's disk on QEMU's command line.
const DISK_DRIVE: &str = "disk0";

/// Grow the disk live; never shrink it.
async fn resize(shared: &Shared, size: u64) -> Response {
    let blocks = match shared.qmp.run(qapi::qmp::query_block {}).await {
        Ok(b) => b,
        Err(e) => {
            return Response::Error {
                message: e.to_string(),
            };
        }
    };
    let Some(current) = blocks
        .iter()
        .find(|b| b.device == DISK_DRIVE)
        .and_then(|b| b.inserted.as_ref())
        .map(|i| u64::try_from(i.image.base.virtual_size).unwrap_or(0))
    else {
        return Response::Error {
            message: format!("QEMU reports no drive {DISK_DRIVE}"),
        };
    };
    if size < current {
        return Response::Error {
            message: format!("shrinking is refused: the disk is {current} bytes, {size} requested"),
        };
    }
    if size == current {
        return Response::Resized {
            from: current,
            to: current,
        };
    }
    let Ok(bytes) = i64::try_from(size) else {
        return Response::Error {
            message: format!("{size} bytes is too large"),
        };
    };
    let cmd = qapi::qmp::block_resize {
        device: Some(DISK_DRIVE.to_string()),
        node_name: None,
        size: bytes,
    };
    match shared.qmp.run(cmd).await {
        Ok(_) => {
            tracing::info!("disk grown from {current} to {size} bytes");
            Response::Resized {
                from: current,
                to: size,
            }
        }
        Err(e) => Response::Error {
            message: format!("block_resize: {e}"),
        },
    }
}

async fn info(shared: &Shared) -> Result<Info, qemu::qmp::QmpError> {
    let status = shared.qmp.run(qapi::qmp::query_status {}).await?;
    let kvm = shared.qmp.run(qapi::qmp::query_kvm {}).await?;
    let cpus = shared.qmp.run(qapi::qmp::query_cpus_fast {}).await?;
    let mem = shared
        .qmp
        .run(qapi::qmp::query_memory_size_summary {})
        .await?;
    Ok(Info {
        status: format!("{:?}", status.status).to_lowercase(),
        running: status.running,
        accelerator: shared.accel.as_str().to_string(),
        kvm_enabled: kvm.enabled,
        cpus: cpus.len(),
        memory_bytes: mem.base_memory,
        qemu_pid: shared.qemu_pid,
        supervisor_pid: std::process::id(),
        qemu_user: shared.rec.qemu_user.clone().unwrap_or_default(),
        uptime_secs: shared
            .rec
            .started_at
            .map(|t| state::now().saturating_sub(t))
            .unwrap_or(0),
        guest_ip: shared.rec.guest_ip.clone(),
        lease_seen: *shared.hub.lease.borrow(),
    })
}

fn parse_mac(s: &str) -> [u8; 6] {
    let mut mac = [0u8; 6];
    for (i, part) in s.split(':').take(6).enumerate() {
        mac[i] = u8::from_str_radix(part, 16).unwrap_or(0);
    }
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("52:54:00:ab:cd:ef"),
            [0x52, 0x54, 0, 0xab, 0xcd, 0xef]
        );
    }
}
