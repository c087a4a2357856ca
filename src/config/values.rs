//! Value syntax shared by both Migrantfile formats: sizes, names, tags,
//! addresses, network rules, domain names. Pure functions; each returns a
//! message (without file/line) on error, the caller adds the location.

use super::{NetRule, Proto};
use std::net::Ipv4Addr;

pub(super) const KIB: u64 = 1024;
pub(super) const MIB: u64 = 1024 * KIB;
pub(super) const GIB: u64 = 1024 * MIB;
pub(super) const TIB: u64 = 1024 * GIB;

/// Guest ports answered by the gateway itself (DNS, DHCP server, DHCP
/// client); no rule may claim them.
pub(super) const RESERVED_GUEST_PORTS: [u16; 3] = [53, 67, 68];

/// Parse a size such as `512M`, `4G`, `4GiB`, `1T`, `2048KB`: a whole
/// number followed by a binary unit K, M, G or T (either case), optionally
/// followed by `B` or `iB`. Units are always powers of 1024.
pub(super) fn parse_size(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, rest) = s.split_at(digits_end);
    let hint = "expected a whole number with a unit K, M, G or T, like \"512M\" or \"4G\"";
    if digits.is_empty() {
        return Err(format!("invalid size {text:?}: {hint}"));
    }
    let unit = rest.trim_start();
    let mut chars = unit.chars();
    let factor = match chars.next().map(|c| c.to_ascii_uppercase()) {
        Some('K') => KIB,
        Some('M') => MIB,
        Some('G') => GIB,
        Some('T') => TIB,
        None => {
            return Err(format!(
                "invalid size {text:?}: the unit is missing; {hint}"
            ));
        }
        Some(_) => return Err(format!("invalid size {text:?}: unknown unit; {hint}")),
    };
    let suffix = chars.as_str();
    if !(suffix.is_empty() || suffix.eq_ignore_ascii_case("b") || suffix.eq_ignore_ascii_case("ib"))
    {
        return Err(format!("invalid size {text:?}: unknown unit; {hint}"));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid size {text:?}: number too large"))?;
    if n == 0 {
        return Err(format!("invalid size {text:?}: must not be zero"));
    }
    n.checked_mul(factor)
        .ok_or_else(|| format!("invalid size {text:?}: too large"))
}

/// Render a byte count for messages: the largest binary unit that divides it.
pub(super) fn fmt_size(bytes: u64) -> String {
    for (unit, f) in [("T", TIB), ("G", GIB), ("M", MIB), ("K", KIB)] {
        if bytes >= f && bytes.is_multiple_of(f) {
            return format!("{}{unit}", bytes / f);
        }
    }
    format!("{bytes} bytes")
}

/// Parse a whole decimal number (no sign, no spaces; leading zeros allowed).
pub(super) fn parse_decimal(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 19 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// VM names: `[A-Za-z0-9][A-Za-z0-9_.-]{0,62}`.
pub(super) fn check_name(name: &str) -> Result<(), String> {
    let mut bytes = name.bytes();
    let ok = match bytes.next() {
        Some(first) => {
            first.is_ascii_alphanumeric()
                && name.len() <= 63
                && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        }
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid name {name:?}: use 1-63 characters A-Z a-z 0-9 _ . -, starting with a letter or digit"
        ))
    }
}

/// Turn a folder name into a valid VM name: disallowed characters become
/// `-`, leading characters that cannot start a name are dropped, the result
/// is cut to 63 characters; `migrant` if nothing usable remains.
pub(super) fn sanitize_name(raw: &str) -> String {
    let mapped: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = mapped.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
    let cut: String = trimmed.chars().take(63).collect();
    if cut.is_empty() {
        "migrant".to_string()
    } else {
        cut
    }
}

/// Share tags: 1-36 characters `[A-Za-z0-9_-]` (QEMU/virtiofs mount tags).
pub(super) fn check_tag(tag: &str) -> Result<(), String> {
    if !tag.is_empty()
        && tag.len() <= 36
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
    {
        Ok(())
    } else {
        Err(format!(
            "invalid tag {tag:?}: use 1-36 characters A-Z a-z 0-9 _ -"
        ))
    }
}

/// Guest user names: `[a-z_][a-z0-9_-]*`, at most 32 characters.
pub(super) fn check_user(user: &str) -> Result<(), String> {
    let mut bytes = user.bytes();
    let ok = match bytes.next() {
        Some(first) => {
            (first.is_ascii_lowercase() || first == b'_')
                && user.len() <= 32
                && bytes
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        }
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid user name {user:?}: use up to 32 characters a-z 0-9 _ -, starting with a letter or _"
        ))
    }
}

