//! The Migrantfile: TOML schema, the original tool's bash-style reader,
//! validation. Everything here is pure (no QEMU, no root): reading a
//! project only reads its `Migrantfile` and looks at which files exist
//! beside it.
//!
//! Two formats are read, told apart by [`Format::detect`]:
//!
//! * TOML, the native format; [`INIT_MIGRANTFILE`] is a commented example
//!   listing every setting and its default;
//! * the original bash tool's `Migrantfile`, a list of shell variable
//!   assignments (`VM_NAME="x"`, `RAM_MB=4096`, `SHARED_FOLDERS=(...)`).
//!   It is read as data and never executed; anything beyond plain
//!   assignments is refused with the file and line. See the `legacy`
//!   module for the exact subset and how each variable maps.
//!
//! Relative paths (share folders, SSH key, WireGuard config, a local
//! image) are resolved against the Migrantfile's folder; `~/` means the
//! home of the invoking user (see [`invoking_user_home`]).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

mod convert;
mod draft;
mod error;
mod guest_user;
mod init;
mod legacy;
mod parse;
mod secrets;
#[cfg(test)]
mod tests;

/// Configs for other modules' unit tests.
#[cfg(test)]
pub mod tests_support {
    use super::Config;

    /// The config of a project whose Migrantfile has these secrets
    /// (names and hosts; each read from an environment variable).
    pub fn with_secrets(secrets: &[(&str, &[&str])]) -> Config {
        let mut text = String::from("image = \"debian-12\"\n");
        for (name, hosts) in secrets {
            let hosts: Vec<String> = hosts.iter().map(|h| format!("{h:?}")).collect();
            text.push_str(&format!(
                "[secrets.{name}]\nfrom = \"env:{name}\"\nhosts = [{}]\n",
                hosts.join(", ")
            ));
        }
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        std::fs::write(dir.path().join(super::FILE_NAME), text)
            .unwrap_or_else(|e| panic!("write: {e}"));
        super::parse::load(dir.path(), None).unwrap_or_else(|e| panic!("{e}"))
    }
}
mod toml_file;
mod values;

pub use error::ConfigError;
pub use init::{INIT_CLOUD_INIT, INIT_MIGRANTFILE, PUBKEY_PLACEHOLDER};
pub use secrets::{Secret, SecretSource, domain_matches, is_variable_name};

/// Parse a size as the Migrantfile writes it (`20G`, `512M`; powers of
/// 1024), for command-line arguments.
pub fn parse_size(text: &str) -> Result<u64, String> {
    values::parse_size(text)
}

/// Fully validated project configuration.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
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
    ///
    /// A value is a local path if it is absolute, starts with `~/` or `.`,
    /// contains a `/`, or ends in a disk-image extension (`.qcow2`, `.img`,
    /// `.raw`, ...); such a path is stored absolute (`file://` keeps its
    /// scheme: `file://disk.qcow2` becomes `file:///project/disk.qcow2`).
    /// Other `scheme://` URLs and bare words (aliases such as `debian-12`
    /// or `ubuntu-24.04`) are kept as written.
    pub image: String,
    /// How to verify a downloaded (or copied) image (`image_checksum`):
    /// a digest `sha256:…`/`sha512:…`, or the `http(s)://` URL of a
    /// checksum list. `None`: image names use their distribution's list,
    /// other URLs a `SHA512SUMS`/`SHA256SUMS` beside them.
    pub image_checksum: Option<crate::image::Checksum>,
    /// Number of virtual CPUs, 1..=256 (default 2).
    pub cpus: u32,
    /// Guest RAM in bytes (default 2 GiB, at least 128 MiB).
    pub memory: u64,
    /// Disk size in bytes (default 20 GiB, at least 1 GiB).
    pub disk: u64,
    /// Boot firmware (default BIOS).
    pub firmware: Firmware,
    /// UEFI Secure Boot (`secure_boot = true`, UEFI only; default off).
    pub secure_boot: bool,
    /// CPU acceleration (default: KVM when usable, else TCG).
    pub accel: Accel,
    /// Host folders shared with the guest, in file order; tags are unique.
    pub shares: Vec<Share>,
    /// Guest networking.
    pub network: Network,
    /// Credentials the guest uses through a placeholder (`[secrets.NAME]`),
    /// by name; where each value is read, never the value.
    pub secrets: Vec<Secret>,
    /// How to log into the guest.
    pub ssh: Ssh,
    /// What `up` connects to once the VM is ready (default: nothing).
    pub autoconnect: Autoconnect,
    /// Ports `migrant tunnel` forwards from host 127.0.0.1 to guest
    /// 127.0.0.1 when given none; all non-zero.
    pub tunnel_ports: Vec<u16>,
    /// Whether `up` waits for cloud-init to finish (default true).
    pub wait_cloud_init: bool,
    /// Seconds `halt` waits for an ACPI power-down before forcing the stop.
    pub halt_timeout: u64,
    /// Which syntax the Migrantfile was written in.
    pub format: Format,
    /// Non-fatal remarks about the file (settings of the original tool that
    /// have no exact equivalent here, ...), for the caller to show.
    pub warnings: Vec<String>,
}

