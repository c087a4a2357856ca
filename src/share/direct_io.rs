//! The share's cache policy, chosen per connection by what the guest's
//! kernel offers.
//!
//! Under TCG a read through the guest's page cache is copied twice (host
//! to guest cache, cache to the reader), and the second copy is the slow
//! one; with FUSE direct I/O the data goes straight to the reader
//! (measured: sequential read 0.26× → 0.82× of 9p, write 0.44× → 1.17×,
//! unpacking 2×). But before Linux 6.6 a direct-I/O file cannot be mapped
//! shared and writable, which SQLite's WAL index and many build tools
//! need. Linux 6.6 added `FUSE_DIRECT_IO_ALLOW_MMAP`, offered by the
//! kernel in its INIT request. So: when the guest offers it, files are
//! served with direct I/O and shared mappings allowed; otherwise the
//! daemon keeps the page-cache policy (`CachePolicy::Auto`).
//!
//! The same wrapper keeps set-user-ID and set-group-ID bits, and file
//! capabilities, off everything the guest creates or changes
//! ([`without_set_id`]): they would mean something to the host.
//!
//! virtiofsd fixes its cache policy when the file system is built, before
//! the guest connects, so [`ByKernel`] wraps the passthrough file system:
//! `init` records what the kernel offered, `open` and `create` add direct
//! I/O to regular files when it did, and every other request goes through
//! unchanged.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use virtiofsd::filesystem::{
    Context, Entry, Extensions, FileSystem, FsOptions, GetxattrReply, ListxattrReply, OpenOptions,
    SerializableFileSystem, SetattrValid, SetxattrFlags, ZeroCopyReader, ZeroCopyWriter,
};
use virtiofsd::fuse;
use virtiofsd::passthrough::PassthroughFs;

/// The passthrough file system with direct I/O when the guest's kernel
/// can map direct-I/O files shared.
pub struct ByKernel {
    fs: PassthroughFs,
    /// Set at each INIT: the connected kernel offered
    /// `DIRECT_IO_ALLOW_MMAP`.
    direct: AtomicBool,
}

impl ByKernel {
    /// `fs` must be built with `CachePolicy::Auto` (no direct I/O of its
    /// own).
    pub fn new(fs: PassthroughFs) -> ByKernel {
        ByKernel {
            fs,
            direct: AtomicBool::new(false),
        }
    }

    /// Whether files opened now are served with direct I/O.
    pub fn direct_io(&self) -> bool {
        self.direct.load(Ordering::Relaxed)
    }

    /// `opts` for a file opened with `flags`: direct I/O for anything but
    /// a directory when the kernel allows mapping it.
    fn file_options(&self, flags: u32, opts: OpenOptions) -> OpenOptions {
        if self.direct_io() && flags & (libc::O_DIRECTORY as u32) == 0 {
            (opts - OpenOptions::KEEP_CACHE) | OpenOptions::DIRECT_IO
        } else {
            opts
        }
    }
}

/// What INIT answers for a kernel offering `capable`, given what the
/// passthrough file system answered: direct I/O mapping on when offered.
pub fn negotiate(capable: FsOptions, answer: FsOptions) -> (FsOptions, bool) {
    if capable.contains(FsOptions::DIRECT_IO_ALLOW_MMAP) {
        (answer | FsOptions::DIRECT_IO_ALLOW_MMAP, true)
    } else {
        (answer, false)
    }
}

/// A mode without its set-user-ID and set-group-ID bits. Nothing the
/// guest makes or changes on a share carries them on the host, whoever
/// runs migrant: guest root's `chmod 4755` on a copy of bash would
/// otherwise leave a program any local user runs as the file's owner
/// (root, when root runs migrant for its own folder).
pub fn without_set_id(mode: u32) -> u32 {
    mode & !(libc::S_ISUID | libc::S_ISGID)
}

/// Extended attributes the guest may not set: file capabilities, which
/// give a program privileges the way a set-user-ID bit does.
pub fn refused_xattr(name: &CStr) -> bool {
    name.to_bytes() == b"security.capability"
}

