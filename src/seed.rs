//! The cloud-init NoCloud seed: a small FAT image labelled `CIDATA`.
//!
//! cloud-init's NoCloud data source looks for a filesystem whose label is
//! `cidata`/`CIDATA` and reads `meta-data`, `user-data` and, when present,
//! `network-config` and `vendor-data` from its root directory. This module
//! writes that image entirely in-process with [`fatfs`] (no `mkfs.vfat`,
//! `genisoimage` or mtools on the host) and provides the helpers that compose
//! the files' content.
//!
//! The image is built in memory, written to a temporary file beside the
//! destination, synced and renamed into place, so a reader never sees a half
//! written seed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Cursor, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The placeholder in user-data that [`substitute_pubkey`] replaces with the
/// SSH public key.
pub const PUBKEY_PLACEHOLDER: &str = "__MIGRANT_PUBKEY__";

/// The volume label cloud-init looks for, padded to the 11 bytes of a FAT
/// label.
const VOLUME_LABEL: [u8; 11] = *b"CIDATA     ";

/// The largest total file content accepted in a seed.
pub const MAX_CONTENT_BYTES: u64 = 32 * MIB;

/// The largest image [`read_seed_file`] agrees to load.
const MAX_IMAGE_BYTES: u64 = 4 * MAX_CONTENT_BYTES;

/// The smallest image written (FAT12 then).
const MIN_IMAGE_BYTES: u64 = MIB;

const MIB: u64 = 1024 * 1024;

/// Makes temporary file names unique within this process.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A failure to compose, write or read a seed.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// user-data uses the public key placeholder but no key was configured.
    #[error("user-data uses {PUBKEY_PLACEHOLDER} but no SSH public key is configured")]
    MissingKey,
    /// The SSH public key cannot be put into user-data safely.
    #[error("the SSH public key is not usable in user-data: {reason}")]
    InvalidKey {
        /// What is wrong with the key.
        reason: &'static str,
    },
    /// A seed file name is not a plain, valid FAT file name, or is repeated.
    #[error("invalid seed file name {name:?}: {reason}")]
    InvalidName {
        /// The offending name.
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// The files do not fit the size limit of a seed.
    #[error("seed content is too large: {bytes} bytes (the limit is {limit})")]
    TooLarge {
        /// Total size of the content.
        bytes: u64,
        /// The limit, [`MAX_CONTENT_BYTES`] or the image size limit.
        limit: u64,
    },
    /// Building or writing the image failed.
    #[error("cannot write seed image {path}")]
    Write {
        /// The destination image.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Reading the image, or its FAT structures, failed.
    #[error("cannot read seed image {path}")]
    Read {
        /// The image.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The image has no file of that name in its root directory.
    #[error("seed image {path} has no file {name:?}")]
    NoSuchFile {
        /// The image.
        path: PathBuf,
        /// The file asked for.
        name: String,
    },
}

impl SeedError {
    /// The process exit code (see [`crate::exit`]) for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            SeedError::MissingKey | SeedError::InvalidKey { .. } | SeedError::TooLarge { .. } => {
                crate::exit::CONFIG
            }
            SeedError::InvalidName { .. } => crate::exit::SOFTWARE,
            SeedError::Write { source, .. } | SeedError::Read { source, .. }
                if source.kind() == io::ErrorKind::PermissionDenied =>
            {
                crate::exit::NOPERM
            }
            SeedError::Write { .. } => crate::exit::SOFTWARE,
            SeedError::Read { .. } | SeedError::NoSuchFile { .. } => crate::exit::DATAERR,
        }
    }
}

