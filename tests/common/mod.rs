//! Shared harness for the integration tests: every test gets its own
//! state, runtime and home folders and its own project folder, runs the
//! real `migrant` binary as root, boots the test guest under TCG, and
//! checks that nothing it started outlives it.

#![allow(dead_code)]

pub mod http;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub mod net;
pub mod share_io;

pub struct Env {
    pub root: tempfile::TempDir,
    pub project: PathBuf,
    pub name: String,
    /// Run migrant inside this network namespace (`ip netns exec`).
    pub netns: Option<String>,
    /// Who migrant's commands run as: the rootless run's user, or root.
    pub user: Option<nix::unistd::User>,
    /// The Migrantfile's lines before the test's own settings.
    head: String,
}

/// One case of a file's shared guest ([`Env::run_cases`]): its name, the
/// Migrantfile settings it runs with (after the common lines), and what it
/// does with the guest.
pub struct Case<'a> {
    pub name: &'a str,
    pub extra: &'a str,
    pub run: &'a dyn Fn(&Env),
}

/// The test guest image built by `scripts/build-guest-image`, or `None`
/// (the test then reports itself skipped) unless `MIGRANT_REQUIRE_INTEGRATION`
/// is set, in which case a missing prerequisite fails the test.
pub fn test_image() -> Option<PathBuf> {
    test_image_from("MIGRANT_TEST_IMAGE")
}

/// The Debian 13 test guest (`MIGRANT_GUEST_RELEASE=13
/// scripts/build-guest-image`), like [`test_image`].
pub fn test_image_13() -> Option<PathBuf> {
    test_image_from("MIGRANT_TEST_IMAGE_13")
}

fn test_image_from(var: &str) -> Option<PathBuf> {
    let required = std::env::var_os("MIGRANT_REQUIRE_INTEGRATION").is_some();
    let img = std::env::var_os(var).map(PathBuf::from);
    let root = nix::unistd::Uid::effective().is_root();
    match img {
        Some(p) if p.is_file() && root => Some(p),
        _ if required => panic!(
            "integration prerequisites missing: {var}={:?}, root={root}; run scripts/test",
            std::env::var_os(var)
        ),
        _ => {
            eprintln!("SKIPPED: set {var} and run as root (scripts/test does)");
            None
        }
    }
}

/// Whether a test that acts as root (other users, ownership) can run:
/// without root it is skipped, loudly, unless `MIGRANT_REQUIRE_INTEGRATION`
/// is set (scripts/test sets it), in which case it fails.
pub fn as_root() -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    if std::env::var_os("MIGRANT_REQUIRE_INTEGRATION").is_some() {
        panic!("this test needs root and MIGRANT_REQUIRE_INTEGRATION is set");
    }
    eprintln!("SKIPPED: needs root (scripts/test runs it)");
    false
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_migrant"))
}

/// In a rootless run of the suite (`MIGRANT_TEST_ROOTLESS=1`, tests run as
/// root), the ordinary user every migrant command runs as
/// (`MIGRANT_TEST_USER`, made by `scripts/test-user`); `None` otherwise.
pub fn rootless_user() -> Option<nix::unistd::User> {
    std::env::var_os("MIGRANT_TEST_ROOTLESS")?;
    if !nix::unistd::Uid::effective().is_root() {
        return None;
    }
    let name = std::env::var("MIGRANT_TEST_USER").unwrap_or_else(|_| "migrant-test".into());
    match nix::unistd::User::from_name(&name) {
        Ok(Some(u)) => Some(u),
        _ => panic!(
            "MIGRANT_TEST_ROOTLESS is set but there is no user {name}: run scripts/test-user"
        ),
    }
}

/// Who migrant's commands run as: root, or the rootless run's user.
pub fn migrant_uid() -> u32 {
    rootless_user().map_or(0, |u| u.uid.as_raw())
}

