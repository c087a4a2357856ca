//! Byte counts for people, in one place: [`human`] for counts and sizes
//! (`1.5 GiB`), [`as_written`] where a message names a size the way a
//! Migrantfile writes it (`1.5G`, e.g. a share's `size`).

/// Binary units from the largest down: (Migrantfile suffix, IEC name, bytes).
const UNITS: [(&str, &str, u64); 4] = [
    ("T", "TiB", 1 << 40),
    ("G", "GiB", 1 << 30),
    ("M", "MiB", 1 << 20),
    ("K", "KiB", 1 << 10),
];

/// `bytes` in the largest unit it reaches, with at most one decimal
/// (truncated, and none when it is 0): the number and the unit's entry.
fn scaled(bytes: u64) -> Option<(String, (&'static str, &'static str))> {
    let &(short, long, n) = UNITS.iter().find(|(_, _, n)| bytes >= *n)?;
    let whole = bytes / n;
    let tenth = (bytes % n) * 10 / n;
    let number = if tenth == 0 {
        whole.to_string()
    } else {
        format!("{whole}.{tenth}")
    };
    Some((number, (short, long)))
}

/// `1.5 GiB`, `12 MiB`, `512 B`.
pub fn human(bytes: u64) -> String {
    match scaled(bytes) {
        Some((number, (_, long))) => format!("{number} {long}"),
        None => format!("{bytes} B"),
    }
}

/// `10G`, `1.5G`, `300M`, `12B`: a size as a Migrantfile writes it.
pub fn as_written(bytes: u64) -> String {
    match scaled(bytes) {
        Some((number, (short, _))) => format!("{number}{short}"),
        None => format!("{bytes}B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_forms() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 << 30), "3 GiB");
        assert_eq!(human((3 << 30) + (1 << 29)), "3.5 GiB");
        assert_eq!(human((1 << 20) - 1), "1023.9 KiB");
        assert_eq!(as_written(10 << 30), "10G");
        assert_eq!(as_written(3 << 29), "1.5G");
        assert_eq!(as_written(300 << 20), "300M");
        assert_eq!(as_written(12), "12B");
        assert_eq!(as_written(2 << 40), "2T");
    }
}