/// Writes a NoCloud seed image at `path`: a FAT filesystem labelled `CIDATA`
/// holding `files` (name, content) in its root directory.
///
/// Names must be plain file names (letters, digits, `.`, `-`, `_`; at most 64
/// characters), distinct regardless of case. cloud-init expects at least
/// `meta-data` and `user-data`; `network-config` and `vendor-data` are
/// optional. The image is sized to the content (at least 1 MiB) and replaces
/// `path` atomically; its mode is 0600 since user-data may hold secrets.
pub fn write_seed(path: &Path, files: &[(&str, &[u8])]) -> Result<(), SeedError> {
    for (i, (name, _)) in files.iter().enumerate() {
        check_name(name)?;
        if files[..i]
            .iter()
            .any(|(other, _)| other.eq_ignore_ascii_case(name))
        {
            return Err(SeedError::InvalidName {
                name: (*name).to_owned(),
                reason: "given more than once",
            });
        }
    }
    let content: u64 = files.iter().map(|(_, data)| data.len() as u64).sum();
    if content > MAX_CONTENT_BYTES {
        return Err(SeedError::TooLarge {
            bytes: content,
            limit: MAX_CONTENT_BYTES,
        });
    }
    let write_err = |source| SeedError::Write {
        path: path.to_owned(),
        source,
    };
    let image = build_image(files, image_size(content)).map_err(write_err)?;
    write_atomically(path, &image).map_err(write_err)
}

/// Reads the file `name` from the root directory of the seed image at `path`.
pub fn read_seed_file(path: &Path, name: &str) -> Result<Vec<u8>, SeedError> {
    let read_err = |source| SeedError::Read {
        path: path.to_owned(),
        source,
    };
    let image = load_image(path)?;
    let fs =
        fatfs::FileSystem::new(Cursor::new(image), fatfs::FsOptions::new()).map_err(read_err)?;
    let mut file = match fs.root_dir().open_file(name) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(SeedError::NoSuchFile {
                path: path.to_owned(),
                name: name.to_owned(),
            });
        }
        Err(e) => return Err(read_err(e)),
    };
    let mut data = Vec::new();
    file.read_to_end(&mut data).map_err(read_err)?;
    Ok(data)
}

/// Reads the volume label of the seed image at `path` (from the boot sector),
/// without its padding: `CIDATA` for an image [`write_seed`] wrote.
pub fn read_seed_label(path: &Path) -> Result<String, SeedError> {
    let image = load_image(path)?;
    let fs =
        fatfs::FileSystem::new(Cursor::new(image), fatfs::FsOptions::new()).map_err(|source| {
            SeedError::Read {
                path: path.to_owned(),
                source,
            }
        })?;
    Ok(fs.volume_label())
}

/// The `meta-data` file: instance id and hostname, as YAML.
///
/// cloud-init treats a new instance id as a first boot, so each VM (and each
/// re-creation of it) should get a fresh one.
pub fn meta_data(instance_id: &str, hostname: &str) -> String {
    format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        yaml_quote(instance_id),
        yaml_quote(hostname)
    )
}

/// Replaces every [`PUBKEY_PLACEHOLDER`] in `user_data` with `pubkey`,
/// trimmed.
///
/// Fails with [`SeedError::MissingKey`] when the placeholder is used and no
/// key is given, and with [`SeedError::InvalidKey`] when the key is empty,
/// spans several lines, or holds characters that could change the meaning of
/// the YAML around the placeholder (quotes, backslashes, `#`, `: `). When the
/// placeholder is absent, `user_data` is returned unchanged and the key is
/// not looked at.
pub fn substitute_pubkey(user_data: &str, pubkey: Option<&str>) -> Result<String, SeedError> {
    if !user_data.contains(PUBKEY_PLACEHOLDER) {
        return Ok(user_data.to_owned());
    }
    let key = pubkey.ok_or(SeedError::MissingKey)?.trim();
    check_key(key)?;
    Ok(user_data.replace(PUBKEY_PLACEHOLDER, key))
}