/// The processes holding `state`'s lock file open (what keeps a VM
/// "running" for `status`), as `pid command`.
pub fn lock_holders(state: &Path) -> Vec<String> {
    let lock = state.join("lock");
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let holds = std::fs::read_dir(e.path().join("fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == lock));
        if holds {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            found.push(format!(
                "{pid} {}",
                String::from_utf8_lossy(&cmd).replace('\0', " ")
            ));
        }
    }
    found
}

/// migrant's binary where `user` may run it (the build folder may sit
/// under a home only root enters): one hard link (a copy across file
/// systems) per test process, in a folder named by its pid; folders of
/// test processes that are gone are removed first.
fn bin_for(user: &nix::unistd::User) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    static LINK: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    LINK.get_or_init(|| {
        let tmp = std::env::temp_dir();
        for e in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("migrant-bin-")
                && pid.parse::<u32>().is_ok()
                && !Path::new("/proc").join(pid).exists()
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let dir = tmp.join(format!("migrant-bin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("{e}"));
        let exe = dir.join("migrant");
        if std::fs::hard_link(bin(), &exe).is_err() {
            std::fs::copy(bin(), &exe).unwrap_or_else(|e| panic!("{e}"));
        }
        let mode = std::fs::metadata(&exe)
            .map(|m| m.permissions().mode())
            .unwrap_or(0);
        assert!(
            mode & 0o005 == 0o005,
            "{} may not be run by {}",
            exe.display(),
            user.name
        );
        exe
    })
    .clone()
}

/// Processes (but this one) whose command line mentions `dir`, with
/// that command line.
pub fn processes_naming(dir: &Path) -> Vec<(u32, String)> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// A file under `dir` (symlinks not followed) whose bytes contain
/// `needle`.
pub fn file_containing(dir: &Path, needle: &str) -> Option<PathBuf> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                stack.push(p);
            } else if std::fs::read(&p)
                .is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
            {
                return Some(p);
            }
        }
    }
    None
}