impl FileSystem for ByKernel {
    type Inode = <PassthroughFs as FileSystem>::Inode;
    type Handle = <PassthroughFs as FileSystem>::Handle;
    type DirIter = <PassthroughFs as FileSystem>::DirIter;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let answer = self.fs.init(capable)?;
        let (answer, direct) = negotiate(capable, answer);
        self.direct.store(direct, Ordering::Relaxed);
        Ok(answer)
    }

    fn open(
        &self,
        ctx: Context,
        inode: Self::Inode,
        kill_priv: bool,
        flags: u32,
    ) -> io::Result<(Option<Self::Handle>, OpenOptions)> {
        let (handle, opts) = self.fs.open(ctx, inode, kill_priv, flags)?;
        Ok((handle, self.file_options(flags, opts)))
    }

    #[allow(clippy::too_many_arguments)]
    fn create(
        &self,
        ctx: Context,
        parent: Self::Inode,
        name: &CStr,
        mode: u32,
        kill_priv: bool,
        flags: u32,
        umask: u32,
        extensions: Extensions,
    ) -> io::Result<(Entry, Option<Self::Handle>, OpenOptions)> {
        let (entry, handle, opts) = self.fs.create(
            ctx,
            parent,
            name,
            without_set_id(mode),
            kill_priv,
            flags,
            umask,
            extensions,
        )?;
        Ok((entry, handle, self.file_options(flags, opts)))
    }

    fn mkdir(
        &self,
        ctx: Context,
        parent: Self::Inode,
        name: &CStr,
        mode: u32,
        umask: u32,
        extensions: Extensions,
    ) -> io::Result<Entry> {
        self.fs
            .mkdir(ctx, parent, name, without_set_id(mode), umask, extensions)
    }

    #[allow(clippy::too_many_arguments)]
    fn mknod(
        &self,
        ctx: Context,
        inode: Self::Inode,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
        extensions: Extensions,
    ) -> io::Result<Entry> {
        self.fs.mknod(
            ctx,
            inode,
            name,
            without_set_id(mode),
            rdev,
            umask,
            extensions,
        )
    }

    fn setattr(
        &self,
        ctx: Context,
        inode: Self::Inode,
        mut attr: fuse::SetattrIn,
        handle: Option<Self::Handle>,
        valid: SetattrValid,
    ) -> io::Result<(fuse::Attr, Duration)> {
        if valid.contains(SetattrValid::MODE) {
            attr.mode = without_set_id(attr.mode);
        }
        self.fs.setattr(ctx, inode, attr, handle, valid)
    }

    fn setxattr(
        &self,
        ctx: Context,
        inode: Self::Inode,
        name: &CStr,
        value: &[u8],
        flags: u32,
        extra_flags: SetxattrFlags,
    ) -> io::Result<()> {
        if refused_xattr(name) {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        self.fs
            .setxattr(ctx, inode, name, value, flags, extra_flags)
    }

    pass_through! {
        fn destroy(&self);
        fn lookup(&self, ctx: Context, parent: Self::Inode, name: &CStr) -> io::Result<Entry>;
        fn forget(&self, ctx: Context, inode: Self::Inode, count: u64);
        fn batch_forget(&self, ctx: Context, requests: Vec<(Self::Inode, u64)>);
        fn getattr(&self, ctx: Context, inode: Self::Inode, handle: Option<Self::Handle>) -> io::Result<(fuse::Attr, Duration)>;
        fn readlink(&self, ctx: Context, inode: Self::Inode) -> io::Result<Vec<u8>>;
        fn symlink(&self, ctx: Context, linkname: &CStr, parent: Self::Inode, name: &CStr, extensions: Extensions) -> io::Result<Entry>;
        fn unlink(&self, ctx: Context, parent: Self::Inode, name: &CStr) -> io::Result<()>;
        fn rmdir(&self, ctx: Context, parent: Self::Inode, name: &CStr) -> io::Result<()>;
        fn rename(&self, ctx: Context, olddir: Self::Inode, oldname: &CStr, newdir: Self::Inode, newname: &CStr, flags: u32) -> io::Result<()>;
        fn link(&self, ctx: Context, inode: Self::Inode, newparent: Self::Inode, newname: &CStr) -> io::Result<Entry>;
        fn read<W: ZeroCopyWriter>(&self, ctx: Context, inode: Self::Inode, handle: Self::Handle, w: W, size: u32, offset: u64, lock_owner: Option<u64>, flags: u32) -> io::Result<usize>;
        fn write<R: ZeroCopyReader>(&self, ctx: Context, inode: Self::Inode, handle: Self::Handle, r: R, size: u32, offset: u64, lock_owner: Option<u64>, delayed_write: bool, kill_priv: bool, flags: u32) -> io::Result<usize>;
        fn flush(&self, ctx: Context, inode: Self::Inode, handle: Self::Handle, lock_owner: u64) -> io::Result<()>;
        fn fsync(&self, ctx: Context, inode: Self::Inode, datasync: bool, handle: Self::Handle) -> io::Result<()>;
        fn fallocate(&self, ctx: Context, inode: Self::Inode, handle: Self::Handle, mode: u32, offset: u64, length: u64) -> io::Result<()>;
        fn release(&self, ctx: Context, inode: Self::Inode, flags: u32, handle: Self::Handle, flush: bool, flock_release: bool, lock_owner: Option<u64>) -> io::Result<()>;
        fn statfs(&self, ctx: Context, inode: Self::Inode) -> io::Result<libc::statvfs64>;
        fn getxattr(&self, ctx: Context, inode: Self::Inode, name: &CStr, size: u32) -> io::Result<GetxattrReply>;
        fn listxattr(&self, ctx: Context, inode: Self::Inode, size: u32) -> io::Result<ListxattrReply>;
        fn removexattr(&self, ctx: Context, inode: Self::Inode, name: &CStr) -> io::Result<()>;
        fn opendir(&self, ctx: Context, inode: Self::Inode, flags: u32) -> io::Result<(Option<Self::Handle>, OpenOptions)>;
        fn readdir(&self, ctx: Context, inode: Self::Inode, handle: Self::Handle, size: u32, offset: u64) -> io::Result<Self::DirIter>;
        fn fsyncdir(&self, ctx: Context, inode: Self::Inode, datasync: bool, handle: Self::Handle) -> io::Result<()>;
        fn releasedir(&self, ctx: Context, inode: Self::Inode, flags: u32, handle: Self::Handle) -> io::Result<()>;
        fn access(&self, ctx: Context, inode: Self::Inode, mask: u32) -> io::Result<()>;
        fn lseek(&self, ctx: Context, inode: Self::Inode, handle: Self::Handle, offset: u64, whence: u32) -> io::Result<u64>;
        fn copyfilerange(&self, ctx: Context, inode_in: Self::Inode, handle_in: Self::Handle, offset_in: u64, inode_out: Self::Inode, handle_out: Self::Handle, offset_out: u64, len: u64, flags: u64) -> io::Result<usize>;
        fn syncfs(&self, ctx: Context, inode: Self::Inode) -> io::Result<()>;
    }
}

