use super::*;
use std::path::PathBuf;

const PRIV: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
const PUB1: &str = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=";
const PUB2: &str = "AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=";
const PSK: &str = "BAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQ=";

fn file() -> PathBuf {
    PathBuf::from("/p/wireguard.conf")
}

fn ok(text: &str) -> WgConfig {
    parse(&file(), text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn bad(text: &str) -> String {
    match parse(&file(), text) {
        Ok(c) => panic!("accepted: {c:?}\n{text}"),
        Err(e) => e.to_string(),
    }
}

fn good() -> String {
    format!(
        "# provider config\n[Interface]\nPrivateKey = {PRIV}\nAddress = 10.64.0.2/32\nDNS = 10.64.0.1\n\n\
         [Peer]\nPublicKey = {PUB1}\nPresharedKey = {PSK}\nEndpoint = 45.40.0.1:51820\n\
         AllowedIPs = 0.0.0.0/0, ::/0\nPersistentKeepalive = 25\n"
    )
}

#[test]
fn a_typical_provider_file() {
    let c = ok(&good());
    assert_eq!(c.private_key, Key([1; 32]));
    assert_eq!(
        c.addresses,
        vec![Ipv4Net::from_str("10.64.0.2/32").unwrap_or_else(|e| panic!("{e}"))]
    );
    assert_eq!(c.dns, vec![IpAddr::from([10, 64, 0, 1])]);
    assert_eq!(c.peers.len(), 1);
    let p = &c.peers[0];
    assert_eq!(p.public_key, PublicKey([2; 32]));
    assert_eq!(p.preshared_key, Some(Key([4; 32])));
    assert_eq!(
        p.endpoint,
        Some(Endpoint::Addr(
            "45.40.0.1:51820".parse().unwrap_or_else(|e| panic!("{e}"))
        ))
    );
    assert_eq!(p.allowed_ips.len(), 2);
    assert_eq!(p.persistent_keepalive, Some(25));
    assert_eq!(p.line, 7);
    // `::/0` routes nothing while the guest has no IPv6: said (by `up`,
    // unless `ipv6 = true`), not refused.
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let said = c
        .unused_ipv6(std::path::Path::new("/p/wireguard.conf"))
        .unwrap_or_default();
    assert!(
        said.contains("IPv6 parts are unused") && said.contains("AllowedIPs ::/0 (line 11)"),
        "{said}"
    );
}

#[test]
fn case_comments_repeats_names_and_several_peers() {
    let text = format!(
        "[interface]\nprivatekey={PRIV}   # inline comment\naddress = 10.64.0.2\nAddress = 10.64.0.3/32\n\
         DNS = 10.64.0.1, corp.example\nMTU = 1380\nListenPort = 51000\n\
         [Peer]\nPublicKey = {PUB1}\nEndpoint = vpn.example.net:51820\nAllowedIPs = 10.0.0.0/8\n\
         AllowedIPs = 172.16.0.1\nPersistentKeepalive = off\n\
         [PEER]\nPublicKey = {PUB2}\nEndpoint = [2001:db8::1]:51820\nAllowedIPs = 192.0.2.0/24\n"
    );
    let c = ok(&text);
    assert_eq!(c.addresses.len(), 2);
    assert_eq!(c.dns_search, vec!["corp.example".to_string()]);
    assert_eq!(c.mtu, Some(1380));
    assert_eq!(c.listen_port, Some(51000));
    assert_eq!(c.peers.len(), 2);
    assert_eq!(
        c.peers[0].endpoint,
        Some(Endpoint::Name {
            host: "vpn.example.net".into(),
            port: 51820
        })
    );
    assert_eq!(c.peers[0].allowed_ips.len(), 2);
    assert_eq!(c.peers[0].persistent_keepalive, None);
    assert!(matches!(c.peers[1].endpoint, Some(Endpoint::Addr(a)) if a.is_ipv6()));
}

#[test]
fn commands_and_host_routing_keys_are_ignored_with_a_warning() {
    let text = good().replace(
        "DNS = 10.64.0.1\n",
        "DNS = 10.64.0.1\nPostUp = iptables -A OUTPUT -j DROP\nTable = off\nFwMark = 0x1\n",
    );
    let c = ok(&text);
    assert_eq!(c.warnings.len(), 3, "{:?}", c.warnings);
    assert!(
        c.warnings[0].contains(":6: PostUp ignored"),
        "{:?}",
        c.warnings
    );
}

#[test]
fn no_dns_warns_that_queries_leave_outside() {
    let c = ok(&good().replace("DNS = 10.64.0.1\n", ""));
    assert!(c.warnings.iter().any(|w| w.contains("outside the tunnel")));
}

#[test]
fn errors_name_file_line_and_key() {
    let cases: Vec<(String, &str)> = vec![
        (
            good().replace("[Interface]", "[Interfaces]"),
            "wireguard.conf:2: unknown section [Interfaces]",
        ),
        (
            good().replace("[Interface]", "[Interface"),
            "wireguard.conf:2: ",
        ),
        (
            format!("PrivateKey = {PRIV}\n{}", good()),
            "wireguard.conf:1: PrivateKey: comes before",
        ),
        (
            good().replace("Address = 10.64.0.2/32", "Address = 10.64.0.300/32"),
            "wireguard.conf:4: Address: \"10.64.0.300/32\"",
        ),
        (
            good().replace("Address = 10.64.0.2/32", "Address = fd00::2/128"),
            "wireguard.conf:2: Address: only IPv6 (fd00::2/128)",
        ),
        (
            good().replace("Address = 10.64.0.2/32", "Address ="),
            "wireguard.conf:4: Address: has no value",
        ),
        (
            good().replace("Address = 10.64.0.2/32", "Address 10.64.0.2"),
            "wireguard.conf:4: \"Address 10.64.0.2\" is not",
        ),
        (
            good().replace("DNS = 10.64.0.1", "DNS = 10.64.0.1, -bad-"),
            "wireguard.conf:5: DNS: \"-bad-\"",
        ),
        (
            good().replace("DNS = 10.64.0.1", "MTU = 70000"),
            "wireguard.conf:5: MTU:",
        ),
        (
            good().replace("DNS = 10.64.0.1", "ListenPort = x"),
            "wireguard.conf:5: ListenPort:",
        ),
        (
            good().replace("DNS = 10.64.0.1", "Bogus = 1"),
            "wireguard.conf:5: Bogus: is not an [Interface] setting",
        ),
        (
            good().replace("PersistentKeepalive = 25", "Bogus = 1"),
            "wireguard.conf:12: Bogus: is not a [Peer] setting",
        ),
        (
            good().replace(&format!("PublicKey = {PUB1}"), "PublicKey = short"),
            "wireguard.conf:8: PublicKey: \"short\"",
        ),
        (
            good().replace("Endpoint = 45.40.0.1:51820", "Endpoint = 45.40.0.1"),
            "wireguard.conf:10: Endpoint:",
        ),
        (
            good().replace("Endpoint = 45.40.0.1:51820", "Endpoint = 45.40.0.1:0"),
            "wireguard.conf:10: Endpoint:",
        ),
        (
            good().replace("Endpoint = 45.40.0.1:51820", "Endpoint = 2001:db8::1:51820"),
            "wireguard.conf:10: Endpoint:",
        ),
        (
            good().replace("Endpoint = 45.40.0.1:51820\n", ""),
            "wireguard.conf:7: Endpoint: missing",
        ),
        (
            good().replace("AllowedIPs = 0.0.0.0/0, ::/0", "AllowedIPs = 0.0.0.0/33"),
            "wireguard.conf:11: AllowedIPs: \"0.0.0.0/33\"",
        ),
        (
            good().replace("PersistentKeepalive = 25", "PersistentKeepalive = soon"),
            "wireguard.conf:12: PersistentKeepalive:",
        ),
        (
            good().replace(&format!("PublicKey = {PUB1}\n"), ""),
            "wireguard.conf:7: PublicKey: missing in [Peer]",
        ),
        (
            format!("{}PublicKey = {PUB2}\n", good()),
            "wireguard.conf:13: PublicKey: is set twice",
        ),
        (
            format!("{}[Interface]\n", good()),
            "wireguard.conf:13: [Interface]: a second [Interface] section (the first is on line 2)",
        ),
        (
            format!(
                "{}[Peer]\nPublicKey = {PUB1}\nEndpoint = 45.40.0.1:1\n",
                good()
            ),
            "wireguard.conf:13: PublicKey: ",
        ),
        (
            good().replace(&format!("PrivateKey = {PRIV}\n"), ""),
            "wireguard.conf:2: PrivateKey: missing",
        ),
        (
            good().replace("Address = 10.64.0.2/32\n", ""),
            "wireguard.conf:2: Address: missing",
        ),
        (
            good()[..good().find("[Peer]").unwrap_or(0)].to_string(),
            "wireguard.conf: [Peer]: missing",
        ),
        (String::new(), "wireguard.conf: [Interface]: missing"),
    ];
    for (text, want) in cases {
        let e = bad(&text);
        assert!(e.contains(want), "want {want:?} in {e:?}\n---\n{text}");
        assert!(e.starts_with("/p/wireguard.conf"), "{e}");
    }
}

#[test]
fn key_material_never_shows() {
    // A private key that is not valid base64 of 32 bytes: the error must
    // not repeat what was written.
    let secret = "c2VjcmV0LXNlY3JldC1zZWNyZXQ=";
    let e = bad(&good().replace(PRIV, secret));
    assert!(e.contains("wireguard.conf:3: PrivateKey:"), "{e}");
    assert!(!e.contains(secret), "{e}");
    let e = bad(&good().replace(PSK, secret));
    assert!(!e.contains(secret), "{e}");
    // Debug of a parsed config shows neither the private nor the
    // preshared key.
    let debug = format!("{:?}", ok(&good()));
    assert!(!debug.contains(PRIV) && !debug.contains(PSK), "{debug}");
    assert!(debug.contains("Key(hidden)"));
    // Public keys are shown as wg shows them.
    assert_eq!(PublicKey([2; 32]).to_string(), PUB1);
}

#[test]
fn garbage_never_panics() {
    let text = good();
    let bytes = text.as_bytes();
    for cut in 0..bytes.len() {
        let t = String::from_utf8_lossy(&bytes[..cut]);
        let _ = parse(&file(), &t);
    }
    for junk in [
        "=",
        "[",
        "]",
        "[]",
        "==",
        "# only",
        "\u{feff}[Interface]",
        "[Peer]\n=",
    ] {
        let _ = parse(&file(), junk);
    }
}
