//! Provisioning, hooks and ssh-config on a real guest under TCG: hooks,
//! Ansible, `ssh` and the SSH socket all belong to the user running
//! migrant (the test user in a rootless run of the suite, else root).
//!
//! One test boots twice: create (pre-up writes `.qemu-extra-args`, the
//! playbook runs once, post-up runs `migrant ssh` as the user) →
//! `ssh -F <(migrant ssh-config)` → `provision` again → a failing playbook
//! → a blocking pre-down → halt → a failing pre-up on the stopped VM →
//! up (no playbook) → destroy despite a failing pre-down. The other test
//! boots nothing.

mod common;

use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Output, Stdio};

/// A local user who is not the VM's owner (no passwd entry needed).
const OTHER: u32 = 65533;

fn write_exec(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("{e}"));
}

fn chown(path: &Path, uid: u32) {
    nix::unistd::chown(
        path,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(uid)),
    )
    .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}

/// `bash -c SCRIPT` as the user migrant runs as, in the test's home.
fn as_migrant_user(env: &Env, script: &str) -> Output {
    env.command("bash")
        .args(["-c", script])
        .env("MIGRANT_HOME", env.root.path().join("state"))
        .env("MIGRANT_RUNTIME", env.root.path().join("run"))
        .env("HOME", env.root.path().join("home"))
        .env_remove("SUDO_UID")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{e}"))
}

const PLAYBOOK: &str = "---
- name: provision without the internet
  hosts: all
  gather_facts: false
  tasks:
    - name: count provisioning runs
      ansible.builtin.shell: echo run >> /home/migrant/provisioned
    - name: record who ran Ansible on the host
      ansible.builtin.copy:
        content: \"{{ lookup('pipe', 'id -u') }}\\n\"
        dest: /home/migrant/controller-uid
";

const FAILING_PLAYBOOK: &str = "---
- hosts: all
  gather_facts: false
  tasks:
    - ansible.builtin.fail:
        msg: deliberate-playbook-failure
";