/// Give `root` and everything under it to `user`.
pub fn chown_tree(root: &Path, user: &nix::unistd::User) {
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        nix::unistd::chown(&p, Some(user.uid), Some(user.gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
        if p.is_dir() && !p.is_symlink() {
            todo.extend(
                std::fs::read_dir(&p)
                    .unwrap_or_else(|e| panic!("{e}"))
                    .flatten()
                    .map(|e| e.path()),
            );
        }
    }
}

impl Env {
    /// A project named `name` with a TOML Migrantfile (`extra` appended).
    pub fn new(name: &str, image: &Path, extra: &str) -> Env {
        Env::new_in(name, image, extra, None)
    }

    /// Like [`Env::new`], with every migrant command run inside `netns`.
    pub fn new_in(name: &str, image: &Path, extra: &str, netns: Option<&str>) -> Env {
        Env::made(name, image, extra, netns, rootless_user())
    }

    /// Like [`Env::new`], run by root for root's own VM even in a rootless
    /// run of the suite: root takes the same user-namespace path, with a
    /// subordinate range of its own.
    pub fn new_for_root(name: &str, image: &Path, extra: &str) -> Env {
        Env::made(name, image, extra, None, None)
    }

    fn made(
        name: &str,
        image: &Path,
        extra: &str,
        netns: Option<&str>,
        user: Option<nix::unistd::User>,
    ) -> Env {
        let root = tempfile::Builder::new()
            .prefix("migrant-it-")
            .tempdir()
            .unwrap_or_else(|e| panic!("tempdir: {e}"));
        let project = root.path().join("project");
        std::fs::create_dir_all(&project).unwrap_or_else(|e| panic!("{e}"));
        std::fs::create_dir_all(root.path().join("home")).unwrap_or_else(|e| panic!("{e}"));
        let name = format!("{name}-{}", std::process::id());
        let head = format!(
            "name = \"{name}\"\nimage = \"{}\"\ncpus = 2\nmemory = \"1G\"\ndisk = \"4G\"\naccel = \"tcg\"\n",
            image.display()
        );
        std::fs::write(project.join("Migrantfile"), format!("{head}{extra}"))
            .unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(
            project.join("cloud-init.yml"),
            "#cloud-config\nusers:\n  - name: migrant\n    sudo: ALL=(ALL) NOPASSWD:ALL\n    shell: /bin/bash\n    ssh_authorized_keys:\n      - __MIGRANT_PUBKEY__\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        if let Some(user) = &user {
            chown_tree(root.path(), user);
        }
        let env = Env {
            root,
            project,
            name,
            netns: netns.map(str::to_string),
            user,
            head,
        };
        let out = env.run(&["pubkey"]);
        assert!(out.status.success(), "pubkey: {}", text(&out));
        env
    }

    /// Replace the test's own Migrantfile settings with `extra`.
    pub fn set_extra(&self, extra: &str) {
        let file = self.project.join("Migrantfile");
        std::fs::write(&file, format!("{}{extra}", self.head))
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    }

    /// The cases of a file on one booted guest: the first `up` boots it and
    /// a memory snapshot saves it; every case then starts from that
    /// moment (the first on the guest just booted, each later one after a
    /// `reset`, which resumes the snapshot in seconds instead of booting
    /// again), with its own settings, which may differ only where a resume
    /// allows (the network's host side). Every case runs, also after one
    /// fails; the test then fails naming each failed case. The VM is
    /// destroyed and must leave nothing behind.
    pub fn run_cases(&self, cases: &[Case<'_>]) {
        let mut failed = Vec::new();
        for (i, case) in cases.iter().enumerate() {
            eprintln!("=== case {}", case.name);
            let started = Instant::now();
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.set_extra(case.extra);
                if i == 0 {
                    self.ok(&["up"]);
                    self.ok(&["snapshot", "--memory"]);
                } else {
                    let out = self.run(&["reset"]);
                    assert!(out.status.success(), "reset: {}", text(&out));
                    assert!(
                        text(&out).contains("resumed from its memory snapshot"),
                        "the case booted instead of resuming: {}",
                        text(&out)
                    );
                }
                (case.run)(self)
            }));
            let took = started.elapsed().as_secs();
            match result {
                Ok(()) => eprintln!("=== case {}: ok ({took} s)", case.name),
                Err(_) => {
                    eprintln!("=== case {}: FAILED ({took} s)", case.name);
                    failed.push(case.name);
                }
            }
        }
        // (A failed case's VM goes when the test's folders do.)
        assert!(failed.is_empty(), "failed cases: {failed:?}");
        self.ok(&["destroy"]);
        self.assert_clean();
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        // Root enters the test's namespace; a rootless run then becomes
        // the test user.
        let mut prefix: Vec<std::ffi::OsString> = Vec::new();
        if let Some(ns) = &self.netns {
            prefix.extend(["ip", "netns", "exec", ns].map(Into::into));
        }
        let exe = match &self.user {
            Some(u) => {
                prefix.push("setpriv".into());
                prefix.push(format!("--reuid={}", u.uid).into());
                prefix.push(format!("--regid={}", u.gid).into());
                prefix.extend(["--init-groups", "--inh-caps=-all", "--"].map(Into::into));
                bin_for(u)
            }
            None => bin(),
        };
        prefix.push(exe.into());
        let mut c = Command::new(&prefix[0]);
        c.args(&prefix[1..]);
        c.args(args)
            .current_dir(&self.project)
            .env("MIGRANT_HOME", self.root.path().join("state"))
            .env("MIGRANT_RUNTIME", self.root.path().join("run"))
            .env("HOME", self.root.path().join("home"))
            .env_remove("SUDO_USER")
            .env_remove("SUDO_UID")
            .env_remove("MIGRANT_DIR");
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running migrant {args:?}: {e}"))
    }

    /// Run with `input` on stdin.
    pub fn run_input(&self, args: &[&str], input: &[u8]) -> Output {
        use std::io::Write;
        let mut child = self
            .cmd(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("running migrant {args:?}: {e}"));
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input).unwrap_or_else(|e| panic!("{e}"));
        }
        child.wait_with_output().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Run the guest probe (tests/guest_probe.py) with `checks`; returns
    /// one result line per check, as `check => result`.
    pub fn probe(&self, checks: &[&str]) -> std::collections::HashMap<String, String> {
        let mut args = vec!["ssh", "--", "python3", "-"];
        args.extend_from_slice(checks);
        let out = self.run_input(&args, include_bytes!("../guest_probe.py"));
        assert!(out.status.success(), "probe: {}", text(&out));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once(" => "))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Run as `nobody` (uid 65534, no groups): what an ordinary local
    /// user may read. Makes the test's folders traversable first.
    pub fn run_as_nobody(&self, args: &[&str]) -> Output {
        self.run_as(65534, args)
    }

    /// Run as `uid` (its gid the same, no groups), without root.
    pub fn run_as(&self, uid: u32, args: &[&str]) -> Output {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(self.root.path(), std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("{e}"));
        Command::new("setpriv")
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={uid}"))
            .arg("--clear-groups")
            .arg(bin())
            .args(args)
            .current_dir(&self.project)
            .env("MIGRANT_HOME", self.root.path().join("state"))
            .env("MIGRANT_RUNTIME", self.root.path().join("run"))
            .env("HOME", "/nonexistent")
            .output()
            .unwrap_or_else(|e| panic!("setpriv: {e}"))
    }

    /// Give the project the four lifecycle hooks, each appending
    /// `$MIGRANT_HOOK $MIGRANT_TRIGGER` to the returned log file.
    pub fn log_hooks(&self) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let hooks = self.project.join("hooks");
        std::fs::create_dir_all(&hooks).unwrap_or_else(|e| panic!("{e}"));
        let log = self.root.path().join("hooks.log");
        for h in ["pre-up", "post-up", "pre-down", "post-down"] {
            let p = hooks.join(h);
            std::fs::write(
                &p,
                format!(
                    "#!/bin/sh\necho \"$MIGRANT_HOOK $MIGRANT_TRIGGER\" >> {}\n",
                    log.display()
                ),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        log
    }

    /// Run and require success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "migrant {args:?} failed: {}",
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The host's uid its QEMU runs as (the VM's own identity).
    pub fn vm_id(&self) -> u32 {
        self.vm_ids().0
    }

    /// The VM's own uid and gid on the host (two subordinate ids of the
    /// user's): read from its running QEMU, else from its record (its
    /// index in the user's range).
    pub fn vm_ids(&self) -> (u32, u32) {
        if self.pid_of("qemu-system").is_some() {
            return qemu_ids_in(&self.state_dir());
        }
        let index = vm_id_in(&self.state_dir());
        let (name, uid) = match &self.user {
            Some(u) => (u.name.clone(), u.uid.as_raw()),
            None => ("root".to_string(), 0),
        };
        let first = |file: &str| -> u32 {
            std::fs::read_to_string(file)
                .unwrap_or_default()
                .lines()
                .find_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    (f.len() == 3 && (f[0] == name || f[0] == uid.to_string()))
                        .then(|| f[1].parse::<u32>().ok())
                        .flatten()
                })
                .unwrap_or_else(|| panic!("{name} has no range in {file}"))
        };
        (
            first("/etc/subuid") + index,
            first("/etc/subgid") + index + 1,
        )
    }

    /// migrant's binary where this test's user may run it.
    pub fn exe(&self) -> PathBuf {
        self.user.as_ref().map_or_else(bin, bin_for)
    }

    /// `program` run as this test's user (through `setpriv`, with the
    /// user's groups), or as root when migrant runs as root.
    pub fn command(&self, program: &str) -> Command {
        match &self.user {
            Some(u) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={}", u.uid))
                    .arg(format!("--regid={}", u.gid))
                    .args(["--init-groups", "--", program]);
                c
            }
            None => Command::new(program),
        }
    }

    /// Run `cmd` as the VM's own uid and gid, without groups: what its
    /// QEMU, if compromised, could do.
    pub fn as_vm(&self, cmd: &[&str]) -> Output {
        as_identity(self.vm_ids(), cmd)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.root.path().join("state").join("vms").join(&self.name)
    }

    pub fn run_dir(&self) -> PathBuf {
        self.root.path().join("run").join(&self.name)
    }

    /// Processes whose command line mentions this test's folders.
    pub fn processes(&self) -> Vec<(u32, String)> {
        processes_naming(self.root.path())
    }

    pub fn pid_of(&self, what: &str) -> Option<u32> {
        self.processes()
            .into_iter()
            .find(|(_, c)| c.contains(what))
            .map(|(p, _)| p)
    }

    /// Fail if any process, socket or state of this test's VM remains.
    pub fn assert_clean(&self) {
        let procs = self.processes();
        assert!(procs.is_empty(), "processes left behind: {procs:?}");
        assert!(
            !self.run_dir().exists(),
            "runtime dir left: {}",
            self.run_dir().display()
        );
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // A failed test's VM folder goes with it: show the end of its
        // logs first (a guest that never answered says why on its
        // console).
        if std::thread::panicking() {
            for log in ["serial.log", "supervisor.log"] {
                let path = self.state_dir().join(log);
                let Ok(bytes) = std::fs::read(&path) else {
                    continue;
                };
                let text = String::from_utf8_lossy(&bytes);
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("--- the last lines of {} ---", path.display());
                for line in &lines[lines.len().saturating_sub(40)..] {
                    eprintln!("{line}");
                }
            }
        }
        // Never leave a VM running, whatever the test did.
        let _ = self.cmd(&["destroy"]).output();
        for (pid, _) in self.processes() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The uid and gid of the running QEMU of the VM whose state folder is
/// `state` (its identity on the host).
pub fn qemu_ids_in(state: &Path) -> (u32, u32) {
    let qemu = qemu_pid_in(state);
    let status = std::fs::read_to_string(format!("/proc/{qemu}/status")).unwrap_or_default();
    let first = |key: &str| -> u32 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {key} of QEMU {qemu}"))
    };
    (first("Uid:"), first("Gid:"))
}

