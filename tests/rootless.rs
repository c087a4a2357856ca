//! Running without root.
//!
//! The network half: a VM's namespace set up by migrant's own code — the
//! TAP with its addresses and policy routing, the nftables ruleset with
//! its TPROXY diversion, anti-spoofing and closed gateway ports, the
//! transparent listeners, the DHCP and DNS sockets — by a process that
//! holds no privilege on the host: `nobody`, root only inside a user
//! namespace of its own that owns the network namespace.
//!
//! The whole: an ordinary user (`scripts/test-user`) runs two VMs (one a
//! memory-snapshot clone of the other), and no process of either holds
//! anything on the host; each VM's identity is its own subordinate id and
//! opens nothing of the other's nor of the user's.
//!
//! Root is used only to become those users and to load the kernel modules
//! a user namespace cannot load (`hostreq::MODULES`: running without
//! root, the host must have them loaded or built in; `migrant doctor`
//! checks). Run as the test user itself, the VM test needs no root.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use migrant::config::{Egress, NetRule, Proto};
use migrant::net::plan::NetPlan;

/// Set when this binary runs as the unprivileged child.
const CHILD: &str = "MIGRANT_ROOTLESS_CHILD";

/// Run as root, this test runs itself again as `nobody` in a user and
/// network namespace of its own ([`CHILD`] set), where it sets the
/// namespace up.
#[test]
fn an_ordinary_user_sets_up_a_vms_namespace() {
    if std::env::var_os(CHILD).is_some() {
        return in_a_user_namespace();
    }
    if !common::as_root() {
        return;
    }
    // Where the modules are built in there is no modprobe to run (and
    // nothing to load); where it fails, the child says what is missing.
    if let Ok(s) = Command::new("modprobe")
        .arg("-a")
        .args(migrant::hostreq::MODULES)
        .status()
        && !s.success()
    {
        eprintln!("modprobe {:?} failed ({s})", migrant::hostreq::MODULES);
    }
    let (dir, exe) = runnable_copy(0o755);
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--",
            "unshare",
            "--user",
            "--map-root-user",
            "--net",
            "--",
        ])
        .arg(&exe)
        .args([
            "--exact",
            "an_ordinary_user_sets_up_a_vms_namespace",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .current_dir(dir.path())
        .output()
        .unwrap_or_else(|e| panic!("setpriv: {e}"));
    let text = common::text(&out);
    assert!(out.status.success(), "as nobody: {text}");
    assert!(text.contains("namespace ready"), "{text}");
}

fn in_a_user_namespace() {
    // Nothing of the host's root here: nobody, mapped to root only in the
    // user namespace that `unshare` made.
    let host_uid = std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
    assert!(
        host_uid.split_whitespace().nth(1) == Some("65534"),
        "not nobody in a user namespace: uid_map {host_uid:?}"
    );
    let net = NetPlan {
        gateway: "10.0.2.2".parse().unwrap_or_else(|e| panic!("{e}")),
        guest: "10.0.2.15".parse().unwrap_or_else(|e| panic!("{e}")),
        subnet: "10.0.2.0/24".parse().unwrap_or_else(|e| panic!("{e}")),
        net6: Some(migrant::config::Net6::standard()),
        egress: Egress::Direct,
        rules: vec![NetRule::AllowHostPort {
            proto: Proto::Tcp,
            port: 8080,
        }],
        allow_domains: Vec::new(),
        tunnel: None,
        upstreams: Vec::new(),
    };
    let tap = migrant::net::tap::create_tap("tap0")
        .unwrap_or_else(|e| panic!("TAP as nobody (is /dev/net/tun 0666? scripts/setup): {e}"));
    let sockets = migrant::net::setup::setup_in_ns("tap0", &net)
        .unwrap_or_else(|e| panic!("the namespace's set-up as nobody: {}", chain(&e)));
    assert!(sockets.listeners.is_some() && sockets.listeners6.is_some());
    let listed = Command::new("nft")
        .args(["list", "ruleset"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for want in [
        "tproxy ip to :15001",
        "tproxy ip6 to :15001",
        "spoofed_source",
        "reject with tcp reset",
    ] {
        assert!(listed.contains(want), "{want} not in:\n{listed}");
    }
    let rules = Command::new("ip")
        .args(["rule", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(rules.contains("fwmark 0x1 lookup 100"), "{rules}");
    drop((tap, sockets));
    println!("namespace ready");
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&format!(": {c}"));
        cur = c.source();
    }
    s
}

/// A copy of this test binary that any user may run, in a new folder of
/// `mode` (the build folder may sit under a home only root enters).
fn runnable_copy(mode: u32) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("migrant-rootless-")
        .tempdir()
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("{e}"));
    let exe = dir.path().join("rootless");
    let me = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
    std::fs::copy(&me, &exe).unwrap_or_else(|e| panic!("{e}"));
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("{e}"));
    (dir, exe)
}

