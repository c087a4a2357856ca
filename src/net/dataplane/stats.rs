//! The dataplane's counters and its egress journal's entries: what
//! `migrant status` and `migrant egress` show. Shared by the proxy, the
//! resolver and the link to the supervisor; below all of them.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::journal::{Decision, Entry, Journal};
use super::policy::{Allowed, Denial};
use crate::config::Proto;

/// Counters shown by `migrant status`.
#[derive(Debug, Default)]
pub struct Stats {
    pub(super) tcp: AtomicU64,
    pub(super) udp: AtomicU64,
    denied: Mutex<BTreeMap<Denial, u64>>,
    log: Mutex<Option<LogWindow>>,
    journal: Journal,
    /// The name each address was last given in a DNS answer, for the
    /// journal (at most [`MAX_NAMES`]).
    names: Mutex<HashMap<IpAddr, String>>,
}

/// Addresses remembered with their names; the map starts over when full.
const MAX_NAMES: usize = 4096;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StatsView {
    pub tcp_connections: u64,
    pub udp_flows: u64,
    /// Refused attempts by reason.
    pub denied: BTreeMap<String, u64>,
    /// Set while the dataplane process is not running: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataplane: Option<String>,
}

/// Refusals logged per interval at most; the rest are counted and summed
/// up in the next line, so a flood of refused packets cannot grow the
/// supervisor's log (the dataplane writes into it).
const LOG_BURST: u32 = 20;
const LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct LogWindow {
    start: std::time::Instant,
    logged: u32,
    suppressed: u64,
}

impl Stats {
    /// Counters that also keep the egress journal.
    pub fn with_journal(journal: Journal) -> Stats {
        Stats {
            journal,
            ..Stats::default()
        }
    }

    /// A DNS answer named `ip`.
    pub fn named(&self, ip: IpAddr, name: &str) {
        if let Ok(mut m) = self.names.lock() {
            if m.len() >= MAX_NAMES && !m.contains_key(&ip) {
                m.clear();
            }
            m.insert(ip, super::domains::normalize(name));
        }
    }

    fn name_of(&self, ip: IpAddr) -> Option<String> {
        self.names.lock().ok().and_then(|m| m.get(&ip).cloned())
    }

    /// A relayed flow ended; `name`: the host its first request named,
    /// when allow_domains read it (else the name the address was looked
    /// up by).
    pub fn flow_ended(
        &self,
        proto: Proto,
        dst: SocketAddr,
        allowed: Allowed,
        name: Option<String>,
        up: u64,
        down: u64,
    ) {
        let mut e = Entry::new(proto.as_str(), dst.to_string(), Decision::Allowed);
        e.name = name.or_else(|| self.name_of(dst.ip()));
        e.up = up;
        e.down = down;
        e.reason = match (allowed.hole, allowed.via_tunnel) {
            (true, _) => Some("hole".into()),
            (false, true) => Some("tunnel".into()),
            (false, false) => None,
        };
        self.journal.record(e);
    }

    /// A DNS question was answered (forwarded upstream).
    pub fn dns_answered(&self, name: &str, qtype: &str) {
        let mut e = Entry::new("dns", qtype.to_string(), Decision::Allowed);
        e.name = Some(super::domains::normalize(name));
        self.journal.record(e);
    }

    /// Count and journal a refusal; says whether it may also be logged.
    fn refused(&self, proto: &str, dst: String, name: Option<String>, why: Denial) -> bool {
        self.count(why);
        let mut e = Entry::new(proto, dst, Decision::Denied);
        e.name = name;
        e.reason = Some(why.as_str().to_string());
        self.journal.record(e);
        self.may_log()
    }

    fn count(&self, why: Denial) {
        if let Ok(mut d) = self.denied.lock() {
            *d.entry(why).or_default() += 1;
        }
    }

