//! `migrant run` on a real guest under TCG: `run --rm` passes standard
//! input and output through, keeps migrant's own output off standard
//! output, returns CMD's exit code, fires the hooks with trigger `run`,
//! writes the run's egress report, and leaves no VM; Ctrl-C (SIGINT)
//! during `up` still removes the VM.

mod common;

use common::*;
use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

#[test]
fn run_rm_passes_io_and_exit_code_and_cleans_up() {
    let Some(image) = test_image() else { return };
    let env = Env::new("run", &image, "");
    let log = env.log_hooks();

    let report = env.root.path().join("egress-report.json");
    let report_arg = report.to_string_lossy().into_owned();
    let mut child = env
        .cmd(&[
            "run",
            "--rm",
            "--egress-report",
            &report_arg,
            "--",
            "sh",
            "-c",
            "getent hosts 192.168.77.50 >/dev/null; cat; echo to-stderr >&2; exit 3",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(b"hello from stdin\n")
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.status.code(), Some(3), "run --rm: {}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from stdin\n",
        "stdout must carry CMD's output only: {}",
        text(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("to-stderr"), "{stderr}");
    assert!(stderr.contains("==> "), "progress goes to stderr: {stderr}");
    assert!(stderr.contains("destroyed"), "{stderr}");
    assert!(!env.state_dir().exists(), "run --rm left the VM's state");
    // The run's journal outlived the VM, as a CI artifact: the reverse
    // name of a private address the command asked for, refused.
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&report).unwrap_or_else(|e| panic!("report: {e}: {stderr}")),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let entries = report["entries"].as_array().cloned().unwrap_or_default();
    assert!(
        entries
            .iter()
            .any(|e| e["name"] == "50.77.168.192.in-addr.arpa" && e["decision"] == "denied"),
        "{report}"
    );
    env.assert_clean();
    assert_eq!(
        std::fs::read_to_string(&log).unwrap_or_default(),
        "pre-up run\npost-up run\npre-down run\npost-down run\n"
    );

    // Ctrl-C while the VM boots: run stops, removes the VM, exits 130.
    let child = env
        .cmd(&["run", "--rm", "--", "sleep", "600"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        wait_for(Duration::from_secs(120), || env
            .pid_of("qemu-system")
            .is_some()),
        "run did not start QEMU"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        out.status.code(),
        Some(130),
        "interrupted run: {}",
        text(&out)
    );
    assert!(
        !env.state_dir().exists(),
        "interrupted run --rm left the VM"
    );
    env.assert_clean();
}

/// `run --snapshot`: refused (69, nothing made) without a snapshot; with
/// one, every run starts from it, and `--rm` throws the run's changes away
/// while keeping the VM and the snapshot for the next run.
#[test]
fn run_snapshot_starts_from_the_snapshot_every_time() {
    let Some(image) = test_image() else { return };
    let env = Env::new("runsnap", &image, "");

    let out = env.run(&["run", "--snapshot", "--", "true"]);
    assert_eq!(out.status.code(), Some(69), "no snapshot: {}", text(&out));
    assert!(
        text(&out).contains("no snapshot"),
        "the error says why: {}",
        text(&out)
    );
    assert!(!env.state_dir().exists(), "a refused run made a VM");

    env.ok(&["up"]);
    env.ok(&["ssh", "--", "echo base | sudo tee /var/tmp/base >/dev/null"]);
    env.ok(&["snapshot"]);
    // The VM runs when `run` starts: it is stopped and rebuilt first.
    env.ok(&["up"]);
    env.ok(&["ssh", "--", "sudo touch /var/tmp/after-snapshot"]);

    // Each run sees the snapshot's state, not the previous run's junk.
    let probe = "cat /var/tmp/base; for f in after-snapshot junk; do \
                 test -e /var/tmp/$f && echo leaked-$f; done; sudo touch /var/tmp/junk";
    for round in 1..=2 {
        let out = env.run(&["run", "--snapshot", "--rm", "--", probe]);
        assert_eq!(out.status.code(), Some(0), "round {round}: {}", text(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "base\n",
            "round {round}: {}",
            text(&out)
        );
        assert!(
            env.state_dir().join("snapshot.qcow2").is_file(),
            "round {round}: --rm --snapshot removed the snapshot"
        );
        let status = env.ok(&["status", "--json"]);
        let status: serde_json::Value =
            serde_json::from_str(&status).unwrap_or_else(|e| panic!("{e}: {status}"));
        assert_eq!(status["state"], "stopped", "round {round}: {status}");
    }

    env.ok(&["destroy"]);
    assert!(!env.state_dir().exists());
    env.assert_clean();
}
