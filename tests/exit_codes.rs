//! Every exit code migrant defines, from the outside, without a VM
//! (nothing here boots a guest). Each case also checks that a refused
//! command left nothing behind.

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};

struct Sandbox {
    root: tempfile::TempDir,
}

impl Sandbox {
    fn new(migrantfile: &str, cloud_init: Option<&str>) -> Sandbox {
        let root = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let project = root.path().join("project");
        std::fs::create_dir_all(&project).unwrap_or_else(|e| panic!("{e}"));
        std::fs::create_dir_all(root.path().join("home")).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(project.join("Migrantfile"), migrantfile).unwrap_or_else(|e| panic!("{e}"));
        if let Some(ci) = cloud_init {
            std::fs::write(project.join("cloud-init.yml"), ci).unwrap_or_else(|e| panic!("{e}"));
        }
        std::fs::write(root.path().join("base.qcow2"), b"not really an image")
            .unwrap_or_else(|e| panic!("{e}"));
        Sandbox { root }
    }
    fn home(&self) -> std::path::PathBuf {
        self.root.path().join("state")
    }
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(common::bin());
        c.args(args)
            .current_dir(self.root.path().join("project"))
            .env("MIGRANT_HOME", self.home())
            .env("MIGRANT_RUNTIME", self.root.path().join("run"))
            .env("HOME", self.root.path().join("home"))
            .env_remove("SUDO_USER")
            .env_remove("SUDO_UID")
            .env_remove("MIGRANT_DIR");
        c
    }
    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap_or_else(|e| panic!("{e}"))
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn good_file(root: &Path) -> String {
    format!(
        "name = \"codes\"\nimage = \"{}\"\n",
        root.join("base.qcow2").display()
    )
}

const CLOUD_INIT: &str =
    "#cloud-config\nusers:\n  - name: migrant\n    ssh_authorized_keys: [__MIGRANT_PUBKEY__]\n";

#[test]
fn usage_error_is_64() {
    let s = Sandbox::new("", None);
    let o = s.run(&["up", "--no-such-flag"]);
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    assert!(stderr(&o).contains("--no-such-flag"));
}

#[test]
fn bad_migrantfile_is_78_and_creates_nothing() {
    let s = Sandbox::new(
        "name = \"codes\"\nimage = \"/x.qcow2\"\nmemory = \"4X\"\n",
        Some(CLOUD_INIT),
    );
    let o = s.run(&["up"]);
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("Migrantfile:3") && e.contains("memory"), "{e}");
    assert!(
        !s.home().exists(),
        "a refused up created {}",
        s.home().display()
    );
}

/// `[secrets]` with a bad host is 78 naming it; a good one whose value
/// cannot be read (an unset variable, a failing command) is 78 naming the
/// secret's `from`, before anything is made.
#[test]
fn secrets_are_checked_before_anything_is_made() {
    let head = "name = \"codes\"\nimage = \"/x.qcow2\"\n[secrets.TOKEN]\nfrom = \"env:MIGRANT_TEST_UNSET_TOKEN\"\n";
    let s = Sandbox::new(&format!("{head}hosts = [\"*.com\"]\n"), Some(CLOUD_INIT));
    let o = s.run(&["up"]);
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("Migrantfile:5: secrets.TOKEN.hosts[0]"),
        "{}",
        stderr(&o)
    );
    for (from, why) in [
        (
            "env:MIGRANT_TEST_UNSET_TOKEN",
            "MIGRANT_TEST_UNSET_TOKEN is not set",
        ),
        ("command:exit 3", "the command"),
    ] {
        let s = Sandbox::new(
            &format!(
                "name = \"codes\"\nimage = \"/x.qcow2\"\n[secrets.TOKEN]\nfrom = \"{from}\"\nhosts = [\"api.example.com\"]\n"
            ),
            Some(CLOUD_INIT),
        );
        let o = s.run(&["up"]);
        assert_eq!(o.status.code(), Some(78), "{from}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("Migrantfile:4: secrets.TOKEN.from") && stderr(&o).contains(why),
            "{from}: {}",
            stderr(&o)
        );
        assert!(
            !s.home().exists(),
            "a refused up created {}",
            s.home().display()
        );
    }
}

/// A key the placeholder needs but that does not exist yet is made (as
/// the original tool does), before anything of the VM; a missing image
/// then stops `up` (78) and leaves no VM behind, the new key kept.
#[test]
fn missing_key_with_placeholder_is_made_and_a_missing_image_creates_nothing() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = Sandbox::new(&good_file(tmp.path()), Some(CLOUD_INIT));
    // No image where the Migrantfile points: 78, after the key was made.
    assert!(!tmp.path().join("base.qcow2").exists());
    let o = s.run(&["up"]);
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("created the SSH key"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let key = s.root.path().join("home/.ssh/migrant.pub");
    assert!(key.is_file(), "the missing key was not made");
    let vms = s.home().join("vms").join("codes");
    assert!(!vms.join("disk.qcow2").exists() && !vms.join("record.json").exists());
}