/// The `vendor-data` file: migrant's defaults for the guest, which the
/// user's `cloud-init.yml` (user-data) overrides key by key. Host keys:
/// ed25519 only. Generating the RSA host key is the slowest step of a
/// first boot under TCG (3–18 s measured); migrant's `ssh` accepts any
/// host key type, and a user who wants RSA keys says so in user-data
/// (`ssh_genkeytypes`).
///
/// With secrets, a second part: a script (run once, at the end of the
/// first boot, whatever keys user-data sets) that adds the VM's
/// authority to the system's trust store and gives every login the
/// placeholders and the variables that point clients at the store.
pub fn vendor_data(secrets: Option<&crate::secrets::vm::VmSecrets>) -> String {
    const DEFAULTS: &str = "#cloud-config
# migrant's defaults; cloud-init.yml (user-data) overrides them.
ssh_genkeytypes: [ed25519]
";
    let Some(secrets) = secrets else {
        return DEFAULTS.to_string();
    };
    use crate::secrets::vm::GUEST_CA;
    let env: String = secrets
        .guest_environment()
        .iter()
        .map(|(k, v)| format!("{k}={v}\n"))
        .collect();
    let script = format!(
        "#!/bin/sh\n\
         # migrant: this VM's secrets stay on the host; its guest trusts the\n\
         # VM's own authority and holds placeholders.\n\
         set -e\n\
         mkdir -p {dir}\n\
         cat > {GUEST_CA} <<'MIGRANT_CA'\n{ca}MIGRANT_CA\n\
         if command -v update-ca-certificates >/dev/null; then update-ca-certificates; fi\n\
         cat >> /etc/environment <<'MIGRANT_ENV'\n{env}MIGRANT_ENV\n",
        dir = GUEST_CA.rsplit_once('/').map_or("/", |(d, _)| d),
        ca = with_newline(&secrets.authority.cert_pem),
    );
    let boundary = "==migrant-vendor-data==";
    format!(
        "Content-Type: multipart/mixed; boundary=\"{boundary}\"\n\
         MIME-Version: 1.0\n\n\
         --{boundary}\n\
         Content-Type: text/cloud-config; charset=\"us-ascii\"\n\n\
         {DEFAULTS}\n\
         --{boundary}\n\
         Content-Type: text/x-shellscript; charset=\"us-ascii\"\n\n\
         {script}\n\
         --{boundary}--\n"
    )
}

fn with_newline(text: &str) -> String {
    if text.ends_with('\n') {
        text.to_string()
    } else {
        format!("{text}\n")
    }
}

/// The `network-config` file (cloud-init network config version 2): DHCPv4
/// on the NIC whose MAC address is `mac`, renamed `eth0` so that the name is
/// the same whatever the guest's naming scheme (Debian's ENI renderer writes
/// the rename as a udev rule and cloud-init applies it on first boot).
///
/// The MAC address is written lower-case and quoted: unquoted, YAML 1.1 would read
/// an all-digit `52:54:00:12:34:56` as a base-60 integer.
///
/// With `net6` (`ipv6 = true`) the NIC also gets the guest's static IPv6
/// address and the gateway as its IPv6 router. Static rather than router
/// advertisements or DHCPv6: the addresses are fixed for every VM, the
/// guest's renderer (ifupdown on Debian 12, netplan on 13) applies it the
/// same way, and the dataplane keeps no other guest-facing protocol.
pub fn network_config(mac: crate::state::Mac, net6: Option<crate::config::Net6>) -> String {
    let mut out = format!(
        "version: 2\n\
         ethernets:\n\
         \x20 id0:\n\
         \x20   match:\n\
         \x20     macaddress: {}\n\
         \x20   set-name: eth0\n\
         \x20   dhcp4: true\n",
        yaml_quote(&mac.to_string())
    );
    if let Some(n) = net6 {
        out.push_str(&format!(
            "\x20   addresses:\n\
             \x20     - {}\n\
             \x20   gateway6: {}\n",
            yaml_quote(&format!("{}/{}", n.guest, crate::config::Net6::PREFIX)),
            yaml_quote(&n.gateway.to_string()),
        ));
    }
    out
}

/// Whether a seed's network-config gives the guest the IPv6 address of
/// `net6` (what `up` compares with the Migrantfile's `ipv6`).
pub fn network_config_has_ipv6(config: &str) -> bool {
    let guest = crate::config::Net6::standard().guest;
    config.contains(&format!("\"{guest}/"))
}

