//! The gateway's DNS: local names from the stub, everything else forwarded
//! to the host's resolvers from the host's namespace (so a host resolver on
//! 127.0.0.53 works), and with `allow_domains` only allowed names are
//! forwarded; their answers open their addresses.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::Message;
use hickory_proto::rr::RData;

use super::dns::{self, Outcome, Stub};
use super::domains::Allowlist;
use super::proxy::Stats;

const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);

pub struct Resolver {
    pub stub: Stub,
    /// Host resolvers; empty means: answer local names only.
    pub upstreams: Vec<SocketAddr>,
    pub allow: Option<Allowlist>,
    pub stats: Arc<Stats>,
}

/// `nameserver` lines of a resolv.conf, port 53.
pub fn upstreams_from(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
                .and_then(|a| a.split('%').next())
                .and_then(|a| a.parse::<IpAddr>().ok())
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// The host's resolvers, read from /etc/resolv.conf.
pub fn host_upstreams() -> Vec<SocketAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .map(|t| upstreams_from(&t))
        .unwrap_or_default()
}

fn question_names(query: &[u8]) -> Vec<String> {
    Message::from_vec(query)
        .map(|m| m.queries.iter().map(|q| q.name().to_ascii()).collect())
        .unwrap_or_default()
}

impl Resolver {
    /// The response for `query`, if any.
    pub async fn handle(&self, query: &[u8]) -> Option<Vec<u8>> {
        let refused = match dns::resolve(&self.stub, query) {
            Outcome::Answer(bytes) => return Some(bytes),
            Outcome::Drop => return None,
            Outcome::NotLocal { refused } => refused,
        };
        if self.upstreams.is_empty() {
            return Some(refused);
        }
        let names = question_names(query);
        if let Some(allow) = &self.allow
            && (names.is_empty() || !names.iter().all(|n| allow.name_allowed(n)))
        {
            self.stats
                .deny_name(names.first().map(String::as_str).unwrap_or("?"));
            return Some(refused);
        }
        let response = self.forward(query).await?;
        if let Some(allow) = &self.allow {
            learn(allow, &names, &response);
        }
        Some(response)
    }

    async fn forward(&self, query: &[u8]) -> Option<Vec<u8>> {
        let id = query.get(..2)?;
        for up in &self.upstreams {
            let bind: SocketAddr = match up {
                SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
                SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
            };
            let Ok(sock) = tokio::net::UdpSocket::bind(bind).await else {
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
            let this = Arc::clone(&self);
            let socket = Arc::clone(&socket);
            tokio::spawn(async move {
                if let Some(resp) = this.handle(&query).await {
                    let _ = socket.send_to(&resp, peer).await;
                }
            });
        }
    }
}

/// Admit the A records of an answer to allowed `names`.
fn learn(allow: &Allowlist, names: &[String], response: &[u8]) {
    let Ok(msg) = Message::from_vec(response) else {
        return;
    };
    for rec in &msg.answers {
        if let RData::A(a) = &rec.data {
            for n in names {
                allow.learn(n, a.0, rec.ttl);
            }
            // The owner name too (a CNAME target), so that shared
            // addresses are recognised as such.
            allow.learn(&rec.name.to_ascii(), a.0, rec.ttl);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers() {
        let text = "# comment\nsearch example.com\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\nnameserver bogus\noptions edns0\n";
        assert_eq!(
            upstreams_from(text),
            vec![
                "127.0.0.53:53".parse().unwrap_or_else(|e| panic!("{e}")),
                "[fe80::1]:53".parse().unwrap_or_else(|e| panic!("{e}")),
            ]
        );
    }
}
