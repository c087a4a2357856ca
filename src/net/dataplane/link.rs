//! What the dataplane child tells the supervisor over their event socket
//! (a SOCK_DGRAM pair: one message per event, never split or merged), and
//! the one thing the supervisor asks of it. The supervisor reads these
//! from a process that parses guest bytes: every message is bounded and
//! decoded without trusting its contents.

use crate::net::dataplane::stats::StatsView;

/// The largest message either side sends or accepts.
pub const MAX_MESSAGE: usize = 128 * 1024;
/// The supervisor's request: answer with [`Event::Stats`].
pub const STATS_REQUEST: &[u8] = b"S";
/// The benchmark's request: print the route check's cost on stderr.
pub const ROUTE_COST_REQUEST: &[u8] = b"R";

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The guest acknowledged its DHCP lease.
    Lease,
    /// The guest's SSH server answered with its banner.
    Sshd,
    /// The proxy's counters, in answer to [`STATS_REQUEST`].
    Stats(StatsView),
    /// Whole lines of the egress journal, for the supervisor to append.
    Journal(Vec<u8>),
}

impl Event {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Event::Lease => vec![1],
            Event::Sshd => vec![2],
            Event::Stats(v) => {
                let mut out = vec![3];
                out.extend(serde_json::to_vec(v).unwrap_or_default());
                out
            }
            Event::Journal(lines) => {
                let mut out = Vec::with_capacity(lines.len() + 1);
                out.push(4);
                out.extend_from_slice(lines);
                out
            }
        }
    }

    pub fn decode(msg: &[u8]) -> Option<Event> {
        let (&kind, rest) = msg.split_first()?;
        match kind {
            1 if rest.is_empty() => Some(Event::Lease),
            2 if rest.is_empty() => Some(Event::Sshd),
            3 => serde_json::from_slice(rest).ok().map(Event::Stats),
            4 => Some(Event::Journal(rest.to_vec())),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_garbage_is_refused() {
        let mut view = StatsView {
            tcp_connections: 3,
            ..StatsView::default()
        };
        view.denied.insert("private".into(), 7);
        for e in [
            Event::Lease,
            Event::Sshd,
            Event::Stats(view),
            Event::Journal(b"{\"a\":1}\n".to_vec()),
        ] {
            assert_eq!(Event::decode(&e.encode()), Some(e));
        }
        for bad in [&b""[..], b"\x01x", b"\x03{not json", b"\x09", b"\x02\x00"] {
            assert_eq!(Event::decode(bad), None, "{bad:?}");
        }
    }
}
