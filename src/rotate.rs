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
            out: None,
            size: 0,
        }
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

/// A thread copying a pipe into a capped file until every write end is
/// closed. A process whose output the guest (or a compromised QEMU)
/// steers writes into the pipe, never the file, so it cannot grow the
/// file past the cap nor stall on it: the pipe is always drained.
pub struct Drain(std::sync::mpsc::Receiver<()>);

impl Drain {
    /// Start copying `pipe` (a read end) into `log`.
    pub fn spawn(
        name: &str,
        pipe: std::os::fd::OwnedFd,
        mut log: Rotating,
    ) -> std::io::Result<Drain> {
        use std::io::Read;
        let (done, finished) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let mut pipe = std::fs::File::from(pipe);
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match pipe.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            // Nowhere to say it but the log that failed.
                            let _ = log.write(&buf[..n]);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
                let _ = done.send(());
            })?;
        Ok(Drain(finished))
    }

    /// Wait up to `timeout` for the writers to close and the copy to end.
    pub fn wait(&self, timeout: std::time::Duration) -> bool {
        self.0.recv_timeout(timeout).is_ok()
    }
}

/// A log a confined child writes: the write end of a pipe whose other
/// end a thread of this process copies into `path`, rotated at `cap`.
/// The child gets the pipe, never the file.
pub fn capped_log(name: &str, path: &Path, cap: u64) -> std::io::Result<(std::fs::File, Drain)> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let mut log = Rotating::new(path.to_path_buf(), cap, 0o600);
    // The file exists (0600) from the start, whether or not the child
    // ever says anything.
    log.write(b"")?;
    let drain = Drain::spawn(name, read, log)?;
    Ok((std::fs::File::from(write), drain))
}

/// The cap of a helper's log (`qemu.log`, `wireguard.log`,
/// `virtiofsd-TAG.log`).
pub const HELPER_LOG_CAP: u64 = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drained_pipe_is_capped() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("qemu.log");
        let (r, w) = nix::unistd::pipe().unwrap_or_else(|e| panic!("{e}"));
        let drain = Drain::spawn("test", r, Rotating::new(path.clone(), 4096, 0o600))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut w = std::fs::File::from(w);
        for i in 0..10_000u32 {
            w.write_all(format!("line {i:05}\n").as_bytes())
                .unwrap_or_else(|e| panic!("{e}"));
        }
        drop(w);
        assert!(drain.wait(std::time::Duration::from_secs(10)));
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        assert!(size(&path) <= 4096 && size(&previous(&path)) <= 4096);
        let now = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(now.ends_with("line 09999\n"), "{now}");
    }

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
