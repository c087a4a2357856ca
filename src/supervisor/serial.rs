//! The serial log. QEMU writes what the guest prints on its console into
//! a pipe (never a file it could grow without bound); a thread copies it
//! to `serial.log`, rotated at [`MAX_BYTES`] keeping one previous file.
//! The pipe is always drained, so a guest printing in a loop never stalls
//! QEMU's main loop, and it costs the host at most 2 × [`MAX_BYTES`].

use std::os::fd::OwnedFd;
use std::path::PathBuf;

/// `serial.log` is rotated at this size.
pub const MAX_BYTES: u64 = 2 << 20;

/// Copy from `pipe` (the read end) into the capped log at `path` until
/// QEMU closes its end.
pub fn spawn(pipe: OwnedFd, path: PathBuf) -> std::io::Result<()> {
    let log = crate::rotate::Rotating::new(path, MAX_BYTES, 0o600);
    crate::rotate::Drain::spawn("serial-log", pipe, log).map(|_| ())
}
