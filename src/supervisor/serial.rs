//! The serial log. QEMU writes what the guest prints on its console into
//! a pipe (never a file it could grow without bound); a thread copies it
//! to `serial.log`, rotated at [`MAX_BYTES`] keeping one previous file.
//! The pipe is always drained, so a guest printing in a loop never stalls
//! QEMU's main loop, and it costs the host at most 2 × [`MAX_BYTES`].

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

/// `serial.log` is rotated at this size.
pub const MAX_BYTES: u64 = 2 << 20;

/// Copy from `pipe` (the read end) into the capped log at `path` until
/// QEMU closes its end.
pub fn spawn(pipe: OwnedFd, path: PathBuf) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("serial-log".into())
        .spawn(move || {
            let mut log = crate::rotate::Rotating::new(path, MAX_BYTES, 0o600);
            let mut pipe = std::fs::File::from(pipe);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if let Err(e) = log.write(&buf[..n]) {
                            tracing::warn!("serial log: {e}");
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::warn!("serial log pipe: {e}");
                        break;
                    }
                }
            }
        })
        .map(|_| ())
}
