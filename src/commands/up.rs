//! `migrant up`: create the VM on first use, start its supervisor, wait
//! until the guest is ready.

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{Live, Project, Result, live, ssh_key};
use crate::config::{Accel, Autoconnect, Config};
use crate::error::Error;
use crate::exit;
use crate::provision::ansible;
use crate::provision::hooks::{self, Hook, Trigger};
use crate::provision::keys;
use crate::provision::renew;
use crate::secrets::vm::VmSecrets;
use crate::state::{self, Record, VmLock, VmPaths, VmState};
use crate::supervisor::control::{self, Request};
use crate::supervisor::progress::Progress;

const PLACEHOLDER: &str = "__MIGRANT_PUBKEY__";

/// How `up` was asked to run.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub timeout: u64,
    /// Honour the Migrantfile's `autoconnect`.
    pub autoconnect: bool,
    /// What hooks are told caused them.
    pub trigger: Trigger,
    /// Boot the disk even when a memory snapshot could be restored.
    pub cold: bool,
}

pub fn up(p: &Project, opts: &UpOptions) -> Result<u8> {
    let Project { cfg, paths, vm } = p;
    // Run by a user: what the host must offer, and what needs root still.
    super::host::require_for_users()?;
    crate::share::check_old_images(cfg)?;
    // The secrets' values, read by this process (the user's) each time
    // the VM starts: a rotated token is the one used. A missing one stops
    // the start before anything is made.
    let lent =
        crate::secrets::read_all(cfg).map_err(|e| Error::other(e.exit_code(), e.to_string()))?;
    // A moved project folder or share: refused naming the share and both
    // paths, before anything else.
    if let Some(rec) = crate::share::load_recorded(vm)? {
        crate::share::check_drift(cfg, &rec)?;
    }
    // Holes never open the host, whatever its addresses are today.
    let host = crate::net::dataplane::policy::HostAddrs::read_host().map_err(|e| {
        Error::other(
            exit::SOFTWARE,
            format!("cannot read the host's addresses: {e}"),
        )
    })?;
    cfg.check_holes_against(&host)?;
    // The WireGuard file's mistakes are reported before anything starts
    // (the supervisor reads it again and resolves endpoint names).
    if let Some(wg) = &cfg.network.wireguard {
        let conf = crate::wireguard::conf::load(wg)?;
        for w in &conf.warnings {
            eprintln!("warning: {w}");
        }
        if !cfg.network.ipv6 {
            if let Some(w) = conf.unused_ipv6(wg) {
                eprintln!("warning: {w}");
            }
        } else if conf.addresses6.is_empty() {
            let e = crate::wireguard::WgError::NoAddress6(wg.display().to_string());
            return Err(Error::other(e.exit_code(), e.to_string()));
        }
        // IPv6 servers are reached only when the tunnel carries IPv6.
        if !conf.dns.iter().any(|d| d.is_ipv4() || cfg.network.ipv6) {
            if !cfg.network.dns_host {
                return Err(Error::other(
                    exit::CONFIG,
                    format!(
                        "{} has no IPv4 `DNS =` line (IPv6 ones serve only with ipv6 = true): the guest's DNS would leave outside the tunnel. Add `DNS = <the tunnel's resolver>` to it, or set `dns = \"host\"` under [network] in {} to use the host's resolvers",
                        wg.display(),
                        cfg.file.display()
                    ),
                ));
            }
            eprintln!(
                "warning: {} has no IPv4 DNS server: the guest's DNS queries go to the host's resolvers, outside the tunnel ([network] dns = \"host\")",
                wg.display()
            );
        }
    }
    match live(vm)? {
        // Already up: no hooks (they ran when it started), no provisioning.
        Live::Active(r) if r.state == VmState::Paused => {
            control::request(
                &vm.control_sock(),
                &Request::Resume,
                Duration::from_secs(15),
            )?;
            println!("==> {}: resumed", cfg.name);
            return connect(p, opts);
        }
        Live::Active(r) if r.state == VmState::Running => {
            println!("==> {}: already running ({})", cfg.name, r.guest_ip);
            for note in super::drift::pending_changes(p, &r, super::drift::When::Running) {
                println!("==> {}: {note}", cfg.name);
            }
            return connect(p, opts);
        }
        Live::Stopped(r) | Live::Active(r) if r.project_dir != cfg.dir => {
            return Err(Error::other(
                exit::CONFIG,
                format!(
                    "VM name {:?} belongs to the project {}; set another `name` in {}",
                    cfg.name,
                    r.project_dir.display(),
                    cfg.file.display()
                ),
            ));
        }
        _ => {}
    }
    let lock = VmLock::try_acquire(vm)?;
    warm_or_cold(cfg, vm, opts.cold)?;
    state::ensure_dir(&paths.home, 0o711)?;
    state::ensure_dir(&paths.vms(), 0o711)?;

    let creating = match Record::load(&vm.record())? {
        Some(rec) if vm.disk().exists() => {
            for note in super::drift::pending_changes(p, &rec, super::drift::When::Booting) {
                println!("==> {}: {note}", cfg.name);
            }
            false
        }
        _ => true,
    };
    // The secrets a built VM was made with must be those the file names
    // (else 78 before anything runs); a new VM gets its own below.
    let roots = if cfg.secrets.is_empty() {
        Vec::new()
    } else {
        crate::secrets::upstream_roots().map_err(|e| Error::other(exit::UNAVAILABLE, e))?
    };
    let checked = if creating {
        None
    } else {
        Some(broker_plan(cfg, vm, lent.clone(), &roots)?)
    };
    // Shares: path rules, drift, stores (created when building, required
    // after). Never deletes a store, whatever fails later.
    crate::share::prepare_for_up(cfg, vm, creating)?;
    if creating {
        println!("==> {}: creating VM", cfg.name);
        if let Err(e) = create(cfg, paths, vm) {
            // Nothing of this VM existed before this command: remove what
            // it made, but only the VM's own state folder.
            remove_new_vm(vm);
            return Err(e);
        }
    }
    // pre-up: nothing runs yet. A failure leaves nothing started, and a VM
    // this command was creating is removed again.
    let before_start = hooks::fire(cfg, Hook::PreUp, opts.trigger, None, false).and_then(|()| {
        if creating {
            hooks::take_extra_args(cfg, vm).map(drop)
        } else {
            Ok(())
        }
    });
    if let Err(e) = before_start {
        if creating {
            remove_new_vm(vm);
        }
        return Err(e.into());
    }
    crate::firmware::ensure(cfg.firmware, cfg.secure_boot, &paths.home)?;
    let broker = match checked {
        Some(plan) => plan,
        None => broker_plan(cfg, vm, lent, &roots)?,
    };
    if creating || crate::share::load_recorded(vm)?.is_none() {
        crate::share::save_recorded(vm, cfg)?;
    }
    let provisioned = Record::load(&vm.record())?.is_some_and(|r| r.provisioned);
    let playbook = cfg.dir.join(ansible::PLAYBOOK).is_file();
    // The original's console autoconnect: attach as soon as QEMU runs,
    // unless provisioning must happen first.
    let console_now =
        opts.autoconnect && cfg.autoconnect == Autoconnect::Console && (provisioned || !playbook);
    // A VM that cannot start (no tunnel handshake, a share that fails its
    // checks) stays built and stopped, with nothing running; the next `up`
    // tries again with the same disk.
    start(
        cfg,
        paths,
        vm,
        &lock,
        broker.as_ref(),
        (opts.timeout, console_now),
    )?;
    drop(lock);
    if console_now {
        if !provisioned {
            super::provision::mark_provisioned(p)?;
        }
        hooks::fire(cfg, Hook::PostUp, opts.trigger, None, false)?;
        eprintln!("==> {}: attaching the serial console", cfg.name);
        return super::lifecycle::console(p);
    }
    if !provisioned {
        // First boot (or a first provisioning that never completed).
        if playbook {
            super::provision::run_playbook(p, &[])?;
        } else {
            super::provision::mark_provisioned(p)?;
        }
    }
    hooks::fire(cfg, Hook::PostUp, opts.trigger, Some(cfg.guest_ip()), false)?;
    println!("==> {}: ready; `migrant ssh` to log in", cfg.name);
    connect(p, opts)
}

