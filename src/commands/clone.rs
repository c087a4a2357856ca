//! Throwaway clones for `run --snapshot --rm --clone`: a VM of its own
//! (name, identity, namespace, runtime folder) whose disk overlays the
//! project VM's snapshot and which resumes that snapshot's memory. The
//! project's VM — the template — is not touched: its snapshot is only
//! read, through a descriptor root opens for the clone's QEMU.

use std::path::Path;

use super::{Project, Result};
use crate::error::Error;
use crate::exit;
use crate::state::{self, Record, VmPaths, VmState};

/// The clone's files, made from the template's snapshot: a fresh overlay,
/// a copy of the seed and UEFI variables the snapshot was taken with, a
/// record naming the template. Returns the clone's project (its name the
/// clone's: `name`, or one made from the VM's); on failure nothing of it
/// is left.
pub fn make(template: &Project, name_wanted: Option<&str>) -> Result<Project> {
    let t = &template.vm;
    let name = template.cfg.name.clone();
    super::refuse_shares(
        &template.cfg,
        "a clone",
        "one store cannot be served to several VMs",
    )?;
    let rec = Record::load(&t.record())?
        .filter(|_| t.snapshot().is_file())
        .ok_or_else(|| crate::runstate::Refusal::Missing {
            name: name.clone(),
            what: "snapshot to clone",
            then: "; `migrant up`, then `migrant snapshot --memory`, saves one",
        })?;
    let clone_name = match name_wanted {
        Some(n) => {
            crate::config::check_name(n).map_err(|e| Error::other(exit::USAGE, e))?;
            n.to_string()
        }
        None => {
            // Within the 63 characters a name may have.
            let stem: String = name.chars().take(63 - 15).collect();
            format!("{stem}-clone-{}", random_suffix()?)
        }
    };
    let vm = template.paths.vm(&clone_name);
    if vm.state.exists() {
        return Err(Error::other(
            exit::USAGE,
            format!("a VM named {clone_name} exists already"),
        ));
    }
    let made = populate(t, &vm, &rec, &clone_name);
    if let Err(e) = made {
        let _ = std::fs::remove_dir_all(&vm.state);
        return Err(e);
    }
    let mut cfg = template.cfg.clone();
    cfg.name = clone_name;
    Ok(Project {
        cfg,
        paths: template.paths.clone(),
        vm,
    })
}

fn populate(t: &VmPaths, vm: &VmPaths, rec: &Record, clone_name: &str) -> Result<()> {
    state::ensure_dir(&vm.state, 0o711)?;
    let size = crate::image::info_as(&t.snapshot(), Some("qcow2"), false)?.virtual_size;
    crate::image::create_overlay(&t.snapshot(), &vm.disk(), size)?;
    copy(&t.seed(), &vm.seed())?;
    // The guest trusts the template's authority and holds its
    // placeholders: the clone brokers the same.
    let secrets = t.state.join(crate::secrets::vm::FILE);
    if secrets.is_file() {
        copy(&secrets, &vm.state.join(crate::secrets::vm::FILE))?;
    }
    if t.snapshot_nvram().is_file() {
        copy(&t.snapshot_nvram(), &vm.nvram())?;
    }
    let extra = crate::qemu::extra::stored_path(t);
    if extra.is_file() {
        copy(&extra, &crate::qemu::extra::stored_path(vm))?;
    }
    // The template's record (project, base image, the MAC the guest's
    // network device was saved with, owner), as a new stopped VM.
    Record {
        name: clone_name.to_string(),
        created_at: state::now(),
        state: VmState::Stopped,
        supervisor_pid: None,
        qemu_pid: None,
        accel: None,
        qemu_user: None,
        started_at: None,
        last_stop: None,
        provisioned: true,
        vm_id: None,
        cloud_init_done: true,
        restore_memory: crate::memsnap::load(t).is_some(),
        template: Some(t.name.clone()),
        ..rec.clone()
    }
    .save(&vm.record())?;
    Ok(())
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    state::copy_atomic(from, to).map_err(Error::io(to.display().to_string()))
}

fn random_suffix() -> Result<String> {
    let b: [u8; 4] = super::random_bytes()?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}
