//! Process exit codes (sysexits.h), one place for all of them, and how an
//! error is told ([`chain`]): the bottom of the tree, so that any module
//! may use both without importing the modules above it.

/// Command line usage error.
pub const USAGE: u8 = 64;
/// Input data was incorrect.
pub const DATAERR: u8 = 65;
/// A required service or program is unavailable.
pub const UNAVAILABLE: u8 = 69;
/// Internal software error.
pub const SOFTWARE: u8 = 70;
/// Temporary failure (for example: the VM's lock is held); retry later.
pub const TEMPFAIL: u8 = 75;
/// Permission denied.
pub const NOPERM: u8 = 77;
/// Configuration error (Migrantfile, cloud-init.yml, keys).
pub const CONFIG: u8 = 78;

/// `error: a: b: c` — the error and its sources, once.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let t = src.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = src.source();
    }
    s
}
