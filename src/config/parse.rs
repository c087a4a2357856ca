//! Loading: find and read the Migrantfile, pick the reader, then turn the
//! reader's [`Draft`] into a validated [`Config`]. Checks that do not
//! depend on the syntax (ranges, paths, cross-field rules) live here so
//! both formats get the same ones.

use super::values::{self, GIB, ImageRef, MIB};
use super::{Config, ConfigError, DEFAULT_SUBNET, Firmware, Format, NetRule, Network, Share, Ssh};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::draft::{At, Ctx, Draft};

/// Smallest guest RAM accepted.
const MIN_MEMORY: u64 = 128 * MIB;
/// Names in the project folder that run or are read on the host (by
/// migrant, hooks or Ansible): a share may not be one of them or inside
/// one, or the guest could write code the host runs.
const HOST_SIDE: [&str; 8] = [
    "Migrantfile",
    "cloud-init.yml",
    "playbook.yml",
    "ansible.cfg",
    "hooks",
    "roles",
    "library",
    "wireguard.conf",
];

/// A share's host folder: a relative path inside the project folder, with
/// no `..`, no symlink in any component that exists, and not one of the
/// project's host-side files or folders. Root creates and mounts the
/// share's store there, so it may never point anywhere else.
fn share_host(dir: &Path, text: &str) -> Result<PathBuf, String> {
    use std::path::Component;
    if text.is_empty() || text.contains('\0') {
        return Err("the path is empty or contains a NUL character".into());
    }
    let outside = || {
        format!(
            "{text:?}: a share is a folder inside the project folder, written relative to it (a folder outside it could be anything the user can reach)"
        )
    };
    if text.starts_with('~') {
        return Err(outside());
    }
    // An absolute path names the project folder itself (the original's
    // "${VM_DIR}/data"), or it is refused.
    let rel = match Path::new(text).strip_prefix(dir) {
        Ok(r) => r,
        Err(_) if Path::new(text).is_absolute() => return Err(outside()),
        Err(_) => Path::new(text),
    };
    let mut clean = PathBuf::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => clean.push(n),
            Component::CurDir => {}
            _ => {
                return Err(format!(
                    "{text:?}: \"..\" is refused; a share is a folder inside the project folder"
                ));
            }
        }
    }
    let Some(first) = clean.components().next() else {
        return Err(format!(
            "{text:?} is the project folder or contains it: the guest could rewrite the Migrantfile and the files beside it; share a subfolder instead"
        ));
    };
    let first = first.as_os_str().to_string_lossy();
    if HOST_SIDE.contains(&first.as_ref()) || first.ends_with("_plugins") {
        return Err(format!(
            "{text:?} is or is inside {first}, which runs or is read on the host; share another folder"
        ));
    }
    let mut at = dir.to_path_buf();
    for c in clean.components() {
        at.push(c);
        if std::fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(format!(
                "{} is a symlink: a share's path may not contain one (the guest would write where it leads)",
                at.display()
            ));
        }
    }
    Ok(dir.join(clean))
}

/// Smallest disk and share size accepted.
const MIN_DISK: u64 = GIB;
const DEFAULT_MEMORY: u64 = 2 * GIB;
const DEFAULT_DISK: u64 = 20 * GIB;
const DEFAULT_SHARE_SIZE: u64 = 10 * GIB;
const DEFAULT_CPUS: i64 = 2;
const MAX_CPUS: i64 = 256;
const DEFAULT_HALT_TIMEOUT: i64 = 60;
const MAX_HALT_TIMEOUT: i64 = 3600;

/// `path` with symlinks resolved as far as it exists.
fn real_path(path: &Path) -> PathBuf {
    let mut existing = path;
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            let mut out = real;
            out.extend(rest.iter().rev());
            return out;
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name);
                existing = parent;
            }
            _ => return path.to_path_buf(),
        }
    }
}

/// Read the Migrantfile of `dir` and validate it.
pub(super) fn load(dir: &Path, home: Option<PathBuf>) -> Result<Config, ConfigError> {
    let ctx = Ctx::new(dir, home);
    let text = read(&ctx)?;
    parse_text(&text, &ctx)
}

