//! The foundation's end-to-end path on a real guest under TCG:
//! up → ssh → status → write a file → halt → up again (file still there,
//! a concurrent up refused with 75) → kill -9 of the supervisor (QEMU gone
//! within 2 s) → up works again → destroy leaves nothing.

mod common;

use common::*;
use std::time::Duration;

#[test]
fn up_ssh_halt_up_kill_destroy() {
    let Some(image) = test_image() else { return };
    let env = Env::new("life", &image, "");

    // First boot: waits for cloud-init's first run.
    let out = env.run(&["up"]);
    assert!(out.status.success(), "up: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("waiting for cloud-init"),
        "{}",
        text(&out)
    );
    assert_eq!(env.run(&["ssh", "--", "true"]).status.code(), Some(0));
    // migrant's vendor-data: ed25519 host keys only (the RSA key costs
    // seconds of a TCG boot); the user's cloud-init.yml could say otherwise.
    assert_eq!(
        env.ok(&["ssh", "--", "ls", "/etc/ssh/ | grep 'host_.*_key$'"])
            .trim(),
        "ssh_host_ed25519_key"
    );
    assert_eq!(
        env.run(&["ssh", "--", "exit", "7"]).status.code(),
        Some(7),
        "ssh passes the guest's exit code through"
    );

    let status: serde_json::Value =
        serde_json::from_str(&env.ok(&["status", "--json"])).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status["state"], "running");
    assert_eq!(status["ip"], "10.0.2.15");
    assert_eq!(env.ok(&["ip"]).trim(), "10.0.2.15");
    let guest_ip = env.ok(&[
        "ssh", "--", "ip", "-4", "-o", "addr", "show", "scope", "global",
    ]);
    assert!(
        guest_ip.contains("10.0.2.15/24"),
        "guest address: {guest_ip}"
    );

    let info = env.ok(&["info"]);
    assert!(
        info.contains(&format!("qemu user:      vm-{}", env.vm_id())),
        "info: {info}"
    );
    assert!(info.contains("accelerator:    tcg"), "info: {info}");
    assert!(info.contains("cpus:           2"), "info: {info}");
    assert!(info.contains("memory:         1024 MiB"), "info: {info}");
    let qemu = env
        .pid_of("qemu-system")
        .unwrap_or_else(|| panic!("no QEMU running"));
    let uid = std::fs::read_to_string(format!("/proc/{qemu}/status")).unwrap_or_default();
    assert!(
        !uid.lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")),
        "QEMU runs as root: {uid}"
    );

    env.ok(&[
        "ssh",
        "--",
        "echo",
        "kept",
        ">",
        "/home/migrant/marker",
        "&&",
        "sync",
    ]);

    // Halt: ACPI power-down; everything of the running VM goes.
    let ns = netns_of(qemu).unwrap_or_else(|| panic!("QEMU has no netns"));
    env.ok(&["halt"]);
    let status: serde_json::Value =
        serde_json::from_str(&env.ok(&["status", "--json"])).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status["state"], "stopped");
    env.assert_clean();
    assert!(!netns_in_use(&ns), "the VM's namespace outlived halt");

    // Second boot, with a concurrent `up` that must be refused (75).
    let first = env
        .cmd(&["up"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        wait_for(Duration::from_secs(30), || env
            .pid_of("__supervisor")
            .is_some()),
        "second up did not start a supervisor"
    );
    let second = env.run(&["up"]);
    assert_eq!(
        second.status.code(),
        Some(75),
        "concurrent up: {}",
        text(&second)
    );
    assert!(String::from_utf8_lossy(&second.stderr).contains("busy"));
    let first = first.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    assert!(first.status.success(), "up after halt: {}", text(&first));
    // cloud-init ran at the first boot: a later one neither waits nor
    // warns (as the original, whose playbooks disable cloud-init).
    assert!(
        !text(&first).contains("cloud-init"),
        "the second boot waited for cloud-init: {}",
        text(&first)
    );
    assert_eq!(
        env.ok(&["ssh", "--", "cat", "/home/migrant/marker"]).trim(),
        "kept"
    );

    // kill -9 of the supervisor: QEMU follows within 2 s.
    let sup = env
        .pid_of("__supervisor")
        .unwrap_or_else(|| panic!("no supervisor"));
    let qemu = env
        .pid_of("qemu-system")
        .unwrap_or_else(|| panic!("no QEMU"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sup as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        wait_for(Duration::from_secs(2), || !std::path::Path::new(&format!(
            "/proc/{qemu}"
        ))
        .exists()
            || std::fs::read_to_string(format!("/proc/{qemu}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true)),
        "QEMU survived its supervisor by more than 2 s"
    );
    // The next command repairs the stale state; the next up works.
    let status: serde_json::Value =
        serde_json::from_str(&env.ok(&["status", "--json"])).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status["state"], "stopped");
    env.ok(&["up"]);
    assert_eq!(
        env.ok(&["ssh", "--", "cat", "/home/migrant/marker"]).trim(),
        "kept"
    );

    env.ok(&["destroy"]);
    env.assert_clean();
    assert!(!env.state_dir().exists(), "state left after destroy");
    assert!(
        env.project.join("Migrantfile").exists(),
        "destroy touched the project folder"
    );
    let status: serde_json::Value =
        serde_json::from_str(&env.ok(&["status", "--json"])).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status["state"], "not created");
}

/// Two VMs at once (the second a clone of the first, resumed from its
/// memory snapshot: a VM of its own, with its own disk, seed, folders and
/// identity): each QEMU runs as its own uid, so a compromised QEMU of one
/// cannot read the other's disk or seed, signal it or read its memory
/// (what ptrace needs); it can still use its own files.
#[test]
fn each_vm_has_its_own_identity() {
    let Some(image) = test_image() else { return };
    let a = Env::new("ida", &image, "");
    a.ok(&["up"]);
    a.ok(&["snapshot", "--memory"]);
    let b_name = format!("idb-{}", std::process::id());
    a.ok(&[
        "run",
        "--snapshot",
        "--clone",
        "--name",
        &b_name,
        "--",
        "true",
    ]);
    let b_state = a.root.path().join("state").join("vms").join(&b_name);
    let (ids_a, ids_b) = (qemu_ids_in(&a.state_dir()), qemu_ids_in(&b_state));
    let (ida, idb) = (ids_a.0, ids_b.0);
    assert_ne!(ida, idb);
    for (state, id) in [(a.state_dir(), ida), (b_state.clone(), idb)] {
        let qemu = qemu_pid_in(&state);
        let status = std::fs::read_to_string(format!("/proc/{qemu}/status")).unwrap_or_default();
        let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap_or("");
        assert!(
            uid_line
                .split_whitespace()
                .skip(1)
                .all(|u| u == id.to_string()),
            "QEMU runs as {uid_line}, not {id}"
        );
    }
    let own_disk = a
        .state_dir()
        .join("disk.qcow2")
        .to_string_lossy()
        .into_owned();
    let out = as_identity(ids_a, &["head", "-c", "4", &own_disk]);
    assert!(
        out.status.success() && out.stdout == b"QFI\xfb",
        "{}",
        text(&out)
    );
    let b_qemu = qemu_pid_in(&b_state);
    for target in [
        b_state.join("disk.qcow2"),
        b_state.join("seed.img"),
        std::path::PathBuf::from(format!("/proc/{b_qemu}/environ")),
    ] {
        let t = target.to_string_lossy().into_owned();
        let out = as_identity(ids_a, &["head", "-c", "1", &t]);
        assert!(!out.status.success(), "A's QEMU user read {t}");
    }
    // Nor B A's (its template's) files.
    let a_qemu = qemu_pid_in(&a.state_dir());
    for target in [
        a.state_dir().join("disk.qcow2"),
        a.state_dir().join("snapshot.vmstate"),
        std::path::PathBuf::from(format!("/proc/{a_qemu}/environ")),
    ] {
        let t = target.to_string_lossy().into_owned();
        let out = as_identity(ids_b, &["head", "-c", "1", &t]);
        assert!(!out.status.success(), "B's QEMU user read {t}");
    }
    let out = as_identity(ids_a, &["kill", "-0", &b_qemu.to_string()]);
    assert!(!out.status.success(), "A's QEMU user may signal B's QEMU");
    // The logs hold what the guest did and said: neither another VM nor
    // an ordinary local user reads them (who may reach the folder).
    std::fs::set_permissions(
        a.root.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // (A resumed clone has said nothing on its console yet: its template's
    // console log, from the boot, stands for it, read as the clone.)
    for (path, reader) in [
        (b_state.join("supervisor.log"), ids_a),
        (b_state.join("qemu.log"), ids_a),
        (a.state_dir().join("serial.log"), ids_b),
        (a.state_dir().join("supervisor.log"), ids_b),
    ] {
        let log = path.display();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path)
                .unwrap_or_else(|e| panic!("{log}: {e}"))
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "{log} is {mode:o}");
        let t = path.to_string_lossy().into_owned();
        let out = as_identity(reader, &["head", "-c", "1", &t]);
        assert!(!out.status.success(), "the other VM's QEMU user read {log}");
        let out = std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "head",
                "-c",
                "1",
                &t,
            ])
            .output()
            .unwrap_or_else(|e| panic!("setpriv: {e}"));
        assert!(!out.status.success(), "an ordinary user read {log}");
    }
    // Nothing under the state and runtime folders is readable or listable
    // by an ordinary local user (root made these VMs, so no owner either).
    let mut paths = Vec::new();
    let mut todo = vec![a.root.path().join("state"), a.root.path().join("run")];
    while let Some(p) = todo.pop() {
        if let Ok(rd) = std::fs::read_dir(&p) {
            todo.extend(rd.flatten().map(|e| e.path()));
        }
        paths.push(p.to_string_lossy().into_owned());
    }
    assert!(paths.len() > 10, "walked too little: {paths:?}");
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65533", "--regid=65533", "--clear-groups", "sh", "-c"])
        .arg(
            "for f; do if [ -d \"$f\" ]; then ls \"$f\" >/dev/null 2>&1 && echo \"listed $f\"; \
             elif [ -f \"$f\" ]; then head -c1 \"$f\" >/dev/null 2>&1 && echo \"read $f\"; fi; done; true",
        )
        .arg("sh")
        .args(&paths)
        .output()
        .unwrap_or_else(|e| panic!("setpriv: {e}"));
    assert!(
        out.status.success() && out.stdout.is_empty(),
        "an ordinary user got at: {}",
        text(&out)
    );
    a.ok(&["destroy", "--name", &b_name]);
    a.ok(&["destroy"]);
    a.assert_clean();
    assert!(!b_state.exists(), "the clone's folder outlived destroy");
}

