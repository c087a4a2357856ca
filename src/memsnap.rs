//! Memory snapshots: what one was taken with, and whether the VM the
//! Migrantfile asks for now can resume it.
//!
//! A memory snapshot is three files in the VM's state folder: the disk as
//! it was at that moment (`snapshot.qcow2`, flattened, as for a disk
//! snapshot), QEMU's migration stream of memory and device state
//! (`snapshot.vmstate`, root's, 0600: it holds the guest's memory with its
//! keys and tokens) and this record (`snapshot.json`). Without the record
//! the snapshot is a disk snapshot: the record is written last and removed
//! first.

use serde::{Deserialize, Serialize};

use crate::qemu::FirmwareFiles;
use crate::state::{self, VmPaths};

/// What a memory snapshot was taken with: QEMU restores a migration
/// stream only into the same machine.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Meta {
    /// `qemu-system-x86_64 --version`'s first line.
    pub qemu_version: String,
    /// The machine type (`q35`, `q35,smm=on`).
    pub machine: String,
    pub accel: String,
    pub cpus: u32,
    pub memory_mib: u64,
    /// `bios`, `uefi` or `uefi-secure-boot`.
    pub firmware: String,
    /// Shared folders (virtiofs devices): none, QEMU 7.2 cannot migrate
    /// them.
    #[serde(default)]
    pub shares: usize,
    /// Unix seconds.
    pub created_at: u64,
    /// Size of `snapshot.vmstate` in bytes.
    pub state_bytes: u64,
    /// How long the guest was paused for the snapshot.
    pub paused_ms: u64,
}

/// The machine facts [`Meta`] keeps, for the VM about to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    pub qemu_version: String,
    pub machine: String,
    pub accel: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub firmware: String,
    pub shares: usize,
}

impl Machine {
    /// The machine QEMU is about to run: `firmware`, `accel`, (cpus,
    /// memory in MiB), `shares` virtiofs devices.
    pub fn of(
        firmware: &FirmwareFiles,
        accel: crate::qemu::Accelerator,
        (cpus, memory_mib): (u32, u64),
        shares: usize,
        qemu_version: String,
    ) -> Machine {
        Machine {
            qemu_version,
            machine: crate::qemu::machine_type(firmware).to_string(),
            accel: accel.as_str().to_string(),
            cpus,
            memory_mib,
            firmware: firmware_kind(firmware).to_string(),
            shares,
        }
    }

    /// The machine a Migrantfile asks for, with `accel` as given (the
    /// accelerator is resolved, and checked, when QEMU starts).
    pub fn for_config(cfg: &crate::config::Config, accel: &str, qemu_version: String) -> Machine {
        let firmware = match cfg.firmware {
            crate::config::Firmware::Bios => FirmwareFiles::Bios,
            _ => FirmwareFiles::Uefi {
                code: Default::default(),
                vars: Default::default(),
                secure_boot: cfg.secure_boot,
            },
        };
        Machine {
            qemu_version,
            machine: crate::qemu::machine_type(&firmware).to_string(),
            accel: accel.to_string(),
            cpus: cfg.cpus,
            memory_mib: cfg.memory / (1024 * 1024),
            firmware: firmware_kind(&firmware).to_string(),
            shares: cfg.shares.len(),
        }
    }
}

pub fn firmware_kind(f: &FirmwareFiles) -> &'static str {
    match f {
        FirmwareFiles::Bios => "bios",
        FirmwareFiles::Uefi {
            secure_boot: false, ..
        } => "uefi",
        FirmwareFiles::Uefi {
            secure_boot: true, ..
        } => "uefi-secure-boot",
    }
}

impl Meta {
    pub fn new(m: Machine, state_bytes: u64, paused_ms: u64) -> Meta {
        Meta {
            qemu_version: m.qemu_version,
            machine: m.machine,
            accel: m.accel,
            cpus: m.cpus,
            memory_mib: m.memory_mib,
            firmware: m.firmware,
            shares: m.shares,
            created_at: state::now(),
            state_bytes,
            paused_ms,
        }
    }