/// A disk fresh on a memory snapshot resumes that snapshot, if the
/// machine the Migrantfile asks for now is the one it was taken on;
/// otherwise the start is refused (78) with the reason, unless `cold`
/// says to boot the disk.
fn warm_or_cold(cfg: &Config, vm: &VmPaths, cold: bool) -> Result<()> {
    let Some(rec) = Record::load(&vm.record())? else {
        return Ok(());
    };
    if !rec.restore_memory {
        return Ok(());
    }
    let why = match crate::memsnap::load(&rec.snapshot_owner(vm)) {
        None => Some("its memory state is gone".to_string()),
        Some(meta) => mismatch(cfg, &meta)?,
    };
    match (why, cold) {
        (None, false) => Ok(()),
        (why, true) => {
            println!(
                "==> {}: booting the disk (--cold){}",
                cfg.name,
                why.map(|w| format!("; the memory snapshot could not be resumed: {w}"))
                    .unwrap_or_default()
            );
            Record::update(&vm.record(), |r| r.restore_memory = false)?;
            Ok(())
        }
        (Some(why), false) => Err(refusal(cfg, &why)),
    }
}

/// Why the memory snapshot of `owner` cannot be resumed by the machine
/// `cfg` asks for (`None`: it can, or it is no memory snapshot).
fn unresumable(cfg: &Config, owner: &VmPaths) -> Result<Option<String>> {
    match crate::memsnap::load(owner) {
        Some(meta) => mismatch(cfg, &meta),
        None => Ok(None),
    }
}

