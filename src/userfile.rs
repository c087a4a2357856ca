//! Files a project names (the Migrantfile, `cloud-init.yml`, the
//! WireGuard file, a local base image, a secret's file), read by
//! migrant's own process with the rights of the user running it, never
//! more: there is no privileged process to read for anyone. That user
//! must control the project folder ([`foreign_controller`]): a folder
//! another user controls can swap what lies beneath it (a Migrantfile, a
//! hook, a symlink to the runner's own files), so migrant refuses it.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The whole of `path` as text, at most `max` bytes.
pub fn read_to_string(path: &Path, max: u64) -> std::io::Result<String> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(max.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {max} bytes"),
        ));
    }
    String::from_utf8(bytes)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"))
}

/// The user other than `me` who controls `dir`: the owner of the nearest
/// folder on the path to it (itself included) that root does not own,
/// when that is not `me`. (Root's folders are root's to change anyway.)
pub fn foreign_controller(dir: &Path, me: u32) -> Option<u32> {
    dir.ancestors()
        .filter_map(|a| std::fs::symlink_metadata(a).ok())
        .map(|m| m.uid())
        .find(|uid| *uid != 0)
        .filter(|uid| *uid != me)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_read_with_a_cap() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = dir.path().join("f");
        std::fs::write(&p, "hello").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read_to_string(&p, 100).ok().as_deref(), Some("hello"));
        assert!(read_to_string(&p, 3).is_err(), "the cap holds");
    }

    #[test]
    fn a_folder_is_controlled_by_the_nearest_owner_other_than_root() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let me = nix::unistd::geteuid().as_raw();
        let owner = std::fs::metadata(dir.path())
            .unwrap_or_else(|e| panic!("{e}"))
            .uid();
        // Made by this process: ours (or root's, all the way up).
        assert_eq!(foreign_controller(dir.path(), me), None);
        // Seen by anyone else, the folder's owner controls it (unless
        // every folder on the way is root's).
        let other = me.wrapping_add(1);
        let expected = (owner != 0).then_some(owner);
        assert_eq!(foreign_controller(dir.path(), other), expected);
    }
}
