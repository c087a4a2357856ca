//! Network isolation and egress on a real guest under TCG, inside test
//! namespaces (see tests/common/net.rs): nothing leaves this machine.

mod common;

use common::net::TestNet;
use common::*;
use std::time::Duration;

/// Each egress policy on one booted guest: the first case on the guest
/// `up` just booted, the others resumed from the memory snapshot taken
/// then, with their own `[network]` settings.
#[test]
fn egress_policies_on_one_guest() {
    let Some(image) = test_image() else { return };
    let root_rules = TestNet::ruleset(None);
    let net = std::cell::RefCell::new(TestNet::new("d"));
    let host_rules = TestNet::ruleset(Some(&net.borrow().host));
    let host = net.borrow().host.clone();
    let env = Env::new_in("net", &image, "", Some(&host));
    env.run_cases(&[
        Case {
            name: "direct_egress_policy_holes_tunnel_and_cleanup",
            // 45.10.0.77 becomes the host's own address after `up` checked
            // the rules: the forward to it must then open nothing.
            extra: "[network]\nrules = [\"allow-host-port tcp/8080\", \"allow-lan-host 192.168.77.50\", \"forward-port tcp/8081 192.168.77.51:80\", \"forward-port tcp/8082 45.10.0.77:9092\"]\n",
            run: &|env| {
                direct_egress_policy_holes_tunnel_and_cleanup(
                    env,
                    &mut net.borrow_mut(),
                    &root_rules,
                    &host_rules,
                )
            },
        },
        Case {
            name: "egress_none",
            extra: "[network]\negress = \"none\"\nrules = [\"allow-host-port tcp/8080\"]\n",
            run: &egress_none,
        },
        Case {
            name: "allow_domains",
            extra: "[network]\nallow_domains = [\"ok.test\", \"*.allowed.test\"]\n",
            run: &allow_domains,
        },
    ]);
}

