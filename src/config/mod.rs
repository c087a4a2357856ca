//! The Migrantfile: TOML schema, the original tool's bash-style reader,
//! validation. Everything here is pure (no QEMU, no root).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

mod error;
pub use error::ConfigError;

/// Fully validated project configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The Migrantfile this came from (absolute).
    pub file: PathBuf,
    /// The project folder: the Migrantfile's folder (absolute).
    pub dir: PathBuf,
    /// VM name: `[A-Za-z0-9][A-Za-z0-9_.-]{0,62}`; default: the folder name
    /// (sanitised).
    pub name: String,
    /// Image reference as written: local path (resolved against `dir`),
    /// `file://`, URL or alias. Resolution happens in `image`.
    pub image: String,
    pub cpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Disk size in bytes.
    pub disk: u64,
    pub firmware: Firmware,
    pub accel: Accel,
    pub shares: Vec<Share>,
    pub network: Network,
    pub ssh: Ssh,
    pub autoconnect: Autoconnect,
    pub tunnel_ports: Vec<u16>,
    pub wait_cloud_init: bool,
    /// Seconds `halt` waits for an ACPI power-down before forcing the stop.
    pub halt_timeout: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    Bios,
    Uefi,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Autoconnect {
    None,
    Ssh,
    Console,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Share {
    /// Host folder, absolute (resolved against the project folder).
    pub host: PathBuf,
    pub tag: String,
    /// Mount point inside the guest, if migrant should mount it.
    pub guest: Option<String>,
    /// Cap in bytes (isolation on only).
    pub size: u64,
    pub isolation: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    Direct,
    None,
    /// `NETWORK_ISOLATION=false` in the original: still proxied, but the
    /// private-address policy is relaxed (implemented by the networking work).
    Open,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Network {
    pub egress: Egress,
    /// Guest subnet; the gateway is `.2`, the guest `.15`.
    pub subnet: Ipv4Addr,
    pub prefix: u8,
    pub rules: Vec<NetRule>,
    pub allow_domains: Vec<String>,
    pub wireguard: Option<PathBuf>,
    pub ipv6: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, PartialEq)]
pub enum NetRule {
    /// `allow-host-port tcp/8080`
    AllowHostPort { proto: Proto, port: u16 },
    /// `allow-lan-host 192.168.1.50`
    AllowLanHost { addr: Ipv4Addr },
    /// `forward-port tcp/11434 100.64.0.6:11434 [via-tunnel]`
    ForwardPort {
        proto: Proto,
        guest_port: u16,
        target: std::net::SocketAddrV4,
        via_tunnel: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Ssh {
    pub user: String,
    /// Private key; default `~/.ssh/migrant` of the invoking user.
    pub key: Option<PathBuf>,
}

impl Config {
    /// Guest address: `.15` of the subnet.
    pub fn guest_ip(&self) -> Ipv4Addr {
        host_in(self.network.subnet, 15)
    }
    /// Gateway (DHCP, DNS, holes): `.2` of the subnet.
    pub fn gateway_ip(&self) -> Ipv4Addr {
        host_in(self.network.subnet, 2)
    }
}

fn host_in(net: Ipv4Addr, host: u8) -> Ipv4Addr {
    let [a, b, c, _] = net.octets();
    Ipv4Addr::new(a, b, c, host)
}

/// Names of the Migrantfile, in the order they are looked for.
pub const FILE_NAME: &str = "Migrantfile";

/// Find and load the Migrantfile of the project folder `dir`.
/// The format (TOML or the original bash-style) is detected from content.
pub fn load(dir: &Path) -> Result<Config, ConfigError> {
    parse::load(dir)
}

mod parse;
pub const INIT_MIGRANTFILE: &str = "";
pub const INIT_CLOUD_INIT: &str = "";
