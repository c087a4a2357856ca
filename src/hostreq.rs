//! What a host must offer for migrant to run as an ordinary user (user
//! namespaces, subordinate ids, `uidmap`, a TUN device users may open),
//! each checked with the exact fix when it is missing. `migrant doctor`
//! prints them ([`for_users`]); run by a user, `up` refuses to start
//! (69) while one is missing, with the same text.

use crate::subid;

/// Every check a user's `up` needs, by name, for the user `name` with
/// ids `(uid, gid)` (`None`: cannot tell who runs migrant).
pub fn for_users(
    exe: &std::path::Path,
    user: Option<(&str, u32, u32)>,
) -> Vec<(&'static str, Result<String, String>)> {
    let ids = match user {
        Some((name, uid, gid)) => subordinate_ids(name, uid, gid),
        None => Err("cannot tell who runs migrant".into()),
    };
    vec![
        ("user ns", user_namespaces(exe)),
        ("subids", ids),
        ("uidmap", uidmap()),
        ("modules", modules()),
        ("tun (users)", tun_for_users()),
    ]
}

/// Unprivileged user namespaces: enabled, and not restricted by AppArmor.
pub fn user_namespaces(exe: &std::path::Path) -> Result<String, String> {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .ok()
            .map(|s| s.trim().to_string())
    };
    user_namespaces_from(
        read("/proc/sys/user/max_user_namespaces").as_deref(),
        read("/proc/sys/kernel/unprivileged_userns_clone").as_deref(),
        read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").as_deref(),
        exe,
    )
}

/// [`user_namespaces`] from the three sysctls' values (`None`: the kernel
/// has no such setting).
fn user_namespaces_from(
    max: Option<&str>,
    debian_switch: Option<&str>,
    apparmor: Option<&str>,
    exe: &std::path::Path,
) -> Result<String, String> {
    if max == Some("0") {
        return Err("user namespaces are disabled: `sysctl -w user.max_user_namespaces=15000`, and the same line in /etc/sysctl.d/ to keep it".into());
    }
    if debian_switch == Some("0") {
        return Err("unprivileged user namespaces are off: `sysctl -w kernel.unprivileged_userns_clone=1`, and the same line in /etc/sysctl.d/ to keep it".into());
    }
    if apparmor == Some("1") {
        return Err(format!(
            "AppArmor restricts unprivileged user namespaces (Ubuntu 23.10 and later); allow them for migrant once, as root:\n{}",
            apparmor_profile(exe).unwrap_or_else(|| format!(
                "(move migrant to a path without quotes, backslashes or control characters first: {})",
                exe.display()
            ))
        ));
    }
    Ok("unprivileged user namespaces allowed".into())
}

/// The commands that install an AppArmor profile letting `exe` (and only
/// it) create user namespaces; `None` for a path these commands could not
/// carry safely (a quote, a backslash, a control character: the text is
/// meant to be run by root's shell).
pub fn apparmor_profile(exe: &std::path::Path) -> Option<String> {
    let path = exe.to_str()?;
    if path
        .chars()
        .any(|c| c.is_control() || c == '"' || c == '\\')
    {
        return None;
    }
    Some(format!(
        "cat > /etc/apparmor.d/migrant <<'EOF'\n\
         abi <abi/4.0>,\n\
         include <tunables/global>\n\
         profile migrant \"{path}\" flags=(unconfined) {{\n\
         \x20 userns,\n\
         }}\n\
         EOF\n\
         apparmor_parser -r /etc/apparmor.d/migrant"
    ))
}

/// The invoking user's subordinate uids and gids: at least
/// [`subid::NEEDED`] of each.
pub fn subordinate_ids(name: &str, uid: u32, gid: u32) -> Result<String, String> {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    subordinate_ids_from(&read("/etc/subuid"), &read("/etc/subgid"), name, (uid, gid))
}

