//! The native TOML Migrantfile.
//!
//! ```toml
//! name = "agent"            # default: the folder name
//! image = "debian-12"       # required: alias, URL, file:// or local path
//! image_checksum = "sha512:…"  # or "sha256:…", or a checksum list URL
//! cpus = 2
//! memory = "2G"             # K/M/G/T, binary; optional B or iB
//! disk = "20G"
//! firmware = "bios"         # or "uefi"
//! secure_boot = false       # UEFI Secure Boot (uefi only)
//! accel = "auto"            # or "kvm", "tcg"
//! halt_timeout = 60         # seconds
//! autoconnect = "none"      # or "ssh", "console"
//! tunnel_ports = [3000]
//! wait_cloud_init = true
//!
//! [[share]]
//! host = "workspace"        # relative to the Migrantfile's folder
//! tag = "workspace"         # default: the folder's base name
//! guest = "/home/migrant/workspace"
//! size = "10G"
//! isolation = true
//!
//! [network]
//! egress = "direct"         # or "none", or "open" (the original's NETWORK_ISOLATION=false)
//! subnet = "10.0.2.0/24"
//! rules = ["allow-host-port tcp/8080"]
//! allow_domains = ["*.debian.org"]
//! wireguard = "wg0.conf"
//! wireguard_timeout = 10       # seconds to wait for the first handshake
//! ipv6 = false
//!
//! [ssh]
//! user = "migrant"
//! key = "~/.ssh/migrant"
//!
//! [secrets.GITHUB_TOKEN]    # the guest sees a placeholder
//! from = "env:GITHUB_TOKEN" # or "file:PATH", "command:COMMAND"
//! hosts = ["api.github.com"]
//! ```
//!
//! Unknown keys and wrong types are errors; their line comes from the
//! span the `toml` crate reports, their field from locating that span in
//! the parsed document.

