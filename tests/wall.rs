//! The network wall under attack: each probe here is a way a root guest
//! tried to reach what it must not (an internal network the host routes
//! elsewhere, a cloud host endpoint, the LAN through DNS, a host that
//! `allow_domains` does not list) and got through before the fix that
//! closes it. Real guests under TCG, inside test namespaces
//! (tests/common/net.rs): nothing leaves this machine.

mod common;

use common::net::TestNet;
use common::*;

/// The attacks a guest with IPv4 only can make, each a case on one booted
/// guest (every case after the first starts from the memory snapshot the
/// first `up` saved, with its own network settings).
#[test]
fn the_ipv4_wall_holds_against_each_attack() {
    let Some(image) = test_image() else { return };
    let net = TestNet::with_ipv6("w");
    let env = Env::new_in("wall", &image, "", Some(&net.host));
    env.run_cases(&[
        Case {
            name: "egress_reaches_only_the_internet_and_dns_tells_nothing_internal",
            extra: "",
            run: &|env| egress_reaches_only_the_internet(env, &net),
        },
        Case {
            name: "allow_domains_fails_closed",
            extra: "[network]\nallow_domains = [\"ok.test\"]\n",
            run: &allow_domains_fails_closed,
        },
        Case {
            name: "a_flood_from_the_guest_stays_within_its_bounds",
            extra: "",
            run: &a_flood_from_the_guest_stays_within_its_bounds,
        },
    ]);
}