fn hook_lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log.join("hooks.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn hooks_playbook_and_ssh_config_as_the_user() {
    let Some(image) = test_image() else { return };
    let env = Env::new("prov", &image, "");
    let root = env.root.path().to_path_buf();
    let key = root.join("home/.ssh/migrant");
    let mut mf =
        std::fs::read_to_string(env.project.join("Migrantfile")).unwrap_or_else(|e| panic!("{e}"));
    mf.push_str(&format!("\n[ssh]\nkey = \"{}\"\n", key.display()));
    std::fs::write(env.project.join("Migrantfile"), mf).unwrap_or_else(|e| panic!("{e}"));

    let me = migrant_uid();
    let log = root.join("log");
    std::fs::create_dir(&log).unwrap_or_else(|e| panic!("{e}"));
    chown(&log, me);

    let hooks = env.project.join("hooks");
    std::fs::create_dir(&hooks).unwrap_or_else(|e| panic!("{e}"));
    let record = format!(
        "echo \"$MIGRANT_HOOK $MIGRANT_TRIGGER $MIGRANT_VM_NAME [$MIGRANT_VM_IP] uid=$(id -u) home=$HOME pwd=$PWD dir=$MIGRANT_VM_DIR\" >> {}/hooks.log\n",
        log.display()
    );
    write_exec(
        &hooks.join("pre-up"),
        &format!(
            "#!/bin/sh\n{record}[ -e {log}/fail-pre-up ] && exit 4\nif [ ! -e {log}/created ]; then\n  touch {log}/created\n  printf -- '-smbios\\ntype=11,value=migrant-extra-arg\\n' > \"$MIGRANT_VM_DIR/.qemu-extra-args\"\nfi\nexit 0\n",
            log = log.display()
        ),
    );
    write_exec(
        &hooks.join("post-up"),
        &format!(
            "#!/bin/sh\n{record}{bin} ssh -- cat /home/migrant/provisioned > {log}/post-up-ssh 2>&1\n",
            bin = env.exe().display(),
            log = log.display()
        ),
    );
    write_exec(
        &hooks.join("pre-down"),
        &format!("#!/bin/sh\n{record}[ ! -e {}/block-down ]\n", log.display()),
    );
    write_exec(&hooks.join("post-down"), &format!("#!/bin/sh\n{record}"));
    std::fs::write(env.project.join("playbook.yml"), PLAYBOOK).unwrap_or_else(|e| panic!("{e}"));

    // --- first boot: create, pre-up, playbook, post-up.
    let out = env.run(&["up"]);
    assert!(out.status.success(), "up: {}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("provisioning with playbook.yml"),
        "{stdout}"
    );
    assert!(stdout.contains("extra argument"), "{stdout}");
    let name = &env.name;
    let dir = env.project.display().to_string();
    let tail = format!(
        "uid={me} home={} pwd={dir} dir={dir}",
        root.join("home").display()
    );
    assert_eq!(
        hook_lines(&log),
        vec![
            format!("pre-up up {name} [] {tail}"),
            format!("post-up up {name} [10.0.2.15] {tail}"),
        ]
    );
    assert_eq!(
        env.ok(&["ssh", "--", "cat", "/home/migrant/provisioned"]),
        "run\n"
    );
    assert_eq!(
        env.ok(&["ssh", "--", "cat", "/home/migrant/controller-uid"])
            .trim(),
        me.to_string(),
        "ansible-playbook must run as the user"
    );
    // `migrant ssh` runs as the user: a key only root may read does not
    // work (in a rootless run).
    if me != 0 {
        let keymeta = std::fs::metadata(&key).unwrap_or_else(|e| panic!("{e}"));
        chown(&key, 0);
        let out = env.run(&["ssh", "--", "true"]);
        assert!(
            !out.status.success(),
            "ssh read a root-only key: {}",
            text(&out)
        );
        chown(&key, keymeta.uid());
    }
    let out = env.run(&["ssh", "--", "true"]);
    assert!(out.status.success(), "ssh: {}", text(&out));
    // post-up ran `migrant ssh` as the user, through the user's socket.
    let post_up_ssh = std::fs::read_to_string(log.join("post-up-ssh")).unwrap_or_default();
    assert!(
        post_up_ssh.contains("run"),
        "post-up's migrant ssh: {post_up_ssh}"
    );
    let sock = env.run_dir().join("ssh.sock");
    let meta = std::fs::metadata(&sock).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(meta.uid(), me, "ssh.sock owner");
    assert_eq!(meta.mode() & 0o777, 0o600, "ssh.sock mode");
    // The VM is the user's: the user reads its status and egress
    // journal; another local user reads nothing of it.
    let out = env.run(&["status"]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("running"),
        "status as the VM's owner: {}",
        text(&out)
    );
    // status lists the project's hooks, as the original's does.
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("hooks:       pre-up post-up pre-down post-down"),
        "{}",
        text(&out)
    );
    let out = env.run(&["egress", "--json"]);
    assert!(out.status.success(), "egress as the owner: {}", text(&out));
    for args in [&["status"][..], &["egress", "--json"], &["info"]] {
        let out = env.run_as(OTHER, args);
        assert_eq!(
            out.status.code(),
            Some(77),
            "{args:?} as another user: {}",
            text(&out)
        );
        assert!(
            out.stdout.is_empty(),
            "{args:?} as another user: {}",
            text(&out)
        );
    }
    // .qemu-extra-args: consumed, on QEMU's command line.
    assert!(!env.project.join(".qemu-extra-args").exists());
    let qemu_cmdline = |env: &Env| {
        env.processes()
            .into_iter()
            .find(|(_, c)| c.contains("qemu-system"))
            .map(|(_, c)| c)
            .unwrap_or_default()
    };
    assert!(
        qemu_cmdline(&env).contains("-smbios type=11,value=migrant-extra-arg"),
        "{}",
        qemu_cmdline(&env)
    );

    // --- ssh-config, used by plain ssh and scp as the user. (Not through
    // `-F <(…)`: OpenSSH closes inherited descriptors before it reads
    // -F, so process substitution cannot work with any generator.)
    let config = env.ok(&["ssh-config"]);
    assert!(config.starts_with(&format!("Host {name}\n")), "{config}");
    let script = format!(
        "cd {log} && {bin} -C {dir} ssh-config > ssh_config && ssh -F ssh_config {name} cat /home/migrant/provisioned && scp -q -F ssh_config {name}:/home/migrant/controller-uid copied && cat copied",
        bin = env.exe().display(),
        log = log.display(),
    );
    let out = as_migrant_user(&env, &script);
    assert!(
        out.status.success(),
        "ssh -F $(migrant ssh-config): {}",
        text(&out)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("run\n{me}\n"));
    // The same config from standard input.
    let script = format!(
        "{bin} -C {dir} ssh-config | ssh -F /dev/stdin {name} true",
        bin = env.exe().display(),
    );
    let out = as_migrant_user(&env, &script);
    assert!(out.status.success(), "ssh -F /dev/stdin: {}", text(&out));

    // --- provision runs the playbook again.
    env.ok(&["provision"]);
    assert_eq!(
        env.ok(&["ssh", "--", "cat", "/home/migrant/provisioned"]),
        "run\nrun\n"
    );

    // --- a failing playbook: its message, exit 70, the VM stays up.
    std::fs::write(env.project.join("playbook.yml"), FAILING_PLAYBOOK)
        .unwrap_or_else(|e| panic!("{e}"));
    let out = env.run(&["provision"]);
    assert_eq!(
        out.status.code(),
        Some(70),
        "failing provision: {}",
        text(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("playbook.yml failed") && stderr.contains("migrant provision"),
        "{stderr}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("deliberate-playbook-failure"),
        "{}",
        text(&out)
    );
    env.ok(&["ssh", "--", "true"]);
    std::fs::write(env.project.join("playbook.yml"), PLAYBOOK).unwrap_or_else(|e| panic!("{e}"));

    // --- a failing pre-down blocks halt.
    std::fs::write(log.join("block-down"), "").unwrap_or_else(|e| panic!("{e}"));
    let out = env.run(&["halt"]);
    assert_eq!(out.status.code(), Some(75), "blocked halt: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pre-down"),
        "{}",
        text(&out)
    );
    env.ok(&["ssh", "--", "true"]);
    std::fs::remove_file(log.join("block-down")).unwrap_or_else(|e| panic!("{e}"));
    env.ok(&["halt"]);
    env.assert_clean();

    // --- a failing pre-up on the stopped VM starts nothing.
    std::fs::write(log.join("fail-pre-up"), "").unwrap_or_else(|e| panic!("{e}"));
    let out = env.run(&["up"]);
    assert_eq!(
        out.status.code(),
        Some(75),
        "failing pre-up: {}",
        text(&out)
    );
    assert!(
        // The original tool's words, which scripts look for.
        String::from_utf8_lossy(&out.stderr).contains("pre-up hook failed"),
        "{}",
        text(&out)
    );
    env.assert_clean();
    let status: serde_json::Value =
        serde_json::from_str(&env.ok(&["status", "--json"])).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status["state"], "stopped");
    std::fs::remove_file(log.join("fail-pre-up")).unwrap_or_else(|e| panic!("{e}"));

    // --- second boot: hooks again, no playbook, extra args kept.
    let out = env.run(&["up"]);
    assert!(out.status.success(), "second up: {}", text(&out));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("provisioning"),
        "{}",
        text(&out)
    );
    assert_eq!(
        env.ok(&["ssh", "--", "cat", "/home/migrant/provisioned"]),
        "run\nrun\n"
    );
    assert!(qemu_cmdline(&env).contains("value=migrant-extra-arg"));

    // --- destroy is not blocked by a failing pre-down.
    std::fs::write(log.join("block-down"), "").unwrap_or_else(|e| panic!("{e}"));
    let out = env.run(&["destroy"]);
    assert!(out.status.success(), "destroy: {}", text(&out));
    env.assert_clean();
    assert!(!env.state_dir().exists());

    assert_eq!(
        hook_lines(&log),
        vec![
            format!("pre-up up {name} [] {tail}"),
            format!("post-up up {name} [10.0.2.15] {tail}"),
            format!("pre-down halt {name} [10.0.2.15] {tail}"),
            format!("pre-down halt {name} [10.0.2.15] {tail}"),
            format!("post-down halt {name} [] {tail}"),
            format!("pre-up up {name} [] {tail}"),
            format!("pre-up up {name} [] {tail}"),
            format!("post-up up {name} [10.0.2.15] {tail}"),
            format!("pre-down destroy {name} [10.0.2.15] {tail}"),
            format!("post-down destroy {name} [] {tail}"),
        ]
    );
}

