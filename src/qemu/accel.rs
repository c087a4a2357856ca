//! Choosing the accelerator: KVM only where a probe shows it really runs a
//! guest, otherwise TCG with a warning.
//!
//! The probe starts QEMU with KVM, the baseline CPU model with `enforce`
//! (QEMU refuses to start when the host's KVM cannot provide it, which is
//! how broken nested set-ups show), and a 512-byte boot sector that writes
//! a marker to the serial port: only a guest that really ran prints it.
//! The answer is cached for this boot in the runtime directory.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::argv::Accelerator;
use super::process::{QEMU_BINARY, which};
use crate::config::Accel;

#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    #[error("accel = \"kvm\" was asked for, but KVM cannot run a guest here: {0}")]
    KvmUnusable(String),
}

impl AccelError {
    pub fn exit_code(&self) -> u8 {
        crate::exit::UNAVAILABLE
    }
}

const MARKER: &[u8] = b"MIGRANT-KVM-OK";

/// The probe: a boot sector that prints [`MARKER`] on COM1 and halts
/// (`firmware/kvm-probe.asm`, built into `firmware/kvm-probe.bin`).
const BOOT_SECTOR: &[u8; 512] = include_bytes!("../../firmware/kvm-probe.bin");

/// Run the probe (uncached). `Ok(())` when KVM really ran guest code.
pub fn probe_kvm() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("/dev/kvm: {e}"))?;
    let qemu = which(QEMU_BINARY).ok_or_else(|| format!("{QEMU_BINARY} not found"))?;
    let dir = tempfile_dir()?;
    let disk = dir.join("probe.img");
    std::fs::write(&disk, BOOT_SECTOR).map_err(|e| e.to_string())?;
    let mut child = Command::new(qemu)
        .args([
            "-accel",
            "kvm",
            "-machine",
            "pc",
            "-cpu",
            "qemu64,enforce",
            "-m",
            "16",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-drive",
        ])
        .arg(format!("file={},format=raw,if=ide", disk.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut out = child.stdout.take();
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(o) = out.as_mut() {
            let mut chunk = [0u8; 256];
            while let Ok(n) = o.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                if buf.windows(MARKER.len()).any(|w| w == MARKER) {
                    break;
                }
            }
        }
        buf
    });
    let result = loop {
        if reader.is_finished() {
            break Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            break Err(format!("QEMU with KVM exited ({status}): {}", err.trim()));
        }
        if Instant::now() > deadline {
            break Err("a KVM guest did not run its first instructions within 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    let buf = reader.join().unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    if buf.windows(MARKER.len()).any(|w| w == MARKER) {
        Ok(())
    } else {
        Err("the KVM probe guest printed nothing".into())
    }
}

fn tempfile_dir() -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("migrant-kvm-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    Ok(dir)
}

fn cache_path() -> PathBuf {
    crate::state::Paths::from_env().runtime.join("kvm-probe")
}

/// The probe's answer, cached for this boot (the runtime dir is a tmpfs).
pub fn kvm_usable() -> Result<(), String> {
    let cache = cache_path();
    if let Ok(s) = std::fs::read_to_string(&cache) {
        return match s.strip_prefix("ok") {
            Some(_) => Ok(()),
            None => Err(s.trim_start_matches("no: ").trim().to_string()),
        };
    }
    let r = probe_kvm();
    let text = match &r {
        Ok(()) => "ok\n".to_string(),
        Err(e) => format!("no: {e}\n"),
    };
    if let Some(dir) = cache.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = crate::state::write_atomic(&cache, text.as_bytes(), 0o600);
    r
}

/// Whether the VM's QEMU can use KVM. It runs as a subordinate id in
/// none of the user's groups (none is mapped), so it opens `/dev/kvm` only when the node is open to every user: mode 0666,
/// systemd's own default, which Debian and Ubuntu narrow to 0660 and the
/// `kvm` group. (QEMU 8.2 and later can instead be handed a descriptor the
/// user opened, `-accel kvm,device=/dev/fdset/N`; QEMU 7.2 cannot.)
fn usable_by_vm() -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata("/dev/kvm")
        .map_err(|e| format!("/dev/kvm: {e}"))?
        .permissions()
        .mode();
    if !open_to_all(mode) {
        return Err(format!(
            "the VM's own id opens /dev/kvm only when every user may \
             (mode 0666; here {:04o}): a udev rule `KERNEL==\"kvm\", MODE=\"0666\"` \
             does it (docs/rootless.md)",
            mode & 0o7777
        ));
    }
    kvm_usable()
}

/// Whether a device node of `mode` may be read and written by any user.
fn open_to_all(mode: u32) -> bool {
    mode & 0o006 == 0o006
}

/// Resolve the Migrantfile's `accel`.
pub fn resolve(want: Accel) -> Result<Accelerator, AccelError> {
    match want {
        Accel::Tcg => Ok(Accelerator::Tcg),
        Accel::Kvm => usable_by_vm()
            .map(|_| Accelerator::Kvm)
            .map_err(AccelError::KvmUnusable),
        Accel::Auto => match usable_by_vm() {
            Ok(()) => Ok(Accelerator::Kvm),
            Err(why) => {
                tracing::warn!(
                    "KVM cannot run a guest here ({why}); using TCG, which is much slower"
                );
                Ok(Accelerator::Tcg)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vms_own_id_needs_dev_kvm_open_to_all() {
        assert!(open_to_all(0o020666));
        assert!(!open_to_all(0o020660));
        assert!(!open_to_all(0o020664));
        assert!(!open_to_all(0o020662));
    }

    #[test]
    fn boot_sector_is_bootable_and_prints_marker() {
        let s = BOOT_SECTOR;
        assert_eq!(s.len(), 512);
        assert_eq!(&s[510..], &[0x55, 0xAA]);
        // mov dx, 0x3f8 first, then one `mov al, imm8; out dx, al` per byte.
        assert_eq!(&s[..3], &[0xBA, 0xF8, 0x03]);
        let printed: Vec<u8> = s[3..]
            .chunks(3)
            .take(MARKER.len())
            .map(|c| {
                assert_eq!((c[0], c[2]), (0xB0, 0xEE));
                c[1]
            })
            .collect();
        assert_eq!(printed, MARKER);
    }
}
