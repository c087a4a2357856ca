//! The gateway's DNS: local names from the stub, everything else forwarded
//! to the host's resolvers from the host's namespace (so a host resolver on
//! 127.0.0.53 works), and with `allow_domains` only allowed names are
//! forwarded; their answers open their addresses.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::dns::{self, Outcome, Stub};
use super::domains::Allowlist;
use super::policy::Denial;
use super::stats::Stats;

const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// DNS over TCP: a client connection closes after this long without a
/// query, or after this many queries; at most this many at once.
const TCP_IDLE: Duration = Duration::from_secs(10);
const TCP_MAX_QUERIES: usize = 256;
const TCP_MAX_CONNECTIONS: usize = 32;
/// The smallest DNS message: its header.
const HEADER_LEN: usize = 12;

/// How a query reached us, and so how it is forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

pub struct Resolver {
    pub stub: Stub,
    /// Host resolvers, or the tunnel's; empty means: answer local names
    /// only.
    pub upstreams: Vec<SocketAddr>,
    /// Where queries to `upstreams` are sent from.
    pub exit: crate::net::netns::Exit,
    pub allow: Option<Allowlist>,
    pub stats: Arc<Stats>,
    /// Decides which addresses an answer may carry (none: every address
    /// is dropped from answers; the guest reaches nothing anyway).
    pub gate: Option<Arc<super::route::Gate>>,
    /// Queries being answered at once; beyond it new ones are dropped
    /// (the client retries), so a flood cannot grow tasks and buffers.
    pub in_flight: Arc<tokio::sync::Semaphore>,
    /// The credential broker, which looks at connections to the
    /// addresses its hosts resolve to.
    pub broker: Option<Arc<super::broker::Broker>>,
}

/// Queries forwarded at once for one VM (each waits at most
/// `UPSTREAM_TIMEOUT` per upstream and holds one 64 KiB buffer).
pub const MAX_IN_FLIGHT: usize = 256;

impl Resolver {
    /// The response for `query`, if any; forwarded over `transport`.
    ///
    /// Only a question that [`dns::forwardable`] admits goes upstream,
    /// re-encoded with a fresh id; the answer comes back rebuilt by
    /// [`dns::guest_response`], without the addresses the policy refuses
    /// (DNS-rebinding protection) and with the guest's own id.
    pub async fn handle(&self, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let (refused, guest) = match dns::resolve(&self.stub, query) {
            Outcome::Answer(bytes) => return Some(bytes),
            Outcome::Drop => return None,
            Outcome::NotLocal { refused, query } => (refused, query),
        };
        if self.upstreams.is_empty() {
            return Some(refused);
        }
        // `resolve` parsed it: a query with exactly one question.
        let question = guest.queries.first()?.clone();
        let name = question.name().to_ascii();
        let qtype = question.query_type().to_string();
        if let Err(why) = dns::forwardable(&question) {
            self.stats
                .deny_dns(&name, &qtype, Denial::DnsQuery, &format!("{why:?}"));
            return Some(refused);
        }
        if let Some(allow) = &self.allow
            && !allow.name_allowed(&name)
        {
            self.stats.deny_dns(
                &name,
                &qtype,
                Denial::NotAllowedDomain,
                "not in allow_domains",
            );
            return Some(refused);
        }
        // Without IPv6 egress: no AAAA answers, at once, from here (so
        // that clients do not wait on IPv6 first).
        let ipv6 = self
            .gate
            .as_ref()
            .is_some_and(|g| g.policy.net.net6.is_some());
        if !ipv6 && question.query_type() == hickory_proto::rr::RecordType::AAAA {
            let empty = dns::reply(&guest, hickory_proto::op::ResponseCode::NoError);
            return dns::encode_for(empty, transport == Transport::Udp);
        }
        let Ok(_permit) = self.in_flight.try_acquire() else {
            tracing::debug!("dns: too many queries in flight; dropping one for {name}");
            return None;
        };
        let id = random_id();
        let upstream = dns::upstream_query(id, &question, guest.metadata.checking_disabled)?;
        let response = match transport {
            Transport::Udp => self.forward(&upstream).await,
            Transport::Tcp => self.forward_tcp(&upstream).await,
        };
        let allowed = |ip| self.gate.as_ref().is_some_and(|g| g.answer_allowed(ip));
        let resp = response
            .and_then(|r| dns::guest_response(&guest, &r, allowed))
            .unwrap_or_else(|| dns::servfail(&guest));
        if let Some(allow) = &self.allow {
            learn(allow, &name, &resp);
        }
        if let Some(broker) = &self.broker {
            for rec in &resp.answers {
                if let Some(ip) = dns::address_of(&rec.data) {
                    broker.learn(&name, ip, rec.ttl);
                }
            }
        }
        self.stats.dns_answered(&name, &qtype);
        for rec in &resp.answers {
            if let Some(ip) = dns::address_of(&rec.data) {
                self.stats.named(ip, &name);
            }
        }
        dns::encode_for(resp, transport == Transport::Udp)
    }

