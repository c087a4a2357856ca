//! One connection the broker looks into. [`classify`] peeks at the
//! guest's first bytes (nothing is taken from the socket, so a connection
//! it passes on is relayed as if never looked at). A TLS connection for a
//! secret's host is terminated ([`tls`]): the guest's ClientHello is read,
//! the real server is reached over the broker's own TLS offering what the
//! guest offered, and the guest's handshake is finished speaking what the
//! server chose, with a certificate from the VM's authority. Plain HTTP
//! ([`plain`]) is read request by request so that no placeholder leaves in
//! clear. Requests are framed by hyper on both sides (HTTP/1.1 with
//! keep-alive, chunked bodies and upgrades; HTTP/2), one upstream
//! connection per guest connection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::Broker;
use super::rewrite::{Refusal, Scanner};
use crate::net::dataplane::domains::{Allowlist, FirstFlight, first_flight, normalize};
use crate::net::dataplane::inspect::COMPLETE_WITHIN;
use crate::net::dataplane::policy::Denial;
use crate::net::dataplane::stats::{Asked, Stats};

/// How long a client may stay silent before its connection is passed on
/// unlooked-at (server-first protocols: SSH to a secret's host).
const CLIENT_FIRST_WAIT: Duration = Duration::from_millis(800);
/// The most of a first flight looked at.
const PEEK_LIMIT: usize = 16 * 1024 + 512;
/// The guest's and the server's TLS handshakes.
const HANDSHAKE: Duration = Duration::from_secs(15);
/// HTTP/1 buffers, each side (hyper's floor is 8 KiB).
const MAX_BUF: usize = 64 * 1024;
/// A request's head must be complete within this.
const HEADER_WITHIN: Duration = Duration::from_secs(30);
/// HTTP/2 streams at once per connection, and header block size.
const MAX_STREAMS: u32 = 32;
/// HTTP/2 flow-control windows offered to the guest: what it may send
/// before the broker reads.
const STREAM_WINDOW: u32 = 64 * 1024;
const CONNECTION_WINDOW: u32 = 256 * 1024;
/// A request body of at most this size (as its length says) is read
/// whole and searched before anything of the request is sent: a refused
/// request never reaches the server. Longer ones are searched as they
/// go, and cut off at a placeholder.
pub const WHOLE_BODY: u64 = 16 * 1024;
const MAX_HEADER_LIST: u32 = 64 * 1024;
/// The longest path the journal keeps.
const PATH_IN_JOURNAL: usize = 200;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Outgoing = BoxBody<Bytes, BoxError>;

/// What a connection's first bytes are, for the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// TLS for this secret host (normalized).
    Tls(String),
    /// An HTTP/1 request in clear.
    Http,
    /// Anything else: relayed as usual.
    Other,
}

/// Peek at the first bytes of a guest connection to `dst`.
pub async fn classify(broker: &Broker, dst: SocketAddr, guest: &TcpStream) -> Seen {
    if !broker.watches(dst.ip(), dst.port()) {
        return Seen::Other;
    }
    let mut buf = vec![0u8; PEEK_LIMIT];
    let mut n = match tokio::time::timeout(CLIENT_FIRST_WAIT, guest.peek(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => n,
        _ => return Seen::Other,
    };
    let deadline = tokio::time::Instant::now() + COMPLETE_WITHIN;
    loop {
        match first_flight(&buf[..n]) {
            FirstFlight::Tls {
                sni: Some(name), ..
            } => {
                let name = normalize(&name);
                return if broker.covers(&name) {
                    Seen::Tls(name)
                } else {
                    Seen::Other
                };
            }
            FirstFlight::Http(_) => return Seen::Http,
            FirstFlight::NeedMore if n < buf.len() && tokio::time::Instant::now() < deadline => {
                // The rest of the flight is on its way: peek again once
                // it may have come (peeking returns at once while any
                // byte waits).
                tokio::time::sleep(Duration::from_millis(5)).await;
                n = match guest.peek(&mut buf).await {
                    Ok(m) if m > 0 => m,
                    _ => return Seen::Other,
                };
            }
            _ => return Seen::Other,
        }
    }
}

/// What one looked-into connection knows.
pub struct Flow {
    pub broker: Arc<Broker>,
    pub stats: Arc<Stats>,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// `allow_domains`, which every plain request's host must pass.
    pub list: Option<Allowlist>,
}

/// Bytes each way, counted below TLS.
#[derive(Debug, Default)]
struct Counts {
    up: AtomicU64,
    down: AtomicU64,
}

/// Terminate the guest's TLS for `name` and relay its requests to the
/// real server over `upstream`. Bytes from and to the guest.
pub async fn tls(flow: Flow, guest: TcpStream, upstream: TcpStream, name: String) -> (u64, u64) {
    let counts = Arc::new(Counts::default());
    let guest = Counted {
        io: guest,
        counts: Arc::clone(&counts),
    };
    let acceptor =
        tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), guest);
    let start = match tokio::time::timeout(HANDSHAKE, acceptor).await {
        Ok(Ok(s)) => s,
        _ => return totals(&counts),
    };
    // What the guest offers that the broker speaks, in the broker's order.
    let offered: Vec<&[u8]> = match start.client_hello().alpn() {
        Some(list) => {
            let list: Vec<&[u8]> = list.collect();
            super::ALPN
                .into_iter()
                .filter(|p| list.contains(p))
                .collect()
        }
        None => Vec::new(),
    };
    let (Some(server_name), Ok(client)) = (
        Broker::server_name(&name),
        flow.broker.client_config(&offered),
    ) else {
        return totals(&counts);
    };
    let connector = tokio_rustls::TlsConnector::from(client);
    let up = match tokio::time::timeout(HANDSHAKE, connector.connect(server_name, upstream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            flow.stats.secret_refused(
                flow.src,
                flow.dst,
                Some(&name),
                None,
                None,
                Denial::UntrustedServer,
                &e.to_string(),
            );
            return totals(&counts);
        }
        Err(_) => return totals(&counts),
    };
    let chosen = up.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let h2 = chosen.as_deref() == Some(b"h2".as_slice());
    let config = match flow.broker.server_config(&name, chosen.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("broker: {e}");
            return totals(&counts);
        }
    };
    let guest = match tokio::time::timeout(HANDSHAKE, start.into_stream(config)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            // Most often: the guest does not trust the VM's authority.
            tracing::debug!("broker: the guest's handshake for {name}: {e}");
            return totals(&counts);
        }
        Err(_) => return totals(&counts),
    };
    relay(flow, guest, up, Some(name), h2).await;
    totals(&counts)
}