/// Only the private key the Migrantfile in `dir` names (`[ssh] key`,
/// `SSH_KEY_PATH`), `None` when it names none: what `pubkey` needs, from a
/// file that may not be complete enough to start a VM (the original's
/// `pubkey` needs nothing but `VM_NAME`).
pub(super) fn ssh_key(dir: &Path, home: Option<PathBuf>) -> Result<Option<PathBuf>, ConfigError> {
    let ctx = Ctx::new(dir, home);
    let text = read(&ctx)?;
    let d = draft(&text, &ctx)?;
    d.ssh_key.as_ref().map(|at| ctx.resolve(at)).transpose()
}

/// The longest Migrantfile (or `cloud-init.yml`) read.
pub const MAX_FILE: u64 = 1 << 20;

pub(super) fn read(ctx: &Ctx) -> Result<String, ConfigError> {
    match crate::userfile::read_to_string(&ctx.file, MAX_FILE) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ConfigError::NotFound {
            dir: ctx.dir.clone(),
        }),
        Err(source) => Err(ConfigError::Read {
            path: ctx.file.clone(),
            source,
        }),
    }
}

/// Detect the format of `text` (the content of `ctx.file`) and read it.
pub(super) fn parse_text(text: &str, ctx: &Ctx) -> Result<Config, ConfigError> {
    finish(draft(text, ctx)?, ctx)
}

/// What the file says, in either format, before the common checks.
fn draft(text: &str, ctx: &Ctx) -> Result<Draft, ConfigError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    Ok(match Format::detect(text) {
        Ok(Format::Toml) => super::toml_file::read(text, ctx)?,
        Ok(Format::Legacy) => super::legacy::read(text, ctx)?,
        Err((shell, toml)) => {
            return Err(ctx.err(
                shell.max(toml),
                "format",
                format!(
                    "the file mixes shell-style assignments (line {shell}) with TOML syntax (line {toml}); \
                     write it either in TOML or as the original tool's NAME=value lines"
                ),
            ));
        }
    })
}

/// Checks common to both formats; fill in defaults.
pub(super) fn finish(mut d: Draft, ctx: &Ctx) -> Result<Config, ConfigError> {
    let Basics {
        name,
        image,
        image_checksum,
        secure_boot,
        cpus,
        memory,
        disk,
        halt_timeout,
    } = basics(&d, ctx)?;
    let network = network(&mut d, ctx)?;
    let secrets = super::secrets::check(&d.secrets, &network, ctx)?;
    let shares = shares(&d, ctx)?;
    let (ssh, tunnel_ports) = access(&d, ctx, &image)?;
    Ok(Config {
        file: ctx.file.clone(),
        dir: ctx.dir.clone(),
        name,
        image,
        image_checksum,
        cpus,
        memory,
        disk,
        firmware: d.firmware,
        secure_boot,
        accel: d.accel,
        shares,
        network,
        secrets,
        ssh,
        autoconnect: d.autoconnect,
        tunnel_ports,
        wait_cloud_init: d.wait_cloud_init,
        halt_timeout,
        format: d.format,
        warnings: std::mem::take(&mut d.warnings),
    })
}

/// The VM's identity and resources, checked.
struct Basics {
    name: String,
    image: String,
    image_checksum: Option<crate::image::Checksum>,
    secure_boot: bool,
    cpus: u32,
    memory: u64,
    disk: u64,
    halt_timeout: u64,
}

