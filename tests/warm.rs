//! Warm start on a real guest under TCG: `snapshot --memory` saves a
//! running VM's memory with its disk; `run --snapshot`, `reset` and `up`
//! resume it instead of booting; each resume is a new guest (random
//! bytes differ, the clock is the host's even when the snapshot's is an
//! hour behind); `run --clone` runs throwaway clones at once, leaving
//! nothing and not touching the VM; a snapshot taken on another machine
//! (memory size) is refused unless `--cold`; shares are refused.

mod common;

use common::*;
use std::process::Stdio;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

const PROBE: &str =
    "cat /var/tmp/marker; date +%s; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo";

/// A machine's identity, as its first command sees it: the first 16
/// bytes it reads from /dev/urandom, machine-id, hostname, and the SSH
/// host key its sshd serves (not only the file).
const IDENTITY: &str = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; \
    cat /etc/machine-id; hostname; ssh-keyscan -t ed25519 127.0.0.1 2>/dev/null | cut -d' ' -f3";

/// (marker, guest clock, 32 random bytes) from [`PROBE`]'s output.
fn probe_output(out: &std::process::Output) -> (String, u64, String) {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "probe said: {}", text(out));
    let clock = lines[1]
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("guest clock {:?}: {e}", lines[1]));
    (lines[0].to_string(), clock, lines[2].to_string())
}

fn host_clock() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn mode_and_owner(path: &std::path::Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.mode() & 0o7777, m.uid())
}