/// Set when this binary runs as the test user's child.
const USER_CHILD: &str = "MIGRANT_ROOTLESS_USER_CHILD";

/// The user of `scripts/test-user`: an ordinary user with a subordinate
/// range, or `None` (skipped loudly, or failed under
/// `MIGRANT_REQUIRE_INTEGRATION`).
fn test_user() -> Option<nix::unistd::User> {
    let name = std::env::var("MIGRANT_TEST_USER").unwrap_or_else(|_| "migrant-test".into());
    match nix::unistd::User::from_name(&name) {
        Ok(Some(u)) => Some(u),
        _ if std::env::var_os("MIGRANT_REQUIRE_INTEGRATION").is_some() => {
            panic!("no test user {name}: run scripts/test-user (scripts/test does)")
        }
        _ => {
            eprintln!("SKIPPED: no test user {name} (scripts/test-user makes it)");
            None
        }
    }
}

/// An ordinary user maps a VM's user namespace from its own subordinate
/// range (`newuidmap`/`newgidmap`): root there is the user, who sets up
/// the VM's network; the VM's identity there is one subordinate id,
/// which cannot read the user's files nor signal the user's processes,
/// and whose files are the subordinate id's on the host.
#[test]
fn a_vms_identity_owns_nothing_of_its_users() {
    if let Some(secret) = std::env::var_os(USER_CHILD) {
        return as_the_user(std::path::Path::new(&secret));
    }
    if !common::as_root() {
        return;
    }
    let Some(user) = test_user() else { return };
    // Sticky and open to all, like /tmp: the VM's identity writes here.
    let (dir, exe) = runnable_copy(0o1777);
    // The user's own file: theirs alone.
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "the user's").unwrap_or_else(|e| panic!("{e}"));
    nix::unistd::chown(&secret, Some(user.uid), Some(user.gid)).unwrap_or_else(|e| panic!("{e}"));
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new("setpriv")
        .arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid))
        .args(["--init-groups", "--inh-caps=-all", "--"])
        .arg(&exe)
        .args([
            "--exact",
            "a_vms_identity_owns_nothing_of_its_users",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(USER_CHILD, &secret)
        .env("HOME", &user.dir)
        .current_dir(dir.path())
        .output()
        .unwrap_or_else(|e| panic!("setpriv: {e}"));
    let text = common::text(&out);
    assert!(out.status.success(), "as {}: {text}", user.name);
    assert!(text.contains("identity confined"), "{text}");
    // On the host, what the VM's identity made is the subordinate id's.
    let subuid = std::fs::read_to_string("/etc/subuid").unwrap_or_default();
    let first = migrant::subid::ranges(&subuid, &user.name, user.uid.as_raw())
        .first()
        .map(|r| r.start)
        .unwrap_or_else(|| panic!("{} has no subordinate uids", user.name));
    let made = std::fs::metadata(dir.path().join("made-by-the-vm"))
        .unwrap_or_else(|e| panic!("the VM's file: {e}"));
    use std::os::unix::fs::MetadataExt;
    assert_eq!(made.uid(), first, "the VM's file belongs to another id");
}

/// As the test user: map VM 0's namespace in a single-threaded child
/// (a process with threads may not enter a user namespace), set its
/// network up as root there, then become the VM's identity and try.
fn as_the_user(secret: &std::path::Path) {
    let me = nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("who am I"));
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let uids = migrant::subid::ranges(&read("/etc/subuid"), &me.name, me.uid.as_raw());
    let gids = migrant::subid::ranges(&read("/etc/subgid"), &me.name, me.gid.as_raw());
    let mapping = migrant::userns::Mapping::for_vm(
        &me.name,
        (me.uid.as_raw(), me.gid.as_raw()),
        (&uids, &gids),
        0,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let user_pid = nix::unistd::getpid();
    // SAFETY: the child runs only this function's code and leaves with
    // _exit; the harness's other threads are idle, blocked in a join.
    match unsafe { nix::unistd::fork() }.unwrap_or_else(|e| panic!("fork: {e}")) {
        nix::unistd::ForkResult::Child => {
            let code = match in_the_vms_namespace(&mapping, secret, user_pid) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("{e}");
                    1
                }
            };
            // SAFETY: leave the forked child at once.
            unsafe { libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            let status = nix::sys::wait::waitpid(child, None).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                status,
                nix::sys::wait::WaitStatus::Exited(child, 0),
                "the VM's side failed (its error is above)"
            );
            println!("identity confined");
        }
    }
}

