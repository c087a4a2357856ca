//! The credential broker on a real guest: the guest holds placeholders,
//! test servers in the test's own namespaces receive the real values, and
//! the real values are nowhere the guest (or the VM's files) could show.
//!
//! One guest serves every case of this file: it boots once (the secrets
//! go into its first boot), is saved to memory, and resumes with a token
//! rotated on the host.

mod common;

use std::path::Path;
use std::process::Command;

use common::net::TestNet;
use common::{Env, expect, test_image};

const REAL: &str = "real-api-token-5d0e1c";
const ROTATED: &str = "rotated-api-token-77ab02";
const OTHER_REAL: &str = "real-other-token-c4f1";
const BAD_REAL: &str = "real-bad-token-9e3a";

/// A test server: HTTPS on `addr`:443 (and plain HTTP on port 80 when
/// the last argument is `http`), logging each request as a JSON line and
/// answering `ok`.
const SERVER: &str = r#"
import http.server, json, ssl, sys, threading
addr, cert, key, log, plain = sys.argv[1:6]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def any(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n).decode("latin-1") if n else ""
        rec = {"method": self.command, "path": self.path, "host": self.headers.get("Host"),
               "authorization": self.headers.get("Authorization"),
               "x_token": self.headers.get("X-Token"), "body": body}
        with open(log, "a") as f:
            f.write(json.dumps(rec) + "\n")
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    do_GET = do_POST = do_PUT = any
    def log_message(self, *a):
        pass
tls = http.server.ThreadingHTTPServer((addr, 443), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
if plain == "http":
    clear = http.server.ThreadingHTTPServer((addr, 80), H)
    threading.Thread(target=clear.serve_forever, daemon=True).start()
tls.serve_forever()
"#;

/// What the guest does, one `check => result` line each.
const GUEST: &str = r#"
import base64, hashlib, http.client, json, os, socket, ssl, sys, urllib.request, urllib.error
tok = os.environ.get("API_TOKEN", "")
def out(k, v):
    print(f"{k} => {v}", flush=True)
def fetch(url, headers=None, data=None, method=None):
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return f"{r.status} {r.read().decode()}"
    except urllib.error.HTTPError as e:
        return f"{e.code} {e.read().decode()[:200]}"
    except Exception as e:
        return f"ERR {type(e).__name__}"
out("env", tok)
out("ssl_cert_file", os.environ.get("SSL_CERT_FILE", ""))
out("bearer", fetch("https://api.secret.test/bearer", {"Authorization": "Bearer " + tok}))
if sys.argv[1:] == ["all"]:
    basic = base64.b64encode(("git:" + tok).encode()).decode()
    out("basic", fetch("https://api.secret.test/git", {"Authorization": "Basic " + basic}))
    c = http.client.HTTPSConnection("api.secret.test", 443, context=ssl.create_default_context(), timeout=30)
    codes = []
    for p in ("/ka1", "/ka2"):
        c.request("GET", p, headers={"Authorization": "Bearer " + tok})
        r = c.getresponse()
        r.read()
        codes.append(str(r.status))
    out("keepalive", " ".join(codes))
    out("body", fetch("https://api.secret.test/publish", {"Content-Type": "application/json"},
                      json.dumps({"text": tok}).encode(), "POST"))
    out("url", fetch("https://api.secret.test/search?q=" + tok))
    out("other", fetch("https://other.secret.test/steal", {"Authorization": "Bearer " + tok}))
    out("clear", fetch("http://plain.secret.test/clear", {"X-Token": tok}))
    out("clear_unlisted", fetch("http://45.20.0.10/", {"X-Token": tok}))
    out("clear_clean", fetch("http://45.20.0.10/"))
    out("untrusted", fetch("https://bad.untrusted.test/", {"Authorization": "Bearer " + os.environ.get("BAD_TOKEN", "")}))
    raw = ssl.create_default_context()
    raw.check_hostname = False
    raw.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("plain.secret.test", 443), timeout=30) as s:
        with raw.wrap_socket(s, server_hostname="plain.secret.test") as t:
            out("passthrough", hashlib.sha256(t.getpeercert(binary_form=True)).hexdigest())
"#;

