//! Commands about the host and the project folder: `init`, `pubkey`,
//! `doctor`.

use std::path::Path;
use std::process::Command;

use super::Result;
use crate::error::Error;
use crate::exit;
use crate::provision::keys;

pub fn init(dir: &Path, force: bool) -> Result<u8> {
    crate::config::check_ours(dir)?;
    let files = [
        (
            dir.join(crate::config::FILE_NAME),
            crate::config::INIT_MIGRANTFILE,
        ),
        (dir.join("cloud-init.yml"), crate::config::INIT_CLOUD_INIT),
    ];
    if !force && let Some((p, _)) = files.iter().find(|(p, _)| p.exists()) {
        return Err(Error::other(
            exit::USAGE,
            format!(
                "{} exists; `migrant init --force` overwrites it",
                p.display()
            ),
        ));
    }
    for (path, text) in &files {
        crate::provision::as_user::write_file(path, text.as_bytes(), 0o644)?;
        println!("wrote {}", path.display());
    }
    Ok(0)
}

/// `convert`: print the TOML for the project's bash-style Migrantfile, or
/// (`write`) keep the original as `Migrantfile.orig` and write the TOML in
/// its place, as the invoking user. Nothing is written when the file
/// cannot be converted, or when `Migrantfile.orig` exists already.
pub fn convert(dir: &Path, write: bool) -> Result<u8> {
    let toml = crate::config::convert(dir)?;
    if !write {
        print!("{toml}");
        return Ok(0);
    }
    let file = dir.join(crate::config::FILE_NAME);
    let orig = dir.join(format!("{}.orig", crate::config::FILE_NAME));
    if std::fs::symlink_metadata(&orig).is_ok() {
        return Err(Error::other(
            exit::USAGE,
            format!(
                "{} exists; move it away first (nothing was written)",
                orig.display()
            ),
        ));
    }
    let original = std::fs::read(&file).map_err(Error::io(file.display().to_string()))?;
    // The copy is made before the file is replaced, so the original is
    // never lost.
    crate::provision::as_user::write_file(&orig, &original, 0o644)?;
    crate::provision::as_user::write_file(&file, toml.as_bytes(), 0o644)?;
    println!("kept {}", orig.display());
    println!("wrote {} (TOML)", file.display());
    Ok(0)
}

/// Print the public half of `key`, creating the pair when it is missing.
pub fn pubkey(key: &std::path::Path) -> Result<u8> {
    let who = keys::Invoker::current()?;
    let public = keys::ensure_key(&who, key)?;
    println!("{public}");
    Ok(0)
}

struct Check {
    name: &'static str,
    ok: bool,
    required: bool,
    detail: String,
}

fn version(program: &str, arg: &str) -> std::result::Result<String, String> {
    match Command::new(program).arg(arg).output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
        Err(e) => Err(format!("{program}: {e}")),
    }
}

fn check(name: &'static str, required: bool, r: std::result::Result<String, String>) -> Check {
    match r {
        Ok(detail) => Check {
            name,
            ok: true,
            required,
            detail,
        },
        Err(detail) => Check {
            name,
            ok: false,
            required,
            detail,
        },
    }
}

/// [`crate::hostreq::for_users`] for whoever runs migrant.
fn users_checks() -> Vec<(&'static str, std::result::Result<String, String>)> {
    let exe = std::env::current_exe().unwrap_or_else(|_| "migrant".into());
    let user = crate::provision::keys::Invoker::current().ok();
    crate::hostreq::for_users(
        &exe,
        user.as_ref()
            .map(|u| (u.name.as_str(), u.uid.as_raw(), u.gid.as_raw())),
    )
}

/// Refuse (69) while the host lacks something a VM's user namespace
/// needs, naming each missing thing and its fix.
pub fn require_for_users() -> Result<()> {
    let missing: Vec<String> = users_checks()
        .into_iter()
        .filter_map(|(name, r)| r.err().map(|why| format!("  {name}: {why}")))
        .collect();
    match missing.is_empty() {
        true => Ok(()),
        false => Err(Error::other(
            exit::UNAVAILABLE,
            format!(
                "this host cannot run VMs in user namespaces yet (`migrant doctor` checks):\n{}",
                missing.join("\n")
            ),
        )),
    }
}

