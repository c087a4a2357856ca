//! The guest's file I/O on a share: reads that bypass its page cache (or
//! not), shared writable mappings, SQLite in WAL mode; and what of it the
//! host sees.

use super::{Env, text};
use std::path::Path;

/// What `file_io` saw in the guest.
#[derive(Debug)]
pub struct FileIo {
    /// How much the guest's page cache grew while reading 64 MiB from the
    /// share (after dropping its caches).
    pub cache_growth_kib: i64,
    /// SQLite's journal mode after asking for WAL, and the rows a second
    /// connection read.
    pub journal: String,
    pub rows: i64,
}

/// In the guest, on the share at `dir`: read 64 MiB and measure the page
/// cache, write through a shared writable mapping, and use SQLite in WAL
/// mode from two connections (its index is a shared mapping too).
pub fn file_io(env: &Env, dir: &str) -> FileIo {
    let script = format!(
        r#"
import mmap, os, sqlite3, subprocess
d = {dir:?}
def cached():
    for line in open("/proc/meminfo"):
        if line.startswith("Cached:"):
            return int(line.split()[1])
subprocess.run(["dd", "if=/dev/urandom", "of=" + d + "/big.bin", "bs=1M", "count=64", "status=none"], check=True)
os.sync()
open("/proc/sys/vm/drop_caches", "w").write("3")
before = cached()
with open(d + "/big.bin", "rb") as f:
    while f.read(1 << 20):
        pass
print("cache", cached() - before)
with open(d + "/mapped.bin", "wb") as f:
    f.write(bytes(4096))
with open(d + "/mapped.bin", "r+b") as f:
    m = mmap.mmap(f.fileno(), 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    m[0:15] = b"written by mmap"
    m.flush()
    m.close()
a = sqlite3.connect(d + "/db.sqlite")
print("journal", a.execute("pragma journal_mode=wal").fetchone()[0])
a.execute("create table t(x)")
a.executemany("insert into t values (?)", [(i,) for i in range(1000)])
a.commit()
b = sqlite3.connect(d + "/db.sqlite")
print("rows", b.execute("select count(*) from t").fetchone()[0])
b.close()
a.close()
os.remove(d + "/big.bin")
os.sync()
"#
    );
    let out = env.run_input(&["ssh", "--", "sudo", "python3", "-"], script.as_bytes());
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "guest file I/O: {}", text(&out));
    let field = |key: &str| {
        said.lines()
            .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("no {key:?} in {said}"))
    };
    let number = |key: &str| {
        field(key)
            .parse::<i64>()
            .unwrap_or_else(|e| panic!("{key}: {e}: {said}"))
    };
    FileIo {
        cache_growth_kib: number("cache "),
        journal: field("journal "),
        rows: number("rows "),
    }
}

/// What the guest wrote through its mapping and into SQLite is on the
/// host's side of the share at `host`.
pub fn assert_mapped_and_sqlite(host: &Path, io: &FileIo) {
    assert_eq!(io.journal, "wal", "{io:?}");
    assert_eq!(io.rows, 1000, "{io:?}");
    let mapped = std::fs::read(host.join("mapped.bin")).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        mapped.starts_with(b"written by mmap"),
        "mapping not written back"
    );
    let db = std::fs::read(host.join("db.sqlite")).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        db.starts_with(b"SQLite format 3\0"),
        "no database on the host"
    );
}