/// Relay a plain HTTP/1 connection request by request: no placeholder
/// may leave in clear.
pub async fn plain(flow: Flow, guest: TcpStream, upstream: TcpStream) -> (u64, u64) {
    let counts = Arc::new(Counts::default());
    let guest = Counted {
        io: guest,
        counts: Arc::clone(&counts),
    };
    relay(flow, guest, upstream, None, false).await;
    totals(&counts)
}

fn totals(c: &Counts) -> (u64, u64) {
    (c.up.load(Ordering::Relaxed), c.down.load(Ordering::Relaxed))
}

/// The real server's side of one connection.
enum Upstream {
    H1(tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<Outgoing>>),
    H2(hyper::client::conn::http2::SendRequest<Outgoing>),
}

/// One connection's requests, as hyper serves them.
struct Conn {
    flow: Flow,
    /// The name the guest's TLS was for; `None`: plain HTTP.
    name: Option<String>,
    upstream: Upstream,
    /// A request asked for an upgrade: the server's side ending may be
    /// its hand-over to the upgraded stream.
    upgrading: AtomicBool,
}

async fn relay<G, U>(flow: Flow, guest: G, upstream: U, name: Option<String>, h2: bool)
where
    G: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The server's side ending (its idle timeout, a GOAWAY) ends the
    // guest's too, as a relayed connection would: else the guest's next
    // request on its kept-alive connection would find nothing behind it.
    let (gone_tx, gone) = tokio::sync::oneshot::channel::<()>();
    let upstream = if h2 {
        let handshake = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_HEADER_LIST)
            .handshake(TokioIo::new(upstream))
            .await;
        match handshake {
            Ok((send, conn)) => {
                tokio::spawn(async move {
                    let _ = conn.await;
                    let _ = gone_tx.send(());
                });
                Upstream::H2(send)
            }
            Err(e) => {
                tracing::debug!("broker: HTTP/2 to the server: {e}");
                return;
            }
        }
    } else {
        let handshake = hyper::client::conn::http1::Builder::new()
            .max_buf_size(MAX_BUF)
            .handshake(TokioIo::new(upstream))
            .await;
        match handshake {
            Ok((send, conn)) => {
                tokio::spawn(async move {
                    let _ = conn.with_upgrades().await;
                    let _ = gone_tx.send(());
                });
                Upstream::H1(tokio::sync::Mutex::new(send))
            }
            Err(e) => {
                tracing::debug!("broker: HTTP/1 to the server: {e}");
                return;
            }
        }
    };
    let conn = Arc::new(Conn {
        flow,
        name,
        upstream,
        upgrading: AtomicBool::new(false),
    });
    let service = {
        let conn = Arc::clone(&conn);
        hyper::service::service_fn(move |req| handle(Arc::clone(&conn), req))
    };
    let served = if h2 {
        let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(MAX_STREAMS)
            .max_header_list_size(MAX_HEADER_LIST)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .serve_connection(TokioIo::new(guest), service);
        tokio::pin!(served);
        tokio::select! {
            r = served.as_mut() => r,
            _ = gone => {
                served.as_mut().graceful_shutdown();
                served.await
            }
        }
    } else {
        let served = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .max_buf_size(MAX_BUF)
            .header_read_timeout(HEADER_WITHIN)
            .serve_connection(TokioIo::new(guest), service)
            .with_upgrades();
        tokio::pin!(served);
        tokio::select! {
            r = served.as_mut() => r,
            _ = gone => {
                // An upgrade hands the server's connection over: that is
                // not its end.
                if !conn.upgrading.load(Ordering::Relaxed) {
                    served.as_mut().graceful_shutdown();
                }
                served.await
            }
        }
    };
    if let Err(e) = served {
        tracing::debug!("broker: the guest's connection: {e}");
    }
}

