//! One more user of a file: a POSIX access ACL
//! (`system.posix_acl_access`) naming one uid.
//!
//! A VM's disk, seed and UEFI variables stay the user's (who copies,
//! resizes and deletes them), and its QEMU, another id, uses them: the
//! file stays 0600 plus `user:UID:rw-` (shown by `ls` as `-rw-rw----+`).
//! A group would admit its other members.
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
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("f");
        let f = File::create(&path).unwrap_or_else(|e| panic!("{e}"));
        let mode = || f.metadata().map(|m| m.permissions().mode()).unwrap_or(0) & 0o777;
        match let_write(&f, 4242) {
            Ok(()) => assert_eq!(mode(), 0o660),
            // A temporary folder without ACL support: the file is 0600.
            Err(_) => assert_eq!(mode(), 0o600),
        }
    }
}
