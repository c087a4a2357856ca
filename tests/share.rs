//! Shared folders on a real guest under TCG: virtiofs served by the
//! embedded virtiofsd from size-capped, symlink-safe folders, and every
//! way of refusing to start.

mod common;

use common::share_io::{assert_mapped_and_sqlite, file_io};
use common::*;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const GIB: u64 = 1 << 30;

/// Mount points at or below `dir` in our mount namespace.
fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(&dir)))
        .map(str::to_string)
        .collect()
}

/// Nothing is mounted in the test's folders (nothing ever is: a share's
/// folder is its store).
fn assert_no_mounts(env: &Env) {
    let root = env.root.path();
    assert!(
        mounts_under(root).is_empty(),
        "mounts: {:?}",
        mounts_under(root)
    );
}

/// Bytes the files under `dir` take on disk (`du`).
fn disk_usage(dir: &Path) -> u64 {
    let mut total = 0;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            total += m.blocks() * 512;
            if m.is_dir() {
                todo.push(e.path());
            }
        }
    }
    total
}

fn status(env: &Env) -> serde_json::Value {
    serde_json::from_str(&env.ok(&["status", "--json"])).unwrap_or_else(|e| panic!("{e}"))
}

fn guest(env: &Env, script: &str) -> String {
    env.ok(&["ssh", "--", script])
}

