//! Append-only files with a size cap: at the cap the file becomes
//! `NAME.1` (replacing an older one) and a new one starts, so at most twice
//! the cap is ever on disk. For what a guest can make the host write: the
//! serial log, the egress journal.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub struct Rotating {
    path: PathBuf,
    cap: u64,
    mode: u32,
    /// Besides the owner, who may read (an ACL entry, [`crate::acl`]).
    reader: Option<u32>,
    out: Option<std::fs::File>,
    size: u64,
}

/// The previous file of `path`.
pub fn previous(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

impl Rotating {
    /// Appends to `path` (created with `mode`, never through a symlink).
    pub fn new(path: PathBuf, cap: u64, mode: u32) -> Rotating {
        Rotating {
            path,
            cap,
            mode,
            reader: None,
            out: None,
            size: 0,
        }
    }

    /// Let `uid` read the file too (root keeps owning it).
    pub fn readable_by(mut self, uid: Option<u32>) -> Rotating {
        self.reader = uid;
        self
    }

    fn open(&mut self) -> std::io::Result<&mut std::fs::File> {
        if self.out.is_none() {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(self.mode)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&self.path)?;
            self.size = f.metadata().map(|m| m.len()).unwrap_or(0);
            // An older file keeps no wider mode than asked for.
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(self.mode))?;
            if self.reader.is_some() {
                crate::acl::let_read_or_warn(&f, self.reader, &self.path);
            }
            self.out = Some(f);
        }
        self.out
            .as_mut()
            .ok_or_else(|| std::io::Error::other("not open"))
    }

    /// Append `data`, rotating first when it would pass the cap. A chunk
    /// larger than the cap is cut to its last `cap` bytes.
    pub fn write(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        let cap = usize::try_from(self.cap).unwrap_or(usize::MAX);
        if data.len() > cap {
            data = &data[data.len() - cap..];
        }
        self.open()?;
        if self.size + data.len() as u64 > self.cap {
            self.out = None;
            std::fs::rename(&self.path, previous(&self.path))?;
        }
        let r = self.open()?.write_all(data);
        match r {
            Ok(()) => {
                self.size += data.len() as u64;
                Ok(())
            }
            Err(e) => {
                self.out = None;
                Err(e)
            }
        }
    }
}

impl Rotating {
    /// Append `text`, whole lines: at once when it fits under the cap,
    /// else line by line, rotating between lines.
    pub fn write_lines(&mut self, text: &[u8]) -> std::io::Result<()> {
        self.open()?;
        if self.size + text.len() as u64 <= self.cap {
            return self.write(text);
        }
        for line in text.split_inclusive(|b| *b == b'\n') {
            self.write(line)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_more_than_twice_the_cap() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("serial.log");
        let mut f = Rotating::new(path.clone(), 1000, 0o600);
        for i in 0..500u32 {
            f.write(format!("line {i:05}\n").as_bytes())
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let now = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
        let old = std::fs::read_to_string(previous(&path)).unwrap_or_else(|e| panic!("{e}"));
        assert!(now.len() <= 1000 && old.len() <= 1000);
        assert!(now.ends_with("line 00499\n"), "the newest lines are kept");
        assert!(
            old.ends_with('\n') && now.starts_with("line "),
            "rotated at writes"
        );
        f.write(&[b'x'; 5000]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0), 1000);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path)
            .map(|m| m.permissions().mode())
            .unwrap_or(0);
        assert_eq!(mode & 0o777, 0o600);
    }
}