/// A strict dotted quad; each part 1-3 decimal digits (leading zeros are
/// read as decimal, as the original tool did), at most 255.
pub(super) fn parse_ipv4(text: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = text.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 {
            return None;
        }
        *octet = u8::try_from(parse_decimal(part)?).ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Ipv4Addr::from(octets))
}

/// The guest subnet: `a.b.c.d/p` with `p` at most 24 (and at least 8), the
/// address being the network address of an RFC 1918 private range.
pub(super) fn parse_subnet(text: &str) -> Result<ipnet::Ipv4Net, String> {
    let hint = "expected a private IPv4 network like \"10.0.2.0/24\"";
    let Some((addr, prefix)) = text.split_once('/') else {
        return Err(format!(
            "invalid subnet {text:?}: the /prefix is missing; {hint}"
        ));
    };
    let addr = parse_ipv4(addr).ok_or_else(|| format!("invalid subnet {text:?}: {hint}"))?;
    let prefix = parse_decimal(prefix)
        .and_then(|p| u8::try_from(p).ok())
        .filter(|p| *p <= 32)
        .ok_or_else(|| format!("invalid subnet {text:?}: bad prefix length; {hint}"))?;
    if !(8..=24).contains(&prefix) {
        return Err(format!(
            "invalid subnet {text:?}: the prefix length must be between 8 and 24"
        ));
    }
    let net = ipnet::Ipv4Net::new(addr, prefix)
        .map_err(|e| format!("invalid subnet {text:?}: {e}; {hint}"))?;
    if net.addr() != net.network() {
        return Err(format!(
            "invalid subnet {text:?}: not a network address (did you mean \"{}\"?)",
            net.trunc()
        ));
    }
    if !addr.is_private() {
        return Err(format!(
            "invalid subnet {text:?}: must be inside a private range (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16)"
        ));
    }
    // is_private() holds for the address; the whole network must fit too.
    if !net.broadcast().is_private() {
        return Err(format!(
            "invalid subnet {text:?}: reaches outside the private ranges; use a longer prefix"
        ));
    }
    Ok(net)
}

fn parse_proto_port(spec: &str) -> Result<(Proto, u16), String> {
    let Some((proto, port)) = spec.split_once('/') else {
        return Err(format!("{spec:?} should be <tcp|udp>/<port>"));
    };
    let proto = match proto {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        _ => return Err(format!("protocol {proto:?} should be tcp or udp")),
    };
    Ok((proto, parse_port(port)?))
}

/// A port number 1-65535 (leading zeros allowed).
pub(super) fn parse_port(text: &str) -> Result<u16, String> {
    match parse_decimal(text).and_then(|p| u16::try_from(p).ok()) {
        Some(p) if p != 0 => Ok(p),
        _ => Err(format!("port {text:?} should be a number from 1 to 65535")),
    }
}

/// An address a rule may point at: unicast and routable by the host; not
/// loopback, "this network", broadcast, multicast or reserved.
fn check_rule_target(addr: std::net::IpAddr) -> Result<(), String> {
    let routable = match addr {
        std::net::IpAddr::V4(v4) => {
            let first = v4.octets()[0];
            !(v4.is_loopback() || first == 0 || v4.is_broadcast() || first >= 224)
        }
        // Link-local addresses need an interface, which a rule cannot name.
        std::net::IpAddr::V6(v6) => {
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || v6.is_unicast_link_local()
                || v6.to_ipv4_mapped().is_some())
        }
    };
    if !routable {
        return Err(format!(
            "{addr} is not a unicast address the host can route to (loopback, 0.x, multicast, broadcast, link-local, IPv4-mapped and reserved addresses are refused)"
        ));
    }
    Ok(())
}

/// A rule's address: numeric IPv4 (as the original writes it, leading
/// zeros allowed) or IPv6.
fn parse_rule_addr(text: &str) -> Option<std::net::IpAddr> {
    match parse_ipv4(text) {
        Some(v4) => Some(v4.into()),
        None => text.parse::<std::net::Ipv6Addr>().ok().map(Into::into),
    }
}

