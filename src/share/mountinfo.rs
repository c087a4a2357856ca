//! `/proc/self/mountinfo`, parsed (see proc(5)).

use std::path::{Path, PathBuf};

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub id: u32,
    pub parent: u32,
    /// `major:minor` of the mounted file system's device.
    pub dev: (u32, u32),
    pub mount_point: PathBuf,
    /// Per-mount options (`rw,nosuid,nodev,nosymfollow,relatime`).
    pub options: Vec<String>,
    pub fs_type: String,
    /// The mount source (`/dev/loop3`).
    pub source: String,
}

/// Undo the octal escapes (`\040` for a blank) the kernel writes.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parse one line; `None` for a malformed one.
pub fn parse_line(line: &str) -> Option<Mount> {
    let (left, right) = line.split_once(" - ")?;
    let f: Vec<&str> = left.split(' ').collect();
    if f.len() < 6 {
        return None;
    }
    let (maj, min) = f[2].split_once(':')?;
    let r: Vec<&str> = right.split(' ').collect();
    if r.len() < 2 {
        return None;
    }
    Some(Mount {
        id: f[0].parse().ok()?,
        parent: f[1].parse().ok()?,
        dev: (maj.parse().ok()?, min.parse().ok()?),
        mount_point: PathBuf::from(unescape(f[4])),
        options: f[5].split(',').map(str::to_string).collect(),
        fs_type: unescape(r[0]),
        source: unescape(r[1]),
    })
}

/// Parse a whole mountinfo text.
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines().filter_map(parse_line).collect()
}

/// This process's mounts.
pub fn read() -> std::io::Result<Vec<Mount>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// The mount visible at `dir`: the last one listed with that mount point
/// (later mounts stack on earlier ones).
pub fn top_at<'a>(mounts: &'a [Mount], dir: &Path) -> Option<&'a Mount> {
    mounts.iter().rev().find(|m| m.mount_point == dir)
}

/// Every mount at `dir` or below it.
pub fn at_or_below<'a>(mounts: &'a [Mount], dir: &Path) -> Vec<&'a Mount> {
    mounts
        .iter()
        .filter(|m| m.mount_point.starts_with(dir))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
36 22 7:3 / /home/u/box/work\\040space rw,nosuid,nodev,nosymfollow,relatime shared:80 - ext4 /dev/loop3 rw
37 22 0:40 / /home/u/box/work\\040space rw,relatime - tmpfs tmpfs rw
";

    #[test]
    fn parses_lines_and_escapes() {
        let m = parse(SAMPLE);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].mount_point, PathBuf::from("/home/u/box/work space"));
        assert_eq!(m[1].dev, (7, 3));
        assert_eq!(m[1].source, "/dev/loop3");
        assert_eq!(m[1].fs_type, "ext4");
        assert!(m[1].options.iter().any(|o| o == "nosymfollow"));
    }

    #[test]
    fn the_last_mount_at_a_point_is_the_visible_one() {
        let m = parse(SAMPLE);
        let top = top_at(&m, Path::new("/home/u/box/work space"));
        assert_eq!(top.map(|t| t.fs_type.as_str()), Some("tmpfs"));
        assert_eq!(at_or_below(&m, Path::new("/home/u/box")).len(), 2);
        assert!(top_at(&m, Path::new("/home/u/box")).is_none());
    }

    #[test]
    fn malformed_lines_are_skipped() {
        assert!(parse_line("garbage").is_none());
        assert!(parse_line("1 2 x / / rw - ext4 /dev/a rw").is_none());
    }
}
