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

/// `[secrets]` with a bad host is 78 naming it; a good one is refused (69)
/// until the dataplane brokers secrets, before anything is made.
#[test]
fn secrets_are_checked_and_not_yet_started() {
    let head = "name = \"codes\"\nimage = \"/x.qcow2\"\n[secrets.TOKEN]\nfrom = \"env:TOKEN\"\n";
    let s = Sandbox::new(&format!("{head}hosts = [\"*.com\"]\n"), Some(CLOUD_INIT));
    let o = s.run(&["up"]);
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("Migrantfile:5: secrets.TOKEN.hosts[0]"),
        "{}",
        stderr(&o)
    );
    let s = Sandbox::new(
        &format!("{head}hosts = [\"api.example.com\"]\n"),
        Some(CLOUD_INIT),
    );
    let o = s.run(&["up"]);
    assert_eq!(o.status.code(), Some(69), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("does not broker them yet"),
        "{}",
        stderr(&o)
    );
    assert!(
        !s.home().exists(),
        "a refused up created {}",
        s.home().display()
    );
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

/// A key path in a folder the user controls, whose `.pub` is a symlink to a
/// root-only file: `up` run through sudo must read it with the user's
/// rights, so the file never reaches the guest's seed or any output.
#[test]
fn a_planted_key_symlink_reads_nothing_of_root() {
    use std::os::unix::fs::PermissionsExt;
    if !common::as_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("{e}"));
    let secret = tmp.path().join("secret");
    std::fs::write(&secret, "ROOT-ONLY-SECRET\n").unwrap_or_else(|e| panic!("{e}"));
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .unwrap_or_else(|e| panic!("{e}"));
    let keys = tmp.path().join("keys");
    std::fs::create_dir(&keys).unwrap_or_else(|e| panic!("{e}"));
    nix::unistd::chown(&keys, Some(65534.into()), Some(65534.into()))
        .unwrap_or_else(|e| panic!("{e}"));
    std::os::unix::fs::symlink(&secret, keys.join("migrant.pub")).unwrap_or_else(|e| panic!("{e}"));
    small_base_image(tmp.path());
    let s = Sandbox::new(
        &format!(
            "{}[ssh]\nkey = \"{}\"\n",
            good_file(tmp.path()),
            keys.join("migrant").display()
        ),
        Some(CLOUD_INIT),
    );
    let o = s
        .cmd(&["up", "--timeout", "5"])
        .env("SUDO_USER", "nobody")
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!o.status.success(), "up went on: {}", stderr(&o));
    assert!(stderr(&o).contains("migrant.pub"), "{}", stderr(&o));
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
    assert!(!out.contains("ROOT-ONLY-SECRET"), "{out}");
    // Nothing under the state folder carries it either.
    let mut stack = vec![s.home()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                let text = String::from_utf8_lossy(&bytes);
                assert!(
                    !text.contains("ROOT-ONLY-SECRET"),
                    "{} holds it",
                    p.display()
                );
            }
        }
    }
    let _ = s.run(&["destroy"]);
    // The root-only file is unchanged, and still root's.
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&secret).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(meta.uid(), 0);
    assert_eq!(
        std::fs::read_to_string(&secret).unwrap_or_default(),
        "ROOT-ONLY-SECRET\n"
    );

    // `pubkey` through sudo for a user whose home does not exist: the key
    // is made as that user, so root creates nothing there.
    let o = s
        .cmd(&["pubkey"])
        .env("SUDO_USER", "nobody")
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!o.status.success(), "{}", stderr(&o));
    assert!(
        !Path::new("/nonexistent").exists(),
        "root created nobody's home"
    );
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
/// A real (empty, 64 MiB) qcow2 as `dir/base.qcow2`, what `good_file`
/// names.
fn small_base_image(dir: &Path) {
    let created = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(dir.join("base.qcow2"))
        .arg("64M")
        .status()
        .is_ok_and(|s| s.success());
    assert!(created, "qemu-img create");
}

