//! A store served as a plain folder, with the promises of an ext4 image:
//! a size cap the guest cannot pass, symlinks a host program can follow
//! without leaving the share, and no device nodes. [`Guarded`] sits between
//! the FUSE server and the passthrough file system and enforces all three
//! on every request the guest sends.
//!
//! **The cap.** Every inode is charged its allocated size, at least one
//! [`UNIT`] (so the number of files is bounded too, as an ext4 image's
//! inode table bounds it). The [`Ledger`] holds the charge of the whole
//! tree: measured by walking it when the file system starts, then kept by
//! the requests themselves. A request that can grow the tree first
//! reserves an upper bound of its growth (refused with `ENOSPC` when the
//! charge would pass the cap), then settles with what it really grew, read
//! from the inode's attributes before and after. Requests that free space
//! (unlink, rmdir, a rename over a file, truncation, hole punching) run
//! one at a time and subtract what they freed. A file unlinked while the
//! guest still holds it (open, or not yet forgotten) keeps its charge until
//! the last reference goes: otherwise a guest could unlink a full file it
//! keeps open and fill the cap again, as often as it likes. Concurrent
//! requests can only make the charge higher than the truth, never lower;
//! when a request is refused the tree is measured again (at most once per
//! [`RESCAN_EVERY`]) so the error is never spurious for long.
//!
//! **Symlinks.** A link the guest makes must be relative, with `..` only as
//! leading components and no more of them than the link's own depth below
//! the share's root: followed from anywhere, it ends inside the share
//! (every other link in the share obeys the same rule, so a path through
//! them cannot climb out either). Moving a link, or a directory holding
//! links, closer to the root is checked again; a move that would let a
//! link out fails with `EXDEV`, so `mv` copies instead and the copy is
//! refused link by link.
//!
//! **Devices.** Character and block device nodes are refused (`EPERM`);
//! FIFOs and sockets are files like any other.

use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use virtiofsd::filesystem::{
    Context, DirectoryIterator, Entry, Extensions, FileSystem, FsOptions, GetxattrReply,
    ListxattrReply, OpenOptions, SerializableFileSystem, SetattrValid, SetxattrFlags,
    ZeroCopyReader, ZeroCopyWriter,
};
use virtiofsd::fuse;

/// The smallest charge of an inode, and the granule of reservations.
pub const UNIT: u64 = 4096;

/// How often a refused request may measure the tree again.
pub const RESCAN_EVERY: Duration = Duration::from_secs(2);

/// Entries a directory move may examine before it is refused (`EXDEV`):
/// the bound on what one request can make the server walk.
pub const MOVE_WALK_LIMIT: usize = 100_000;

/// The FUSE root's inode.
const ROOT: u64 = fuse::ROOT_ID;

/// What an inode with `blocks` 512-byte blocks allocated is charged.
pub fn charge(blocks: u64) -> u64 {
    blocks.saturating_mul(512).max(UNIT)
}

/// `n` rounded up to whole [`UNIT`]s.
fn units(n: u64) -> u64 {
    n.div_ceil(UNIT).saturating_mul(UNIT)
}

fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// The charge of a tree against its cap.
#[derive(Debug)]
pub struct Ledger {
    cap: u64,
    /// Charge settled by finished requests.
    base: AtomicU64,
    /// Reservations of requests in flight.
    pending: AtomicU64,
    /// Growth settled since the ledger was made (only grows): what a
    /// measurement of the tree adds for the requests that ran during it.
    grown: AtomicU64,
}

/// Room reserved for one request; given back when dropped.
#[must_use]
pub struct Reservation<'a> {
    ledger: &'a Ledger,
    bytes: u64,
}

impl Reservation<'_> {
    /// The request grew the tree by `delta` (negative: it shrank, which
    /// is left to the next measurement: a concurrent request may have
    /// counted the same bytes).
    pub fn settle(self, delta: i128) {
        self.ledger
            .grow(u64::try_from(delta.max(0)).unwrap_or(u64::MAX));
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.ledger.pending.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

impl Ledger {
    pub fn new(cap: u64, used: u64) -> Ledger {
        Ledger {
            cap,
            base: AtomicU64::new(used),
            pending: AtomicU64::new(0),
            grown: AtomicU64::new(0),
        }
    }

    pub fn cap(&self) -> u64 {
        self.cap
    }

    /// The charge, reservations in flight included.
    pub fn used(&self) -> u64 {
        self.base
            .load(Ordering::SeqCst)
            .saturating_add(self.pending.load(Ordering::SeqCst))
    }

    /// Room for a request that grows the tree by at most `bytes`, if the
    /// cap has it.
    pub fn reserve(&self, bytes: u64) -> Option<Reservation<'_>> {
        let before = self.pending.fetch_add(bytes, Ordering::SeqCst);
        let r = Reservation {
            ledger: self,
            bytes,
        };
        let total = self
            .base
            .load(Ordering::SeqCst)
            .saturating_add(before)
            .saturating_add(bytes);
        (total <= self.cap).then_some(r)
    }

    /// A request grew the tree by `bytes` without a reservation (it was
    /// not meant to grow it: counted, cap or not).
    pub fn grow(&self, bytes: u64) {
        self.base.fetch_add(bytes, Ordering::SeqCst);
        self.grown.fetch_add(bytes, Ordering::SeqCst);
    }

    /// A serialised request freed `bytes`.
    pub fn free(&self, bytes: u64) {
        // Never below zero: a concurrent measurement may have seen it.
        let _ = self
            .base
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| {
                Some(b.saturating_sub(bytes))
            });
    }

    /// A mark to measure from: see [`Ledger::rebase`].
    pub fn mark(&self) -> u64 {
        self.grown.load(Ordering::SeqCst)
    }

    /// The tree measured at `truth`, by a measurement that started at
    /// `mark`: what requests settled since is added (they may have grown
    /// files the walk had already passed). Callers hold the lock that
    /// keeps freeing requests out.
    pub fn rebase(&self, truth: u64, mark: u64) {
        let since = self.grown.load(Ordering::SeqCst).saturating_sub(mark);
        self.base
            .store(truth.saturating_add(since), Ordering::SeqCst);
    }
}

