//! The dataplane: everything that reads the guest's network bytes (DHCP,
//! DNS, the resolver, the egress proxy and its inspection, the policy and
//! route rule, the SSH forward, the journal), run unprivileged and
//! seccomp-confined in its own process ([`child`]). The supervisor makes
//! the namespace and every socket first ([`crate::net::setup`]), then
//! starts and restarts the child ([`parent`], the one file here the
//! supervisor runs) with a [`Plan`]. `migrant __netlab` (benchmarks) runs
//! the same child on a veth whose other end stands in for the guest.

pub mod broker;
pub mod child;
pub mod dhcp;
pub mod dns;
pub mod domains;
pub mod forward;
#[cfg(test)]
mod fuzz;
pub mod inspect;
pub mod journal;
pub mod link;
pub mod parent;
pub mod policy;
pub mod proxy;
pub mod resolver;
pub mod route;
pub mod splice;
pub mod stats;

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::plan::NetPlan;

/// The next datagram on `socket` for a guest-facing server (`what`
/// names it in the log): errors a guest's packets can cause (an ICMP
/// error queued on the socket, an interrupted call) are skipped, any
/// other ends the server.
pub async fn recv_datagram(
    socket: &tokio::net::UdpSocket,
    buf: &mut [u8],
    what: &str,
) -> std::io::Result<(usize, SocketAddr)> {
    use std::io::ErrorKind;
    loop {
        match socket.recv_from(buf).await {
            Ok(got) => return Ok(got),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::Interrupted
                        | ErrorKind::WouldBlock
                        | ErrorKind::ConnectionRefused
                        | ErrorKind::ConnectionReset
                ) =>
            {
                tracing::debug!(error = %e, "{what}: transient receive error");
            }
            Err(e) => return Err(e),
        }
    }
}

/// Starting or talking to the dataplane child failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct DataplaneError {
    what: &'static str,
    #[source]
    source: std::io::Error,
}

impl DataplaneError {
    pub fn exit_code(&self) -> u8 {
        crate::exit::SOFTWARE
    }
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> DataplaneError {
    move |source| DataplaneError { what, source }
}

/// What the supervisor decides for the dataplane of one VM: its network,
/// the guest's MAC, who to become. The same plan serves every start of
/// the child; each start adds what only it knows ([`Handover`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// The VM's name (the guest's DHCP hostname and local DNS name).
    pub name: String,
    pub net: NetPlan,
    pub mac: crate::state::Mac,
    /// Send the egress journal to the supervisor.
    pub journal: bool,
    /// The identity to become, and the supervisor's pid (it must still be
    /// the parent once that is done).
    pub uid: u32,
    pub gid: u32,
    pub parent: i32,
    /// A folder only root writes, for [`crate::sandbox::empty_root`].
    pub empty_parent: std::path::PathBuf,
    /// The VM's secrets, to broker (values included: this plan exists
    /// only in memory and on the child's stdin).
    pub broker: Option<broker::Plan>,
}

impl Plan {
    pub fn new(
        name: &str,
        net: NetPlan,
        mac: crate::state::Mac,
        identity: &crate::qemu::process::Identity,
        empty_parent: &std::path::Path,
    ) -> Plan {
        Plan {
            name: name.to_string(),
            net,
            mac,
            journal: true,
            uid: identity.uid.as_raw(),
            gid: identity.gid.as_raw(),
            parent: nix::unistd::getpid().as_raw(),
            empty_parent: empty_parent.to_path_buf(),
            broker: None,
        }
    }
}

/// What one start of the child gets on its stdin, as JSON: the plan, the
/// descriptors it inherits, and where the guest stands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Handover {
    pub plan: Plan,
    /// The guest's link (its interface index in the namespace).
    pub guest_link: u32,
    pub fds: Fds,
    pub start: Start,
}

/// Where the guest stands when a child starts.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Start {
    /// Report when the guest's SSH server first answers (after the lease,
    /// or at once when `lease_seen`).
    pub probe_ssh: bool,
    /// The guest holds its lease already (a restart, a restored guest).
    pub lease_seen: bool,
}

/// Descriptor numbers the child inherits.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fds {
    pub dhcp: i32,
    pub dns: i32,
    pub dns_tcp: i32,
    pub tcp: Option<i32>,
    pub udp: Option<i32>,
    pub tcp6: Option<i32>,
    pub udp6: Option<i32>,
    pub tunnel_routes: Option<i32>,
    pub ssh: Option<i32>,
    /// The socket link ([`crate::net::netns::NsSockets::remote`]).
    pub factory: i32,
    /// The event socket ([`link`]).
    pub events: i32,
}

impl Fds {
    pub fn all(&self) -> Vec<i32> {
        let mut v = vec![self.dhcp, self.dns, self.dns_tcp, self.factory, self.events];
        v.extend(
            [
                self.tcp,
                self.udp,
                self.tcp6,
                self.udp6,
                self.tunnel_routes,
                self.ssh,
            ]
            .into_iter()
            .flatten(),
        );
        v
    }
}

/// Open files the dataplane wants: 4096 relayed TCP connections of six
/// descriptors, 4096 UDP flows of two, and room for everything else.
const WANTED_FILES: u64 = 4096 * 6 + 4096 * 2 + 1024;

/// Raise the open-file limit so the connection caps fit: to
/// [`WANTED_FILES`] (root may raise the hard limit), else to the hard
/// limit. The proxy sizes its caps to what it got ([`flow_caps`]).
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < WANTED_FILES => {
            let target = hard.max(WANTED_FILES);
            if setrlimit(Resource::RLIMIT_NOFILE, target, target).is_err()
                && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
            {
                tracing::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot read the open-file limit: {e}"),
    }
}

/// The proxy's caps on relayed TCP connections and UDP flows: 4096 each,
/// or what the open-file limit leaves room for (half of it for each kind,
/// after 512 for everything else), so a flood meets the cap, never
/// `EMFILE` (which would also starve DNS and DHCP).
pub fn flow_caps() -> (usize, usize) {
    let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024);
    let budget = usize::try_from(limit.saturating_sub(512) / 2).unwrap_or(usize::MAX);
    (
        (budget / 6).clamp(16, proxy::MAX_TCP_FLOWS),
        (budget / 2).clamp(16, proxy::MAX_UDP_FLOWS),
    )
}