/// A YAML double-quoted scalar holding `s`.
fn yaml_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn check_key(key: &str) -> Result<(), SeedError> {
    let reason = if key.is_empty() {
        "it is empty"
    } else if key.contains(['\n', '\r']) {
        "it spans several lines (give exactly one key)"
    } else if key.chars().any(char::is_control) {
        "it contains control characters"
    } else if key.contains(['"', '\'', '\\', '#']) || key.contains(": ") {
        "it contains a quote, backslash, '#' or ': ' (edit the key's comment)"
    } else {
        return Ok(());
    };
    Err(SeedError::InvalidKey { reason })
}

fn check_name(name: &str) -> Result<(), SeedError> {
    let reason = if name.is_empty() {
        "empty"
    } else if name.len() > 64 {
        "longer than 64 characters"
    } else if name.starts_with('.') || name.ends_with('.') {
        "starts or ends with a dot"
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        "only letters, digits, '.', '-' and '_' are allowed"
    } else {
        return Ok(());
    };
    Err(SeedError::InvalidName {
        name: name.to_owned(),
        reason,
    })
}

/// Image size for `content` bytes of files: room for FAT overhead and
/// per-file cluster slack, rounded up to whole MiB.
fn image_size(content: u64) -> u64 {
    let wanted = content + content / 4 + 512 * 1024;
    wanted.div_ceil(MIB).max(MIN_IMAGE_BYTES / MIB) * MIB
}

fn build_image(files: &[(&str, &[u8])], size: u64) -> io::Result<Vec<u8>> {
    let len = usize::try_from(size).map_err(|_| io::Error::other("seed image too large"))?;
    let mut disk = Cursor::new(vec![0u8; len]);
    fatfs::format_volume(
        &mut disk,
        fatfs::FormatVolumeOptions::new()
            .volume_label(VOLUME_LABEL)
            .volume_id(volume_id(files)),
    )?;
    {
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new())?;
        {
            let root = fs.root_dir();
            for (name, data) in files {
                let mut file = root.create_file(name)?;
                file.truncate()?;
                file.write_all(data)?;
                file.flush()?;
            }
        }
        fs.unmount()?;
    }
    Ok(disk.into_inner())
}

