//! The broker between a real TLS client (standing in for the guest, which
//! trusts only the VM's authority) and a real TLS server (trusted through
//! the plan's roots), on loopback: what the server receives is what a
//! user would check.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

use super::intercept::{self, Flow};
use super::{Broker, Lent, Plan};
use crate::secrets::authority::Authority;

const TOKEN: &str = "migrant-secret-TOKEN-0123456789abcdef0123456789abcdef";
const OTHER: &str = "migrant-secret-OTHER-fedcba9876543210fedcba9876543210";

fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

/// What the server saw of each request: `METHOD PATH auth=… body=…`.
type Seen = Arc<Mutex<Vec<String>>>;

/// A TLS server for `api.test` and `other.test` whose certificate the
/// `upstream` authority issued; it records each request. With
/// `close_after`, it drops each connection then, without a word (an idle
/// timeout).
async fn server(upstream: &Authority, close_after: Option<Duration>) -> (SocketAddr, Seen) {
    let issuing = ok(upstream.issuing());
    let (chain, key) = ok(issuing.issue("api.test"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config =
        ok(ok(rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions())
        .with_no_client_auth()
        .with_single_cert(chain, key));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = ok(TcpListener::bind("127.0.0.1:0").await);
    let addr = ok(listener.local_addr());
    let seen: Seen = Arc::default();
    let log = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
                let service =
                    hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
                        let log = Arc::clone(&log);
                        async move {
                            // An upgrade: echo what comes after it.
                            if req.headers().contains_key("upgrade") {
                                let upgraded = hyper::upgrade::on(&mut req);
                                tokio::spawn(async move {
                                    if let Ok(u) = upgraded.await {
                                        let (mut r, mut w) = tokio::io::split(TokioIo::new(u));
                                        let _ = tokio::io::copy(&mut r, &mut w).await;
                                    }
                                });
                                let mut resp = hyper::Response::new(Full::new(Bytes::new()));
                                *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                                resp.headers_mut().insert(
                                    "connection",
                                    http::HeaderValue::from_static("upgrade"),
                                );
                                resp.headers_mut()
                                    .insert("upgrade", http::HeaderValue::from_static("echo"));
                                return Ok(resp);
                            }
                            let auth = req
                                .headers()
                                .get("authorization")
                                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                                .unwrap_or_default();
                            let line = format!("{} {} auth={auth}", req.method(), req.uri().path());
                            let body = req.into_body().collect().await.map(|b| b.to_bytes());
                            let body = body.map(|b| String::from_utf8_lossy(&b).into_owned());
                            let line = format!(
                                "{line} body={}",
                                body.unwrap_or_else(|e| format!("<{e}>"))
                            );
                            if let Ok(mut l) = log.lock() {
                                l.push(line.clone());
                            }
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                                Bytes::from(line),
                            )))
                        }
                    });
                let io = TokioIo::new(tls);
                let serve = async move {
                    if h2 {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, service)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .with_upgrades()
                            .await;
                    }
                };
                match close_after {
                    Some(after) => {
                        let _ = tokio::time::timeout(after, serve).await;
                    }
                    None => serve.await,
                }
            });
        }
    });
    (addr, seen)
}

struct Setup {
    vm: Authority,
    broker: Arc<Broker>,
    server: SocketAddr,
    seen: Seen,
}

/// A VM with TOKEN for api.test and OTHER for other.test; its broker
/// trusts `trusted` for the real servers; the server's certificate comes
/// from `upstream`.
async fn setup(upstream: &Authority, trusted: &Authority) -> Setup {
    setup_with(upstream, trusted, None).await
}

