//! Shared folders on a real guest under TCG: virtiofs served by the
//! embedded virtiofsd from size-capped, symlink-safe stores, and every way
//! of refusing to start.

mod common;

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

/// Loop devices whose backing file is under `dir`.
fn loops_under(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file"))
            && b.starts_with(&dir)
        {
            found.push(format!("{name}: {}", b.trim()));
        }
    }
    found
}

/// Mounts and loop devices of the test's folders are gone (loop devices
/// clear themselves a moment after the last user lets go).
fn assert_no_mounts_or_loops(env: &Env) {
    let root = env.root.path();
    assert!(
        wait_for(Duration::from_secs(10), || mounts_under(root).is_empty()),
        "mounts left: {:?}",
        mounts_under(root)
    );
    assert!(
        wait_for(Duration::from_secs(10), || loops_under(root).is_empty()),
        "loop devices left: {:?}",
        loops_under(root)
    );
}

fn status(env: &Env) -> serde_json::Value {
    serde_json::from_str(&env.ok(&["status", "--json"])).unwrap_or_else(|e| panic!("{e}"))
}

fn guest(env: &Env, script: &str) -> String {
    env.ok(&["ssh", "--", script])
}

/// What `file_io` saw in the guest.
#[derive(Debug)]
struct FileIo {
    /// How much the guest's page cache grew while reading 64 MiB from the
    /// share (after dropping its caches).
    cache_growth_kib: i64,
    /// SQLite's journal mode after asking for WAL, and the rows a second
    /// connection read.
    journal: String,
    rows: i64,
}

/// In the guest, on the share at `dir`: read 64 MiB and measure the page
/// cache, write through a shared writable mapping, and use SQLite in WAL
/// mode from two connections (its index is a shared mapping too).
fn file_io(env: &Env, dir: &str) -> FileIo {
    let script = format!(
        r#"
import mmap, os, sqlite3, subprocess
d = {dir:?}
def cached():
    for line in open("/proc/meminfo"):
        if line.startswith("Cached:"):
            return int(line.split()[1])
subprocess.run(["dd", "if=/dev/urandom", "of=" + d + "/big.bin", "bs=1M", "count=64", "status=none"], check=True)
os.sync()
open("/proc/sys/vm/drop_caches", "w").write("3")
before = cached()
with open(d + "/big.bin", "rb") as f:
    while f.read(1 << 20):
        pass
print("cache", cached() - before)
with open(d + "/mapped.bin", "wb") as f:
    f.write(bytes(4096))
with open(d + "/mapped.bin", "r+b") as f:
    m = mmap.mmap(f.fileno(), 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    m[0:15] = b"written by mmap"
    m.flush()
    m.close()
a = sqlite3.connect(d + "/db.sqlite")
print("journal", a.execute("pragma journal_mode=wal").fetchone()[0])
a.execute("create table t(x)")
a.executemany("insert into t values (?)", [(i,) for i in range(1000)])
a.commit()
b = sqlite3.connect(d + "/db.sqlite")
print("rows", b.execute("select count(*) from t").fetchone()[0])
b.close()
a.close()
os.remove(d + "/big.bin")
os.sync()
"#
    );
    let out = env.run_input(&["ssh", "--", "sudo", "python3", "-"], script.as_bytes());
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "guest file I/O: {}", text(&out));
    let field = |key: &str| {
        said.lines()
            .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("no {key:?} in {said}"))
    };
    let number = |key: &str| {
        field(key)
            .parse::<i64>()
            .unwrap_or_else(|e| panic!("{key}: {e}: {said}"))
    };
    FileIo {
        cache_growth_kib: number("cache "),
        journal: field("journal "),
        rows: number("rows "),
    }
}

/// What the guest wrote through its mapping and into SQLite is on the
/// host's side of the share at `host`.
fn assert_mapped_and_sqlite(host: &Path, io: &FileIo) {
    assert_eq!(io.journal, "wal", "{io:?}");
    assert_eq!(io.rows, 1000, "{io:?}");
    let mapped = std::fs::read(host.join("mapped.bin")).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        mapped.starts_with(b"written by mmap"),
        "mapping not written back"
    );
    let db = std::fs::read(host.join("db.sqlite")).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        db.starts_with(b"SQLite format 3\0"),
        "no database on the host"
    );
}