impl SerializableFileSystem for ByKernel {
    pass_through! {
        fn prepare_serialization(&self, cancel: Arc<AtomicBool>);
        fn serialize(&self, state_pipe: File) -> io::Result<()>;
        fn deserialize_and_apply(&self, state_pipe: File) -> io::Result<()>;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_id_bits_and_capabilities_never_reach_the_host() {
        assert_eq!(without_set_id(0o104755), 0o100755);
        assert_eq!(without_set_id(0o2775), 0o775);
        assert_eq!(without_set_id(0o6777), 0o777);
        assert_eq!(without_set_id(0o1777), 0o1777, "sticky stays");
        assert!(refused_xattr(c"security.capability"));
        assert!(!refused_xattr(c"user.note"));
    }

    #[test]
    fn direct_io_only_when_the_kernel_can_map_it() {
        let base = FsOptions::ASYNC_READ | FsOptions::SUBMOUNTS;
        // Linux 6.6 and later offer DIRECT_IO_ALLOW_MMAP.
        let (answer, direct) = negotiate(base | FsOptions::DIRECT_IO_ALLOW_MMAP, base);
        assert!(direct);
        assert!(answer.contains(FsOptions::DIRECT_IO_ALLOW_MMAP));
        assert!(answer.contains(base));
        // Older kernels: the page cache, and nothing they did not offer.
        let (answer, direct) = negotiate(base, base);
        assert!(!direct);
        assert_eq!(answer, base);
    }
}