/// A rule's optional trailing modifier: nothing, or `via-tunnel`.
fn via_tunnel(rest: &[&str]) -> Result<bool, String> {
    match rest {
        [] => Ok(false),
        ["via-tunnel"] => Ok(true),
        [other, ..] => Err(format!(
            "unknown modifier {other:?}; the only one is via-tunnel"
        )),
    }
}

const RULE_FORMS: &str = "expected one of: allow-host-port <tcp|udp>/<port>; allow-lan-host <ipv4|ipv6> [via-tunnel]; forward-port <tcp|udp>/<guest-port> <ipv4>:<port>|[<ipv6>]:<port> [via-tunnel]";

/// Parse one network rule (the original's `HOST_ACCESS` directive syntax).
/// Checks syntax, port ranges, reserved guest ports and target addresses;
/// checks needing the whole configuration (guest subnet, duplicates,
/// WireGuard) are done by the caller.
pub(super) fn parse_rule(text: &str) -> Result<NetRule, String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let bad = |why: String| Err(format!("invalid rule {text:?}: {why}"));
    let rule = match words.as_slice() {
        ["allow-host-port", spec] => match parse_proto_port(spec) {
            Ok((proto, port)) => NetRule::AllowHostPort { proto, port },
            Err(e) => return bad(e),
        },
        ["allow-host-port", ..] => {
            return bad("expected allow-host-port <tcp|udp>/<port>".into());
        }
        ["allow-lan-host", addr, rest @ ..] if rest.len() <= 1 => {
            let Some(addr) = parse_rule_addr(addr) else {
                return bad(format!("{addr:?} is not a numeric IPv4 or IPv6 address"));
            };
            if let Err(e) = check_rule_target(addr) {
                return bad(e);
            }
            let via_tunnel = match via_tunnel(rest) {
                Ok(v) => v,
                Err(e) => return bad(e),
            };
            NetRule::AllowLanHost { addr, via_tunnel }
        }
        ["allow-lan-host", ..] => {
            return bad("expected allow-lan-host <ipv4|ipv6> [via-tunnel]".into());
        }
        ["forward-port", spec, target, rest @ ..] if rest.len() <= 1 => {
            let (proto, guest_port) = match parse_proto_port(spec) {
                Ok(v) => v,
                Err(e) => return bad(e),
            };
            let Some((ip, port)) = target.rsplit_once(':') else {
                return bad(format!(
                    "target {target:?} should be <ipv4>:<port> or [<ipv6>]:<port>"
                ));
            };
            let ip = match ip.strip_prefix('[').and_then(|i| i.strip_suffix(']')) {
                Some(v6) => v6
                    .parse::<std::net::Ipv6Addr>()
                    .ok()
                    .map(std::net::IpAddr::V6),
                None => parse_ipv4(ip).map(std::net::IpAddr::V4),
            };
            let Some(ip) = ip else {
                return bad(format!(
                    "target {target:?} should be <ipv4>:<port> or [<ipv6>]:<port>"
                ));
            };
            if let Err(e) = check_rule_target(ip) {
                return bad(e);
            }
            let port = match parse_port(port) {
                Ok(p) => p,
                Err(e) => return bad(e),
            };
            let via_tunnel = match via_tunnel(rest) {
                Ok(v) => v,
                Err(e) => return bad(e),
            };
            NetRule::ForwardPort {
                proto,
                guest_port,
                target: std::net::SocketAddr::new(ip, port),
                via_tunnel,
            }
        }
        ["forward-port", ..] => {
            return bad(
                "expected forward-port <tcp|udp>/<guest-port> <ipv4>:<port>|[<ipv6>]:<port> [via-tunnel]"
                    .into(),
            );
        }
        _ => return bad(RULE_FORMS.into()),
    };
    if let Some((proto, port)) = rule_guest_port(&rule)
        && RESERVED_GUEST_PORTS.contains(&port)
    {
        return bad(format!(
            "guest port {}/{port} is reserved: the gateway answers DNS and DHCP on ports 53, 67 and 68",
            proto_name(proto)
        ));
    }
    Ok(rule)
}

/// The gateway port a rule makes the guest use, if any.
pub(super) fn rule_guest_port(rule: &NetRule) -> Option<(Proto, u16)> {
    match *rule {
        NetRule::AllowHostPort { proto, port } => Some((proto, port)),
        NetRule::ForwardPort {
            proto, guest_port, ..
        } => Some((proto, guest_port)),
        NetRule::AllowLanHost { .. } => None,
    }
}