fn subordinate_ids_from(
    subuid: &str,
    subgid: &str,
    name: &str,
    (uid, gid): (u32, u32),
) -> Result<String, String> {
    let uids = subid::total(&subid::ranges(subuid, name, uid));
    let gids = subid::total(&subid::ranges(subgid, name, gid));
    if uids >= u64::from(subid::NEEDED) && gids >= u64::from(subid::NEEDED) {
        return Ok(format!("{name}: {uids} subordinate uids, {gids} gids"));
    }
    let start = free_start(&[subuid, subgid]);
    let end = u64::from(start) + u64::from(subid::NEEDED) - 1;
    Err(format!(
        "{name} has {uids} subordinate uids and {gids} gids ({} of each needed): `usermod --add-subuids {start}-{end} --add-subgids {start}-{end} {name}`",
        subid::NEEDED
    ))
}

/// The first id from 100000 up, aligned to 65536, past every range of
/// every user in `files`: a range `usermod` can add without overlapping.
fn free_start(files: &[&str]) -> u32 {
    let end = files
        .iter()
        .flat_map(|text| text.lines())
        .filter_map(|line| {
            let mut p = line.trim().split(':').skip(1);
            let start: u64 = p.next()?.parse().ok()?;
            let count: u64 = p.next()?.parse().ok()?;
            Some(start + count)
        })
        .max()
        .unwrap_or(0)
        .max(100_000);
    let step = u64::from(subid::NEEDED);
    let aligned = end.div_ceil(step) * step;
    u32::try_from(aligned).unwrap_or(100_000)
}

/// `newuidmap` and `newgidmap`, which map a user's subordinate ids.
pub fn uidmap() -> Result<String, String> {
    match (
        crate::qemu::process::which("newuidmap"),
        crate::qemu::process::which("newgidmap"),
    ) {
        (Some(u), Some(_)) => Ok(format!("{} and newgidmap", u.display())),
        _ => Err("newuidmap/newgidmap not found: `apt-get install uidmap`".into()),
    }
}

/// Kernel modules the VM's namespace needs that a user namespace cannot
/// load on demand: the TUN/TAP driver and the netfilter parts of the
/// ruleset (TPROXY, socket matching, rejects, connection tracking).
pub const MODULES: &[&str] = &[
    "tun",
    "nft_tproxy",
    "nf_tproxy_ipv4",
    "nf_tproxy_ipv6",
    "nft_socket",
    "nft_reject_inet",
    "nft_ct",
];

/// Each of [`MODULES`] loaded or built into the kernel.
pub fn modules() -> Result<String, String> {
    let loaded = std::fs::read_to_string("/proc/modules").ok();
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let builtin = std::fs::read_to_string(format!("/lib/modules/{release}/modules.builtin"))
        .unwrap_or_default();
    modules_from(loaded.as_deref(), &builtin)
}

/// [`modules`] from `/proc/modules` (`None`: a kernel without loadable
/// modules, where everything is built in) and `modules.builtin`.
fn modules_from(loaded: Option<&str>, builtin: &str) -> Result<String, String> {
    let Some(loaded) = loaded else {
        return Ok("a kernel without loadable modules: all built in".into());
    };
    let has = |m: &str| {
        loaded.lines().any(|l| l.split(' ').next() == Some(m))
            || builtin
                .lines()
                .any(|l| l.rsplit('/').next() == Some(&format!("{m}.ko")))
    };
    let missing: Vec<&str> = MODULES.iter().copied().filter(|m| !has(m)).collect();
    if missing.is_empty() {
        return Ok(format!("{} loaded or built in", MODULES.join(", ")));
    }
    Err(format!(
        "not loaded: {}; a user namespace cannot load them: `modprobe -a {}`, and list them in /etc/modules-load.d/migrant.conf to keep them",
        missing.join(", "),
        missing.join(" ")
    ))
}

