//! Loop devices, through the kernel's ioctls (no `losetup`): attach an
//! image with auto-clear (the device frees itself when its file system is
//! unmounted), read a device's backing file, detach.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_NAME_SIZE: usize = 64;

/// `struct loop_info64` of `<linux/loop.h>`.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` of `<linux/loop.h>`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

fn zeroed_info() -> LoopInfo64 {
    LoopInfo64 {
        lo_device: 0,
        lo_inode: 0,
        lo_rdevice: 0,
        lo_offset: 0,
        lo_sizelimit: 0,
        lo_number: 0,
        lo_encrypt_type: 0,
        lo_encrypt_key_size: 0,
        lo_flags: 0,
        lo_file_name: [0; LO_NAME_SIZE],
        lo_crypt_name: [0; LO_NAME_SIZE],
        lo_encrypt_key: [0; 32],
        lo_init: [0; 2],
    }
}

/// An attached loop device, open. Dropping it closes the descriptor; with
/// auto-clear the device is freed once nothing (no mount) uses it.
pub struct LoopDevice {
    pub path: PathBuf,
    pub file: File,
}

/// Attach `image` (already open read-write) to a free loop device with
/// auto-clear.
pub fn attach(image: &File) -> std::io::Result<LoopDevice> {
    let ctl = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")?;
    let mut last = std::io::Error::from_raw_os_error(libc::EBUSY);
    // Another process may take the free device between the two calls.
    for _ in 0..20 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a number.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let dev = OpenOptions::new().read(true).write(true).open(&path)?;
        let cfg = LoopConfig {
            fd: image.as_raw_fd() as u32,
            block_size: 0,
            info: LoopInfo64 {
                lo_flags: LO_FLAGS_AUTOCLEAR,
                ..zeroed_info()
            },
            reserved: [0; 8],
        };
        // SAFETY: LOOP_CONFIGURE reads a `struct loop_config`, which
        // `cfg` is (repr(C), same layout), and keeps no pointer to it.
        let rc = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg as *const LoopConfig) };
        if rc == 0 {
            return Ok(LoopDevice { path, file: dev });
        }
        last = std::io::Error::last_os_error();
        if last.raw_os_error() != Some(libc::EBUSY) {
            return Err(last);
        }
    }
    Err(last)
}

/// Device number and inode of a loop device's backing file, if attached.
pub fn backing_identity(dev: &Path) -> Option<(u64, u64)> {
    let f = File::open(dev).ok()?;
    let mut info = zeroed_info();
    // SAFETY: LOOP_GET_STATUS64 writes one `struct loop_info64` into
    // `info`, which has that layout and lives for the call.
    let rc = unsafe {
        libc::ioctl(
            f.as_raw_fd(),
            LOOP_GET_STATUS64,
            &mut info as *mut LoopInfo64,
        )
    };
    (rc == 0).then_some((info.lo_device, info.lo_inode))
}

/// Whether the loop device `dev` is backed by the file `image` (same
/// device and inode; a path can be replaced, an inode cannot).
pub fn backed_by(dev: &Path, image: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(image) else {
        return false;
    };
    backing_identity(dev) == Some((meta.dev(), meta.ino()))
}

/// The backing file the kernel reports for `/dev/loopN` (from sysfs), with
/// a ` (deleted)` suffix removed.
pub fn backing_file(dev: &Path) -> Option<PathBuf> {
    let name = dev.file_name()?.to_str()?;
    let text = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    let text = text.trim_end_matches('\n');
    Some(PathBuf::from(
        text.strip_suffix(" (deleted)").unwrap_or(text),
    ))
}

/// Every attached loop device whose backing file is `image`.
pub fn devices_backed_by(image: &Path) -> Vec<PathBuf> {
    let Ok(meta) = std::fs::metadata(image) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for e in std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") || !e.path().join("loop").exists() {
            continue;
        }
        let dev = PathBuf::from(format!("/dev/{name}"));
        if backing_identity(&dev) == Some((meta.dev(), meta.ino())) {
            found.push(dev);
        }
    }
    found
}

/// Detach a loop device (fails with EBUSY while it is mounted).
pub fn detach(dev: &Path) -> std::io::Result<()> {
    let f = File::open(dev)?;
    // SAFETY: LOOP_CLR_FD takes no argument.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), LOOP_CLR_FD, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `major:minor` of a block device node.
pub fn dev_numbers(dev: &Path) -> Option<(u32, u32)> {
    let rdev = std::fs::metadata(dev).ok()?.rdev();
    Some((libc::major(rdev), libc::minor(rdev)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structs_have_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }
}
