//! Guest mounts in the cloud-init seed: when a share names a `guest`
//! mount point, the user-data becomes a two-part MIME message: the
//! project's cloud-init.yml unchanged, then a cloud-config part that adds
//! an fstab line and mounts the share on every boot. That part merges by
//! appending (`merge_how`), so the user's own `bootcmd` (and hand-written
//! fstab lines) keep working.

use crate::config::Share;

/// The boundary between parts; lengthened until it is not in the text.
fn boundary(text: &str) -> String {
    let mut b = String::from("==migrant-shares==");
    while text.contains(&b) {
        b.push('=');
    }
    b
}

/// Single-quote `s` for a YAML flow scalar.
fn yaml_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Hands the folders the mounts made in users' homes to those users; `$1`
/// lists them.
pub(crate) const GIVE_BACK_HOMES: &str = "[ -f \"$1\" ] || exit 0; \
    sort -u \"$1\" | while read -r d; do \
    getent passwd | while IFS=: read -r _ _ u g _ h _; do \
    case $h in /|'') continue ;; esac; \
    case $d/ in \"$h\"/*) chown \"$u:$g\" \"$d\" ;; esac; \
    done; done";

/// The cloud-config part that mounts the shares with a guest path, or
/// `None` when none has one.
pub fn mounts_part(shares: &[Share]) -> Option<String> {
    let mounted: Vec<&Share> = shares.iter().filter(|s| s.guest.is_some()).collect();
    if mounted.is_empty() {
        return None;
    }
    let mut out = String::from(
        "#cloud-config\n\
         # Added by migrant: mount the shared folders that name a guest path.\n\
         merge_how:\n\
         \x20 - name: list\n\
         \x20   settings: [append]\n\
         \x20 - name: dict\n\
         \x20   settings: [no_replace, recurse_list]\n\
         bootcmd:\n",
    );
    // Tags are [A-Za-z0-9_-]; guest paths are absolute, without blanks,
    // control characters or "..": both are safe as shell arguments and
    // in fstab once quoted. The folders made above the mount point are
    // noted: bootcmd runs before cloud-init creates the users, so a mount
    // point in a user's home would leave that home root's.
    let script = "d=$(dirname \"$1\"); while [ ! -e \"$d\" ]; do echo \"$d\"; d=$(dirname \"$d\"); done >> /run/migrant-share-dirs; \
                  mkdir -p \"$1\" && { grep -qs \"^$2 $1 virtiofs \" /etc/fstab || \
                  echo \"$2 $1 virtiofs defaults,nofail 0 0\" >> /etc/fstab; } && \
                  { mountpoint -q \"$1\" || mount \"$1\"; }";
    for s in mounted {
        let guest = s.guest.as_deref().unwrap_or_default();
        out.push_str(&format!(
            "  - [sh, -c, {}, migrant-share, {}, {}]\n",
            yaml_quote(script),
            yaml_quote(guest),
            yaml_quote(&s.tag)
        ));
    }
    // Once the users exist (first boot; runcmd runs late): each folder
    // noted above that lies in a user's home belongs to that user (never
    // the mount points themselves: they are the shares).
    out.push_str(&format!(
        "runcmd:\n  - [sh, -c, {}, migrant-share, /run/migrant-share-dirs]\n",
        yaml_quote(GIVE_BACK_HOMES)
    ));
    Some(out)
}

/// The user-data to put in the seed: `user_data` unchanged when no share
/// has a guest path, else a MIME message with the mounts part after it.
/// A user-data that is already MIME is left alone (with a warning for the
/// caller), since nesting it would change how cloud-init reads it.
pub fn user_data_with_mounts(user_data: &str, shares: &[Share]) -> (String, Option<String>) {
    let Some(part) = mounts_part(shares) else {
        return (user_data.to_string(), None);
    };
    let head = user_data.trim_start().to_ascii_lowercase();
    if head.starts_with("content-type:") || head.starts_with("mime-version:") {
        return (
            user_data.to_string(),
            Some(
                "cloud-init.yml is already a MIME message: migrant cannot add the share mounts to it; \
                 mount the shares yourself (fstab lines with type virtiofs)"
                    .into(),
            ),
        );
    }
    let b = boundary(&format!("{user_data}{part}"));
    let mut out = format!("Content-Type: multipart/mixed; boundary=\"{b}\"\nMIME-Version: 1.0\n\n");
    // text/plain: cloud-init tells the type from the first line, so a
    // cloud-config, a script or an include all keep their meaning.
    out.push_str(&format!(
        "--{b}\nContent-Type: text/plain; charset=\"utf-8\"\nMIME-Version: 1.0\nContent-Disposition: attachment; filename=\"cloud-init.yml\"\n\n"
    ));
    out.push_str(user_data);
    if !user_data.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(&format!(
        "--{b}\nContent-Type: text/cloud-config; charset=\"utf-8\"\nMIME-Version: 1.0\nContent-Disposition: attachment; filename=\"migrant-shares.cfg\"\n\n"
    ));
    out.push_str(&part);
    out.push_str(&format!("--{b}--\n"));
    (out, None)
}
