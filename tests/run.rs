//! `migrant run` on a real guest under TCG: `run --rm` passes standard
//! input and output through, keeps migrant's own output off standard
//! output, returns CMD's exit code, fires the hooks with trigger `run`,
//! and leaves no VM; Ctrl-C (SIGINT) during `up` still removes the VM.

mod common;

use common::*;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::Duration;

#[test]
fn run_rm_passes_io_and_exit_code_and_cleans_up() {
    let Some(image) = test_image() else { return };
    let env = Env::new("run", &image, "");
    let log = env.root.path().join("hooks.log");
    let hooks = env.project.join("hooks");
    std::fs::create_dir(&hooks).unwrap_or_else(|e| panic!("{e}"));
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

    let mut child = env
        .cmd(&[
            "run",
            "--rm",
            "--",
            "sh",
            "-c",
            "cat; echo to-stderr >&2; exit 3",
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