/// Why `meta`'s snapshot cannot be resumed by the machine `cfg` asks for.
fn mismatch(cfg: &Config, meta: &crate::memsnap::Meta) -> Result<Option<String>> {
    let version = crate::memsnap::qemu_version().map_err(Error::io("cannot run QEMU"))?;
    // The accelerator is checked when QEMU starts (resolving it probes).
    let now = crate::memsnap::Machine::for_config(cfg, &meta.accel, version);
    Ok(meta.mismatch(&now))
}

fn refusal(cfg: &Config, why: &str) -> Error {
    Error::other(
        exit::CONFIG,
        format!(
            "{}: the memory snapshot cannot be resumed: {why}. `--cold` boots its disk instead; `migrant snapshot --memory` takes a new one",
            cfg.name
        ),
    )
}

/// For `reset` and `run --snapshot`, before they touch anything: refused
/// (78) when the VM's memory snapshot cannot be resumed, unless `cold`.
pub fn check_resumable(p: &Project, cold: bool) -> Result<()> {
    if cold {
        return Ok(());
    }
    match unresumable(&p.cfg, &p.vm)? {
        Some(why) => Err(refusal(&p.cfg, &why)),
        None => Ok(()),
    }
}

/// What one SSH login that sets the guest's clock came to.
enum ClockAttempt {
    Set,
    /// The login did not work (yet): SSH's complaint.
    NoLogin(String),
    /// Logged in, but the clock could not be set.
    NotSet(String),
}

