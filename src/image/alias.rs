//! Image names (`image = "debian-12"`): each resolves to the distribution's
//! official cloud image and the checksum list published beside it.
//!
//! `MIGRANT_IMAGE_MIRROR=URL` replaces the distributions' servers: Debian's
//! `https://cloud.debian.org/images/cloud` becomes `URL/debian` and
//! Ubuntu's `https://cloud-images.ubuntu.com/releases` becomes `URL/ubuntu`,
//! with the same paths below them (for a local mirror, and for tests).

/// A distribution's image server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Distro {
    Debian,
    Ubuntu,
}

impl Distro {
    fn official_base(self) -> &'static str {
        match self {
            Distro::Debian => "https://cloud.debian.org/images/cloud",
            Distro::Ubuntu => "https://cloud-images.ubuntu.com/releases",
        }
    }
    fn mirror_dir(self) -> &'static str {
        match self {
            Distro::Debian => "debian",
            Distro::Ubuntu => "ubuntu",
        }
    }
}

/// One entry of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alias {
    pub name: &'static str,
    /// Other names for the same image.
    pub also: &'static [&'static str],
    pub distro: Distro,
    /// Folder below the distribution's base, without slashes at the ends.
    pub dir: &'static str,
    /// The image's file name in that folder.
    pub file: &'static str,
    /// The checksum list in the same folder.
    pub list: &'static str,
    pub description: &'static str,
}

/// The environment variable that replaces the official servers.
pub const MIRROR_ENV: &str = "MIGRANT_IMAGE_MIRROR";

/// Every known image name. Debian's `latest/` folders always hold the
/// newest build of a release; Ubuntu's `release/` folders the newest
/// release build.
pub const ALIASES: &[Alias] = &[
    Alias {
        name: "debian-12",
        also: &["bookworm"],
        distro: Distro::Debian,
        dir: "bookworm/latest",
        file: "debian-12-genericcloud-amd64.qcow2",
        list: "SHA512SUMS",
        description: "Debian 12 (bookworm) generic cloud image",
    },
    Alias {
        name: "debian-13",
        also: &["trixie", "debian"],
        distro: Distro::Debian,
        dir: "trixie/latest",
        file: "debian-13-genericcloud-amd64.qcow2",
        list: "SHA512SUMS",
        description: "Debian 13 (trixie) generic cloud image",
    },
    Alias {
        name: "ubuntu-22.04",
        also: &["jammy"],
        distro: Distro::Ubuntu,
        dir: "22.04/release",
        file: "ubuntu-22.04-server-cloudimg-amd64.img",
        list: "SHA256SUMS",
        description: "Ubuntu 22.04 LTS server cloud image",
    },
    Alias {
        name: "ubuntu-24.04",
        also: &["noble"],
        distro: Distro::Ubuntu,
        dir: "24.04/release",
        file: "ubuntu-24.04-server-cloudimg-amd64.img",
        list: "SHA256SUMS",
        description: "Ubuntu 24.04 LTS server cloud image",
    },
    Alias {
        name: "ubuntu-26.04",
        also: &["ubuntu-lts"],
        distro: Distro::Ubuntu,
        dir: "26.04/release",
        file: "ubuntu-26.04-server-cloudimg-amd64.img",
        list: "SHA256SUMS",
        description: "Ubuntu 26.04 LTS server cloud image",
    },
    Alias {
        name: "ubuntu-26.10",
        also: &["ubuntu", "ubuntu-latest"],
        distro: Distro::Ubuntu,
        dir: "26.10/release",
        file: "ubuntu-26.10-server-cloudimg-amd64.img",
        list: "SHA256SUMS",
        description: "Ubuntu 26.10 server cloud image (the latest release)",
    },
];

/// The entry for `name` (its main name or one of the others).
pub fn find(name: &str) -> Option<&'static Alias> {
    ALIASES
        .iter()
        .find(|a| a.name == name || a.also.contains(&name))
}