/// The pid of the running QEMU of the VM whose state folder is `state`,
/// from its record (a clone's command line names its template's folder
/// too).
pub fn qemu_pid_in(state: &Path) -> u32 {
    let pid = record_field(state, "qemu_pid");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("qemu-system"),
        "process {pid} of {} is not its QEMU",
        state.display()
    );
    pid
}

/// The first id and the count of the range `file` (`/etc/subuid` or
/// `/etc/subgid`) gives the user `name` (or `uid`).
pub fn subordinate_range(file: &str, name: &str, uid: u32) -> (u32, u32) {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let ours = f.len() == 3 && (f[0] == name || f[0] == uid.to_string());
            ours.then(|| Some((f[1].parse().ok()?, f[2].parse().ok()?)))
                .flatten()
        })
        .unwrap_or_else(|| panic!("{name} has no range in {file}"))
}

/// The VM's index in its user's range, from the record of the VM whose
/// state folder is `state`.
pub fn vm_id_in(state: &Path) -> u32 {
    record_field(state, "vm_id")
}

/// A number of the record of the VM whose state folder is `state`.
fn record_field(state: &Path, key: &str) -> u32 {
    let file = state.join("record.json");
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let rec: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    rec[key]
        .as_u64()
        .and_then(|v| u32::try_from(v).ok())
        .unwrap_or_else(|| panic!("no {key} in {}: {text}", file.display()))
}

