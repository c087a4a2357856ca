//! What the Migrantfile asks that the VM does not have yet (`status`,
//! `up`): a helper of the commands, not a command.

use super::Project;
use crate::size::human;
use crate::state::Record;

/// Whose point of view [`pending_changes`] takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// The VM runs.
    Running,
    /// The VM is down.
    Stopped,
    /// `up` is booting it now.
    Booting,
}

/// Settings that differ between the Migrantfile and the VM as it was
/// built or last booted, each as one sentence.
pub fn pending_changes(p: &Project, rec: &Record, now: When) -> Vec<String> {
    let cfg = &p.cfg;
    let running = now == When::Running;
    let when = match now {
        When::Running => "applies at the next boot (`migrant halt && migrant up`)",
        When::Stopped => "applies at the next `migrant up`",
        When::Booting => "applies at this boot",
    };
    let mut notes = Vec::new();
    if let Some(cpus) = rec.cpus
        && cpus != cfg.cpus
    {
        notes.push(format!(
            "cpus = {} in the Migrantfile, the VM {} with {cpus}: {when}",
            cfg.cpus,
            if running { "runs" } else { "last ran" }
        ));
    }
    if let Some(mem) = rec.memory
        && mem != cfg.memory
    {
        notes.push(format!(
            "memory = {} in the Migrantfile, the VM {} with {}: {when}",
            human(cfg.memory),
            if running { "runs" } else { "last ran" },
            human(mem)
        ));
    }
    if let Ok(info) = crate::image::info_as(&p.vm.disk(), Some("qcow2"), true) {
        if cfg.disk > info.virtual_size {
            notes.push(format!(
                "disk = {} in the Migrantfile, the disk is {}: `migrant resize` grows it",
                human(cfg.disk),
                human(info.virtual_size)
            ));
        } else if cfg.disk < info.virtual_size {
            notes.push(format!(
                "disk = {} in the Migrantfile is smaller than the VM's {} disk; disks never shrink (`migrant destroy` and `up` to rebuild)",
                human(cfg.disk),
                human(info.virtual_size)
            ));
        }
    }
    if let Some(has) = built_with_ipv6(&p.vm)
        && has != cfg.network.ipv6
    {
        notes.push(format!(
            "ipv6 = {} in the Migrantfile, the VM was built with ipv6 = {has}; the guest's network is set when it is built (`migrant destroy` and `up` to rebuild){}",
            cfg.network.ipv6,
            if has { "; its IPv6 packets are dropped" } else { "" }
        ));
    }
    notes
}

/// Whether the VM was built with an IPv6 address: the guest's network
/// comes from the seed, which is written once (`None`: no readable seed).
pub fn built_with_ipv6(vm: &crate::state::VmPaths) -> Option<bool> {
    let net = crate::seed::read_seed_file(&vm.seed(), "network-config").ok()?;
    Some(crate::seed::network_config_has_ipv6(
        &String::from_utf8_lossy(&net),
    ))
}