async fn setup_with(
    upstream: &Authority,
    trusted: &Authority,
    close_after: Option<Duration>,
) -> Setup {
    let hosts = vec!["api.test".to_string(), "other.test".to_string()];
    let vm = ok(Authority::make("box", &hosts));
    let lent = |name: &str, placeholder: &str, value: &str, host: &str| Lent {
        name: name.into(),
        placeholder: placeholder.into(),
        value: crate::secrets::Value::for_tests(value),
        hosts: vec![host.into()],
    };
    let plan = Plan {
        authority: vm.clone(),
        secrets: vec![
            lent("TOKEN", TOKEN, "real-token", "api.test"),
            lent("OTHER", OTHER, "real-other", "other.test"),
        ],
        roots: vec![{
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(ok(trusted.cert_der()))
        }],
    };
    let broker = Arc::new(ok(Broker::new(&plan)));
    let (server, seen) = server(upstream, close_after).await;
    Setup {
        vm,
        broker,
        server,
        seen,
    }
}

/// A guest connection to `name` through the broker, speaking `alpn`:
/// the guest's TLS stream, or the handshake's error.
async fn guest(
    s: &Setup,
    name: &str,
    alpn: &[&[u8]],
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, std::io::Error> {
    let listener = ok(TcpListener::bind("127.0.0.1:0").await);
    let at = ok(listener.local_addr());
    let client = ok(TcpStream::connect(at).await);
    let (accepted, src) = ok(listener.accept().await);
    let upstream = ok(TcpStream::connect(s.server).await);
    let flow = Flow {
        broker: Arc::clone(&s.broker),
        stats: Arc::default(),
        src,
        dst: s.server,
        list: None,
    };
    tokio::spawn(intercept::tls(flow, accepted, upstream, name.to_string()));
    let mut roots = rustls::RootCertStore::empty();
    ok(roots.add(ok(s.vm.cert_der())));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config =
        ok(rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions())
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let server_name = ok(rustls::pki_types::ServerName::try_from(name.to_string()));
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server_name, client)
        .await
}

fn get(path: &str, host: &str, auth: &str) -> Request<Full<Bytes>> {
    ok(Request::get(path)
        .header("host", host)
        .header("authorization", auth)
        .body(Full::new(Bytes::new())))
}