/// Whether a symlink to `target` in a directory `depth` levels below the
/// share's root resolves inside the share: relative, `..` only as leading
/// components, and at most `depth` of them.
pub fn link_stays_inside(target: &[u8], depth: u32) -> bool {
    link_ups(target).is_some_and(|ups| ups <= depth)
}

/// How many levels a link to `target` climbs before it descends (`None`:
/// absolute, empty, or climbing again after descending: never allowed).
fn link_ups(target: &[u8]) -> Option<u32> {
    if target.is_empty() || target.starts_with(b"/") {
        return None;
    }
    let mut ups = 0u32;
    let mut descended = false;
    for part in target.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." if descended => return None,
            b".." => ups = ups.saturating_add(1),
            _ => descended = true,
        }
    }
    Some(ups)
}

/// Charge of a tree on one file system, each inode once.
pub fn measure(root: &Path) -> io::Result<u64> {
    let top = std::fs::symlink_metadata(root)?;
    let mut seen = HashSet::new();
    let mut total = 0u64;
    let mut todo = vec![root.to_path_buf()];
    total = total.saturating_add(charge(top.blocks()));
    while let Some(dir) = todo.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            // Gone since, or not ours to read: what cannot be read is
            // not served either.
            Err(_) => continue,
        };
        for entry in entries.flatten() {
            let Ok(m) = entry.metadata() else { continue };
            if m.dev() != top.dev() {
                continue;
            }
            if m.nlink() > 1 && !m.is_dir() && !seen.insert(m.ino()) {
                continue;
            }
            total = total.saturating_add(charge(m.blocks()));
            if m.is_dir() {
                todo.push(entry.path());
            }
        }
    }
    Ok(total)
}

/// What the guard remembers of the inodes the guest holds.
#[derive(Default)]
struct Held {
    /// Directories the guest has looked up: their parent, and how many
    /// lookups the guest has not forgotten yet.
    dirs: HashMap<u64, (u64, u64)>,
    /// Open handles per inode.
    open: HashMap<u64, u64>,
}

/// Unlinked inodes still held, with their charge.
#[derive(Default)]
struct Freeing {
    orphans: HashMap<u64, u64>,
    last_scan: Option<Instant>,
}

/// The passthrough file system `F` behind a size cap and the link and
/// device rules (see the module's documentation).
pub struct Guarded<F> {
    fs: F,
    ledger: Ledger,
    /// The served folder as this process sees it (for measuring).
    root: PathBuf,
    held: Mutex<Held>,
    /// Serialises the requests that free space, and measurements.
    freeing: Mutex<Freeing>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding it leaves plain bookkeeping behind: keep
    // serving with it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn is_dir(attr: &fuse::Attr) -> bool {
    attr.mode & libc::S_IFMT == libc::S_IFDIR
}

fn is_link(attr: &fuse::Attr) -> bool {
    attr.mode & libc::S_IFMT == libc::S_IFLNK
}

fn is_dot(name: &CStr) -> bool {
    matches!(name.to_bytes(), b"." | b"..")
}