/// Log in, set the guest's clock to the host's (a restored guest's clock
/// stands where it was saved), reseed its random generator and, for a
/// clone, give it a new identity ([`crate::provision::renew`]). The time
/// is sent once the guest's side waits for it, so the SSH handshake does
/// not make it late.
fn set_guest_clock(
    cfg: &Config,
    vm: &VmPaths,
    deadline: Instant,
    clone: Option<&renew::Identity>,
) -> Result<ClockAttempt> {
    use std::io::Write;
    let mut cmd = super::ssh_command(cfg, vm)?;
    cmd.args([
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=15",
        "--",
        renew::SCRIPT,
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let seed: [u8; 64] = super::random_bytes()?;
    let mut child = cmd.spawn().map_err(Error::io("cannot run ssh"))?;
    // The guest answers here: one that never says its lines does not
    // hold `up` past its deadline.
    let _watchdog = kill_after(child.id(), deadline);
    let (Some(mut input), Some(output)) = (child.stdin.take(), child.stdout.take()) else {
        return Err(Error::other(exit::SOFTWARE, "ssh without pipes"));
    };
    let mut lines = BufReader::new(output).lines().map_while(|l| l.ok());
    let logged_in = lines.next().as_deref() == Some("in");
    let mut said = Vec::new();
    if logged_in && lines.next().as_deref() == Some("go") {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let _ = input.write_all(renew::input(now, &seed, clone).as_bytes());
        drop(input);
        said.extend(lines.by_ref().take(8));
    }
    drop(lines);
    let out = child
        .wait_with_output()
        .map_err(Error::io("waiting for ssh"))?;
    let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let has = |w: &str| said.iter().any(|l| l == w);
    if logged_in && !has("seeded") {
        eprintln!(
            "warning: {}: the resumed guest's random generator was {} (python3 missing in the guest?)",
            cfg.name,
            if has("mixed") {
                "given new bytes but not reseeded"
            } else {
                "not reseeded"
            }
        );
    }
    if logged_in && clone.is_some() && !has("renewed") {
        eprintln!(
            "warning: {}: the clone could not be given its own machine-id, hostname and SSH host keys",
            cfg.name
        );
    }
    Ok(match (logged_in, has("set")) {
        (_, true) => ClockAttempt::Set,
        (true, false) => ClockAttempt::NotSet(why),
        (false, _) => ClockAttempt::NoLogin(why),
    })
}

/// For a resumed guest, [`wait_login`] and the clock in one login (each
/// SSH login costs most of a second under TCG). A clock that cannot be
/// set only warns.
fn login_setting_clock(cfg: &Config, vm: &VmPaths, deadline: Instant) -> Result<()> {
    // A clone (its record names the VM it was cloned from) is a new
    // machine; every resume gets a new random state.
    let is_clone = Record::load(&vm.record())?.is_some_and(|r| r.template.is_some());
    let identity = if is_clone {
        Some(renew::Identity {
            machine_id: super::random_bytes()?,
            hostname: renew::hostname_for(&vm.name),
        })
    } else {
        None
    };
    loop {
        match set_guest_clock(cfg, vm, deadline, identity.as_ref())? {
            ClockAttempt::Set => return Ok(()),
            ClockAttempt::NotSet(why) => {
                eprintln!(
                    "warning: {}: cannot set the resumed guest's clock ({why}); it may be behind the host's",
                    cfg.name
                );
                return Ok(());
            }
            ClockAttempt::NoLogin(why) if Instant::now() > deadline => {
                return Err(login_failed(cfg, &why));
            }
            ClockAttempt::NoLogin(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

fn login_failed(cfg: &Config, why: &str) -> Error {
    Error::other(
        exit::UNAVAILABLE,
        format!(
            "{}: SSH login as {} does not work: {why}",
            cfg.name, cfg.ssh.user
        ),
    )
}

/// The Migrantfile's `autoconnect`, unless told not to.
fn connect(p: &Project, opts: &UpOptions) -> Result<u8> {
    if !opts.autoconnect {
        return Ok(0);
    }
    match p.cfg.autoconnect {
        Autoconnect::None => Ok(0),
        Autoconnect::Ssh => super::lifecycle::ssh(p, &[]),
        Autoconnect::Console => super::lifecycle::console(p),
    }
}

fn remove_new_vm(vm: &VmPaths) {
    for f in [
        vm.disk(),
        vm.seed(),
        vm.nvram(),
        vm.snapshot(),
        vm.snapshot_nvram(),
        vm.record(),
        vm.serial_log(),
        vm.supervisor_log(),
        crate::share::record_file(vm),
    ] {
        let _ = std::fs::remove_file(f);
    }
    for log in ["qemu.log", "wireguard.log"] {
        let _ = std::fs::remove_file(vm.state.join(log));
    }
    crate::qemu::extra::forget(vm);
    let _ = std::fs::remove_file(vm.lock());
    let _ = std::fs::remove_dir(&vm.state);
}

/// The user-data with the managed key substituted. Errors before anything
/// is built.
fn user_data(cfg: &Config) -> Result<String> {
    let path = cfg.dir.join("cloud-init.yml");
    let text = crate::userfile::read_to_string(&path, 1 << 20).map_err(|e| {
        Error::other(
            exit::CONFIG,
            format!(
                "{}: {e} (every project needs a cloud-init.yml; `migrant init` writes one)",
                path.display()
            ),
        )
    })?;
    if !text.contains(PLACEHOLDER) {
        return Ok(text);
    }
    let key = ssh_key(cfg)?;
    let who = keys::Invoker::current()?;
    // A key named but missing is made, as the original tool does.
    let public = match keys::public_key(&key)? {
        Some(p) => p,
        None => {
            let p = keys::ensure_key(&who, &key)?;
            println!("==> {}: created the SSH key {}", cfg.name, key.display());
            p
        }
    };
    Ok(crate::seed::substitute_pubkey(&text, Some(&public))?)
}

/// What the dataplane brokers for this start: the secrets the VM was made
/// with (refused, 78, when the Migrantfile now names others), their
/// values as read now, and the authorities the real servers must chain
/// to. `None` without secrets.
fn broker_plan(
    cfg: &Config,
    vm: &VmPaths,
    lent: Vec<(String, crate::secrets::Value)>,
    roots: &[Vec<u8>],
) -> Result<Option<crate::net::dataplane::broker::Plan>> {
    let Some(made) = VmSecrets::load_for(cfg, &vm.state)
        .map_err(|e| Error::other(e.exit_code(), e.to_string()))?
    else {
        return Ok(None);
    };
    Ok(Some(crate::net::dataplane::broker::Plan::new(
        &made, lent, roots,
    )))
}

/// A locally administered address in QEMU's 52:54:00 range.
fn random_mac() -> Result<state::Mac> {
    let [a, b, c]: [u8; 3] = super::random_bytes()?;
    Ok(state::Mac([0x52, 0x54, 0x00, a, b, c]))
}

fn create(cfg: &Config, paths: &state::Paths, vm: &VmPaths) -> Result<()> {
    let user_data = user_data(cfg)?;
    // Shares with a guest path are mounted by the seed.
    let (user_data, warning) = crate::share::seed::user_data_with_mounts(&user_data, &cfg.shares);
    if let Some(w) = warning {
        eprintln!("warning: {w}");
    }
    let source = crate::image::resolve(&cfg.image, cfg.image_checksum.as_ref())?;
    state::ensure_dir(&paths.images(), 0o711)?;
    let base = crate::image::obtain(&source, &paths.images(), &cfg.name)?;
    state::ensure_dir(&vm.state, 0o711)?;
    crate::image::create_overlay(&base, &vm.disk(), cfg.disk)?;
    // The VM's authority and placeholders, fixed for its life: the seed
    // gives them to the guest.
    let secrets = if cfg.secrets.is_empty() {
        None
    } else {
        let s = VmSecrets::make(cfg).map_err(|e| Error::other(e.exit_code(), e.to_string()))?;
        s.save(&vm.state)
            .map_err(|e| Error::other(e.exit_code(), e.to_string()))?;
        Some(s)
    };
    let mac = random_mac()?;
    let instance = format!("{}-{}", cfg.name, state::now());
    let meta = crate::seed::meta_data(&instance, &cfg.name);
    let net = crate::seed::network_config(mac, cfg.net6());
    crate::seed::write_seed(
        &vm.seed(),
        &[
            ("meta-data", meta.as_bytes()),
            ("user-data", user_data.as_bytes()),
            ("network-config", net.as_bytes()),
            (
                "vendor-data",
                crate::seed::vendor_data(secrets.as_ref()).as_bytes(),
            ),
        ],
    )?;
    Record {
        name: cfg.name.clone(),
        project_dir: cfg.dir.clone(),
        base_image: base,
        mac,
        guest_ip: cfg.guest_ip(),
        created_at: state::now(),
        state: VmState::Stopped,
        supervisor_pid: None,
        qemu_pid: None,
        accel: None,
        qemu_user: None,
        vm_id: None,
        started_at: None,
        last_stop: None,
        provisioned: false,
        cpus: None,
        memory: None,
        cloud_init_done: false,
        restore_memory: false,
        template: None,
    }
    .save(&vm.record())?;
    Ok(())
}

/// Start the supervisor and follow its progress until the guest is ready
/// (or, with `qemu_only`, until QEMU runs).
fn start(
    cfg: &Config,
    paths: &state::Paths,
    vm: &VmPaths,
    lock: &VmLock,
    broker: Option<&crate::net::dataplane::broker::Plan>,
    (timeout, qemu_only): (u64, bool),
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let runtime_root = vm.run.parent().unwrap_or(Path::new("/run"));
    state::ensure_dir(runtime_root, 0o711)?;
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Error::io("pipe")(e.into()))?;
    let log = state::open_log(&vm.supervisor_log())
        .map_err(Error::io(format!("{}", vm.supervisor_log().display())))?;
    let log2 = log.try_clone().map_err(Error::io("supervisor log"))?;
    let lock_fd = lock.as_file().as_raw_fd();
    let progress_fd = write_end.as_raw_fd();
    // The config validated here goes down as it is: the supervisor never
    // reads the Migrantfile (which may change meanwhile) itself.
    let config = cfg
        .handover()
        .map_err(Error::io("cannot hand the config to the supervisor"))?;
    let config_fd = config.as_raw_fd();
    // The secrets with their values: in memory only, like the config.
    let secrets = broker
        .map(|plan| {
            serde_json::to_vec(plan)
                .map_err(std::io::Error::other)
                .and_then(|json| crate::sandbox::handover::sealed(c"migrant-secrets", &json))
        })
        .transpose()
        .map_err(Error::io("cannot hand the secrets to the supervisor"))?;
    let mut keep_fds = vec![lock_fd, progress_fd, config_fd];
    let mut cmd = Command::new(super::self_exe()?);
    cmd.arg("__supervisor")
        .arg("--name")
        .arg(&cfg.name)
        .arg("--project")
        .arg(&cfg.dir)
        .arg("--lock-fd")
        .arg(lock_fd.to_string())
        .arg("--progress-fd")
        .arg(progress_fd.to_string())
        .arg("--config-fd")
        .arg(config_fd.to_string())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    if let Some(fd) = &secrets {
        cmd.arg("--secrets-fd").arg(fd.as_raw_fd().to_string());
        keep_fds.push(fd.as_raw_fd());
    }
    // Without root the supervisor becomes root of the VM's user namespace,
    // where the defaults would be root's: it gets the user's folders.
    cmd.env("MIGRANT_HOME", &paths.home)
        .env("MIGRANT_RUNTIME", &paths.runtime);
    // Its own session; the lock and the progress pipe go across exec.
    crate::sandbox::Confine {
        keep_fds,
        new_session: true,
        ..crate::sandbox::Confine::default()
    }
    .apply_std(&mut cmd);
    // The supervisor enforces the boot deadline itself (a little after
    // ours, so that a waiting `up` reports its own timeout): an `up` that
    // is killed leaves no VM booting forever. With the console attached
    // at once, a person watches the boot: no deadline.
    if !qemu_only {
        cmd.arg("--boot-timeout")
            .arg((timeout + BOOT_GRACE_SECS).to_string());
    }
    let mut child = cmd
        .spawn()
        .map_err(Error::io("cannot start the supervisor"))?;
    drop((write_end, config, secrets));
    println!("==> {}: starting (supervisor pid {})", cfg.name, child.id());

    let lines = spawn_line_reader(read_end);
    let mut sshd = false;
    let mut restored = false;
    while !sshd {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match lines.recv_timeout(left) {
            Ok(l) => l,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                abort_start(vm);
                return Err(Error::other(
                    exit::UNAVAILABLE,
                    format!(
                        "{}: the guest did not answer SSH within {timeout} s; the VM was stopped (disk kept). Serial log: {}",
                        cfg.name,
                        vm.serial_log().display()
                    ),
                ));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = child.wait();
                return Err(Error::other(
                    exit::SOFTWARE,
                    format!(
                        "{}: the supervisor exited during start-up; see {}:\n{}",
                        cfg.name,
                        vm.supervisor_log().display(),
                        tail(&vm.supervisor_log(), 10)
                    ),
                ));
            }
        };
        match serde_json::from_str::<Progress>(&line) {
            Ok(Progress::Qemu { pid, accel, user }) => {
                println!(
                    "==> {}: QEMU running (pid {pid}, accelerator {accel}, as user {user})",
                    cfg.name
                );
                if accel == "tcg" && cfg.accel == Accel::Auto {
                    eprintln!(
                        "warning: KVM cannot run a guest on this host; using TCG (slow). `migrant doctor` says why."
                    );
                }
                if qemu_only {
                    break;
                }
            }
            Ok(Progress::Tunnel { peers, dns }) => {
                println!(
                    "==> {}: WireGuard tunnel up (handshake with {})",
                    cfg.name,
                    peers.join(", ")
                );
                if !dns.is_empty() {
                    println!(
                        "==> {}: DNS through the tunnel: {}",
                        cfg.name,
                        dns.join(", ")
                    );
                }
            }
            Ok(Progress::Restored { ms }) => {
                println!(
                    "==> {}: resumed from its memory snapshot (state loaded in {:.1} s)",
                    cfg.name,
                    ms as f64 / 1000.0
                );
                restored = true;
            }
            Ok(Progress::Lease { ip }) => {
                println!("==> {}: guest took its DHCP lease {ip}", cfg.name)
            }
            Ok(Progress::Sshd) => {
                println!("==> {}: guest SSH server answers", cfg.name);
                sshd = true;
            }
            Ok(Progress::Failed { message, code }) => {
                let _ = child.wait();
                return Err(Error::other(code, message));
            }
            Err(e) => tracing::debug!("unreadable progress line {line:?}: {e}"),
        }
    }
    // The supervisor runs on in its own session; reap it if it exits
    // while we still wait (never leave a zombie behind us).
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    if qemu_only {
        return Ok(());
    }

    if restored {
        // The guest runs on from the moment it was saved: its cloud-init
        // is long done, its clock is behind.
        return login_setting_clock(cfg, vm, deadline);
    }
    wait_login(cfg, vm, deadline)?;
    // Only until cloud-init has run once for this VM, as the original
    // waits only when it creates the VM: later boots neither wait nor warn
    // (its playbooks often disable cloud-init after the first boot).
    let done = Record::load(&vm.record())?.is_some_and(|r| r.cloud_init_done);
    if cfg.wait_cloud_init && !done && wait_cloud_init(cfg, vm)? {
        Record::update(&vm.record(), |r| r.cloud_init_done = true)?;
    }
    Ok(())
}

/// How much longer than `up`'s own deadline the supervisor lets a boot run.
const BOOT_GRACE_SECS: u64 = 10;

fn abort_start(vm: &VmPaths) {
    let _ = control::request(
        &vm.control_sock(),
        &Request::Halt {
            force: true,
            timeout_secs: 0,
        },
        Duration::from_secs(30),
    );
    super::wait_unlocked(vm, Duration::from_secs(10));
}

fn spawn_line_reader(fd: OwnedFd) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let reader = BufReader::new(std::fs::File::from(fd));
        for line in reader.lines() {
            match line {
                Ok(l) => {
                    if tx.send(l).is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    });
    rx
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Poll an SSH login until it works: sshd answering is not enough, the
/// guest may not have installed the key yet.
fn wait_login(cfg: &Config, vm: &VmPaths, deadline: Instant) -> Result<()> {
    loop {
        let mut cmd = super::ssh_command(cfg, vm)?;
        cmd.args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=15", "true"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = cmd.spawn().map_err(Error::io("cannot run ssh"))?;
        let watchdog = kill_after(child.id(), deadline);
        let out = child
            .wait_with_output()
            .map_err(Error::io("waiting for ssh"))?;
        drop(watchdog);
        if out.status.success() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(login_failed(
                cfg,
                String::from_utf8_lossy(&out.stderr).trim(),
            ));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Kill `pid` (an ssh talking to the guest) unless the returned sender is
/// dropped first, at `deadline` but not within 30 s from now.
fn kill_after(pid: u32, deadline: Instant) -> mpsc::Sender<()> {
    let (tx, rx) = mpsc::channel::<()>();
    let within = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(30));
    std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(within) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    });
    tx
}

/// Wait for cloud-init's first run; `true` once it has finished (well or
/// not: either way it will not run again for this instance).
fn wait_cloud_init(cfg: &Config, vm: &VmPaths) -> Result<bool> {
    println!("==> {}: waiting for cloud-init to finish", cfg.name);
    let mut cmd = super::ssh_command(cfg, vm)?;
    cmd.args(["-o", "BatchMode=yes", "cloud-init", "status", "--wait"])
        .stdin(Stdio::null());
    let out = cmd.output().map_err(Error::io("cannot run ssh"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let status = text
        .lines()
        .rev()
        .find(|l| l.starts_with("status:"))
        .unwrap_or("status: unknown")
        .trim();
    if out.status.success() && status == "status: done" {
        println!("==> {}: cloud-init {status}", cfg.name);
        return Ok(true);
    }
    if status == "status: disabled" {
        return Ok(true);
    }
    eprintln!(
        "warning: {}: cloud-init finished with `{status}`; see `migrant ssh -- cloud-init status --long`",
        cfg.name
    );
    Ok(status != "status: unknown")
}
