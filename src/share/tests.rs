use super::*;

fn project(extra: &str) -> (tempfile::TempDir, Config) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(
        dir.path().join("Migrantfile"),
        format!("image = \"debian.qcow2\"\n{extra}"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let cfg = crate::config::load(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    (dir, cfg)
}

#[test]
fn the_store_sits_beside_the_folder() {
    assert_eq!(
        image_path(Path::new("/p/workspace")),
        PathBuf::from("/p/workspace.img")
    );
    assert_eq!(
        image_path(Path::new("/p/data/claude")),
        PathBuf::from("/p/data/claude.img")
    );
}

#[test]
fn hooks_and_the_project_folder_are_refused() {
    for host in ["hooks", "hooks/sub", "."] {
        let extra = format!("[[share]]\nhost = \"{host}\"\ntag = \"t\"\n");
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(
            dir.path().join("Migrantfile"),
            format!("image = \"debian.qcow2\"\n{extra}"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        // The config reader refuses the project folder itself; the share
        // rules refuse the rest.
        match crate::config::load(dir.path()) {
            Ok(cfg) => {
                let err = check_paths(&cfg).err();
                assert!(
                    matches!(err, Some(ShareError::Forbidden { .. })),
                    "{host}: {err:?}"
                );
                assert_eq!(err.map(|e| e.exit_code()), Some(exit::CONFIG));
            }
            Err(e) => assert_eq!(e.exit_code(), exit::CONFIG, "{host}: {e}"),
        }
    }
    // A folder that contains hooks/: the parent of the project is refused
    // by the reader, a sibling folder is fine.
    let (_d, cfg) = project("[[share]]\nhost = \"hooksish\"\n");
    assert!(check_paths(&cfg).is_ok());
}

#[test]
fn a_share_containing_hooks_is_refused() {
    // hooks/ reached through a symlink inside the share folder is not the
    // case here; the share folder itself is a parent of hooks/ when the
    // hooks folder is a symlink into it.
    let (d, _) = project("");
    let ws = d.path().join("ws");
    std::fs::create_dir_all(ws.join("h")).unwrap_or_else(|e| panic!("{e}"));
    std::os::unix::fs::symlink(ws.join("h"), d.path().join("hooks"))
        .unwrap_or_else(|e| panic!("{e}"));
    let (_, cfg) = {
        std::fs::write(
            d.path().join("Migrantfile"),
            "image = \"debian.qcow2\"\n[[share]]\nhost = \"ws\"\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        (
            (),
            crate::config::load(d.path()).unwrap_or_else(|e| panic!("{e}")),
        )
    };
    assert!(matches!(
        check_paths(&cfg),
        Err(ShareError::Forbidden { .. })
    ));
}

#[test]
fn drift_names_the_entry_and_both_paths() {
    let (_d, cfg) = project("[[share]]\nhost = \"ws\"\n");
    let mut rec: Vec<RecordedShare> = cfg.shares.iter().map(RecordedShare::of).collect();
    assert!(check_drift(&cfg, &rec).is_ok());
    rec[0].host = PathBuf::from("/old/place/ws");
    let e = check_drift(&cfg, &rec)
        .err()
        .unwrap_or_else(|| panic!("no drift"));
    let text = e.to_string();
    assert!(text.contains("\"ws\""), "{text}");
    assert!(text.contains("/old/place/ws"), "{text}");
    assert!(
        text.contains(&cfg.shares[0].host.display().to_string()),
        "{text}"
    );
    assert_eq!(e.exit_code(), exit::CONFIG);
}

#[test]
fn added_removed_or_changed_shares_need_a_rebuild() {
    let (_d, cfg) = project("[[share]]\nhost = \"ws\"\n[[share]]\nhost = \"b\"\n");
    let rec: Vec<RecordedShare> = cfg.shares.iter().map(RecordedShare::of).collect();
    assert!(matches!(
        check_drift(&cfg, &rec[..1]),
        Err(ShareError::Changed { .. })
    ));
    let mut more = rec.clone();
    more.push(RecordedShare {
        tag: "gone".into(),
        host: "/x/gone".into(),
        cap: None,
        guest: None,
    });
    assert!(matches!(
        check_drift(&cfg, &more),
        Err(ShareError::Changed { .. })
    ));
    let mut iso = rec.clone();
    iso[0].cap = None;
    assert!(matches!(
        check_drift(&cfg, &iso),
        Err(ShareError::Changed { .. })
    ));
}

#[test]
fn recorded_shares_round_trip() {
    let (d, cfg) = project("[[share]]\nhost = \"ws\"\nguest = \"/work\"\n");
    let vm = VmPaths {
        name: "t".into(),
        state: d.path().join("state"),
        run: d.path().join("run"),
    };
    std::fs::create_dir_all(&vm.state).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(load_recorded(&vm).ok().flatten(), None);
    save_recorded(&vm, &cfg).unwrap_or_else(|e| panic!("{e}"));
    let rec = load_recorded(&vm)
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("no record"));
    assert_eq!(rec.len(), 1);
    assert_eq!(rec[0].cap, Some(cfg.shares[0].size));
    assert_eq!(rec[0].guest.as_deref(), Some("/work"));
    std::fs::write(record_file(&vm), b"{").unwrap_or_else(|e| panic!("{e}"));
    assert!(load_recorded(&vm).is_err());
}

#[test]
fn seed_mounts_are_a_second_mime_part() {
    let (_d, cfg) = project(
        "[[share]]\nhost = \"ws\"\nguest = \"/home/migrant/ws\"\n[[share]]\nhost = \"nomount\"\n",
    );
    let user = "#cloud-config\nbootcmd:\n  - echo hi\n";
    let (out, warning) = seed::user_data_with_mounts(user, &cfg.shares);
    assert!(warning.is_none());
    assert!(out.starts_with("Content-Type: multipart/mixed; boundary="));
    assert!(out.contains(user));
    assert!(out.contains("Content-Type: text/cloud-config"));
    assert!(out.contains("'/home/migrant/ws', 'ws']"), "{out}");
    assert!(!out.contains("nomount"), "{out}");
    assert!(out.contains("settings: [append]"));
    assert!(out.trim_end().ends_with("--"));
    // Folders made above a mount point in a home go to its user once the
    // users exist; the scripts are valid sh.
    assert!(out.contains("runcmd:\n  - [sh, -c, '"), "{out}");
    assert!(out.contains("chown"), "{out}");
    assert!(
        out.contains("migrant-share, /run/migrant-share-dirs]"),
        "{out}"
    );
    let part = seed::mounts_part(&cfg.shares).unwrap_or_default();
    let docs = yaml_rust2::YamlLoader::load_from_str(&part).unwrap_or_else(|e| panic!("{e}"));
    for key in ["bootcmd", "runcmd"] {
        for cmd in docs[0][key].as_vec().unwrap_or_else(|| panic!("no {key}")) {
            let script = cmd[2].as_str().unwrap_or_else(|| panic!("{key}: {cmd:?}"));
            let ok = std::process::Command::new("sh")
                .args(["-n", "-c", script])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "{key} script does not parse: {script}");
        }
    }

    // No guest paths: untouched.
    let (_d, plain) = project("[[share]]\nhost = \"ws\"\n");
    let (same, _) = seed::user_data_with_mounts(user, &plain.shares);
    assert_eq!(same, user);

    // Already MIME: untouched, with a warning.
    let mime = "Content-Type: multipart/mixed; boundary=x\n\n--x--\n";
    let (same, warning) = seed::user_data_with_mounts(mime, &cfg.shares);
    assert_eq!(same, mime);
    assert!(warning.is_some());
}

#[test]
fn the_boundary_never_occurs_in_the_text() {
    let (_d, cfg) = project("[[share]]\nhost = \"ws\"\nguest = \"/ws\"\n");
    let user = "#cloud-config\n# ==migrant-shares== ==migrant-shares===\n";
    let (out, _) = seed::user_data_with_mounts(user, &cfg.shares);
    let first = out.lines().next().unwrap_or_default();
    let b = first
        .split("boundary=\"")
        .nth(1)
        .and_then(|r| r.strip_suffix('"'))
        .unwrap_or_default();
    assert_eq!(b, "==migrant-shares====");
}

/// The first-boot fix-up, run with a stand-in `getent` and `chown`: a
/// folder made in a user's home goes to that user; one outside any home,
/// and `/` homes, are left alone.
#[test]
fn folders_made_in_a_home_go_to_its_user() {
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let bin = d.path().join("bin");
    std::fs::create_dir(&bin).unwrap_or_else(|e| panic!("{e}"));
    let log = d.path().join("chown.log");
    let write = |name: &str, text: String| {
        let p = bin.join(name);
        std::fs::write(&p, text).unwrap_or_else(|e| panic!("{e}"));
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap_or_else(|e| panic!("{e}"));
    };
    write(
        "getent",
        "#!/bin/sh\nprintf 'root:x:0:0::/root:/bin/sh\\nsys:x:3:3::/:/bin/sh\\nmigrant:x:1000:1000::/home/migrant:/bin/bash\\n'\n"
            .to_string(),
    );
    write(
        "chown",
        format!("#!/bin/sh\necho \"$@\" >> {}\n", log.display()),
    );
    let list = d.path().join("dirs");
    std::fs::write(
        &list,
        "/home/migrant\n/home/migrant/code\n/srv\n/home/migrant\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let status = std::process::Command::new("sh")
        .args(["-c", seed::GIVE_BACK_HOMES, "migrant-share"])
        .arg(&list)
        .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .status()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(status.success());
    let chowned = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        chowned,
        "1000:1000 /home/migrant\n1000:1000 /home/migrant/code\n"
    );
}