impl<F> Guarded<F>
where
    F: FileSystem,
    F::Inode: Copy,
    F::Handle: Copy,
{
    /// `fs` serving `root` (as this process sees it), capped at `cap`
    /// bytes; measures the tree now.
    pub fn new(fs: F, root: &Path, cap: u64) -> io::Result<Guarded<F>> {
        let used = measure(root)?;
        Ok(Guarded {
            fs,
            ledger: Ledger::new(cap, used),
            root: root.to_path_buf(),
            held: Mutex::default(),
            freeing: Mutex::default(),
        })
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    fn attr(&self, ctx: Context, inode: u64) -> io::Result<fuse::Attr> {
        self.fs.getattr(ctx, inode.into(), None).map(|(a, _)| a)
    }

    /// The charge of `inode`, zero if it cannot be read.
    fn charge_of(&self, ctx: Context, inode: u64) -> u64 {
        self.attr(ctx, inode).map(|a| charge(a.blocks)).unwrap_or(0)
    }

    /// Room for `bytes`, measuring the tree once more when the charge says
    /// there is none and the last measurement is old.
    fn reserve(&self, bytes: u64) -> io::Result<Reservation<'_>> {
        if let Some(r) = self.ledger.reserve(bytes) {
            return Ok(r);
        }
        {
            let mut f = lock(&self.freeing);
            if f.last_scan.is_none_or(|t| t.elapsed() >= RESCAN_EVERY) {
                let mark = self.ledger.mark();
                let tree = measure(&self.root)?;
                let orphans = self.recharge_orphans(&mut f);
                self.ledger.rebase(tree.saturating_add(orphans), mark);
                f.last_scan = Some(Instant::now());
            }
        }
        self.ledger.reserve(bytes).ok_or_else(|| err(libc::ENOSPC))
    }

    /// Whether the guest still holds `inode` (an open handle, or a lookup
    /// it has not forgotten).
    fn still_held(&self, inode: u64) -> bool {
        let open = lock(&self.held).open.get(&inode).copied().unwrap_or(0);
        open > 0 || self.attr(ctx_root(), inode).is_ok()
    }

    /// The orphans' charge now, dropping those gone.
    fn recharge_orphans(&self, f: &mut Freeing) -> u64 {
        let ids: Vec<u64> = f.orphans.keys().copied().collect();
        let mut total = 0u64;
        for id in ids {
            if self.still_held(id) {
                let c = self.charge_of(ctx_root(), id).max(f.orphans[&id]);
                f.orphans.insert(id, c);
                total = total.saturating_add(c);
            } else {
                f.orphans.remove(&id);
            }
        }
        total
    }

    /// After the guest let go of `inode` (release, forget): an orphan no
    /// one holds any more frees its charge.
    fn let_go(&self, inode: u64) {
        let mut f = lock(&self.freeing);
        if let Some(c) = f.orphans.get(&inode).copied()
            && !self.still_held(inode)
        {
            f.orphans.remove(&inode);
            self.ledger.free(c);
        }
    }

    /// Runs `op`, which removes the name `name` in `parent` (unlink, rmdir,
    /// or a rename over it): the inode that loses its last name frees its
    /// charge now, or when the guest lets go of it.
    fn removing<T>(
        &self,
        ctx: Context,
        parent: u64,
        name: &CStr,
        op: impl FnOnce() -> io::Result<T>,
    ) -> io::Result<T> {
        let mut f = lock(&self.freeing);
        // Our own reference, so the inode cannot go before we look.
        let victim = self.fs.lookup(ctx, parent.into(), name).ok();
        let out = op();
        if let Some(v) = victim {
            let last = out.is_ok() && (is_dir(&v.attr) || v.attr.nlink <= 1);
            let c = match last {
                true => self.charge_of(ctx, v.inode).max(charge(v.attr.blocks)),
                false => 0,
            };
            self.fs.forget(ctx, v.inode.into(), 1);
            if last {
                match self.still_held(v.inode) {
                    true => {
                        f.orphans.insert(v.inode, c);
                    }
                    false => self.ledger.free(c),
                }
            }
        }
        out
    }

    /// Runs `op`, which may shrink `inode` (truncation, hole punching,
    /// removing an attribute), subtracting what it freed.
    fn shrinking<T>(
        &self,
        ctx: Context,
        inode: u64,
        op: impl FnOnce() -> io::Result<T>,
    ) -> io::Result<T> {
        let _serial = lock(&self.freeing);
        let before = self.charge_of(ctx, inode);
        let out = op()?;
        let after = self.charge_of(ctx, inode);
        if after < before {
            self.ledger.free(before - after);
        } else {
            // A truncation upwards allocates nothing, but a concurrent
            // write may have.
            self.ledger.grow(after - before);
        }
        Ok(out)
    }

    /// Runs `op`, which grows `inode` by at most `bound` bytes.
    fn growing<T>(
        &self,
        ctx: Context,
        inode: u64,
        bound: u64,
        op: impl FnOnce() -> io::Result<T>,
    ) -> io::Result<T> {
        let r = self.reserve(bound)?;
        let before = self.charge_of(ctx, inode);
        let out = op();
        let after = self.charge_of(ctx, inode);
        r.settle(i128::from(after) - i128::from(before));
        out
    }

    /// Runs `op`, which makes a new name in `parent` (and perhaps a new
    /// inode, returned in its entry): the directory's growth and the new
    /// inode's charge.
    fn making(
        &self,
        ctx: Context,
        parent: u64,
        name: &CStr,
        bound: u64,
        op: impl FnOnce() -> io::Result<Entry>,
    ) -> io::Result<Entry> {
        let r = self.reserve(bound.saturating_add(2 * UNIT))?;
        let before = self.charge_of(ctx, parent);
        let made = op();
        let after = self.charge_of(ctx, parent);
        let mut delta = i128::from(after) - i128::from(before);
        if let Ok(e) = &made {
            if e.attr.nlink <= 1 || is_dir(&e.attr) {
                delta += i128::from(charge(e.attr.blocks));
            }
            self.entered(parent, name, e);
        }
        r.settle(delta);
        made
    }

    /// The guest now holds `e`, found as `name` in `parent`.
    fn entered(&self, parent: u64, name: &CStr, e: &Entry) {
        if e.inode == 0 || !is_dir(&e.attr) {
            return;
        }
        let mut h = lock(&self.held);
        let slot = h.dirs.entry(e.inode).or_insert((parent, 0));
        if !is_dot(name) {
            slot.0 = parent;
        }
        slot.1 += 1;
    }

    /// The guest opened a handle on `inode`.
    fn opened(&self, inode: u64) {
        *lock(&self.held).open.entry(inode).or_insert(0) += 1;
    }

    /// The guest released a handle on `inode`.
    fn closed(&self, inode: u64) {
        let mut h = lock(&self.held);
        if let Some(n) = h.open.get_mut(&inode) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                h.open.remove(&inode);
            }
        }
    }

    fn forgotten(&self, inode: u64, count: u64) {
        let mut h = lock(&self.held);
        if let Some(slot) = h.dirs.get_mut(&inode) {
            slot.1 = slot.1.saturating_sub(count);
            if slot.1 == 0 {
                h.dirs.remove(&inode);
            }
        }
    }

    /// How far below the root the directory `dir` is (`None`: unknown).
    fn depth(&self, dir: u64) -> Option<u32> {
        let h = lock(&self.held);
        let mut at = dir;
        for depth in 0..=u32::from(u16::MAX) {
            if at == ROOT {
                return Some(depth);
            }
            at = h.dirs.get(&at)?.0;
        }
        None
    }

    /// Whether a link to `target` may sit in `dir`.
    fn link_allowed(&self, target: &[u8], dir: u64) -> bool {
        match link_ups(target) {
            Some(0) => true,
            Some(ups) => self.depth(dir).is_some_and(|d| ups <= d),
            None => false,
        }
    }

    /// Whether every link in the tree at `inode` (a link or a directory)
    /// still stays inside once that tree sits `shallower` levels closer to
    /// the root. Walks at most `budget` entries.
    fn moves_safely(
        &self,
        ctx: Context,
        inode: u64,
        attr: &fuse::Attr,
        dir_depth: u32,
        budget: &mut usize,
    ) -> io::Result<bool> {
        if is_link(attr) {
            let target = self.fs.readlink(ctx, inode.into())?;
            return Ok(link_stays_inside(&target, dir_depth));
        }
        if !is_dir(attr) {
            return Ok(true);
        }
        let (handle, _) = self.fs.opendir(ctx, inode.into(), libc::O_RDONLY as u32)?;
        let handle = handle.ok_or_else(|| err(libc::EXDEV))?;
        let result = self.walk_dir(ctx, inode, handle, dir_depth + 1, budget);
        let _ = self
            .fs
            .releasedir(ctx, inode.into(), libc::O_RDONLY as u32, handle);
        result
    }

    fn walk_dir(
        &self,
        ctx: Context,
        dir: u64,
        handle: F::Handle,
        depth: u32,
        budget: &mut usize,
    ) -> io::Result<bool> {
        let mut offset = 0u64;
        loop {
            // One page of entries; the links and directories in it.
            let (mut seen, mut names) = (0usize, Vec::new());
            {
                let mut it = self
                    .fs
                    .readdir(ctx, dir.into(), handle, 64 * 1024, offset)?;
                while let Some(d) = it.next() {
                    seen += 1;
                    offset = d.offset;
                    *budget = budget.checked_sub(1).ok_or_else(|| err(libc::EXDEV))?;
                    let walked = [u32::from(libc::DT_DIR), u32::from(libc::DT_LNK)];
                    if walked.contains(&d.type_) && !is_dot(d.name) {
                        names.push(d.name.to_owned());
                    }
                }
            }
            if seen == 0 {
                return Ok(true);
            }
            for name in names {
                let e = self.fs.lookup(ctx, dir.into(), &name)?;
                let ok = self.moves_safely(ctx, e.inode, &e.attr, depth, budget);
                self.fs.forget(ctx, e.inode.into(), 1);
                if !ok? {
                    return Ok(false);
                }
            }
        }
    }

    /// Refuses (`EXDEV`) moving `name` from `olddir` into `newdir` when a
    /// link in what moves would then lead out of the share. Returns the
    /// moved inode when it is a directory (its parent changes).
    fn check_move(
        &self,
        ctx: Context,
        olddir: u64,
        name: &CStr,
        newdir: u64,
    ) -> io::Result<Option<u64>> {
        // Within one folder nothing changes depth, nor any parent: the
        // common rename (write a temporary file, rename it over) costs no
        // lookup.
        if olddir == newdir {
            return Ok(None);
        }
        let e = self.fs.lookup(ctx, olddir.into(), name)?;
        let verdict = (|| {
            if !is_dir(&e.attr) && !is_link(&e.attr) {
                return Ok(true);
            }
            let (Some(from), Some(to)) = (self.depth(olddir), self.depth(newdir)) else {
                return Ok(false);
            };
            if to >= from {
                return Ok(true);
            }
            let mut budget = MOVE_WALK_LIMIT;
            self.moves_safely(ctx, e.inode, &e.attr, to, &mut budget)
        })();
        self.fs.forget(ctx, e.inode.into(), 1);
        match verdict {
            Ok(true) => Ok(is_dir(&e.attr).then_some(e.inode)),
            Ok(false) | Err(_) => Err(err(libc::EXDEV)),
        }
    }

    fn moved(&self, dir: Option<u64>, newdir: u64) {
        if let Some(d) = dir
            && let Some(slot) = lock(&self.held).dirs.get_mut(&d)
        {
            slot.0 = newdir;
        }
    }
}

