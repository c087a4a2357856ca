//! The project folders in `examples/`, which people copy: each loads as a
//! Migrantfile, names a share, limits egress to a list of domains, and its
//! playbook passes `ansible-playbook --syntax-check`.

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
