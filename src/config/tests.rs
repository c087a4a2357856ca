//! Reader tests: good files of both formats, the fixtures under
//! `tests/fixtures/config/`, and malformed files with the exact place
//! each error names.

use super::draft::{At, Ctx};
use super::parse;
use super::values::{GIB, MIB};
use super::*;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};

const HOME: &str = "/home/tester";

fn home() -> Option<PathBuf> {
    Some(PathBuf::from(HOME))
}

/// A project folder holding `content` as its Migrantfile.
fn project(content: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("proj-")
        .tempdir()
        .unwrap_or_else(|e| panic!("tempdir: {e}"));
    std::fs::write(dir.path().join(FILE_NAME), content).unwrap_or_else(|e| panic!("write: {e}"));
    dir
}

fn load_in(dir: &Path) -> Result<Config, ConfigError> {
    parse::load(dir, home())
}

fn good(content: &str) -> (tempfile::TempDir, Config) {
    let dir = project(content);
    match load_in(dir.path()) {
        Ok(c) => (dir, c),
        Err(e) => panic!("unexpected error: {e}\n--- file:\n{content}"),
    }
}

/// Load `content` expecting an error at `line` about `field` whose
/// message contains `needle`; checks the rendering and exit code too.
#[track_caller]
fn bad(content: &str, line: usize, field: &str, needle: &str) {
    let dir = project(content);
    bad_in(dir.path(), content, line, field, needle);
}

#[track_caller]
fn bad_in(dir: &Path, content: &str, line: usize, field: &str, needle: &str) {
    let err = match load_in(dir) {
        Ok(c) => panic!("accepted:\n{content}\n--- gave {c:#?}"),
        Err(e) => e,
    };
    assert_eq!(err.exit_code(), 78, "{err}");
    let rendered = err.to_string();
    let ConfigError::Invalid {
        file,
        line: got_line,
        field: got_field,
        message,
    } = &err
    else {
        panic!("not an Invalid error: {err:?}");
    };
    assert!(file.ends_with(FILE_NAME), "{rendered}");
    assert_eq!((*got_line, got_field.as_str()), (line, field), "{rendered}");
    assert!(message.contains(needle), "{rendered}\n  lacks {needle:?}");
    let place = if line > 0 {
        format!("{FILE_NAME}:{line}: {field}: ")
    } else {
        format!("{FILE_NAME}: {field}: ")
    };
    assert!(rendered.contains(&place), "{rendered}\n  lacks {place:?}");
    assert!(rendered.starts_with(&dir.display().to_string()) || rendered.starts_with('/'));
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(name)
}

// ---------------------------------------------------------------- detection

#[test]
fn detects_format() {
    assert_eq!(Format::detect("image = \"x\"\n"), Ok(Format::Toml));
    assert_eq!(Format::detect("# only a comment\n\n"), Ok(Format::Toml));
    assert_eq!(
        Format::detect("[network]\negress=\"none\"\n"),
        Ok(Format::Toml)
    );
    assert_eq!(Format::detect("# c\nVM_NAME=\"x\"\n"), Ok(Format::Legacy));
    assert_eq!(Format::detect("export RAM_MB=1\n"), Ok(Format::Legacy));
    assert_eq!(
        Format::detect("HOST_ACCESS=(\n  \"allow-lan-host 1.2.3.4\"  # c\n)\n"),
        Ok(Format::Legacy)
    );
    // Lower-case assignments alone are valid TOML.
    assert_eq!(Format::detect("image=\"x\"\n"), Ok(Format::Toml));
    assert_eq!(Format::detect("VM_NAME=x\n\ncpus = 2\n"), Err((1, 3)));
    assert_eq!(Format::detect("[ssh]\nRAM_MB=2\n"), Err((2, 1)));
}

#[test]
fn mixed_formats_are_refused() {
    bad(
        "VM_NAME=\"x\"\nimage = \"debian-12\"\n",
        2,
        "format",
        "mixes shell-style assignments (line 1) with TOML syntax (line 2)",
    );
}

// ---------------------------------------------------------------- TOML, good

#[test]
fn toml_minimal_uses_defaults() {
    let parent = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let dir = parent.path().join("My Project!");
    std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.join(FILE_NAME), "image = \"debian-12\"\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let c = load_in(&dir).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.name, "My-Project-");
    assert_eq!(c.file, dir.join(FILE_NAME));
    assert_eq!(c.dir, dir);
    assert_eq!(c.image, "debian-12");
    assert_eq!(c.cpus, 2);
    assert_eq!(c.memory, 2 * GIB);
    assert_eq!(c.disk, 20 * GIB);
    assert_eq!(c.firmware, Firmware::Bios);
    assert_eq!(c.accel, Accel::Auto);
    assert_eq!(c.halt_timeout, 60);
    assert!(c.shares.is_empty());
    assert_eq!(c.network.egress, Egress::Direct);
    assert_eq!(c.network.subnet.to_string(), "10.0.2.0/24");
    assert!(c.network.rules.is_empty() && c.network.allow_domains.is_empty());
    assert_eq!(c.network.wireguard, None);
    assert!(!c.network.ipv6);
    // No cloud-init.yml naming a user: the Debian image's own.
    assert_eq!(
        c.ssh,
        Ssh {
            user: "debian".into(),
            key: None,
            ids: (1000, 1000)
        }
    );
    assert_eq!(c.autoconnect, Autoconnect::None);
    assert!(c.tunnel_ports.is_empty());
    assert!(c.wait_cloud_init);
    assert_eq!(c.format, Format::Toml);
    assert!(c.warnings.is_empty());
    assert_eq!(c.guest_ip(), Ipv4Addr::new(10, 0, 2, 15));
    assert_eq!(c.gateway_ip(), Ipv4Addr::new(10, 0, 2, 2));
}

#[test]
fn toml_full_fixture() {
    let dir = fixture("toml-full");
    let c = load_in(&dir).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.name, "full.example");
    assert_eq!(c.image, dir.join("images/base.qcow2").to_string_lossy());
    assert_eq!((c.cpus, c.memory, c.disk), (8, 6 * GIB, 40 * GIB));
    assert_eq!((c.firmware, c.accel), (Firmware::Uefi, Accel::Kvm));
    assert_eq!(c.halt_timeout, 30);
    assert_eq!(c.autoconnect, Autoconnect::Console);
    assert_eq!(c.tunnel_ports, vec![3000, 8080]);
    assert!(!c.wait_cloud_init);
    assert_eq!(
        c.shares,
        vec![
            Share {
                host: dir.join("src"),
                tag: "src".into(),
                guest: Some("/home/dev/src".into()),
                size: 10 * GIB,
                isolation: true,
            },
            Share {
                host: dir.join("data"),
                tag: "data".into(),
                guest: None,
                size: 0,
                isolation: false,
            },
        ]
    );
    let n = &c.network;
    assert_eq!(n.egress, Egress::None);
    assert_eq!(n.subnet.to_string(), "192.168.77.0/24");
    assert_eq!(c.guest_ip(), Ipv4Addr::new(192, 168, 77, 15));
    assert_eq!(
        n.rules,
        vec![
            NetRule::AllowHostPort {
                proto: Proto::Tcp,
                port: 8080
            },
            NetRule::AllowLanHost {
                addr: Ipv4Addr::new(192, 168, 1, 50).into(),
                via_tunnel: false
            },
            NetRule::ForwardPort {
                proto: Proto::Tcp,
                guest_port: 11434,
                target: SocketAddrV4::new(Ipv4Addr::new(100, 64, 0, 6), 11434).into(),
                via_tunnel: true,
            },
        ]
    );
    assert_eq!(n.allow_domains, vec!["deb.debian.org", "*.pypi.org"]);
    assert_eq!(n.wireguard, Some(dir.join("wg0.conf")));
    assert!(n.legacy_networks.is_empty());
    assert_eq!(c.ssh.user, "dev");
    assert_eq!(c.ssh.key, Some(PathBuf::from(HOME).join(".ssh/dev_key")));
}