fn errno_of_open(path: &Path) -> Option<i32> {
    std::fs::File::open(path)
        .err()
        .and_then(|e| e.raw_os_error())
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
    let ws_img = env.project.join("ws.img");
    let data_img = env.project.join("data.img");
    // Outside every share: the guest must never reach it.
    std::fs::write(env.project.join("outside-marker"), b"host only")
        .unwrap_or_else(|e| panic!("{e}"));

    // Fill the workspace before the first boot.
    let out = env.ok(&["mount"]);
    assert!(out.contains("creating the 1G store"), "{out}");
    let line = mounts_under(&ws).join("\n");
    for opt in ["nosymfollow", "nodev", "nosuid"] {
        assert!(line.contains(opt), "{opt} missing: {line}");
    }
    assert!(line.contains(" - ext4 /dev/loop"), "{line}");
    std::fs::write(ws.join("from-host.txt"), b"hello from the host\n")
        .unwrap_or_else(|e| panic!("{e}"));
    env.ok(&["unmount"]);
    assert!(
        !ws.join("from-host.txt").exists(),
        "unmount left the store visible"
    );
    assert_no_mounts_or_loops(&env);

    // First boot: both stores are mounted by the supervisor and by the
    // seed in the guest.
    let out = env.run(&["up"]);
    assert!(out.status.success(), "up: {}", text(&out));
    let s = status(&env);
    let shares = s["shares"].as_array().cloned().unwrap_or_default();
    assert_eq!(shares.len(), 2, "{s}");
    assert_eq!(shares[0]["mounted"], true, "{s}");
    assert_eq!(shares[0]["cap"], GIB, "{s}");
    assert_eq!(shares[1]["mounted"], true, "{s}");
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
    assert!(env.project.join("data/d.txt").exists());

    // Symlinks and device nodes the guest plants are inert on the host.
    guest(
        &env,
        "cd /home/migrant/ws && sudo ln -s /etc/shadow evil && sudo ln -s / rootlink && \
         sudo mknod mem c 1 1 && sudo mknod null c 1 3 && sync",
    );
    assert_eq!(errno_of_open(&ws.join("evil")), Some(libc::ELOOP));
    assert_eq!(
        errno_of_open(&ws.join("rootlink/etc/shadow")),
        Some(libc::ELOOP)
    );
    assert_eq!(errno_of_open(&ws.join("mem")), Some(libc::EACCES));
    assert_eq!(errno_of_open(&ws.join("null")), Some(libc::EACCES));

    // `..` from the share never leaves the guest's own tree.
    let walk = guest(
        &env,
        "for d in /home/migrant/ws /mnt/data; do for n in 1 2 3 4 5 6 7 8; do \
         p=$d; i=0; while [ $i -lt $n ]; do p=$p/..; i=$((i+1)); done; \
         if [ -e $p/outside-marker ] || [ -e $p/ws.img ]; then echo ESCAPED $p; fi; done; done; \
         ls -a /home/migrant/ws/..; echo walked",
    );
    assert!(walk.contains("walked"), "{walk}");
    assert!(!walk.contains("ESCAPED"), "{walk}");
    assert!(!walk.contains("outside-marker"), "{walk}");

    // The guest cannot write past the cap; the image stays within it.
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
    let meta = std::fs::metadata(&ws_img).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(meta.len(), GIB);
    assert!(
        meta.blocks() * 512 <= GIB,
        "image uses {} bytes",
        meta.blocks() * 512
    );
    guest(&env, "sudo rm -f /home/migrant/ws/fill && sync");

    // Debian 12's kernel (6.1) cannot map direct-I/O files shared: its
    // share keeps the page cache, and shared writable mappings work.
    let io = file_io(&env, "/home/migrant/ws");
    assert!(io.cache_growth_kib > 48 * 1024, "no page cache: {io:?}");
    assert_mapped_and_sqlite(&ws, &io);

    // Halt unmounts and frees everything.
    env.ok(&["halt"]);
    assert_eq!(status(&env)["state"], "stopped");
    env.assert_clean();
    assert_no_mounts_or_loops(&env);

    // Data survives; then a dead supervisor's stores are cleaned by the
    // next command.
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
    assert_no_mounts_or_loops(&env);
    env.assert_clean();

    // destroy never deletes a store.
    let out = env.ok(&["destroy"]);
    assert!(out.contains("store kept"), "{out}");
    assert!(ws_img.exists() && data_img.exists());
    env.ok(&["mount"]);
    assert!(ws.join("from-guest.txt").exists());
    env.ok(&["unmount"]);
    assert_no_mounts_or_loops(&env);
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

    // A foreign mount on the share folder: refused, left alone.
    std::fs::create_dir_all(&ws).unwrap_or_else(|e| panic!("{e}"));
    nix::mount::mount(
        Some("tmpfs"),
        &ws,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(ws.join("keep"), b"x").unwrap_or_else(|e| panic!("{e}"));
    let out = env.run(&["up"]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(text(&out).contains("tmpfs"), "{}", text(&out));
    assert!(ws.join("keep").exists(), "the foreign mount was touched");
    nix::mount::umount(&ws).unwrap_or_else(|e| panic!("{e}"));
    assert!(!env.state_dir().join("disk.qcow2").exists());

    // The store vanishes while the VM starts: the periodic check kills
    // QEMU at once and `up` fails with 78.
    let child = env
        .cmd(&["up"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        wait_for(Duration::from_secs(120), || env
            .pid_of("qemu-system")
            .is_some()),
        "QEMU never started"
    );
    nix::mount::umount2(&ws, nix::mount::MntFlags::MNT_DETACH).unwrap_or_else(|e| panic!("{e}"));
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(text(&out).contains("nothing mounted"), "{}", text(&out));
    assert!(
        env.pid_of("qemu-system").is_none(),
        "QEMU survived the check"
    );
    assert!(img.exists());

    // An unmountable store (not ext4): the VM is built, refuses to start
    // (no QEMU), and the store is untouched.
    std::fs::remove_file(&img).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(&img, vec![0x5a; 4 << 20]).unwrap_or_else(|e| panic!("{e}"));
    let before = sha(&img);
    let out = env.run(&["up"]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(text(&out).contains("cannot mount"), "{}", text(&out));
    assert_eq!(sha(&img), before, "the store changed");
    assert!(env.state_dir().join("disk.qcow2").exists());
    env.assert_clean();
    assert_no_mounts_or_loops(&env);

    // A missing store once the VM was built with it.
    std::fs::remove_file(&img).unwrap_or_else(|e| panic!("{e}"));
    let out = env.run(&["up"]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(text(&out).contains("missing"), "{}", text(&out));
    assert!(!img.exists(), "up recreated a missing store");
    // `migrant mount` makes a new empty one on request.
    env.ok(&["mount"]);
    env.ok(&["unmount"]);
    assert!(img.exists());

    // Drift: the project folder moved after the VM was built.
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
    assert!(
        t.contains(&env.project.join("ws").display().to_string()),
        "{t}"
    );
    assert!(t.contains(&moved.join("ws").display().to_string()), "{t}");

    // A store mounted without the safe options is foreign too.
    let loop_out = std::process::Command::new("mount")
        .args(["-o", "loop"])
        .arg(&img)
        .arg(&ws)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(loop_out.status.success(), "mount -o loop: {loop_out:?}");
    let out = env.run(&["up"]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(text(&out).contains("without nosymfollow"), "{}", text(&out));
    let _ = std::process::Command::new("umount").arg(&ws).status();
    env.assert_clean();
    assert_no_mounts_or_loops(&env);
    assert!(img.exists());
}

/// Without isolation the guest writes into the host folder itself; guest
/// root must not gain anything on the host through it: every file it makes
/// belongs to the folder's owner (a setuid file runs as that user, never
/// as root), and it cannot make device nodes.
#[test]
fn a_share_without_isolation_gives_guest_root_nothing_on_the_host() {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let Some(image) = test_image() else { return };
    // A folder of a user's, a folder of root's (root running migrant for
    // its own project maps guest root to root), and an isolated store.
    let env = Env::new(
        "plain",
        &image,
        "[[share]]\nhost = \"plain\"\nguest = \"/mnt/plain\"\nisolation = false\n\
         [[share]]\nhost = \"rootown\"\nguest = \"/mnt/rootown\"\nisolation = false\n\
         [[share]]\nhost = \"iso\"\nguest = \"/mnt/iso\"\nsize = \"1G\"\n",
    );
    let dir = env.project.join("plain");
    std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
    nix::unistd::chown(&dir, Some(65534.into()), Some(65534.into()))
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::create_dir(env.project.join("rootown")).unwrap_or_else(|e| panic!("{e}"));
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
            (65534, 65534),
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

/// Debian 13's kernel offers FUSE_DIRECT_IO_ALLOW_MMAP: its share serves
/// file data with direct I/O (nothing lands in the guest's page cache, the
/// copy that makes reads slow under TCG), and shared writable mappings and
/// SQLite's WAL still work.
#[test]
fn a_trixie_share_uses_direct_io_and_still_maps_shared() {
    let Some(image) = test_image_13() else { return };
    let env = Env::new(
        "share-dio",
        &image,
        "[[share]]\nhost = \"ws\"\nguest = \"/home/migrant/ws\"\nsize = \"1G\"\n",
    );
    let out = env.run(&["up"]);
    assert!(out.status.success(), "up: {}", text(&out));
    let io = file_io(&env, "/home/migrant/ws");
    assert!(io.cache_growth_kib < 16 * 1024, "page cache used: {io:?}");
    env.ok(&["halt"]);
    env.ok(&["mount"]);
    assert_mapped_and_sqlite(&env.project.join("ws"), &io);
    env.ok(&["unmount"]);
    env.ok(&["destroy"]);
    env.assert_clean();
    assert_no_mounts_or_loops(&env);
}

/// The review's attack on the mount point, as a second local user
/// through sudo: the user's pre-up hook (run as the user, before the
/// supervisor mounts the store) replaces the project folder with a link
/// to `/proc/PID/root/HOSTDIR`, where PID is the user's own process in an
/// unprivileged user and mount namespace whose HOSTDIR is a bind of a
/// folder the user fills (the Migrantfile, a hard link to the store).
/// Through the user's namespace everything reads as the user's own; a
/// mount point resolved by following links lands on the host's
/// HOSTDIR/ws, a folder of root's. Nothing may be mounted there.
/// (Before: the user's ext4 image was mounted over the host folder.)
#[test]
fn a_project_folder_swapped_for_a_namespace_link_mounts_nothing_on_the_host() {
    use std::os::unix::fs::PermissionsExt;
    let Some(image) = test_image() else { return };
    let env = Env::new("swap", &image, "[[share]]\nhost = \"ws\"\nsize = \"1G\"\n");
    let root = env.root.path().to_path_buf();
    let nobody = |p: &std::path::Path| {
        nix::unistd::chown(p, Some(65534.into()), Some(65534.into()))
            .unwrap_or_else(|e| panic!("chown {}: {e}", p.display()))
    };
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("{e}"));
    // nobody's key (made by `pubkey` for root) and folders.
    let key = root.join("home/.ssh/migrant");
    let mut mf =
        std::fs::read_to_string(env.project.join("Migrantfile")).unwrap_or_else(|e| panic!("{e}"));
    mf.push_str(&format!("\n[ssh]\nkey = \"{}\"\n", key.display()));
    std::fs::write(env.project.join("Migrantfile"), mf).unwrap_or_else(|e| panic!("{e}"));
    for p in [
        root.clone(),
        root.join("home/.ssh"),
        key.clone(),
        root.join("home/.ssh/migrant.pub"),
        env.project.clone(),
    ] {
        nobody(&p);
    }
    // Root's folder that the link must not reach.
    let hostdir = root.join("hostdir");
    std::fs::create_dir_all(hostdir.join("ws")).unwrap_or_else(|e| panic!("{e}"));
    let fake = root.join("fake");
    std::fs::create_dir(&fake).unwrap_or_else(|e| panic!("{e}"));
    nobody(&fake);
    let hooks = env.project.join("hooks");
    std::fs::create_dir(&hooks).unwrap_or_else(|e| panic!("{e}"));
    let hook = hooks.join("pre-up");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\nset -e\np=\"$PWD\"\n\
             cp Migrantfile cloud-init.yml {fake}/ && ln ws.img {fake}/ws.img && mkdir -p {fake}/ws\n\
             unshare --user --map-root-user --mount sh -c 'mount --bind {fake} {hostdir} && exec sleep 600' </dev/null >/dev/null 2>&1 &\n\
             pid=$!\nsleep 2\n\
             mv \"$p\" \"$p.real\"\nln -s \"/proc/$pid/root{hostdir}\" \"$p\"\n",
            fake = fake.display(),
            hostdir = hostdir.display(),
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("{e}"));
    nobody(&hooks);
    nobody(&hook);
    // Watch root's folder while `up` runs (a failed start unmounts what
    // it mounted, so looking afterwards would miss it).
    let target = hostdir.join("ws").to_string_lossy().into_owned();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let done = std::sync::Arc::clone(&done);
        std::thread::spawn(move || {
            let mut seen = false;
            while !done.load(std::sync::atomic::Ordering::Relaxed) && !seen {
                seen = std::fs::read_to_string("/proc/self/mountinfo")
                    .unwrap_or_default()
                    .lines()
                    .any(|l| l.split(' ').nth(4) == Some(target.as_str()));
                std::thread::sleep(Duration::from_millis(10));
            }
            seen
        })
    };
    let out = env
        .cmd(&["up", "--timeout", "120"])
        .env("SUDO_USER", "nobody")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let mounted_on_host = watcher.join().unwrap_or(true);
    // Undo the swap, whatever happened, before asserting.
    let _ = std::process::Command::new("pkill")
        .args(["-KILL", "-u", "nobody", "-f", "sleep 600"])
        .status();
    let moved = root.join("project.real");
    if moved.exists() {
        let _ = std::fs::remove_file(&env.project);
        let _ = std::fs::rename(&moved, &env.project);
    }
    if mounted_on_host {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(hostdir.join("ws"))
            .status();
    }
    assert!(
        !mounted_on_host,
        "the user's store was mounted on root's folder {}: {}",
        hostdir.join("ws").display(),
        text(&out)
    );
    assert!(!out.status.success(), "up went on: {}", text(&out));
    assert!(
        text(&out).contains("symbolic link"),
        "not refused for the link: {}",
        text(&out)
    );
    let _ = env.run(&["destroy"]);
    env.assert_clean();
}