#[test]
fn held_lock_is_75() {
    if !common::as_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = Sandbox::new(&good_file(tmp.path()), Some("#cloud-config\n"));
    let dir = s.home().join("vms").join("codes");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let f = std::fs::File::create(dir.join("lock")).unwrap_or_else(|e| panic!("{e}"));
    let _held = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .unwrap_or_else(|(_, e)| panic!("{e}"));
    let o = s.run(&["up"]);
    assert_eq!(o.status.code(), Some(75), "{}", stderr(&o));
    assert!(stderr(&o).contains("busy"), "{}", stderr(&o));
    assert!(!dir.join("disk.qcow2").exists());
}

#[test]
fn not_running_is_69() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = Sandbox::new(&good_file(tmp.path()), None);
    for cmd in [&["ssh", "--", "true"][..], &["ip"], &["info"]] {
        let o = s.run(cmd);
        assert_eq!(o.status.code(), Some(69), "{cmd:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("not running"), "{}", stderr(&o));
    }
}

#[test]
fn corrupt_record_is_65() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = Sandbox::new(&good_file(tmp.path()), None);
    let dir = s.home().join("vms").join("codes");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.join("record.json"), b"{ not json").unwrap_or_else(|e| panic!("{e}"));
    let o = s.run(&["status"]);
    assert_eq!(o.status.code(), Some(65), "{}", stderr(&o));
    assert!(stderr(&o).contains("record.json"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(dir.join("record.json")).unwrap_or_default(),
        b"{ not json"
    );
}

#[test]
fn unusable_state_folder_is_70() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = Sandbox::new(&good_file(tmp.path()), Some("#cloud-config\n"));
    // MIGRANT_HOME below a regular file: no folder can be made there.
    let blocker = tmp.path().join("file");
    std::fs::write(&blocker, b"").unwrap_or_else(|e| panic!("{e}"));
    let o = s
        .cmd(&["up"])
        .env("MIGRANT_HOME", blocker.join("home"))
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(o.status.code(), Some(70), "{}", stderr(&o));
}

