//! Networking: the VM's namespace, its TAP device, and the dataplane the
//! supervisor serves inside it (DHCP, DNS, forwards).

pub mod dataplane;
pub mod dhcp;
pub mod dns;
pub mod domains;
pub mod forward;
#[cfg(test)]
mod fuzz;
pub mod inspect;
pub mod journal;
pub mod netns;
pub mod nft;
pub mod policy;
pub mod proxy;
pub mod resolver;
pub mod route;
pub mod splice;
pub mod tap;