/// A volume serial number derived from the content (FNV-1a), so that
/// different seeds differ (the library's default is a constant) while the same
/// content always gives the same image.
fn volume_id(files: &[(&str, &[u8])]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for (name, data) in files {
        for b in name.bytes().chain([0]).chain(data.iter().copied()) {
            hash = (hash ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
    }
    hash
}

fn load_image(path: &Path) -> Result<Vec<u8>, SeedError> {
    let read_err = |source| SeedError::Read {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let len = file.metadata().map_err(read_err)?.len();
    if len > MAX_IMAGE_BYTES {
        return Err(SeedError::TooLarge {
            bytes: len,
            limit: MAX_IMAGE_BYTES,
        });
    }
    let mut image = Vec::new();
    file.take(MAX_IMAGE_BYTES)
        .read_to_end(&mut image)
        .map_err(read_err)?;
    Ok(image)
}

/// Writes `data` to a temporary file in `path`'s directory, syncs it, renames
/// it to `path` and syncs the directory.
fn write_atomically(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(
        ".tmp.{}.{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = dir.join(tmp_name);

    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(data)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sample_files() -> Vec<(&'static str, Vec<u8>)> {
        vec![
            ("meta-data", meta_data("iid-test-1", "box").into_bytes()),
            (
                "user-data",
                b"#cloud-config\nssh_authorized_keys:\n  - ssh-ed25519 AAAA test\n".to_vec(),
            ),
            (
                "network-config",
                network_config(crate::state::Mac([0x52, 0x54, 0, 0x12, 0x34, 0x56]), None)
                    .into_bytes(),
            ),
            ("vendor-data", Vec::new()),
        ]
    }

    fn as_refs<'a>(files: &'a [(&'static str, Vec<u8>)]) -> Vec<(&'static str, &'a [u8])> {
        files.iter().map(|(n, d)| (*n, d.as_slice())).collect()
    }

    /// Runs a host tool if it is installed; None when it is absent.
    fn run_tool(candidates: &[&str], args: &[&str]) -> Option<std::process::Output> {
        let tool = candidates.iter().find(|p| Path::new(p).exists())?;
        Some(Command::new(tool).args(args).output().expect("run tool"))
    }

    #[test]
    fn writes_readable_seed_with_label() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.img");
        let files = sample_files();
        write_seed(&path, &as_refs(&files)).unwrap();

        for (name, data) in &files {
            assert_eq!(&read_seed_file(&path, name).unwrap(), data, "{name}");
        }
        assert_eq!(read_seed_label(&path).unwrap(), "CIDATA");

        let image = fs::read(&path).unwrap();
        assert_eq!(image.len() as u64, MIB);
        let fs = fatfs::FileSystem::new(Cursor::new(image), fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label(), "CIDATA");
        assert_eq!(
            fs.read_volume_label_from_root_dir().unwrap().as_deref(),
            Some("CIDATA")
        );
        let mut names: Vec<String> = fs
            .root_dir()
            .iter()
            .map(|e| e.unwrap())
            .filter(|e| e.is_file())
            .map(|e| e.file_name())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["meta-data", "network-config", "user-data", "vendor-data"]
        );

        let mode = fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        // Only the image is left behind, no temporary file.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn host_tools_agree() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.img");
        let files = sample_files();
        write_seed(&path, &as_refs(&files)).unwrap();
        let p = path.to_str().unwrap();

        match run_tool(
            &["/sbin/blkid", "/usr/sbin/blkid"],
            &["-p", "-o", "export", p],
        ) {
            Some(out) => {
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(out.status.success(), "blkid failed: {text}");
                assert!(text.lines().any(|l| l == "LABEL=CIDATA"), "{text}");
                assert!(text.lines().any(|l| l == "TYPE=vfat"), "{text}");
            }
            None => eprintln!("blkid not installed; skipping that check"),
        }
        match run_tool(
            &[
                "/sbin/fsck.vfat",
                "/usr/sbin/fsck.vfat",
                "/sbin/fsck.fat",
                "/usr/sbin/fsck.fat",
            ],
            &["-n", p],
        ) {
            Some(out) => assert!(
                out.status.success(),
                "fsck.vfat: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            None => eprintln!("fsck.vfat not installed; skipping that check"),
        }
    }

    #[test]
    fn large_content_gets_a_larger_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.img");
        let big: Vec<u8> = (0..3 * MIB as usize).map(|i| (i % 251) as u8).collect();
        write_seed(&path, &[("meta-data", b"x"), ("user-data", &big)]).unwrap();
        assert_eq!(read_seed_file(&path, "user-data").unwrap(), big);
        assert!(fs::metadata(&path).unwrap().len() >= 4 * MIB);
    }

    #[test]
    fn rewrite_replaces_existing_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.img");
        write_seed(&path, &[("user-data", b"one")]).unwrap();
        write_seed(&path, &[("user-data", b"two")]).unwrap();
        assert_eq!(read_seed_file(&path, "user-data").unwrap(), b"two");
    }

    #[test]
    fn missing_file_and_bad_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.img");
        write_seed(&path, &[("meta-data", b"")]).unwrap();
        let err = read_seed_file(&path, "user-data").unwrap_err();
        assert!(matches!(err, SeedError::NoSuchFile { .. }), "{err}");
        assert_eq!(err.exit_code(), crate::exit::DATAERR);

        for bad in ["", "a/b", "..", ".hidden", "sp ace", "é"] {
            let err = write_seed(&path, &[(bad, b"")]).unwrap_err();
            assert!(matches!(err, SeedError::InvalidName { .. }), "{bad:?}");
        }
        let err = write_seed(&path, &[("user-data", b""), ("USER-DATA", b"")]).unwrap_err();
        assert!(matches!(err, SeedError::InvalidName { .. }));
    }

    #[test]
    fn unreadable_images() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.img");
        assert!(matches!(
            read_seed_file(&missing, "user-data"),
            Err(SeedError::Read { .. })
        ));
        let garbage = dir.path().join("garbage.img");
        fs::write(&garbage, vec![0xa5; 4096]).unwrap();
        assert!(read_seed_file(&garbage, "user-data").is_err());
        let empty = dir.path().join("empty.img");
        fs::write(&empty, b"").unwrap();
        assert!(read_seed_file(&empty, "user-data").is_err());
    }

    #[test]
    fn write_into_missing_directory_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no/such/dir/seed.img");
        let err = write_seed(&path, &[("meta-data", b"")]).unwrap_err();
        assert!(matches!(err, SeedError::Write { .. }));
        assert_eq!(err.exit_code(), crate::exit::SOFTWARE);
    }

    #[test]
    fn pubkey_substitution() {
        let ud = "#cloud-config\nusers:\n  - name: a\n    ssh_authorized_keys: [__MIGRANT_PUBKEY__]\nb: __MIGRANT_PUBKEY__\n";
        let out = substitute_pubkey(ud, Some("  ssh-ed25519 AAAAC3Nz me@host\n")).unwrap();
        assert_eq!(
            out,
            "#cloud-config\nusers:\n  - name: a\n    ssh_authorized_keys: [ssh-ed25519 AAAAC3Nz me@host]\nb: ssh-ed25519 AAAAC3Nz me@host\n"
        );
        assert!(!out.contains(PUBKEY_PLACEHOLDER));

        let err = substitute_pubkey(ud, None).unwrap_err();
        assert!(matches!(err, SeedError::MissingKey));
        assert_eq!(err.exit_code(), crate::exit::CONFIG);
        assert!(err.to_string().contains(PUBKEY_PLACEHOLDER));

        // No placeholder: no key needed, text unchanged.
        assert_eq!(
            substitute_pubkey("#cloud-config\n", None).unwrap(),
            "#cloud-config\n"
        );

        for bad in [
            "",
            "  \n",
            "ssh-rsa A\nssh-rsa B",
            "ssh-rsa A \"x\"",
            "ssh-rsa A #c",
            "ssh-rsa A a: b",
        ] {
            let err = substitute_pubkey(ud, Some(bad)).unwrap_err();
            assert!(matches!(err, SeedError::InvalidKey { .. }), "{bad:?}");
            assert_eq!(err.exit_code(), crate::exit::CONFIG);
        }
    }

    #[test]
    fn meta_data_is_quoted_yaml() {
        assert_eq!(
            meta_data("iid-1", "0123"),
            "instance-id: \"iid-1\"\nlocal-hostname: \"0123\"\n"
        );
        assert_eq!(
            meta_data("a\"b", "c\\d\n"),
            "instance-id: \"a\\\"b\"\nlocal-hostname: \"c\\\\d\\n\"\n"
        );
    }

    #[test]
    fn network_config_matches_mac() {
        let plain = network_config(crate::state::Mac([0x52, 0x54, 0, 0xab, 0xcd, 0x01]), None);
        assert_eq!(
            plain,
            "version: 2\nethernets:\n  id0:\n    match:\n      macaddress: \"52:54:00:ab:cd:01\"\n    set-name: eth0\n    dhcp4: true\n"
        );
        assert!(!network_config_has_ipv6(&plain));
        let v6 = network_config(
            crate::state::Mac([0x52, 0x54, 0, 0xab, 0xcd, 0x01]),
            Some(crate::config::Net6::standard()),
        );
        assert_eq!(
            v6,
            format!(
                "{plain}    addresses:\n      - \"fd6d:6967:7261:6e74::15/64\"\n    gateway6: \"fd6d:6967:7261:6e74::2\"\n"
            )
        );
        assert!(network_config_has_ipv6(&v6));
    }
}