#[test]
fn permission_denied_is_77() {
    if !common::as_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = Sandbox::new(&good_file(tmp.path()), None);
    let dir = s.home().join("vms").join("codes");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.join("record.json"), b"{}").unwrap_or_else(|e| panic!("{e}"));
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .unwrap_or_else(|e| panic!("{e}"));
    // The project and binary must be reachable by `nobody`.
    std::fs::set_permissions(
        s.root.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    std::fs::set_permissions(
        s.home(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    std::fs::set_permissions(
        s.home().join("vms"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut c = s.cmd(&["status"]);
    // SAFETY: setuid/setgid in the forked child before exec; no allocation.
    unsafe {
        c.pre_exec(|| {
            if libc::setgid(65534) < 0 || libc::setuid(65534) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let o = c.output().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(o.status.code(), Some(77), "{}", stderr(&o));
}

#[test]
fn wireguard_config_mistakes_are_78_with_the_line_and_create_nothing() {
    let s = Sandbox::new("", Some(CLOUD_INIT));
    let project = s.root.path().join("project");
    std::fs::write(project.join("Migrantfile"), good_file(s.root.path()))
        .unwrap_or_else(|e| panic!("{e}"));
    let secret = "c2VjcmV0LXNlY3JldC1zZWNyZXQ=";
    let conf = project.join("wireguard.conf");
    // A key that is not a WireGuard key: 78, the line named, the value not
    // repeated.
    std::fs::write(
        &conf,
        format!("[Interface]\nPrivateKey = {secret}\nAddress = 10.64.0.2/32\n"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let o = s.run(&["up"]);
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("wireguard.conf:2: PrivateKey:"), "{e}");
    assert!(!e.contains(secret), "the key was printed: {e}");
    assert!(!s.home().join("vms").join("codes").exists());

    // A valid file without `DNS =`: the guest's DNS would leave outside
    // the tunnel, so it is refused unless `[network] dns = "host"`.
    let key = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    std::fs::write(
        &conf,
        format!(
            "[Interface]\nPrivateKey = {key}\nAddress = 10.64.0.2/32\n\n[Peer]\nPublicKey = {key}\nEndpoint = 192.0.2.1:51820\nAllowedIPs = 0.0.0.0/0\n"
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let o = s.run(&["up"]);
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("no IPv4 `DNS =` line"), "{e}");
    assert!(e.contains("dns = \"host\""), "{e}");
    assert!(!s.home().join("vms").join("codes").exists());
}

/// Two project folders whose Migrantfiles share a `name`: commands from the
/// second never stop, destroy, change or attach to the first's VM.
#[test]
fn another_folder_with_the_same_name_touches_nothing() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = Sandbox::new(&good_file(tmp.path()), Some(CLOUD_INIT));
    // The first project's VM, as `up` records it.
    let dir = s.home().join("vms").join("codes");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let record = serde_json::json!({
        "name": "codes",
        "project_dir": "/somewhere/else",
        "base_image": tmp.path().join("base.qcow2"),
        "mac": "52:54:00:12:34:56",
        "guest_ip": "10.0.2.15",
        "created_at": 0,
        "state": "stopped",
    });
    std::fs::write(dir.join("record.json"), record.to_string()).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.join("disk.qcow2"), b"the other project's disk")
        .unwrap_or_else(|e| panic!("{e}"));
    for args in [
        &["destroy"][..],
        &["halt"][..],
        &["snapshot"][..],
        &["reset"][..],
        &["ssh", "--", "true"][..],
        &["run", "--rm", "--", "true"][..],
        &["mount"][..],
        // Nor does it report the other VM's address, traffic or tunnel.
        &["ip"][..],
        &["info"][..],
        &["egress"][..],
        &["wg"][..],
    ] {
        let o = s.run(args);
        assert_eq!(o.status.code(), Some(78), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("/somewhere/else"),
            "{args:?}: {}",
            stderr(&o)
        );
        assert_eq!(
            std::fs::read(dir.join("disk.qcow2")).unwrap_or_default(),
            b"the other project's disk",
            "{args:?} touched the other VM"
        );
    }
}

/// Make `path` traversable by everyone (a tempdir is 0700).
fn open_to_all(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("{e}"));
}

/// `sudo migrant` is refused (77) before anything is read or made: migrant
/// runs as the user whose VMs they are. And root acts on no project
/// folder another user controls (77): that user could swap what migrant
/// reads and runs there (a hook symlinked to `make` ran the owner's
/// Makefile, as root before the review, as the owner after; now nothing).
#[test]
fn sudo_and_another_users_folder_are_refused() {
    if !common::as_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    open_to_all(tmp.path());
    let s = Sandbox::new(
        &format!("{}[[share]]\nhost = \"ws\"\n", good_file(tmp.path())),
        Some(CLOUD_INIT),
    );
    open_to_all(s.root.path());
    let project = s.root.path().join("project");
    let names = || -> Vec<String> { common::names_in(&project) };
    let before = names();
    for args in [
        &["up", "--timeout", "5"][..],
        &["init", "--force"][..],
        &["list"][..],
        &["doctor"][..],
    ] {
        let o = s
            .cmd(args)
            .env("SUDO_UID", "65534")
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(o.status.code(), Some(77), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("run it as yourself"), "{}", stderr(&o));
    }
    assert_eq!(names(), before, "sudo made something");
    assert!(!s.home().exists(), "sudo made the state folder");
    // Root's own shell (`sudo -s` from root) is root's.
    let o = s
        .cmd(&["list"])
        .env("SUDO_UID", "0")
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(o.status.success(), "{}", stderr(&o));

    // nobody's folder, with a hook symlinked to `make` and a Makefile.
    let hooks = project.join("hooks");
    std::fs::create_dir(&hooks).unwrap_or_else(|e| panic!("{e}"));
    std::os::unix::fs::symlink("/usr/bin/make", hooks.join("pre-up"))
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(project.join("Makefile"), "all:\n\tid -u > ran-as\n")
        .unwrap_or_else(|e| panic!("{e}"));
    for p in [&project, &hooks, &project.join("Makefile")] {
        nix::unistd::chown(p.as_path(), Some(65534.into()), Some(65534.into()))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let before = names();
    let migrantfile = std::fs::read(project.join("Migrantfile")).unwrap_or_default();
    for args in [
        &["up", "--timeout", "5"][..],
        &["mount"][..],
        &["init", "--force"][..],
        &["convert", "--write"][..],
        &["pubkey"][..],
        &["destroy"][..],
    ] {
        let o = s.run(args);
        assert_eq!(o.status.code(), Some(77), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("controlled by uid 65534"),
            "{args:?}: {}",
            stderr(&o)
        );
    }
    assert_eq!(names(), before, "something was made in nobody's folder");
    assert_eq!(
        std::fs::read(project.join("Migrantfile")).unwrap_or_default(),
        migrantfile
    );
    assert!(no_vms(&s), "a VM was left behind");
}

/// Whether the sandbox holds no VM (its folder of VMs may not exist).
fn no_vms(s: &Sandbox) -> bool {
    std::fs::read_dir(s.home().join("vms")).map_or(true, |mut d| d.next().is_none())
}
