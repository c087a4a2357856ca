//! Running without root, the network half: a VM's namespace set up by
//! migrant's own code — the TAP with its addresses and policy routing,
//! the nftables ruleset with its TPROXY diversion, anti-spoofing and
//! closed gateway ports, the transparent listeners, the DHCP and DNS
//! sockets — by a process that holds no privilege on the host: `nobody`,
//! root only inside a user namespace of its own that owns the network
//! namespace. (The rest of running without root is not built yet.)
//!
//! Root is used only to become `nobody` and to load the kernel modules a
//! user namespace cannot load ([`MODULES`]: running without root, the
//! host must have them loaded or built in).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use migrant::config::{Egress, NetRule, Proto};
use migrant::net::plan::NetPlan;

/// Set when this binary runs as the unprivileged child.
const CHILD: &str = "MIGRANT_ROOTLESS_CHILD";

/// The netfilter modules the ruleset needs; inside a user namespace the
/// kernel will not load them on demand.
const MODULES: &[&str] = &[
    "tun",
    "nft_tproxy",
    "nf_tproxy_ipv4",
    "nf_tproxy_ipv6",
    "nft_socket",
    "nft_reject_inet",
    "nft_ct",
];

/// Run as root, this test runs itself again as `nobody` in a user and
/// network namespace of its own ([`CHILD`] set), where it sets the
/// namespace up.
#[test]
fn an_ordinary_user_sets_up_a_vms_namespace() {
    if std::env::var_os(CHILD).is_some() {
        return in_a_user_namespace();
    }
    if !common::as_root() {
        return;
    }
    // Where the modules are built in there is no modprobe to run (and
    // nothing to load); where it fails, the child says what is missing.
    if let Ok(s) = Command::new("modprobe").arg("-a").args(MODULES).status()
        && !s.success()
    {
        eprintln!("modprobe {MODULES:?} failed ({s})");
    }
    // A copy of this test binary that `nobody` may run (the build folder
    // may sit under a home only root enters).
    let dir = tempfile::Builder::new()
        .prefix("migrant-rootless-")
        .tempdir()
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("{e}"));
    let exe = dir.path().join("rootless");
    let me = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
    std::fs::copy(&me, &exe).unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--",
            "unshare",
            "--user",
            "--map-root-user",
            "--net",
            "--",
        ])
        .arg(&exe)
        .args([
            "--exact",
            "an_ordinary_user_sets_up_a_vms_namespace",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .current_dir(dir.path())
        .output()
        .unwrap_or_else(|e| panic!("setpriv: {e}"));
    let text = common::text(&out);
    assert!(out.status.success(), "as nobody: {text}");
    assert!(text.contains("namespace ready"), "{text}");
}

fn in_a_user_namespace() {
    // Nothing of the host's root here: nobody, mapped to root only in the
    // user namespace that `unshare` made.
    let host_uid = std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
    assert!(
        host_uid.split_whitespace().nth(1) == Some("65534"),
        "not nobody in a user namespace: uid_map {host_uid:?}"
    );
    let net = NetPlan {
        gateway: "10.0.2.2".parse().unwrap_or_else(|e| panic!("{e}")),
        guest: "10.0.2.15".parse().unwrap_or_else(|e| panic!("{e}")),
        subnet: "10.0.2.0/24".parse().unwrap_or_else(|e| panic!("{e}")),
        net6: Some(migrant::config::Net6::standard()),
        egress: Egress::Direct,
        rules: vec![NetRule::AllowHostPort {
            proto: Proto::Tcp,
            port: 8080,
        }],
        allow_domains: Vec::new(),
        tunnel: None,
        upstreams: Vec::new(),
    };
    let tap = migrant::net::tap::create_tap("tap0")
        .unwrap_or_else(|e| panic!("TAP as nobody (is /dev/net/tun 0666? scripts/setup): {e}"));
    let sockets = migrant::net::setup::setup_in_ns("tap0", &net)
        .unwrap_or_else(|e| panic!("the namespace's set-up as nobody: {}", chain(&e)));
    assert!(sockets.listeners.is_some() && sockets.listeners6.is_some());
    let listed = Command::new("nft")
        .args(["list", "ruleset"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for want in [
        "tproxy ip to :15001",
        "tproxy ip6 to :15001",
        "spoofed_source",
        "reject with tcp reset",
    ] {
        assert!(listed.contains(want), "{want} not in:\n{listed}");
    }
    let rules = Command::new("ip")
        .args(["rule", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(rules.contains("fwmark 0x1 lookup 100"), "{rules}");
    drop((tap, sockets));
    println!("namespace ready");
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&format!(": {c}"));
        cur = c.source();
    }
    s
}