/// The host a request names (its authority, else its Host header),
/// normalized, without the port.
fn request_host<B>(req: &Request<B>) -> Option<String> {
    let from_header = || {
        req.headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<http::uri::Authority>().ok())
            .map(|a| a.host().to_string())
    };
    let host = req
        .uri()
        .authority()
        .map(|a| a.host().to_string())
        .or_else(from_header)?;
    Some(normalize(
        host.trim_start_matches('[').trim_end_matches(']'),
    ))
}

fn asked<B>(req: &Request<B>, host: &str) -> Asked {
    let mut path = req.uri().path().to_string();
    if path.len() > PATH_IN_JOURNAL {
        let mut cut = PATH_IN_JOURNAL;
        while !path.is_char_boundary(cut) {
            cut -= 1;
        }
        path.truncate(cut);
    }
    Asked {
        host: host.to_string(),
        method: req.method().as_str().to_string(),
        path,
    }
}

fn answer(status: StatusCode, text: String) -> Response<Outgoing> {
    let mut resp = Response::new(
        http_body_util::Full::new(Bytes::from(text))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

impl Conn {
    /// Journal a refused request and answer it with `status` and `text`.
    fn deny(
        &self,
        asked: &Asked,
        (secret, why): (Option<&str>, Denial),
        status: StatusCode,
        text: String,
    ) -> Response<Outgoing> {
        self.flow.stats.secret_refused(
            self.flow.src,
            self.flow.dst,
            Some(&asked.host),
            secret,
            Some(asked),
            why,
            "",
        );
        answer(status, text)
    }

    /// Journal a request refused for the placeholder it carried, and
    /// answer it.
    fn refuse(&self, asked: &Asked, r: &Refusal) -> Response<Outgoing> {
        let what = match r.why {
            Denial::SecretInUrl => "may not be sent in a URL",
            Denial::SecretInBody => "may not be sent in a body",
            Denial::SecretInClear => "may not be sent without TLS",
            _ => "may not be sent to this host",
        };
        self.deny(
            asked,
            (Some(&r.secret), r.why),
            StatusCode::FORBIDDEN,
            format!(
                "migrant: refused: the placeholder of {} {what} ({})\n",
                r.secret,
                r.why.as_str()
            ),
        )
    }
}

async fn handle(
    conn: Arc<Conn>,
    mut req: Request<Incoming>,
) -> Result<Response<Outgoing>, Infallible> {
    let flow = &conn.flow;
    let Some(host) = request_host(&req) else {
        return Ok(answer(
            StatusCode::BAD_REQUEST,
            "migrant: a request without a host\n".into(),
        ));
    };
    let asked = asked(&req, &host);
    match &conn.name {
        // On a connection made for a secret's host, a request for
        // another host (which a shared server might route) is refused.
        Some(name) if *name != host => {
            return Ok(conn.deny(
                &asked,
                (None, Denial::Misdirected),
                StatusCode::MISDIRECTED_REQUEST,
                format!("migrant: this connection is for {name}, not {host}\n"),
            ));
        }
        Some(_) => {}
        None => {
            if let Some(list) = &flow.list
                && !list.admits_request(flow.dst.ip(), &host)
            {
                return Ok(conn.deny(
                    &asked,
                    (None, Denial::NotAllowedDomain),
                    StatusCode::FORBIDDEN,
                    format!("migrant: {host} is not in allow_domains\n"),
                ));
            }
        }
    }
    let secrets = &flow.broker.secrets;
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().as_bytes().to_vec())
        .unwrap_or_default();
    if let Err(r) = secrets.check_target(&target) {
        return Ok(conn.refuse(&asked, &r));
    }
    let used = match secrets.headers(req.headers_mut(), &host, conn.name.is_none()) {
        Ok(u) => u,
        Err(r) => return Ok(conn.refuse(&asked, &r)),
    };
    let upgrade = req
        .headers()
        .contains_key(http::header::UPGRADE)
        .then(|| hyper::upgrade::on(&mut req));
    if upgrade.is_some() {
        conn.upgrading.store(true, Ordering::Relaxed);
    }
    let tripped: Arc<Mutex<Option<Refusal>>> = Arc::default();
    let (parts, body) = req.into_parts();
    let body = Scanned {
        inner: body,
        scanner: Scanner::default(),
        broker: Arc::clone(&flow.broker),
        clear: conn.name.is_none(),
        tripped: Arc::clone(&tripped),
    };
    let body = if body.size_hint().upper().is_some_and(|n| n <= WHOLE_BODY) {
        match whole(body).await {
            Ok(b) => b,
            Err(e) => {
                let refused = tripped.lock().ok().and_then(|t| t.clone());
                return Ok(match refused {
                    Some(r) => conn.refuse(&asked, &r),
                    None => answer(
                        StatusCode::BAD_REQUEST,
                        format!("migrant: the request's body: {e}\n"),
                    ),
                });
            }
        }
    } else {
        body.boxed()
    };
    let req = Request::from_parts(parts, body);
    let sent = match &conn.upstream {
        Upstream::H1(send) => {
            let mut send = send.lock().await;
            match send.ready().await {
                Ok(()) => send.send_request(req).await,
                Err(e) => Err(e),
            }
        }
        Upstream::H2(send) => send.clone().send_request(req).await,
    };
    let refused = tripped.lock().ok().and_then(|t| t.clone());
    let mut resp = match (sent, refused) {
        (_, Some(r)) => return Ok(conn.refuse(&asked, &r)),
        (Ok(resp), None) => resp,
        (Err(e), None) => {
            tracing::debug!("broker: {host}: {e}");
            return Ok(answer(
                StatusCode::BAD_GATEWAY,
                format!("migrant: {host} did not answer: {e}\n"),
            ));
        }
    };
    for i in used {
        flow.stats.secret_used(
            flow.dst,
            &secrets.held[i].name,
            &asked,
            resp.status().as_u16(),
        );
    }
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(guest_side) = upgrade
    {
        let server_side = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            if let (Ok(g), Ok(s)) = tokio::join!(guest_side, server_side) {
                let (mut g, mut s) = (TokioIo::new(g), TokioIo::new(s));
                let _ = tokio::io::copy_bidirectional(&mut g, &mut s).await;
            }
        });
    }
    Ok(resp.map(|b| b.map_err(BoxError::from).boxed()))
}