    /// Why the snapshot cannot be resumed by `now`, if it cannot.
    pub fn mismatch(&self, now: &Machine) -> Option<String> {
        let (t, n) = (self, now);
        let checks = [
            (
                t.qemu_version != n.qemu_version,
                format!(
                    "it was taken with {:?}, this host runs {:?}",
                    t.qemu_version, n.qemu_version
                ),
            ),
            (
                t.machine != n.machine,
                format!("machine {} then, {} now", t.machine, n.machine),
            ),
            (
                t.accel != n.accel,
                format!("accelerator {} then, {} now", t.accel, n.accel),
            ),
            (
                t.cpus != n.cpus,
                format!("{} CPUs then, {} now", t.cpus, n.cpus),
            ),
            (
                t.memory_mib != n.memory_mib,
                format!("memory {} MiB then, {} MiB now", t.memory_mib, n.memory_mib),
            ),
            (
                t.firmware != n.firmware,
                format!("firmware {} then, {} now", t.firmware, n.firmware),
            ),
            (
                t.shares != n.shares,
                format!(
                    "{} shared folders then, {} now (QEMU cannot restore shares)",
                    t.shares, n.shares
                ),
            ),
        ];
        let why: Vec<String> = checks
            .into_iter()
            .filter_map(|(differs, text)| differs.then_some(text))
            .collect();
        (!why.is_empty()).then(|| why.join("; "))
    }
}

/// The memory snapshot's record, if the VM's snapshot is one.
pub fn load(vm: &VmPaths) -> Option<Meta> {
    let text = std::fs::read(vm.snapshot_meta()).ok()?;
    let meta: Meta = serde_json::from_slice(&text).ok()?;
    vm.snapshot_state().is_file().then_some(meta)
}

/// Make the VM's snapshot a disk snapshot again (its memory state gone):
/// the record first, so a crash in between leaves a disk snapshot.
pub fn forget(vm: &VmPaths) {
    let _ = std::fs::remove_file(vm.snapshot_meta());
    let _ = std::fs::remove_file(vm.snapshot_state());
}

/// `qemu-system-x86_64 --version`'s first line.
pub fn qemu_version() -> std::io::Result<String> {
    let out = std::process::Command::new(crate::qemu::process::QEMU_BINARY)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "{} --version exited with {}",
            crate::qemu::process::QEMU_BINARY,
            out.status
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string())
}

/// Write the record (private, like the VM's other records).
pub fn save(vm: &VmPaths, meta: &Meta) -> Result<(), state::StateError> {
    let json = serde_json::to_vec_pretty(meta).unwrap_or_default();
    state::write_private(&vm.snapshot_meta(), &json)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> Machine {
        Machine {
            qemu_version: "QEMU emulator version 7.2.22".into(),
            machine: "q35".into(),
            accel: "tcg".into(),
            cpus: 2,
            memory_mib: 2048,
            firmware: "bios".into(),
            shares: 0,
        }
    }

    #[test]
    fn the_same_machine_resumes() {
        let meta = Meta::new(machine(), 1, 2);
        assert_eq!(meta.mismatch(&machine()), None);
    }

    #[test]
    fn every_difference_is_named() {
        let meta = Meta::new(machine(), 1, 2);
        let mut now = machine();
        now.cpus = 4;
        now.memory_mib = 4096;
        now.qemu_version = "QEMU emulator version 8.2.0".into();
        let why = meta.mismatch(&now).unwrap_or_default();
        assert!(why.contains("2 CPUs then, 4 now"), "{why}");
        assert!(why.contains("memory 2048 MiB then, 4096 MiB now"), "{why}");
        assert!(why.contains("8.2.0"), "{why}");
        let mut now = machine();
        now.firmware = "uefi".into();
        assert_eq!(
            meta.mismatch(&now).as_deref(),
            Some("firmware bios then, uefi now")
        );
    }
}