/// All names, for messages.
pub fn names() -> String {
    ALIASES
        .iter()
        .map(|a| a.name)
        .collect::<Vec<_>>()
        .join(", ")
}

impl Alias {
    /// The folder URL, honouring `mirror` (the value of
    /// [`MIRROR_ENV`], if set).
    fn dir_url(&self, mirror: Option<&str>) -> String {
        match mirror
            .map(|m| m.trim_end_matches('/'))
            .filter(|m| !m.is_empty())
        {
            Some(m) => format!("{m}/{}/{}", self.distro.mirror_dir(), self.dir),
            None => format!("{}/{}", self.distro.official_base(), self.dir),
        }
    }

    pub fn image_url(&self, mirror: Option<&str>) -> String {
        format!("{}/{}", self.dir_url(mirror), self.file)
    }

    pub fn list_url(&self, mirror: Option<&str>) -> String {
        format!("{}/{}", self.dir_url(mirror), self.list)
    }
}

/// The mirror from the environment, if set.
pub fn mirror_from_env() -> Option<String> {
    std::env::var(MIRROR_ENV)
        .ok()
        .filter(|m| !m.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_urls() {
        let d12 = find("debian-12").unwrap_or_else(|| panic!("no debian-12"));
        assert_eq!(
            d12.image_url(None),
            "https://cloud.debian.org/images/cloud/bookworm/latest/debian-12-genericcloud-amd64.qcow2"
        );
        assert_eq!(
            d12.list_url(None),
            "https://cloud.debian.org/images/cloud/bookworm/latest/SHA512SUMS"
        );
        let d13 = find("debian-13").unwrap_or_else(|| panic!("no debian-13"));
        assert_eq!(
            d13.image_url(None),
            "https://cloud.debian.org/images/cloud/trixie/latest/debian-13-genericcloud-amd64.qcow2"
        );
        let u24 = find("ubuntu-24.04").unwrap_or_else(|| panic!("no ubuntu-24.04"));
        assert_eq!(
            u24.image_url(None),
            "https://cloud-images.ubuntu.com/releases/24.04/release/ubuntu-24.04-server-cloudimg-amd64.img"
        );
        assert_eq!(
            u24.list_url(None),
            "https://cloud-images.ubuntu.com/releases/24.04/release/SHA256SUMS"
        );
        assert_eq!(find("ubuntu").map(|a| a.name), Some("ubuntu-26.10"));
        assert_eq!(find("debian").map(|a| a.name), Some("debian-13"));
        assert_eq!(find("noble").map(|a| a.name), Some("ubuntu-24.04"));
        assert!(find("debian-11").is_none());
    }

    #[test]
    fn mirror_replaces_the_servers() {
        let d12 = find("debian-12").unwrap_or_else(|| panic!("no debian-12"));
        assert_eq!(
            d12.image_url(Some("http://127.0.0.1:8000/")),
            "http://127.0.0.1:8000/debian/bookworm/latest/debian-12-genericcloud-amd64.qcow2"
        );
        let u = find("ubuntu-24.04").unwrap_or_else(|| panic!("no ubuntu"));
        assert_eq!(
            u.list_url(Some("http://m")),
            "http://m/ubuntu/24.04/release/SHA256SUMS"
        );
        assert_eq!(d12.image_url(Some("")), d12.image_url(None));
    }

    #[test]
    fn table_is_consistent() {
        let mut seen = std::collections::HashSet::new();
        for a in ALIASES {
            for n in std::iter::once(&a.name).chain(a.also.iter()) {
                assert!(seen.insert(*n), "name {n} used twice");
                assert!(!n.contains('/') && !n.contains('.') || n.starts_with("ubuntu-"));
            }
            assert!(a.image_url(None).starts_with("https://"));
            assert!(matches!(a.list, "SHA512SUMS" | "SHA256SUMS"));
            assert!(!a.dir.starts_with('/') && !a.dir.ends_with('/'));
        }
    }
}