/// `tcp` or `udp`.
pub(super) fn proto_name(proto: Proto) -> &'static str {
    match proto {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    }
}

/// A domain name for `allow_domains`: letters, digits and hyphens in labels
/// of 1-63 characters, at least two labels, at most 253 characters, the
/// last label not numeric; `*.` may prefix it to include every subdomain.
/// Returned in lower case.
pub(super) fn check_domain(text: &str) -> Result<String, String> {
    let bad = |why: &str| Err(format!("invalid domain {text:?}: {why}"));
    let name = text.strip_prefix("*.").unwrap_or(text);
    if name.is_empty() {
        return bad("empty name");
    }
    if name.len() > 253 {
        return bad("longer than 253 characters");
    }
    if name.contains('*') {
        return bad("a wildcard is only allowed as a leading \"*.\"");
    }
    let labels: Vec<&str> = name.split('.').collect();
    if labels.len() < 2 {
        return bad("needs at least two labels, like \"example.com\"");
    }
    for label in &labels {
        if label.is_empty() || label.len() > 63 {
            return bad("each dot-separated label must have 1-63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return bad("only letters, digits, '-' and '.' are allowed");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("a label may not start or end with '-'");
        }
    }
    if labels
        .last()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return bad("looks like an IP address; use an allow-lan-host rule for addresses");
    }
    Ok(text.to_ascii_lowercase())
}

/// File extensions that make a bare `image` value a file name rather than
/// an alias.
const IMAGE_EXTENSIONS: [&str; 10] = [
    "qcow2", "qcow", "img", "raw", "iso", "vmdk", "vdi", "vhd", "vhdx", "xz",
];