#[test]
fn shares_end_to_end() {
    let Some(image) = test_image() else { return };
    let env = Env::new(
        "share",
        &image,
        "[[share]]\nhost = \"ws\"\nguest = \"/home/migrant/ws\"\nsize = \"1G\"\n\n\
         [[share]]\nhost = \"data\"\nguest = \"/mnt/data\"\nsize = \"2G\"\n",
    );
    let ws = env.project.join("ws");
    // Outside every share: the guest must never reach it.
    std::fs::write(env.project.join("outside-marker"), b"host only")
        .unwrap_or_else(|e| panic!("{e}"));

    // Fill the workspace before the first boot: `mount` makes the
    // folders, nothing is mounted.
    let out = env.ok(&["mount"]);
    assert!(out.contains("nothing to mount"), "{out}");
    assert!(ws.is_dir() && env.project.join("data").is_dir());
    std::fs::write(ws.join("from-host.txt"), b"hello from the host\n")
        .unwrap_or_else(|e| panic!("{e}"));
    if let Some(u) = rootless_user() {
        chown_tree(&ws, &u);
    }
    assert!(env.ok(&["unmount"]).contains("nothing to unmount"));
    assert!(ws.join("from-host.txt").exists());
    assert_no_mounts(&env);

    // First boot: both shares are served and mounted by the seed.
    let out = env.run(&["up"]);
    assert!(out.status.success(), "up: {}", text(&out));
    let s = status(&env);
    let shares = s["shares"].as_array().cloned().unwrap_or_default();
    assert_eq!(shares.len(), 2, "{s}");
    assert_eq!(shares[0]["cap"], GIB, "{s}");
    assert_eq!(shares[1]["cap"], 2 * GIB, "{s}");
    let human = env.ok(&["status"]);
    assert!(human.contains("share:       ws"), "{human}");
    assert!(human.contains("used of 1G"), "{human}");
    assert!(human.contains("used of 2G"), "{human}");

    // Both directions, and the guest's view of the mounts.
    let g = guest(
        &env,
        "grep virtiofs /proc/mounts; cat /home/migrant/ws/from-host.txt; \
         sudo sh -c 'echo written by the guest > /home/migrant/ws/from-guest.txt; echo d > /mnt/data/d.txt; sync'",
    );
    assert!(g.contains("ws /home/migrant/ws virtiofs"), "{g}");
    assert!(g.contains("data /mnt/data virtiofs"), "{g}");
    assert!(g.contains("hello from the host"), "{g}");
    assert_eq!(
        std::fs::read_to_string(ws.join("from-guest.txt")).unwrap_or_default(),
        "written by the guest\n"
    );
    let made = std::fs::metadata(ws.join("from-guest.txt")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        made.uid(),
        migrant_uid(),
        "the guest's file is not the user's"
    );
    assert!(env.project.join("data/d.txt").exists());

    // The guest sees the user's files as its login user's, who writes
    // there as itself (no sudo); on the host, what it makes is the user's.
    let g = guest(
        &env,
        "id -u; stat -c 'owner=%u:%g' /home/migrant/ws /home/migrant/ws/from-host.txt; \
         echo as the login user > /home/migrant/ws/by-login-user.txt && echo WROTE; \
         mkdir /home/migrant/ws/made-by-login-user && echo MKDIR; sync",
    );
    assert!(g.starts_with("1000\n"), "the login user: {g}");
    assert_eq!(g.matches("owner=1000:1000").count(), 2, "{g}");
    assert!(g.contains("WROTE") && g.contains("MKDIR"), "{g}");
    for made in ["by-login-user.txt", "made-by-login-user"] {
        let meta = std::fs::metadata(ws.join(made)).unwrap_or_else(|e| panic!("{made}: {e}"));
        assert_eq!(meta.uid(), migrant_uid(), "{made} is not the user's");
    }

    // Links that lead out and device nodes are refused; a link inside
    // the share works.
    let g = guest(
        &env,
        "cd /home/migrant/ws && for t in /etc/shadow / ../outside-marker; do \
           sudo ln -s $t evil 2>/dev/null && echo LINKED $t; done; \
         sudo mknod mem c 1 1 2>/dev/null && echo MKNOD; \
         sudo ln -s from-guest.txt inside && cat inside; sync",
    );
    assert!(!g.contains("LINKED") && !g.contains("MKNOD"), "{g}");
    assert!(g.contains("written by the guest"), "{g}");
    for f in ["evil", "mem"] {
        assert!(ws.join(f).symlink_metadata().is_err(), "{f} appeared");
    }

    // `..` from the share never leaves the guest's own tree.
    let walk = guest(
        &env,
        "for d in /home/migrant/ws /mnt/data; do for n in 1 2 3 4 5 6 7 8; do \
         p=$d; i=0; while [ $i -lt $n ]; do p=$p/..; i=$((i+1)); done; \
         if [ -e $p/outside-marker ]; then echo ESCAPED $p; fi; done; done; \
         ls -a /home/migrant/ws/..; echo walked",
    );
    assert!(walk.contains("walked"), "{walk}");
    assert!(!walk.contains("ESCAPED"), "{walk}");
    assert!(!walk.contains("outside-marker"), "{walk}");

    // The guest cannot write past the cap; the folder stays within it.
    let fill = env.run(&[
        "ssh",
        "--",
        "sudo dd if=/dev/zero of=/home/migrant/ws/fill bs=1M count=1500 conv=fsync 2>&1; echo dd=$?",
    ]);
    let fill_out = String::from_utf8_lossy(&fill.stdout).into_owned();
    assert!(
        fill_out.contains("No space left on device"),
        "no ENOSPC: {}",
        text(&fill)
    );
    let used = disk_usage(&ws);
    assert!(used <= GIB, "the share holds {used} bytes");
    guest(&env, "sudo rm -f /home/migrant/ws/fill && sync");

    // Debian 12's kernel (6.1) cannot map direct-I/O files shared: its
    // share keeps the page cache, and shared writable mappings work.
    let io = file_io(&env, "/home/migrant/ws");
    assert!(io.cache_growth_kib > 48 * 1024, "no page cache: {io:?}");
    assert_mapped_and_sqlite(&ws, &io);

    env.ok(&["halt"]);
    assert_eq!(status(&env)["state"], "stopped");
    env.assert_clean();
    assert_no_mounts(&env);

    // Drift: the project folder moved after the VM was built: refused,
    // naming the share and both places.
    let moved: PathBuf = env.root.path().join("moved");
    std::fs::rename(&env.project, &moved).unwrap_or_else(|e| panic!("{e}"));
    let out = env
        .cmd(&["-C", &moved.to_string_lossy(), "up"])
        .current_dir(env.root.path())
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::rename(&moved, &env.project).unwrap_or_else(|e| panic!("{e}"));
    let t = text(&out);
    assert_eq!(out.status.code(), Some(78), "{t}");
    assert!(t.contains("\"ws\""), "{t}");
    assert!(t.contains(&ws.display().to_string()), "{t}");
    assert!(t.contains(&moved.join("ws").display().to_string()), "{t}");
    env.assert_clean();
    assert_no_mounts(&env);

    // Data survives; a dead supervisor's daemons go with it.
    let out = env.run(&["up"]);
    assert!(out.status.success(), "second up: {}", text(&out));
    let g = guest(&env, "cat /home/migrant/ws/from-guest.txt /mnt/data/d.txt");
    assert!(g.contains("written by the guest"), "{g}");
    let sup = env
        .pid_of("__supervisor")
        .unwrap_or_else(|| panic!("no supervisor"));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sup as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    assert!(
        wait_for(Duration::from_secs(10), || env.processes().is_empty()),
        "processes outlived the supervisor: {:?}",
        env.processes()
    );
    assert_eq!(status(&env)["state"], "stopped");
    env.assert_clean();

    // destroy never deletes a share's files.
    env.ok(&["destroy"]);
    assert!(ws.join("from-guest.txt").exists());
    assert!(env.project.join("data/d.txt").exists());
    assert_no_mounts(&env);
}

