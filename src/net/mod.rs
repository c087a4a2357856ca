//! The VM's private network: the services the gateway offers the guest.

pub mod dhcp;
pub mod dns;