/// Name, image and its checksum, firmware options, CPUs, memory, disk,
/// halt timeout.
fn basics(d: &Draft, ctx: &Ctx) -> Result<Basics, ConfigError> {
    let name = match &d.name {
        Some(at) => {
            values::check_name(&at.value).map_err(|e| ctx.err_at(at, e))?;
            at.value.clone()
        }
        None => values::sanitize_name(
            &ctx.dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        ),
    };

    let image_key = d.key("image", "IMAGE_URL");
    let Some(image_at) = &d.image else {
        return Err(ctx.err(
            0,
            image_key,
            "missing: set the base image (a URL, a local .qcow2 file, or an image name)",
        ));
    };
    let image = resolve_image(image_at, ctx)?;
    let image_checksum = match &d.image_checksum {
        Some(at) => {
            let c = crate::image::Checksum::parse(&at.value).map_err(|e| ctx.err_at(at, e))?;
            match (values::classify_image(&image_at.value), &c) {
                (ImageRef::Path(_) | ImageRef::FileUrl(_), crate::image::Checksum::List(_)) => {
                    return Err(ctx.err_at(
                        at,
                        "a local image is checked against a digest (\"sha256:…\"), not a checksum list",
                    ));
                }
                (ImageRef::Url, _)
                    if !image.starts_with("http://") && !image.starts_with("https://") =>
                {
                    return Err(ctx.err_at(
                        at,
                        "checksums apply to http(s) URLs, local files and image names",
                    ));
                }
                _ => {}
            }
            Some(c)
        }
        None => None,
    };
    let secure_boot = match &d.secure_boot {
        Some(at) if at.value && d.firmware != Firmware::Uefi => {
            return Err(ctx.err_at(
                at,
                format!(
                    "Secure Boot needs UEFI firmware: set {} = \"uefi\"",
                    d.key("firmware", "BOOT_FIRMWARE")
                ),
            ));
        }
        Some(at) => at.value,
        None => false,
    };

    let cpus = match &d.cpus {
        Some(at) if !(1..=MAX_CPUS).contains(&at.value) => {
            return Err(ctx.err_at(
                at,
                format!("{} CPUs: must be from 1 to {MAX_CPUS}", at.value),
            ));
        }
        Some(at) => at.value,
        None => DEFAULT_CPUS,
    };
    let cpus = u32::try_from(cpus).unwrap_or(2);

    let memory = min_size(&d.memory, DEFAULT_MEMORY, MIN_MEMORY, ctx)?;
    let disk = min_size(&d.disk, DEFAULT_DISK, MIN_DISK, ctx)?;

    let halt_timeout = match &d.halt_timeout {
        Some(at) if !(1..=MAX_HALT_TIMEOUT).contains(&at.value) => {
            return Err(ctx.err_at(
                at,
                format!("{}: must be from 1 to {MAX_HALT_TIMEOUT} seconds", at.value),
            ));
        }
        Some(at) => at.value,
        None => DEFAULT_HALT_TIMEOUT,
    };
    let halt_timeout = u64::try_from(halt_timeout).unwrap_or(60);

    Ok(Basics {
        name,
        image,
        image_checksum,
        secure_boot,
        cpus,
        memory,
        disk,
        halt_timeout,
    })
}

/// Subnet, WireGuard, IPv6, rules (holes), allowed domains.
fn network(d: &mut Draft, ctx: &Ctx) -> Result<Network, ConfigError> {
    let subnet = match &d.subnet {
        Some(at) => values::parse_subnet(&at.value).map_err(|e| ctx.err_at(at, e))?,
        None => values::parse_subnet(DEFAULT_SUBNET).map_err(|e| ctx.err(0, "subnet", e))?,
    };

    let wireguard = match &d.wireguard {
        Some(at) => {
            let path = ctx.resolve(at)?;
            if !path.is_file() {
                return Err(ctx.err_at(
                    at,
                    format!("{} does not exist or is not a file", path.display()),
                ));
            }
            Some(path)
        }
        None => {
            let beside = ctx.dir.join("wireguard.conf");
            beside.is_file().then_some(beside)
        }
    };

    let wireguard_timeout = match &d.wireguard_timeout {
        Some(at) if !(1..=600).contains(&at.value) => {
            return Err(ctx.err_at(
                at,
                format!("{} seconds is out of range: 1 to 600", at.value),
            ));
        }
        Some(at) if wireguard.is_none() => {
            return Err(ctx.err_at(
                at,
                "a handshake timeout without a WireGuard config (set network.wireguard or put a wireguard.conf beside the Migrantfile)".to_string(),
            ));
        }
        Some(at) => std::time::Duration::from_secs(at.value as u64),
        None => std::time::Duration::from_secs(10),
    };
    // IPv6 egress (the original's NETWORK_IPV6=nat): the same wall as
    // IPv4, through the host's IPv6 default route or, with WireGuard,
    // through the tunnel (whose file then needs an IPv6 Address).
    let ipv6 = d.ipv6.as_ref().is_some_and(|at| at.value);

    let rules = rules(d, ctx, &subnet, wireguard.as_deref(), ipv6)?;

    let mut allow_domains = Vec::new();
    for at in &d.allow_domains {
        let domain = values::check_domain(&at.value).map_err(|e| ctx.err_at(at, e))?;
        if !allow_domains.contains(&domain) {
            allow_domains.push(domain);
        }
    }

    Ok(Network {
        egress: d.egress,
        subnet,
        rules,
        allow_domains,
        wireguard,
        wireguard_timeout,
        dns_host: d.dns_host,
        ipv6,
        legacy_networks: std::mem::take(&mut d.legacy_networks),
    })
}