#[test]
fn init_migrantfile_parses() {
    let (dir, c) = good(INIT_MIGRANTFILE);
    // Debian's stable release.
    assert_eq!(c.image, "debian-13");
    assert_eq!(c.ssh.user, DEFAULT_SSH_USER);
    assert_eq!((c.cpus, c.memory, c.disk), (2, 2 * GIB, 20 * GIB));
    assert!(c.name.starts_with("proj-"), "{}", c.name);
    assert!(c.shares.is_empty());
    // Uncommenting the share and secret examples must give a valid file
    // too.
    let uncommented = INIT_MIGRANTFILE
        .lines()
        .map(|l| {
            if l.starts_with("#[[share]]")
                || l.starts_with("#host")
                || l.starts_with("#tag")
                || l.starts_with("#guest")
                || l.starts_with("#size")
                || l.starts_with("#isolation")
                || l.starts_with("#[secrets.")
                || l.starts_with("#from")
            {
                &l[1..]
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.path().join(FILE_NAME), uncommented).unwrap_or_else(|e| panic!("{e}"));
    let c = load_in(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.shares.len(), 1);
    assert_eq!(c.shares[0].tag, "workspace");
    assert_eq!(c.secrets.len(), 1);
    assert_eq!(c.secrets[0].hosts, ["api.github.com"]);
    assert!(INIT_CLOUD_INIT.starts_with("#cloud-config\n"));
    assert!(INIT_CLOUD_INIT.contains(PUBKEY_PLACEHOLDER));
    assert!(INIT_CLOUD_INIT.contains("name: migrant"));
    assert!(INIT_CLOUD_INIT.contains("NOPASSWD:ALL"));
    assert!(INIT_CLOUD_INIT.contains("shell: /bin/bash"));
}

#[test]
fn toml_image_forms() {
    for (image, expect) in [
        ("debian-12", "debian-12".to_string()),
        ("ubuntu-24.04", "ubuntu-24.04".to_string()),
        (
            "https://example.org/x.qcow2",
            "https://example.org/x.qcow2".to_string(),
        ),
        ("/var/images/x.qcow2", "/var/images/x.qcow2".to_string()),
        ("~/images/x.qcow2", format!("{HOME}/images/x.qcow2")),
    ] {
        let (_d, c) = good(&format!("image = {image:?}\n"));
        assert_eq!(c.image, expect);
    }
    let (d, c) = good("image = \"sub/../base.qcow2\"\n");
    assert_eq!(c.image, d.path().join("base.qcow2").to_string_lossy());
    let (d, c) = good("image = \"file://img/base.qcow2\"\n");
    assert_eq!(
        c.image,
        format!("file://{}", d.path().join("img/base.qcow2").display())
    );
    let (_d, c) = good("image = \"file:///abs/base.qcow2\"\n");
    assert_eq!(c.image, "file:///abs/base.qcow2");
}

#[test]
fn toml_wireguard_beside_the_file_is_found() {
    let dir = project(
        "image = \"x.qcow2\"\n[network]\nrules = [\"forward-port udp/5000 10.9.0.1:5000 via-tunnel\"]\n",
    );
    std::fs::write(dir.path().join("wireguard.conf"), "[Interface]\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let c = load_in(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.network.wireguard, Some(dir.path().join("wireguard.conf")));
}

#[test]
fn netrule_display_round_trips() {
    for text in [
        "allow-host-port udp/5353",
        "allow-lan-host 192.168.1.50",
        "forward-port tcp/8081 10.0.0.5:80",
        "forward-port tcp/8081 10.0.0.5:80 via-tunnel",
    ] {
        let rule = values::parse_rule(text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(rule.to_string(), text);
    }
}

// ---------------------------------------------------------------- legacy, good

#[test]
fn legacy_debian_fixture() {
    let dir = fixture("legacy-debian");
    let c = load_in(&dir).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.format, Format::Legacy);
    assert_eq!(c.name, "debian-agent");
    assert_eq!(
        c.image,
        "https://cloud.debian.org/images/cloud/trixie/latest/debian-13-generic-amd64.qcow2"
    );
    assert_eq!((c.cpus, c.memory, c.disk), (2, 4096 * MIB, 20 * GIB));
    assert_eq!(
        c.shares,
        vec![Share {
            host: dir.join("workspace"),
            tag: "workspace".into(),
            guest: None,
            size: 10 * GIB,
            isolation: true,
        }]
    );
    assert_eq!(c.firmware, Firmware::Uefi);
    assert_eq!(c.network.egress, Egress::Direct);
    assert!(!c.network.ipv6);
    assert!(c.network.rules.is_empty());
    assert_eq!(c.network.legacy_networks, vec!["network=migrant"]);
    assert_eq!(c.autoconnect, Autoconnect::Ssh);
    assert!(c.tunnel_ports.is_empty());
    assert!(c.wait_cloud_init);
    assert_eq!(
        c.ssh,
        Ssh {
            user: "migrant".into(),
            key: None,
            ids: (1000, 1000)
        }
    );
    assert_eq!(c.halt_timeout, 60);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

#[test]
fn legacy_rules_fixture() {
    let dir = fixture("legacy-rules");
    let c = load_in(&dir).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.name, "rules-test");
    assert_eq!(
        c.image,
        format!("file://{}", dir.join("images/base.qcow2").display())
    );
    assert_eq!((c.cpus, c.memory, c.disk), (4, 2 * GIB, 10 * GIB));
    let shares: Vec<_> = c
        .shares
        .iter()
        .map(|s| (s.host.clone(), s.tag.as_str(), s.size))
        .collect();
    assert_eq!(
        shares,
        vec![
            (dir.join("workspace"), "work", 5 * GIB),
            (dir.join("data"), "data", 25 * GIB),
            (dir.join("cache"), "cache", 5 * GIB),
        ]
    );
    assert_eq!(c.network.egress, Egress::Open);
    // NETWORK_IPV6=nat: IPv6 egress, as in the original.
    assert!(c.network.ipv6);
    assert_eq!(
        c.network.rules,
        vec![
            NetRule::AllowHostPort {
                proto: Proto::Tcp,
                port: 9999
            },
            NetRule::AllowHostPort {
                proto: Proto::Udp,
                port: 5353
            },
            NetRule::AllowLanHost {
                addr: Ipv4Addr::new(192, 168, 1, 50).into(),
                via_tunnel: false
            },
            NetRule::ForwardPort {
                proto: Proto::Tcp,
                guest_port: 8081,
                target: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 5), 80).into(),
                via_tunnel: false,
            },
        ]
    );
    assert_eq!(
        c.network.legacy_networks,
        vec!["network=migrant", "network=default"]
    );
    assert_eq!(c.tunnel_ports, vec![3000, 5432, 6379]);
    assert_eq!(c.ssh.key, Some(PathBuf::from(HOME).join(".ssh/rules_key")));
    assert!(!c.wait_cloud_init);
    assert_eq!(c.autoconnect, Autoconnect::None);
    assert_eq!(c.firmware, Firmware::Bios);
    assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
    assert!(c.warnings[0].contains("NETWORKS is recorded but not used"));
    assert!(!c.warnings.iter().any(|w| w.contains("NETWORK_IPV6")));
    assert!(
        c.warnings
            .iter()
            .any(|w| w.contains("HOST_ACCESS had no effect"))
    );
}

#[test]
fn legacy_tunnel_fixture() {
    let dir = fixture("legacy-tunnel");
    let c = load_in(&dir).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.image, dir.join("images/base.qcow2").to_string_lossy());
    assert_eq!(c.network.wireguard, Some(dir.join("wireguard.conf")));
    assert_eq!(
        c.network.rules,
        vec![NetRule::ForwardPort {
            proto: Proto::Tcp,
            guest_port: 11434,
            target: SocketAddrV4::new(Ipv4Addr::new(100, 64, 0, 6), 11434).into(),
            via_tunnel: true,
        }]
    );
}

