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
const THIRD: &str = "third-api-token-0f93d1";
const OTHER_REAL: &str = "real-other-token-c4f1";
const BAD_REAL: &str = "real-bad-token-9e3a";

/// A test server: HTTPS on `addr`:443 (and plain HTTP on port 80 when
/// the last argument is `http`), logging each request as a JSON line and
/// answering `ok`; under `/git/` it is a git server (`git http-backend`
/// over the bare repositories in `gitroot`) that wants Basic auth, as
/// GitHub does.
const SERVER: &str = r#"
import base64, http.server, json, os, ssl, subprocess, sys, threading
addr, cert, key, log, plain, gitroot = sys.argv[1:7]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def any(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        auth = self.headers.get("Authorization")
        rec = {"method": self.command, "path": self.path, "host": self.headers.get("Host"),
               "authorization": auth, "x_token": self.headers.get("X-Token"),
               "user_agent": self.headers.get("User-Agent"), "body": raw.decode("latin-1")}
        with open(log, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.path.startswith("/git/"):
            return self.git(auth, raw)
        self.answer(200, [], b"ok")
    def answer(self, code, headers, body):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def git(self, auth, body):
        # A placeholder is no credential: only a real token opens the repository.
        who = base64.b64decode(auth[6:]).decode() if auth and auth.startswith("Basic ") else ""
        if not who.startswith("git:real-"):
            return self.answer(401, [("WWW-Authenticate", 'Basic realm="git"')], b"")
        path, _, query = self.path[4:].partition("?")
        env = {"PATH": os.environ["PATH"], "GIT_PROJECT_ROOT": gitroot, "GIT_HTTP_EXPORT_ALL": "1",
               "PATH_INFO": path, "QUERY_STRING": query, "REQUEST_METHOD": self.command,
               "CONTENT_TYPE": self.headers.get("Content-Type") or "", "CONTENT_LENGTH": str(len(body)),
               "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding") or "",
               "GIT_PROTOCOL": self.headers.get("Git-Protocol") or "", "REMOTE_USER": "git"}
        out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        code, headers = 200, []
        for line in head.decode().split("\r\n"):
            k, _, v = line.partition(": ")
            if k.lower() == "status":
                code = int(v.split()[0])
            elif k:
                headers.append((k, v))
        self.answer(code, headers, payload)
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

/// The clients agents use, each with the placeholder as its docs say to
/// pass a token: curl, Node's `fetch`, git cloning over HTTPS with the
/// token in the URL (git sends it as Basic auth after the server's 401).
const CLIENTS: &str = r#"
out() { printf '%s => %s\n' "$1" "$2"; }
out curl "$(curl -sS --max-time 30 -H "Authorization: Bearer $API_TOKEN" https://api.secret.test/curl 2>&1)"
out node "$(node -e 'fetch("https://api.secret.test/node", {headers: {Authorization: "Bearer " + process.env.API_TOKEN}})
  .then(async r => console.log(r.status + " " + await r.text()), e => console.log("ERR " + (e.cause || e)))' 2>/dev/null)"
rm -rf /tmp/clone
if git clone -q "https://git:$API_TOKEN@api.secret.test/git/repo.git" /tmp/clone 2>/tmp/clone.err; then
    out git "$(cat /tmp/clone/README)"
else
    out git "ERR $(tr '\n' ' ' < /tmp/clone.err)"
fi
"#;

/// What the git server serves: `dir/repo.git`, one commit with a README.
const README: &str = "cloned through the broker";

fn git_repository(dir: &Path) {
    let d = dir.display();
    sh(&format!(
        "set -e; cd {d}; git init -q --bare repo.git; git init -q work; cd work; \
         printf '%s\\n' '{README}' > README; git add README; \
         git -c user.name=test -c user.email=test@test commit -q -m one; \
         git push -q ../repo.git HEAD:refs/heads/main; \
         git -C ../repo.git symbolic-ref HEAD refs/heads/main"
    ));
}

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
    lines(env.run_input(&["ssh", "--", "python3", "-", mode], GUEST.as_bytes()))
}

/// A guest script's `check => result` lines.
fn lines(out: std::process::Output) -> std::collections::HashMap<String, String> {
    assert!(out.status.success(), "guest script: {}", common::text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(" => "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The guest still holds `placeholder`, and its Bearer request reached
/// the server with `token`.
fn sends(env: &Env, log: &Path, placeholder: &str, token: &str) {
    let r = guest(env, "bearer");
    expect(&r, "env", placeholder);
    expect(&r, "bearer", "200 ok");
    let seen = requests(log);
    let last = seen
        .iter()
        .rev()
        .find(|q| q["path"] == "/bearer")
        .unwrap_or_else(|| panic!("no /bearer in {seen:?}"));
    assert_eq!(last["authorization"], format!("Bearer {token}"));
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
    git_repository(pki.path());
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
            &pki.path().display().to_string(),
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
    let c = lines(env.run_input(&["ssh", "--", "bash", "-s"], CLIENTS.as_bytes()));
    expect(&c, "curl", "ok");
    expect(&c, "node", "200 ok");
    expect(&c, "git", README);

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
    for path in ["/curl", "/node"] {
        assert_eq!(by_path(path)["authorization"], format!("Bearer {REAL}"));
    }
    // git: the clone's requests after the server's 401 carry the token.
    let git: Vec<&serde_json::Value> = seen
        .iter()
        .filter(|q| q["path"].as_str().is_some_and(|p| p.starts_with("/git/")))
        .collect();
    assert!(
        git.iter().any(|q| q["method"] == "POST"
            && q["authorization"] == format!("Basic {basic}")
            && q["user_agent"]
                .as_str()
                .is_some_and(|u| u.starts_with("git/"))),
        "{git:?}"
    );
    let mut with_real = paths_with(&seen, REAL);
    with_real.extend(paths_with(&seen, &basic));
    with_real.retain(|p| !p.starts_with("/git/"));
    with_real.sort();
    assert_eq!(
        with_real,
        ["/bearer", "/curl", "/git", "/ka1", "/ka2", "/node"],
        "{seen:?}"
    );
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
        "secret API_TOKEN POST /git/repo.git/git-upload-pack 200",
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

    // The policy from the journal: API_TOKEN's host with its count; the
    // host it was refused at, commented out; a secret never sent.
    let suggested = env.ok(&["egress", "--suggest"]);
    for want in [
        "[secrets.API_TOKEN]\nhosts = [\n  \"api.secret.test\", # ",
        "# \"other.secret.test\", # refused 1: not listed for API_TOKEN",
        "# [secrets.OTHER_TOKEN]: sent to no host",
    ] {
        assert!(suggested.contains(want), "{want} not in:\n{suggested}");
    }
    // What migrant says of the VM never holds a value.
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["info"],
        &["info", "--json"],
        &["list", "--json"],
        &["egress", "--json"],
        &["egress", "--suggest"],
    ] {
        let said = common::text(&env.run(args));
        for value in [REAL, OTHER_REAL, BAD_REAL] {
            assert!(!said.contains(value), "{args:?} printed a value:\n{said}");
        }
    }

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

    // A token rotated on the host while the VM is stopped is the one used,
    // after a resume from memory and after `halt` and a cold `up`.
    up(&env, ROTATED, &ca);
    sends(&env, &log, &placeholder, ROTATED);
    env.ok(&["halt"]);
    up(&env, THIRD, &ca);
    sends(&env, &log, &placeholder, THIRD);

    env.ok(&["destroy"]);
    env.assert_clean();
}
