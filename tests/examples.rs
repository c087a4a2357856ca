//! The project folders in `examples/`, which people copy: each loads as a
//! Migrantfile, names a share, limits egress to a list of domains, and its
//! playbook passes `ansible-playbook --syntax-check`; the Debian 13 one
//! boots on the Debian 13 test guest with its offline-safe tasks.

mod common;

use common::share_io::{assert_mapped_and_sqlite, file_io};
use common::*;
use std::path::{Path, PathBuf};

fn examples() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("Migrantfile").is_file())
        .collect();
    v.sort();
    v
}

#[test]
fn every_example_loads_and_is_walled_in() {
    let all = examples();
    assert!(all.len() >= 2, "examples: {all:?}");
    for dir in &all {
        let cfg = migrant::config::load(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        assert!(
            !cfg.shares.is_empty(),
            "{}: no workspace share",
            dir.display()
        );
        assert!(
            !cfg.network.allow_domains.is_empty(),
            "{}: egress not limited",
            dir.display()
        );
        assert_eq!(cfg.ssh.user, "migrant", "{}", dir.display());
        let mf = std::fs::read_to_string(dir.join("Migrantfile")).unwrap_or_default();
        assert!(
            mf.contains("migrant run --rm"),
            "{}: no CI line",
            dir.display()
        );
        let playbook = std::fs::read_to_string(dir.join("playbook.yml")).unwrap_or_default();
        assert!(
            playbook.contains("YOUR AGENT"),
            "{}: the agent's step is not marked",
            dir.display()
        );
        for tool in ["git", "build-essential", "nodejs", "python3", "uv"] {
            assert!(playbook.contains(tool), "{}: no {tool}", dir.display());
        }
    }
}

#[test]
fn every_example_playbook_passes_the_syntax_check() {
    let required = std::env::var_os("MIGRANT_REQUIRE_INTEGRATION").is_some();
    let found = std::process::Command::new("ansible-playbook")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(!required, "ansible-playbook is missing; run scripts/setup");
        eprintln!("SKIPPED: ansible-playbook is not installed (scripts/setup installs it)");
        return;
    }
    for dir in examples() {
        let out = std::process::Command::new("ansible-playbook")
            .args(["--syntax-check", "-i", "localhost,", "playbook.yml"])
            .current_dir(&dir)
            .env("ANSIBLE_NOCOLOR", "1")
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            out.status.success(),
            "{}: {}{}",
            dir.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `examples/debian-13-agent` as a user copies it, on the Debian 13 test
/// guest (its image line pointed at it, offline): it boots, its hook
/// runs, its workspace share is mounted, and its playbook's tasks tagged
/// `offline` provision the guest. Debian 13's kernel offers
/// FUSE_DIRECT_IO_ALLOW_MMAP: the workspace serves file data with direct
/// I/O (nothing lands in the guest's page cache, the copy that makes reads
/// slow under TCG), and shared writable mappings and SQLite's WAL still
/// work.
#[test]
fn the_debian_13_example_boots_with_its_offline_tasks() {
    let Some(image) = test_image_13() else { return };
    let env = Env::new("example", &image, "");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/debian-13-agent");
    let mf = std::fs::read_to_string(example.join("Migrantfile")).unwrap_or_else(|e| panic!("{e}"));
    let mf = mf
        .replace(
            "name = \"agent-debian\"",
            &format!("name = \"{}\"", env.name),
        )
        .replace(
            "image = \"debian-13\"",
            &format!("image = \"{}\"", image.display()),
        );
    assert!(mf.contains(&env.name) && mf.contains(&image.display().to_string()));
    std::fs::write(env.project.join("Migrantfile"), mf).unwrap_or_else(|e| panic!("{e}"));
    std::fs::copy(
        example.join("cloud-init.yml"),
        env.project.join("cloud-init.yml"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    std::fs::create_dir(env.project.join("hooks")).unwrap_or_else(|e| panic!("{e}"));
    for hook in std::fs::read_dir(example.join("hooks")).unwrap_or_else(|e| panic!("{e}")) {
        let hook = hook.unwrap_or_else(|e| panic!("{e}")).path();
        let name = hook.file_name().unwrap_or_default();
        std::fs::copy(&hook, env.project.join("hooks").join(name))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    // The playbook's online tasks need the internet: up without it, then
    // its offline-safe part, as `migrant provision` runs it.
    let up = env.ok(&["up"]);
    assert!(
        up.contains("is up at 10.0.2.15 (trigger: up)"),
        "post-up hook: {up}"
    );
    std::fs::copy(
        example.join("playbook.yml"),
        env.project.join("playbook.yml"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    env.ok(&["provision", "--", "--tags", "offline"]);
    assert_eq!(
        env.ok(&["ssh", "--", "stat", "-c", "%U", "/home/migrant/.local/bin"])
            .trim(),
        "migrant"
    );
    assert_eq!(
        env.ok(&[
            "ssh",
            "--",
            "test -f /etc/profile.d/local-bin.sh && echo yes"
        ])
        .trim(),
        "yes"
    );
    assert_eq!(
        env.ok(&[
            "ssh",
            "--",
            "findmnt",
            "-no",
            "FSTYPE",
            "/home/migrant/workspace"
        ])
        .trim(),
        "virtiofs"
    );
    let io = file_io(&env, "/home/migrant/workspace");
    assert!(io.cache_growth_kib < 16 * 1024, "page cache used: {io:?}");
    env.ok(&["halt"]);
    assert_mapped_and_sqlite(&env.project.join("workspace"), &io);
    env.ok(&["destroy"]);
    env.assert_clean();
}
