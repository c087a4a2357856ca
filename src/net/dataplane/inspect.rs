//! `allow_domains` on the wire: the relay of a connection whose client
//! side must name an allowed host.
//!
//! The server's side is spliced as for every flow. The client's side is
//! read by this module: its first flight ([`first_flight`]) must be a
//! complete ClientHello naming an allowed host (then the rest is opaque
//! TLS), an HTTP/1 request naming one, or a binary protocol to an address
//! that only allowed names resolved to. Plain HTTP stays in user space for
//! the life of the connection: every request on a kept-alive connection is
//! framed (Content-Length or chunked) and its Host checked before it is
//! sent, so a second request cannot name another site on a shared server.
//! That keeps keep-alive (package managers reuse connections) where
//! closing after the first response would cost a handshake per request.
//! On a refusal the upstream is shut for writing, the answers already
//! asked for are delivered, and the connection ends.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::domains::{Allowlist, Body, Chunked, FirstFlight, first_flight};
use super::policy::Denial;

/// A request (or ClientHello) that has started must be complete by then.
pub const COMPLETE_WITHIN: Duration = Duration::from_secs(5);
/// After a refusal, how long the server may take to finish its answers.
const DRAIN: Duration = Duration::from_secs(10);
const READ_CHUNK: usize = 16 * 1024;

/// One inspected connection: what the guest may name, and both ends.
struct Conn<'a> {
    list: &'a Allowlist,
    ip: IpAddr,
    guest: &'a TcpStream,
    upstream: &'a TcpStream,
    /// Bytes sent upstream for the guest.
    sent: &'a AtomicU64,
}

impl Conn<'_> {
    /// Send `data` upstream, counting it.
    async fn send(&self, data: &[u8]) -> std::io::Result<()> {
        write_all(self.upstream, data, self.sent).await
    }

    /// Read more of the guest's bytes into `buf`.
    async fn read(&self, buf: &mut Vec<u8>) -> std::io::Result<usize> {
        read_some(self.guest, buf).await
    }
}

/// How long to wait for a client to speak first before taking it for a
/// server-first protocol.
const CLIENT_FIRST_WAIT: Duration = Duration::from_millis(800);

/// Before anything is sent on its behalf: the client's first flight (if it
/// speaks within [`CLIENT_FIRST_WAIT`]) must pass [`verdict`]; a silent
/// client (server-first protocols) is let through to an address no other
/// name shares, and inspected once it speaks. `None` when the client went
/// away before saying anything.
pub async fn before_connect(
    list: &Allowlist,
    ip: IpAddr,
    guest: &TcpStream,
) -> Result<Option<First>, Refusal> {
    let mut bytes = Vec::new();
    match tokio::time::timeout(CLIENT_FIRST_WAIT, read_some(guest, &mut bytes)).await {
        Ok(Ok(n)) if n > 0 => {
            let (http, name) = check_first(list, ip, guest, &mut bytes).await?;
            Ok(Some(First {
                bytes,
                http: Some(http),
                name,
            }))
        }
        Ok(_) => Ok(None),
        Err(_) if list.is_shared(ip) => Err(Refusal::new(
            Denial::NotAllowedDomain,
            "a silent client on a shared address",
        )),
        Err(_) => Ok(Some(First {
            bytes,
            http: None,
            name: None,
        })),
    }
}

/// What [`before_connect`] read of the client's first flight.
#[derive(Debug, Default)]
pub struct First {
    pub bytes: Vec<u8>,
    /// When they were checked: whether they start an HTTP request.
    pub http: Option<bool>,
    /// The host they named (TLS SNI, HTTP Host), normalized.
    pub name: Option<String>,
}

/// Why the proxy cut a connection off: the reason counted, a detail for
/// the log, and the host the refused request named (for the journal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub why: Denial,
    pub detail: &'static str,
    pub name: Option<String>,
}

impl Refusal {
    fn new(why: Denial, detail: &'static str) -> Refusal {
        Refusal {
            why,
            detail,
            name: None,
        }
    }

    fn naming(mut self, name: &str) -> Refusal {
        self.name = Some(super::domains::normalize(name));
        self
    }
}

