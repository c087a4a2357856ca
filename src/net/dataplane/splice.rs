//! Zero-copy TCP relay: each direction moves bytes socket → pipe → socket
//! with splice(2), so the payload never crosses into user space. A
//! direction that reaches end of stream shuts the other socket down for
//! writing (half-close), and the relay ends when both directions have.

use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Pipe capacity asked for per direction (the kernel may give less:
/// unprivileged processes are capped by /proc/sys/fs/pipe-max-size).
const PIPE_SIZE: i32 = 1 << 20;
/// Pipes of [`PIPE_SIZE`] at once per process (one VM's dataplane): 16
/// connections at full speed. Pipes beyond them get [`SMALL_PIPE`], so a
/// guest that opens its 4096 connections and never reads pins at most
/// 32 × 1 MiB + 8160 × 16 KiB ≈ 160 MiB of pipe buffers, not 8 GiB.
pub const MAX_BIG_PIPES: usize = 32;
pub const SMALL_PIPE: i32 = 16 * 1024;

static BIG_PIPES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One of the [`MAX_BIG_PIPES`], given back when dropped.
struct BigPipe;

impl BigPipe {
    fn take() -> Option<BigPipe> {
        use std::sync::atomic::Ordering;
        BIG_PIPES
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_BIG_PIPES).then_some(n + 1)
            })
            .ok()
            .map(|_| BigPipe)
    }
}

impl Drop for BigPipe {
    fn drop(&mut self) {
        BIG_PIPES.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Bytes moved per splice call at most.
const CHUNK: usize = 1 << 20;

/// Bytes relayed in each direction: (a → b, b → a).
pub type Moved = (u64, u64);

/// Relay between `a` and `b` until both directions end. On an error in one
/// direction both sockets are shut down, so that the other direction ends
/// too, and the first error is returned.
pub async fn relay(a: &TcpStream, b: &TcpStream) -> std::io::Result<Moved> {
    let (ab, ba) = tokio::join!(pump_or_abort(a, b), pump_or_abort(b, a));
    Ok((ab?, ba?))
}

pub async fn pump_or_abort(from: &TcpStream, to: &TcpStream) -> std::io::Result<u64> {
    let r = pump(from, to).await;
    if r.is_err() {
        for s in [from, to] {
            let _ = socket2::SockRef::from(s).shutdown(std::net::Shutdown::Both);
        }
    }
    r
}

/// A pipe for one direction of a relay, with its share of the large-pipe
/// budget.
type Pipe = (OwnedFd, OwnedFd, Option<BigPipe>);

/// Empty pipes kept for the next connections (a new connection then
/// costs no pipe2, fcntl or close): at most this many.
const POOLED: usize = 64;

static POOL: std::sync::Mutex<Vec<Pipe>> = std::sync::Mutex::new(Vec::new());

/// A pipe from the pool, or a new one.
fn take_pipe() -> std::io::Result<Pipe> {
    if let Some(p) = POOL.lock().ok().and_then(|mut v| v.pop()) {
        return Ok(p);
    }
    pipe()
}

/// Give back a pipe that is known to be empty.
fn return_pipe(p: Pipe) {
    if let Ok(mut v) = POOL.lock()
        && v.len() < POOLED
    {
        v.push(p);
    }
}

fn pipe() -> std::io::Result<Pipe> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    // A larger pipe means fewer wake-ups per megabyte; failing to grow it
    // only costs speed. Shrinking cannot fail while the pipe is empty.
    let big = BigPipe::take();
    let size = if big.is_some() { PIPE_SIZE } else { SMALL_PIPE };
    let _ = fcntl(&w, FcntlArg::F_SETPIPE_SZ(size));
    Ok((r, w, big))
}

/// One direction: `from` → pipe → `to`, then shut `to` down for writing.
async fn pump(from: &TcpStream, to: &TcpStream) -> std::io::Result<u64> {
    let (pipe_r, pipe_w, big) = take_pipe()?;
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut total = 0u64;
    loop {
        // Fill the pipe from the socket.
        let n = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || {
                splice(from.as_fd(), None, pipe_w.as_fd(), None, CHUNK, flags)
                    .map_err(std::io::Error::from)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) if e.raw_os_error() == Some(Errno::EINTR as i32) => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            // End of stream: pass the half-close on.
            let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
            // Everything that went in came out: the pipe is empty.
            return_pipe((pipe_r, pipe_w, big));
            return Ok(total);
        }
        // Drain exactly what went in.
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe_r.as_fd(), None, to.as_fd(), None, left, flags)
                    .map_err(std::io::Error::from)
            }) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::WriteZero,
                        "splice wrote nothing",
                    ));
                }
                Ok(m) => left -= m,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) if e.raw_os_error() == Some(Errno::EINTR as i32) => continue,
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A pair of connected loopback streams.
    async fn pair(listener: &tokio::net::TcpListener) -> (TcpStream, TcpStream) {
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let (c, s) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (
            c.unwrap_or_else(|e| panic!("{e}")),
            s.unwrap_or_else(|e| panic!("{e}")).0,
        )
    }

    #[tokio::test]
    async fn relays_both_ways_with_half_close() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        // client <-> (a relay b) <-> server
        let (mut client, a) = pair(&l).await;
        let (b, mut server) = pair(&l).await;
        let relay = tokio::spawn(async move { relay(&a, &b).await });

        // 5 MiB of a non-repeating pattern up, then half-close.
        let up: Vec<u8> = (0..5u32 << 20).map(|i| (i % 251) as u8).collect();
        let expect = up.clone();
        let writer = tokio::spawn(async move {
            client
                .write_all(&up)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            client.shutdown().await.unwrap_or_else(|e| panic!("{e}"));
            client
        });
        let mut got = Vec::new();
        server
            .read_to_end(&mut got)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(got == expect, "payload changed in the relay");
        // The other direction still works after the half-close.
        server
            .write_all(b"reply after half-close")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        server.shutdown().await.unwrap_or_else(|e| panic!("{e}"));
        let mut client = writer.await.unwrap_or_else(|e| panic!("{e}"));
        let mut back = Vec::new();
        client
            .read_to_end(&mut back)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, b"reply after half-close");
        let moved = relay
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(moved, (5 << 20, 22));
    }
}
