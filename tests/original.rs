//! A project folder made for the original bash tool (bash-style
//! Migrantfile, cloud-init.yml, playbook.yml, hooks/) boots, provisions
//! and runs its hooks unchanged, apart from the image it names.

mod common;

use common::*;
use std::path::Path;

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("{e}"));
    for e in std::fs::read_dir(from).unwrap_or_else(|e| panic!("{e}")) {
        let e = e.unwrap_or_else(|e| panic!("{e}"));
        let dest = to.join(e.file_name());
        if e.path().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).unwrap_or_else(|err| panic!("{err}"));
        }
    }
}

#[test]
fn original_project_folder_boots_and_provisions() {
    let Some(image) = test_image() else { return };
    let env = Env::new("orig", &image, "");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/original/project");
    copy_tree(&fixture, &env.project);
    let mf = env.project.join("Migrantfile");
    let migrantfile = std::fs::read_to_string(&mf)
        .unwrap_or_else(|e| panic!("{e}"))
        .replace("__NAME__", &env.name)
        .replace("__IMAGE__", &image.display().to_string());
    std::fs::write(&mf, migrantfile).unwrap_or_else(|e| panic!("{e}"));
    // The hooks call `migrant` by name, as the original's do.
    let bindir = bin().parent().map(Path::to_path_buf).unwrap_or_default();
    let path = format!(
        "{}:{}",
        bindir.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let out = env
        .cmd(&["up"])
        .env("PATH", &path)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.status.success(), "up: {}", text(&out));
    assert_eq!(
        env.ok(&["ssh", "--", "cat", "/etc/migrant-provisioned"]),
        "provisioned by ansible\n"
    );
    env.ok(&[
        "ssh",
        "--",
        "test",
        "-f",
        "/home/migrant/workspace/from-runcmd",
    ]);
    assert_eq!(
        std::fs::read_to_string(env.project.join("post-up.out")).unwrap_or_default(),
        "provisioned by ansible\n[10.0.2.15] up\n"
    );
    let status: serde_json::Value =
        serde_json::from_str(&env.ok(&["status", "--json"])).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status["state"], "running");

    env.ok(&["destroy"]);
    env.assert_clean();
    assert_eq!(
        std::fs::read_to_string(env.project.join("post-down.log")).unwrap_or_default(),
        format!("{} stopped (trigger: destroy)\n", env.name)
    );
}

/// The original's key-path rules, without a VM: `pubkey` makes and shows
/// the Migrantfile's key (`SSH_KEY_PATH`); `MIGRANT_KEY_PATH` wins for one
/// invocation; a leading `~` in `MIGRANT_KEY_PATH` and `MIGRANT_DIR` is the
/// invoking user's home; without a Migrantfile the managed key is used.
#[test]
fn key_paths_follow_the_original() {
    let work = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let w = work.path();
    let home = w.join("home");
    let proj = home.join("proj");
    std::fs::create_dir_all(&proj).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(
        proj.join("Migrantfile"),
        format!(
            "VM_NAME=\"key-path-test\"\nSSH_KEY_PATH=\"{}\"\n",
            w.join("vm-key").display()
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let pubkey = |dir: &Path, env: &[(&str, String)]| {
        let out = std::process::Command::new(bin())
            .arg("pubkey")
            .current_dir(dir)
            .env("HOME", &home)
            .env_remove("SUDO_USER")
            .env_remove("MIGRANT_KEY_PATH")
            .env_remove("MIGRANT_DIR")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(out.status.success(), "pubkey {env:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let public = |p: &Path| {
        std::fs::read_to_string(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .trim()
            .to_string()
    };

    let out = pubkey(&proj, &[]);
    assert!(
        w.join("vm-key").is_file(),
        "SSH_KEY_PATH's key was not made"
    );
    assert_eq!(out, public(&w.join("vm-key.pub")));

    let out = pubkey(&proj, &[("MIGRANT_KEY_PATH", "~/env-key".into())]);
    assert!(
        home.join("env-key").is_file(),
        "MIGRANT_KEY_PATH's key was not made"
    );
    assert_eq!(out, public(&home.join("env-key.pub")));
    assert_ne!(out, public(&w.join("vm-key.pub")));

    // MIGRANT_DIR=~/proj, run from elsewhere: the project's key again.
    let out = pubkey(w, &[("MIGRANT_DIR", "~/proj".into())]);
    assert_eq!(out, public(&w.join("vm-key.pub")));

    // No Migrantfile: the managed key.
    let out = pubkey(w, &[]);
    assert_eq!(out, public(&home.join(".ssh/migrant.pub")));
}