/// The syntax of a Migrantfile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Format {
    /// The native TOML format.
    Toml,
    /// The original bash tool's `NAME=value` assignments.
    Legacy,
}

/// Guest boot firmware.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Firmware {
    /// SeaBIOS (legacy BIOS boot).
    Bios,
    /// OVMF (UEFI boot).
    Uefi,
}

/// CPU acceleration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Accel {
    /// KVM if `/dev/kvm` is usable, TCG otherwise.
    Auto,
    /// KVM only; fail if unavailable.
    Kvm,
    /// Software emulation (slow).
    Tcg,
}

/// What `up` attaches to once the VM is ready (the original's
/// `AUTOCONNECT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Autoconnect {
    /// Return to the shell.
    None,
    /// Open an SSH session.
    Ssh,
    /// Attach the serial console as soon as the VM starts.
    Console,
}

/// A host folder shared with the guest over virtiofs.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Share {
    /// Host folder, absolute (resolved against the project folder).
    pub host: PathBuf,
    /// virtiofs mount tag: 1-36 characters `[A-Za-z0-9_-]`.
    pub tag: String,
    /// Mount point inside the guest, if migrant should mount it.
    pub guest: Option<String>,
    /// Cap in bytes (isolation on only; 0 when isolation is off).
    pub size: u64,
    /// Back the share with a size-capped loop image instead of exposing
    /// the host folder itself (default true).
    pub isolation: bool,
}

/// Where guest traffic may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Egress {
    /// Internet access; private and link-local addresses refused except
    /// those opened by rules.
    Direct,
    /// No egress at all (rules still apply).
    None,
    /// `NETWORK_ISOLATION=false` in the original: still proxied, but the
    /// private-address policy is relaxed (implemented by the networking work).
    Open,
}

/// Guest networking.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Network {
    /// Egress policy (default direct).
    pub egress: Egress,
    /// Guest subnet (prefix 8..=24, private); the gateway is `.2`, the
    /// guest `.15`.
    pub subnet: ipnet::Ipv4Net,
    /// Holes in the isolation, in file order; no two claim the same guest
    /// port.
    pub rules: Vec<NetRule>,
    /// Domain names (lower case; may start with `*.`) the guest may reach
    /// when egress is restricted.
    pub allow_domains: Vec<String>,
    /// WireGuard config (absolute): the `wireguard` setting, else
    /// `wireguard.conf` beside the Migrantfile if it exists.
    pub wireguard: Option<PathBuf>,
    /// With WireGuard and no `DNS =` in its file: the guest's DNS may go to
    /// the host's resolvers, outside the tunnel (`[network] dns = "host"`);
    /// otherwise such a file is refused.
    pub dns_host: bool,
    /// How long `up` waits for the tunnel's first handshake (default 10 s).
    pub wireguard_timeout: std::time::Duration,
    /// Give the guest IPv6 egress (the original's `NETWORK_IPV6=nat`),
    /// through the WireGuard tunnel when there is one.
    pub ipv6: bool,
    /// The original's `NETWORKS` entries (virt-install `--network` specs),
    /// verbatim; empty for TOML files. Recorded only: migrant always gives
    /// the guest one NIC on its own network.
    pub legacy_networks: Vec<String>,
}

