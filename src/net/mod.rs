//! Networking. The files here run in the supervisor, with root's
//! rights: the VM's namespace and its socket factory ([`netns`]), the
//! TAP device ([`tap`]), the nftables ruleset ([`nft`]). Everything that
//! reads the guest's bytes (DHCP, DNS, the egress proxy and its
//! inspection, the policy, the journal) lives in [`dataplane`] and runs
//! in the unprivileged, seccomp-confined dataplane process.

pub mod dataplane;
pub mod netns;
pub mod nft;
pub mod tap;