/// Without booting: a failing pre-up on a new VM creates nothing; the
/// commands that need no VM; `provision` and `run --snapshot` refusals.
#[test]
fn without_a_guest() {
    // Needs root for the state folders; nothing boots, so a tiny empty
    // image stands in for the guest's (cheap to cache).
    if test_image().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let image = tmp.path().join("empty.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("1G")
        .output()
        .unwrap_or_else(|e| panic!("qemu-img: {e}"));
    assert!(out.status.success(), "qemu-img: {}", text(&out));
    let env = Env::new("noboot", &image, "");
    let hooks = env.project.join("hooks");
    std::fs::create_dir(&hooks).unwrap_or_else(|e| panic!("{e}"));
    write_exec(
        &hooks.join("pre-up"),
        "#!/bin/sh\necho refusing >&2\nexit 3\n",
    );
    let out = env.run(&["up"]);
    assert_eq!(out.status.code(), Some(75), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing") && stderr.contains("exit 3"),
        "{stderr}"
    );
    assert!(!env.state_dir().exists(), "a refused up left state behind");
    env.assert_clean();

    // A hook another user owns, or others may change: refused.
    chown(&hooks.join("pre-up"), OTHER);
    let out = env.run(&["up"]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("belongs to uid {OTHER}")),
        "{}",
        text(&out)
    );
    chown(&hooks.join("pre-up"), migrant_uid());
    std::fs::set_permissions(hooks.join("pre-up"), std::fs::Permissions::from_mode(0o757))
        .unwrap_or_else(|e| panic!("{e}"));
    let out = env.run(&["up"]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("writable"),
        "{}",
        text(&out)
    );
    assert!(!env.state_dir().exists());

    let out = env.run(&["provision"]);
    assert_eq!(out.status.code(), Some(69), "{}", text(&out));
    let out = env.run(&["run", "--snapshot", "--", "true"]);
    assert_eq!(out.status.code(), Some(69), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no snapshot"),
        "{}",
        text(&out)
    );
    let out = env.run(&["run", "--rm"]);
    assert_eq!(
        out.status.code(),
        Some(64),
        "run without CMD: {}",
        text(&out)
    );

    let config = env.ok(&["ssh-config", "--host", "alias"]);
    assert!(config.starts_with("Host alias\n"), "{config}");
    assert!(config.contains("__proxy"), "{config}");
    assert!(config.contains("IdentityFile \""), "{config}");
    // ssh itself reads it back.
    let file = env.root.path().join("ssh_config");
    std::fs::write(&file, &config).unwrap_or_else(|e| panic!("{e}"));
    let out = std::process::Command::new("ssh")
        .arg("-G")
        .arg("-F")
        .arg(&file)
        .arg("alias")
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let parsed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ssh -G: {}", text(&out));
    assert!(parsed.contains("user migrant\n"), "{parsed}");
    assert!(parsed.contains("proxycommand "), "{parsed}");
    assert!(parsed.contains("stricthostkeychecking false"), "{parsed}");

    let bash = env.ok(&["completions", "bash"]);
    assert!(
        bash.contains("ssh-config") && bash.contains("_migrant"),
        "bash completion"
    );
    let zsh = env.ok(&["completions", "zsh"]);
    assert!(zsh.starts_with("#compdef migrant"), "zsh completion");
    let man = env.ok(&["man"]);
    assert!(
        man.contains(".TH migrant 1"),
        "man: {}",
        &man[..man.len().min(200)]
    );
    let mandir = env.root.path().join("man");
    env.ok(&["man", "--out-dir", &mandir.to_string_lossy()]);
    assert!(mandir.join("migrant.1").is_file());
    assert!(mandir.join("migrant-run.1").is_file());
    assert!(mandir.join("migrant-ssh-config.1").is_file());
}