/// Transport protocol of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// A hole in the network isolation (the original's `HOST_ACCESS`
/// directives, same syntax; [`std::fmt::Display`] writes it back).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum NetRule {
    /// `allow-host-port tcp/8080`
    AllowHostPort {
        /// Protocol.
        proto: Proto,
        /// Port on the host, reached by the guest at the gateway.
        port: u16,
    },
    /// `allow-lan-host 192.168.1.50 [via-tunnel]` (or an IPv6 address)
    AllowLanHost {
        /// The LAN host the guest may reach.
        addr: std::net::IpAddr,
        /// Reach it through the WireGuard tunnel instead of around it.
        via_tunnel: bool,
    },
    /// `forward-port tcp/11434 100.64.0.6:11434 [via-tunnel]` (or
    /// `[fd12::5]:80`)
    ForwardPort {
        /// Protocol.
        proto: Proto,
        /// Port the guest connects to on the gateway.
        guest_port: u16,
        /// Where those connections go.
        target: std::net::SocketAddr,
        /// Send through the WireGuard tunnel instead of around it.
        via_tunnel: bool,
    },
}

impl Proto {
    /// `tcp` or `udp`, as rules and the journal write it.
    pub fn as_str(self) -> &'static str {
        values::proto_name(self)
    }
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(values::proto_name(*self))
    }
}

impl std::fmt::Display for NetRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NetRule::AllowHostPort { proto, port } => write!(f, "allow-host-port {proto}/{port}"),
            NetRule::AllowLanHost { addr, via_tunnel } => write!(
                f,
                "allow-lan-host {addr}{}",
                if *via_tunnel { " via-tunnel" } else { "" }
            ),
            NetRule::ForwardPort {
                proto,
                guest_port,
                target,
                via_tunnel,
            } => {
                write!(f, "forward-port {proto}/{guest_port} {target}")?;
                if *via_tunnel {
                    f.write_str(" via-tunnel")?;
                }
                Ok(())
            }
        }
    }
}

/// SSH access to the guest.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Ssh {
    /// Guest user (default [`DEFAULT_SSH_USER`]).
    pub user: String,
    /// Private key; default `~/.ssh/migrant` of the invoking user.
    pub key: Option<PathBuf>,
    /// The guest user's uid and gid as cloud-init creates it: shares show
    /// their owner's files as this user's.
    #[serde(default = "guest_user::default_ids")]
    pub ids: (u32, u32),
}

