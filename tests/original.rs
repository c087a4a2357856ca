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