/// Run `cmd` as a VM identity (its uid and gid, no groups).
pub fn as_identity((uid, gid): (u32, u32), cmd: &[&str]) -> Output {
    Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .args(cmd)
        .output()
        .unwrap_or_else(|e| panic!("setpriv: {e}"))
}

pub fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The names in a folder.
pub fn names_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Poll `f` until it is true or `timeout` passes.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

/// The network namespace inode of `pid` (`net:[4026532…]`).
pub fn netns_of(pid: u32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// Whether any process is still in the network namespace `ns`.
pub fn netns_in_use(ns: &str) -> bool {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .any(|e| {
            std::fs::read_link(e.path().join("ns/net"))
                .map(|p| p.to_string_lossy() == ns)
                .unwrap_or(false)
        })
}

/// Assert one guest probe result: `want`, or any failure for "ERR".
pub fn expect(results: &std::collections::HashMap<String, String>, check: &str, want: &str) {
    let got = results
        .get(check)
        .map(String::as_str)
        .unwrap_or("<missing>");
    if want == "ERR" {
        assert!(
            got.starts_with("ERR"),
            "{check}: expected a failure, got {got:?}"
        );
    } else {
        assert_eq!(got, want, "{check}");
    }
}

/// Assert every `(check, want)` of a probe (as [`expect`]), reporting all
/// the mismatches at once: each check is a separate attack.
pub fn expect_all(results: &std::collections::HashMap<String, String>, wants: &[(&str, &str)]) {
    let mut wrong = Vec::new();
    for (check, want) in wants {
        let got = results
            .get(*check)
            .map(String::as_str)
            .unwrap_or("<missing>");
        let ok = if *want == "ERR" {
            got.starts_with("ERR")
        } else {
            got == *want
        };
        if !ok {
            wrong.push(format!("{check}: want {want:?}, got {got:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} checks failed:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}