#[test]
fn legacy_nixos_fixture_is_refused_at_the_substitution() {
    let dir = fixture("legacy-nixos");
    let text = std::fs::read_to_string(dir.join(FILE_NAME)).unwrap_or_else(|e| panic!("{e}"));
    bad_in(&dir, &text, 10, "IMAGE_URL", "command substitution");
}

#[test]
fn legacy_quoting_and_expansions() {
    let (d, c) = good(concat!(
        "VM_NAME=a\"b\"'c'\\-d   # glued words\n",
        "IMAGE_URL=\"$HOME/img/\\$x \\\"q\\\" \\\\ \\n.qcow2\"\n",
        "SSH_KEY_PATH='$HOME/literal'\n",
        "SHARED_FOLDERS=(work:work \"${VM_DIR}/data:data\" 'a b:ab')\n",
        "HOST_ACCESS=(\n",
        "  # a comment line inside the array\n",
        "  \"allow-host-port tcp/80\" # after an element\n",
        "\n",
        "  allow-lan-host\\ 10.1.2.3\n",
        ")\n",
        "TUNNEL_PORTS=8080\n",
        "VCPUS=1\n",
        "VCPUS=3  # the last assignment wins\n",
        "AUTOCONNECT=\"console\"\n",
        "CLOUD_INIT_WAIT=\n",
        "RAM_MB=0512\n",
    ));
    assert_eq!(c.name, "abc-d");
    assert_eq!(c.image, format!("{HOME}/img/$x \"q\" \\ \\n.qcow2"));
    assert_eq!(c.ssh.key, Some(d.path().join("$HOME/literal")));
    let shares: Vec<_> = c
        .shares
        .iter()
        .map(|s| (s.host.clone(), s.tag.clone()))
        .collect();
    assert_eq!(
        shares,
        vec![
            (d.path().join("work"), "work".to_string()),
            (d.path().join("data"), "data".to_string()),
            (d.path().join("a b"), "ab".to_string()),
        ]
    );
    assert_eq!(
        c.network.rules,
        vec![
            NetRule::AllowHostPort {
                proto: Proto::Tcp,
                port: 80
            },
            NetRule::AllowLanHost {
                addr: Ipv4Addr::new(10, 1, 2, 3).into(),
                via_tunnel: false
            },
        ]
    );
    assert_eq!(c.tunnel_ports, vec![8080]);
    assert_eq!(c.cpus, 3);
    assert_eq!(c.memory, 512 * MIB);
    assert_eq!(c.autoconnect, Autoconnect::Console);
    assert!(c.wait_cloud_init);
    assert_eq!(c.name, "abc-d");
}

#[test]
fn legacy_multiline_string() {
    let (_d, c) = good(&format!(
        "{L}HOST_ACCESS=(\"allow-host-port\n  tcp/80\")\nVCPUS=3\n"
    ));
    assert_eq!(
        c.network.rules,
        vec![NetRule::AllowHostPort {
            proto: Proto::Tcp,
            port: 80
        }]
    );
    assert_eq!(c.cpus, 3);
}

#[test]
fn home_expansion_needs_a_home() {
    let dir = project("IMAGE_URL=\"$HOME/x.qcow2\"\n");
    let err = parse::load(dir.path(), None)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains(":1: IMAGE_URL: cannot expand the home folder"),
        "{err}"
    );
    let ctx = Ctx::new(dir.path(), None);
    let err = ctx
        .resolve(&At::new("~/k".to_string(), 3, "ssh.key"))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains(":3: ssh.key: cannot expand"), "{err}");
}

// ---------------------------------------------------------------- TOML, bad

const IMG: &str = "image = \"debian-12\"\n";

#[test]
fn toml_unknown_keys() {
    bad(
        &format!("{IMG}colour = \"red\"\n"),
        2,
        "colour",
        "unknown field `colour`",
    );
    bad(
        &format!("{IMG}[network]\nfoo = 1\n"),
        3,
        "network.foo",
        "unknown field `foo`",
    );
    bad(
        &format!("{IMG}[[share]]\nhost = \"a\"\nmode = \"rw\"\n"),
        4,
        "share[0].mode",
        "unknown field `mode`",
    );
    bad(&format!("{IMG}[vm]\n"), 2, "vm", "unknown field `vm`");
}

#[test]
fn toml_wrong_types() {
    bad(
        &format!("{IMG}cpus = \"two\"\n"),
        2,
        "cpus",
        "invalid type: string \"two\"",
    );
    bad(
        &format!("{IMG}memory = 4096\n"),
        2,
        "memory",
        "sizes are strings with a unit",
    );
    bad(
        &format!("{IMG}[network]\nipv6 = \"yes\"\n"),
        3,
        "network.ipv6",
        "expected a boolean",
    );
    bad(
        &format!("{IMG}[network]\nrules = [\"allow-host-port tcp/1\", 3]\n"),
        3,
        "network.rules[1]",
        "invalid type: integer",
    );
    bad(
        &format!("{IMG}[share]\nhost = \"a\"\n"),
        2,
        "share",
        "write [[share]]",
    );
    bad(
        &format!("{IMG}tunnel_ports = [70000]\n"),
        2,
        "tunnel_ports[0]",
        "should be from 1 to 65535",
    );
}

#[test]
fn toml_syntax_errors() {
    bad(&format!("{IMG}cpus = \n"), 2, "cpus", "");
    bad(
        &format!("{IMG}image = \"y\"\n"),
        2,
        "image",
        "duplicate key",
    );
    bad("image = \"unterminated\n", 1, "image", "");
}

#[test]
fn toml_sizes() {
    bad(
        &format!("{IMG}memory = \"4X\"\n"),
        2,
        "memory",
        "invalid size \"4X\"",
    );
    bad(
        &format!("{IMG}disk = \"0G\"\n"),
        2,
        "disk",
        "must not be zero",
    );
    bad(
        &format!("{IMG}memory = \"64M\"\n"),
        2,
        "memory",
        "64M is too small: at least 128M",
    );
    bad(&format!("{IMG}disk = \"512M\"\n"), 2, "disk", "at least 1G");
    bad(
        &format!("{IMG}memory = \"4\"\n"),
        2,
        "memory",
        "unit is missing",
    );
}