fn sh(cmd: &str) {
    let out = Command::new("sh")
        .args(["-c", cmd])
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An authority `name` in `dir` and a server certificate from it for
/// `names`: `dir/name.pem`, `dir/name-server.pem`, `…-server.key`.
fn authority(dir: &Path, name: &str, names: &[&str]) {
    let d = dir.display();
    sh(&format!(
        "cd {d} && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
         -keyout {name}.key -out {name}.pem -days 2 -subj /CN={name} 2>/dev/null && \
         openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout {name}-server.key \
         -out {name}-server.csr -subj /CN={first} 2>/dev/null && \
         printf 'subjectAltName=%s\\n' '{sans}' > {name}.ext && \
         openssl x509 -req -in {name}-server.csr -CA {name}.pem -CAkey {name}.key -CAcreateserial \
         -out {name}-server.pem -days 2 -extfile {name}.ext 2>/dev/null && chmod 0644 {name}.pem",
        first = names[0],
        sans = names
            .iter()
            .map(|n| format!("DNS:{n}"))
            .collect::<Vec<_>>()
            .join(","),
    ));
}

/// The log a [`SERVER`] wrote: one JSON object per request.
fn requests(log: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn paths_with(reqs: &[serde_json::Value], needle: &str) -> Vec<String> {
    reqs.iter()
        .filter(|r| r.to_string().contains(needle))
        .map(|r| r["path"].as_str().unwrap_or("").to_string())
        .collect()
}

/// Files under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for e in entries.flatten() {
        let p = e.path();
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            found.extend(files_containing(&p, needle));
        } else if meta.is_file()
            && let Ok(bytes) = std::fs::read(&p)
            && memchr::memmem::find(&bytes, needle).is_some()
        {
            found.push(p.display().to_string());
        }
    }
    found
}

fn up(env: &Env, token: &str, ca: &Path) -> String {
    let out = env
        .cmd(&["up"])
        .env("MIGRANT_TEST_API_TOKEN", token)
        .env("MIGRANT_TEST_OTHER_TOKEN", OTHER_REAL)
        .env("MIGRANT_TEST_BAD_TOKEN", BAD_REAL)
        .env("MIGRANT_UPSTREAM_CA", ca)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("up: {e}"));
    let text = common::text(&out);
    assert!(out.status.success(), "up: {text}");
    text
}

