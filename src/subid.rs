//! Subordinate ids (`/etc/subuid`, `/etc/subgid`): the ranges of user
//! and group ids a user may map into a user namespace of their own with
//! `newuidmap`/`newgidmap`. Running without root, each VM's processes
//! take their ids from these ranges; this module reads them (pure: the
//! caller reads the file).

/// One range: `count` ids from `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub start: u32,
    pub count: u32,
}

/// Ids a user needs at least: one full 16-bit id space, which is what
/// `useradd` gives every new user on Debian and Ubuntu (and what a guest
/// image's files, owned by ids up to 65534, need to map).
pub const NEEDED: u32 = 65536;

/// The ranges of `text` (a subuid or subgid file) that belong to the user
/// named `name` with id `id`: lines `owner:start:count`, where the owner
/// is a name or a numeric id (as shadow-utils reads it). Blank lines,
/// comments and malformed lines are skipped, as `newuidmap` skips them;
/// a range that would pass the last id is cut there.
pub fn ranges(text: &str, name: &str, id: u32) -> Vec<Range> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                return None;
            }
            let mut parts = line.split(':');
            let (owner, start, count) = (parts.next()?, parts.next()?, parts.next()?);
            if parts.next().is_some() || !(owner == name || owner.parse() == Ok(id)) {
                return None;
            }
            let start: u32 = start.parse().ok()?;
            let count: u32 = count.parse().ok()?;
            let count = count.min(u32::MAX - start);
            (count > 0).then_some(Range { start, count })
        })
        .collect()
}

/// Ids in `ranges` altogether (overlaps counted once).
pub fn total(ranges: &[Range]) -> u64 {
    let mut spans: Vec<(u64, u64)> = ranges
        .iter()
        .map(|r| (u64::from(r.start), u64::from(r.start) + u64::from(r.count)))
        .collect();
    spans.sort_unstable();
    let mut sum = 0;
    let mut reach = 0;
    for (a, b) in spans {
        let a = a.max(reach);
        if b > a {
            sum += b - a;
            reach = b;
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
# comment
alice:100000:65536
1001:300000:1000
bob:165536:65536

alice:200000:abc
alice:400000
mallory:1:2:3
alice:4294967290:100
";

    #[test]
    fn a_users_ranges_by_name_or_id() {
        assert_eq!(
            ranges(FILE, "alice", 1001),
            vec![
                Range {
                    start: 100000,
                    count: 65536
                },
                Range {
                    start: 300000,
                    count: 1000
                },
                // Cut at the last id.
                Range {
                    start: 4294967290,
                    count: 5
                },
            ]
        );
        assert_eq!(
            ranges(FILE, "bob", 1002),
            vec![Range {
                start: 165536,
                count: 65536
            }]
        );
        assert!(ranges(FILE, "carol", 1003).is_empty());
        // A name is never read as a prefix of another.
        assert!(ranges(FILE, "ali", 1004).is_empty());
    }

    #[test]
    fn totals_count_overlaps_once() {
        let r = |start, count| Range { start, count };
        assert_eq!(total(&[]), 0);
        assert_eq!(total(&[r(100000, 65536)]), 65536);
        assert_eq!(total(&[r(100000, 65536), r(100000, 65536)]), 65536);
        assert_eq!(total(&[r(0, 10), r(5, 10), r(100, 1)]), 16);
        assert_eq!(
            total(&[r(u32::MAX - 1, 1), r(0, u32::MAX)]),
            u64::from(u32::MAX)
        );
    }
}