#[test]
fn toml_enums_and_ranges() {
    bad(
        &format!("{IMG}firmware = \"efi\"\n"),
        2,
        "firmware",
        "unknown variant `efi`",
    );
    bad(
        &format!("{IMG}accel = \"hvf\"\n"),
        2,
        "accel",
        "unknown variant `hvf`",
    );
    bad(
        &format!("{IMG}autoconnect = \"vnc\"\n"),
        2,
        "autoconnect",
        "unknown variant",
    );
    bad(
        &format!("{IMG}[network]\negress = \"wide\"\n"),
        3,
        "network.egress",
        "unknown variant `wide`",
    );
    bad(
        &format!("{IMG}cpus = 0\n"),
        2,
        "cpus",
        "must be from 1 to 256",
    );
    bad(
        &format!("{IMG}cpus = 257\n"),
        2,
        "cpus",
        "must be from 1 to 256",
    );
    bad(
        &format!("{IMG}halt_timeout = 0\n"),
        2,
        "halt_timeout",
        "must be from 1",
    );
    bad(
        &format!("{IMG}tunnel_ports = [22, 0]\n"),
        2,
        "tunnel_ports[1]",
        "should be from 1 to 65535",
    );
    bad(
        &format!("{IMG}tunnel_ports = [22, 22]\n"),
        2,
        "tunnel_ports[1]",
        "listed twice",
    );
}

#[test]
fn toml_identity() {
    bad(
        &format!("{IMG}name = \"bad name\"\n"),
        2,
        "name",
        "invalid name \"bad name\"",
    );
    bad(&format!("{IMG}name = \"-x\"\n"), 2, "name", "invalid name");
    bad("cpus = 2\n", 0, "image", "missing");
    bad("image = \"\"\n", 1, "image", "empty");
    bad(
        &format!("{IMG}[ssh]\nuser = \"Root\"\n"),
        3,
        "ssh.user",
        "invalid user name",
    );
    bad(
        &format!("{IMG}[ssh]\nkey = \"~bob/.ssh/k\"\n"),
        3,
        "ssh.key",
        "only \"~/\"",
    );
}

#[test]
fn toml_shares() {
    bad(
        &format!("{IMG}[[share]]\nhost = \"a\"\n\n[[share]]\nhost = \"b\"\ntag = \"a\"\n"),
        7,
        "share[1].tag",
        "duplicate tag \"a\": already used by the share on line 2",
    );
    bad(
        &format!("{IMG}[[share]]\nhost = \"x/a\"\n[[share]]\nhost = \"y/a\"\n"),
        4,
        "share[1].tag",
        "duplicate tag \"a\"",
    );
    bad(
        &format!("{IMG}[[share]]\nhost = \"a\"\nsize = \"5G\"\nisolation = false\n"),
        4,
        "share[0].size",
        "share[0].isolation is false",
    );
    bad(
        &format!("{IMG}[[share]]\nhost = \"a\"\nsize = \"100M\"\n"),
        4,
        "share[0].size",
        "at least 1G",
    );
    bad(
        &format!("{IMG}[[share]]\ntag = \"a\"\n"),
        2,
        "share[0].host",
        "missing field `host`",
    );
    bad(
        &format!("{IMG}[[share]]\nhost = \"a\"\ntag = \"a.b\"\n"),
        4,
        "share[0].tag",
        "invalid tag",
    );
    bad(
        &format!("{IMG}[[share]]\nhost = \"my.dir\"\n"),
        3,
        "share[0].tag",
        "set the tag",
    );
    bad(
        &format!("{IMG}[[share]]\nhost = \"a\"\nguest = \"mnt/a\"\n"),
        4,
        "share[0].guest",
        "must be absolute",
    );
    bad(
        &format!("{IMG}[[share]]\nhost = \".\"\n"),
        3,
        "share[0].host",
        "is the project folder or contains it",
    );
    bad(
        &format!("{IMG}[[share]]\nhost = \"..\"\n"),
        3,
        "share[0].host",
        "\"..\" is refused",
    );
    // Root mounts a share's store at its path: never outside the project.
    for (host, why) in [
        ("/etc", "relative to it"),
        ("~/code", "relative to it"),
        ("a/../../x", "\"..\" is refused"),
        ("hooks", "runs or is read on the host"),
        ("roles/x", "runs or is read on the host"),
        ("filter_plugins", "runs or is read on the host"),
        ("playbook.yml", "runs or is read on the host"),
    ] {
        bad(
            &format!("{IMG}[[share]]\nhost = \"{host}\"\ntag = \"t\"\n"),
            3,
            "share[0].host",
            why,
        );
    }
    bad(
        &format!("{IMG}[[share]]\nhost = \"a\"\n[[share]]\nhost = \"a/b\"\n"),
        5,
        "share[1].host",
        "overlaps the share on line 3",
    );
}

#[test]
fn a_share_path_through_a_symlink_is_refused() {
    let dir = project(&format!("{IMG}[[share]]\nhost = \"link/ws\"\n"));
    std::os::unix::fs::symlink("/etc", dir.path().join("link")).unwrap_or_else(|e| panic!("{e}"));
    let e = load_in(dir.path())
        .err()
        .unwrap_or_else(|| panic!("accepted"));
    assert!(e.to_string().contains("is a symlink"), "{e}");
    assert_eq!(e.exit_code(), crate::exit::CONFIG);
}

#[test]
fn toml_network() {
    bad(
        &format!("{IMG}[network]\nsubnet = \"10.0.2.1/24\"\n"),
        3,
        "network.subnet",
        "not a network address",
    );
    bad(
        &format!("{IMG}[network]\nsubnet = \"10.0.2.0/25\"\n"),
        3,
        "network.subnet",
        "between 8 and 24",
    );
    bad(
        &format!("{IMG}[network]\nsubnet = \"8.8.8.0/24\"\n"),
        3,
        "network.subnet",
        "private",
    );
    bad(
        &format!("{IMG}[network]\nrules = [\"allow-host-port 8080\"]\n"),
        3,
        "network.rules[0]",
        "invalid rule \"allow-host-port 8080\"",
    );
    bad(
        &format!("{IMG}[network]\nrules = [\"open-everything\"]\n"),
        3,
        "network.rules[0]",
        "expected one of",
    );
    bad(
        &format!("{IMG}[network]\nrules = [\"allow-host-port udp/53\"]\n"),
        3,
        "network.rules[0]",
        "reserved",
    );
    bad(
        &format!("{IMG}[network]\nrules = [\"forward-port udp/67 10.1.1.1:67\"]\n"),
        3,
        "network.rules[0]",
        "reserved",
    );
    bad(
        &format!("{IMG}[network]\nrules = [\"forward-port tcp/68 10.1.1.1:80\"]\n"),
        3,
        "network.rules[0]",
        "reserved",
    );
    bad(
        &format!(
            "{IMG}[network]\nrules = [\n  \"allow-host-port tcp/8080\",\n  \"forward-port tcp/8080 10.1.1.1:80\",\n]\n"
        ),
        5,
        "network.rules[1]",
        "already claimed by \"allow-host-port tcp/8080\" (line 4)",
    );
    bad(
        &format!(
            "{IMG}[network]\nrules = [\"forward-port tcp/11434 100.64.0.6:11434 via-tunnel\"]\n"
        ),
        3,
        "network.rules[0]",
        "via-tunnel needs a WireGuard config",
    );
    bad(
        &format!("{IMG}[network]\nrules = [\"forward-port tcp/9 10.0.2.7:9\"]\n"),
        3,
        "network.rules[0]",
        "guest's own subnet",
    );
    bad(
        &format!("{IMG}[network]\nrules = [\"allow-lan-host 127.0.0.1\"]\n"),
        3,
        "network.rules[0]",
        "not a unicast address",
    );
    bad(
        &format!("{IMG}[network]\nallow_domains = [\"ok.org\", \"exa mple.com\"]\n"),
        3,
        "network.allow_domains[1]",
        "invalid domain",
    );
    bad(
        &format!("{IMG}[network]\nallow_domains = [\"a.*.org\"]\n"),
        3,
        "network.allow_domains[0]",
        "wildcard",
    );
    bad(
        &format!("{IMG}[network]\nwireguard = \"nope.conf\"\n"),
        3,
        "network.wireguard",
        "does not exist",
    );
}