use super::draft::{At, Ctx, Draft, DraftShare};
use super::values;
use super::{Accel, Autoconnect, ConfigError, Egress, Firmware, Format};
use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    name: Option<Spanned<String>>,
    image: Option<Spanned<String>>,
    image_checksum: Option<Spanned<String>>,
    secure_boot: Option<Spanned<bool>>,
    cpus: Option<Spanned<i64>>,
    memory: Option<Spanned<String>>,
    disk: Option<Spanned<String>>,
    firmware: Option<RawFirmware>,
    accel: Option<RawAccel>,
    halt_timeout: Option<Spanned<i64>>,
    #[serde(default)]
    share: Vec<Spanned<RawShare>>,
    network: Option<RawNetwork>,
    ssh: Option<RawSsh>,
    autoconnect: Option<RawAutoconnect>,
    #[serde(default)]
    tunnel_ports: Vec<Spanned<i64>>,
    wait_cloud_init: Option<bool>,
    #[serde(default)]
    secrets: std::collections::BTreeMap<Spanned<String>, RawSecret>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecret {
    from: Spanned<String>,
    #[serde(default)]
    hosts: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShare {
    host: Spanned<String>,
    tag: Option<Spanned<String>>,
    guest: Option<Spanned<String>>,
    size: Option<Spanned<String>>,
    isolation: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    egress: Option<RawEgress>,
    subnet: Option<Spanned<String>>,
    #[serde(default)]
    rules: Vec<Spanned<String>>,
    #[serde(default)]
    allow_domains: Vec<Spanned<String>>,
    wireguard: Option<Spanned<String>>,
    wireguard_timeout: Option<Spanned<i64>>,
    ipv6: Option<Spanned<bool>>,
    dns: Option<RawDns>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawDns {
    Tunnel,
    Host,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSsh {
    user: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawFirmware {
    Bios,
    Uefi,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawAccel {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawAutoconnect {
    None,
    Ssh,
    Console,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawEgress {
    Direct,
    None,
    Open,
}

/// 1-based line of byte offset `pos` in `text`.
pub(super) fn line_of(text: &str, pos: usize) -> usize {
    let end = pos.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// Read a TOML Migrantfile into a draft.
pub(super) fn read(text: &str, ctx: &Ctx) -> Result<Draft, ConfigError> {
    let raw: RawFile = toml::from_str(text).map_err(|e| map_error(&e, text, ctx))?;
    let at = |s: Spanned<String>, field: String| {
        let line = line_of(text, s.span().start);
        At::new(s.into_inner(), line, field)
    };
    let size = |s: Spanned<String>, field: &str| -> Result<At<u64>, ConfigError> {
        let line = line_of(text, s.span().start);
        let bytes = values::parse_size(s.get_ref()).map_err(|e| ctx.err(line, field, e))?;
        Ok(At::new(bytes, line, field))
    };
    let int =
        |s: Spanned<i64>, field: &str| At::new(*s.get_ref(), line_of(text, s.span().start), field);

    let mut d = Draft::new(Format::Toml);
    d.name = raw.name.map(|s| at(s, "name".into()));
    d.image = raw.image.map(|s| at(s, "image".into()));
    d.image_checksum = raw.image_checksum.map(|s| at(s, "image_checksum".into()));
    d.secure_boot = raw
        .secure_boot
        .map(|s| At::new(*s.get_ref(), line_of(text, s.span().start), "secure_boot"));
    d.cpus = raw.cpus.map(|s| int(s, "cpus"));
    d.memory = raw.memory.map(|s| size(s, "memory")).transpose()?;
    d.disk = raw.disk.map(|s| size(s, "disk")).transpose()?;
    d.halt_timeout = raw.halt_timeout.map(|s| int(s, "halt_timeout"));
    d.firmware = match raw.firmware {
        None | Some(RawFirmware::Bios) => Firmware::Bios,
        Some(RawFirmware::Uefi) => Firmware::Uefi,
    };
    d.accel = match raw.accel {
        None | Some(RawAccel::Auto) => Accel::Auto,
        Some(RawAccel::Kvm) => Accel::Kvm,
        Some(RawAccel::Tcg) => Accel::Tcg,
    };
    d.autoconnect = match raw.autoconnect {
        None | Some(RawAutoconnect::None) => Autoconnect::None,
        Some(RawAutoconnect::Ssh) => Autoconnect::Ssh,
        Some(RawAutoconnect::Console) => Autoconnect::Console,
    };
    d.wait_cloud_init = raw.wait_cloud_init.unwrap_or(true);
    d.tunnel_ports = raw
        .tunnel_ports
        .into_iter()
        .enumerate()
        .map(|(i, s)| int(s, &format!("tunnel_ports[{i}]")))
        .collect();
    for (name, secret) in raw.secrets {
        let field = format!("secrets.{}", name.get_ref());
        let line = line_of(text, name.span().start);
        d.secrets.push(super::draft::DraftSecret {
            name: At::new(name.into_inner(), line, field.clone()),
            from: at(secret.from, format!("{field}.from")),
            hosts: secret
                .hosts
                .into_iter()
                .enumerate()
                .map(|(i, h)| at(h, format!("{field}.hosts[{i}]")))
                .collect(),
        });
    }

    for (i, share) in raw.share.into_iter().enumerate() {
        let field = format!("share[{i}]");
        let line = line_of(text, share.span().start);
        let s = share.into_inner();
        d.shares.push(DraftShare {
            at: At::new((), line, field.clone()),
            host: at(s.host, format!("{field}.host")),
            tag: s.tag.map(|t| at(t, format!("{field}.tag"))),
            guest: s.guest.map(|g| at(g, format!("{field}.guest"))),
            size: s
                .size
                .map(|z| size(z, &format!("{field}.size")))
                .transpose()?,
            isolation: s.isolation.unwrap_or(true),
            isolation_field: format!("{field}.isolation"),
        });
    }

    if let Some(net) = raw.network {
        d.egress = match net.egress {
            None | Some(RawEgress::Direct) => Egress::Direct,
            Some(RawEgress::None) => Egress::None,
            Some(RawEgress::Open) => Egress::Open,
        };
        d.subnet = net.subnet.map(|s| at(s, "network.subnet".into()));
        d.rules = net
            .rules
            .into_iter()
            .enumerate()
            .map(|(i, s)| at(s, format!("network.rules[{i}]")))
            .collect();
        d.allow_domains = net
            .allow_domains
            .into_iter()
            .enumerate()
            .map(|(i, s)| at(s, format!("network.allow_domains[{i}]")))
            .collect();
        d.wireguard = net.wireguard.map(|s| at(s, "network.wireguard".into()));
        d.dns_host = matches!(net.dns, Some(RawDns::Host));
        d.wireguard_timeout = net.wireguard_timeout.map(|s| {
            At::new(
                *s.get_ref(),
                line_of(text, s.span().start),
                "network.wireguard_timeout",
            )
        });
        d.ipv6 = net
            .ipv6
            .map(|s| At::new(*s.get_ref(), line_of(text, s.span().start), "network.ipv6"));
    }
    if let Some(ssh) = raw.ssh {
        d.ssh_user = ssh.user.map(|s| at(s, "ssh.user".into()));
        d.ssh_key = ssh.key.map(|s| at(s, "ssh.key".into()));
    }
    Ok(d)
}

/// Turn a `toml` error (syntax or schema) into `<file>:<line>: <field>:
/// <message>`.
fn map_error(e: &toml::de::Error, text: &str, ctx: &Ctx) -> ConfigError {
    let pos = e.span().map(|s| s.start);
    let line = pos.map_or(0, |p| line_of(text, p));
    let message = e
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");

    let mut field = pos.and_then(|p| field_at(text, p)).unwrap_or_default();
    if let Some(missing) = backticked(&message, "missing field `") {
        field = if field.is_empty() {
            missing.to_string()
        } else {
            format!("{field}.{missing}")
        };
    } else if field.is_empty() {
        field = backticked(&message, "unknown field `")
            .map(str::to_string)
            .or_else(|| line_key(text, line))
            .unwrap_or_else(|| "syntax".to_string());
    }

    let hint = hint_for(&field, &message);
    ctx.err(line, field, format!("{message}{hint}"))
}

/// Extra advice for common mistakes.
fn hint_for(field: &str, message: &str) -> &'static str {
    let leaf = field.rsplit('.').next().unwrap_or(field);
    if message.starts_with("invalid type") && matches!(leaf, "memory" | "disk" | "size") {
        "; sizes are strings with a unit, like \"4G\""
    } else if field == "share" && message.contains("expected a sequence") {
        "; write [[share]] (double brackets) for each shared folder"
    } else {
        ""
    }
}

/// The text between `prefix` and the next backtick in `message`.
fn backticked<'m>(message: &'m str, prefix: &str) -> Option<&'m str> {
    let rest = &message[message.find(prefix)? + prefix.len()..];
    Some(&rest[..rest.find('`')?])
}

/// For syntax errors: the key assigned on `line`, if the line looks like
/// `key = ...`.
fn line_key(text: &str, line: usize) -> Option<String> {
    let l = text.lines().nth(line.checked_sub(1)?)?.trim_start();
    let key_len = l
        .bytes()
        .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        .count();
    (key_len > 0 && l[key_len..].trim_start().starts_with('=')).then(|| l[..key_len].to_string())
}

/// The dotted path (`network.rules[2]`, `share[0].size`) of the key or
/// value at byte offset `pos`, the most deeply nested one that covers it.
fn field_at(text: &str, pos: usize) -> Option<String> {
    let doc = DeTable::parse(text).ok()?;
    find_in_table(doc.get_ref(), pos, "")
}

fn covers(span: &std::ops::Range<usize>, pos: usize) -> bool {
    span.start <= pos && pos < span.end.max(span.start + 1)
}

fn find_in_table(table: &DeTable<'_>, pos: usize, prefix: &str) -> Option<String> {
    for (key, value) in table.iter() {
        let name = if prefix.is_empty() {
            key.get_ref().to_string()
        } else {
            format!("{prefix}.{}", key.get_ref())
        };
        if let Some(deeper) = find_in_value(value, pos, &name) {
            return Some(deeper);
        }
        if covers(&key.span(), pos) || covers(&value.span(), pos) {
            return Some(name);
        }
    }
    None
}

fn find_in_value(value: &Spanned<DeValue<'_>>, pos: usize, name: &str) -> Option<String> {
    match value.get_ref() {
        DeValue::Table(t) => find_in_table(t, pos, name),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let item_name = format!("{name}[{i}]");
                if let Some(deeper) = find_in_value(item, pos, &item_name) {
                    return Some(deeper);
                }
                if covers(&item.span(), pos) {
                    return Some(item_name);
                }
            }
            None
        }
        _ => None,
    }
}
