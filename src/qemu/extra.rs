//! Every source of extra QEMU arguments, in one place: those a pre-up
//! hook gave when the VM was made (kept in the VM's state folder, root's
//! 0600, reused at each start), then `MIGRANT_QEMU_EXTRA_ARGS` (shell
//! words; for benchmarks and debugging: `scripts/bench/share` adds a 9p
//! export this way). They are appended last to the argv, and QEMU runs
//! as the VM's identity with them, like with everything else.

use std::path::PathBuf;

use crate::state::VmPaths;

/// Where the VM keeps a hook's arguments, in its state folder.
const STORED: &str = "qemu-extra-args.json";

pub fn stored_path(vm: &VmPaths) -> PathBuf {
    vm.state.join(STORED)
}

/// Keep `args` for `vm` (atomically, root's 0600).
pub fn store(vm: &VmPaths, args: &[String]) -> std::io::Result<()> {
    let data = serde_json::to_vec(args).map_err(std::io::Error::other)?;
    crate::state::write_atomic(&stored_path(vm), &data, 0o600)
        .map_err(|e| std::io::Error::other(e.to_string()))
}

/// Drop the stored arguments (a VM whose creation was undone).
pub fn forget(vm: &VmPaths) {
    let _ = std::fs::remove_file(stored_path(vm));
}

/// The arguments kept for `vm` (none if it has no file).
pub fn stored(vm: &VmPaths) -> std::io::Result<Vec<String>> {
    match std::fs::read(stored_path(vm)) {
        Ok(data) => serde_json::from_slice(&data).map_err(std::io::Error::other),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// `MIGRANT_QEMU_EXTRA_ARGS` as shell words; unparseable text is ignored
/// with a warning.
pub fn from_env() -> Vec<String> {
    let Ok(text) = std::env::var("MIGRANT_QEMU_EXTRA_ARGS") else {
        return Vec::new();
    };
    shlex::split(&text).unwrap_or_else(|| {
        tracing::warn!("MIGRANT_QEMU_EXTRA_ARGS is not valid shell words; ignored");
        Vec::new()
    })
}

/// Everything appended to `vm`'s QEMU command line, in order.
pub fn for_vm(vm: &VmPaths) -> std::io::Result<Vec<String>> {
    let mut extra = stored(vm)?;
    extra.extend(from_env());
    Ok(extra)
}