/// A short body read whole (searched on the way), to be sent as read.
async fn whole(body: Scanned) -> Result<Outgoing, BoxError> {
    let collected = body.collect().await?;
    let Some(trailers) = collected.trailers().cloned() else {
        // Its exact length, as the guest framed it (none for an empty
        // body: a GET stays without one).
        return Ok(http_body_util::Full::new(collected.to_bytes())
            .map_err(|never| match never {})
            .boxed());
    };
    let frames = [
        Ok::<_, BoxError>(Frame::data(collected.to_bytes())),
        Ok(Frame::trailers(trailers)),
    ];
    Ok(http_body_util::StreamBody::new(futures::stream::iter(frames)).boxed())
}

/// A request body on its way to the server, searched for placeholders:
/// one found ends the request with an error (the server gets no more of
/// it) and the refusal is noted for the answer to the guest.
struct Scanned {
    inner: Incoming,
    scanner: Scanner,
    broker: Arc<Broker>,
    clear: bool,
    tripped: Arc<Mutex<Option<Refusal>>>,
}

impl Scanned {
    /// Note the refusal of a request whose body (or trailers) carried the
    /// placeholder of `secret`, and end the body with an error.
    fn trip(&self, secret: String) -> BoxError {
        let why = if self.clear {
            Denial::SecretInClear
        } else {
            Denial::SecretInBody
        };
        let r = Refusal { why, secret };
        if let Ok(mut t) = self.tripped.lock() {
            *t = Some(r);
        }
        "a secret's placeholder in the request body".into()
    }
}

impl Body for Scanned {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let secrets = &this.broker.secrets;
                if let Some(data) = frame.data_ref() {
                    if let Some(i) = this.scanner.feed(secrets, data) {
                        let name = secrets.held[i].name.clone();
                        return Poll::Ready(Some(Err(this.trip(name))));
                    }
                } else if let Some(trailers) = frame.trailers_ref()
                    && let Err(r) = secrets.check_trailers(trailers)
                {
                    return Poll::Ready(Some(Err(this.trip(r.secret))));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A stream that counts the bytes through it.
struct Counted<T> {
    io: T,
    counts: Arc<Counts>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before) as u64;
        self.counts.up.fetch_add(n, Ordering::Relaxed);
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.counts.down.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