    async fn forward(&self, query: &[u8]) -> Option<Vec<u8>> {
        let id = query.get(..2)?;
        for up in &self.upstreams {
            let Ok(sock) = self.exit.udp_for(*up).await else {
                continue;
            };
            if sock.connect(up).await.is_err() || sock.send(query).await.is_err() {
                continue;
            }
            let mut buf = vec![0u8; 65535];
            // Ignore stray datagrams whose id does not match.
            let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
            while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
                if buf.get(..2) == Some(id) {
                    buf.truncate(n);
                    return Some(buf);
                }
            }
            tracing::debug!("dns: upstream {up} did not answer");
        }
        None
    }

    /// Forward over TCP (a client that asked over TCP wants the whole
    /// answer, however large), to the first upstream that answers.
    async fn forward_tcp(&self, query: &[u8]) -> Option<Vec<u8>> {
        let len = u16::try_from(query.len()).ok()?.to_be_bytes();
        for up in &self.upstreams {
            let exchange = async {
                let mut s = self.exit.connect(*up).await?;
                let mut msg = Vec::with_capacity(query.len() + 2);
                msg.extend_from_slice(&len);
                msg.extend_from_slice(query);
                s.write_all(&msg).await?;
                read_message(&mut s).await
            };
            match tokio::time::timeout(UPSTREAM_TIMEOUT, exchange).await {
                Ok(Ok(Some(resp))) if resp.get(..2) == query.get(..2) => return Some(resp),
                Ok(Ok(_)) => tracing::debug!("dns: upstream {up} answered nothing usable over TCP"),
                Ok(Err(e)) => tracing::debug!("dns: upstream {up} over TCP: {e}"),
                Err(_) => tracing::debug!("dns: upstream {up} over TCP: timed out"),
            }
        }
        None
    }

    /// Serve DNS over TCP on the gateway's port 53 (RFC 7766: messages
    /// with a two-byte length, several per connection) until the listener
    /// fails.
    pub async fn serve_tcp(self: Arc<Self>, listener: tokio::net::TcpListener) {
        let slots = Arc::new(tokio::sync::Semaphore::new(TCP_MAX_CONNECTIONS));
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("dns: TCP accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                tracing::debug!("dns: too many TCP clients; closing {peer}");
                continue;
            };
            let this = Arc::clone(&self);
            tokio::spawn(async move {
                this.tcp_client(stream).await;
                drop(slot);
            });
        }
    }

    pub async fn tcp_client(&self, mut stream: tokio::net::TcpStream) {
        for _ in 0..TCP_MAX_QUERIES {
            let query = match tokio::time::timeout(TCP_IDLE, read_message(&mut stream)).await {
                Ok(Ok(Some(q))) => q,
                _ => return,
            };
            let Some(resp) = self.handle(&query, Transport::Tcp).await else {
                // Nothing to say to this one (not a query); the next may be.
                continue;
            };
            let Ok(len) = u16::try_from(resp.len()) else {
                return;
            };
            let mut msg = Vec::with_capacity(resp.len() + 2);
            msg.extend_from_slice(&len.to_be_bytes());
            msg.extend_from_slice(&resp);
            if !matches!(
                tokio::time::timeout(TCP_IDLE, stream.write_all(&msg)).await,
                Ok(Ok(()))
            ) {
                return;
            }
        }
    }

    /// Serve queries on the gateway's UDP port 53 until the socket fails.
    pub async fn serve_udp(self: Arc<Self>, socket: tokio::net::UdpSocket) -> std::io::Result<()> {
        let socket = Arc::new(socket);
        let mut buf = vec![0u8; 4096];
        loop {
            let (len, peer) = match socket.recv_from(&mut buf).await {
                Ok(got) => got,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let query = buf[..len].to_vec();
            if self.in_flight.available_permits() == 0 {
                continue; // A flood: drop rather than queue.
            }
            let this = Arc::clone(&self);
            let socket = Arc::clone(&socket);
            tokio::spawn(async move {
                if let Some(resp) = this.handle(&query, Transport::Udp).await {
                    let _ = socket.send_to(&resp, peer).await;
                }
            });
        }
    }
}

