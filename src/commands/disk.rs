//! The disk lifecycle: `resize`, `snapshot`, `reset`; what changed in the
//! Migrantfile since the VM last booted.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use super::{Live, Project, Result, live};
use crate::error::Error;
use crate::exit;
use crate::provision::hooks::{self, Hook, Trigger};
use crate::size::human;
use crate::state::{Record, VmLock, VmPaths, VmState};
use crate::supervisor::control::{self, Request, Response};

fn trigger_of(trigger: &str) -> Trigger {
    match trigger {
        "reset" => Trigger::Reset,
        "run" => Trigger::Run,
        _ => Trigger::Snapshot,
    }
}

/// `hooks/pre-down` for commands that take the VM down: a failure aborts
/// `snapshot` (not `reset`), as for `halt` and `destroy`.
pub fn pre_down_hook(p: &Project, trigger: &str) -> Result<()> {
    let ip = p.cfg.guest_ip();
    hooks::fire(&p.cfg, Hook::PreDown, trigger_of(trigger), Some(ip), false)?;
    Ok(())
}

/// `hooks/post-down`; a failure only warns.
pub fn post_down_hook(p: &Project, trigger: &str) {
    let _ = hooks::fire(&p.cfg, Hook::PostDown, trigger_of(trigger), None, false);
}

/// `migrant resize [SIZE]`: grow the disk to SIZE (default: the
/// Migrantfile's `disk`). Live while the VM runs (QMP `block_resize`,
/// then the guest's partition and file system over SSH); with `qemu-img`
/// while it is stopped (cloud-init grows the file system at the next boot).
pub fn resize(p: &Project, size: Option<&str>) -> Result<u8> {
    let name = &p.cfg.name;
    let (target, from_cli) = match size {
        Some(s) => (
            crate::config::parse_size(s).map_err(|e| Error::other(exit::USAGE, e))?,
            true,
        ),
        None => (p.cfg.disk, false),
    };
    let current = |vm: &VmPaths| -> Result<u64> {
        Ok(crate::image::info_as(&vm.disk(), Some("qcow2"), true)?.virtual_size)
    };
    let refuse_shrink = |now: u64| {
        Error::other(
            if from_cli { exit::USAGE } else { exit::CONFIG },
            format!(
                "{name}: shrinking a disk is refused: it is {} ({now} bytes), {} ({target} bytes) requested{}",
                human(now),
                human(target),
                if from_cli {
                    ""
                } else {
                    " by `disk` in the Migrantfile; `migrant destroy` and `up` rebuild it smaller"
                }
            ),
        )
    };
    match live(&p.vm)? {
        Live::NotCreated => Err(crate::runstate::Refusal::NotCreated {
            name: name.to_string(),
            then: "; `migrant up` creates it with `disk` from the Migrantfile",
        }
        .into()),
        Live::Active(r) if r.state == VmState::Running || r.state == VmState::Paused => {
            let now = current(&p.vm)?;
            if target < now {
                return Err(refuse_shrink(now));
            }
            let resp = control::request(
                &p.vm.control_sock(),
                &Request::Resize { size: target },
                Duration::from_secs(60),
            )?;
            let Response::Resized { from, to } = resp else {
                return Err(crate::runstate::Refusal::UnexpectedAnswer.into());
            };
            if from == to {
                println!("==> {name}: the disk is already {}", human(to));
            } else {
                println!(
                    "==> {name}: disk grown from {} to {}",
                    human(from),
                    human(to)
                );
            }
            if r.state == VmState::Paused {
                println!(
                    "==> {name}: the VM is paused; grow the guest's file system once it runs (`migrant resize` again)"
                );
                return Ok(0);
            }
            grow_in_guest(p);
            Ok(0)
        }
        Live::Active(_) | Live::Busy => Err(crate::runstate::Refusal::busy(name).into()),
        Live::Stopped(_) => {
            let _lock = VmLock::try_acquire(&p.vm)?;
            let now = current(&p.vm)?;
            if target < now {
                return Err(refuse_shrink(now));
            }
            if target == now {
                println!("==> {name}: the disk is already {}", human(now));
                return Ok(0);
            }
            check_disk(&p.vm)?;
            crate::image::resize(&p.vm.disk(), target)?;
            println!(
                "==> {name}: disk grown from {} to {} (stopped: cloud-init grows the root file system at the next boot)",
                human(now),
                human(target)
            );
            Ok(0)
        }
    }
}

