//! Networking. The files at this folder's top level run in the
//! supervisor, with root's rights: the VM's namespace and its socket
//! factory ([`netns`]), the TAP device ([`tap`]), the nftables ruleset
//! ([`nft`]), the namespace made ready for the dataplane ([`setup`]).
//! [`plan`] is the one projection of the Migrantfile's network they and
//! the dataplane share. Everything that reads the guest's bytes (DHCP,
//! DNS, the egress proxy and its inspection, the policy, the journal)
//! lives in [`dataplane`] and runs in the unprivileged, seccomp-confined
//! dataplane process.

pub mod dataplane;
pub mod netns;
pub mod nft;
pub mod plan;
pub mod setup;
pub mod tap;
