//! Test networks that never leave this machine: namespaces this test
//! creates and removes.
//!
//! ```text
//!   [host ns] 45.10.0.1 ──veth── 45.10.0.2 [internet ns]  45.20.0.10 http "internet-ok"
//!       │                                                  45.20.0.11 http "other"
//!       │ 192.168.77.1                                     45.20.0.53 dnsmasq
//!       └──veth── 192.168.77.50, .51 [lan ns]  http "lan"
//!   host ns also: 127.0.0.1:8080 http "host-loopback", 45.10.0.1:9090 http "host-public"
//!   internet ns also: 168.63.129.16 http "wireserver" (a cloud host endpoint),
//!     45.20.0.10:443 tcp "hello" to anything and udp echo,
//!     45.20.0.10:9000 holds every connection open; GET /big: 20 MiB
//!   an internal network the host routes over the LAN link, not its
//!     default route: 11.1.0.0/16 via 192.168.77.50; 11.1.0.10 http "internal"
//!   45.20.0.31 and .32: for the test's own servers (secret.test and
//!     its names resolve to .31, untrusted.test and its names to .32;
//!     tests/wireguard.rs adds 45.20.0.12 itself)
//!   DNS: ok.test, other.test, shared.test, api.allowed.test (public),
//!     internal.test (11.1.0.10), split.test (192.168.77.50), and the PTR
//!     of 192.168.77.50 (printer.lan.test)
//! ```
//! With IPv6 ([`TestNet::with_ipv6`]), public-looking addresses too:
//! ```text
//!   [host ns] 2a0a:1000::1 ──veth── 2a0a:1000::2 [internet ns]
//!       │       (default route)        2a0a:2000::10 http "@peer" (answers
//!       │                                with the client's address), tcp
//!       │                                "hello" and udp echo on 443
//!       │ fd77::1 ──veth── fd77::50, ::51 [lan ns] http "lan6", "lan6-other"
//!   host ns also: [::]:9096 http "host6" (every host address)
//!   an internal network over the LAN link: 2a0a:3000::/48 via fd77::50;
//!     2a0a:3000::10 http "internal6"
//!   DNS: v6.test (2a0a:2000::10 and 45.20.0.10), v6only.test
//!     (2a0a:2000::10, no IPv4), split6.test (fd77::50),
//!     internal6.test (2a0a:3000::10)
//! ```
//! migrant runs inside the host namespace (`ip netns exec`), whose
//! resolv.conf (`/etc/netns/<host>/resolv.conf`) names the internet DNS.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

pub struct TestNet {
    pub host: String,
    pub inet: String,
    pub lan: String,
    servers: Vec<Child>,
    etc: PathBuf,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip: {e}"));
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn in_ns(ns: &str, args: &[&str]) {
    let mut a = vec!["netns", "exec", ns];
    a.extend_from_slice(args);
    ip(&a);
}

/// What `args` prints inside `ns`.
fn ns_output(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The test HTTP server on `addr`:`port` in namespace `ns`, answering
/// `body` (`@peer`: the client's address); the caller kills it.
pub fn http_server(ns: &str, addr: &str, port: u16, body: &str) -> Child {
    spawn_in(ns, &["python3", "-c", HTTP, addr, &port.to_string(), body])
}

/// `cmd` run inside namespace `ns`, its output discarded.
fn spawn_in(ns: &str, cmd: &[&str]) -> Child {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("server {cmd:?}: {e}"))
}

/// The word after the first `key` in `text`.
fn word_after<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.split_whitespace().skip_while(|w| *w != key).nth(1)
}

/// A tiny HTTP server answering every request with `body` and echoing
/// the Host header it saw: `python3` from Debian.
const HTTP: &str = r#"
import http.server, socket, socketserver, sys
body = sys.argv[3].encode()
class S(http.server.ThreadingHTTPServer):
    # HTTPServer's own bind looks its address up in DNS (getfqdn): a
    # query from the test's own namespace that no test should see.
    def server_bind(self):
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
if ":" in sys.argv[1]:
    S.address_family = socket.AF_INET6
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        global body
        if sys.argv[3] == "@peer":
            body = self.client_address[0].encode()
        if self.path == "/big":
            self.send_response(200)
            self.send_header("Content-Length", str(20 << 20))
            self.end_headers()
            chunk = b"x" * (1 << 20)
            for _ in range(20):
                self.wfile.write(chunk)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
