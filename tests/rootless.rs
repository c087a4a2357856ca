//! Running without root, the network half: a VM's namespace set up by
//! migrant's own code — the TAP with its addresses and policy routing,
//! the nftables ruleset with its TPROXY diversion, anti-spoofing and
//! closed gateway ports, the transparent listeners, the DHCP and DNS
//! sockets — by a process that holds no privilege on the host: `nobody`,
//! root only inside a user namespace of its own that owns the network
//! namespace. (The rest of running without root is not built yet.)
//!
//! Root is used only to become `nobody` and to load the kernel modules a
//! user namespace cannot load (`hostreq::MODULES`: running without root,
//! the host must have them loaded or built in; `migrant doctor` checks).

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