/// Grows the partition holding `/` and its file system to the end of
/// the disk. growpart exits 1 when there is nothing to grow.
const GROW_SCRIPT: &str = r#"set -e
src=$(findmnt -no SOURCE /)
name=$(basename "$src")
if [ -r "/sys/class/block/$name/partition" ]; then
  part=$(cat "/sys/class/block/$name/partition")
  disk=/dev/$(lsblk -no PKNAME "$src" | head -n 1)
  rc=0; out=$(growpart "$disk" "$part" 2>&1) || rc=$?
  if [ "$rc" -gt 1 ]; then echo "$out" >&2; exit "$rc"; fi
fi
case $(findmnt -no FSTYPE /) in
  ext2|ext3|ext4) resize2fs "$src" >/dev/null 2>&1 ;;
  xfs) xfs_growfs / >/dev/null ;;
  btrfs) btrfs filesystem resize max / >/dev/null ;;
esac
df -h --output=size / | tail -n 1"#;

/// Grow the guest's root partition and file system over SSH; a failure
/// only warns (the disk itself did grow).
fn grow_in_guest(p: &Project) {
    let name = &p.cfg.name;
    let run = || -> Result<std::process::Output> {
        let mut cmd = super::ssh_command(&p.cfg, &p.vm)?;
        let remote = format!(
            "sudo -n sh -c {}",
            crate::provision::ssh::sh_quote(GROW_SCRIPT)
        );
        cmd.args(["-o", "BatchMode=yes", "--", &remote])
            .stdin(Stdio::null());
        cmd.output().map_err(Error::io("cannot run ssh"))
    };
    match run() {
        Ok(out) if out.status.success() => {
            let size = String::from_utf8_lossy(&out.stdout).trim().to_string();
            println!("==> {name}: the guest's root file system is now {size}");
        }
        Ok(out) => eprintln!(
            "warning: {name}: growing the guest's root file system failed ({}); grow it inside the guest (growpart, resize2fs)",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => eprintln!(
            "warning: {name}: {}; grow the root file system inside the guest",
            crate::exit::chain(&e)
        ),
    }
}

/// Stop the VM for `trigger` (`snapshot`, `reset`), with the down hooks.
fn take_down(p: &Project, trigger: &str, force: bool) -> Result<()> {
    let name = &p.cfg.name;
    match live(&p.vm)? {
        Live::NotCreated => Err(crate::runstate::Refusal::NotCreated {
            name: name.to_string(),
            then: "; `migrant up` creates it",
        }
        .into()),
        // A reset tears the VM down whether or not it runs, and says so to
        // the down hooks (as the original tool does); their failure only
        // warns.
        Live::Stopped(_) if trigger == "reset" => {
            hooks::fire(&p.cfg, Hook::PreDown, Trigger::Reset, None, true)?;
            post_down_hook(p, trigger);
            Ok(())
        }
        Live::Stopped(_) => Ok(()),
        Live::Active(r) if r.state == VmState::Running || r.state == VmState::Paused => {
            pre_down_hook(p, trigger)?;
            println!(
                "==> {name}: {} for the {trigger}",
                if force { "stopping" } else { "shutting down" }
            );
            super::lifecycle::stop(&p.vm, force, p.cfg.halt_timeout)?;
            post_down_hook(p, trigger);
            Ok(())
        }
        Live::Active(_) | Live::Busy => Err(crate::runstate::Refusal::busy(name).into()),
    }
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(path.display().to_string())(e)
}

/// Copy `from` to `to` through a temporary file and a rename.
fn copy_atomic(from: &Path, to: &Path) -> Result<()> {
    crate::state::copy_atomic(from, to).map_err(io_at(to))
}

/// Refuse (65) a VM disk whose backing chain is not the one migrant made:
/// an overlay on the VM's base image or on its snapshot.
fn check_disk(vm: &VmPaths) -> Result<()> {
    let base = crate::state::Record::load(&vm.record())?
        .map(|r| r.base_image)
        .ok_or_else(|| Error::other(exit::DATAERR, format!("{}: no record", vm.name)))?;
    crate::image::check_disk_chain(&vm.disk(), &[&base, &vm.snapshot()], false)?;
    Ok(())
}

/// Replace the VM's disk with an empty overlay on its snapshot.
fn disk_from_snapshot(vm: &VmPaths) -> Result<()> {
    let snap = vm.snapshot();
    let size = crate::image::info_as(&snap, Some("qcow2"), false)?.virtual_size;
    let tmp = vm.state.join(".disk.qcow2.tmp");
    let _ = std::fs::remove_file(&tmp);
    let r = crate::image::create_overlay(&snap, &tmp, size)
        .map_err(Error::from)
        .and_then(|()| std::fs::rename(&tmp, vm.disk()).map_err(io_at(&vm.disk())));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r?;
    // Fresh on a memory snapshot: the next start resumes it.
    let memory = crate::memsnap::load(vm).is_some();
    Record::update(&vm.record(), |r| r.restore_memory = memory)?;
    Ok(())
}

/// `migrant snapshot`: shut the VM down cleanly, flatten its disk into
/// `snapshot.qcow2` (and keep its UEFI variables); the VM stays down.
pub fn snapshot(p: &Project) -> Result<u8> {
    let name = &p.cfg.name;
    let vm = &p.vm;
    crate::runstate::refuse_with_clones(vm)?;
    take_down(p, "snapshot", false)?;
    let _lock = VmLock::try_acquire(vm)?;
    if !vm.disk().exists() {
        return Err(crate::runstate::Refusal::Missing {
            name: name.to_string(),
            what: "disk",
            then: "; `migrant up` creates it",
        }
        .into());
    }
    if vm.snapshot().exists() {
        println!("==> {name}: replacing the existing snapshot");
    }
    // The disk is QEMU's to write: its header must still name only what
    // migrant made before root's qemu-img reads its chain.
    check_disk(vm)?;
    println!("==> {name}: saving the disk into a snapshot");
    // A memory snapshot being replaced stops being one first.
    crate::memsnap::forget(vm);
    let tmp = vm.state.join(".snapshot.qcow2.tmp");
    let _ = std::fs::remove_file(&tmp);
    let flat = crate::image::convert_flat(&vm.disk(), &tmp)
        .map_err(Error::from)
        .and_then(|()| {
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .and_then(|()| {
                    // Root's alone; the supervisor lets this VM's identity
                    // (and no other) read it when a disk overlays it.
                    std::fs::set_permissions(
                        &tmp,
                        std::os::unix::fs::PermissionsExt::from_mode(0o600),
                    )
                })
                .map_err(io_at(&tmp))
        })
        .and_then(|()| std::fs::rename(&tmp, vm.snapshot()).map_err(io_at(&vm.snapshot())));
    if let Err(e) = flat {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if vm.nvram().exists() {
        copy_atomic(&vm.nvram(), &vm.snapshot_nvram())?;
    } else {
        let _ = std::fs::remove_file(vm.snapshot_nvram());
    }
    // The disk now equals the snapshot: start it afresh on top of it.
    disk_from_snapshot(vm)?;
    println!(
        "==> {name}: snapshot saved ({}, {}); the VM stays down: `migrant up` boots it, `migrant reset` returns to this state",
        vm.snapshot().display(),
        human(crate::image::cache::disk_usage(&vm.snapshot()))
    );
    Ok(0)
}

/// `migrant snapshot --memory [--stop]`: save the running VM's memory,
/// device state and disk of one moment as its snapshot (the supervisor
/// does it while the guest is paused); the VM runs on, or stops with a
/// fresh disk on the snapshot, so that `up` resumes it.
pub fn snapshot_memory(p: &Project, stop: bool) -> Result<u8> {
    let name = &p.cfg.name;
    let vm = &p.vm;
    crate::runstate::refuse_with_clones(vm)?;
    super::refuse_shares(
        &p.cfg,
        "a memory snapshot",
        "QEMU 7.2 cannot save a virtiofs device's state. `migrant snapshot` saves the disk alone",
    )?;
    match live(vm)? {
        Live::Active(r) if r.state == VmState::Running => {}
        Live::Active(_) | Live::Busy => {
            return Err(crate::runstate::Refusal::Busy {
                name: name.to_string(),
                now: "starting, stopping or paused; try again once it runs",
            }
            .into());
        }
        _ => {
            return Err(crate::runstate::Refusal::not_running(
                name,
                ": a memory snapshot saves a running VM (`migrant up` first; `migrant snapshot` saves a stopped VM's disk)",
            )
            .into());
        }
    }
    if stop {
        pre_down_hook(p, "snapshot")?;
    }
    // The saved disk is the one of the paused moment; the guest's page
    // cache is in the saved memory. Written out first, so that the disk
    // alone (`--cold`) holds what the guest wrote until now.
    sync_guest(p);
    println!("==> {name}: pausing the guest to save its memory and disk");
    let resp = control::request(
        &vm.control_sock(),
        &Request::SaveMemory { stop },
        Duration::from_secs(900),
    )?;
    let Response::MemorySaved {
        state_bytes,
        disk_bytes,
        paused_ms,
        stopped,
    } = resp
    else {
        return Err(crate::runstate::Refusal::UnexpectedAnswer.into());
    };
    println!(
        "==> {name}: memory snapshot saved: memory {}, disk {}; the guest was paused {:.1} s",
        human(state_bytes),
        human(disk_bytes),
        paused_ms as f64 / 1000.0
    );
    if stopped {
        super::wait_unlocked(vm, Duration::from_secs(30));
        let _lock = VmLock::try_acquire(vm)?;
        // The disk now equals the snapshot: a fresh overlay, resumed by
        // the next `up`.
        disk_from_snapshot(vm)?;
        Record::update(&vm.record(), |r| {
            r.last_stop = Some("stopped after a memory snapshot".into())
        })?;
        post_down_hook(p, "snapshot");
        println!(
            "==> {name}: stopped; `migrant up` resumes it, `migrant reset` and `migrant run --snapshot` return to it"
        );
    } else {
        println!(
            "==> {name}: the VM runs on; `migrant reset` and `migrant run --snapshot` return to this moment"
        );
    }
    Ok(0)
}

/// `sync` in the guest; a failure only warns.
fn sync_guest(p: &Project) {
    let synced = super::ssh_command(&p.cfg, &p.vm).and_then(|mut cmd| {
        cmd.args(["-o", "BatchMode=yes", "--", "sync"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .map_err(Error::io("cannot run ssh"))
    });
    if !synced.as_ref().is_ok_and(|s| s.success()) {
        eprintln!(
            "warning: {}: cannot flush the guest's file systems before the snapshot; its disk alone (`--cold`) may miss the last seconds' writes",
            p.cfg.name
        );
    }
}

/// `migrant reset`: rebuild the VM from its snapshot and start it;
/// provisioning does not run again.
pub fn reset(p: &Project, timeout: u64, cold: bool) -> Result<u8> {
    if p.vm.snapshot().exists() {
        super::up::check_resumable(p, cold)?;
    }
    restore_snapshot(p, "reset")?;
    super::up::up(
        p,
        &super::up::UpOptions {
            timeout,
            autoconnect: false,
            trigger: Trigger::Reset,
            cold,
        },
    )
}

/// Stop the VM if it runs (forced: its changes are being thrown away) and
/// rebuild its disk and UEFI variables from its snapshot, which is kept.
/// `trigger` is what the down hooks are told (`reset` or `run`); their
/// failure does not stop it.
pub fn restore_snapshot(p: &Project, trigger: &str) -> Result<()> {
    let name = &p.cfg.name;
    let vm = &p.vm;
    if !vm.snapshot().exists() {
        return Err(crate::runstate::Refusal::Missing {
            name: name.to_string(),
            what: "snapshot",
            then: "; `migrant snapshot` saves one",
        }
        .into());
    }
    take_down(p, trigger, true)?;
    let _lock = VmLock::try_acquire(vm)?;
    println!(
        "==> {name}: rebuilding from the snapshot of {}",
        snapshot_age(vm).unwrap_or_default()
    );
    disk_from_snapshot(vm)?;
    if vm.snapshot_nvram().exists() {
        copy_atomic(&vm.snapshot_nvram(), &vm.nvram())?;
    } else {
        let _ = std::fs::remove_file(vm.nvram());
    }
    Record::update(&vm.record(), |r| {
        r.provisioned = true;
        r.last_stop = Some("reset to its snapshot".into());
    })?;
    Ok(())
}

/// `5 minutes ago`, from the snapshot's time.
pub fn snapshot_age(vm: &VmPaths) -> Option<String> {
    let m = std::fs::metadata(vm.snapshot()).ok()?;
    let t = m
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    Some(crate::image::age(t))
}

/// `disk, saved 5 minutes ago (412.0 MiB)`, `memory, saved … (disk …,
/// memory …)` or `None`.
pub fn snapshot_summary(vm: &VmPaths) -> Option<String> {
    let age = snapshot_age(vm)?;
    let disk = human(crate::image::cache::disk_usage(&vm.snapshot()));
    Some(match crate::memsnap::load(vm) {
        Some(_) => format!(
            "memory, saved {age} (disk {disk}, memory {})",
            human(crate::image::cache::disk_usage(&vm.snapshot_state()))
        ),
        None => format!("disk, saved {age} ({disk})"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grow_script_is_plain_sh() {
        // Quoted as one argument for the remote shell.
        let q = crate::provision::ssh::sh_quote(GROW_SCRIPT);
        assert!(q.starts_with('\'') && q.ends_with('\''));
        assert!(GROW_SCRIPT.contains("growpart") && GROW_SCRIPT.contains("resize2fs"));
    }
}