S((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"#;

/// A TCP server that answers `hello` to whatever a client sends, and a
/// UDP echo, on the same address and port.
const RESPONDER: &str = r#"
import socket, socketserver, sys, threading
addr = (sys.argv[1], int(sys.argv[2]))
if ":" in sys.argv[1]:
    socketserver.UDPServer.address_family = socket.AF_INET6
    socketserver.ThreadingTCPServer.address_family = socket.AF_INET6
class T(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.settimeout(5)
        if self.request.recv(65536):
            self.request.sendall(b"hello\n")
class U(socketserver.BaseRequestHandler):
    def handle(self):
        self.request[1].sendto(self.request[0], self.client_address)
socketserver.ThreadingTCPServer.allow_reuse_address = True
threading.Thread(target=socketserver.UDPServer(addr, U).serve_forever, daemon=True).start()
socketserver.ThreadingTCPServer(addr, T).serve_forever()
"#;

/// Accepts connections and holds them open, silently, as many as come.
const SINK: &str = r#"
import asyncio, resource, sys
try:
    resource.setrlimit(resource.RLIMIT_NOFILE, (65536, 65536))
except (ValueError, OSError):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held = []
async def hold(r, w):
    held.append(w)
    await r.read()
    w.close()
async def main():
    s = await asyncio.start_server(hold, sys.argv[1], int(sys.argv[2]), backlog=4096)
    await s.serve_forever()
asyncio.run(main())
"#;

impl TestNet {
    pub fn new(tag: &str) -> TestNet {
        TestNet::build(tag, false)
    }

    /// The same network, with the IPv6 part of the picture above.
    pub fn with_ipv6(tag: &str) -> TestNet {
        TestNet::build(tag, true)
    }

    fn build(tag: &str, ipv6: bool) -> TestNet {
        let id = format!("{tag}{}", std::process::id() % 100000);
        let net = TestNet {
            host: format!("mgt-h-{id}"),
            inet: format!("mgt-i-{id}"),
            lan: format!("mgt-l-{id}"),
            servers: Vec::new(),
            etc: PathBuf::from(format!("/etc/netns/mgt-h-{id}")),
        };
        for ns in [&net.host, &net.inet, &net.lan] {
            ip(&["netns", "add", ns]);
            in_ns(ns, &["ip", "link", "set", "lo", "up"]);
        }
        let (h, i, l) = (net.host.as_str(), net.inet.as_str(), net.lan.as_str());
        ip(&[
            "link", "add", "mgt-hi", "netns", h, "type", "veth", "peer", "name", "mgt-ih", "netns",
            i,
        ]);
        ip(&[
            "link", "add", "mgt-hl", "netns", h, "type", "veth", "peer", "name", "mgt-lh", "netns",
            l,
        ]);
        in_ns(h, &["ip", "addr", "add", "45.10.0.1/24", "dev", "mgt-hi"]);
        in_ns(
            h,
            &["ip", "addr", "add", "192.168.77.1/24", "dev", "mgt-hl"],
        );
        in_ns(h, &["ip", "link", "set", "mgt-hi", "up"]);
        in_ns(h, &["ip", "link", "set", "mgt-hl", "up"]);
        in_ns(h, &["ip", "route", "add", "default", "via", "45.10.0.2"]);
        in_ns(i, &["ip", "addr", "add", "45.10.0.2/24", "dev", "mgt-ih"]);
        in_ns(i, &["ip", "link", "set", "mgt-ih", "up"]);
        for a in [
            "45.20.0.10/32",
            "45.20.0.11/32",
            "45.20.0.53/32",
            "45.20.0.31/32",
            "45.20.0.32/32",
            "168.63.129.16/32",
        ] {
            in_ns(i, &["ip", "addr", "add", a, "dev", "lo"]);
        }
        in_ns(
            l,
            &["ip", "addr", "add", "192.168.77.50/24", "dev", "mgt-lh"],
        );
        in_ns(
            l,
            &["ip", "addr", "add", "192.168.77.51/24", "dev", "mgt-lh"],
        );
        in_ns(l, &["ip", "link", "set", "mgt-lh", "up"]);
        // An internal network behind a LAN router: routed by the host, but
        // not through its default route.
        in_ns(l, &["ip", "addr", "add", "11.1.0.10/32", "dev", "lo"]);
        in_ns(
            h,
            &["ip", "route", "add", "11.1.0.0/16", "via", "192.168.77.50"],
        );
        std::fs::create_dir_all(&net.etc).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(net.etc.join("resolv.conf"), "nameserver 45.20.0.53\n")
            .unwrap_or_else(|e| panic!("{e}"));
        let mut net = net;
        net.http(&net.inet.clone(), "45.20.0.10", 80, "internet-ok");
        net.http(&net.inet.clone(), "45.20.0.11", 80, "other");
        net.http(&net.lan.clone(), "192.168.77.50", 80, "lan");
        net.http(&net.lan.clone(), "192.168.77.51", 80, "lan-other");
        net.http(&net.lan.clone(), "11.1.0.10", 80, "internal");
        net.http(&net.inet.clone(), "168.63.129.16", 80, "wireserver");
        net.spawn(
            &net.inet.clone(),
            &["python3", "-c", RESPONDER, "45.20.0.10", "443"],
        );
        net.spawn(
            &net.inet.clone(),
            &["python3", "-c", SINK, "45.20.0.10", "9000"],
        );
        net.http(&net.host.clone(), "127.0.0.1", 8080, "host-loopback");
        net.http(&net.host.clone(), "127.0.0.1", 9091, "host-loopback-closed");
        net.http(&net.host.clone(), "45.10.0.1", 9090, "host-public");
        if ipv6 {
            net.add_ipv6();
        }
        let dns = Command::new("ip")
            .args([
                "netns",
                "exec",
                &net.inet,
                "dnsmasq",
                "--address=/v6.test/2a0a:2000::10",
                "--address=/v6only.test/2a0a:2000::10",
                "--address=/v6.test/45.20.0.10",
                "--address=/split6.test/fd77::50",
                "--address=/internal6.test/2a0a:3000::10",
                "--no-daemon",
                "--no-resolv",
                "--no-hosts",
                "--listen-address=45.20.0.53",
                "--bind-interfaces",
                "--port=53",
                "--address=/ok.test/45.20.0.10",
                "--address=/other.test/45.20.0.11",
                "--address=/shared.test/45.20.0.10",
                "--address=/api.allowed.test/45.20.0.10",
                "--address=/internal.test/11.1.0.10",
                "--address=/secret.test/45.20.0.31",
                "--address=/untrusted.test/45.20.0.32",
                "--address=/split.test/192.168.77.50",
                "--ptr-record=50.77.168.192.in-addr.arpa,printer.lan.test",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("dnsmasq: {e}"));
        net.servers.push(dns);
        std::thread::sleep(std::time::Duration::from_millis(500));
        net
    }

    fn add_ipv6(&mut self) {
        let (h, i, l) = (self.host.clone(), self.inet.clone(), self.lan.clone());
        for (ns, dev, addr) in [
            (&h, "mgt-hi", "2a0a:1000::1/64"),
            (&i, "mgt-ih", "2a0a:1000::2/64"),
            (&h, "mgt-hl", "fd77::1/64"),
            (&l, "mgt-lh", "fd77::50/64"),
            (&l, "mgt-lh", "fd77::51/64"),
        ] {
            in_ns(ns, &["ip", "-6", "addr", "add", addr, "dev", dev, "nodad"]);
        }
        for (ns, addr) in [(&i, "2a0a:2000::10/128"), (&l, "2a0a:3000::10/128")] {
            in_ns(ns, &["ip", "-6", "addr", "add", addr, "dev", "lo"]);
        }
        in_ns(
            &h,
            &["ip", "-6", "route", "add", "default", "via", "2a0a:1000::2"],
        );
        in_ns(
            &h,
            &[
                "ip",
                "-6",
                "route",
                "add",
                "2a0a:3000::/48",
                "via",
                "fd77::50",
            ],
        );
        in_ns(
            &i,
            &["ip", "-6", "route", "add", "default", "via", "2a0a:1000::1"],
        );
        in_ns(
            &l,
            &["ip", "-6", "route", "add", "default", "via", "fd77::1"],
        );
        self.http(&i, "2a0a:2000::10", 80, "@peer");
        self.spawn(&i, &["python3", "-c", RESPONDER, "2a0a:2000::10", "443"]);
        self.http(&l, "fd77::50", 80, "lan6");
        self.http(&l, "fd77::51", 80, "lan6-other");
        self.http(&l, "2a0a:3000::10", 80, "internal6");
        self.http(&h, "::", 9096, "host6");
    }

    fn http(&mut self, ns: &str, addr: &str, port: u16, body: &str) {
        self.servers.push(http_server(ns, addr, port, body));
    }

    /// A server process inside `ns`, owned (and killed) by this network.
    pub fn spawn(&mut self, ns: &str, cmd: &[&str]) {
        self.servers.push(spawn_in(ns, cmd));
    }

    /// Count IPv6 TCP and UDP packets that reach the internet namespace
    /// from the host's (see [`TestNet::ipv6_arrived`]).
    pub fn count_ipv6_arrivals(&self) {
        let rules = "add table inet mgtc\n\
            add chain inet mgtc pre { type filter hook prerouting priority -300; }\n\
            add rule inet mgtc pre iifname mgt-ih meta nfproto ipv6 meta l4proto { tcp, udp } counter\n";
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.inet, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("nft: {e}"));
        if let Some(mut stdin) = child.stdin.take() {
            std::io::Write::write_all(&mut stdin, rules.as_bytes())
                .unwrap_or_else(|e| panic!("nft: {e}"));
        }
        let status = child.wait().unwrap_or_else(|e| panic!("nft: {e}"));
        assert!(status.success(), "nft counter in the internet namespace");
    }

    /// IPv6 TCP and UDP packets counted since [`TestNet::count_ipv6_arrivals`].
    pub fn ipv6_arrived(&self) -> u64 {
        let listed = ns_output(&self.inet, &["nft", "list", "chain", "inet", "mgtc", "pre"]);
        word_after(&listed, "packets")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no counter: {listed}"))
    }

    /// Add an address to the host's link towards the internet, while
    /// whatever runs goes on.
    pub fn add_host_address(&self, addr: &str) {
        in_ns(
            &self.host,
            &["ip", "addr", "add", addr, "dev", "mgt-hi", "nodad"],
        );
    }

    /// Remove an address [`TestNet::add_host_address`] added.
    pub fn remove_host_address(&self, addr: &str) {
        in_ns(&self.host, &["ip", "addr", "del", addr, "dev", "mgt-hi"]);
    }

    /// An HTTP server answering `body` on `addr:port` in the host's
    /// namespace (owned by this network).
    pub fn host_http(&mut self, addr: &str, port: u16, body: &str) {
        let host = self.host.clone();
        self.http(&host, addr, port, body);
    }

    /// The host's link-local address on its link towards the internet.
    pub fn host_link_local(&self) -> String {
        let listed = ns_output(
            &self.host,
            &[
                "ip", "-6", "-o", "addr", "show", "dev", "mgt-hi", "scope", "link",
            ],
        );
        word_after(&listed, "inet6")
            .and_then(|a| a.split('/').next())
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no link-local address: {listed}"))
    }

    /// Run `cmd` inside the host namespace.
    pub fn wrap(&self, cmd: &mut Command) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.host])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        if let Some(d) = cmd.get_current_dir() {
            c.current_dir(d);
        }
        c
    }

    /// `nft list ruleset` of a namespace (`None`: the real host's).
    pub fn ruleset(ns: Option<&str>) -> String {
        let out = match ns {
            Some(ns) => Command::new("ip")
                .args(["netns", "exec", ns, "nft", "list", "ruleset"])
                .output(),
            None => Command::new("nft").args(["list", "ruleset"]).output(),
        }
        .unwrap_or_else(|e| panic!("nft: {e}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        for ns in [&self.host, &self.inet, &self.lan] {
            let _ = Command::new("ip")
                .args(["netns", "pids", ns])
                .output()
                .map(|o| {
                    for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                        let _ = Command::new("kill").args(["-9", pid]).status();
                    }
                });
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.etc);
    }
}