/// An `up` killed while the guest boots (Ctrl-C, a CI job's timeout) does
/// not leave the VM booting forever: the supervisor stops it at its own
/// deadline (`--timeout` plus a grace), keeps the disk, and `status` says
/// why. The guest here never answers SSH (its sshd is masked at boot).
#[test]
fn a_killed_up_leaves_no_vm_booting() {
    let Some(image) = test_image() else { return };
    let env = Env::new("orphan", &image, "");
    std::fs::write(
        env.project.join("cloud-init.yml"),
        "#cloud-config\nbootcmd:\n  - systemctl mask --now ssh.service ssh.socket\nusers:\n  - name: migrant\n    ssh_authorized_keys:\n      - __MIGRANT_PUBKEY__\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut up = env
        .cmd(&["up", "--timeout", "20"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        wait_for(Duration::from_secs(120), || env
            .pid_of("qemu-system")
            .is_some()),
        "QEMU did not start"
    );
    let _ = up.kill();
    let _ = up.wait();
    // 20 s + the 10 s grace from the supervisor's start, and then some.
    assert!(
        wait_for(Duration::from_secs(90), || env
            .pid_of("qemu-system")
            .is_none()),
        "the VM kept booting after its up was killed"
    );
    assert!(
        wait_for(Duration::from_secs(30), || env
            .pid_of("__supervisor")
            .is_none()),
        "the supervisor stayed"
    );
    let status = env.ok(&["status"]);
    assert!(status.contains("state:       stopped"), "{status}");
    assert!(
        status.contains("did not answer SSH within 30 s"),
        "status does not say why: {status}"
    );
    assert!(
        env.state_dir().join("disk.qcow2").is_file(),
        "the disk was not kept"
    );

    // Its Migrantfile breaks: `list` marks the VM, and `destroy --name`
    // removes it from anywhere (no hand-made Migrantfile needed).
    std::fs::write(
        env.project.join("Migrantfile"),
        "this is not a Migrantfile\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let list = env.ok(&["list"]);
    assert!(
        list.contains("Migrantfile does not load") && list.contains("destroy --name"),
        "{list}"
    );
    let out = env
        .cmd(&["destroy", "--name", &env.name])
        .current_dir("/")
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.status.success(), "destroy --name: {}", text(&out));
    assert!(
        !env.state_dir().exists(),
        "destroy --name left the VM's folder"
    );
    let out = env.run(&["destroy", "--name", "../escape"]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    env.assert_clean();
}

/// Debian 13 (trixie), Debian's stable release, boots and lives through
/// the same lifecycle: first boot waits for cloud-init, a later one does
/// not, files survive a halt, and a memory snapshot resumes. Run by root
/// for root's own VM (whoever runs the rest of the suite): the same
/// user-namespace path, QEMU as one of root's subordinate ids.
#[test]
fn debian_13_lifecycle() {
    let Some(image) = test_image_13() else { return };
    let env = Env::new_for_root("trixie", &image, "");
    let out = env.run(&["up"]);
    assert!(out.status.success(), "up: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("waiting for cloud-init"),
        "{}",
        text(&out)
    );
    assert_eq!(
        env.ok(&["ssh", "--", ". /etc/os-release && echo $VERSION_ID"])
            .trim(),
        "13"
    );
    env.ok(&["ssh", "--", "echo kept > /var/tmp/marker"]);
    env.ok(&["halt"]);
    let again = env.ok(&["up"]);
    assert!(!again.contains("waiting for cloud-init"), "{again}");
    assert_eq!(
        env.ok(&["ssh", "--", "cat", "/var/tmp/marker"]).trim(),
        "kept"
    );
    // Root's VM is walled in like anyone's: its QEMU is not root, holds
    // no capability, and runs as an id of root's subordinate range.
    let (uid, _) = env.vm_ids();
    let (start, count) = subordinate_range("/etc/subuid", "root", 0);
    assert!(
        uid >= start && uid - start < count,
        "root's QEMU runs as {uid}, outside {start}+{count}"
    );
    let qemu = env
        .pid_of("qemu-system")
        .unwrap_or_else(|| panic!("no QEMU"));
    let status = std::fs::read_to_string(format!("/proc/{qemu}/status")).unwrap_or_default();
    assert!(
        status.lines().any(|l| l == "CapEff:\t0000000000000000"),
        "root's QEMU holds capabilities: {status}"
    );
    env.ok(&["snapshot", "--memory"]);
    let out = env.run(&["run", "--snapshot", "--", "cat", "/var/tmp/marker"]);
    assert!(out.status.success(), "run --snapshot: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("resumed from its memory snapshot"),
        "{}",
        text(&out)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "kept");
    env.ok(&["destroy"]);
    env.assert_clean();
}
