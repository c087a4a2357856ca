//! Whether a VM runs, from its record and its lock, and the one way a VM
//! that stopped is tidied up: used by the commands (a stale record left by
//! a dead supervisor is repaired when read) and by the supervisor itself
//! when it ends.

use crate::state::{Record, StateError, VmLock, VmPaths, VmState};

/// What is true of a VM now, from its record and its lock.
#[derive(Debug, Clone, PartialEq)]
pub enum Live {
    NotCreated,
    /// Created, nothing runs.
    Stopped(Record),
    /// A supervisor holds the lock.
    Active(Record),
    /// Something (an `up` or `destroy` in progress) holds the lock but the
    /// record is gone or new.
    Busy,
}

/// A command the VM's state refuses: each a case callers and tests tell
/// apart, with its exit code (the text after the VM's name says what to
/// do).
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// No such VM yet (69).
    #[error("{name} is not created{then}")]
    NotCreated { name: String, then: &'static str },
    /// It must run for this (69).
    #[error("{name} is not running{then}")]
    NotRunning { name: String, then: &'static str },
    /// It is between states: starting, stopping or paused (75).
    #[error("{name} is {now}")]
    Busy { name: String, now: &'static str },
    /// The command needs a snapshot it has not got (69).
    #[error("{name} has no {what}{then}")]
    Missing {
        name: String,
        what: &'static str,
        then: &'static str,
    },
    /// Clones' disks overlay its snapshot (75): it may not go, nor its
    /// snapshot change, while they exist.
    #[error(
        "{name} has clones whose disks overlay its snapshot ({}): `migrant destroy --name CLONE` each first",
        clones.join(", ")
    )]
    HasClones { name: String, clones: Vec<String> },
    /// The supervisor answered with something this command never asks
    /// for (70).
    #[error("unexpected answer from the supervisor")]
    UnexpectedAnswer,
}

impl Refusal {
    pub fn exit_code(&self) -> u8 {
        match self {
            Refusal::NotCreated { .. } | Refusal::NotRunning { .. } | Refusal::Missing { .. } => {
                crate::exit::UNAVAILABLE
            }
            Refusal::Busy { .. } | Refusal::HasClones { .. } => crate::exit::TEMPFAIL,
            Refusal::UnexpectedAnswer => crate::exit::SOFTWARE,
        }
    }

    /// "starting or stopping; try again"
    pub fn busy(name: &str) -> Refusal {
        Refusal::Busy {
            name: name.to_string(),
            now: "starting or stopping; try again",
        }
    }

    pub fn not_running(name: &str, then: &'static str) -> Refusal {
        Refusal::NotRunning {
            name: name.to_string(),
            then,
        }
    }
}

/// Refused while other VMs are clones of `vm` (their disks overlay its
/// snapshot): before destroying it or replacing its snapshot.
pub fn refuse_with_clones(vm: &VmPaths) -> Result<(), Refusal> {
    let clones = clones_of(vm);
    if clones.is_empty() {
        return Ok(());
    }
    Err(Refusal::HasClones {
        name: vm.name.clone(),
        clones,
    })
}

/// The VMs beside `vm` (in the same state folder) whose record names it
/// as their template, by name, sorted.
pub fn clones_of(vm: &VmPaths) -> Vec<String> {
    let Some(vms) = vm.state.parent() else {
        return Vec::new();
    };
    let mut clones: Vec<String> = std::fs::read_dir(vms)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Record::load(&e.path().join("record.json")).ok().flatten())
        .filter(|r| r.template.as_deref() == Some(vm.name.as_str()) && r.name != vm.name)
        .map(|r| r.name)
        .collect();
    clones.sort();
    clones
}

/// The VM's state; a stale record (dead supervisor) is repaired here.
pub fn live(vm: &VmPaths) -> Result<Live, StateError> {
    let rec = Record::load(&vm.record())?;
    let held = VmLock::is_held(vm);
    Ok(match (rec, held) {
        (None, false) => Live::NotCreated,
        (None, true) => Live::Busy,
        (Some(r), true) => Live::Active(r),
        (Some(r), false) if r.state == VmState::Stopped => Live::Stopped(r),
        (Some(_), false) => match repair_stale(vm)? {
            Some(r) => Live::Stopped(r),
            // Removed meanwhile (a `destroy`).
            None => Live::NotCreated,
        },
    })
}

/// The supervisor died without cleaning up: kill a QEMU it left (it
/// should have died with it), then what the supervisor does when it
/// ends ([`stopped`]).
fn repair_stale(vm: &VmPaths) -> Result<Option<Record>, StateError> {
    let rec = Record::load(&vm.record())?;
    if let Some(pid) = rec.as_ref().and_then(|r| r.qemu_pid)
        && process_is(pid, "qemu-system")
    {
        tracing::warn!("killing QEMU {pid} left behind by a dead supervisor");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    stopped(vm, Some("its supervisor died"))
}

/// A VM that no longer runs: its runtime files removed, its share stores
/// unmounted (their loop devices freed, never deleted), its record marked
/// stopped (with `why`, when given). The supervisor's last act, and the
/// repair of one that died.
pub fn stopped(vm: &VmPaths, why: Option<&str>) -> Result<Option<Record>, StateError> {
    for sock in [
        vm.control_sock(),
        vm.ssh_sock(),
        vm.console_sock(),
        vm.qmp_sock(),
    ] {
        let _ = std::fs::remove_file(sock);
    }
    let _ = std::fs::remove_dir(&vm.run);
    Record::update(&vm.record(), |r| {
        r.state = VmState::Stopped;
        r.supervisor_pid = None;
        r.qemu_pid = None;
        r.started_at = None;
        if let Some(why) = why {
            r.last_stop = Some(why.to_string());
        }
    })
}

/// Whether `pid` runs a program whose name starts with `prefix`.
pub fn process_is(pid: u32, prefix: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim().starts_with(prefix))
        .unwrap_or(false)
}
