//! Images, firmware and the disk lifecycle on real guests under TCG:
//!
//! * `image = "debian-12"` downloaded from a local mirror on 127.0.0.1
//!   (the test guest image and its SHA512SUMS), booted with BIOS; the
//!   image is kept while the VM uses it and pruned after;
//! * a UEFI boot; `resize` while running (`df` in the guest grows; a
//!   shrink is refused); a changed `memory` reported as pending;
//!   `snapshot` → change a file → `reset` → the change is gone;
//!   `destroy` removes the snapshot and the NVRAM.

mod common;

use common::http::{Behavior, Body, Server};
use common::*;
use std::path::Path;

fn root_size(env: &Env) -> u64 {
    let out = env.ok(&["ssh", "--", "df", "-B1", "--output=size", "/"]);
    out.lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("df said: {out}"))
}

#[test]
fn alias_download_boots_with_bios() {
    let Some(image) = test_image() else { return };
    let mut h = migrant::image::checksum::Algo::Sha512.hasher();
    let data = std::fs::read(&image).unwrap_or_else(|e| panic!("{e}"));
    h.update(&data);
    let digest = h.finish();
    drop(data);
    let server = Server::start();
    let dir = "/debian/bookworm/latest";
    server.add(
        &format!("{dir}/debian-12-genericcloud-amd64.qcow2"),
        Body::File(image.clone()),
        Behavior::Normal,
    );
    server.add_bytes(
        &format!("{dir}/SHA512SUMS"),
        format!("{}  debian-12-genericcloud-amd64.qcow2\n", digest.hex).into_bytes(),
        Behavior::Normal,
    );
    let env = Env::new("alias", Path::new("debian-12"), "");
    let out = env
        .cmd(&["up"])
        .env("MIGRANT_IMAGE_MIRROR", server.base())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.status.success(), "up: {}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("downloading http://127.0.0.1:"), "{stdout}");
    // BIOS: no EFI runtime in the guest.
    assert_eq!(
        env.run(&["ssh", "--", "test", "-d", "/sys/firmware/efi"])
            .status
            .code(),
        Some(1),
        "the BIOS guest booted through UEFI"
    );

    let images = env.root.path().join("state/images");
    let cached = format!("debian-12-genericcloud-amd64-{}.qcow2", digest.short());
    assert!(images.join(&cached).is_file());
    let storage = env.ok(&["storage"]);
    assert!(storage.contains(&cached), "{storage}");
    assert!(
        storage.contains(&format!("used by {}", env.name)),
        "{storage}"
    );
    assert!(
        storage.contains("disk.qcow2") && storage.contains("seed.img"),
        "{storage}"
    );
    // In use: neither rm nor prune removes it.
    let rm = env.run(&["image", "rm", "debian-12"]);
    assert_eq!(rm.status.code(), Some(64), "{}", text(&rm));
    assert!(text(&rm).contains("is used by"), "{}", text(&rm));
    env.ok(&["image", "prune"]);
    assert!(
        images.join(&cached).is_file(),
        "prune removed an image in use"
    );

    env.ok(&["destroy"]);
    env.assert_clean();
    env.ok(&["image", "prune"]);
    assert!(!images.join(&cached).exists(), "prune kept an unused image");
}

