//! Memory snapshots in the supervisor: saving a running VM's memory and
//! device state with the disk of that same moment, and restoring one into
//! a QEMU started with `-incoming defer`.
//!
//! Saving: the guest is paused, QEMU migrates into a unix socket only it
//! may connect to (its identity's, in the VM's runtime folder) and this
//! process writes the stream to root's 0600 file, never more bytes than
//! the guest's memory and a margin (a compromised QEMU cannot fill the
//! host's disk). Migration ends with QEMU's disks flushed and inactive, so
//! the disk is flattened into the snapshot while the guest stays paused;
//! then it runs on (or QEMU quits). Restoring: root opens the state file
//! and hands QEMU the descriptor; QEMU never opens a snapshot by name.

use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use super::control::Response;
use crate::memsnap::{Machine, Meta};
use crate::qemu::process::Identity;
use crate::qemu::qmp::Qmp;
use crate::state::VmPaths;

/// How long a migration (either way) may take.
const MIGRATION_DEADLINE: Duration = Duration::from_secs(600);
/// What a migration stream may hold beyond guest memory: device state,
/// the stream's own framing (measured: a few MiB).
const STATE_MARGIN: u64 = 256 << 20;

/// Wait until the migration QEMU reports is over; its error if it failed.
async fn migration_done(qmp: &Qmp, deadline: Instant) -> Result<(), String> {
    use qapi::qmp::MigrationStatus as S;
    loop {
        let info = qmp
            .run(qapi::qmp::query_migrate {})
            .await
            .map_err(|e| e.to_string())?;
        match info.status {
            Some(S::completed) => return Ok(()),
            Some(S::failed) | Some(S::cancelled) => {
                return Err(info
                    .error_desc
                    .unwrap_or_else(|| "migration failed".to_string()));
            }
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the migration did not finish within {} s",
                MIGRATION_DEADLINE.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Load the saved state from `fd` (one of QEMU's descriptors) and let the
/// guest run. Returns how long loading took.
pub(super) async fn restore(qmp: &Qmp, fd: i32) -> Result<Duration, String> {
    let t = Instant::now();
    qmp.run(qapi::qmp::migrate_incoming {
        uri: Some(format!("fd:{fd}")),
        channels: None,
        exit_on_error: None,
    })
    .await
    .map_err(|e| e.to_string())?;
    migration_done(qmp, t + MIGRATION_DEADLINE).await?;
    qmp.run(qapi::qmp::cont {})
        .await
        .map_err(|e| e.to_string())?;
    Ok(t.elapsed())
}

/// What [`save`] made.
pub(super) struct Saved {
    pub state_bytes: u64,
    pub disk_bytes: u64,
    pub paused: Duration,
}

impl Saved {
    pub(super) fn response(&self, stopped: bool) -> Response {
        Response::MemorySaved {
            state_bytes: self.state_bytes,
            disk_bytes: self.disk_bytes,
            paused_ms: self.paused.as_millis() as u64,
            stopped,
        }
    }
}

/// Pause the guest and save its memory, device state and disk as the
/// VM's snapshot (replacing the one it had). The guest stays paused: the
/// caller resumes it or stops QEMU. On failure nothing of the old
/// snapshot was touched.
pub(super) async fn save(
    qmp: &Qmp,
    vm: &VmPaths,
    identity: &Identity,
    machine: &Machine,
) -> Result<Saved, String> {
    let t = Instant::now();
    let sock = vm.run.join("migrate.sock");
    let state_tmp = vm.state.join(".snapshot.vmstate.tmp");
    let disk_tmp = vm.state.join(".snapshot.qcow2.tmp");
    let result = async {
        // Asked before the pause, not during it.
        let qemu_version = tokio::task::spawn_blocking(crate::memsnap::qemu_version)
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("QEMU's version: {e}"))?;
        let machine = Machine {
            qemu_version,
            ..machine.clone()
        };
        let listener = listen_for(&sock, identity)?;
        qmp.run(qapi::qmp::stop {})
            .await
            .map_err(|e| e.to_string())?;
        qmp.run(qapi::qmp::migrate {
            uri: Some(format!("unix:{}", sock.display())),
            channels: None,
            detach: None,
            resume: None,
        })
        .await
        .map_err(|e| e.to_string())?;
        let cap = machine.memory_mib * (1 << 20) + STATE_MARGIN;
        let receive = receive(listener, &state_tmp, cap);
        let (received, done) = tokio::join!(
            tokio::time::timeout(MIGRATION_DEADLINE, receive),
            migration_done(qmp, t + MIGRATION_DEADLINE)
        );
        let state_bytes =
            received.map_err(|_| "the migration stream did not end".to_string())??;
        done?;
        // The guest is paused and QEMU's disks flushed: the disk of this
        // exact moment, flattened. Root's qemu-img reads it only once its
        // header is checked (QEMU wrote it and may be compromised).
        let disk = vm.disk();
        let snapshot = vm.snapshot();
        let base = crate::state::Record::load(&vm.record())
            .ok()
            .flatten()
            .map(|r| r.base_image)
            .ok_or("the VM has no record")?;
        let disk_tmp2 = disk_tmp.clone();
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            crate::image::check_disk_chain(&disk, &[&base, &snapshot], true)
                .map_err(|e| crate::exit::chain(&e))?;
            let _ = std::fs::remove_file(&disk_tmp2);
            crate::image::convert_flat_shared(&disk, &disk_tmp2)
                .map_err(|e| crate::exit::chain(&e))?;
            sync_private(&disk_tmp2)
        })
        .await
        .map_err(|e| e.to_string())??;
        let paused = t.elapsed();
        // Replace the old snapshot: its record goes first (a crash in
        // between leaves a disk snapshot), then disk, state, NVRAM, record.
        crate::memsnap::forget(vm);
        rename(&disk_tmp, &vm.snapshot())?;
        rename(&state_tmp, &vm.snapshot_state())?;
        if vm.nvram().exists() {
            crate::state::copy_atomic(&vm.nvram(), &vm.snapshot_nvram())
                .map_err(|e| format!("{}: {e}", vm.snapshot_nvram().display()))?;
        } else {
            let _ = std::fs::remove_file(vm.snapshot_nvram());
        }
        let meta = Meta::new(machine, state_bytes, paused.as_millis() as u64);
        crate::memsnap::save(vm, &meta).map_err(|e| crate::exit::chain(&e))?;
        Ok(Saved {
            state_bytes,
            disk_bytes: crate::image::cache::disk_usage(&vm.snapshot()),
            paused,
        })
    }
    .await;
    let _ = std::fs::remove_file(&sock);
    if result.is_err() {
        let _ = std::fs::remove_file(&state_tmp);
        let _ = std::fs::remove_file(&disk_tmp);
    }
    result
}

/// A listening socket at `path` that only `identity` (QEMU) may connect to.
fn listen_for(
    path: &std::path::Path,
    identity: &Identity,
) -> Result<tokio::net::UnixListener, String> {
    let _ = std::fs::remove_file(path);
    let l = std::os::unix::net::UnixListener::bind(path)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    let owned = nix::unistd::chown(path, Some(identity.uid), Some(identity.gid))
        .map_err(std::io::Error::from)
        .and_then(|()| {
            std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        });
    owned.map_err(|e| format!("cannot hand {} to QEMU: {e}", path.display()))?;
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    tokio::net::UnixListener::from_std(l).map_err(|e| e.to_string())
}

/// Accept QEMU's one connection and write what it sends to `out` (root's,
/// 0600, created anew), at most `cap` bytes.
async fn receive(
    listener: tokio::net::UnixListener,
    out: &std::path::Path,
    cap: u64,
) -> Result<u64, String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let (mut stream, _) = listener
        .accept()
        .await
        .map_err(|e| format!("QEMU did not connect: {e}"))?;
    let _ = std::fs::remove_file(out);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(out)
        .map_err(|e| format!("{}: {e}", out.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("reading QEMU's state: {e}"))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > cap {
            return Err(format!(
                "QEMU's state stream passed {} bytes, more than the guest's memory allows; refused",
                cap
            ));
        }
        // Local disk writes of 1 MiB: brief enough for this runtime.
        file.write_all(&buf[..n])
            .map_err(|e| format!("{}: {e}", out.display()))?;
    }
    file.sync_all()
        .map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(total)
}