fn direct_egress_policy_holes_tunnel_and_cleanup(
    env: &Env,
    net: &mut TestNet,
    root_rules: &str,
    host_rules: &str,
) {
    net.add_host_address("45.10.0.77/32");
    net.host_http("45.10.0.77", 9092, "host-gained");
    let served = || {
        std::process::Command::new("ip")
            .args(["netns", "exec", &net.host, "python3", "-c",
                "import urllib.request;print(urllib.request.urlopen('http://45.10.0.77:9092/',timeout=5).read().decode())"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("host-gained"))
            .unwrap_or(false)
    };
    assert!(
        wait_for(Duration::from_secs(30), served),
        "the host's new service does not answer on the host"
    );
    let qemu = env
        .pid_of("qemu-system")
        .unwrap_or_else(|| panic!("no QEMU"));
    let ns = netns_of(qemu).unwrap_or_else(|| panic!("no netns"));

    let r = env.probe(&[
        "dns:ok.test",
        "http:http://ok.test/",
        "http:http://45.20.0.11/",
        "udpdns:45.20.0.53:other.test",
        // DNS over TCP on the gateway, forwarded over TCP.
        "tcpdns:10.0.2.2:ok.test",
        // The gateway: only DNS/DHCP and the named holes.
        "tcp:10.0.2.2:22",
        "tcp:10.0.2.2:80",
        "tcp:10.0.2.2:9999",
        "http:http://10.0.2.2:8080/",
        "http:http://10.0.2.2:9091/",
        "http:http://10.0.2.2:8081/",
        // A forward to an address the host gained later: the host.
        "http:http://10.0.2.2:8082/",
        // The host itself, by its public-looking address.
        "http:http://45.10.0.1:9090/",
        // LAN: only the allowed host; metadata never.
        "http:http://192.168.77.50/",
        "http:http://192.168.77.51/",
        "http:http://169.254.169.254/",
        "tcp:10.0.2.99:22",
    ]);
    expect(&r, "dns:ok.test", "45.20.0.10");
    expect(&r, "http:http://ok.test/", "internet-ok");
    expect(&r, "http:http://45.20.0.11/", "other");
    expect(&r, "udpdns:45.20.0.53:other.test", "45.20.0.11");
    expect(&r, "tcpdns:10.0.2.2:ok.test", "45.20.0.10");
    expect(&r, "tcp:10.0.2.2:22", "ERR");
    expect(&r, "tcp:10.0.2.2:80", "ERR");
    expect(&r, "tcp:10.0.2.2:9999", "ERR");
    expect(&r, "http:http://10.0.2.2:8080/", "host-loopback");
    expect(&r, "http:http://10.0.2.2:9091/", "ERR");
    expect(&r, "http:http://10.0.2.2:8081/", "lan-other");
    expect(&r, "http:http://10.0.2.2:8082/", "ERR");
    // (Gone again: the next `up` below would refuse the rule, rightly.)
    net.remove_host_address("45.10.0.77/32");
    expect(&r, "http:http://45.10.0.1:9090/", "ERR");
    expect(&r, "http:http://192.168.77.50/", "lan");
    expect(&r, "http:http://192.168.77.51/", "ERR");
    expect(&r, "http:http://169.254.169.254/", "ERR");
    expect(&r, "tcp:10.0.2.99:22", "ERR");

    // Counted by the proxy, and the closed gateway ports (22, 80, 9999) by
    // nftables, which resets them before the proxy sees them. (10.0.2.99 is
    // on the guest's own link: its ARP goes unanswered.)
    let status = env.ok(&["status"]);
    for reason in ["host-address", "private", "link-local", "gateway-port"] {
        assert!(status.contains(reason), "status lacks {reason}: {status}");
    }
    let json = env.ok(&["status", "--json"]);
    let json: serde_json::Value =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    let refused = json["network"]["denied"]["gateway-port"]
        .as_u64()
        .unwrap_or(0);
    assert!(refused >= 3, "gateway refusals not counted: {json}");

    // The journal turned into a policy: the names the guest reached, as
    // the allow_domains that would admit them (what it looked up and
    // connected to above).
    let suggested = || {
        let out = env.run(&["egress", "--suggest"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        wait_for(Duration::from_secs(15), || suggested()
            .contains("\"ok.test\", # ")),
        "egress --suggest: {}",
        suggested()
    );
    let policy: toml::Value =
        toml::from_str(&suggested()).unwrap_or_else(|e| panic!("{e}: {}", suggested()));
    let domains = policy["network"]["allow_domains"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        domains.iter().any(|d| d.as_str() == Some("ok.test")),
        "{domains:?}"
    );

    // migrant tunnel: host 127.0.0.1:8000 -> guest 127.0.0.1:8000.
    env.ok(&[
        "ssh",
        "--",
        "nohup python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 </dev/null &",
    ]);
    let mut tunnel = env
        .cmd(&["tunnel", "8000"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let fetch = || {
        std::process::Command::new("ip")
            .args(["netns", "exec", &net.host, "python3", "-c",
                "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:8000/',timeout=5).status)"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "200")
            .unwrap_or(false)
    };
    assert!(
        wait_for(Duration::from_secs(30), fetch),
        "tunnel does not carry HTTP"
    );
    let listening = std::process::Command::new("ip")
        .args(["netns", "exec", &net.host, "ss", "-Hltn", "sport = :8000"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(listening.contains("127.0.0.1:8000"), "{listening}");
    assert!(
        !listening.contains("0.0.0.0:8000") && !listening.contains("*:8000"),
        "{listening}"
    );
    let _ = tunnel.kill();
    let _ = tunnel.wait();

    dataplane_is_confined_and_fails_closed(env);

    // Halt: nothing of the VM's network remains.
    env.ok(&["halt"]);
    env.assert_clean();
    assert!(!netns_in_use(&ns), "the VM's namespace outlived halt");
    assert_eq!(
        TestNet::ruleset(None),
        root_rules,
        "the host's ruleset changed"
    );
    assert_eq!(TestNet::ruleset(Some(&net.host)), host_rules);

    // kill -9 of the supervisor: the same.
    env.ok(&["up"]);
    let sup = env
        .pid_of("__supervisor")
        .unwrap_or_else(|| panic!("no supervisor"));
    let qemu = env
        .pid_of("qemu-system")
        .unwrap_or_else(|| panic!("no QEMU"));
    let ns = netns_of(qemu).unwrap_or_else(|| panic!("no netns"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sup as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        wait_for(Duration::from_secs(5), || !netns_in_use(&ns)),
        "namespace outlived kill -9"
    );
    // The lock goes with the supervisor's last thread, which may outlive
    // the thread whose death took QEMU along by a moment.
    assert!(
        wait_for(Duration::from_secs(5), || common::lock_holders(
            &env.state_dir()
        )
        .is_empty()),
        "the VM's lock outlived kill -9: {:?}",
        common::lock_holders(&env.state_dir())
    );
    let status = env.ok(&["status"]);
    assert!(status.contains("stopped"), "{status}");
    env.assert_clean();
    assert_eq!(TestNet::ruleset(None), root_rules);
    assert_eq!(TestNet::ruleset(Some(&net.host)), host_rules);
}

/// `egress = "none"`: nothing but the named hole on the host.
fn egress_none(none: &Env) {
    let r = none.probe(&[
        "dns:ok.test",
        "http:http://45.20.0.10/",
        "udpdns:45.20.0.53:ok.test",
        "http:http://10.0.2.2:8080/",
    ]);
    expect(&r, "dns:ok.test", "ERR");
    expect(&r, "http:http://45.20.0.10/", "ERR");
    expect(&r, "udpdns:45.20.0.53:ok.test", "ERR");
    expect(&r, "http:http://10.0.2.2:8080/", "host-loopback");
}

/// `allow_domains`: the listed names (a wildcard too), nothing else.
fn allow_domains(allow: &Env) {
    let r = allow.probe(&[
        "http:http://45.20.0.10/",
        "dns:ok.test",
        "dns:api.allowed.test",
        "dns:other.test",
        "http:http://ok.test/",
        "http:http://45.20.0.11/",
        "httphost:45.20.0.10:api.allowed.test",
        "httphost:45.20.0.10:shared.test",
    ]);
    // Before the guest resolved an allowed name, its address is closed.
    expect(&r, "http:http://45.20.0.10/", "ERR");
    expect(&r, "dns:ok.test", "45.20.0.10");
    expect(&r, "dns:api.allowed.test", "45.20.0.10");
    expect(&r, "dns:other.test", "ERR");
    expect(&r, "http:http://ok.test/", "internet-ok");
    expect(&r, "http:http://45.20.0.11/", "ERR");
    expect(&r, "httphost:45.20.0.10:api.allowed.test", "internet-ok");
    expect(&r, "httphost:45.20.0.10:shared.test", "ERR");
    let status = allow.ok(&["status"]);
    assert!(status.contains("not-allowed-domain"), "{status}");
}

/// The fields of `/proc/PID/status` a confinement check reads.
fn proc_status(pid: u32) -> std::collections::HashMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"))
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// The process that parses the guest's packets runs as the VM's own uid
/// with no capabilities, no new privileges, a seccomp filter and an empty
/// root; killed, nothing leaves the VM until the supervisor restarts it.
fn dataplane_is_confined_and_fails_closed(env: &Env) {
    let plane = env
        .pid_of("__dataplane")
        .unwrap_or_else(|| panic!("no dataplane process: {:?}", env.processes()));
    let st = proc_status(plane);
    let (uid, gid) = env.vm_ids();
    for (key, id) in [("Uid", uid), ("Gid", gid)] {
        let id = id.to_string();
        let ids: Vec<&str> = st[key].split_whitespace().collect();
        assert_eq!(ids, vec![id.as_str(); 4], "{key}: {st:?}");
    }
    assert_eq!(st["Groups"], "", "supplementary groups: {st:?}");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        if caps == "CapBnd" {
            continue;
        }
        assert_eq!(st[caps], "0000000000000000", "{caps}: {st:?}");
    }
    assert_eq!(st["NoNewPrivs"], "1", "{st:?}");
    assert_eq!(st["Seccomp"], "2", "{st:?}");
    // Its root is an empty, deleted directory; its descriptors are
    // sockets and pipes only (no file, no folder).
    let root = std::fs::read_link(format!("/proc/{plane}/root"))
        .unwrap_or_else(|e| panic!("root of the dataplane: {e}"));
    assert!(
        root.to_string_lossy().ends_with("(deleted)"),
        "the dataplane's root is {}",
        root.display()
    );
    for fd in std::fs::read_dir(format!("/proc/{plane}/fd"))
        .unwrap_or_else(|e| panic!("{e}"))
        .flatten()
    {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        let t = target.to_string_lossy();
        let fdnum: u32 = fd.file_name().to_string_lossy().parse().unwrap_or(0);
        assert!(
            fdnum <= 2
                || t.starts_with("socket:")
                || t.starts_with("pipe:")
                || t.starts_with("anon_inode:"),
            "the dataplane holds {t} as descriptor {fdnum}"
        );
    }

    // kill -9 while the guest keeps connecting: its attempts fail while
    // no dataplane runs, then succeed again; the new one is confined too.
    env.ok(&[
        "ssh",
        "--",
        "nohup python3 -c 'import time,urllib.request\nfor _ in range(120):\n  try:\n    urllib.request.urlopen(\"http://45.20.0.10/\",timeout=0.5).read(); print(\"ok\",flush=True)\n  except Exception: print(\"fail\",flush=True)\n  time.sleep(0.1)' >/tmp/egress.log 2>&1 </dev/null &",
    ]);
    std::thread::sleep(Duration::from_secs(3));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(plane as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let restarted = wait_for(Duration::from_secs(20), || {
        env.pid_of("__dataplane").is_some_and(|p| p != plane)
    });
    assert!(restarted, "the dataplane was not started again");
    let again = env.pid_of("__dataplane").unwrap_or(plane);
    // The new process installs its filter right after it starts: give it
    // that moment (the first read could come before it).
    assert!(
        wait_for(Duration::from_secs(5), || proc_status(again)
            .get("Seccomp")
            .is_some_and(|s| s == "2")),
        "the restarted dataplane has no seccomp filter: {:?}",
        proc_status(again).get("Seccomp")
    );
    // Let the guest's loop go on with the new dataplane, then read it.
    std::thread::sleep(Duration::from_secs(5));
    let log = env.ok(&["ssh", "--", "cat /tmp/egress.log"]);
    let seq: Vec<&str> = log.lines().collect();
    let first_fail = seq.iter().position(|l| *l == "fail");
    let first_ok = seq.iter().position(|l| *l == "ok");
    let last_ok = seq.iter().rposition(|l| *l == "ok");
    assert!(
        matches!((first_ok, first_fail, last_ok), (Some(a), Some(f), Some(z)) if a < f && f < z),
        "egress should work, stop while the dataplane is dead, then work again: {seq:?}"
    );
    let log = std::fs::read_to_string(env.state_dir().join("supervisor.log")).unwrap_or_default();
    assert!(log.contains("the dataplane exited"), "{log}");
    let status = env.ok(&["status"]);
    assert!(!status.contains("dataplane:"), "{status}");
}