/// The holes in the wall (`rules`): each parsed, none on a port another
/// claims, none inside the guest's own network, `via-tunnel` only with a
/// tunnel, IPv6 only with `ipv6 = true`.
fn rules(
    d: &Draft,
    ctx: &Ctx,
    subnet: &ipnet::Ipv4Net,
    wireguard: Option<&Path>,
    ipv6: bool,
) -> Result<Vec<NetRule>, ConfigError> {
    let mut rules: Vec<NetRule> = Vec::new();
    let mut claimed: HashMap<(super::Proto, u16), &At<String>> = HashMap::new();
    for at in &d.rules {
        let rule = values::parse_rule(&at.value).map_err(|e| ctx.err_at(at, e))?;
        let inside = |addr: std::net::IpAddr| match addr {
            std::net::IpAddr::V4(v4) => subnet.contains(&v4),
            std::net::IpAddr::V6(v6) => super::Net6::standard().contains(v6),
        };
        match &rule {
            NetRule::AllowLanHost { addr, .. } if inside(*addr) => {
                return Err(ctx.err_at(
                    at,
                    format!(
                        "invalid rule {:?}: {addr} is inside the guest's own subnet {subnet}",
                        at.value
                    ),
                ));
            }
            NetRule::ForwardPort { target, .. } if inside(target.ip()) => {
                return Err(ctx.err_at(
                    at,
                    format!(
                        "invalid rule {:?}: {} is inside the guest's own subnet {subnet}",
                        at.value,
                        target.ip()
                    ),
                ));
            }
            _ => {}
        }
        // The guest sends IPv6 only with ipv6 = true; the tunnel carries
        // IPv4 only.
        if let NetRule::AllowLanHost {
            addr: std::net::IpAddr::V6(_),
            via_tunnel,
        } = rule
        {
            if !ipv6 {
                return Err(ctx.err_at(
                    at,
                    format!(
                        "invalid rule {:?}: an IPv6 LAN host needs `ipv6 = true` (the guest has no IPv6 otherwise)",
                        at.value
                    ),
                ));
            }
            if via_tunnel {
                return Err(ctx.err_at(
                    at,
                    format!(
                        "invalid rule {:?}: via-tunnel takes IPv4 hosts only in this version",
                        at.value
                    ),
                ));
            }
        }
        if let NetRule::ForwardPort {
            target: std::net::SocketAddr::V6(_),
            via_tunnel: true,
            ..
        } = rule
        {
            return Err(ctx.err_at(
                at,
                format!(
                    "invalid rule {:?}: via-tunnel takes IPv4 targets only in this version",
                    at.value
                ),
            ));
        }
        let via_tunnel = matches!(
            rule,
            NetRule::ForwardPort {
                via_tunnel: true,
                ..
            } | NetRule::AllowLanHost {
                via_tunnel: true,
                ..
            }
        );
        if via_tunnel && wireguard.is_none() {
            return Err(ctx.err_at(
                at,
                format!(
                    "invalid rule {:?}: via-tunnel needs a WireGuard config: {}",
                    at.value,
                    d.key(
                        "set network.wireguard or put a wireguard.conf beside the Migrantfile",
                        "put a wireguard.conf beside the Migrantfile",
                    ),
                ),
            ));
        }
        if let Some(endpoint) = values::rule_guest_port(&rule) {
            if let Some(first) = claimed.get(&endpoint) {
                return Err(ctx.err_at(
                    at,
                    format!(
                        "rule {:?} claims guest port {}/{} already claimed by {:?} (line {}); one rule per port",
                        at.value, endpoint.0, endpoint.1, first.value, first.line
                    ),
                ));
            }
            claimed.insert(endpoint, at);
        }
        rules.push(rule);
    }
    Ok(rules)
}