/// `ipv6 = true` gives the guest IPv6, with WireGuard too (through the
/// tunnel).
#[test]
fn toml_ipv6_and_its_holes() {
    let content = format!("{IMG}[network]\nipv6 = true\n");
    let dir = project(&content);
    let c = load_in(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    assert!(c.network.ipv6 && c.warnings.is_empty());
    assert_eq!(c.net6(), Some(crate::config::Net6::standard()));
    std::fs::write(dir.path().join("wireguard.conf"), "[Interface]\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let c = load_in(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    assert!(c.network.ipv6 && c.network.wireguard.is_some());
    let off = format!("{IMG}[network]\nipv6 = false\n");
    let dir = project(&off);
    let c = load_in(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    assert!(!c.network.ipv6 && c.warnings.is_empty() && c.net6().is_none());
    // IPv6 holes: a LAN host needs ipv6 = true; a forward to an IPv6
    // target does not (the guest uses the gateway's IPv4 address).
    let hole = "rules = [\"allow-lan-host fd12::5\", \"forward-port tcp/8081 [fd12::5]:80\"]\n";
    let on = format!("{IMG}[network]\nipv6 = true\n{hole}");
    let dir = project(&on);
    let c = load_in(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.network.rules.len(), 2);
    let content = format!("{IMG}[network]\n{hole}");
    let dir = project(&content);
    bad_in(
        dir.path(),
        &content,
        3,
        "network.rules[0]",
        "an IPv6 LAN host needs `ipv6 = true`",
    );
    let fwd = format!("{IMG}[network]\nrules = [\"forward-port tcp/8081 [2a0a::5]:80\"]\n");
    let dir = project(&fwd);
    assert!(load_in(dir.path()).is_ok());
}

#[test]
fn toml_wireguard_timeout_and_via_tunnel_lan_hosts() {
    // Without a WireGuard file: both refused, with the line.
    bad(
        &format!("{IMG}[network]\nwireguard_timeout = 5\n"),
        3,
        "network.wireguard_timeout",
        "without a WireGuard config",
    );
    bad(
        &format!("{IMG}[network]\nrules = [\"allow-lan-host 192.168.1.5 via-tunnel\"]\n"),
        3,
        "network.rules[0]",
        "via-tunnel needs a WireGuard config",
    );
    bad(
        &format!("{IMG}[network]\nrules = [\"allow-lan-host 192.168.1.5 via-vpn\"]\n"),
        3,
        "network.rules[0]",
        "the only one is via-tunnel",
    );
    let with_wg = |extra: &str| {
        let content = format!("{IMG}[network]\n{extra}");
        let dir = project(&content);
        std::fs::write(dir.path().join("wireguard.conf"), "[Interface]\n")
            .unwrap_or_else(|e| panic!("{e}"));
        (dir, content)
    };
    let (dir, content) = with_wg("wireguard_timeout = 0\n");
    bad_in(
        dir.path(),
        &content,
        3,
        "network.wireguard_timeout",
        "out of range",
    );
    let (dir, _) = with_wg(
        "wireguard_timeout = 30\nrules = [\"allow-lan-host 192.168.1.5 via-tunnel\", \"allow-lan-host 192.168.1.6\"]\n",
    );
    let c = load_in(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !c.network.dns_host,
        "the host's resolvers need an explicit opt-in"
    );
    let (host_dns, _) = with_wg("dns = \"host\"\n");
    let h = load_in(host_dns.path()).unwrap_or_else(|e| panic!("{e}"));
    assert!(h.network.dns_host);
    let (typo, _) = with_wg("dns = \"hots\"\n");
    assert!(load_in(typo.path()).is_err());
    assert_eq!(
        c.network.wireguard_timeout,
        std::time::Duration::from_secs(30)
    );
    assert_eq!(
        c.network.rules,
        [
            NetRule::AllowLanHost {
                addr: Ipv4Addr::new(192, 168, 1, 5).into(),
                via_tunnel: true
            },
            NetRule::AllowLanHost {
                addr: Ipv4Addr::new(192, 168, 1, 6).into(),
                via_tunnel: false
            },
        ]
    );
    let (dir, _) = with_wg("");
    let c = load_in(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        c.network.wireguard_timeout,
        std::time::Duration::from_secs(10)
    );
}

// ---------------------------------------------------------------- legacy, bad

const L: &str = "VM_NAME=\"t\"\nIMAGE_URL=\"https://e.org/i.qcow2\"\n";

#[test]
fn legacy_commands_are_refused() {
    bad(
        &format!("{L}rm -rf /\n"),
        3,
        "syntax",
        "\"rm -rf /\" is a command; the Migrantfile is read as data",
    );
    bad(
        &format!("{L}source ./other\n"),
        3,
        "syntax",
        "shell statement \"source\"",
    );
    bad(
        &format!("{L}if true; then\n  VCPUS=2\nfi\n"),
        3,
        "syntax",
        "shell statement \"if\"",
    );
    bad(
        &format!("{L}setup() {{ echo hi; }}\n"),
        3,
        "syntax",
        "function definitions",
    );
    bad(
        &format!("{L}VCPUS=2; rm -rf /\n"),
        3,
        "VCPUS",
        "';' is not supported",
    );
    bad(&format!("{L}VCPUS=2 && echo\n"), 3, "VCPUS", "operator '&'");
    bad(&format!("{L}VCPUS=2 | cat\n"), 3, "VCPUS", "operator '|'");
    bad(
        &format!("{L}VCPUS=2 > /tmp/x\n"),
        3,
        "VCPUS",
        "operator '>'",
    );
    bad(
        &format!("{L}VM_NAME=foo bar\n"),
        3,
        "VM_NAME",
        "quote values that contain blanks",
    );
    bad(&format!("{L}VCPUS+=1\n"), 3, "VCPUS", "+=");
    bad(
        &format!("{L}TUNNEL_PORTS[0]=1\n"),
        3,
        "TUNNEL_PORTS",
        "one array element",
    );
    bad(&format!("{L}export\n"), 3, "syntax", "command");
}

#[test]
fn legacy_substitutions_are_refused() {
    bad(
        &format!("{L}VM_NAME=$(whoami)\n"),
        3,
        "VM_NAME",
        "command substitution",
    );
    bad(
        &format!("{L}VM_NAME=\"x-$(whoami)\"\n"),
        3,
        "VM_NAME",
        "command substitution",
    );
    bad(
        &format!("{L}VM_NAME=`whoami`\n"),
        3,
        "VM_NAME",
        "command substitution",
    );
    bad(
        &format!("{L}VM_NAME=\"`id -u`\"\n"),
        3,
        "VM_NAME",
        "command substitution",
    );
    bad(
        &format!("{L}VCPUS=$((1+1))\n"),
        3,
        "VCPUS",
        "arithmetic expansion",
    );
    bad(
        &format!("{L}VM_NAME=\"$USER-vm\"\n"),
        3,
        "VM_NAME",
        "variable expansion $USER is not supported",
    );
    bad(
        &format!("{L}SSH_KEY_PATH=\"${{HOME:-/root}}/k\"\n"),
        3,
        "SSH_KEY_PATH",
        "parameter expansion ${HOME:-/root}",
    );
    bad(
        &format!("{L}VM_NAME=$1\n"),
        3,
        "VM_NAME",
        "special parameter $1",
    );
    bad(
        &format!("{L}VM_NAME=$'a\\tb'\n"),
        3,
        "VM_NAME",
        "quoting is not supported",
    );
}

#[test]
fn legacy_unterminated() {
    bad(
        &format!("{L}VM_NAME=\"abc\nVCPUS=2\n"),
        3,
        "VM_NAME",
        "unterminated double quote: the \" on line 3",
    );
    bad(
        &format!("{L}VM_NAME='abc\n"),
        3,
        "VM_NAME",
        "unterminated single quote",
    );
    bad(
        &format!("{L}SHARED_FOLDERS=(\n  \"a:a\"\n"),
        3,
        "SHARED_FOLDERS",
        "unterminated array: the '(' on line 3",
    );
    bad(
        &format!("{L}SHARED_FOLDERS=(\n  \"a:a\"\nVCPUS=2\n"),
        5,
        "SHARED_FOLDERS",
        "an assignment inside the array opened on line 3",
    );
    bad(
        &format!("{L}HOST_ACCESS=(\n \"a\"\nNETWORKS=(\n"),
        5,
        "HOST_ACCESS",
        "is its ')' missing",
    );
    bad(
        &format!("{L}VM_NAME=\"${{HOME\"\n"),
        3,
        "VM_NAME",
        "unterminated ${...}",
    );
}

#[test]
fn legacy_variables() {
    // The original allowed shares anywhere; root mounts a store there, so
    // only the project folder's own subfolders are taken.
    bad(
        &format!("{L}SHARED_FOLDERS=(~/work:work)\n"),
        3,
        "SHARED_FOLDERS[0]",
        "relative to it",
    );
    bad(
        &format!("{L}SHARED_FOLDERS=(/srv/data:data)\n"),
        3,
        "SHARED_FOLDERS[0]",
        "relative to it",
    );
    bad(
        &format!("{L}RAM_GB=4\n"),
        3,
        "RAM_GB",
        "unknown variable RAM_GB",
    );
    bad(&format!("{L}vm_name=x\n"), 3, "vm_name", "unknown variable");
    bad(
        &format!("{L}RAM_MB=abc\n"),
        3,
        "RAM_MB",
        "\"abc\" should be a whole number of megabytes",
    );
    bad(
        &format!("{L}RAM_MB=64\n"),
        3,
        "RAM_MB",
        "64M is too small: at least 128M",
    );
    bad(&format!("{L}RAM_MB=0\n"), 3, "RAM_MB", "must not be zero");
    bad(
        &format!("{L}DISK_GB=20G\n"),
        3,
        "DISK_GB",
        "whole number of gigabytes",
    );
    bad(
        &format!("{L}VCPUS=0\n"),
        3,
        "VCPUS",
        "must be from 1 to 256",
    );
    bad(&format!("{L}VCPUS=(2 4)\n"), 3, "VCPUS", "not an array");
    bad(
        &format!("{L}BOOT_FIRMWARE=coreboot\n"),
        3,
        "BOOT_FIRMWARE",
        "should be bios or uefi",
    );
    bad(
        &format!("{L}NETWORK_IPV6=yes\n"),
        3,
        "NETWORK_IPV6",
        "should be off or nat",
    );
    bad(
        &format!("{L}CLOUD_INIT_WAIT=yes\n"),
        3,
        "CLOUD_INIT_WAIT",
        "should be true or false",
    );
    bad(
        &format!("{L}NETWORK_ISOLATION=off\n"),
        3,
        "NETWORK_ISOLATION",
        "should be true or false",
    );
    bad(
        &format!("{L}AUTOCONNECT=vnc\n"),
        3,
        "AUTOCONNECT",
        "should be ssh, console or empty",
    );
    bad(
        &format!("{L}TUNNEL_PORTS=(3000\n  0)\n"),
        4,
        "TUNNEL_PORTS[1]",
        "should be from 1 to 65535",
    );
    bad(
        &format!("{L}TUNNEL_PORTS=(http)\n"),
        3,
        "TUNNEL_PORTS[0]",
        "should be a number",
    );
    bad(
        &format!("{L}TUNNEL_PORTS=(*)\n"),
        3,
        "TUNNEL_PORTS",
        "unquoted '*'",
    );
    bad(
        &format!("{L}VM_NAME=\"bad/name\"\n"),
        3,
        "VM_NAME",
        "invalid name",
    );
    bad("VM_NAME=x\n", 0, "IMAGE_URL", "missing");
}

#[test]
fn legacy_shares_and_rules() {
    bad(
        &format!("{L}SHARED_FOLDER_ISOLATION=false\nSHARED_FOLDERS=(\n  \"work:work:10\"\n)\n"),
        5,
        "SHARED_FOLDERS[0]",
        "SHARED_FOLDER_ISOLATION is false",
    );
    bad(
        &format!("{L}SHARED_FOLDERS=(\"work:work:ten\")\n"),
        3,
        "SHARED_FOLDERS[0]",
        "whole number of gigabytes",
    );
    bad(
        &format!("{L}SHARED_FOLDERS=(\":work\")\n"),
        3,
        "SHARED_FOLDERS[0]",
        "host path is empty",
    );
    bad(
        &format!("{L}SHARED_FOLDERS=(\"a:x\" \"b:x\")\n"),
        3,
        "SHARED_FOLDERS[1]",
        "duplicate tag \"x\"",
    );
    bad(
        &format!("{L}SHARED_FOLDER_SIZE_GB=x\n"),
        3,
        "SHARED_FOLDER_SIZE_GB",
        "whole number",
    );
    bad(
        &format!("{L}SHARED_FOLDERS=(\"hooks/..:x\")\n"),
        3,
        "SHARED_FOLDERS[0]",
        "project folder",
    );
    bad(
        &format!(
            "{L}HOST_ACCESS=(\n  \"allow-host-port tcp/8080\"\n  \"allow-lan-host router\"\n)\n"
        ),
        5,
        "HOST_ACCESS[1]",
        "\"router\" is not a numeric IPv4 or IPv6 address",
    );
    bad(
        &format!("{L}HOST_ACCESS=(\n  \"forward-port udp/53 10.0.0.1:53\"\n)\n"),
        4,
        "HOST_ACCESS[0]",
        "reserved",
    );
    bad(
        &format!(
            "{L}HOST_ACCESS=(\"allow-host-port tcp/80\" \"forward-port tcp/80 10.9.9.9:80\")\n"
        ),
        3,
        "HOST_ACCESS[1]",
        "already claimed",
    );
    bad(
        &format!("{L}HOST_ACCESS=(\"forward-port tcp/80 10.9.9.9:80 via-tunnel\")\n"),
        3,
        "HOST_ACCESS[0]",
        "put a wireguard.conf beside the Migrantfile",
    );
}

#[test]
fn missing_and_unreadable_files() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let err = load(dir.path())
        .err()
        .unwrap_or_else(|| panic!("loaded nothing"));
    assert!(matches!(err, ConfigError::NotFound { .. }));
    assert_eq!(err.exit_code(), 78);
    assert!(err.to_string().contains(&dir.path().display().to_string()));

    std::fs::write(dir.path().join(FILE_NAME), [0xff, 0xfe, b'\n'])
        .unwrap_or_else(|e| panic!("{e}"));
    let err = load(dir.path())
        .err()
        .unwrap_or_else(|| panic!("loaded junk"));
    assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
    assert_eq!(err.exit_code(), 78);
    assert!(err.to_string().contains(FILE_NAME), "{err}");
}

#[test]
fn invoking_home() {
    use std::ffi::OsString;
    let os = |s: &str| Some(OsString::from(s));
    assert_eq!(home_from(os("/home/me")), Some(PathBuf::from("/home/me")));
    assert_eq!(home_from(None), None);
    assert_eq!(home_from(os("")), None);
    assert_eq!(home_from(os("relative")), None);
}

#[test]
fn a_folder_another_user_controls_is_refused() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(
        dir.path().join(FILE_NAME),
        "name = \"x\"\nimage = \"debian-12\"\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let me = nix::unistd::geteuid().as_raw();
    assert!(check_controller(dir.path(), me).is_ok());
    let owner = std::os::unix::fs::MetadataExt::uid(
        &std::fs::metadata(dir.path()).unwrap_or_else(|e| panic!("{e}")),
    );
    if owner != 0 {
        let err = check_controller(dir.path(), me.wrapping_add(1))
            .err()
            .unwrap_or_else(|| panic!("another user's folder was accepted"));
        assert_eq!(err.exit_code(), 77, "{err}");
        assert!(err.to_string().contains(&format!("uid {owner}")), "{err}");
    }
}

#[test]
fn byte_order_mark_is_ignored() {
    let (_d, c) = good("\u{feff}VM_NAME=bom\nIMAGE_URL=debian-12\n");
    assert_eq!((c.name.as_str(), c.format), ("bom", Format::Legacy));
}

#[test]
fn image_checksums() {
    let sha = "sha512:".to_string() + &"Ab".repeat(64);
    let (_d, c) = good(&format!(
        "image = \"https://h/x.qcow2\"\nimage_checksum = \"{sha}\"\n"
    ));
    match c.image_checksum {
        Some(crate::image::Checksum::Digest(d)) => assert_eq!(d.hex, "ab".repeat(64)),
        other => panic!("{other:?}"),
    }
    let (_d, c) =
        good("image = \"https://h/x.qcow2\"\nimage_checksum = \"https://h/SHA256SUMS\"\n");
    assert_eq!(
        c.image_checksum,
        Some(crate::image::Checksum::List("https://h/SHA256SUMS".into()))
    );
    let (_d, c) = good("image = \"debian-12\"\n");
    assert_eq!(c.image_checksum, None);
    let (_d, c) = good(&format!(
        "image = \"x.qcow2\"\nimage_checksum = \"{sha}\"\n"
    ));
    assert!(c.image_checksum.is_some());
    bad(
        "image = \"https://h/x.qcow2\"\nimage_checksum = \"md5:abc\"\n",
        2,
        "image_checksum",
        "unknown checksum algorithm",
    );
    bad(
        "image = \"https://h/x.qcow2\"\nimage_checksum = \"sha256:abc\"\n",
        2,
        "image_checksum",
        "64 hex digits",
    );
    bad(
        "image = \"x.qcow2\"\nimage_checksum = \"https://h/SUMS\"\n",
        2,
        "image_checksum",
        "not a checksum list",
    );
    bad(
        "image = \"ftp://h/x.qcow2\"\nimage_checksum = \"https://h/SUMS\"\n",
        2,
        "image_checksum",
        "http(s) URLs",
    );
    bad(
        "image = \"x.qcow2\"\nimage_checksum = 5\n",
        2,
        "image_checksum",
        "invalid type",
    );
    // The legacy reader knows it too.
    let (_d, c) = good(&format!(
        "IMAGE_URL=\"https://h/x.img\"\nIMAGE_CHECKSUM=\"{sha}\"\n"
    ));
    assert!(c.image_checksum.is_some());
    bad(
        "IMAGE_URL=\"https://h/x.img\"\nIMAGE_CHECKSUM=\"sha1:00\"\n",
        2,
        "IMAGE_CHECKSUM",
        "unknown checksum algorithm",
    );
}

#[test]
fn secure_boot_needs_uefi() {
    let (_d, c) = good("image = \"debian-12\"\nfirmware = \"uefi\"\nsecure_boot = true\n");
    assert!(c.secure_boot);
    let (_d, c) = good("image = \"debian-12\"\n");
    assert!(!c.secure_boot);
    bad(
        "image = \"debian-12\"\nsecure_boot = true\n",
        2,
        "secure_boot",
        "needs UEFI",
    );
}

/// `~` is expanded where bash expands it (unquoted, at the start of a
/// word); a quoted `~` in a path is said, not guessed at. `SSH_KEY_PATH`
/// is the exception the original itself makes (it expands `~` there).
#[test]
fn legacy_tilde_only_where_bash_expands_it() {
    bad(
        "VM_NAME=\"t\"\nIMAGE_URL=\"~/img/x.qcow2\"\n",
        2,
        "IMAGE_URL",
        "this ~ is quoted",
    );
    bad(
        "VM_NAME=\"t\"\nIMAGE_URL=\\~/img/x.qcow2\n",
        2,
        "IMAGE_URL",
        "this ~ is quoted",
    );
    bad(
        &format!("{L}SHARED_FOLDERS=(\"~/work:work\")\n"),
        3,
        "SHARED_FOLDERS[0]",
        "this ~ is quoted",
    );
    let dir = project("VM_NAME=\"t\"\nIMAGE_URL=~/img/x.qcow2\nSSH_KEY_PATH=\"~/.ssh/k\"\n");
    let c = load_in(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.image, format!("{HOME}/img/x.qcow2"));
    assert_eq!(c.ssh.key, Some(PathBuf::from(HOME).join(".ssh/k")));
}

/// Without `[ssh] user` (always, for a legacy file) the guest user is the
/// first one cloud-init.yml creates by name, as in the original.
#[test]
fn the_guest_user_comes_from_cloud_init() {
    let dir = project(L);
    std::fs::write(
        dir.path().join("cloud-init.yml"),
        "#cloud-config\nusers:\n  - default\n  - name: coder\n    shell: /bin/bash\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let c = load_in(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.ssh.user, "coder");
    let toml = format!("{IMG}[ssh]\nuser = \"named\"\n");
    std::fs::write(dir.path().join("Migrantfile"), toml).unwrap_or_else(|e| panic!("{e}"));
    let c = load_in(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.ssh.user, "named");
    std::fs::write(
        dir.path().join("cloud-init.yml"),
        "users:\n  - name: \"bad name;\"\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.path().join("Migrantfile"), L).unwrap_or_else(|e| panic!("{e}"));
    let e = load_in(dir.path())
        .err()
        .unwrap_or_else(|| panic!("a bad user name passed"));
    assert!(e.to_string().contains("cloud-init.yml: users:"), "{e}");
}

#[test]
fn holes_aimed_at_the_host_name_their_line() {
    let host: std::collections::HashSet<std::net::IpAddr> = ["45.1.2.3", "2a0a::7"]
        .iter()
        .map(|a| a.parse().unwrap_or_else(|e| panic!("{e}")))
        .collect();
    for (rule, line) in [
        ("allow-lan-host 45.1.2.3", 4),
        ("forward-port tcp/8080 45.1.2.3:80", 4),
        ("forward-port tcp/8080 [2a0a::7]:80", 4),
    ] {
        let content =
            format!("image = \"debian-12\"\n[network]\nipv6 = true\nrules = [\"{rule}\"]\n");
        let (_dir, cfg) = good(&content);
        let err = match cfg.check_holes_against(&host) {
            Ok(()) => panic!("accepted: {rule}"),
            Err(e) => e,
        };
        assert_eq!(err.exit_code(), 78, "{err}");
        let ConfigError::Invalid {
            line: got, field, ..
        } = &err
        else {
            panic!("{err:?}")
        };
        assert_eq!(
            (*got, field.as_str()),
            (line, "network.rules"),
            "{rule}: {err}"
        );
        assert!(
            err.to_string().contains("holes never open the host"),
            "{err}"
        );
    }
    let (_dir, cfg) = good(
        "image = \"debian-12\"\n[network]\nrules = [\"forward-port tcp/8080 45.1.2.4:80\", \"allow-host-port tcp/8081\"]\n",
    );
    assert!(cfg.check_holes_against(&host).is_ok());
}

#[test]
fn the_config_handed_down_is_the_one_validated() {
    let (dir, cfg) = good(
        "image = \"debian-12\"\nmemory = \"3G\"\n[network]\nrules = [\"allow-host-port tcp/8080\"]\nallow_domains = [\"example.org\"]\n[[share]]\nhost = \"ws\"\nsize = \"2G\"\n",
    );
    let fd = cfg.handover().unwrap_or_else(|e| panic!("{e}"));
    // Sealed: nobody changes it after the hand-over.
    let mut file = std::fs::File::from(fd.try_clone().unwrap_or_else(|e| panic!("{e}")));
    assert!(std::io::Write::write_all(&mut file, b"x").is_err());
    // The Migrantfile changing afterwards changes nothing handed down.
    std::fs::write(dir.path().join(FILE_NAME), "image = \"other\"\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let back = Config::taken_over(fd).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(back, cfg);
}

#[test]
fn toml_secrets() {
    let (dir, c) = good(
        "image = \"debian-12\"\n\
         [secrets.GITHUB_TOKEN]\n\
         from = \"env:GH_TOKEN\"\n\
         hosts = [\"API.github.com\", \"*.githubusercontent.com\", \"api.github.com\"]\n\
         [secrets.NPM]\n\
         from = \"file:tokens/npm\"\n\
         hosts = [\"registry.npmjs.org\"]\n\
         [secrets.PASS]\n\
         from = \"command:pass show x\"\n\
         hosts = [\"example.com\"]\n",
    );
    let by_name = |n: &str| {
        c.secrets
            .iter()
            .find(|s| s.name == n)
            .unwrap_or_else(|| panic!("no {n} in {:?}", c.secrets))
    };
    let gh = by_name("GITHUB_TOKEN");
    assert_eq!(gh.from, SecretSource::Env("GH_TOKEN".into()));
    assert_eq!(gh.hosts, ["api.github.com", "*.githubusercontent.com"]);
    assert_eq!(gh.line, 3);
    assert!(gh.sent_to("raw.githubusercontent.com") && !gh.sent_to("github.com"));
    assert_eq!(
        by_name("NPM").from,
        SecretSource::File(dir.path().join("tokens/npm"))
    );
    assert_eq!(
        by_name("PASS").from,
        SecretSource::Command("pass show x".into())
    );
    // The Config never holds a value: only where each comes from.
    let json = serde_json::to_string(&c).unwrap_or_default();
    assert!(json.contains("GH_TOKEN") && json.contains("pass show x"));
}

#[test]
fn toml_secrets_refused() {
    let head = "image = \"debian-12\"\n[secrets.T]\n";
    let with = |from: &str, hosts: &str| format!("{head}from = \"{from}\"\nhosts = [{hosts}]\n");
    bad(
        &with("vault:x", "\"a.example.com\""),
        3,
        "secrets.T.from",
        "unknown source kind \"vault\"",
    );
    bad(
        &with("GH_TOKEN", "\"a.example.com\""),
        3,
        "secrets.T.from",
        "env:VARIABLE",
    );
    bad(
        &with("env:A-B", "\"a.example.com\""),
        3,
        "secrets.T.from",
        "not an environment variable",
    );
    bad(
        &with("command: ", "\"a.example.com\""),
        3,
        "secrets.T.from",
        "empty",
    );
    bad(
        &with("env:X", "\"*\""),
        4,
        "secrets.T.hosts[0]",
        "too broad",
    );
    bad(
        &with("env:X", "\"a.example.com\", \"*.com\""),
        4,
        "secrets.T.hosts[1]",
        "too broad",
    );
    bad(
        &with("env:X", "\"10.0.0.1\""),
        4,
        "secrets.T.hosts[0]",
        "IP address",
    );
    bad(&with("env:X", ""), 2, "secrets.T", "no hosts");
    bad(
        "image = \"debian-12\"\n[secrets.PATH]\nfrom = \"env:X\"\nhosts = [\"a.example.com\"]\n",
        2,
        "secrets.PATH",
        "already uses",
    );
    bad(
        "image = \"debian-12\"\n[secrets.SSL_CERT_FILE]\nfrom = \"env:X\"\nhosts = [\"a.example.com\"]\n",
        2,
        "secrets.SSL_CERT_FILE",
        "already uses",
    );
    bad(
        "image = \"debian-12\"\n[secrets.\"1X\"]\nfrom = \"env:X\"\nhosts = [\"a.example.com\"]\n",
        2,
        "secrets.1X",
        "not an environment variable",
    );
    bad(
        &format!("{head}from = \"env:X\"\nhosts = [\"a.example.com\"]\nwhat = 1\n"),
        5,
        "secrets.T.what",
        "unknown",
    );
    // The hosts must be reachable under the policy.
    bad(
        "image = \"debian-12\"\n[network]\negress = \"none\"\n[secrets.T]\nfrom = \"env:X\"\nhosts = [\"a.example.com\"]\n",
        6,
        "secrets.T.hosts[0]",
        "egress is \"none\"",
    );
    bad(
        "image = \"debian-12\"\n[network]\nallow_domains = [\"*.debian.org\"]\n[secrets.T]\nfrom = \"env:X\"\nhosts = [\"api.github.com\"]\n",
        6,
        "secrets.T.hosts[0]",
        "not in network.allow_domains",
    );
    let (_d, c) = good(
        "image = \"debian-12\"\n[network]\nallow_domains = [\"*.github.com\", \"example.com\"]\n\
         [secrets.T]\nfrom = \"env:X\"\nhosts = [\"api.github.com\", \"*.api.github.com\", \"example.com\"]\n",
    );
    assert_eq!(c.secrets[0].hosts.len(), 3);
}