fn in_the_vms_namespace(
    mapping: &migrant::userns::Mapping,
    secret: &std::path::Path,
    user_pid: nix::unistd::Pid,
) -> Result<(), String> {
    migrant::userns::enter(mapping, true).map_err(|e| format!("enter: {}", chain(&e)))?;
    let uid_map = std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
    let rows: Vec<Vec<&str>> = uid_map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let want = vec![
        vec!["0".to_string(), mapping.user.0.to_string(), "1".into()],
        vec!["1".to_string(), mapping.vm.0.to_string(), "1".into()],
    ];
    if rows != want {
        return Err(format!("uid_map {uid_map:?}, wanted {want:?}"));
    }
    // Root here: the VM's network, by migrant's own code.
    let net = NetPlan {
        gateway: "10.0.2.2".parse().map_err(|e| format!("{e}"))?,
        guest: "10.0.2.15".parse().map_err(|e| format!("{e}"))?,
        subnet: "10.0.2.0/24".parse().map_err(|e| format!("{e}"))?,
        net6: None,
        egress: Egress::Direct,
        rules: Vec::new(),
        allow_domains: Vec::new(),
        tunnel: None,
        upstreams: Vec::new(),
    };
    let _tap = migrant::net::tap::create_tap("tap0").map_err(|e| format!("TAP: {e}"))?;
    let _sockets = migrant::net::setup::setup_in_ns("tap0", &net)
        .map_err(|e| format!("the namespace's set-up: {}", chain(&e)))?;
    // The VM's identity: nothing of the user's.
    let vm = migrant::userns::VM_ID;
    nix::unistd::setresgid(vm.into(), vm.into(), vm.into()).map_err(|e| format!("{e}"))?;
    nix::unistd::setresuid(vm.into(), vm.into(), vm.into()).map_err(|e| format!("{e}"))?;
    match std::fs::read_to_string(secret) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
        other => return Err(format!("the VM's identity read the user's file: {other:?}")),
    }
    match nix::sys::signal::kill(user_pid, None) {
        Err(nix::errno::Errno::EPERM) => {}
        other => return Err(format!("the VM's identity may signal the user: {other:?}")),
    }
    let made = secret.with_file_name("made-by-the-vm");
    std::fs::write(&made, "vm").map_err(|e| format!("{}: {e}", made.display()))?;
    Ok(())
}

/// Who runs the VMs of a test: the test user when the test is root (made
/// by `scripts/test-user`; `None` when it is missing and not required),
/// else whoever runs the test.
fn vm_user() -> Option<nix::unistd::User> {
    match nix::unistd::Uid::effective().is_root() {
        true => test_user(),
        false => Some(
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .unwrap_or_else(|| panic!("who am I")),
        ),
    }
}

/// The test guest image, which an ordinary user may read (`None`:
/// skipped loudly, or failed under `MIGRANT_REQUIRE_INTEGRATION`).
fn image_for_users() -> Option<std::path::PathBuf> {
    match std::env::var_os("MIGRANT_TEST_IMAGE").map(std::path::PathBuf::from) {
        Some(p) if p.is_file() => Some(p),
        _ if std::env::var_os("MIGRANT_REQUIRE_INTEGRATION").is_some() => {
            panic!("MIGRANT_TEST_IMAGE is not set to an image: run scripts/test")
        }
        _ => {
            eprintln!("SKIPPED: set MIGRANT_TEST_IMAGE (scripts/test does)");
            None
        }
    }
}

/// A project of the test user's, with migrant's state, runtime and home
/// in a folder of theirs: what the user would have under `~`.
struct UserProject {
    dir: tempfile::TempDir,
    exe: std::path::PathBuf,
    user: nix::unistd::User,
    name: String,
}