/// Shared folders: each inside the project, none overlapping, none on
/// what the host runs.
fn shares(d: &Draft, ctx: &Ctx) -> Result<Vec<Share>, ConfigError> {
    let default_share_size = match &d.share_default_size {
        Some(at) if at.value < MIN_DISK => {
            return Err(ctx.err_at(
                at,
                format!("{}: must be at least 1G", values::fmt_size(at.value)),
            ));
        }
        Some(at) => at.value,
        None => DEFAULT_SHARE_SIZE,
    };
    let project_real = real_path(&ctx.dir);
    let mut shares: Vec<Share> = Vec::new();
    let mut tags: HashMap<String, usize> = HashMap::new();
    let mut hosts: Vec<(PathBuf, usize)> = Vec::new();
    for s in &d.shares {
        let host = share_host(&ctx.dir, &s.host.value).map_err(|e| ctx.err_at(&s.host, e))?;
        if let Some((other, line)) = hosts
            .iter()
            .find(|(h, _)| h.starts_with(&host) || host.starts_with(h))
        {
            return Err(ctx.err_at(
                &s.host,
                format!(
                    "{} overlaps the share on line {line} ({}): one share's store would sit inside the other",
                    host.display(),
                    other.display()
                ),
            ));
        }
        hosts.push((host.clone(), s.host.line));
        let host_real = real_path(&host);
        if project_real.starts_with(&host_real) {
            return Err(ctx.err_at(
                &s.host,
                format!(
                    "{} is the project folder or contains it: the guest could rewrite the Migrantfile \
                     and the files beside it; share a subfolder instead",
                    host.display()
                ),
            ));
        }
        let tag = match &s.tag {
            Some(at) => {
                values::check_tag(&at.value).map_err(|e| ctx.err_at(at, e))?;
                at.value.clone()
            }
            None => {
                let base = host
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                values::check_tag(&base).map_err(|e| {
                    ctx.err(
                        s.host.line,
                        format!("{}.tag", s.at.field),
                        format!(
                            "no tag given and the folder name does not make one: {e}; set the tag"
                        ),
                    )
                })?;
                base
            }
        };
        if let Some(first_line) = tags.get(&tag) {
            return Err(ctx.err(
                s.tag.as_ref().map_or(s.at.line, |t| t.line),
                s.tag
                    .as_ref()
                    .map_or_else(|| format!("{}.tag", s.at.field), |t| t.field.clone()),
                format!("duplicate tag {tag:?}: already used by the share on line {first_line}"),
            ));
        }
        tags.insert(tag.clone(), s.at.line);
        let guest = match &s.guest {
            Some(at) => {
                check_guest_path(&at.value).map_err(|e| ctx.err_at(at, e))?;
                Some(at.value.clone())
            }
            None => None,
        };
        let size = match (&s.size, s.isolation) {
            (Some(at), false) => {
                return Err(ctx.err_at(
                    at,
                    format!(
                        "a size limit only applies to isolated shares, and {} is false: remove the size or enable isolation",
                        s.isolation_field
                    ),
                ));
            }
            (Some(at), true) if at.value < MIN_DISK => {
                return Err(ctx.err_at(
                    at,
                    format!("{}: must be at least 1G", values::fmt_size(at.value)),
                ));
            }
            (Some(at), true) => at.value,
            (None, true) => default_share_size,
            (None, false) => 0,
        };
        shares.push(Share {
            host,
            tag,
            guest,
            size,
            isolation: s.isolation,
        });
    }

    Ok(shares)
}