/// `/dev/net/tun` opens for every user (Debian's default mode, 0666).
pub fn tun_for_users() -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata("/dev/net/tun")
        .map_err(|e| format!("/dev/net/tun: {e}"))?
        .permissions()
        .mode();
    if mode & 0o006 == 0o006 {
        Ok(format!("/dev/net/tun is {:04o}", mode & 0o7777))
    } else {
        Err(format!(
            "/dev/net/tun is {:04o}: users cannot open it; `chmod 0666 /dev/net/tun` (scripts/setup does, and installs a udev rule that keeps it)",
            mode & 0o7777
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn user_namespace_switches() {
        let exe = Path::new("/usr/local/bin/migrant");
        assert!(user_namespaces_from(Some("96367"), None, None, exe).is_ok());
        assert!(user_namespaces_from(Some("96367"), Some("1"), Some("0"), exe).is_ok());
        let off = user_namespaces_from(Some("0"), None, None, exe);
        assert!(off.is_err_and(|e| e.contains("user.max_user_namespaces")));
        let debian = user_namespaces_from(Some("100"), Some("0"), None, exe);
        assert!(debian.is_err_and(|e| e.contains("kernel.unprivileged_userns_clone=1")));
        let ubuntu = user_namespaces_from(Some("100"), None, Some("1"), exe);
        assert!(
            ubuntu.is_err_and(|e| e.contains("profile migrant \"/usr/local/bin/migrant\"")
                && e.contains("userns,")
                && e.contains("apparmor_parser -r"))
        );
    }

    #[test]
    fn a_profile_is_written_only_for_a_path_root_s_shell_reads_as_one() {
        let p = apparmor_profile(Path::new("/opt/my tools/migrant"));
        assert!(p.is_some_and(|p| p.contains("profile migrant \"/opt/my tools/migrant\" ")));
        for bad in ["/x/\nEOF\nrm -rf /\n", "/x/\"y", "/x/a\\b"] {
            assert_eq!(apparmor_profile(Path::new(bad)), None, "{bad:?}");
        }
    }

    #[test]
    fn modules_loaded_built_in_or_missing() {
        assert!(modules_from(None, "").is_ok());
        let all: String = MODULES
            .iter()
            .map(|m| format!("{m} 16384 0 - Live 0x0\n"))
            .collect();
        assert!(modules_from(Some(&all), "").is_ok());
        let builtin = "kernel/drivers/net/tun.ko\nkernel/net/netfilter/nft_ct.ko\n";
        let some = "nft_tproxy 16384 0 - Live 0x0\nnf_tproxy_ipv4 1 0\nnf_tproxy_ipv6 1 0\nnft_socket 1 0\n";
        let e = modules_from(Some(some), builtin).err().unwrap_or_default();
        assert!(e.contains("not loaded: nft_reject_inet;"), "{e}");
        assert!(e.contains("modprobe -a nft_reject_inet`"), "{e}");
        // A prefix is not the module.
        let e = modules_from(Some("tunx 1 0\n"), "")
            .err()
            .unwrap_or_default();
        assert!(e.starts_with("not loaded: tun,"), "{e}");
    }

    #[test]
    fn subordinate_ids_and_the_fix() {
        let subuid = "alice:100000:65536\nbob:165536:65536\n";
        let subgid = "alice:100000:65536\nbob:165536:65536\ncarol:400000:10\n";
        assert!(subordinate_ids_from(subuid, subgid, "alice", (1000, 1000)).is_ok());
        // Too few gids: the fix names a free, aligned range past every
        // range of every user.
        let e = subordinate_ids_from(subuid, subgid, "carol", (1002, 1002))
            .err()
            .unwrap_or_default();
        assert!(
            e.contains("usermod --add-subuids 458752-524287 --add-subgids 458752-524287 carol"),
            "{e}"
        );
        let e = subordinate_ids_from("", "", "dave", (1003, 1003))
            .err()
            .unwrap_or_default();
        assert!(e.contains("131072-196607"), "{e}");
    }
}