#[test]
fn memory_snapshots_resume_clone_and_refuse_another_machine() {
    let Some(image) = test_image() else { return };
    let env = Env::new("warm", &image, "");
    env.ok(&["up"]);
    // What the snapshot must hold: a file, and a clock an hour behind the
    // host's (as a snapshot saved an hour ago would be).
    env.ok(&[
        "ssh",
        "--",
        "echo kept > /var/tmp/marker && sudo -n date -s '-1 hour' >/dev/null",
    ]);
    let saved = env.ok(&["snapshot", "--memory"]);
    assert!(saved.contains("memory snapshot saved"), "{saved}");
    assert!(saved.contains("runs on"), "{saved}");
    // It holds the guest's memory: the state's owner's alone (root, or
    // the user running migrant without root).
    let state = env.state_dir().join("snapshot.vmstate");
    assert_eq!(
        mode_and_owner(&state),
        (0o600, common::migrant_uid()),
        "{}",
        state.display()
    );
    let status = env.ok(&["status"]);
    assert!(status.contains("state:       running"), "{status}");
    assert!(status.contains("snapshot:    memory, saved"), "{status}");
    assert!(env.ok(&["storage"]).contains("snapshot memory"));

    // Two resumes: the saved file, the host's clock, new random bytes.
    let mut randoms = Vec::new();
    for _ in 0..2 {
        let t = Instant::now();
        let out = env.run(&["run", "--snapshot", "--", PROBE]);
        let host = host_clock();
        assert!(out.status.success(), "run --snapshot: {}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("resumed from its memory snapshot"),
            "not resumed: {stderr}"
        );
        let (marker, clock, random) = probe_output(&out);
        assert_eq!(marker, "kept");
        assert!(
            clock.abs_diff(host) <= 2,
            "guest clock {clock}, host {host}: not set after the resume"
        );
        eprintln!("warm run took {:?}", t.elapsed());
        randoms.push(random);
    }
    assert_ne!(
        randoms[0], randoms[1],
        "two resumes made the same random bytes"
    );
    assert!(
        env.ok(&["ssh", "--", "ls", "/sys/bus/acpi/devices/"])
            .contains("QEMUVGID"),
        "the guest sees no VM generation id device"
    );

    // The template's identity, which no clone may share or change.
    let template_id = env.ok(&["ssh", "--", IDENTITY]);

    // Three throwaway clones at once, while the VM runs; each returns its
    // command's exit code; the first bytes their first command reads from
    // /dev/urandom differ, and so do their machine-id, hostname and SSH
    // host key (each also differs from the template's).
    let snapshot_mtime = std::fs::metadata(env.state_dir().join("snapshot.qcow2"))
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{e}"));
    let pid_before = env.ok(&["status", "--json"]);
    let children: Vec<_> = (0..3)
        .map(|i| {
            env.cmd(&[
                "run",
                "--snapshot",
                "--rm",
                "--clone",
                "--",
                &format!("{IDENTITY}; {PROBE}; exit {}", 41 + i),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    let mut clone_randoms = Vec::new();
    let mut identities: Vec<Vec<String>> = vec![Vec::new(); 4];
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out.status.code(), Some(41 + i as i32), "{}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), 7, "clone said: {}", text(&out));
        for (k, line) in lines[..4].iter().enumerate() {
            identities[k].push(line.to_string());
        }
        assert_eq!(lines[4], "kept");
        clone_randoms.push(lines[6].to_string());
    }
    clone_randoms.sort();
    clone_randoms.dedup();
    assert_eq!(clone_randoms.len(), 3, "clones made the same random bytes");
    let template: Vec<&str> = template_id.lines().collect();
    assert_eq!(template.len(), 4, "{template_id}");
    for (k, what) in [
        "first random bytes",
        "machine-id",
        "hostname",
        "SSH host key",
    ]
    .iter()
    .enumerate()
    {
        let mut seen = identities[k].clone();
        assert!(
            seen.iter().all(|v| !v.is_empty() && v != template[k]),
            "a clone kept the template's {what}: {seen:?} vs {}",
            template[k]
        );
        seen.sort();
        seen.dedup();
        assert_eq!(
            seen.len(),
            3,
            "clones share their {what}: {:?}",
            identities[k]
        );
    }
    // The template is itself still.
    assert_eq!(
        env.ok(&["ssh", "--", IDENTITY])
            .lines()
            .skip(1)
            .collect::<Vec<_>>(),
        template[1..].to_vec(),
        "a clone changed the template"
    );
    // A kept clone's QEMU, if compromised, cannot open the template's
    // files by name: it was handed the snapshot and state as descriptors.
    let kept = format!("{}-kept", env.name);
    env.ok(&[
        "run",
        "--snapshot",
        "--clone",
        "--name",
        &kept,
        "--",
        "true",
    ]);
    let clone_ids = qemu_ids_in(&env.root.path().join("state/vms").join(&kept));
    assert_ne!(clone_ids.0, env.vm_id());
    for file in ["snapshot.qcow2", "snapshot.vmstate", "disk.qcow2"] {
        let path = env.state_dir().join(file);
        assert!(path.exists(), "{}", path.display());
        let path = path.to_string_lossy();
        let out = as_identity(clone_ids, &["head", "-c1", &path]);
        assert!(
            !out.status.success() && text(&out).contains("Permission denied"),
            "the clone's identity read {file}: {}",
            text(&out)
        );
    }
    // While the clone's disk overlays the template's snapshot, neither
    // the template nor its snapshot may go: refused, naming the clone,
    // the template running on.
    for args in [&["destroy"][..], &["snapshot", "--memory"], &["snapshot"]] {
        let out = env.run(args);
        assert_eq!(out.status.code(), Some(75), "{args:?}: {}", text(&out));
        assert!(
            text(&out).contains(&kept) && text(&out).contains("overlay its snapshot"),
            "{args:?}: {}",
            text(&out)
        );
    }
    assert!(env.ok(&["status"]).contains("state:       running"));
    env.ok(&["destroy", "--name", &kept]);
    // Nothing of the clones remains; the VM runs on, untouched.
    let vms = names_in(&env.root.path().join("state/vms"));
    assert_eq!(
        vms,
        std::slice::from_ref(&env.name),
        "clone state left behind"
    );
    let runs = names_in(&env.root.path().join("run"));
    assert_eq!(
        runs,
        std::slice::from_ref(&env.name),
        "clone runtime left behind"
    );
    assert!(
        env.processes().iter().all(|(_, c)| !c.contains("-clone-")),
        "clone processes left: {:?}",
        env.processes()
    );
    let pid_after = env.ok(&["status", "--json"]);
    let pid = |s: &str| {
        serde_json::from_str::<serde_json::Value>(s)
            .ok()
            .and_then(|v| v.get("qemu_pid").cloned())
    };
    assert_eq!(pid(&pid_before), pid(&pid_after), "the VM was restarted");
    assert!(pid(&pid_after).is_some_and(|p| !p.is_null()));
    assert_eq!(
        std::fs::metadata(env.state_dir().join("snapshot.qcow2"))
            .and_then(|m| m.modified())
            .ok(),
        Some(snapshot_mtime),
        "the snapshot was rewritten"
    );

    // Saved and stopped: `up` resumes it.
    let stopped = env.ok(&["snapshot", "--memory", "--stop"]);
    assert!(stopped.contains("stopped;"), "{stopped}");
    assert!(env.ok(&["status"]).contains("state:       stopped"));
    let up = env.ok(&["up"]);
    assert!(up.contains("resumed from its memory snapshot"), "{up}");
    env.ok(&["halt"]);

    // Another machine (more memory): refused, nothing started; --cold
    // boots the snapshot's disk, which holds what the guest wrote.
    let mf = env.project.join("Migrantfile");
    let text_mf = std::fs::read_to_string(&mf).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(
        &mf,
        text_mf.replace("memory = \"1G\"", "memory = \"1536M\""),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let refused = env.run(&["reset"]);
    assert_eq!(refused.status.code(), Some(78), "{}", text(&refused));
    assert!(
        text(&refused).contains("memory 1024 MiB then, 1536 MiB now")
            && text(&refused).contains("--cold"),
        "{}",
        text(&refused)
    );
    assert!(env.ok(&["status"]).contains("state:       stopped"));
    let cold = env.ok(&["reset", "--cold"]);
    assert!(!cold.contains("resumed from its memory snapshot"), "{cold}");
    assert!(cold.contains("booting the disk (--cold)"), "{cold}");
    assert_eq!(
        env.ok(&["ssh", "--", "cat", "/var/tmp/marker"]).trim(),
        "kept"
    );

    // A disk snapshot replaces the memory snapshot, state file and all.
    env.ok(&["snapshot"]);
    assert!(!state.exists(), "the memory state outlived its snapshot");
    assert!(env.ok(&["status"]).contains("snapshot:    disk, saved"));

    env.ok(&["destroy"]);
    assert!(!env.state_dir().exists());
    env.assert_clean();
}

#[test]
fn memory_snapshots_refuse_shares() {
    let Some(image) = test_image() else { return };
    let env = Env::new(
        "warmshare",
        &image,
        "[[share]]\nhost = \"work\"\nguest = \"/work\"\nsize = \"1G\"\n",
    );
    // Refused before anything runs: nothing was created.
    let out = env.run(&["snapshot", "--memory"]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(
        text(&out).contains("cannot hold shared folders") && text(&out).contains("\"work\""),
        "{}",
        text(&out)
    );
    assert!(!env.state_dir().exists());
    env.assert_clean();
}