/// How the host reaches the guest: the SSH user and key, tunnel ports.
fn access(d: &Draft, ctx: &Ctx, image: &str) -> Result<(Ssh, Vec<u16>), ConfigError> {
    let file = ctx.dir.join("cloud-init.yml");
    let text = crate::userfile::read_to_string(&file, MAX_FILE).ok();
    let user = match &d.ssh_user {
        Some(at) => {
            values::check_user(&at.value).map_err(|e| ctx.err_at(at, e))?;
            at.value.clone()
        }
        // As the original: the user cloud-init.yml creates (checked like
        // one written in the Migrantfile; a name that is not a valid user
        // name is an error naming cloud-init.yml).
        None => {
            let user = super::guest_user::infer(text.as_deref(), image);
            values::check_user(&user)
                .map_err(|e| ctx.err(0, "ssh.user", format!("{}: users: {e}", file.display())))?;
            user
        }
    };
    let key = d.ssh_key.as_ref().map(|at| ctx.resolve(at)).transpose()?;

    let mut tunnel_ports: Vec<u16> = Vec::new();
    for at in &d.tunnel_ports {
        let port = u16::try_from(at.value)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                ctx.err_at(at, format!("port {} should be from 1 to 65535", at.value))
            })?;
        if tunnel_ports.contains(&port) {
            return Err(ctx.err_at(at, format!("port {port} is listed twice")));
        }
        tunnel_ports.push(port);
    }

    let ids = super::guest_user::ids(text.as_deref(), &user);
    Ok((Ssh { user, key, ids }, tunnel_ports))
}

fn min_size(v: &Option<At<u64>>, default: u64, min: u64, ctx: &Ctx) -> Result<u64, ConfigError> {
    match v {
        Some(at) if at.value < min => Err(ctx.err_at(
            at,
            format!(
                "{} is too small: at least {}",
                values::fmt_size(at.value),
                values::fmt_size(min)
            ),
        )),
        Some(at) => Ok(at.value),
        None => Ok(default),
    }
}

/// Local image paths become absolute; URLs and aliases stay as written.
fn resolve_image(at: &At<String>, ctx: &Ctx) -> Result<String, ConfigError> {
    let text = at.value.trim();
    if text.is_empty() {
        return Err(ctx.err_at(at, "the image is empty"));
    }
    if text.chars().any(char::is_control) {
        return Err(ctx.err_at(at, "the image contains control characters"));
    }
    let path_string = |p: PathBuf| {
        p.into_os_string()
            .into_string()
            .map_err(|_| ctx.err_at(at, "the resolved path is not valid UTF-8"))
    };
    match values::classify_image(text) {
        ImageRef::Url | ImageRef::Alias => Ok(text.to_string()),
        ImageRef::Path(p) => {
            path_string(ctx.resolve(&At::new(p.to_string(), at.line, &at.field))?)
        }
        ImageRef::FileUrl(p) => {
            let resolved = ctx.resolve(&At::new(p.to_string(), at.line, &at.field))?;
            Ok(format!("file://{}", path_string(resolved)?))
        }
    }
}

/// A guest mount point: absolute, not `/`, no `..`, no blanks or control
/// characters (it may end up in the guest's fstab).
fn check_guest_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("guest path {path:?} must be absolute"));
    }
    if path.trim_end_matches('/').is_empty() {
        return Err("the guest path cannot be \"/\"".to_string());
    }
    if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "guest path {path:?} must not contain blanks or control characters"
        ));
    }
    if path.split('/').any(|c| c == "..") {
        return Err(format!("guest path {path:?} must not contain \"..\""));
    }
    Ok(())
}