async fn text(resp: hyper::Response<hyper::body::Incoming>) -> (StatusCode, String) {
    let status = resp.status();
    let body = ok(resp.into_body().collect().await).to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn seen(s: &Setup) -> Vec<String> {
    s.seen.lock().map(|l| l.clone()).unwrap_or_default()
}

#[tokio::test]
async fn http1_keep_alive_requests_carry_the_value_and_refusals_send_nothing() {
    let upstream = ok(Authority::make("upstream", &["api.test".into()]));
    let s = setup(&upstream, &upstream).await;
    let tls = ok(guest(&s, "api.test", &[b"http/1.1"]).await);
    let (mut send, conn) = ok(hyper::client::conn::http1::handshake(TokioIo::new(tls)).await);
    tokio::spawn(conn.with_upgrades());

    for path in ["/one", "/two"] {
        let resp = ok(send
            .send_request(get(path, "api.test", &format!("Bearer {TOKEN}")))
            .await);
        let (status, body) = text(resp).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body, format!("GET {path} auth=Bearer real-token body="));
    }
    // Basic credentials, as git sends a token.
    use base64::Engine as _;
    let b64 = |t: &str| base64::engine::general_purpose::STANDARD.encode(t);
    let basic = format!("Basic {}", b64(&format!("x-access-token:{TOKEN}")));
    let (status, body) = text(ok(send.send_request(get("/git", "api.test", &basic)).await)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        format!(
            "GET /git auth=Basic {} body=",
            b64("x-access-token:real-token")
        )
    );

    // Refused, each on the same connection: the placeholder in the URL,
    // in the body, another secret's placeholder, another host.
    let refusals = [
        get(&format!("/q?t={TOKEN}"), "api.test", "none"),
        ok(Request::post("/publish")
            .header("host", "api.test")
            .body(Full::new(Bytes::from(format!("{{\"note\": \"{TOKEN}\"}}"))))),
        get("/other", "api.test", &format!("Bearer {OTHER}")),
    ];
    for req in refusals {
        let (status, body) = text(ok(send.send_request(req).await)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert!(body.starts_with("migrant: refused"), "{body}");
    }
    let (status, _) = text(ok(send
        .send_request(get("/x", "other.test", &format!("Bearer {OTHER}")))
        .await))
    .await;
    assert_eq!(status, StatusCode::MISDIRECTED_REQUEST);

    // An upgrade (as WebSocket asks for one) goes through: the bytes after
    // it travel both ways.
    let req = ok(Request::get("/ws")
        .header("host", "api.test")
        .header("connection", "upgrade")
        .header("upgrade", "echo")
        .body(Full::new(Bytes::new())));
    let resp = ok(send.send_request(req).await);
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let mut io = TokioIo::new(ok(hyper::upgrade::on(resp).await));
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    ok(io.write_all(b"ping").await);
    let mut back = [0u8; 4];
    ok(io.read_exact(&mut back).await);
    assert_eq!(&back, b"ping");

    let all = seen(&s);
    assert_eq!(
        all.len(),
        3,
        "the server got only the allowed requests: {all:?}"
    );
    assert!(
        all.iter()
            .all(|l| !l.contains("real-other") && !l.contains(TOKEN)),
        "{all:?}"
    );
}

#[tokio::test]
async fn http2_streams_carry_the_value() {
    let upstream = ok(Authority::make("upstream", &["api.test".into()]));
    let s = setup(&upstream, &upstream).await;
    let tls = ok(guest(&s, "api.test", &[b"h2", b"http/1.1"]).await);
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(b"h2".as_slice()));
    let (send, conn) =
        ok(hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await);
    tokio::spawn(conn);
    let mut answers = Vec::new();
    for i in 0..3 {
        let mut send = send.clone();
        let req = ok(Request::get(format!("https://api.test/s{i}"))
            .header("authorization", format!("token {TOKEN}"))
            .body(Full::new(Bytes::new())));
        answers.push(tokio::spawn(async move { send.send_request(req).await }));
    }
    for (i, a) in answers.into_iter().enumerate() {
        let resp = ok(ok(a.await));
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let (status, body) = text(resp).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, format!("GET /s{i} auth=token real-token body="));
    }
    // A body with the placeholder never reaches the server whole.
    let req = ok(Request::post("https://api.test/publish")
        .body(Full::new(Bytes::from(format!("x={TOKEN}")))));
    let (status, _) = text(ok(send.clone().send_request(req).await)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        seen(&s).iter().all(|l| !l.contains("/publish")),
        "{:?}",
        seen(&s)
    );
}

#[tokio::test]
async fn a_server_the_roots_do_not_vouch_for_gets_nothing() {
    let upstream = ok(Authority::make("upstream", &["api.test".into()]));
    let stranger = ok(Authority::make("someone else", &["api.test".into()]));
    let s = setup(&upstream, &stranger).await;
    // The broker refuses the server before it finishes the guest's
    // handshake: the guest sees its connection end.
    assert!(guest(&s, "api.test", &[b"http/1.1"]).await.is_err());
    assert!(seen(&s).is_empty());
}

#[tokio::test]
async fn a_server_closing_its_connection_closes_the_guests() {
    let upstream = ok(Authority::make("upstream", &["api.test".into()]));
    let s = setup_with(&upstream, &upstream, Some(Duration::from_millis(300))).await;
    let tls = ok(guest(&s, "api.test", &[b"http/1.1"]).await);
    let (mut send, conn) = ok(hyper::client::conn::http1::handshake(TokioIo::new(tls)).await);
    let conn = tokio::spawn(conn);
    let (status, _) = text(ok(send.send_request(get("/one", "api.test", "none")).await)).await;
    assert_eq!(status, StatusCode::OK);
    // The server drops its idle connection: the guest's ends with it, so
    // that its client opens a new one instead of sending into nothing.
    assert!(
        tokio::time::timeout(Duration::from_secs(5), conn)
            .await
            .is_ok(),
        "the guest's connection outlived the server's"
    );
}
