//! Who migrant logs in as when the Migrantfile names no `[ssh] user` (a
//! legacy Migrantfile never does): the first user `cloud-init.yml` creates
//! by name, as the original tool reads it; else, when the file creates
//! only the image's own user (`users: [default]`, or no `users:`), that
//! user for the image families whose name is known; else `migrant`.

use yaml_rust2::{Yaml, YamlLoader};

/// The `users:` list of a cloud-init.yml, if it has a readable one.
fn users(cloud_init: &str) -> Option<Vec<Yaml>> {
    let docs = YamlLoader::load_from_str(cloud_init).ok()?;
    docs.first()?["users"].as_vec().cloned()
}

/// The first `users:` entry with a `name` (entries that are the string
/// `default` stand for the image's own user and are passed over).
/// `Some(None)`: the file has `users:` but names nobody; `None`: it has no
/// (readable) `users:` list.
fn named_user(cloud_init: &str) -> Option<Option<String>> {
    let users = users(cloud_init)?;
    Some(users.iter().find_map(|u| match u {
        Yaml::Hash(_) => u["name"].as_str().map(str::to_string),
        // A bare string other than `default` is a user name too (cloud-init
        // accepts `users: [alice]`).
        Yaml::String(s) if s != "default" => Some(s.clone()),
        _ => None,
    }))
}

/// The default user of the cloud images of a known family, from the
/// image's name or URL.
fn image_default(image: &str) -> Option<&'static str> {
    let name = image
        .rsplit('/')
        .next()
        .unwrap_or(image)
        .to_ascii_lowercase();
    [
        ("debian", "debian"),
        ("ubuntu", "ubuntu"),
        ("fedora", "fedora"),
        ("arch", "arch"),
        ("rocky", "rocky"),
        ("alma", "almalinux"),
    ]
    .into_iter()
    .find(|(family, _)| name.starts_with(family))
    .map(|(_, user)| user)
}

/// The ids cloud images give the first user cloud-init creates.
pub const FIRST_USER_ID: u32 = 1000;

pub fn default_ids() -> (u32, u32) {
    (FIRST_USER_ID, FIRST_USER_ID)
}

/// The uid and gid `user` gets in the guest: the `uid` its `users:` entry
/// in cloud-init.yml sets (its user-private group gets the same number),
/// else [`FIRST_USER_ID`], what Debian, Ubuntu, Fedora and the other
/// cloud images give the first user created. Only what the guest shows
/// as a share's owner depends on it: every file the guest makes there is
/// the host user's whatever its guest owner.
pub fn ids(cloud_init: Option<&str>, user: &str) -> (u32, u32) {
    let uid = cloud_init
        .and_then(users)
        .and_then(|users| {
            let entry = users.iter().find(|u| u["name"].as_str() == Some(user))?;
            match &entry["uid"] {
                Yaml::Integer(n) => u32::try_from(*n).ok(),
                Yaml::String(s) => s.trim().parse::<u32>().ok(),
                _ => None,
            }
        })
        .filter(|uid| *uid < 1 << 31)
        .unwrap_or(FIRST_USER_ID);
    (uid, uid)
}

/// The guest user for a project whose Migrantfile names none: from its
/// `cloud-init.yml` text (if readable) and its image.
pub fn infer(cloud_init: Option<&str>, image: &str) -> String {
    let named = cloud_init.and_then(named_user);
    match named {
        Some(Some(user)) => user,
        _ => image_default(image)
            .unwrap_or(super::DEFAULT_SSH_USER)
            .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_named_user_wins() {
        let text = "#cloud-config\nusers:\n  - default\n  - name: dev\n    sudo: ALL=(ALL) NOPASSWD:ALL\n  - name: other\n";
        assert_eq!(infer(Some(text), "debian-12"), "dev");
        assert_eq!(infer(Some("users:\n  - alice\n"), "x.qcow2"), "alice");
    }

    #[test]
    fn the_users_ids_are_its_uid_or_the_first_users() {
        let text = "#cloud-config\nusers:\n  - default\n  - name: dev\n    uid: 1500\n  - name: ci\n    uid: \"2001\"\n  - name: odd\n    uid: -3\n";
        assert_eq!(ids(Some(text), "dev"), (1500, 1500));
        assert_eq!(ids(Some(text), "ci"), (2001, 2001));
        assert_eq!(ids(Some(text), "odd"), (1000, 1000));
        assert_eq!(ids(Some(text), "debian"), (1000, 1000));
        assert_eq!(ids(None, "migrant"), (1000, 1000));
        assert_eq!(ids(Some("users: [unclosed\n"), "migrant"), (1000, 1000));
    }

    #[test]
    fn only_the_images_user_or_nothing_readable() {
        for text in [
            Some("#cloud-config\nusers:\n  - default\n"),
            Some("#cloud-config\npackages: [git]\n"),
            Some("users: [unclosed\n"),
            None,
        ] {
            assert_eq!(infer(text, "debian-12"), "debian", "{text:?}");
            assert_eq!(
                infer(
                    text,
                    "https://cloud-images.ubuntu.com/noble/current/ubuntu-24.04-server-cloudimg-amd64.img"
                ),
                "ubuntu"
            );
            assert_eq!(infer(text, "/srv/images/custom.qcow2"), "migrant");
        }
    }
}
