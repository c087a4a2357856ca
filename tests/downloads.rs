//! Image downloads against a local HTTP server on 127.0.0.1 (never any
//! other address): an image name resolved through `MIGRANT_IMAGE_MIRROR`,
//! a wrong checksum, a truncated body, a 404, a connection cut mid-way and
//! resumed, and two concurrent `up`s sharing one download. Each checks the
//! message, the exit code and that the cache holds no partial file.
//!
//! These need `qemu-img` (downloads are checked with it) but no root and
//! no guest.

mod common;

use common::http::{Behavior, Body, Server, noise};
use common::*;
use migrant::image::checksum::{Algo, Digest};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn have_qemu_img() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("MIGRANT_REQUIRE_INTEGRATION").is_none(),
            "qemu-img is missing; run scripts/setup"
        );
        eprintln!("SKIPPED: no qemu-img");
    }
    ok
}

fn digest(algo: Algo, data: &[u8]) -> Digest {
    let mut h = algo.hasher();
    h.update(data);
    h.finish()
}

/// A scratch MIGRANT_HOME and the `migrant` command using it.
struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    fn new() -> Home {
        Home {
            dir: tempfile::Builder::new()
                .prefix("migrant-dl-")
                .tempdir()
                .unwrap_or_else(|e| panic!("{e}")),
        }
    }
    fn images(&self) -> PathBuf {
        self.dir.path().join("images")
    }
    fn run(&self, args: &[&str], mirror: Option<&str>) -> Output {
        let mut c = Command::new(bin());
        c.args(args)
            .current_dir(self.dir.path())
            .env("MIGRANT_HOME", self.dir.path())
            .env("MIGRANT_RUNTIME", self.dir.path().join("run"))
            .env("HOME", self.dir.path())
            .env_remove("MIGRANT_IMAGE_MIRROR")
            .env_remove("http_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("ALL_PROXY")
            .stdin(std::process::Stdio::null());
        if let Some(m) = mirror {
            c.env("MIGRANT_IMAGE_MIRROR", m);
        }
        c.output().unwrap_or_else(|e| panic!("{e}"))
    }
    /// Files in the cache, hidden ones included.
    fn cache_files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.images())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
    #[track_caller]
    fn assert_no_partial(&self) {
        let files = self.cache_files();
        assert!(
            files.iter().all(|f| !f.starts_with('.')),
            "partial or lock files left in the cache: {files:?}"
        );
    }
}