/// The verdict on a first flight, reading more of it as needed; `Ok`
/// says whether it is an HTTP request, and the host it named.
async fn check_first(
    list: &Allowlist,
    ip: IpAddr,
    guest: &TcpStream,
    buf: &mut Vec<u8>,
) -> Result<(bool, Option<String>), Refusal> {
    let deadline = Instant::now() + COMPLETE_WITHIN;
    loop {
        let flight = first_flight(buf);
        match verdict(list, ip, &flight) {
            Some(v) => {
                let name = match &flight {
                    FirstFlight::Tls { sni: Some(n), .. } => Some(super::domains::normalize(n)),
                    FirstFlight::Http(head) => Some(super::domains::normalize(&head.host)),
                    _ => None,
                };
                return v.map(|()| (matches!(flight, FirstFlight::Http(_)), name));
            }
            None => {
                let waited = tokio::time::timeout_at(deadline, read_some(guest, buf)).await;
                match waited {
                    Ok(Ok(n)) if n > 0 => {}
                    Ok(_) => {
                        return Err(Refusal::new(
                            Denial::NotAllowedDomain,
                            "closed before naming a host",
                        ));
                    }
                    Err(_) => {
                        return Err(Refusal::new(
                            Denial::Uninspectable,
                            "incomplete first request",
                        ));
                    }
                }
            }
        }
    }
}

/// `None`: more bytes are needed.
fn verdict(list: &Allowlist, ip: IpAddr, flight: &FirstFlight) -> Option<Result<(), Refusal>> {
    let named = |name: &str| {
        if list.admits_request(ip, name) {
            Ok(())
        } else {
            Err(Refusal::new(Denial::NotAllowedDomain, "names a host not allowed").naming(name))
        }
    };
    Some(match flight {
        FirstFlight::NeedMore => return None,
        FirstFlight::Tls { ech: true, .. } => Err(Refusal::new(
            Denial::Uninspectable,
            "encrypted ClientHello (ECH)",
        )),
        FirstFlight::Tls { sni: None, .. } => {
            Err(Refusal::new(Denial::Uninspectable, "TLS without SNI"))
        }
        FirstFlight::Tls { sni: Some(n), .. } => named(n),
        FirstFlight::Http(head) => named(&head.host),
        FirstFlight::Bad(why) => Err(Refusal::new(Denial::Uninspectable, why)),
        FirstFlight::Opaque if list.is_shared(ip) => Err(Refusal::new(
            Denial::NotAllowedDomain,
            "unnamed protocol to a shared address",
        )),
        FirstFlight::Opaque => Ok(()),
    })
}

/// Relay `guest` ⇄ `upstream`, the guest's side inspected from `first`
/// (what [`before_connect`] read: possibly nothing, a server-first
/// protocol).
/// Returns the refusal, if the guest's side was cut off, and the bytes
/// moved each way (from the guest, to it).
pub async fn relay(
    list: &Allowlist,
    ip: IpAddr,
    guest: &TcpStream,
    upstream: &TcpStream,
    first: First,
) -> (Option<Refusal>, u64, u64) {
    let sent = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    let down = async {
        if let Ok(n) = super::splice::pump_or_abort(upstream, guest).await {
            received.store(n, Ordering::Relaxed);
        }
    };
    tokio::pin!(down);
    let conn = Conn {
        list,
        ip,
        guest,
        upstream,
        sent: &sent,
    };
    let up = client_side(&conn, first.bytes, first.http);
    tokio::pin!(up);
    let mut down_done = false;
    let refused = loop {
        tokio::select! {
            refused = &mut up => {
                // Whether it ended or was cut off, the server hears no more.
                let _ = socket2::SockRef::from(upstream).shutdown(std::net::Shutdown::Write);
                if !down_done {
                    // Deliver the answers already asked for, within a bound.
                    if refused.is_some() {
                        let _ = tokio::time::timeout(DRAIN, &mut down).await;
                    } else {
                        let _ = (&mut down).await;
                    }
                }
                break refused;
            }
            _ = &mut down, if !down_done => down_done = true,
        }
    };
    (
        refused,
        sent.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed),
    )
}