impl UserProject {
    fn new(user: nix::unistd::User, image: &std::path::Path) -> UserProject {
        let dir = tempfile::Builder::new()
            .prefix("migrant-user-")
            .tempdir()
            .unwrap_or_else(|e| panic!("{e}"));
        let name = format!("rl-{}", std::process::id());
        let exe = dir.path().join("migrant");
        std::fs::copy(common::bin(), &exe).unwrap_or_else(|e| panic!("{e}"));
        let subs = [
            "project",
            "shared",
            "shared/work",
            "isolated",
            "home",
            "state",
            "run",
        ];
        for sub in subs {
            std::fs::create_dir(dir.path().join(sub)).unwrap_or_else(|e| panic!("{e}"));
        }
        let migrantfile = |name: &str, share: Option<&str>| {
            let share = share.map(|s| {
                format!("\n[[share]]\nhost = \"work\"\nguest = \"/home/migrant/work\"\n{s}\n")
            });
            format!(
                "name = \"{name}\"\nimage = \"{}\"\ncpus = 2\nmemory = \"1G\"\ndisk = \"4G\"\naccel = \"tcg\"\n{}",
                image.display(),
                share.unwrap_or_default()
            )
        };
        let cloud_init = "#cloud-config\nusers:\n  - name: migrant\n    sudo: ALL=(ALL) NOPASSWD:ALL\n    shell: /bin/bash\n    ssh_authorized_keys:\n      - __MIGRANT_PUBKEY__\n";
        // The project; one with a plain shared folder (a memory snapshot
        // cannot hold one); one with an isolated store.
        for (sub, vm, share) in [
            ("project", name.clone(), None),
            ("shared", format!("{name}-s"), Some("isolation = false")),
            ("isolated", format!("{name}-iso"), Some("size = \"1G\"")),
        ] {
            let write = |file: &str, text: &str| {
                std::fs::write(dir.path().join(sub).join(file), text)
                    .unwrap_or_else(|e| panic!("{e}"))
            };
            write("Migrantfile", &migrantfile(&vm, share));
            write("cloud-init.yml", cloud_init);
        }
        // Everything the user's: chown as root (running as the user, it
        // already is), the folder itself 0755, its contents 0700.
        if nix::unistd::Uid::effective().is_root() {
            common::chown_tree(dir.path(), &user);
        }
        for sub in ["home", "state", "run"] {
            std::fs::set_permissions(dir.path().join(sub), std::fs::Permissions::from_mode(0o700))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("{e}"));
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("{e}"));
        UserProject {
            dir,
            exe,
            user,
            name,
        }
    }

    /// `migrant ARGS` as the user (through `setpriv` when the test is root).
    fn run(&self, args: &[&str]) -> std::process::Output {
        self.run_in("project", args)
    }

    /// The same in the test's folder `sub`.
    fn run_in(&self, sub: &str, args: &[&str]) -> std::process::Output {
        let mut c = match nix::unistd::Uid::effective().is_root() {
            true => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={}", self.user.uid))
                    .arg(format!("--regid={}", self.user.gid))
                    .args(["--init-groups", "--inh-caps=-all", "--"])
                    .arg(&self.exe);
                c
            }
            false => Command::new(&self.exe),
        };
        c.args(args)
            .current_dir(self.dir.path().join(sub))
            .env("MIGRANT_HOME", self.dir.path().join("state"))
            .env("MIGRANT_RUNTIME", self.dir.path().join("run"))
            .env("HOME", self.dir.path().join("home"))
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("XDG_DATA_HOME")
            .env_remove("SUDO_USER")
            .env_remove("SUDO_UID")
            .env_remove("MIGRANT_DIR")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("migrant {args:?}: {e}"))
    }

    /// `migrant ARGS` as the user, which must succeed: its stdout.
    fn ok(&self, args: &[&str]) -> String {
        self.ok_in("project", args)
    }

    /// The same in the test's folder `sub`.
    fn ok_in(&self, sub: &str, args: &[&str]) -> String {
        let out = self.run_in(sub, args);
        assert!(
            out.status.success(),
            "migrant {args:?}: {}",
            common::text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn vm_dir(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join("state/vms").join(name)
    }

    /// Processes whose command line names this test's folder.
    fn processes(&self) -> Vec<u32> {
        common::processes_naming(self.dir.path())
            .into_iter()
            .map(|(pid, _)| pid)
            .collect()
    }
}

impl Drop for UserProject {
    fn drop(&mut self) {
        for name in ["", "-b", "-s"].map(|s| format!("{}{s}", self.name)) {
            let _ = self.run(&["destroy", "--name", &name]);
        }
        for pid in self.processes() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A `Name:` line of `/proc/PID/status`, its fields.
fn status_field(pid: u32, name: &str) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")).map(str::to_string))
        .map(|v| v.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// The namespaces process `pid` (a number, or `self`) is in, as
/// `kind:[inode]`.
fn namespaces(pid: &str) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/ns"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .collect()
}

fn user_ns(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/user"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Try to read one byte of each of `files` as the VM identity (id 1,
/// group 2) of the user namespace `supervisor` runs in; returns the
/// files that opened.
fn opened_as_vm(supervisor: u32, files: &[std::path::PathBuf]) -> Vec<String> {
    let out = Command::new("nsenter")
        .arg(format!("--target={supervisor}"))
        .args([
            "--user",
            "--",
            "setpriv",
            "--reuid=1",
            "--regid=1",
            "--groups=2",
            "--",
            "sh",
            "-c",
            "for f; do head -c1 \"$f\" >/dev/null 2>&1 && echo \"$f\"; done; true",
            "sh",
        ])
        .args(files)
        .output()
        .unwrap_or_else(|e| panic!("nsenter: {e}"));
    assert!(out.status.success(), "nsenter: {}", common::text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// An ordinary user runs two VMs, a memory-snapshot clone beside its
/// template, with no root (and a third with a plain shared folder): no
/// process of either has uid 0 or a
/// capability on the host; their QEMUs run as two distinct ids of the
/// user's subordinate range; as either VM's identity the other's disk,
/// seed and memory state and the user's SSH key do not open; a killed
/// supervisor takes its QEMU and dataplane with it; `destroy` leaves
/// nothing.
#[test]
fn a_user_runs_vms_without_root() {
    let Some(image) = image_for_users() else {
        return;
    };
    let Some(user) = vm_user() else { return };
    let p = UserProject::new(user, &image);
    let (a, b) = (p.name.clone(), format!("{}-b", p.name));

    // The plain share: what guest root makes there is the user's, and no
    // set-id bit survives.
    p.ok_in("shared", &["up"]);
    p.ok_in(
        "shared",
        &[
            "ssh",
            "--",
            "sudo -n sh -c 'cp /bin/sh work/sh && chmod 6755 work/sh && mkdir work/d'",
        ],
    );
    for made in ["sh", "d"] {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(p.dir.path().join("shared/work").join(made))
            .unwrap_or_else(|e| panic!("{made}: {e}"));
        assert_eq!(
            (m.uid(), m.gid()),
            (p.user.uid.as_raw(), p.user.gid.as_raw()),
            "{made} is not the user's"
        );
        assert_eq!(m.mode() & 0o6000, 0, "{made} has mode {:o}", m.mode());
    }

    p.ok(&["up"]);
    p.ok(&["snapshot", "--memory"]);
    p.ok(&["run", "--snapshot", "--clone", "--name", &b, "--", "true"]);
    assert_eq!(p.ok(&["ssh", "--", "hostname"]).trim(), a);
    assert_eq!(p.ok(&["ssh", "--name", &b, "--", "hostname"]).trim(), b);

    // Every process: no uid 0, and no capability on the host.
    let procs = p.processes();
    let qemus: Vec<u32> = procs
        .iter()
        .copied()
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|e| e.to_string_lossy().contains("qemu-system"))
        })
        .collect();
    assert_eq!(qemus.len(), 3, "QEMUs: {qemus:?} of {procs:?}");
    // Three supervisors, QEMUs and dataplanes at least.
    assert!(procs.len() >= 9, "{procs:?}");
    // This test runs in the host's namespaces (pid 1's may not be
    // readable, as in a container).
    let host_ns = user_ns(std::process::id());
    assert!(!host_ns.is_empty(), "cannot read this process's namespaces");
    for pid in &procs {
        let uids = status_field(*pid, "Uid");
        assert!(
            uids.len() == 4 && uids.iter().all(|u| u != "0"),
            "process {pid} has uids {uids:?}"
        );
        if user_ns(*pid) == host_ns {
            let caps = status_field(*pid, "CapEff");
            assert_eq!(
                caps,
                ["0000000000000000"],
                "process {pid} holds {caps:?} on the host"
            );
        }
    }
    // The QEMUs: three distinct ids of the user's subordinate range.
    let subuid = std::fs::read_to_string("/etc/subuid").unwrap_or_default();
    let ranges = migrant::subid::ranges(&subuid, &p.user.name, p.user.uid.as_raw());
    let ids: Vec<u32> = qemus
        .iter()
        .map(|pid| {
            status_field(*pid, "Uid")
                .first()
                .and_then(|u| u.parse().ok())
                .unwrap_or(0)
        })
        .collect();
    let distinct: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), 3, "the QEMUs run as {ids:?}");
    for id in &ids {
        assert!(
            ranges
                .iter()
                .any(|r| *id >= r.start && id - r.start < r.count),
            "QEMU runs as {id}, outside {ranges:?}"
        );
    }

    // As each VM's identity: its own disk opens (the check works), the
    // other's files and the user's key do not.
    let supervisor = |name: &str| {
        procs
            .iter()
            .copied()
            .find(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                    let c = String::from_utf8_lossy(&c).replace('\0', " ");
                    c.contains("__supervisor") && c.contains(&format!("--name {name} "))
                })
            })
            .unwrap_or_else(|| panic!("no supervisor of {name} in {procs:?}"))
    };
    let key = p.dir.path().join("home/.ssh/migrant");
    assert!(key.is_file(), "no key at {}", key.display());
    let files = |vm: &str| {
        [
            "disk.qcow2",
            "seed.img",
            "snapshot.vmstate",
            "snapshot.qcow2",
        ]
        .map(|f| p.vm_dir(vm).join(f))
        .into_iter()
        .filter(|f| f.exists())
        .collect::<Vec<_>>()
    };
    let (files_a, files_b) = (files(&a), files(&b));
    assert!(
        files_a.len() >= 4 && files_b.len() >= 2,
        "{files_a:?} {files_b:?}"
    );
    for (me, others) in [(&a, &files_b), (&b, &files_a)] {
        let own = p.vm_dir(me).join("disk.qcow2");
        let mut probe = others.clone();
        probe.extend([key.clone(), own.clone()]);
        let opened = opened_as_vm(supervisor(me), &probe);
        assert_eq!(opened, [own.to_string_lossy()], "as {me}'s identity");
    }

    // kill -9 of B's supervisor: its QEMU and dataplane go with it, and
    // no process is left in its namespaces.
    let sup_b = supervisor(&b);
    let ns_b = user_ns(sup_b);
    // B's namespaces (user, network, and any other its processes are in),
    // as `kind:[inode]`.
    let mut spaces_b: Vec<String> = pids()
        .into_iter()
        .filter(|pid| user_ns(*pid) == ns_b)
        .flat_map(|pid| namespaces(&pid.to_string()))
        .collect();
    spaces_b.sort();
    spaces_b.dedup();
    let host_spaces = namespaces("self");
    assert!(
        !host_spaces.is_empty(),
        "cannot read this process's namespaces"
    );
    spaces_b.retain(|s| !host_spaces.contains(s));
    assert!(
        spaces_b.iter().any(|s| s.starts_with("net:")),
        "B has no network namespace of its own: {spaces_b:?}"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sup_b as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let left = || {
        pids()
            .into_iter()
            .filter(|pid| user_ns(*pid) == ns_b)
            .collect::<Vec<_>>()
    };
    assert!(
        common::wait_for(std::time::Duration::from_secs(15), || left().is_empty()),
        "left in {b}'s namespace: {:?}",
        left()
    );
    // Nothing holds B's namespaces (`lsns` also lists those kept only by
    // a descriptor or a bind mount), and no mount is left in the user's
    // folders or of B's namespaces.
    let inode = |s: &str| s.split(['[', ']']).nth(1).unwrap_or_default().to_string();
    let listed = |cmd: &[&str]| {
        let out = Command::new(cmd[0])
            .args(&cmd[1..])
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", cmd[0]));
        assert!(out.status.success(), "{cmd:?}: {}", common::text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let held = || {
        let lsns = listed(&["lsns", "-n", "-r", "-o", "NS"]);
        spaces_b
            .iter()
            .filter(|s| lsns.lines().any(|l| l.trim() == inode(s)))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert!(
        common::wait_for(std::time::Duration::from_secs(10), || held().is_empty()),
        "{b}'s namespaces are still held: {:?}",
        held()
    );
    let mounts = listed(&["findmnt", "-r", "-n", "-o", "SOURCE,TARGET"]);
    let folder = p.dir.path().to_string_lossy().into_owned();
    let stray: Vec<&str> = mounts
        .lines()
        .filter(|l| l.contains(&folder) || spaces_b.iter().any(|s| l.contains(&inode(s))))
        .collect();
    assert!(stray.is_empty(), "mounts left of {b}: {stray:?}");

    p.ok(&["destroy", "--name", &b]);
    p.ok(&["destroy", "--name", &format!("{a}-s")]);
    p.ok(&["destroy"]);
    assert!(
        common::wait_for(std::time::Duration::from_secs(15), || p
            .processes()
            .is_empty()),
        "processes left: {:?}",
        p.processes()
    );
    let vms = common::names_in(&p.dir.path().join("state/vms"));
    assert!(vms.is_empty(), "VMs left: {vms:?}");
    // The user's one registry of identities (in their passwd home)
    // holds none of this test's VMs.
    let registry = p.user.dir.join(".local/share/migrant/ids");
    let here = p.dir.path().to_string_lossy().into_owned();
    let ids: Vec<String> = common::names_in(&registry)
        .into_iter()
        .filter(|n| {
            std::fs::read_to_string(registry.join(n)).is_ok_and(|owner| owner.starts_with(&here))
        })
        .collect();
    assert!(ids.is_empty(), "identities left: {ids:?}");
}

/// The review's attacks on root through a project's files, replayed by an
/// ordinary user running migrant without root: a WireGuard file, a
/// `cloud-init.yml` symlink, a local image and a key's `.pub` naming a
/// file the user may not read each fail with the user's own "Permission denied" and nothing
/// of the file reaches any output or anything migrant made; a hook that is
/// a symlink to a root-owned program (`make`) runs the project's Makefile
/// as the user. No process of migrant has more than the user to lend.
#[test]
fn a_user_gains_nothing_from_what_a_project_names() {
    let Some(image) = image_for_users() else {
        return;
    };
    let root = nix::unistd::Uid::effective().is_root();
    let Some(user) = vm_user() else { return };
    // Root's secret: a file of root's, 0600, with a marker (as the user
    // itself, the shadow file, whose content the test cannot know).
    let secret_dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    const MARKER: &str = "ROOT-ONLY-SECRET-OF-THE-HOST";
    let secret = match root {
        true => {
            std::fs::set_permissions(secret_dir.path(), std::fs::Permissions::from_mode(0o755))
                .unwrap_or_else(|e| panic!("{e}"));
            let s = secret_dir.path().join("secret");
            std::fs::write(&s, format!("{MARKER}\n")).unwrap_or_else(|e| panic!("{e}"));
            std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o600))
                .unwrap_or_else(|e| panic!("{e}"));
            s
        }
        false => std::path::PathBuf::from("/etc/shadow"),
    };
    let p = UserProject::new(user.clone(), &image);
    let project = p.dir.path().join("project");
    let give = |path: &std::path::Path| {
        if root {
            nix::unistd::fchownat(
                nix::fcntl::AT_FDCWD,
                path,
                Some(user.uid),
                Some(user.gid),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
        }
    };
    let base = p.dir.path().join("base.qcow2");
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("64M")
        .status()
        .is_ok_and(|s| s.success());
    assert!(made, "qemu-img create");
    give(&base);
    let good = format!("name = \"{}\"\nimage = \"{}\"\n", p.name, base.display());
    let plain = "#cloud-config\n";
    let write = |file: &str, text: &str| {
        let path = project.join(file);
        let _ = std::fs::remove_file(&path);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
        give(&path);
    };
    let link = |target: &std::path::Path, file: &std::path::Path| {
        let _ = std::fs::remove_file(file);
        std::os::unix::fs::symlink(target, file).unwrap_or_else(|e| panic!("{e}"));
        give(file);
    };
    let leaked = |out: &std::process::Output| -> Option<String> {
        if !root {
            return None;
        }
        if common::text(out).contains(MARKER) {
            return Some(format!("the output: {}", common::text(out)));
        }
        common::file_containing(&p.dir.path().join("state"), MARKER)
            .map(|f| f.display().to_string())
    };
    // A key whose public half is a link to the secret.
    let keys = project.join("keys");
    std::fs::create_dir(&keys).unwrap_or_else(|e| panic!("{e}"));
    give(&keys);
    link(&secret, &keys.join("migrant.pub"));
    let with_key =
        "#cloud-config\nusers:\n  - name: migrant\n    ssh_authorized_keys: [__MIGRANT_PUBKEY__]\n";
    let cases = [
        (
            "a WireGuard file",
            format!("{good}[network]\nwireguard = \"{}\"\n", secret.display()),
            Some(plain),
        ),
        ("a cloud-init.yml symlink", good.clone(), None),
        (
            "a local image",
            format!("name = \"{}\"\nimage = \"{}\"\n", p.name, secret.display()),
            Some(plain),
        ),
        (
            "a key's public half",
            format!(
                "{good}[ssh]\nkey = \"{}\"\n",
                keys.join("migrant").display()
            ),
            Some(with_key),
        ),
    ];
    for (what, migrantfile, cloud_init) in cases {
        write("Migrantfile", &migrantfile);
        match cloud_init {
            None => link(&secret, &project.join("cloud-init.yml")),
            Some(text) => write("cloud-init.yml", text),
        }
        let out = p.run(&["up", "--timeout", "5"]);
        assert!(!out.status.success(), "{what}: up went on");
        assert!(
            common::text(&out).contains("Permission denied"),
            "{what}: {}",
            common::text(&out)
        );
        if let Some(place) = leaked(&out) {
            panic!("{what}: root's file reached {place}");
        }
        let vms = vms_left(&p);
        assert!(vms.is_empty(), "{what}: VMs left: {vms:?}");
    }

    // A hook that is a symlink to a root-owned program runs the project's
    // Makefile as the user, and its failure stops `up`.
    write("Migrantfile", &good);
    write("cloud-init.yml", plain);
    let hooks = project.join("hooks");
    std::fs::create_dir(&hooks).unwrap_or_else(|e| panic!("{e}"));
    give(&hooks);
    link(std::path::Path::new("/usr/bin/make"), &hooks.join("pre-up"));
    write("Makefile", "all:\n\tid -u > ran-as\n\tfalse\n");
    let out = p.run(&["up", "--timeout", "5"]);
    assert!(!out.status.success(), "the failing hook did not stop up");
    let ran_as = std::fs::read_to_string(project.join("ran-as")).unwrap_or_default();
    assert_eq!(
        ran_as.trim(),
        user.uid.to_string(),
        "the Makefile ran as uid {ran_as}: {}",
        common::text(&out)
    );
    let vms = vms_left(&p);
    assert!(vms.is_empty(), "VMs left: {vms:?}");
}

/// The VMs in the user's state folder (none when it was never made).
fn vms_left(p: &UserProject) -> Vec<String> {
    std::fs::read_dir(p.dir.path().join("state/vms"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Without root an isolated share's store is its folder, with the promises
/// of the ext4 store: the guest cannot write past the cap (not even by
/// unlinking a full file it keeps open), makes no symlink that leads out
/// of the share, no device node and no set-id file; `df` in the guest
/// shows the cap; every file is the user's. A store left by a run as root
/// (`work.img`) is refused, saying how to get the files out.
#[test]
fn an_isolated_share_without_root_is_a_capped_folder() {
    use std::os::unix::fs::MetadataExt;
    let Some(image) = image_for_users() else {
        return;
    };
    let Some(user) = vm_user() else { return };
    let p = UserProject::new(user, &image);
    let work = p.dir.path().join("isolated/work");
    let img = p.dir.path().join("isolated/work.img");
    std::fs::write(&img, b"an ext4 image").unwrap_or_else(|e| panic!("{e}"));
    let out = p.run_in("isolated", &["up"]);
    assert_eq!(out.status.code(), Some(78), "{}", common::text(&out));
    assert!(
        common::text(&out).contains("debugfs -R 'rdump / "),
        "{}",
        common::text(&out)
    );
    assert_eq!(p.ok(&["list"]).trim(), "no VMs");
    std::fs::remove_file(&img).unwrap_or_else(|e| panic!("{e}"));

    let run = |args: &[&str]| p.ok_in("isolated", args);
    run(&["up"]);
    let status = run(&["status"]);
    assert!(status.contains("used of 1G"), "{status}");
    assert!(run(&["mount"]).contains("nothing to mount"));

    // As guest root: the folder is the user's, whom the guest's own user
    // is not.
    let script = r#"sudo -n sh <<'SCRIPT'
cd /home/migrant/work
echo "df:$(df -B1 --output=size . | tail -n 1 | tr -d ' ')"
mknod dev c 1 3 2>/dev/null; echo "mknod:$?"
ln -s /etc/shadow abs 2>/dev/null; echo "abs:$?"
mkdir -p a/b c 2>&1; echo "mkdir:$?"
ln -s ../../../x a/b/up 2>/dev/null; echo "up:$?"
ln -s x/../../.. a/b/mid 2>/dev/null; echo "mid:$?"
ln -s ../../c a/b/in 2>&1; echo "in:$?"
mv a/b/in shallower 2>/dev/null; echo "mv:$?"
cp /bin/sh sh && chmod 6755 sh; echo "chmod:$?"
dd if=/dev/zero of=big bs=1M count=1100 2>/dev/null; echo "fill:$?"
echo "filled:$(du -B1 --apparent-size big | cut -f1)"
exec 3<big; rm big
dd if=/dev/zero of=again bs=1M count=64 2>/dev/null; echo "held:$?"
exec 3<&-; rm -f again
for i in 1 2 3 4 5 6 7 8 9 10; do
  dd if=/dev/zero of=again bs=1M count=64 2>/dev/null && break; sleep 1
done; echo "freed:$?"
SCRIPT
"#;
    let out = run(&["ssh", "--", script]);
    let says = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}:")))
            .unwrap_or_else(|| panic!("no {key} in {out}"))
            .to_string()
    };
    let df: u64 = says("df").parse().unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(
        ((1 << 30) - (8 << 20)..=1 << 30).contains(&df),
        "df shows {df}: {out}"
    );
    for refused in ["mknod", "abs", "up", "mid", "mv"] {
        assert_ne!(says(refused), "0", "{refused} was allowed: {out}");
    }
    for allowed in ["mkdir", "in", "chmod", "held"] {
        let want = if allowed == "held" { "1" } else { "0" };
        assert_eq!(says(allowed), want, "{allowed}: {out}");
    }
    assert_ne!(says("fill"), "0", "1100 MiB fit in 1 GiB: {out}");
    // Refused within a few blocks of the cap, not far before it.
    let filled: u64 = says("filled")
        .parse()
        .unwrap_or_else(|e| panic!("{e}: {out}"));
    eprintln!("the guest filled {filled} bytes of the 1 GiB cap");
    assert!(
        filled >= (1 << 30) - (2 << 20),
        "only {filled} bytes fit: {out}"
    );
    assert_eq!(says("freed"), "0", "the space never came back: {out}");

    // On the host: nothing that leads out, no device, no set-id bit, all
    // the user's, and no more than the cap on disk.
    for absent in ["dev", "abs", "a/b/up", "a/b/mid", "shallower"] {
        assert!(
            std::fs::symlink_metadata(work.join(absent)).is_err(),
            "{absent} exists"
        );
    }
    assert_eq!(
        std::fs::read_link(work.join("a/b/in")).unwrap_or_default(),
        std::path::Path::new("../../c")
    );
    let used = migrant::share::guard::measure(&work).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("the store holds {used} bytes of its 1 GiB cap");
    assert!(used <= 1 << 30, "{used} bytes on disk");
    let mut todo = vec![work.clone()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{e}"))
            .flatten()
        {
            let m = e.metadata().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                (m.uid(), m.gid()),
                (p.user.uid.as_raw(), p.user.gid.as_raw()),
                "{:?}",
                e.path()
            );
            assert_eq!(
                m.mode() & 0o6000,
                0,
                "{:?} has mode {:o}",
                e.path(),
                m.mode()
            );
            if m.is_dir() {
                todo.push(e.path());
            }
        }
    }
    run(&["destroy"]);
    assert!(
        work.join("again").is_file(),
        "destroy removed the store's files"
    );
    assert!(vms_left(&p).is_empty(), "{:?}", vms_left(&p));
}