    /// Whether a refusal may be logged now; says how many were not.
    fn may_log(&self) -> bool {
        let Ok(mut w) = self.log.lock() else {
            return false;
        };
        let w = w.get_or_insert(LogWindow {
            start: std::time::Instant::now(),
            logged: 0,
            suppressed: 0,
        });
        if w.start.elapsed() >= LOG_INTERVAL {
            if w.suppressed > 0 {
                tracing::info!(
                    "{} more refusals in the last {} s were counted, not logged",
                    w.suppressed,
                    LOG_INTERVAL.as_secs()
                );
            }
            *w = LogWindow {
                start: std::time::Instant::now(),
                logged: 0,
                suppressed: 0,
            };
        }
        if w.logged < LOG_BURST {
            w.logged += 1;
            true
        } else {
            w.suppressed += 1;
            false
        }
    }

    pub fn deny(&self, proto: Proto, src: SocketAddr, dst: SocketAddr, why: Denial) {
        let name = self.name_of(dst.ip());
        if self.refused(proto.as_str(), dst.to_string(), name, why) {
            tracing::info!("denied {} {src} -> {dst}: {}", proto.as_str(), why.as_str());
        }
    }

    /// A refusal after inspection, with what was seen.
    /// A connection allow_domains cut off; the journal names the host the
    /// refused request named, when it named one.
    pub fn deny_inspected(&self, src: SocketAddr, dst: SocketAddr, r: super::inspect::Refusal) {
        let name = r.name.or_else(|| self.name_of(dst.ip()));
        if self.refused("tcp", dst.to_string(), name, r.why) {
            tracing::info!(
                "denied tcp {src} -> {dst}: {} ({})",
                r.why.as_str(),
                r.detail
            );
        }
    }

    /// The broker put a secret into a request to its host.
    pub fn secret_used(&self, dst: SocketAddr, secret: &str, asked: &Asked, status: u16) {
        let mut e = Entry::new("tcp", dst.to_string(), Decision::Allowed);
        e.name = Some(asked.host.clone());
        e.secret = Some(secret.to_string());
        e.method = Some(asked.method.clone());
        e.path = Some(asked.path.clone());
        e.status = Some(status);
        self.journal.record(e);
    }

    /// The broker refused a request (or a connection, without `asked`):
    /// `secret` names the secret it carried, `detail` says more in the
    /// log.
    #[allow(clippy::too_many_arguments)]
    pub fn secret_refused(
        &self,
        src: SocketAddr,
        dst: SocketAddr,
        host: Option<&str>,
        secret: Option<&str>,
        asked: Option<&Asked>,
        why: Denial,
        detail: &str,
    ) {
        self.count(why);
        let mut e = Entry::new("tcp", dst.to_string(), Decision::Denied);
        e.name = host
            .map(super::domains::normalize)
            .or_else(|| self.name_of(dst.ip()));
        e.reason = Some(why.as_str().to_string());
        e.secret = secret.map(str::to_string);
        if let Some(a) = asked {
            e.method = Some(a.method.clone());
            e.path = Some(a.path.clone());
        }
        self.journal.record(e);
        if self.may_log() {
            tracing::info!("denied tcp {src} -> {dst}: {} {detail}", why.as_str());
        }
    }

    /// A DNS question the gateway did not forward: `why` counts it,
    /// `detail` says why in the log.
    pub fn deny_dns(&self, name: &str, qtype: &str, why: Denial, detail: &str) {
        let normal = Some(super::domains::normalize(name));
        if self.refused("dns", qtype.to_string(), normal, why) {
            tracing::info!("refused DNS query for {name:?}: {detail}");
        }
    }

    pub fn view(&self) -> StatsView {
        StatsView {
            tcp_connections: self.tcp.load(Ordering::Relaxed),
            udp_flows: self.udp.load(Ordering::Relaxed),
            denied: self
                .denied
                .lock()
                .map(|d| {
                    d.iter()
                        .map(|(k, v)| (k.as_str().to_string(), *v))
                        .collect()
                })
                .unwrap_or_default(),
            dataplane: None,
        }
    }
}

/// What the journal says of a request.
#[derive(Debug, Clone)]
pub struct Asked {
    pub host: String,
    pub method: String,
    /// The path, without the query, cut short for the journal.
    pub path: String,
}