fn sync_private(path: &std::path::Path) -> Result<(), String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.sync_all()
        .and_then(|()| {
            std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        })
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(())
}

fn rename(from: &std::path::Path, to: &std::path::Path) -> Result<(), String> {
    std::fs::rename(from, to).map_err(|e| format!("{}: {e}", to.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A compromised QEMU streaming without end: cut at the cap, the
    /// partial file refused.
    #[tokio::test]
    async fn the_state_stream_is_capped() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let sock = dir.path().join("m.sock");
        let out = dir.path().join("state");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap_or_else(|e| panic!("{e}"));
        let writer = tokio::spawn({
            let sock = sock.clone();
            async move {
                let mut s = tokio::net::UnixStream::connect(&sock)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                let chunk = vec![7u8; 64 << 10];
                // Far more than the cap; stops when the reader goes.
                for _ in 0..64 {
                    if s.write_all(&chunk).await.is_err() {
                        break;
                    }
                }
            }
        });
        let r = receive(listener, &out, 1 << 20).await;
        assert!(
            r.as_ref()
                .is_err_and(|e| e.contains("more than the guest's memory")),
            "{r:?}"
        );
        let _ = writer.await;

        // Within the cap: every byte kept, root's alone.
        let _ = std::fs::remove_file(&sock);
        let listener = tokio::net::UnixListener::bind(&sock).unwrap_or_else(|e| panic!("{e}"));
        let writer = tokio::spawn(async move {
            let mut s = tokio::net::UnixStream::connect(&sock)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            s.write_all(&[1u8; 1000])
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        });
        let r = receive(listener, &out, 1 << 20).await;
        let _ = writer.await;
        assert_eq!(r, Ok(1000));
        let meta = std::fs::metadata(&out).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
            0o600
        );
    }

    /// Another VM's QEMU (another identity) cannot connect to the
    /// migration socket and hand the supervisor a state of its choosing;
    /// this VM's QEMU can.
    #[tokio::test]
    async fn only_the_vms_identity_reaches_the_migration_socket() {
        use std::os::unix::process::CommandExt;
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("SKIPPED: only_the_vms_identity_reaches_the_migration_socket needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let sock = dir.path().join("migrate.sock");
        // Ids no user or subordinate range has.
        let base = 0x6d00_0000 + 60_000;
        let identity = |n: u32| Identity {
            name: format!("test-{n}"),
            uid: nix::unistd::Uid::from_raw(n),
            gid: nix::unistd::Gid::from_raw(n),
            groups: Vec::new(),
        };
        let _listener = listen_for(&sock, &identity(base)).unwrap_or_else(|e| panic!("{e}"));
        let connect_as = |uid: u32| {
            std::process::Command::new("socat")
                .args(["-u", "OPEN:/dev/null"])
                .arg(format!("UNIX-CONNECT:{}", sock.display()))
                .uid(uid)
                .gid(uid)
                .stderr(std::process::Stdio::piped())
                .output()
                .unwrap_or_else(|e| panic!("socat (scripts/setup installs it): {e}"))
        };
        let other = connect_as(base + 1);
        assert!(!other.status.success(), "another identity connected");
        assert!(
            String::from_utf8_lossy(&other.stderr).contains("Permission denied"),
            "{}",
            String::from_utf8_lossy(&other.stderr)
        );
        let own = connect_as(base);
        assert!(
            own.status.success(),
            "QEMU's identity: {}",
            String::from_utf8_lossy(&own.stderr)
        );
    }
}