/// How an `image` value is to be read.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ImageRef<'a> {
    /// `scheme://...` other than `file://`: kept as written.
    Url,
    /// `file://<path>`: the path part.
    FileUrl(&'a str),
    /// A local path.
    Path(&'a str),
    /// A bare word naming a known image (resolved by the image module).
    Alias,
}

/// Classify an `image` value. A local path is anything absolute, starting
/// with `~/` or `.`, containing a `/`, or ending in a disk-image extension
/// (`.qcow2`, `.img`, `.raw`, ...); a bare word otherwise is an alias
/// (`debian-12`, `ubuntu-24.04`).
pub(super) fn classify_image(image: &str) -> ImageRef<'_> {
    if let Some(path) = image.strip_prefix("file://") {
        return ImageRef::FileUrl(path);
    }
    if let Some((scheme, _)) = image.split_once("://")
        && !scheme.is_empty()
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
    {
        return ImageRef::Url;
    }
    let has_image_ext = image
        .rsplit_once('.')
        .is_some_and(|(_, ext)| IMAGE_EXTENSIONS.iter().any(|e| ext.eq_ignore_ascii_case(e)));
    if image.contains('/') || image.starts_with('.') || image.starts_with('~') || has_image_ext {
        ImageRef::Path(image)
    } else {
        ImageRef::Alias
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 * MIB));
        assert_eq!(parse_size("4G"), Ok(4 * GIB));
        assert_eq!(parse_size("4GiB"), Ok(4 * GIB));
        assert_eq!(parse_size("4gb"), Ok(4 * GIB));
        assert_eq!(parse_size("1T"), Ok(TIB));
        assert_eq!(parse_size("2048K"), Ok(2 * MIB));
        assert_eq!(parse_size(" 2 G "), Ok(2 * GIB));
        for bad in [
            "",
            "4",
            "4X",
            "0G",
            "G",
            "-1G",
            "1.5G",
            "4GiBs",
            "99999999999999999999G",
            "20000000T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(fmt_size(128 * MIB), "128M");
        assert_eq!(fmt_size(3 * GIB), "3G");
    }

    #[test]
    fn names_and_tags() {
        assert!(check_name("web-1.dev_x").is_ok());
        assert!(check_name(&"a".repeat(63)).is_ok());
        for bad in ["", "-x", ".x", "a b", "a/b", &"a".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(sanitize_name("My Project!"), "My-Project-");
        assert_eq!(sanitize_name("..hidden"), "hidden");
        assert_eq!(sanitize_name("日本"), "migrant");
        assert!(check_tag("workspace_1-a").is_ok());
        assert!(check_tag(&"t".repeat(37)).is_err());
        assert!(check_tag("a.b").is_err());
        assert!(check_user("migrant").is_ok());
        assert!(check_user("Root").is_err());
    }

    #[test]
    fn subnets() {
        assert_eq!(
            parse_subnet("10.0.2.0/24"),
            Ok(ipnet::Ipv4Net::new_assert(Ipv4Addr::new(10, 0, 2, 0), 24))
        );
        assert_eq!(
            parse_subnet("172.16.0.0/16"),
            Ok(ipnet::Ipv4Net::new_assert(Ipv4Addr::new(172, 16, 0, 0), 16))
        );
        for bad in [
            "10.0.2.0",
            "10.0.2.1/24",
            "10.0.2.0/25",
            "8.8.8.0/24",
            "10.0.2.0/x",
            "10.0.2/24",
            "192.0.0.0/7",
        ] {
            assert!(parse_subnet(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn rules() {
        assert_eq!(
            parse_rule("allow-host-port tcp/8080"),
            Ok(NetRule::AllowHostPort {
                proto: Proto::Tcp,
                port: 8080
            })
        );
        assert_eq!(
            parse_rule("  allow-lan-host   192.168.001.50 "),
            Ok(NetRule::AllowLanHost {
                addr: Ipv4Addr::new(192, 168, 1, 50).into(),
                via_tunnel: false
            })
        );
        assert_eq!(
            parse_rule("forward-port udp/11434 100.64.0.6:443 via-tunnel"),
            Ok(NetRule::ForwardPort {
                proto: Proto::Udp,
                guest_port: 11434,
                target: std::net::SocketAddrV4::new(Ipv4Addr::new(100, 64, 0, 6), 443).into(),
                via_tunnel: true,
            })
        );
        assert_eq!(
            parse_rule("allow-lan-host fd12::5"),
            Ok(NetRule::AllowLanHost {
                addr: "fd12::5".parse().unwrap_or_else(|e| panic!("{e}")),
                via_tunnel: false
            })
        );
        assert_eq!(
            parse_rule("forward-port tcp/8081 [fd12::5]:80"),
            Ok(NetRule::ForwardPort {
                proto: Proto::Tcp,
                guest_port: 8081,
                target: "[fd12::5]:80".parse().unwrap_or_else(|e| panic!("{e}")),
                via_tunnel: false,
            })
        );
        for bad in [
            "",
            "allow-host-port",
            "allow-host-port 8080",
            "allow-host-port sctp/80",
            "allow-host-port tcp/0",
            "allow-host-port tcp/65536",
            "allow-host-port tcp/80 extra",
            "allow-host-port udp/53",
            "allow-lan-host example.com",
            "allow-lan-host 127.0.0.1",
            "allow-lan-host 224.0.0.1",
            "forward-port tcp/67 10.0.0.5:80",
            "forward-port tcp/68 10.0.0.5:80",
            "forward-port tcp/8080 10.0.0.5",
            "forward-port tcp/8080 10.0.0.5:80 via-vpn",
            "forward-port tcp/8080 255.255.255.255:80",
            "allow-lan-host ::1",
            "allow-lan-host fe80::1",
            "allow-lan-host ff02::1",
            "allow-lan-host ::ffff:192.168.1.5",
            "forward-port tcp/8080 fd12::5:80",
            "forward-port tcp/8080 [fd12::5]",
            "forward-port tcp/8080 [::1]:80",
            "allow-everything",
        ] {
            assert!(parse_rule(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn domains() {
        assert_eq!(check_domain("Example.COM"), Ok("example.com".into()));
        assert_eq!(check_domain("*.pypi.org"), Ok("*.pypi.org".into()));
        for bad in [
            "",
            "*.",
            "com",
            "a..b",
            "-a.com",
            "a_b.com",
            "foo.*.com",
            "1.2.3.4",
            "http://x.com",
        ] {
            assert!(check_domain(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn images() {
        assert_eq!(classify_image("https://x/y.qcow2"), ImageRef::Url);
        assert_eq!(
            classify_image("file://a.qcow2"),
            ImageRef::FileUrl("a.qcow2")
        );
        assert_eq!(classify_image("debian-12"), ImageRef::Alias);
        assert_eq!(classify_image("ubuntu-24.04"), ImageRef::Alias);
        assert_eq!(classify_image("disk.qcow2"), ImageRef::Path("disk.qcow2"));
        assert_eq!(classify_image("images/base"), ImageRef::Path("images/base"));
        assert_eq!(classify_image("/abs/base"), ImageRef::Path("/abs/base"));
    }
}
