//! The VM's identity. The supervisor (of any user, root too), before
//! anything else, while it still has one thread, it takes the VM's index among the user's VMs
//! (the n-th id of their subordinate ranges is the VM's identity) and
//! enters a user namespace mapped from it ([`crate::userns`]). Root there
//! is the user, holding every capability over the namespaces it makes
//! next (the VM's network namespace, its TAP, nftables and routes) and
//! none on the host; id 1 there is the VM's identity, as which QEMU, the
//! dataplane and the tunnel run.

use crate::error::Error;
use crate::qemu::process::Identity;
use crate::state::{self, Paths, Record, VmPaths};
use crate::userns::{self, Mapping};

/// Take the VM's index and enter its user namespace (mapping `0` to the
/// user and `1` to the index-th subordinate id).
pub(super) fn enter(paths: &Paths, vm: &VmPaths) -> Result<(), Error> {
    let uid = nix::unistd::getuid();
    let gid = nix::unistd::getgid();
    let name = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| uid.to_string());
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .map_err(Error::io(format!("cannot read {path} (subordinate ids)")))
    };
    let uids = crate::subid::ranges(&read("/etc/subuid")?, &name, uid.as_raw());
    let gids = crate::subid::ranges(&read("/etc/subgid")?, &name, gid.as_raw());
    let have = crate::subid::total(&uids).min(crate::subid::total(&gids));
    let count = u32::try_from(have).unwrap_or(u32::MAX).max(1);
    let current = Record::load(&vm.record())?.and_then(|r| r.vm_id);
    let index = state::allocate_vm_id(&paths.ids(), vm, current, (0, count))?;
    let mapping = Mapping::for_vm(&name, (uid.as_raw(), gid.as_raw()), (&uids, &gids), index)?;
    userns::enter(&mapping, false)?;
    Ok(())
}

/// The VM's identity inside its user namespace: id 1, in the images
/// group alone (none of the user's groups is mapped), named by its id on
/// the host.
pub(super) fn vm_identity() -> Identity {
    let host = userns::host_uid(userns::VM_ID)
        .map(|id| id.to_string())
        .unwrap_or_else(|| "?".into());
    Identity {
        name: format!("vm-{host}"),
        uid: userns::VM_ID.into(),
        gid: userns::VM_ID.into(),
        groups: vec![userns::IMAGES_GID.into()],
    }
}
