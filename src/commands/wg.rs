//! `migrant wg`: the WireGuard tunnel of a running VM, as wg(8) shows an
//! interface: per peer, its endpoint, the age of the last handshake and
//! the bytes moved. Read from `wg.json`, which the supervisor rewrites
//! every second and anyone may read (no keys in it).

use serde::Serialize;

use super::{Live, Project, Result, live};
use crate::error::Error;
use crate::exit;
use crate::size::human;
use crate::wireguard::Published;

#[derive(Debug, Serialize)]
struct PeerView {
    public_key: String,
    /// As written in the file (a name stays a name).
    endpoint_written: Option<String>,
    /// Where the peer is reached now.
    endpoint: Option<String>,
    /// Seconds since the last handshake; `None`: never.
    latest_handshake_secs: Option<u64>,
    received_bytes: u64,
    sent_bytes: u64,
}

#[derive(Debug, Serialize)]
struct TunnelView {
    address: String,
    /// The tunnel's DNS servers; empty: the host's resolvers answer.
    dns: Vec<String>,
    peers: Vec<PeerView>,
}

/// The tunnel's state now, or why there is none.
fn read(p: &Project) -> Result<TunnelView> {
    let name = &p.cfg.name;
    if p.cfg.network.wireguard.is_none() {
        return Err(Error::other(
            exit::CONFIG,
            format!(
                "{name}: no WireGuard config ({} names none and there is no wireguard.conf beside it)",
                p.cfg.file.display()
            ),
        ));
    }
    if !matches!(live(&p.vm)?, Live::Active(_)) {
        return Err(crate::runstate::Refusal::not_running(
            name,
            "; its tunnel exists only while it runs",
        )
        .into());
    }
    let path = Published::path(&p.vm.run);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Error::other(
            exit::UNAVAILABLE,
            format!(
                "{name}: the tunnel is down ({}: {e}); the guest has no egress. See {}",
                path.display(),
                p.vm.state.join("wireguard.log").display()
            ),
        )
    })?;
    let published: Published = serde_json::from_str(&text).map_err(|e| {
        Error::other(
            exit::SOFTWARE,
            format!("{}: unreadable: {e}", path.display()),
        )
    })?;
    let age = published.age().as_millis() as u64;
    let peers = published
        .peers
        .iter()
        .enumerate()
        .map(|(i, r)| PeerView {
            public_key: r.public_key.clone(),
            endpoint_written: published.written_endpoints.get(i).cloned().flatten(),
            endpoint: r.endpoint.clone(),
            latest_handshake_secs: r.last_handshake_ms.map(|ms| (ms + age) / 1000),
            received_bytes: r.rx_bytes,
            sent_bytes: r.tx_bytes,
        })
        .collect();
    Ok(TunnelView {
        address: published.address,
        dns: published.dns,
        peers,
    })
}

/// One line for `status`.
pub fn summary(p: &Project) -> Option<String> {
    let v = read(p).ok()?;
    let shakes: Vec<String> = v
        .peers
        .iter()
        .map(|peer| {
            let at = peer.endpoint.as_deref().unwrap_or("(no endpoint)");
            match peer.latest_handshake_secs {
                Some(s) => format!("{at}, handshake {s} s ago"),
                None => format!("{at}, no handshake"),
            }
        })
        .collect();
    Some(format!("{} via {}", v.address, shakes.join("; ")))
}

pub fn dns_line(dns: &[String]) -> String {
    if dns.is_empty() {
        "the host's resolvers, outside the tunnel (the WireGuard file has no DNS =)".into()
    } else {
        format!("{} through the tunnel", dns.join(", "))
    }
}

/// DNS line for `status`.
pub fn dns_summary(p: &Project) -> Option<String> {
    read(p).ok().map(|v| dns_line(&v.dns))
}

pub fn wg(p: &Project, json: bool) -> Result<u8> {
    let v = read(p)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(0);
    }
    println!(
        "interface: {} ({} in the VM's namespace)",
        v.address,
        crate::wireguard::TUN_NAME
    );
    println!("dns:       {}", dns_line(&v.dns));
    for peer in &v.peers {
        println!();
        println!("peer: {}", peer.public_key);
        match (&peer.endpoint_written, &peer.endpoint) {
            (Some(w), Some(e)) if w != e => println!("  endpoint: {w} ({e})"),
            (_, Some(e)) => println!("  endpoint: {e}"),
            (Some(w), None) => println!("  endpoint: {w}"),
            (None, None) => println!("  endpoint: (none; waits for the peer)"),
        }
        match peer.latest_handshake_secs {
            Some(s) => println!("  latest handshake: {s} s ago"),
            None => println!("  latest handshake: never"),
        }
        println!(
            "  transfer: {} received, {} sent",
            human(peer.received_bytes),
            human(peer.sent_bytes)
        );
    }
    Ok(0)
}