fn open_to_all(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Under sudo, the files migrant makes in the project folder (`init`'s,
/// a share's store) are made by the invoking user's own programs: in a
/// folder that user may not write, nothing appears (77), and in their own
/// folder what appears is theirs. (Before, root wrote them by path and
/// then chowned the path, which a planted symlink redirects.)
#[test]
fn files_in_the_project_folder_are_made_as_the_invoking_user() {
    use std::os::unix::fs::MetadataExt;
    if !common::as_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    open_to_all(tmp.path());
    let s = Sandbox::new(
        &format!(
            "{}[[share]]\nhost = \"ws\"\nsize = \"1G\"\n",
            good_file(tmp.path())
        ),
        Some(CLOUD_INIT),
    );
    open_to_all(s.root.path());
    let project = s.root.path().join("project");
    open_to_all(&project);
    let before: Vec<_> = std::fs::read_dir(&project)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();

    // root's folder, nobody invoking: refused, nothing written.
    let o = s
        .cmd(&["mount"])
        .env("SUDO_USER", "nobody")
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(o.status.code(), Some(77), "mount: {}", stderr(&o));
    let fresh = tmp.path().join("fresh");
    std::fs::create_dir(&fresh).unwrap_or_else(|e| panic!("{e}"));
    open_to_all(&fresh);
    let o = s
        .cmd(&["-C", &fresh.to_string_lossy(), "init"])
        .env("SUDO_USER", "nobody")
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(o.status.code(), Some(77), "init: {}", stderr(&o));
    let after: Vec<_> = std::fs::read_dir(&project)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert_eq!(
        before, after,
        "root wrote in a folder the user may not write"
    );
    let made: Vec<_> = std::fs::read_dir(&fresh)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(made.is_empty(), "init wrote {made:?}");

    // The user's own folder: what init writes is theirs.
    nix::unistd::chown(&fresh, Some(65534.into()), Some(65534.into()))
        .unwrap_or_else(|e| panic!("{e}"));
    let o = s
        .cmd(&["-C", &fresh.to_string_lossy(), "init"])
        .env("SUDO_USER", "nobody")
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(o.status.success(), "init: {}", stderr(&o));
    for f in ["Migrantfile", "cloud-init.yml"] {
        let m = std::fs::metadata(fresh.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!((m.uid(), m.gid()), (65534, 65534), "{f}");
    }

    // A symlink planted at the store's temporary name, pointing at a file
    // only root may write: the store is made as the user, so the root
    // file keeps its owner and content.
    nix::unistd::chown(&project, Some(65534.into()), Some(65534.into()))
        .unwrap_or_else(|e| panic!("{e}"));
    let secret = tmp.path().join("root-only");
    std::fs::write(&secret, "root's\n").unwrap_or_else(|e| panic!("{e}"));
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .unwrap_or_else(|e| panic!("{e}"));
    let planted = project.join(".ws.img.partial");
    std::os::unix::fs::symlink(&secret, &planted).unwrap_or_else(|e| panic!("{e}"));
    std::os::unix::fs::lchown(&planted, Some(65534), Some(65534)).unwrap_or_else(|e| panic!("{e}"));
    let o = s
        .cmd(&["mount"])
        .env("SUDO_USER", "nobody")
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let m = std::fs::metadata(&secret).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((m.uid(), m.len()), (0, 7), "mount: {}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(&secret).unwrap_or_default(),
        "root's\n"
    );
    let store = std::fs::metadata(project.join("ws.img"))
        .unwrap_or_else(|e| panic!("no store made ({e}): {}", stderr(&o)));
    assert_eq!(store.uid(), 65534, "the store is not the user's");
    let _ = s.cmd(&["unmount"]).env("SUDO_USER", "nobody").output();
}

/// Whether the sandbox holds no VM (its folder of VMs may not exist).
fn no_vms(s: &Sandbox) -> bool {
    std::fs::read_dir(s.home().join("vms")).map_or(true, |mut d| d.next().is_none())
}

/// Whether `secret` appears in `o`'s output or in any file under the
/// sandbox's state folder.
fn leaks(s: &Sandbox, o: &Output, secret: &str) -> Option<String> {
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(o));
    if out.contains(secret) {
        return Some(format!("the output: {out}"));
    }
    common::file_containing(&s.home(), secret).map(|p| p.display().to_string())
}

/// Root reads what a project names with the rights of the user the
/// project belongs to: under sudo, a WireGuard file, a `cloud-init.yml`
/// symlink and a local image naming a root-only file each fail with the
/// user's own "Permission denied" and leak nothing into any output, the
/// seed or the image cache. Root running in a folder another user owns
/// (a CI runner) runs its hooks as that owner: a hook that is a symlink to
/// a root-owned program (`make`) runs the owner's Makefile as the owner.
/// (Before: the WireGuard error quoted the file's first line, the other
/// two were copied for the guest, and the Makefile ran as root.)
#[test]
fn root_reads_and_runs_a_projects_files_as_its_user() {
    use std::os::unix::fs::PermissionsExt;
    if !common::as_root() {
        return;
    }
    const SECRET: &str = "ROOT-ONLY-SECRET";
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    open_to_all(tmp.path());
    let secret = tmp.path().join("secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("{e}"));
    small_base_image(tmp.path());
    let plain = "#cloud-config\n";
    let cases = [
        (
            format!(
                "{}[network]\nwireguard = \"{}\"\n",
                good_file(tmp.path()),
                secret.display()
            ),
            false,
        ),
        (good_file(tmp.path()), true),
        (
            format!("name = \"codes\"\nimage = \"{}\"\n", secret.display()),
            false,
        ),
    ];
    for (migrantfile, cloud_init_link) in cases {
        let s = Sandbox::new(&migrantfile, (!cloud_init_link).then_some(plain));
        open_to_all(s.root.path());
        let project = s.root.path().join("project");
        nix::unistd::chown(&project, Some(65534.into()), Some(65534.into()))
            .unwrap_or_else(|e| panic!("{e}"));
        if cloud_init_link {
            std::os::unix::fs::symlink(&secret, project.join("cloud-init.yml"))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let o = s
            .cmd(&["up", "--timeout", "5"])
            .env("SUDO_USER", "nobody")
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!o.status.success(), "up went on: {migrantfile}");
        assert!(
            stderr(&o).contains("Permission denied"),
            "{migrantfile}: {}",
            stderr(&o)
        );
        if let Some(place) = leaks(&s, &o, SECRET) {
            panic!("{migrantfile}: root's file reached {place}");
        }
        assert!(no_vms(&s), "a VM was left behind");
    }

    // Root, no sudo, in nobody's folder: the hook runs as nobody.
    let s = Sandbox::new(&good_file(tmp.path()), Some(plain));
    open_to_all(s.root.path());
    let project = s.root.path().join("project");
    let hooks = project.join("hooks");
    std::fs::create_dir(&hooks).unwrap_or_else(|e| panic!("{e}"));
    std::os::unix::fs::symlink("/usr/bin/make", hooks.join("pre-up"))
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(
        project.join("Makefile"),
        "all:\n\tid -u > ran-as\n\tfalse\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    for p in [&project, &hooks, &project.join("Makefile")] {
        nix::unistd::chown(p.as_path(), Some(65534.into()), Some(65534.into()))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let o = s.run(&["up", "--timeout", "5"]);
    assert!(!o.status.success(), "the failing hook did not stop up");
    let ran_as = std::fs::read_to_string(project.join("ran-as")).unwrap_or_default();
    assert_eq!(
        ran_as.trim(),
        "65534",
        "the owner's Makefile ran as uid {ran_as}: {}",
        stderr(&o)
    );
    assert!(no_vms(&s), "a VM was left behind");
}