fn all_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn downloads_verify_resume_and_leave_nothing_behind() {
    if !have_qemu_img() {
        return;
    }
    let server = Server::start();
    let home = Home::new();

    // 1. An image name, through the mirror: Debian's SHA512SUMS list.
    let image = noise(6 << 20, 1);
    let d512 = digest(Algo::Sha512, &image);
    let dir = "/debian/bookworm/latest";
    server.add_bytes(
        &format!("{dir}/debian-12-genericcloud-amd64.qcow2"),
        image.clone(),
        Behavior::Normal,
    );
    server.add_bytes(
        &format!("{dir}/SHA512SUMS"),
        format!(
            "{}  debian-12-genericcloud-amd64.json\n{}  debian-12-genericcloud-amd64.qcow2\n",
            "0".repeat(128),
            d512.hex
        )
        .into_bytes(),
        Behavior::Normal,
    );
    let out = home.run(&["image", "pull", "debian-12"], Some(&server.base()));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let t = all_text(&out);
    assert!(t.contains("downloading"), "{t}");
    let cached = home.images().join(format!(
        "debian-12-genericcloud-amd64-{}.qcow2",
        d512.short()
    ));
    assert_eq!(std::fs::read(&cached).ok().as_deref(), Some(&image[..]));
    home.assert_no_partial();
    // A second pull finds it in the cache without downloading again.
    let out = home.run(&["image", "pull", "debian-12"], Some(&server.base()));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        all_text(&out).contains("using cached image"),
        "{}",
        text(&out)
    );
    let (full, _) = server.requests_for(&format!("{dir}/debian-12-genericcloud-amd64.qcow2"));
    assert_eq!(full, 1, "downloaded twice");
    let list = home.run(&["image", "list", "--json"], None);
    let listed: serde_json::Value =
        serde_json::from_slice(&list.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&list)));
    assert_eq!(listed[0]["alias"], "debian-12");
    assert_eq!(listed[0]["digest"], d512.to_string());

    // Ubuntu's SHA256SUMS (`*name` style).
    let small = noise(1 << 20, 2);
    let d256 = digest(Algo::Sha256, &small);
    server.add_bytes(
        "/ubuntu/24.04/release/ubuntu-24.04-server-cloudimg-amd64.img",
        small,
        Behavior::Normal,
    );
    server.add_bytes(
        "/ubuntu/24.04/release/SHA256SUMS",
        format!("{} *ubuntu-24.04-server-cloudimg-amd64.img\n", d256.hex).into_bytes(),
        Behavior::Normal,
    );
    let out = home.run(&["image", "pull", "ubuntu-24.04"], Some(&server.base()));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    home.assert_no_partial();

    // 2. A wrong checksum: 65, the URL and both digests, nothing kept.
    let body = noise(2 << 20, 3);
    let real = digest(Algo::Sha256, &body);
    server.add_bytes("/bad/x.img", body.clone(), Behavior::Normal);
    let wrong = format!("sha256:{}", "0".repeat(64));
    let before = home.cache_files();
    let out = home.run(
        &[
            "image",
            "pull",
            &server.url("/bad/x.img"),
            "--checksum",
            &wrong,
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(65), "{}", text(&out));
    let t = all_text(&out);
    assert!(t.contains("checksum mismatch"), "{t}");
    assert!(t.contains(&server.url("/bad/x.img")), "{t}");
    assert!(t.contains(&wrong) && t.contains(&real.to_string()), "{t}");
    assert_eq!(home.cache_files(), before, "the wrong image was kept");

    // 3. A truncated body (the server always stops half-way): 69 after
    // retries, the URL and both digests, nothing kept.
    server.add_bytes("/trunc/x.img", body.clone(), Behavior::CutAt(1 << 20));
    let out = home.run(
        &[
            "image",
            "pull",
            &server.url("/trunc/x.img"),
            "--checksum",
            &real.to_string(),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(69), "{}", text(&out));
    let t = all_text(&out);
    assert!(t.contains(&server.url("/trunc/x.img")), "{t}");
    assert!(t.contains(&format!("expected {real}")), "{t}");
    let half = digest(Algo::Sha256, &body[..1 << 20]);
    assert!(t.contains(&format!("got {half}")), "{t}");
    assert!(t.contains("gave up"), "{t}");
    assert_eq!(home.cache_files(), before);

    // 4. 404: 69, the URL, the status, nothing kept.
    let out = home.run(
        &[
            "image",
            "pull",
            &server.url("/missing/x.img"),
            "--checksum",
            &real.to_string(),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(69), "{}", text(&out));
    let t = all_text(&out);
    assert!(
        t.contains("404") && t.contains(&server.url("/missing/x.img")),
        "{t}"
    );
    assert!(t.contains(&real.to_string()), "{t}");
    assert_eq!(home.cache_files(), before);

    // 5. A connection cut a third of the way, then resumed with Range.
    let big = noise(3 << 20, 4);
    let dbig = digest(Algo::Sha512, &big);
    server.add_bytes("/cut/x.img", big.clone(), Behavior::CutOnce(1 << 20));
    server.add_bytes(
        "/cut/SHA512SUMS",
        format!("{}  x.img\n", dbig.hex).into_bytes(),
        Behavior::Normal,
    );
    // No image_checksum: the SHA512SUMS beside it is used.
    let out = home.run(&["image", "pull", &server.url("/cut/x.img")], None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(all_text(&out).contains("resuming at"), "{}", text(&out));
    let (full, ranges) = server.requests_for("/cut/x.img");
    assert_eq!(full, 1);
    assert_eq!(ranges, vec![format!("bytes={}-", 1 << 20)]);
    let cached = home.images().join(format!("x-{}.img", dbig.short()));
    assert_eq!(std::fs::read(&cached).ok().as_deref(), Some(&big[..]));
    home.assert_no_partial();

    // 6. A download killed earlier (its partial file left behind) is
    // resumed by the next pull.
    let body6 = noise(2 << 20, 6);
    let d6 = digest(Algo::Sha256, &body6);
    server.add_bytes("/killed/k.img", body6.clone(), Behavior::Normal);
    let name6 = format!("k-{}.img", d6.short());
    std::fs::write(
        home.images().join(format!(".{name6}.partial")),
        &body6[..700_000],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let out = home.run(
        &[
            "image",
            "pull",
            &server.url("/killed/k.img"),
            "--checksum",
            &d6.to_string(),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        all_text(&out).contains("resuming an interrupted download"),
        "{}",
        text(&out)
    );
    assert_eq!(
        server.requests_for("/killed/k.img").1,
        vec!["bytes=700000-".to_string()]
    );
    assert_eq!(
        std::fs::read(home.images().join(&name6)).ok().as_deref(),
        Some(&body6[..])
    );
    home.assert_no_partial();

    // 7. A checksum file of its own beside the image, as Arch Linux
    // publishes (`<image>.SHA256`, a GNU line), or a bare digest
    // (`<image>.sha512`): no image_checksum needed.
    let arch = noise(1 << 20, 7);
    let darch = digest(Algo::Sha256, &arch);
    server.add_bytes("/arch/cloudimg.img", arch.clone(), Behavior::Normal);
    server.add_bytes(
        "/arch/cloudimg.img.SHA256",
        format!("{}  cloudimg.img\n", darch.hex).into_bytes(),
        Behavior::Normal,
    );
    let out = home.run(&["image", "pull", &server.url("/arch/cloudimg.img")], None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        home.images()
            .join(format!("cloudimg-{}.img", darch.short()))
            .is_file()
    );
    let bare = noise(1 << 20, 8);
    let dbare = digest(Algo::Sha512, &bare);
    server.add_bytes("/bare/b.img", bare, Behavior::Normal);
    server.add_bytes(
        "/bare/b.img.sha512",
        format!("{}\n", dbare.hex).into_bytes(),
        Behavior::Normal,
    );
    let out = home.run(&["image", "pull", &server.url("/bare/b.img")], None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // A per-image file whose digest does not match: refused, nothing kept.
    server.add_bytes("/wrong/w.img", noise(1 << 20, 9), Behavior::Normal);
    server.add_bytes(
        "/wrong/w.img.sha256",
        format!("{}  w.img\n", "cd".repeat(32)).into_bytes(),
        Behavior::Normal,
    );
    let out = home.run(&["image", "pull", &server.url("/wrong/w.img")], None);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    home.assert_no_partial();

    // 8. No checksum anywhere: a configuration error (78).
    server.add_bytes("/nosum/x.img", body, Behavior::Normal);
    let out = home.run(&["image", "pull", &server.url("/nosum/x.img")], None);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(all_text(&out).contains("image_checksum"), "{}", text(&out));
    home.assert_no_partial();

    // Prune removes the unused images.
    let out = home.run(&["image", "prune"], None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(home.cache_files().is_empty(), "{:?}", home.cache_files());
}

/// A qcow2 holding `data_mib` MiB of data, `virtual_gib` GiB large.
fn qcow2(dir: &Path, data_mib: usize, virtual_gib: u64) -> PathBuf {
    let raw = dir.join("data.raw");
    std::fs::write(&raw, noise(data_mib << 20, 9)).unwrap_or_else(|e| panic!("{e}"));
    let img = dir.join("base.qcow2");
    let ok = |c: &mut Command| {
        let o = c.output().unwrap_or_else(|e| panic!("{e}"));
        assert!(o.status.success(), "{}", text(&o));
    };
    ok(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&img));
    ok(Command::new("qemu-img")
        .args(["resize", "-q"])
        .arg(&img)
        .arg(format!("{virtual_gib}G")));
    let _ = std::fs::remove_file(raw);
    img
}

#[test]
fn concurrent_ups_share_one_download() {
    if !have_qemu_img() {
        return;
    }
    let scratch = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // 3 MiB of data, 8 GiB virtual: bigger than the VMs' 4G disk, so both
    // `up`s stop right after the image stage (no guest boots here).
    let img = qcow2(scratch.path(), 3, 8);
    let data = std::fs::read(&img).unwrap_or_else(|e| panic!("{e}"));
    let d = digest(Algo::Sha512, &data);
    let server = Server::start();
    server.add(
        "/shared/base.qcow2",
        Body::File(img.clone()),
        Behavior::Throttle(1 << 20),
    );
    server.add_bytes(
        "/shared/SHA512SUMS",
        format!("{}  base.qcow2\n", d.hex).into_bytes(),
        Behavior::Normal,
    );
    let url = server.url("/shared/base.qcow2");
    let a = Env::new("dl-a", Path::new(&url), "");
    let b = Env::new("dl-b", Path::new(&url), "");
    // One cache for both.
    let state = a.root.path().join("state");
    let start = |env: &Env| {
        env.cmd(&["up"])
            .env("MIGRANT_HOME", &state)
            .env_remove("MIGRANT_IMAGE_MIRROR")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let first = start(&a);
    assert!(
        wait_for(std::time::Duration::from_secs(20), || server
            .requests_for("/shared/base.qcow2")
            .0
            >= 1),
        "the first up never asked for the image"
    );
    let second = start(&b);
    let outs = [
        first.wait_with_output().unwrap_or_else(|e| panic!("{e}")),
        second.wait_with_output().unwrap_or_else(|e| panic!("{e}")),
    ];
    for out in &outs {
        assert_eq!(out.status.code(), Some(78), "{}", text(out));
        assert!(
            all_text(out).contains("smaller than the image's virtual size"),
            "{}",
            text(out)
        );
    }
    assert!(
        all_text(&outs[1]).contains("waiting for another migrant process downloading"),
        "{}",
        text(&outs[1])
    );
    let (full, ranges) = server.requests_for("/shared/base.qcow2");
    assert_eq!(
        (full, ranges.len()),
        (1, 0),
        "the image was downloaded more than once"
    );
    let images: Vec<String> = std::fs::read_dir(state.join("images"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let name = format!("base-{}.qcow2", d.short());
    let mut want = vec![name.clone(), format!("{name}.json")];
    want.sort();
    let mut got = images.clone();
    got.sort();
    assert_eq!(got, want, "cache content");
    // Neither failed `up` left a VM behind.
    for env in [&a, &b] {
        assert!(!state.join("vms").join(&env.name).exists());
    }
}