impl Config {
    /// Refuse holes aimed at the host itself: an `allow-lan-host` or a
    /// `forward-port` naming one of `host`'s own addresses (or loopback,
    /// or the unspecified address) would open the host's services to the
    /// guest. Checked by `up` against the
    /// addresses the host has then; the proxy refuses them at run time too.
    pub fn check_holes_against(
        &self,
        host: &std::collections::HashSet<std::net::IpAddr>,
    ) -> Result<(), ConfigError> {
        for rule in &self.network.rules {
            let (addr, keyword) = match rule {
                NetRule::AllowLanHost { addr, .. } => (*addr, "allow-lan-host"),
                NetRule::ForwardPort { target, .. } => (target.ip(), "forward-port"),
                NetRule::AllowHostPort { .. } => continue,
            };
            let plain = match addr {
                std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, std::net::IpAddr::V4),
                v4 => v4,
            };
            if !plain.is_loopback() && !plain.is_unspecified() && !host.contains(&plain) {
                continue;
            }
            let text =
                crate::userfile::read_to_string(&self.file, parse::MAX_FILE).unwrap_or_default();
            let needle = addr.to_string();
            let line = text
                .lines()
                .position(|l| {
                    l.contains(keyword)
                        && l.split(|c: char| !c.is_ascii_hexdigit() && c != '.' && c != ':')
                            .any(|w| {
                                w.strip_prefix(needle.as_str())
                                    .is_some_and(|rest| rest.is_empty() || rest.starts_with(':'))
                            })
                })
                .map_or(0, |i| i + 1);
            let field = match self.format {
                Format::Legacy => "HOST_ACCESS",
                Format::Toml => "network.rules",
            };
            return Err(ConfigError::invalid(
                &self.file,
                line,
                field,
                format!(
                    "invalid rule \"{rule}\": {addr} is an address of this host, and holes never open the host; to reach one service of the host, use \"allow-host-port tcp/PORT\""
                ),
            ));
        }
        Ok(())
    }

    /// The config as one process hands it to another it starts (`up` to
    /// the supervisor): JSON in a sealed memfd, which the receiver can
    /// read but nobody can change.
    pub fn handover(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        let json = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        crate::sandbox::handover::sealed(c"migrant-config", &json)
    }

    /// The config [`Config::handover`] wrote, from its descriptor.
    pub fn taken_over(fd: std::os::fd::OwnedFd) -> Result<Config, ConfigError> {
        let bad = |why: String| ConfigError::HandedDown(why);
        let json =
            crate::sandbox::handover::read_back(fd, 16 << 20).map_err(|e| bad(e.to_string()))?;
        serde_json::from_slice(&json).map_err(|e| bad(e.to_string()))
    }

    /// Guest address: `.15` of the subnet.
    pub fn guest_ip(&self) -> Ipv4Addr {
        host_in(self.network.subnet, 15)
    }
    /// Gateway (DHCP, DNS, holes): `.2` of the subnet.
    pub fn gateway_ip(&self) -> Ipv4Addr {
        host_in(self.network.subnet, 2)
    }
    /// The guest's IPv6 network, with `ipv6 = true`.
    pub fn net6(&self) -> Option<Net6> {
        self.network.ipv6.then(Net6::standard)
    }
}

/// The guest's IPv6 network (`ipv6 = true`): a unique local /64, the
/// same in every VM, since each VM has a namespace of its own (like the
/// default IPv4 subnet). The gateway is `::2`, the guest `::15`, set in
/// the seed's network-config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Net6 {
    pub gateway: std::net::Ipv6Addr,
    pub guest: std::net::Ipv6Addr,
}

impl Net6 {
    pub const PREFIX: u8 = 64;
    const NET: [u16; 4] = [0xfd6d, 0x6967, 0x7261, 0x6e74];

    pub fn standard() -> Net6 {
        let [a, b, c, d] = Net6::NET;
        Net6 {
            gateway: std::net::Ipv6Addr::new(a, b, c, d, 0, 0, 0, 2),
            guest: std::net::Ipv6Addr::new(a, b, c, d, 0, 0, 0, 0x15),
        }
    }

    /// Whether `ip` is in the guest's /64.
    pub fn contains(&self, ip: std::net::Ipv6Addr) -> bool {
        ip.segments()[..4] == Net6::NET
    }
}

fn host_in(net: ipnet::Ipv4Net, host: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) | u32::from(host))
}

/// Names of the Migrantfile, in the order they are looked for.
pub const FILE_NAME: &str = "Migrantfile";

/// The guest user when the Migrantfile names none: `migrant`, the user the
/// original tool's cloud-init examples create.
pub const DEFAULT_SSH_USER: &str = "migrant";

/// Default guest subnet.
pub const DEFAULT_SUBNET: &str = "10.0.2.0/24";

