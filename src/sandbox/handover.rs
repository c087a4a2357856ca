//! Data a parent hands its child in memory, never in a file: a sealed
//! memfd (nothing can change it once written) whose descriptor the child
//! inherits, read back once with a size cap.

use std::io::{Read, Seek, Write};
use std::os::fd::OwnedFd;

/// A sealed memfd named `name` holding `data`, closed on exec unless the
/// caller keeps it ([`super::Confine::keep_fds`]).
pub fn sealed(name: &std::ffi::CStr, data: &[u8]) -> std::io::Result<OwnedFd> {
    let fd = nix::sys::memfd::memfd_create(
        name,
        nix::sys::memfd::MFdFlags::MFD_CLOEXEC | nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING,
    )?;
    let mut file = std::fs::File::from(fd);
    file.write_all(data)?;
    let seals = nix::fcntl::SealFlag::F_SEAL_SEAL
        | nix::fcntl::SealFlag::F_SEAL_SHRINK
        | nix::fcntl::SealFlag::F_SEAL_GROW
        | nix::fcntl::SealFlag::F_SEAL_WRITE;
    nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_ADD_SEALS(seals))?;
    Ok(file.into())
}

/// What [`sealed`] wrote, at most `cap` bytes of it.
pub fn read_back(fd: OwnedFd, cap: u64) -> std::io::Result<Vec<u8>> {
    let mut file = std::fs::File::from(fd);
    let mut data = Vec::new();
    file.seek(std::io::SeekFrom::Start(0))?;
    file.take(cap).read_to_end(&mut data)?;
    Ok(data)
}