#[test]
fn uefi_resize_snapshot_reset() {
    let Some(image) = test_image() else { return };
    let env = Env::new("disk", &image, "firmware = \"uefi\"\n");
    let out = env.run(&["up"]);
    assert!(out.status.success(), "up: {}", text(&out));
    assert_eq!(
        env.run(&["ssh", "--", "test", "-d", "/sys/firmware/efi"])
            .status
            .code(),
        Some(0),
        "the UEFI guest has no EFI runtime"
    );
    let nvram = env.state_dir().join("nvram.fd");
    assert!(nvram.is_file(), "no per-VM NVRAM");

    // Live resize: 4G → 6G; the guest's root file system follows.
    let before = root_size(&env);
    let out = env.run(&["resize", "6G"]);
    assert!(out.status.success(), "resize: {}", text(&out));
    let after = root_size(&env);
    assert!(
        after >= before + (3 << 29),
        "df shows {before} → {after} bytes"
    );
    let out = env.run(&["resize", "5G"]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains("shrinking"), "{}", text(&out));

    // A changed memory setting is reported, not silently ignored.
    let mf = env.project.join("Migrantfile");
    let text_mf = std::fs::read_to_string(&mf).unwrap_or_default();
    std::fs::write(
        &mf,
        text_mf.replace("memory = \"1G\"", "memory = \"1280M\""),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let status = env.ok(&["status"]);
    assert!(
        status.contains("pending:") && status.contains("applies at the next boot"),
        "{status}"
    );
    assert!(status.contains("snapshot:    none"), "{status}");

    // Snapshot: clean shutdown, disk saved, VM down.
    env.ok(&[
        "ssh",
        "--",
        "echo",
        "snap",
        ">",
        "/home/migrant/state",
        "&&",
        "sync",
    ]);
    let out = env.run(&["snapshot"]);
    assert!(out.status.success(), "snapshot: {}", text(&out));
    assert!(env.state_dir().join("snapshot.qcow2").is_file());
    assert!(env.state_dir().join("snapshot-nvram.fd").is_file());
    let status: serde_json::Value =
        serde_json::from_str(&env.ok(&["status", "--json"])).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status["state"], "stopped");
    assert!(
        status["snapshot"]
            .as_str()
            .unwrap_or("")
            .starts_with("disk, saved"),
        "{status}"
    );
    env.assert_clean();

    // Change things after the snapshot.
    let out = env.run(&["up"]);
    assert!(out.status.success(), "up: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("applies at this boot"),
        "{}",
        text(&out)
    );
    assert_eq!(
        env.ok(&["ssh", "--", "cat", "/home/migrant/state"]).trim(),
        "snap"
    );
    env.ok(&[
        "ssh",
        "--",
        "echo",
        "changed",
        ">",
        "/home/migrant/state",
        "&&",
        "touch",
        "/home/migrant/new",
        "&&",
        "sync",
    ]);

    // Reset: back to the snapshot, booted again.
    let out = env.run(&["reset"]);
    assert!(out.status.success(), "reset: {}", text(&out));
    assert_eq!(
        env.ok(&["ssh", "--", "cat", "/home/migrant/state"]).trim(),
        "snap"
    );
    assert_eq!(
        env.run(&["ssh", "--", "test", "-e", "/home/migrant/new"])
            .status
            .code(),
        Some(1),
        "a file made after the snapshot survived the reset"
    );
    assert!(root_size(&env) >= after, "the reset lost the resize");

    // A reset of a stopped VM fires the down hooks too, told `reset`, as
    // the original tool does (its hook test checks exactly this).
    let log = env.log_hooks();
    env.ok(&["halt"]);
    let _ = std::fs::remove_file(&log);
    let out = env.run(&["reset"]);
    assert!(
        out.status.success(),
        "reset of a stopped VM: {}",
        text(&out)
    );
    assert_eq!(
        std::fs::read_to_string(&log).unwrap_or_default(),
        "pre-down reset\npost-down reset\npre-up reset\npost-up reset\n"
    );

    // A compromised QEMU rewrites its disk's header to name a root-only
    // host file as backing file: root's snapshot must not fold that file
    // into an image the guest boots from, nor resize it.
    env.ok(&["halt"]);
    let disk = env.state_dir().join("disk.qcow2");
    let snap = env.state_dir().join("snapshot.qcow2");
    let before = std::fs::read(&snap).unwrap_or_else(|e| panic!("{e}"));
    let disk_arg = disk.to_string_lossy().into_owned();
    let tamper = env.as_vm(&[
        "qemu-img",
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        "/etc/shadow",
        &disk_arg,
    ]);
    assert!(tamper.status.success(), "as QEMU's user: {}", text(&tamper));
    for args in [&["snapshot"][..], &["resize", "8G"][..], &["up"][..]] {
        let out = env.run(args);
        assert_eq!(out.status.code(), Some(65), "{args:?}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("/etc/shadow"),
            "{}",
            text(&out)
        );
    }
    assert!(
        std::fs::read(&snap).unwrap_or_else(|e| panic!("{e}")) == before,
        "the snapshot changed"
    );
    assert!(!env.state_dir().join(".snapshot.qcow2.tmp").exists());

    env.ok(&["destroy"]);
    assert!(!env.state_dir().exists(), "destroy left the VM's files");
    env.assert_clean();
}