/// The internet by name and address, and nothing internal: not by
/// address, not through DNS, not from a spoofed source, not over IPv6.
fn egress_reaches_only_the_internet(env: &Env, net: &TestNet) {
    // Guest root gives itself a second address, to send from a source
    // that is not its lease, and (IPv6 being off) an IPv6 address and
    // route of its own.
    env.ok(&[
        "ssh",
        "--",
        "dev=$(ip -o -4 route show default | awk '{print $5}'); \
         sudo ip addr add 10.0.2.77/32 dev $dev \
         && sudo sysctl -qw net.ipv6.conf.$dev.disable_ipv6=0 \
         && sudo ip -6 addr add fd6d:6967:7261:6e74::15/64 dev $dev nodad \
         && sudo ip -6 route replace default via fd6d:6967:7261:6e74::2 dev $dev",
    ]);
    net.count_ipv6_arrivals();
    let r = env.probe(&[
        // Controls: the internet works, by name and by address.
        "http:http://ok.test/",
        "http:http://45.20.0.11/",
        // An internal network the host routes over its LAN link (not its
        // default route), outside every private range: by address and
        // by name.
        "http:http://11.1.0.10/",
        "dns:internal.test",
        "dnsq:10.0.2.2:A:internal.test",
        // A cloud host endpoint (Azure's WireServer) on a public address.
        "http:http://168.63.129.16/",
        // Split-horizon: a public name with a LAN address behind it.
        "dnsq:10.0.2.2:A:split.test",
        "dnsq:45.20.0.53:A:split.test",
        // The reverse name of a LAN host, and zone enumeration.
        "dnsq:10.0.2.2:PTR:50.77.168.192.in-addr.arpa",
        "dnsq:10.0.2.2:ANY:ok.test",
        "dnsq:10.0.2.2:AXFR:test",
        // A single-label name.
        "dnsq:10.0.2.2:A:intranet",
        // IPv6 is off: no AAAA answers, so clients do not wait on it,
        // and nothing IPv6 leaves, whatever the guest configures.
        "dnsq:10.0.2.2:AAAA:ok.test",
        "dnsq:10.0.2.2:AAAA:v6.test",
        "http:http://[2a0a:2000::10]/",
        "udp6:2a0a:2000::10:443",
        // A spoofed source address.
        "tcpfrom:10.0.2.15:45.20.0.10:80",
        "tcpfrom:10.0.2.77:45.20.0.10:80",
    ]);
    expect_all(
        &r,
        &[
            ("http:http://ok.test/", "internet-ok"),
            ("http:http://45.20.0.11/", "other"),
            ("http:http://11.1.0.10/", "ERR"),
            ("dns:internal.test", "ERR"),
            ("dnsq:10.0.2.2:A:internal.test", "answers 0"),
            ("http:http://168.63.129.16/", "ERR"),
            ("dnsq:10.0.2.2:A:split.test", "answers 0"),
            // Any server: the guest's DNS goes to the gateway's resolver.
            ("dnsq:45.20.0.53:A:split.test", "answers 0"),
            ("dnsq:10.0.2.2:PTR:50.77.168.192.in-addr.arpa", "rcode 5"),
            ("dnsq:10.0.2.2:ANY:ok.test", "rcode 5"),
            ("dnsq:10.0.2.2:AXFR:test", "rcode 5"),
            ("dnsq:10.0.2.2:A:intranet", "rcode 5"),
            ("dnsq:10.0.2.2:AAAA:ok.test", "answers 0"),
            ("dnsq:10.0.2.2:AAAA:v6.test", "answers 0"),
            ("http:http://[2a0a:2000::10]/", "ERR"),
            ("udp6:2a0a:2000::10:443", "ERR"),
            ("tcpfrom:10.0.2.15:45.20.0.10:80", "open"),
            ("tcpfrom:10.0.2.77:45.20.0.10:80", "ERR"),
        ],
    );

    assert_eq!(net.ipv6_arrived(), 0, "IPv6 left with ipv6 = false");
    // ARP requests from made-up sender addresses fill no neighbour table.
    flood_is_dropped(env, "arpflood:eth0,300");
    let r = env.probe(&["http:http://ok.test/"]);
    expect_all(&r, &[("http:http://ok.test/", "internet-ok")]);

    let status = env.ok(&["status"]);
    for reason in ["not-internet", "cloud-host", "dns-query", "spoofed-source"] {
        assert!(status.contains(reason), "status lacks {reason}: {status}");
    }

    // The egress journal says what the guest talked to, to root and the
    // VM's owner (here root: another local user reads nothing): flows with
    // names and bytes, refusals with their reason, DNS questions.
    let out = env.run_as_nobody(&["egress", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(77),
        "egress as nobody: {}",
        text(&out)
    );
    assert!(out.stdout.is_empty(), "{}", text(&out));
    let out = env.run(&["egress", "--json"]);
    assert!(out.status.success(), "migrant egress: {}", text(&out));
    let entries: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let has = |f: &dyn Fn(&serde_json::Value) -> bool| entries.iter().any(f);
    assert!(
        has(&|e| e["proto"] == "tcp"
            && e["dst"] == "45.20.0.10:80"
            && e["name"] == "ok.test"
            && e["decision"] == "allowed"
            && e["down"].as_u64().unwrap_or(0) > 0),
        "no allowed flow to ok.test: {entries:?}"
    );
    assert!(
        has(&|e| e["dst"] == "11.1.0.10:80" && e["reason"] == "not-internet"),
        "no not-internet refusal: {entries:?}"
    );
    assert!(
        has(&|e| e["proto"] == "dns"
            && e["name"] == "50.77.168.192.in-addr.arpa"
            && e["reason"] == "dns-query"),
        "no refused PTR: {entries:?}"
    );
    let denied = env.ok(&["egress", "--denied"]);
    assert!(denied.contains("DENIED (cloud-host)"), "{denied}");
    assert!(!denied.contains("allowed"), "{denied}");
}

/// `ipv6 = true`: the same wall for IPv6. The guest reaches the
/// internet by address and by name (and the server sees the host's
/// address), and an IPv6 LAN host only through its holes; the host's
/// addresses (one added while the VM runs), its
/// link-local ones, a ULA LAN host, an internal network routed elsewhere,
/// every form of a LAN IPv4 address inside IPv6, multicast and a spoofed
/// source are refused, and DNS does not name what is refused.
#[test]
fn ipv6_egress_reaches_only_the_internet() {
    let Some(image) = test_image() else { return };
    ipv6_wall(&image, "6");
}

/// The same on Debian 13, whose cloud-init renders the static address
/// with netplan (Debian 12: ifupdown).
#[test]
fn ipv6_egress_on_debian_13() {
    let Some(image) = test_image_13() else { return };
    ipv6_wall(&image, "t");
}

fn ipv6_wall(image: &std::path::Path, tag: &str) {
    let net = TestNet::with_ipv6(tag);
    let env = Env::new_in(
        &format!("wall6{tag}"),
        image,
        "[network]\nipv6 = true\nrules = [\"allow-lan-host fd77::51\", \"forward-port tcp/8081 [fd77::50]:80\"]\n",
        Some(&net.host),
    );
    env.ok(&["up"]);
    let addrs = env.ok(&["ssh", "--", "ip -6 -o addr show scope global"]);
    assert!(addrs.contains("fd6d:6967:7261:6e74::15/64"), "{addrs}");
    // A second address to spoof from (deprecated, so that the guest's
    // own connections keep choosing its lease).
    env.ok(&[
        "ssh",
        "--",
        "sudo ip -6 addr add fd6d:6967:7261:6e74::77/64 dev eth0 nodad preferred_lft 0",
    ]);
    let host_ll = net.host_link_local();
    let host_ll_check = format!("tcp:{host_ll}%eth0:9096");
    let r = env.probe(&[
        "http:http://[2a0a:2000::10]/",
        "http:http://v6only.test/",
        "dns6:v6.test",
        "tcp:2a0a:2000::10:443",
        "udp6:2a0a:2000::10:443",
        "dnsq:10.0.2.2:AAAA:v6.test",
        // DNS to the gateway's IPv6 address, over UDP and TCP.
        "udpdns:fd6d:6967:7261:6e74::2:ok.test",
        "tcpdns:fd6d:6967:7261:6e74::2:ok.test",
        // Holes: one IPv6 LAN host, a forward to another (from either
        // gateway address).
        "http:http://[fd77::51]/",
        "http:http://10.0.2.2:8081/",
        "http:http://[fd6d:6967:7261:6e74::2]:8081/",
        // DNS never names what is refused.
        "dnsq:10.0.2.2:AAAA:split6.test",
        "dnsq:10.0.2.2:AAAA:internal6.test",
        // The host itself, its link-local addresses, the LAN, an internal
        // network, LAN IPv4 hosts inside IPv6.
        "http:http://[2a0a:1000::1]:9096/",
        "tcp:fe80::6d:67ff:fe00:1%eth0:80",
        &host_ll_check,
        "http:http://[fd77::50]/",
        "http:http://[2a0a:3000::10]/",
        "http:http://[64:ff9b::c0a8:4d32]/",
        "http:http://[2002:c0a8:4d32::1]/",
        "http:http://[::ffff:192.168.77.50]/",
        "udp6:ff0e::1:5353",
        // A link-local destination from the guest's global address
        // reaches the proxy (from a link-local source, the guest is
        // stopped as a spoofer first).
        "say6:fd6d:6967:7261:6e74::15,fe80::6d:67ff:fe00:1%eth0,443",
        // Only the guest's own address may send.
        "say6:fd6d:6967:7261:6e74::15,2a0a:2000::10,443",
        "say6:fd6d:6967:7261:6e74::77,2a0a:2000::10,443",
    ]);
    expect_all(
        &r,
        &[
            ("http:http://[2a0a:2000::10]/", "2a0a:1000::1"),
            ("http:http://v6only.test/", "2a0a:1000::1"),
            ("dns6:v6.test", "2a0a:2000::10"),
            ("tcp:2a0a:2000::10:443", "open"),
            ("udp6:2a0a:2000::10:443", "ping"),
            ("dnsq:10.0.2.2:AAAA:v6.test", "answers 1"),
            ("udpdns:fd6d:6967:7261:6e74::2:ok.test", "45.20.0.10"),
            ("tcpdns:fd6d:6967:7261:6e74::2:ok.test", "45.20.0.10"),
            ("http:http://[fd77::51]/", "lan6-other"),
            ("http:http://10.0.2.2:8081/", "lan6"),
            ("http:http://[fd6d:6967:7261:6e74::2]:8081/", "lan6"),
            ("dnsq:10.0.2.2:AAAA:split6.test", "answers 0"),
            ("dnsq:10.0.2.2:AAAA:internal6.test", "answers 0"),
            ("http:http://[2a0a:1000::1]:9096/", "ERR"),
            ("tcp:fe80::6d:67ff:fe00:1%eth0:80", "ERR"),
            (&host_ll_check, "ERR"),
            ("http:http://[fd77::50]/", "ERR"),
            ("http:http://[2a0a:3000::10]/", "ERR"),
            ("http:http://[64:ff9b::c0a8:4d32]/", "ERR"),
            ("http:http://[2002:c0a8:4d32::1]/", "ERR"),
            ("http:http://[::ffff:192.168.77.50]/", "ERR"),
            ("udp6:ff0e::1:5353", "ERR"),
            (
                "say6:fd6d:6967:7261:6e74::15,fe80::6d:67ff:fe00:1%eth0,443",
                "ERR",
            ),
            ("say6:fd6d:6967:7261:6e74::15,2a0a:2000::10,443", "hello"),
            ("say6:fd6d:6967:7261:6e74::77,2a0a:2000::10,443", "ERR"),
        ],
    );
    // Neighbour solicitations from made-up link-local sources (each one
    // would make the namespace's kernel remember a neighbour, in tables
    // bounded for the whole host) are dropped before the kernel sees
    // them, and counted; the guest's own neighbour discovery still works.
    flood_is_dropped(&env, "nsflood:eth0,300");
    env.ok(&["ssh", "--", "sudo ip -6 neigh flush dev eth0"]);
    let r = env.probe(&["http:http://[2a0a:2000::10]/"]);
    expect_all(&r, &[("http:http://[2a0a:2000::10]/", "2a0a:1000::1")]);

    // A host address that appears while the VM runs is refused at once.
    net.add_host_address("2a0a:1000::77/64");
    let r = env.probe(&["http:http://[2a0a:1000::77]:9096/"]);
    expect_all(&r, &[("http:http://[2a0a:1000::77]:9096/", "ERR")]);

    let status = env.ok(&["status"]);
    assert!(
        status.contains("ipv6:        fd6d:6967:7261:6e74::15"),
        "{status}"
    );
    for reason in [
        "host-address",
        "link-local",
        "private",
        "not-internet",
        "spoofed-source",
        "multicast",
    ] {
        assert!(status.contains(reason), "status lacks {reason}: {status}");
    }
    let journal = env.ok(&["egress", "--json"]);
    assert!(
        journal.contains("\"dst\":\"[2a0a:2000::10]:80\"") && journal.contains("\"allowed\""),
        "no IPv6 flow in the journal: {journal}"
    );
    // The guest's IPv6 address is set when it is built: turning IPv6 off
    // in the Migrantfile is said, not silently half-applied.
    let file = env.project.join("Migrantfile");
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{e}"));
    let off: String = text
        .lines()
        .filter(|l| !l.starts_with("rules"))
        .map(|l| format!("{}\n", l.replace("ipv6 = true", "ipv6 = false")))
        .collect();
    std::fs::write(&file, off).unwrap_or_else(|e| panic!("{e}"));
    let status = env.ok(&["status"]);
    assert!(
        status.contains("the VM was built with ipv6 = true"),
        "{status}"
    );
    std::fs::write(&file, text).unwrap_or_else(|e| panic!("{e}"));
    env.ok(&["destroy"]);
    env.assert_clean();
}

/// `allow_domains = ["ok.test"]`: a name the list lacks gets nowhere,
/// however the guest hides it.
fn allow_domains_fails_closed(env: &Env) {
    let r = env.probe(&[
        // Admit 45.20.0.10 the only way there is: resolve an allowed name.
        "dns:ok.test",
        "keepalive:45.20.0.10:ok.test:ok.test",
        // A second request on a kept-alive connection names another host.
        "keepalive:45.20.0.10:ok.test:other.test",
        // A Host header behind more headers than a parser takes.
        "manyheaders:45.20.0.10:ok.test:20",
        "manyheaders:45.20.0.10:other.test:100",
        // TLS: the allowed name passes in one record or split over two;
        // another name split over two records, or an allowed outer name
        // with an encrypted inner hello (ECH), does not.
        "tls:45.20.0.10:443:ok.test:one",
        "tls:45.20.0.10:443:ok.test:split",
        "tls:45.20.0.10:443:other.test:one",
        "tls:45.20.0.10:443:other.test:split",
        "tls:45.20.0.10:443:ok.test:ech",
        // QUIC to an admitted address.
        "udp:45.20.0.10:443",
    ]);
    expect_all(
        &r,
        &[
            ("dns:ok.test", "45.20.0.10"),
            ("keepalive:45.20.0.10:ok.test:ok.test", "responses 2"),
            ("keepalive:45.20.0.10:ok.test:other.test", "responses 1"),
            ("manyheaders:45.20.0.10:ok.test:20", "internet-ok"),
            ("manyheaders:45.20.0.10:other.test:100", "ERR"),
            ("tls:45.20.0.10:443:ok.test:one", "hello"),
            ("tls:45.20.0.10:443:ok.test:split", "hello"),
            ("tls:45.20.0.10:443:other.test:one", "ERR"),
            ("tls:45.20.0.10:443:other.test:split", "ERR"),
            ("tls:45.20.0.10:443:ok.test:ech", "ERR"),
            ("udp:45.20.0.10:443", "ERR"),
        ],
    );
    let status = env.ok(&["status"]);
    assert!(status.contains("quic"), "status lacks quic: {status}");
    // The journal names the host each refused request named, not the
    // allowed name the address was looked up by.
    let out = env.ok(&["egress", "--json", "--denied"]);
    let entries: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    for dst in ["45.20.0.10:80", "45.20.0.10:443"] {
        assert!(
            entries.iter().any(|e| e["dst"] == dst
                && e["name"] == "other.test"
                && e["reason"] == "not-allowed-domain"),
            "no refusal naming other.test to {dst}: {entries:?}"
        );
    }
}

#[test]
fn a_lan_hole_aimed_at_the_host_is_refused() {
    let Some(image) = test_image() else { return };
    let net = TestNet::new("l");
    // 192.168.77.1 is the host's own address on its LAN link, 45.10.0.1
    // its address towards the internet (a service listens there).
    for (rule, addr) in [
        ("allow-lan-host 192.168.77.1", "192.168.77.1"),
        ("forward-port tcp/8081 192.168.77.1:9090", "192.168.77.1"),
        ("forward-port tcp/8081 45.10.0.1:9090", "45.10.0.1"),
    ] {
        let env = Env::new_in(
            "wallh",
            &image,
            &format!("[network]\nrules = [\"{rule}\"]\n"),
            Some(&net.host),
        );
        let out = env.run(&["up"]);
        assert_eq!(out.status.code(), Some(78), "{rule}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(addr) && err.contains("holes never open the host"),
            "{rule}: {}",
            text(&out)
        );
        assert!(env.pid_of("qemu-system").is_none(), "a VM was started");
        env.assert_clean();
    }
}

/// The guest's flood, run as root in the guest: an ordinary 20 MiB
/// download starts first, then 5000 held TCP connections (the cap is
/// 4096, or less where the open-file limit is lower), 5 MiB printed on the
/// serial console, 20 000 DNS questions, 6000 UDP flows (cap 4096),
/// 20 000 DNS datagrams to the broadcast address (each one a log line
/// before) and 100 000 refused datagrams.
const FLOOD: &str = r#"
import resource, socket, struct, threading, time, urllib.request
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
result = {}
def download():
    try:
        result["download"] = len(urllib.request.urlopen("http://45.20.0.11/big", timeout=300).read())
    except Exception as e:
        result["download"] = "ERR %s" % type(e).__name__
t = threading.Thread(target=download)
t.start()
def console():
    with open("/dev/ttyS0", "wb", buffering=0) as tty:
        line = b"x" * 1023 + b"\n"
        for _ in range(5 * 1024):
            tty.write(line)
    result["console"] = "done"
time.sleep(2)
held = []
for i in range(5000):
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect(("45.20.0.10", 9000))
    except BlockingIOError:
        pass
    except OSError:
        continue
    held.append(s)
time.sleep(5)
c = threading.Thread(target=console)
c.start()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.setblocking(False)
def send(data, to):
    try:
        u.sendto(data, to)
    except OSError:
        pass
for i in range(20000):
    q = struct.pack(">HHHHHH", i & 0xFFFF, 0x0100, 1, 0, 0, 0)
    for part in ("n%d" % i, "ok", "test"):
        q += bytes([len(part)]) + part.encode()
    send(q + b"\0" + struct.pack(">HH", 1, 1), ("10.0.2.2", 53))
for i in range(6000):
    send(b"x", ("45.20.0.10", 10000 + i))
# DNS to the broadcast address: no reply socket can speak as it.
u.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
for i in range(20000):
    send(b"x" * 12, ("255.255.255.255", 53))
for i in range(100000):
    send(b"x", ("10.9.%d.%d" % (i // 250 % 250, i % 250 + 1), 9))
print("flooded", flush=True)
t.join(300)
c.join(600)
time.sleep(3)
print("download", result.get("download"), flush=True)
print("console", result.get("console"), flush=True)
"#;

fn a_flood_from_the_guest_stays_within_its_bounds(env: &Env) {
    let sup = env
        .pid_of("__supervisor")
        .unwrap_or_else(|| panic!("no supervisor"));
    let plane = env
        .pid_of("__dataplane")
        .unwrap_or_else(|| panic!("no dataplane"));
    // What a compromised QEMU could grow: its output is a pipe into a
    // capped log, and no file it writes may pass its disk's size and the
    // format's tables (RLIMIT_FSIZE; the test disk is 4 GiB).
    let qemu = env
        .pid_of("qemu-system")
        .unwrap_or_else(|| panic!("no QEMU"));
    for (pid, who) in [(qemu, "QEMU"), (sup, "the supervisor")] {
        for fd in [1, 2] {
            let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            assert!(
                target.starts_with("pipe:"),
                "{who}'s descriptor {fd} is {target}, not a pipe into a capped log"
            );
        }
    }
    let limits = std::fs::read_to_string(format!("/proc/{qemu}/limits")).unwrap_or_default();
    let max_file = limits
        .lines()
        .find(|l| l.starts_with("Max file size"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("QEMU's file size is not limited:\n{limits}"));
    assert!(
        max_file < 5 << 30,
        "QEMU may write files of {max_file} bytes"
    );
    let mut flood = env
        .cmd(&["ssh", "--", "sudo", "python3", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    {
        use std::io::Write;
        let mut stdin = flood.stdin.take().unwrap_or_else(|| panic!("no stdin"));
        stdin
            .write_all(FLOOD.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
    }
    // Watch the supervisor and the dataplane while the guest floods them.
    let (mut max_fds, mut max_rss_kib) = (0usize, 0u64);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    while flood.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline {
        let fds_of = |pid: u32| {
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .map(|d| d.count())
                .unwrap_or(0)
        };
        let rss_of = |pid: u32| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("VmRSS:"))
                        .and_then(|l| l.split_whitespace().nth(1))
                        .and_then(|v| v.parse::<u64>().ok())
                })
                .unwrap_or(0)
        };
        let fds = fds_of(sup) + fds_of(plane);
        let rss = rss_of(sup) + rss_of(plane);
        max_fds = max_fds.max(fds);
        max_rss_kib = max_rss_kib.max(rss);
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    let out = flood.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "flood: {stdout}; supervisor and dataplane at most {max_fds} descriptors, {max_rss_kib} KiB resident"
    );
    // The flood neither killed the dataplane nor made it restart.
    assert_eq!(
        env.pid_of("__dataplane"),
        Some(plane),
        "the dataplane did not survive the flood"
    );
    assert!(stdout.contains("flooded"), "{}", text(&out));
    // The ordinary download completed through the flood.
    assert!(stdout.contains("download 20971520"), "{}", text(&out));
    // The bounds README states: 4096 × 6 + 4096 × 2 descriptors (plus the
    // dataplane's and supervisor's own), and memory far below what the
    // guest asked for.
    assert!(max_fds <= 4096 * 8 + 256, "{max_fds} descriptors");
    assert!(max_rss_kib <= 256 * 1024, "{max_rss_kib} KiB resident");
    let status = env.ok(&["status"]);
    assert!(status.contains("too-many-connections"), "{status}");
    // The broadcast DNS datagrams were counted, not logged one by one.
    assert!(status.contains("multicast"), "{status}");
    let size = |name: &str| {
        std::fs::metadata(env.state_dir().join(name))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    // The console's 5 MiB went through a log capped at 2 × 2 MiB.
    assert!(stdout.contains("console done"), "{}", text(&out));
    assert!(size("serial.log") <= 2 << 20, "{}", size("serial.log"));
    assert!(size("serial.log.1") > 0, "the serial log never rotated");
    assert!(size("serial.log.1") <= 2 << 20, "{}", size("serial.log.1"));
    // Log lines and the journal stayed small.
    assert!(
        size("supervisor.log") < 1 << 20,
        "{}",
        size("supervisor.log")
    );
    assert!(
        size("egress.jsonl") + size("egress.jsonl.1") <= 8 << 20,
        "journal {} + {}",
        size("egress.jsonl"),
        size("egress.jsonl.1")
    );
    // And the VM still works afterwards.
    let r = env.probe(&["http:http://ok.test/"]);
    expect_all(&r, &[("http:http://ok.test/", "internet-ok")]);
}

/// `spoofed-source` refusals so far, from `migrant status`.
fn spoofed_count(env: &Env) -> u64 {
    let status = env.ok(&["status"]);
    status
        .split("spoofed-source ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Guest root sends a flood of 300 neighbour-table entries in the making
/// (`check` of guest_probe.py, as root): every packet must be dropped in
/// the namespace and counted as a spoofed source. Without that the
/// namespace's kernel remembers each made-up sender, and neighbour tables
/// are bounded for the whole host: the host and the other VMs could no
/// longer reach new neighbours.
fn flood_is_dropped(env: &Env, check: &str) {
    let before = spoofed_count(env);
    let out = env.run_input(
        &["ssh", "--", "sudo", "python3", "-", check],
        include_bytes!("guest_probe.py"),
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("{check} => sent 300")),
        "{}",
        text(&out)
    );
    let after = spoofed_count(env);
    assert!(
        after >= before + 300,
        "{check}: the made-up senders were not dropped: spoofed-source {before} -> {after}"
    );
}