/// The context of the guard's own bookkeeping requests.
fn ctx_root() -> Context {
    Context {
        uid: 0.into(),
        gid: 0.into(),
        pid: 0,
    }
}

impl<F> FileSystem for Guarded<F>
where
    F: FileSystem,
    F::Inode: Copy,
    F::Handle: Copy,
{
    type Inode = F::Inode;
    type Handle = F::Handle;
    type DirIter = F::DirIter;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        self.fs.init(capable)
    }

    fn lookup(&self, ctx: Context, parent: Self::Inode, name: &CStr) -> io::Result<Entry> {
        let e = self.fs.lookup(ctx, parent, name)?;
        self.entered(parent.into(), name, &e);
        Ok(e)
    }

    fn forget(&self, ctx: Context, inode: Self::Inode, count: u64) {
        self.fs.forget(ctx, inode, count);
        self.forgotten(inode.into(), count);
        self.let_go(inode.into());
    }

    fn batch_forget(&self, ctx: Context, requests: Vec<(Self::Inode, u64)>) {
        let ids: Vec<(u64, u64)> = requests.iter().map(|(i, c)| ((*i).into(), *c)).collect();
        self.fs.batch_forget(ctx, requests);
        for (inode, count) in ids {
            self.forgotten(inode, count);
            self.let_go(inode);
        }
    }

    fn open(
        &self,
        ctx: Context,
        inode: Self::Inode,
        kill_priv: bool,
        flags: u32,
    ) -> io::Result<(Option<Self::Handle>, OpenOptions)> {
        // O_TRUNC frees the file's data: left to the next measurement
        // (the charge stays above the truth meanwhile).
        let out = self.fs.open(ctx, inode, kill_priv, flags)?;
        self.opened(inode.into());
        Ok(out)
    }

    fn release(
        &self,
        ctx: Context,
        inode: Self::Inode,
        flags: u32,
        handle: Self::Handle,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        let out = self
            .fs
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner);
        self.closed(inode.into());
        self.let_go(inode.into());
        out
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
        let mut rest = None;
        let e = self.making(ctx, parent.into(), name, 0, || {
            let (e, h, o) = self
                .fs
                .create(ctx, parent, name, mode, kill_priv, flags, umask, extensions)?;
            rest = Some((h, o));
            Ok(e)
        })?;
        let (h, o) = rest.ok_or_else(|| err(libc::EIO))?;
        if h.is_some() {
            self.opened(e.inode);
        }
        Ok((e, h, o))
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
        self.making(ctx, parent.into(), name, 0, || {
            self.fs.mkdir(ctx, parent, name, mode, umask, extensions)
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn mknod(
        &self,
        ctx: Context,
        parent: Self::Inode,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
        extensions: Extensions,
    ) -> io::Result<Entry> {
        if matches!(mode & libc::S_IFMT, libc::S_IFCHR | libc::S_IFBLK) {
            return Err(err(libc::EPERM));
        }
        self.making(ctx, parent.into(), name, 0, || {
            self.fs
                .mknod(ctx, parent, name, mode, rdev, umask, extensions)
        })
    }

    fn symlink(
        &self,
        ctx: Context,
        linkname: &CStr,
        parent: Self::Inode,
        name: &CStr,
        extensions: Extensions,
    ) -> io::Result<Entry> {
        if !self.link_allowed(linkname.to_bytes(), parent.into()) {
            return Err(err(libc::EPERM));
        }
        let bound = units(linkname.to_bytes().len() as u64);
        self.making(ctx, parent.into(), name, bound, || {
            self.fs.symlink(ctx, linkname, parent, name, extensions)
        })
    }

    fn link(
        &self,
        ctx: Context,
        inode: Self::Inode,
        newparent: Self::Inode,
        newname: &CStr,
    ) -> io::Result<Entry> {
        let attr = self.attr(ctx, inode.into())?;
        if is_link(&attr) {
            let target = self.fs.readlink(ctx, inode)?;
            if !self.link_allowed(&target, newparent.into()) {
                return Err(err(libc::EXDEV));
            }
        }
        self.making(ctx, newparent.into(), newname, 0, || {
            self.fs.link(ctx, inode, newparent, newname)
        })
    }

    fn unlink(&self, ctx: Context, parent: Self::Inode, name: &CStr) -> io::Result<()> {
        self.removing(ctx, parent.into(), name, || {
            self.fs.unlink(ctx, parent, name)
        })
    }

    fn rmdir(&self, ctx: Context, parent: Self::Inode, name: &CStr) -> io::Result<()> {
        self.removing(ctx, parent.into(), name, || {
            self.fs.rmdir(ctx, parent, name)
        })
    }

    fn rename(
        &self,
        ctx: Context,
        olddir: Self::Inode,
        oldname: &CStr,
        newdir: Self::Inode,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        let (from, to) = (olddir.into(), newdir.into());
        let moving = self.check_move(ctx, from, oldname, to)?;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let swapped = match exchange {
            true => self.check_move(ctx, to, newname, from)?,
            false => None,
        };
        let r = self.reserve(UNIT)?;
        let before = self.charge_of(ctx, to);
        let out = match exchange {
            true => self.fs.rename(ctx, olddir, oldname, newdir, newname, flags),
            false => self.removing(ctx, to, newname, || {
                self.fs.rename(ctx, olddir, oldname, newdir, newname, flags)
            }),
        };
        let after = self.charge_of(ctx, to);
        r.settle(i128::from(after) - i128::from(before));
        if out.is_ok() {
            self.moved(moving, to);
            self.moved(swapped, from);
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn write<R: ZeroCopyReader>(
        &self,
        ctx: Context,
        inode: Self::Inode,
        handle: Self::Handle,
        r: R,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        kill_priv: bool,
        flags: u32,
    ) -> io::Result<usize> {
        let bound = units(u64::from(size)).saturating_add(UNIT);
        self.growing(ctx, inode.into(), bound, || {
            self.fs.write(
                ctx,
                inode,
                handle,
                r,
                size,
                offset,
                lock_owner,
                delayed_write,
                kill_priv,
                flags,
            )
        })
    }

    fn fallocate(
        &self,
        ctx: Context,
        inode: Self::Inode,
        handle: Self::Handle,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        let frees = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_COLLAPSE_RANGE;
        let op = || self.fs.fallocate(ctx, inode, handle, mode, offset, length);
        if mode as i32 & frees != 0 {
            self.shrinking(ctx, inode.into(), op)
        } else {
            let bound = units(length).saturating_add(UNIT);
            self.growing(ctx, inode.into(), bound, op)
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn copyfilerange(
        &self,
        ctx: Context,
        inode_in: Self::Inode,
        handle_in: Self::Handle,
        offset_in: u64,
        inode_out: Self::Inode,
        handle_out: Self::Handle,
        offset_out: u64,
        len: u64,
        flags: u64,
    ) -> io::Result<usize> {
        let bound = units(len).saturating_add(UNIT);
        self.growing(ctx, inode_out.into(), bound, || {
            self.fs.copyfilerange(
                ctx, inode_in, handle_in, offset_in, inode_out, handle_out, offset_out, len, flags,
            )
        })
    }

    fn setattr(
        &self,
        ctx: Context,
        inode: Self::Inode,
        attr: fuse::SetattrIn,
        handle: Option<Self::Handle>,
        valid: SetattrValid,
    ) -> io::Result<(fuse::Attr, Duration)> {
        let op = || self.fs.setattr(ctx, inode, attr, handle, valid);
        match valid.contains(SetattrValid::SIZE) {
            true => self.shrinking(ctx, inode.into(), op),
            false => op(),
        }
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
        let bound = units(value.len() as u64).saturating_add(UNIT);
        self.growing(ctx, inode.into(), bound, || {
            self.fs
                .setxattr(ctx, inode, name, value, flags, extra_flags)
        })
    }

    fn removexattr(&self, ctx: Context, inode: Self::Inode, name: &CStr) -> io::Result<()> {
        self.shrinking(ctx, inode.into(), || self.fs.removexattr(ctx, inode, name))
    }

    fn statfs(&self, ctx: Context, inode: Self::Inode) -> io::Result<libc::statvfs64> {
        let mut st = self.fs.statfs(ctx, inode)?;
        // The guest's `df` shows the cap, not the host's disk.
        let bsize = UNIT;
        let blocks = self.ledger.cap() / bsize;
        let free = self.ledger.cap().saturating_sub(self.ledger.used()) / bsize;
        st.f_bsize = bsize;
        st.f_frsize = bsize;
        st.f_blocks = blocks;
        st.f_bfree = free;
        st.f_bavail = free;
        st.f_files = blocks;
        st.f_ffree = free;
        st.f_favail = free;
        Ok(st)
    }

    pass_through! {
        fn destroy(&self);
        fn getattr(&self, ctx: Context, inode: Self::Inode, handle: Option<Self::Handle>) -> io::Result<(fuse::Attr, Duration)>;
        fn readlink(&self, ctx: Context, inode: Self::Inode) -> io::Result<Vec<u8>>;
        fn read<W: ZeroCopyWriter>(&self, ctx: Context, inode: Self::Inode, handle: Self::Handle, w: W, size: u32, offset: u64, lock_owner: Option<u64>, flags: u32) -> io::Result<usize>;
        fn flush(&self, ctx: Context, inode: Self::Inode, handle: Self::Handle, lock_owner: u64) -> io::Result<()>;
        fn fsync(&self, ctx: Context, inode: Self::Inode, datasync: bool, handle: Self::Handle) -> io::Result<()>;
        fn getxattr(&self, ctx: Context, inode: Self::Inode, name: &CStr, size: u32) -> io::Result<GetxattrReply>;
        fn listxattr(&self, ctx: Context, inode: Self::Inode, size: u32) -> io::Result<ListxattrReply>;
        fn opendir(&self, ctx: Context, inode: Self::Inode, flags: u32) -> io::Result<(Option<Self::Handle>, OpenOptions)>;
        fn readdir(&self, ctx: Context, inode: Self::Inode, handle: Self::Handle, size: u32, offset: u64) -> io::Result<Self::DirIter>;
        fn fsyncdir(&self, ctx: Context, inode: Self::Inode, datasync: bool, handle: Self::Handle) -> io::Result<()>;
        fn releasedir(&self, ctx: Context, inode: Self::Inode, flags: u32, handle: Self::Handle) -> io::Result<()>;
        fn access(&self, ctx: Context, inode: Self::Inode, mask: u32) -> io::Result<()>;
        fn lseek(&self, ctx: Context, inode: Self::Inode, handle: Self::Handle, offset: u64, whence: u32) -> io::Result<u64>;
        fn syncfs(&self, ctx: Context, inode: Self::Inode) -> io::Result<()>;
    }
}

/// A capped share's state does not migrate: the ledger would not follow
/// it (memory snapshots refuse shares before QEMU is asked).
impl<F> SerializableFileSystem for Guarded<F> {
    fn serialize(&self, _state_pipe: std::fs::File) -> io::Result<()> {
        Err(io::Error::other("a capped share does not migrate"))
    }

    fn deserialize_and_apply(&self, _state_pipe: std::fs::File) -> io::Result<()> {
        Err(io::Error::other("a capped share does not migrate"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use virtiofsd::oslib::WritevFlags;
    use virtiofsd::passthrough::{self, PassthroughFs};

    #[test]
    fn links_stay_inside_the_share() {
        for (target, depth, inside) in [
            ("x", 0, true),
            ("a/b/c", 0, true),
            ("./a/./b", 0, true),
            ("../x", 1, true),
            ("../../pkg/bin/tool", 2, true),
            ("..", 1, true),
            ("../x", 0, false),
            ("../../../x", 2, false),
            ("/etc/shadow", 9, false),
            ("", 3, false),
            ("a/../../x", 5, false),
            ("a/..", 5, false),
            ("../a/../b", 5, false),
        ] {
            assert_eq!(
                link_stays_inside(target.as_bytes(), depth),
                inside,
                "{target:?} at depth {depth}"
            );
        }
    }

    #[test]
    fn the_ledger_refuses_past_the_cap_and_settles_what_grew() {
        let l = Ledger::new(10 * UNIT, 2 * UNIT);
        let r = l.reserve(8 * UNIT).unwrap_or_else(|| panic!("room"));
        assert!(l.reserve(UNIT).is_none(), "reserved room is taken");
        r.settle(i128::from(3 * UNIT));
        assert_eq!(l.used(), 5 * UNIT);
        // What shrank is left to measuring, never subtracted by a grower.
        l.reserve(UNIT)
            .unwrap_or_else(|| panic!("room"))
            .settle(-i128::from(4 * UNIT));
        assert_eq!(l.used(), 5 * UNIT);
        l.free(100 * UNIT);
        assert_eq!(l.used(), 0, "never below zero");
        // A measurement keeps what settled while it ran.
        let mark = l.mark();
        l.grow(UNIT);
        l.rebase(4 * UNIT, mark);
        assert_eq!(l.used(), 5 * UNIT);
        assert_eq!(charge(0), UNIT);
        assert_eq!(charge(24), 12288);
    }

    /// Bytes the guest writes.
    struct Bytes(Vec<u8>);

    impl ZeroCopyReader for Bytes {
        fn write_to_file_at(
            &mut self,
            f: &File,
            count: usize,
            off: u64,
            _flags: Option<WritevFlags>,
        ) -> io::Result<usize> {
            let n = count.min(self.0.len());
            f.write_all_at(&self.0[..n], off)?;
            Ok(n)
        }
    }

    struct Share {
        dir: tempfile::TempDir,
        fs: Guarded<PassthroughFs>,
        ctx: Context,
    }

    fn c(s: &str) -> std::ffi::CString {
        std::ffi::CString::new(s).unwrap_or_else(|e| panic!("{e}"))
    }

    impl Share {
        /// A share of `cap` bytes more than its empty folder is charged.
        fn new(room: u64) -> Share {
            let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
            let cfg = passthrough::Config {
                root_dir: dir.path().to_string_lossy().into_owned(),
                xattr: false,
                ..Default::default()
            };
            let inner = PassthroughFs::new(cfg).unwrap_or_else(|e| panic!("{e}"));
            inner.open_root_node().unwrap_or_else(|e| panic!("{e}"));
            let empty = measure(dir.path()).unwrap_or_else(|e| panic!("{e}"));
            let fs =
                Guarded::new(inner, dir.path(), empty + room).unwrap_or_else(|e| panic!("{e}"));
            fs.init(FsOptions::empty())
                .unwrap_or_else(|e| panic!("{e}"));
            let ctx = Context {
                uid: nix::unistd::geteuid().as_raw().into(),
                gid: nix::unistd::getegid().as_raw().into(),
                pid: 0,
            };
            Share { dir, fs, ctx }
        }

        /// A new file in `parent`, open: its entry and handle.
        fn create(&self, parent: u64, name: &str) -> io::Result<(Entry, u64)> {
            let (e, h, _) = self.fs.create(
                self.ctx,
                parent,
                &c(name),
                0o644,
                false,
                libc::O_RDWR as u32,
                0,
                Extensions::default(),
            )?;
            Ok((e, h.unwrap_or_else(|| panic!("no handle"))))
        }

        fn write(&self, e: &Entry, h: u64, len: usize, off: u64) -> io::Result<usize> {
            let data = Bytes(vec![7u8; len]);
            self.fs.write(
                self.ctx, e.inode, h, data, len as u32, off, None, false, false, 0,
            )
        }

        fn close(&self, e: &Entry, h: u64) {
            self.fs
                .release(self.ctx, e.inode, 0, h, false, false, None)
                .unwrap_or_else(|err| panic!("{err}"));
            self.fs.forget(self.ctx, e.inode, 1);
        }

        fn mkdir(&self, parent: u64, name: &str) -> Entry {
            self.fs
                .mkdir(self.ctx, parent, &c(name), 0o755, 0, Extensions::default())
                .unwrap_or_else(|e| panic!("{e}"))
        }

        fn symlink(&self, target: &str, parent: u64, name: &str) -> io::Result<Entry> {
            self.fs.symlink(
                self.ctx,
                &c(target),
                parent,
                &c(name),
                Extensions::default(),
            )
        }

        fn rename(&self, from: u64, name: &str, to: u64, new: &str) -> io::Result<()> {
            self.fs.rename(self.ctx, from, &c(name), to, &c(new), 0)
        }
    }

    fn code<T>(r: io::Result<T>) -> Option<i32> {
        r.err().and_then(|e| e.raw_os_error())
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn writes_stop_at_the_cap_and_freed_space_comes_back() {
        let s = Share::new(4 * MIB);
        let (e, h) = s.create(ROOT, "big").unwrap_or_else(|e| panic!("{e}"));
        let mut written = 0u64;
        let refused = loop {
            match s.write(&e, h, 256 * 1024, written) {
                Ok(n) => written += n as u64,
                Err(err) => break err,
            }
            assert!(written <= 4 * MIB, "wrote past the cap");
        };
        assert_eq!(refused.raw_os_error(), Some(libc::ENOSPC));
        // Within one write (and the reserve's slack) of the cap.
        assert!(written >= 4 * MIB - 2 * 256 * 1024, "stopped at {written}");
        // Small writes take what is left, then nothing more fits: not a
        // new file either.
        while s.write(&e, h, 4096, written).is_ok() {
            written += 4096;
        }
        let on_disk = measure(s.dir.path()).unwrap_or_else(|e| panic!("{e}"));
        assert!(on_disk <= s.fs.ledger().cap(), "{on_disk} on disk");
        assert!(
            on_disk + 3 * UNIT >= s.fs.ledger().cap(),
            "{on_disk} on disk"
        );
        assert_eq!(code(s.create(ROOT, "more")), Some(libc::ENOSPC));
        // Overwriting in place near the cap asks room for the worst case;
        // deleting gives it back.
        s.close(&e, h);
        s.fs.unlink(s.ctx, ROOT, &c("big"))
            .unwrap_or_else(|e| panic!("{e}"));
        let (e, h) = s.create(ROOT, "again").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.write(&e, h, 1 << 20, 0).ok(), Some(1 << 20));
        s.close(&e, h);
    }

    #[test]
    fn an_unlinked_file_still_open_keeps_its_charge() {
        let s = Share::new(4 * MIB);
        let (e, h) = s.create(ROOT, "held").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.write(&e, h, 3 << 20, 0).ok(), Some(3 << 20));
        s.fs.unlink(s.ctx, ROOT, &c("held"))
            .unwrap_or_else(|e| panic!("{e}"));
        // Still open and still looked up: its blocks are still on disk,
        // so the cap has no room for another 3 MiB.
        let (e2, h2) = s.create(ROOT, "next").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(code(s.write(&e2, h2, 3 << 20, 0)), Some(libc::ENOSPC));
        // Closed, but not forgotten (a hostile driver never forgets): the
        // server still holds it, and so does the charge.
        s.fs.release(s.ctx, e.inode, 0, h, false, false, None)
            .unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(code(s.write(&e2, h2, 3 << 20, 0)), Some(libc::ENOSPC));
        // Let go of it: now there is room.
        s.fs.forget(s.ctx, e.inode, 1);
        assert_eq!(s.write(&e2, h2, 3 << 20, 0).ok(), Some(3 << 20));
        s.close(&e2, h2);
    }

    #[test]
    fn space_freed_on_the_host_is_found_when_a_request_needs_it() {
        let s = Share::new(2 * MIB);
        let (e, h) = s.create(ROOT, "a").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.write(&e, h, 3 << 19, 0).ok(), Some(3 << 19));
        s.close(&e, h);
        std::fs::remove_file(s.dir.path().join("a")).unwrap_or_else(|e| panic!("{e}"));
        let (e, h) = s.create(ROOT, "b").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.write(&e, h, 3 << 19, 0).ok(), Some(3 << 19));
        s.close(&e, h);
    }

    #[test]
    fn links_that_would_lead_out_are_refused_when_made_and_when_moved() {
        let s = Share::new(4 * MIB);
        let a = s.mkdir(ROOT, "a");
        let b = s.mkdir(a.inode, "b");
        let other = s.mkdir(ROOT, "c");
        let eperm = Some(libc::EPERM);
        assert_eq!(code(s.symlink("/etc/shadow", b.inode, "abs")), eperm);
        assert_eq!(code(s.symlink("../../../x", b.inode, "up3")), eperm);
        assert_eq!(code(s.symlink("x/../../../y", b.inode, "mid")), eperm);
        s.symlink("../../c/file", b.inode, "ok")
            .unwrap_or_else(|e| panic!("{e}"));
        s.symlink("../../c", a.inode, "..up")
            .err()
            .unwrap_or_else(|| panic!("../../c at depth 1 was allowed"));
        // The same depth, or deeper: the link still lands inside.
        s.rename(b.inode, "ok", b.inode, "ok2")
            .unwrap_or_else(|e| panic!("{e}"));
        // Closer to the root it would not: refused, as is moving the
        // directory that holds it.
        assert_eq!(
            code(s.rename(b.inode, "ok2", ROOT, "ok3")),
            Some(libc::EXDEV)
        );
        assert_eq!(code(s.rename(a.inode, "b", ROOT, "b")), Some(libc::EXDEV));
        assert_eq!(
            code(
                s.fs.link(
                    s.ctx,
                    s.fs.lookup(s.ctx, b.inode, &c("ok2"))
                        .map(|e| e.inode)
                        .unwrap_or(0),
                    ROOT,
                    &c("hard")
                )
            ),
            Some(libc::EXDEV)
        );
        // Sideways is fine, and so is deeper.
        s.rename(a.inode, "b", other.inode, "b")
            .unwrap_or_else(|e| panic!("{e}"));
        let d = s.mkdir(other.inode, "d");
        s.rename(other.inode, "b", d.inode, "b")
            .unwrap_or_else(|e| panic!("{e}"));
        // Nothing the guest made points outside.
        for link in ["abs", "up3", "mid", "ok3", "..up"] {
            assert!(
                !s.dir.path().join("a/b").join(link).exists(),
                "{link} was made"
            );
        }
        let target =
            std::fs::read_link(s.dir.path().join("c/d/b/ok2")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(target, Path::new("../../c/file"));
    }

    #[test]
    fn device_nodes_are_refused_and_df_shows_the_cap() {
        let s = Share::new(4 * MIB);
        for kind in [libc::S_IFCHR, libc::S_IFBLK] {
            let made = s.fs.mknod(
                s.ctx,
                ROOT,
                &c("dev"),
                kind | 0o666,
                libc::makedev(1, 3) as u32,
                0,
                Extensions::default(),
            );
            assert_eq!(code(made), Some(libc::EPERM));
        }
        assert!(!s.dir.path().join("dev").exists());
        let st = s.fs.statfs(s.ctx, ROOT).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(st.f_blocks * st.f_bsize, s.fs.ledger().cap() / UNIT * UNIT);
        assert!(st.f_bavail * st.f_bsize <= 4 * MIB);
    }
}
