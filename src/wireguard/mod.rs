//! WireGuard egress. For now: the wg-quick configuration, read and checked
//! at `up` so that its mistakes are reported with their line; the tunnel
//! itself (boringtun in the VM's namespace) is not built yet, and `up`
//! refuses such a VM rather than let it egress outside the tunnel.

pub mod conf;