fn sha(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn shares_refuse_to_start_and_delete_nothing() {
    let Some(image) = test_image() else { return };

    // Forbidden paths: hooks/ and the project folder itself.
    for host in ["hooks", "hooks/x", "."] {
        let env = Env::new(
            "sharebad",
            &image,
            &format!("[[share]]\nhost = \"{host}\"\ntag = \"t\"\n"),
        );
        let out = env.run(&["up"]);
        assert_eq!(out.status.code(), Some(78), "{host}: {}", text(&out));
        assert!(!env.state_dir().join("disk.qcow2").exists());
    }

    let env = Env::new(
        "shareno",
        &image,
        "[[share]]\nhost = \"ws\"\nsize = \"1G\"\n",
    );
    let ws = env.project.join("ws");
    let img = env.project.join("ws.img");

    // A share folder that is a symlink, or someone else's: refused,
    // nothing built, nothing changed.
    let elsewhere = env.root.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap_or_else(|e| panic!("{e}"));
    std::os::unix::fs::symlink(&elsewhere, &ws).unwrap_or_else(|e| panic!("{e}"));
    let out = env.run(&["up"]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(text(&out).contains("is a symlink"), "{}", text(&out));
    std::fs::remove_file(&ws).unwrap_or_else(|e| panic!("{e}"));
    std::fs::create_dir(&ws).unwrap_or_else(|e| panic!("{e}"));
    let other = migrant_uid() + 1;
    nix::unistd::chown(&ws, Some(other.into()), Some(other.into()))
        .unwrap_or_else(|e| panic!("{e}"));
    let out = env.run(&["up"]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("belongs to uid {other}")),
        "{}",
        text(&out)
    );
    assert!(!env.state_dir().join("disk.qcow2").exists());
    std::fs::remove_dir(&ws).unwrap_or_else(|e| panic!("{e}"));

    // An ext4 store an older migrant made as root: refused with the way
    // to get the files out, untouched.
    std::fs::write(&img, vec![0x5a; 4 << 20]).unwrap_or_else(|e| panic!("{e}"));
    let before = sha(&img);
    let out = env.run(&["up"]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(text(&out).contains("debugfs -R 'rdump"), "{}", text(&out));
    assert_eq!(sha(&img), before, "the store changed");
    assert!(!env.state_dir().join("disk.qcow2").exists());
    std::fs::remove_file(&img).unwrap_or_else(|e| panic!("{e}"));

    env.assert_clean();
    assert_no_mounts(&env);
}

/// Without isolation the guest writes into the host folder itself; guest
/// root must not gain anything on the host through it: every file it makes
/// belongs to the folder's owner (a setuid file runs as that user, never
/// as root), and it cannot make device nodes.
#[test]
fn a_share_without_isolation_gives_guest_root_nothing_on_the_host() {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let Some(image) = test_image() else { return };
    // Two plain folders and an isolated store.
    let env = Env::new(
        "plain",
        &image,
        "[[share]]\nhost = \"plain\"\nguest = \"/mnt/plain\"\nisolation = false\n\
         [[share]]\nhost = \"rootown\"\nguest = \"/mnt/rootown\"\nisolation = false\n\
         [[share]]\nhost = \"iso\"\nguest = \"/mnt/iso\"\nsize = \"1G\"\n",
    );
    let dir = env.project.join("plain");
    let me = migrant_uid();
    let my_gid = rootless_user().map_or(0, |u| u.gid.as_raw());
    env.ok(&["up"]);
    let out = guest(
        &env,
        "sudo sh -c 'echo x > /mnt/plain/rootsh; chown 0:0 /mnt/plain/rootsh; chmod 4755 /mnt/plain/rootsh; \
         mknod /mnt/plain/disk b 8 0 2>/dev/null && echo MKNOD-OK || echo MKNOD-REFUSED; \
         echo hello > /mnt/plain/note; cat /mnt/plain/note; \
         for d in plain rootown iso; do \
           cp /bin/bash /mnt/$d/rsh && chmod 4755 /mnt/$d/rsh; \
           cp /bin/true /mnt/$d/gsh && chmod 6755 /mnt/$d/gsh; \
           mkdir -m 2775 /mnt/$d/gdir; \
           python3 -c \"import os; os.setxattr(\\\"/mnt/$d/gsh\\\", \\\"security.capability\\\", bytes([1,0,0,2]) + bytes(16))\" 2>/dev/null && echo CAP-SET-$d || echo CAP-REFUSED-$d; \
         done'",
    );
    assert!(out.contains("hello"), "the share does not work: {out}");
    assert!(
        out.contains("MKNOD-REFUSED"),
        "guest root made a device node: {out}"
    );
    for f in ["rootsh", "note"] {
        let m = std::fs::symlink_metadata(dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(
            (m.uid(), m.gid()),
            (me, my_gid),
            "{f} belongs to {}:{} on the host",
            m.uid(),
            m.gid()
        );
    }
    let disk = std::fs::symlink_metadata(dir.join("disk"));
    assert!(
        !disk.as_ref().is_ok_and(|m| m.file_type().is_block_device()),
        "a block device appeared in the share: {disk:?}"
    );
    // No set-user-ID or set-group-ID bit and no file capability reaches
    // the host, on any kind of share, whoever owns the folder.
    for d in ["plain", "rootown", "iso"] {
        assert!(out.contains(&format!("CAP-REFUSED-{d}")), "{d}: {out}");
        for f in ["rsh", "rootsh", "gsh", "gdir"] {
            let Ok(m) = std::fs::symlink_metadata(env.project.join(d).join(f)) else {
                assert!(f == "rootsh" && d != "plain", "{d}/{f} was not made: {out}");
                continue;
            };
            assert_eq!(
                m.mode() & 0o6000,
                0,
                "{d}/{f} is mode {:o} (owner {}) on the host",
                m.mode(),
                m.uid()
            );
        }
    }
    env.ok(&["destroy"]);
}

/// The review's attack on the mount point, replayed by a second local
/// user (the suite's user): its pre-up hook swaps the project folder for a
/// link to a folder of root's, whose `ws` holds root's file. Nothing runs
/// with more than the user's rights, so the start fails on the user's own
/// "Permission denied", nothing of root's reaches any output or the VM's
/// state, and nothing is mounted anywhere. (Before the one code path:
/// root mounted the user's ext4 image over root's folder.)
#[test]
fn a_project_folder_swapped_for_a_link_gains_the_user_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let Some(image) = test_image() else { return };
    let env = Env::new("swap", &image, "[[share]]\nhost = \"ws\"\nsize = \"1G\"\n");
    let Some(user) = env.user.clone() else {
        assert!(
            std::env::var_os("MIGRANT_REQUIRE_INTEGRATION").is_none(),
            "this attack needs a second user: MIGRANT_TEST_ROOTLESS=1 (scripts/test sets it)"
        );
        eprintln!("SKIPPED: migrant runs as root here; set MIGRANT_TEST_ROOTLESS=1");
        return;
    };
    const MARKER: &str = "ROOT-ONLY-FOLDER-MARKER";
    let hostdir = env.root.path().join("hostdir");
    std::fs::create_dir_all(hostdir.join("ws")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(hostdir.join("ws/secret"), MARKER).unwrap_or_else(|e| panic!("{e}"));
    std::fs::set_permissions(&hostdir, std::fs::Permissions::from_mode(0o700))
        .unwrap_or_else(|e| panic!("{e}"));
    let hooks = env.project.join("hooks");
    std::fs::create_dir(&hooks).unwrap_or_else(|e| panic!("{e}"));
    let hook = hooks.join("pre-up");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\nset -e\np=\"$PWD\"\nmv \"$p\" \"$p.real\"\nln -s {} \"$p\"\n",
            hostdir.display()
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("{e}"));
    chown_tree(&hooks, &user);
    let out = env.run(&["up", "--timeout", "120"]);
    // Undo the swap before asserting, so the VM can be destroyed.
    let moved = env.root.path().join("project.real");
    if moved.exists() {
        let _ = std::fs::remove_file(&env.project);
        std::fs::rename(&moved, &env.project).unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(!out.status.success(), "up went on: {}", text(&out));
    assert!(
        text(&out).contains("Permission denied"),
        "not refused with the user's own error: {}",
        text(&out)
    );
    assert!(!text(&out).contains(MARKER), "{}", text(&out));
    assert_eq!(
        file_containing(&env.root.path().join("state"), MARKER),
        None,
        "root's file reached the VM's state"
    );
    assert_eq!(
        std::fs::read_to_string(hostdir.join("ws/secret")).unwrap_or_default(),
        MARKER
    );
    assert!(
        mounts_under(Path::new("/"))
            .iter()
            .all(|m| !m.contains("hostdir"))
    );
    assert_no_mounts(&env);
    let _ = env.run(&["destroy"]);
    env.assert_clean();
}