impl Format {
    /// Decide the syntax of a Migrantfile from its content.
    ///
    /// Blank lines and lines whose first non-blank character is `#` are
    /// skipped. Of the others:
    ///
    /// * a *shell line* starts (after optional blanks and an optional
    ///   `export `) with an upper-case variable name `[A-Z_][A-Z0-9_]*`
    ///   immediately followed by `=` (`RAM_MB=4096`, `VM_NAME="x"`);
    /// * a *TOML line* starts with `[` (a table header) or is a bare key
    ///   followed by blanks and `=` (`cpus = 2`).
    ///
    /// The file is [`Format::Legacy`] if it has at least one shell line and
    /// no TOML line, [`Format::Toml`] if it has no shell line. Having both
    /// is an error naming one line of each, since guessing would give a
    /// misleading message. (All native keys are lower case, so a shell
    /// line can never be valid native TOML.)
    pub fn detect(text: &str) -> Result<Format, (usize, usize)> {
        let mut shell_line = None;
        let mut toml_line = None;
        for (i, line) in text.lines().enumerate() {
            let t = line.trim_start();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            if shell_line.is_none() && is_shell_line(t) {
                shell_line = Some(i + 1);
            } else if toml_line.is_none() && is_toml_line(t) {
                toml_line = Some(i + 1);
            }
        }
        match (shell_line, toml_line) {
            (Some(s), Some(t)) => Err((s, t)),
            (Some(_), None) => Ok(Format::Legacy),
            (None, _) => Ok(Format::Toml),
        }
    }
}

fn is_shell_line(t: &str) -> bool {
    let t = match t.strip_prefix("export") {
        Some(rest) if rest.starts_with([' ', '\t']) => rest.trim_start(),
        _ => t,
    };
    let name_len = t
        .bytes()
        .take_while(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || *b == b'_')
        .count();
    name_len > 0 && !t.as_bytes()[0].is_ascii_digit() && t.as_bytes().get(name_len) == Some(&b'=')
}

fn is_toml_line(t: &str) -> bool {
    if t.starts_with('[') {
        return true;
    }
    let key_len = t
        .bytes()
        .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        .count();
    key_len > 0 && {
        let rest = &t[key_len..];
        rest.starts_with([' ', '\t']) && rest.trim_start().starts_with('=')
    }
}

/// Home folder of the user running migrant, for `~/` in a Migrantfile:
/// `$HOME` when absolute. `None` otherwise.
pub fn invoking_user_home() -> Option<PathBuf> {
    home_from(std::env::var_os("HOME"))
}

/// [`invoking_user_home`] with the environment passed in.
fn home_from(home: Option<std::ffi::OsString>) -> Option<PathBuf> {
    home.map(PathBuf::from).filter(|h| h.is_absolute())
}

/// Refuse (77) a project folder another user controls (see
/// [`crate::userfile::foreign_controller`]): run migrant as that user.
fn check_controller(dir: &Path, me: u32) -> Result<(), ConfigError> {
    match crate::userfile::foreign_controller(dir, me) {
        None => Ok(()),
        Some(owner) => Err(ConfigError::Foreign {
            dir: dir.to_path_buf(),
            owner,
        }),
    }
}

/// [`check_controller`] for the user running migrant.
pub fn check_ours(dir: &Path) -> Result<(), ConfigError> {
    check_controller(dir, nix::unistd::geteuid().as_raw())
}

/// Find and load the Migrantfile of the project folder `dir`.
/// The format (TOML or the original bash style) is detected from content
/// (see [`Format::detect`]).
pub fn load(dir: &Path) -> Result<Config, ConfigError> {
    check_ours(dir)?;
    parse::load(dir, invoking_user_home())
}

/// The TOML equivalent of the original-style Migrantfile in `dir`, with
/// its comments (`migrant convert`).
pub fn convert(dir: &Path) -> Result<String, ConfigError> {
    check_ours(dir)?;
    convert::convert(dir, invoking_user_home())
}

/// Whether `name` is a valid VM name (`[A-Za-z0-9][A-Za-z0-9_.-]{0,62}`):
/// the message says why not.
pub fn check_name(name: &str) -> Result<(), String> {
    values::check_name(name)
}

/// Only the private key the Migrantfile in `dir` names, if any (`pubkey`:
/// the rest of the file need not be complete).
pub fn ssh_key(dir: &Path) -> Result<Option<PathBuf>, ConfigError> {
    check_ours(dir)?;
    parse::ssh_key(dir, invoking_user_home())
}
