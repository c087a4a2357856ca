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
            .env_remove("SUDO_UID")
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

/// A copy of the convert fixture `name` in a fresh folder, with a home.
fn convert_fixture(name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let work = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let from = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/convert")
        .join(name);
    let dir = work.path().join(name);
    copy_tree(&from, &dir);
    std::fs::create_dir_all(work.path().join("home")).unwrap_or_else(|e| panic!("{e}"));
    (work, dir)
}

fn convert(dir: &Path, args: &[&str]) -> std::process::Output {
    let home = dir.parent().map(|p| p.join("home")).unwrap_or_default();
    std::process::Command::new(bin())
        .arg("convert")
        .args(args)
        .current_dir(dir)
        .env("HOME", home)
        .env_remove("SUDO_USER")
        .env_remove("SUDO_UID")
        .output()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{e}"))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// `migrant convert` on a folder like the original's examples: every
/// setting and every comment carried over; `--write` keeps the original.
#[test]
fn convert_carries_settings_and_comments_over() {
    let (_work, dir) = convert_fixture("agent");
    let original =
        std::fs::read_to_string(dir.join("Migrantfile")).unwrap_or_else(|e| panic!("{e}"));
    let before = listing(&dir);
    let out = convert(&dir, &[]);
    assert!(out.status.success(), "convert: {}", text(&out));
    let toml_text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(listing(&dir), before, "printing wrote something");
    // Every comment of the original, whole-line or after a value.
    for line in original.lines() {
        if let Some(i) = line.find('#') {
            let comment = line[i..].trim();
            assert!(
                toml_text.contains(comment),
                "lost {comment:?}:\n{toml_text}"
            );
        }
    }
    let v: toml::Value = toml::from_str(&toml_text).unwrap_or_else(|e| panic!("{e}\n{toml_text}"));
    assert_eq!(v["name"].as_str(), Some("agent-box"));
    assert_eq!(v["memory"].as_str(), Some("3G"));
    assert_eq!(v["cpus"].as_integer(), Some(2));
    assert_eq!(v["disk"].as_str(), Some("24G"));
    assert_eq!(v["firmware"].as_str(), Some("uefi"));
    assert_eq!(v["autoconnect"].as_str(), Some("ssh"));
    assert_eq!(v["wait_cloud_init"].as_bool(), Some(false));
    assert_eq!(v["tunnel_ports"].as_array().map(Vec::len), Some(2));
    let shares = v["share"]
        .as_array()
        .unwrap_or_else(|| panic!("no shares:\n{toml_text}"));
    assert_eq!(shares[0]["size"].as_str(), Some("12G"));
    // SHARED_FOLDER_SIZE_GB folded into the share that gave no size.
    assert_eq!(shares[1]["size"].as_str(), Some("4G"));
    assert_eq!(v["network"]["rules"].as_array().map(Vec::len), Some(2));
    // NETWORK_IPV6=nat: IPv6 egress.
    assert_eq!(v["network"]["ipv6"].as_bool(), Some(true));
    assert_eq!(v["ssh"]["key"].as_str(), Some("~/.ssh/agent_key"));
    assert!(toml_text.contains("# OS_VARIANT: not used"), "{toml_text}");
    assert!(
        toml_text.contains("# NETWORKS (network=migrant): not carried over"),
        "{toml_text}"
    );

    // --write: the original kept byte for byte, the TOML in its place.
    let out = convert(&dir, &["--write"]);
    assert!(out.status.success(), "convert --write: {}", text(&out));
    assert_eq!(
        std::fs::read_to_string(dir.join("Migrantfile.orig")).unwrap_or_default(),
        original
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("Migrantfile")).unwrap_or_default(),
        toml_text
    );
    // Now TOML: nothing to convert (78), nothing touched.
    let out = convert(&dir, &["--write"]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    // An existing Migrantfile.orig is never overwritten.
    std::fs::write(dir.join("Migrantfile"), &original).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.join("Migrantfile.orig"), "keep me\n").unwrap_or_else(|e| panic!("{e}"));
    let out = convert(&dir, &["--write"]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert_eq!(
        std::fs::read_to_string(dir.join("Migrantfile.orig")).unwrap_or_default(),
        "keep me\n"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("Migrantfile")).unwrap_or_default(),
        original
    );
}

/// What cannot be data (the original's `lan-host` and NixOS files run
/// commands) stops the conversion at its line, says what to write
/// instead, and writes nothing; the same files with the values written
/// out convert.
#[test]
fn convert_refuses_what_is_not_data() {
    for (name, line, instead) in [
        ("lan-host", 11, "write the address itself"),
        ("nixos", 7, "write the path itself"),
    ] {
        let (_work, dir) = convert_fixture(name);
        let before = listing(&dir);
        let out = convert(&dir, &["--write"]);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(78), "{name}: {t}");
        assert!(t.contains(&format!("Migrantfile:{line}:")), "{name}: {t}");
        assert!(t.contains(instead), "{name}: {t}");
        assert_eq!(listing(&dir), before, "{name}: something was written");
    }
    let (_work, dir) = convert_fixture("multi-rule");
    let out = convert(&dir, &[]);
    assert!(out.status.success(), "multi-rule: {}", text(&out));
    let t = String::from_utf8_lossy(&out.stdout);
    assert!(
        t.contains("\"allow-host-port tcp/9999\"") && t.contains("\"allow-lan-host 192.168.77.1\""),
        "{t}"
    );
    // The NixOS file with its path written out converts too.
    let (_work, dir) = convert_fixture("nixos");
    let mf = dir.join("Migrantfile");
    let fixed = std::fs::read_to_string(&mf).unwrap_or_default().replace(
        "\"file://$(realpath \"$VM_DIR/result/nixos-base.qcow2\")\"",
        "\"file://$VM_DIR/result/nixos-base.qcow2\"",
    );
    std::fs::write(&mf, fixed).unwrap_or_else(|e| panic!("{e}"));
    let out = convert(&dir, &[]);
    assert!(out.status.success(), "nixos: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("image = \"file://result/nixos-base.qcow2\""),
        "{}",
        text(&out)
    );
}