/// The guest → upstream direction. `Some` when it was refused.
async fn client_side(c: &Conn<'_>, mut buf: Vec<u8>, http: Option<bool>) -> Option<Refusal> {
    let http = match http {
        Some(h) => h,
        None => {
            // A server-first protocol: the client's first flight may come
            // as late as it likes, then gets the usual time to complete.
            while buf.is_empty() {
                match c.read(&mut buf).await {
                    Ok(n) if n > 0 => {}
                    _ => return None,
                }
            }
            match check_first(c.list, c.ip, c.guest, &mut buf).await {
                Ok((h, _)) => h,
                Err(refused) => return Some(refused),
            }
        }
    };
    if !http {
        // TLS after a checked ClientHello, or an opaque protocol.
        if c.send(&buf).await.is_err() {
            return None;
        }
        if let Ok(n) = super::splice::pump_or_abort(c.guest, c.upstream).await {
            c.sent.fetch_add(n, Ordering::Relaxed);
        }
        return None;
    }
    http_requests(c, buf).await
}

/// Plain HTTP: frame every request, check its Host, send it on.
async fn http_requests(c: &Conn<'_>, mut buf: Vec<u8>) -> Option<Refusal> {
    loop {
        // The next head; an idle kept-alive connection may wait forever
        // (it holds one of the VM's connection slots), a started head
        // must complete in time.
        if buf.is_empty() {
            match c.read(&mut buf).await {
                Ok(n) if n > 0 => {}
                _ => return None,
            }
        }
        let deadline = Instant::now() + COMPLETE_WITHIN;
        let head = loop {
            match first_flight(&buf) {
                FirstFlight::Http(head) => break head,
                FirstFlight::NeedMore => {}
                FirstFlight::Bad(why) => return Some(Refusal::new(Denial::Uninspectable, why)),
                _ => return Some(Refusal::new(Denial::Uninspectable, "not an HTTP request")),
            }
            match tokio::time::timeout_at(deadline, c.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return None,
                Err(_) => {
                    return Some(Refusal::new(
                        Denial::Uninspectable,
                        "incomplete request head",
                    ));
                }
            }
        };
        if !c.list.admits_request(c.ip, &head.host) {
            tracing::info!(
                "allow_domains: a later request on one connection names {}",
                head.host
            );
            return Some(
                Refusal::new(
                    Denial::NotAllowedDomain,
                    "a later request names a host not allowed",
                )
                .naming(&head.host),
            );
        }
        let rest = buf.split_off(head.len.min(buf.len()));
        if c.send(&buf).await.is_err() {
            return None;
        }
        buf = rest;
        let body = match head.body {
            Body::None => Ok(()),
            Body::Length(n) => copy_length(c, &mut buf, n).await,
            Body::Chunked => copy_chunked(c, &mut buf).await,
        };
        match body {
            Ok(()) => {}
            Err(Some(why)) => return Some(Refusal::new(Denial::Uninspectable, why)),
            Err(None) => return None,
        }
    }
}

/// Send `n` body bytes: those in `buf` first, then from the guest.
/// `Err(None)`: the connection ended; `Err(Some)`: refused.
async fn copy_length(
    c: &Conn<'_>,
    buf: &mut Vec<u8>,
    mut n: u64,
) -> Result<(), Option<&'static str>> {
    loop {
        let take = usize::try_from(n).unwrap_or(usize::MAX).min(buf.len());
        if take > 0 {
            c.send(&buf[..take]).await.map_err(|_| None)?;
            buf.drain(..take);
            n -= take as u64;
        }
        if n == 0 {
            return Ok(());
        }
        match c.read(buf).await {
            Ok(m) if m > 0 => {}
            _ => return Err(None),
        }
    }
}

async fn copy_chunked(c: &Conn<'_>, buf: &mut Vec<u8>) -> Result<(), Option<&'static str>> {
    let mut chunked = Chunked::default();
    loop {
        let (used, done) = chunked.feed(buf).map_err(Some)?;
        if used > 0 {
            c.send(&buf[..used]).await.map_err(|_| None)?;
            buf.drain(..used);
        }
        if done {
            return Ok(());
        }
        match c.read(buf).await {
            Ok(m) if m > 0 => {}
            _ => return Err(None),
        }
    }
}

/// Append what the socket has (waiting for at least one byte); 0 at end
/// of stream.
pub async fn read_some(s: &TcpStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut chunk = [0u8; READ_CHUNK];
    loop {
        s.readable().await?;
        match s.try_read(&mut chunk) {
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Write all of `data`, counting it in `sent`.
async fn write_all(s: &TcpStream, mut data: &[u8], sent: &AtomicU64) -> std::io::Result<()> {
    while !data.is_empty() {
        s.writable().await?;
        match s.try_write(data) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                data = &data[n..];
                sent.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