fn guest(env: &Env, mode: &str) -> std::collections::HashMap<String, String> {
    let out = env.run_input(&["ssh", "--", "python3", "-", mode], GUEST.as_bytes());
    assert!(out.status.success(), "guest script: {}", common::text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(" => "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn secrets_reach_their_servers_and_never_the_guest() {
    let Some(image) = test_image() else { return };
    let mut net = TestNet::new("sec");
    let pki = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    authority(
        pki.path(),
        "upstream",
        &["api.secret.test", "other.secret.test", "plain.secret.test"],
    );
    authority(pki.path(), "stranger", &["bad.untrusted.test"]);
    let log = pki.path().join("secret.log");
    let bad_log = pki.path().join("untrusted.log");
    let p = |f: &str| pki.path().join(f).display().to_string();
    let inet = net.inet.clone();
    net.spawn(
        &inet,
        &[
            "python3",
            "-c",
            SERVER,
            "45.20.0.31",
            &p("upstream-server.pem"),
            &p("upstream-server.key"),
            &log.display().to_string(),
            "http",
        ],
    );
    net.spawn(
        &inet,
        &[
            "python3",
            "-c",
            SERVER,
            "45.20.0.32",
            &p("stranger-server.pem"),
            &p("stranger-server.key"),
            &bad_log.display().to_string(),
            "-",
        ],
    );

    let env = Env::new_in(
        "secrets",
        &image,
        "[secrets.API_TOKEN]\nfrom = \"env:MIGRANT_TEST_API_TOKEN\"\nhosts = [\"api.secret.test\"]\n\
         [secrets.OTHER_TOKEN]\nfrom = \"env:MIGRANT_TEST_OTHER_TOKEN\"\nhosts = [\"other.secret.test\"]\n\
         [secrets.BAD_TOKEN]\nfrom = \"env:MIGRANT_TEST_BAD_TOKEN\"\nhosts = [\"bad.untrusted.test\"]\n",
        Some(&net.host),
    );
    // The user's CA file for the test servers (the operator's extra root).
    let ca = env.project.join("upstream-ca.pem");
    std::fs::copy(pki.path().join("upstream.pem"), &ca).unwrap_or_else(|e| panic!("{e}"));

    // A missing secret stops `up` before anything is made.
    let out = env.run(&["up"]);
    assert_eq!(out.status.code(), Some(78), "{}", common::text(&out));
    assert!(
        common::text(&out).contains("secrets.API_TOKEN.from"),
        "{}",
        common::text(&out)
    );
    assert!(!env.state_dir().exists(), "nothing made");

    up(&env, REAL, &ca);
    let r = guest(&env, "all");
    let placeholder = r.get("env").cloned().unwrap_or_default();
    assert!(
        placeholder.starts_with("migrant-secret-API_TOKEN-") && placeholder.len() == 25 + 32,
        "the guest's variable: {placeholder:?}"
    );
    expect(&r, "ssl_cert_file", "/etc/ssl/certs/ca-certificates.crt");
    expect(&r, "bearer", "200 ok");
    expect(&r, "basic", "200 ok");
    expect(&r, "keepalive", "200 200");
    for (check, why) in [
        ("body", "secret-in-body"),
        ("url", "secret-in-url"),
        ("other", "secret-not-for-host"),
        ("clear", "secret-in-clear"),
        ("clear_unlisted", "secret-in-clear"),
    ] {
        let got = r.get(check).cloned().unwrap_or_default();
        assert!(
            got.starts_with("403 ") && got.contains(why),
            "{check}: {got}"
        );
    }
    expect(&r, "clear_clean", "200 internet-ok");
    let untrusted = r.get("untrusted").cloned().unwrap_or_default();
    assert!(untrusted.starts_with("ERR"), "untrusted: {untrusted}");
    // Not a secret's host: end to end, the real server's certificate.
    let der = Command::new("openssl")
        .args(["x509", "-outform", "DER", "-in", &p("upstream-server.pem")])
        .output()
        .unwrap_or_else(|e| panic!("{e}"))
        .stdout;
    let fingerprint = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&der))
    };
    expect(&r, "passthrough", &fingerprint);

    // The servers: the real value in the headers of the allowed requests
    // only, never a refused request, never the placeholder.
    let seen = requests(&log);
    let by_path = |path: &str| {
        seen.iter()
            .find(|q| q["path"] == path)
            .unwrap_or_else(|| panic!("no {path} in {seen:?}"))
    };
    assert_eq!(
        by_path("/bearer")["authorization"],
        format!("Bearer {REAL}")
    );
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("git:{REAL}"));
    assert_eq!(by_path("/git")["authorization"], format!("Basic {basic}"));
    let mut with_real = paths_with(&seen, REAL);
    with_real.extend(paths_with(&seen, &basic));
    with_real.sort();
    assert_eq!(with_real, ["/bearer", "/git", "/ka1", "/ka2"], "{seen:?}");
    assert!(paths_with(&seen, &placeholder).is_empty(), "{seen:?}");
    assert!(paths_with(&seen, OTHER_REAL).is_empty(), "{seen:?}");
    assert!(
        requests(&bad_log).is_empty(),
        "the untrusted server got a request"
    );

    // The journal names each use and refusal, never a value.
    let wanted = [
        "secret API_TOKEN GET /bearer 200",
        "secret API_TOKEN GET /ka2 200",
        "(secret-in-body)",
        "(secret-in-url)",
        "(secret-not-for-host)",
        "(secret-in-clear)",
        "(untrusted-server)",
    ];
    let mut journal = String::new();
    // Refusals reach the journal within its flush interval.
    common::wait_for(std::time::Duration::from_secs(10), || {
        journal = env.ok(&["egress"]);
        wanted.iter().all(|w| journal.contains(w))
    });
    for want in wanted {
        assert!(journal.contains(want), "{want} not in:\n{journal}");
    }
    assert!(!journal.contains(REAL), "{journal}");

    // Nowhere the guest could look: its environment, its disk and memory
    // (the VM's files, with a memory snapshot among them), the seed.
    // Every guest process's environment, searched here: the real value
    // is never sent to the guest, not even as a search pattern.
    let environs = env.ok(&[
        "ssh",
        "--",
        "sudo sh -c 'cat /proc/[0-9]*/environ 2>/dev/null | tr \"\\0\" \"\\n\"'",
    ]);
    assert!(
        environs.contains(&format!("API_TOKEN={placeholder}")),
        "the placeholder is in the guest's environment"
    );
    assert!(
        !environs.contains(REAL),
        "the real token in a guest process's environment"
    );
    let saved = env.ok(&["snapshot", "--memory", "--stop"]);
    assert!(saved.contains("memory snapshot saved"), "{saved}");
    for dir in [env.state_dir(), env.run_dir()] {
        let leaks = files_containing(&dir, REAL.as_bytes());
        assert!(leaks.is_empty(), "the real token in {leaks:?}");
    }
    assert!(
        files_containing(&env.state_dir(), placeholder.as_bytes())
            .iter()
            .any(|f| f.ends_with("snapshot.vmstate")),
        "the memory snapshot was searched (the placeholder is in it)"
    );

    // A token rotated on the host while the VM is stopped is the one used.
    up(&env, ROTATED, &ca);
    let r = guest(&env, "bearer");
    expect(&r, "env", &placeholder);
    expect(&r, "bearer", "200 ok");
    let last = requests(&log);
    let last = last
        .iter()
        .rev()
        .find(|q| q["path"] == "/bearer")
        .unwrap_or_else(|| panic!("no second /bearer"));
    assert_eq!(last["authorization"], format!("Bearer {ROTATED}"));

    env.ok(&["destroy"]);
    env.assert_clean();
}