pub fn doctor(apparmor_profile: bool) -> Result<u8> {
    if apparmor_profile {
        let exe = std::env::current_exe()
            .map_err(|e| Error::other(exit::SOFTWARE, format!("this binary's own path: {e}")))?;
        let text = crate::hostreq::apparmor_profile(&exe).ok_or_else(|| {
            Error::other(
                exit::CONFIG,
                format!(
                    "{}: no profile for a path with quotes, backslashes or control characters; move the binary",
                    exe.display()
                ),
            )
        })?;
        println!("{text}");
        return Ok(0);
    }
    let mut checks = vec![
        check(
            "qemu",
            true,
            version(crate::qemu::process::QEMU_BINARY, "--version"),
        ),
        check("qemu-img", true, version("qemu-img", "--version")),
        check(
            "ssh client",
            true,
            version("ssh", "-V").or_else(|e| {
                // `ssh -V` prints on stderr.
                Command::new("ssh")
                    .arg("-V")
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
                    .map_err(|_| e)
            }),
        ),
        check("ssh-keygen", true, which_ok("ssh-keygen")),
        check(
            "tun",
            true,
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .map(|_| "/dev/net/tun opens".to_string())
                .map_err(|e| format!("/dev/net/tun: {e}")),
        ),
        check(
            "accelerator",
            false,
            match crate::qemu::accel::kvm_usable() {
                Ok(()) => Ok("KVM runs guests".into()),
                Err(why) => Err(format!(
                    "KVM unusable ({why}); VMs run under TCG, much slower"
                )),
            },
        ),
        check("nftables", false, version("nft", "--version")),
        check(
            "bios firmware",
            false,
            crate::firmware::find_seabios()
                .map(|p| format!("SeaBIOS {}", p.display()))
                .ok_or_else(|| {
                    "SeaBIOS not found where distributions put it (QEMU may still have it built in)"
                        .into()
                }),
        ),
        check("uefi firmware", false, uefi_check(false)),
        check("secure boot", false, uefi_check(true)),
        check("virtiofs", false, qemu_has_device("vhost-user-fs-pci")),
        check("left by root", false, root_leftovers()),
    ];
    let mut fatal = false;
    print_checks(checks.drain(..), &mut fatal);
    // Each VM in a user namespace of its own: what that needs.
    println!("\nuser namespaces (each VM in one of its own):");
    print_checks(
        users_checks()
            .into_iter()
            .map(|(name, result)| check(name, true, result)),
        &mut fatal,
    );
    if fatal {
        println!("\n`migrant up` cannot work on this host until the FAIL lines are fixed.");
        Ok(exit::UNAVAILABLE)
    } else {
        Ok(0)
    }
}

/// Where migrant kept root's VMs when they ran as root (before every VM
/// took the user-namespace path).
const ROOT_STATE: &str = "/var/lib/migrant/vms";

/// VMs a migrant that ran as root left behind: no longer managed.
fn root_leftovers() -> std::result::Result<String, String> {
    let names: Vec<String> = std::fs::read_dir(ROOT_STATE)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    match names.is_empty() {
        true => Ok("nothing".into()),
        false => Err(format!(
            "{ROOT_STATE} holds VMs an older migrant made as root ({}): no longer managed; \
             copy out any disk you need (disk.qcow2 in each), then delete the folder as root",
            names.join(", ")
        )),
    }
}

/// One line per check; `fatal` is set by a required one that failed.
fn print_checks(checks: impl Iterator<Item = Check>, fatal: &mut bool) {
    for c in checks {
        let mark = match (c.ok, c.required) {
            (true, _) => "ok  ",
            (false, true) => "FAIL",
            (false, false) => "warn",
        };
        *fatal |= !c.ok && c.required;
        println!("{mark} {:<14} {}", c.name, c.detail);
    }
}

/// What `firmware = "uefi"` (with `secure_boot` or not) would use.
fn uefi_check(secure: bool) -> std::result::Result<String, String> {
    let home = crate::state::Paths::from_env().home;
    match crate::firmware::find(secure, &home) {
        Some(o) => Ok(format!(
            "{} + {} (from {})",
            o.code.display(),
            o.vars.display(),
            o.origin
        )),
        None if secure => Err(
            "no Secure Boot OVMF with enrolled keys; secure_boot = true will not work (apt-get install ovmf)"
                .into(),
        ),
        None => Err(format!(
            "no OVMF on this host; the first UEFI `up` fetches the ovmf-prebuilt release {} into {}",
            ovmf_prebuilt::Source::LATEST.tag,
            crate::firmware::prebuilt_dir(&home).display()
        )),
    }
}

fn which_ok(program: &str) -> std::result::Result<String, String> {
    crate::qemu::process::which(program)
        .map(|p| p.display().to_string())
        .ok_or_else(|| format!("{program} not found"))
}

/// Whether QEMU was built with `device`.
fn qemu_has_device(device: &str) -> std::result::Result<String, String> {
    let out = Command::new(crate::qemu::process::QEMU_BINARY)
        .args(["-device", "help"])
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains(&format!("\"{device}\"")) {
        Ok(format!("QEMU has {device}"))
    } else {
        Err(format!("QEMU lacks {device}; shared folders will not work"))
    }
}
