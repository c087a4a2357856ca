//! One more reader for a root-owned file: a POSIX access ACL
//! (`system.posix_acl_access`) naming one user.
//!
//! A VM's record, egress journal and WireGuard report are read by
//! `status`, `egress` and `wg` without root, by the user who made the VM
//! and by nobody else. Owning the files would let that user rewrite what
//! root later trusts; a group would admit its other members. An ACL entry
//! grants exactly one uid read access to a file root keeps owning (0600
//! plus `user:UID:r--`, shown by `ls` as `-rw-r-----+`).
//!
//! The xattr's layout is the kernel's (`include/uapi/linux/posix_acl_xattr.h`):
//! a little-endian version word (2), then entries of tag, permissions and
//! id, ordered by tag and, for named users, by id.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;
const UNDEFINED_ID: u32 = u32::MAX;
const READ: u16 = 4;
const WRITE: u16 = 2;

/// The ACL "owner read-write, `uid` `perm`, nobody else anything".
fn owner_and(uid: u32, perm: u16) -> Vec<u8> {
    let entries = [
        (USER_OBJ, READ | WRITE, UNDEFINED_ID),
        (USER, perm, uid),
        (GROUP_OBJ, 0, UNDEFINED_ID),
        (MASK, perm, UNDEFINED_ID),
        (OTHER, 0, UNDEFINED_ID),
    ];
    let mut out = VERSION.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}

/// Make `file` readable and writable by its owner and readable by `uid`,
/// nothing for anyone else. `uid` 0 needs no entry: the file is made 0600.
/// A file system without ACLs gives the error (the file stays 0600).
pub fn let_read(file: &File, uid: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if uid == 0 {
        return file.set_permissions(std::fs::Permissions::from_mode(0o600));
    }
    set(file, &owner_and(uid, READ))
}

/// Make `file` readable and writable by its owner and by `uid`, nothing
/// for anyone else: running without root, a VM's disk stays the user's
/// (who copies, resizes and deletes it) and its QEMU, another id, uses it.
pub fn let_write(file: &File, uid: u32) -> io::Result<()> {
    set(file, &owner_and(uid, READ | WRITE))
}

/// Replace `file`'s access ACL; on failure the file is left 0600.
fn set(file: &File, acl: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: the name is a NUL-terminated literal, `acl` outlives the
    // call and its length is passed; the descriptor is owned by `file`.
    let rc = unsafe {
        libc::fsetxattr(
            file.as_raw_fd(),
            c"system.posix_acl_access".as_ptr(),
            acl.as_ptr().cast(),
            acl.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        let err = io::Error::last_os_error();
        let _ = file.set_permissions(std::fs::Permissions::from_mode(0o600));
        Err(err)
    }
}

/// Give `file` its reader, or say (once per call site's file) why the
/// owner will need root to read it: the file stays root's alone.
pub fn let_read_or_warn(file: &File, uid: Option<u32>, what: &std::path::Path) {
    if let Err(e) = let_read(file, uid.unwrap_or(0)) {
        tracing::warn!(
            "{}: cannot grant read access to uid {}: {e}; only root can read it",
            what.display(),
            uid.unwrap_or(0)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_entries_are_in_the_kernels_order_and_layout() {
        let a = owner_and(1000, READ);
        assert_eq!(a.len(), 4 + 5 * 8);
        assert_eq!(&a[..4], &[2, 0, 0, 0]);
        let tags: Vec<u16> = a[4..]
            .chunks(8)
            .map(|e| u16::from_le_bytes([e[0], e[1]]))
            .collect();
        assert_eq!(tags, [USER_OBJ, USER, GROUP_OBJ, MASK, OTHER]);
        assert_eq!(&a[12..20], &[2, 0, 4, 0, 0xe8, 3, 0, 0]);
    }

    #[test]
    fn the_file_shows_the_mask_as_its_group_bits() {
        let dir = std::env::temp_dir().join(format!("migrant-acl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let path = dir.join("f");
        let f = File::create(&path).unwrap_or_else(|e| panic!("{e}"));
        match let_read(&f, 4242) {
            Ok(()) => {
                let mode = f.metadata().map(|m| m.permissions().mode()).unwrap_or(0);
                assert_eq!(mode & 0o777, 0o640);
            }
            // A temporary folder without ACL support: the file is 0600.
            Err(_) => {
                let mode = f.metadata().map(|m| m.permissions().mode()).unwrap_or(0);
                assert_eq!(mode & 0o777, 0o600);
            }
        }
        let_read(&f, 0).unwrap_or_else(|e| panic!("{e}"));
        let mode = f.metadata().map(|m| m.permissions().mode()).unwrap_or(0);
        assert_eq!(mode & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