/// One length-prefixed DNS message from a TCP stream; `None` at a clean
/// end of stream or for a length too short to be a message.
async fn read_message<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = usize::from(u16::from_be_bytes(len));
    if len < HEADER_LEN {
        return Ok(None);
    }
    let mut msg = vec![0u8; len];
    r.read_exact(&mut msg).await?;
    Ok(Some(msg))
}

/// A DNS id nobody off the path can guess.
fn random_id() -> u16 {
    let mut b = [0u8; 2];
    if getrandom::getrandom(&mut b).is_err() {
        // Never expected; the port the kernel picked is random too.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        return t as u16;
    }
    u16::from_ne_bytes(b)
}

/// Admit the A and AAAA records of an answer (already filtered) to the
/// allowed name that was asked.
fn learn(allow: &Allowlist, name: &str, msg: &Message) {
    for rec in &msg.answers {
        if let Some(ip) = dns::address_of(&rec.data) {
            allow.learn(name, ip, rec.ttl);
            // The owner name too (a CNAME target), so that shared
            // addresses are recognised as such.
            allow.learn(&rec.name.to_ascii(), ip, rec.ttl);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(id: u16, name: &str) -> Vec<u8> {
        use hickory_proto::op::{MessageType, OpCode, Query};
        use hickory_proto::rr::{Name, RecordType};
        use std::str::FromStr;
        let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
        msg.add_query(Query::query(
            Name::from_str(name).unwrap_or_else(|e| panic!("{e}")),
            RecordType::A,
        ));
        msg.to_vec().unwrap_or_else(|e| panic!("{e}"))
    }

    #[tokio::test]
    async fn dns_over_tcp_answers_several_queries_per_connection() {
        use hickory_proto::op::ResponseCode;
        let r = Arc::new(Resolver {
            stub: Stub {
                names: vec![("box".to_string(), std::net::Ipv4Addr::new(10, 0, 2, 15))],
            },
            upstreams: Vec::new(),
            exit: crate::net::netns::Exit::Host,
            allow: None,
            stats: Arc::new(Stats::default()),
            gate: None,
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
            broker: None,
        });
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(Arc::clone(&r).serve_tcp(l));
        let mut c = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        for (id, name, code, answers) in [
            (7, "box.", ResponseCode::NoError, 1),
            // No upstreams (egress none): other names are refused.
            (8, "example.com.", ResponseCode::Refused, 0),
            (9, "box.", ResponseCode::NoError, 1),
        ] {
            let q = query(id, name);
            let mut msg = (q.len() as u16).to_be_bytes().to_vec();
            msg.extend_from_slice(&q);
            c.write_all(&msg).await.unwrap_or_else(|e| panic!("{e}"));
            let resp = read_message(&mut c)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|| panic!("no answer for {name}"));
            let resp = Message::from_vec(&resp).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(resp.metadata.id, id);
            assert_eq!(resp.metadata.response_code, code, "{name}");
            assert_eq!(resp.answers.len(), answers, "{name}");
        }
        // A length too short for a message ends the connection.
        c.write_all(&[0, 3, 1, 2, 3])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        // (An end of stream, or a reset for the unread bytes.)
        let mut rest = Vec::new();
        let end = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest))
            .await
            .unwrap_or_else(|e| panic!("the connection stayed open: {e}"));
        match end {
            Ok(n) => assert_eq!(n, 0),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        }
    }
}
