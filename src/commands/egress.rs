//! `migrant egress`: the VM's egress journal (see `net::dataplane::journal`), as
//! lines a person reads or as the recorded JSON, optionally followed.

use std::io::{Read, Seek, Write};
use std::time::Duration;

use super::{Project, Result};
use crate::error::Error;
use crate::exit;
use crate::net::dataplane::journal::{self, Decision, Entry};
use crate::size::human;

/// `migrant egress --suggest`: see [`super::suggest`].
pub fn suggest(p: &Project) -> Result<u8> {
    let path = journal_of(p)?;
    let entries = journal::read(&path)?;
    print!(
        "{}{}",
        super::suggest::render(&super::suggest::uses(&entries)),
        super::suggest::render_secrets(&super::suggest::lent(&entries), &p.cfg.secrets)
    );
    Ok(0)
}

/// The VM's journal file; 69 when there is no such VM.
fn journal_of(p: &Project) -> Result<std::path::PathBuf> {
    if !p.vm.state.exists() {
        return Err(Error::other(
            exit::UNAVAILABLE,
            format!("{}: no such VM (run `migrant up` first)", p.cfg.name),
        ));
    }
    Ok(p.vm.state.join(journal::FILE))
}

pub fn egress(p: &Project, json: bool, follow: bool, denied: bool) -> Result<u8> {
    let path = journal_of(p)?;
    let show = |e: &Entry, out: &mut dyn Write| -> std::io::Result<()> {
        if denied && e.decision != Decision::Denied {
            return Ok(());
        }
        if json {
            let line = serde_json::to_string(e).map_err(std::io::Error::other)?;
            writeln!(out, "{line}")
        } else {
            writeln!(out, "{}", render(e))
        }
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let print = |entries: &[Entry], out: &mut dyn Write| -> Result<()> {
        for e in entries {
            if let Err(err) = show(e, out) {
                // A closed pipe (`| head`) ends the listing quietly.
                if err.kind() == std::io::ErrorKind::BrokenPipe {
                    return Ok(());
                }
                return Err(Error::other(exit::SOFTWARE, err.to_string()));
            }
        }
        Ok(())
    };
    print(&journal::read(&path)?, &mut out)?;
    if !follow {
        return Ok(0);
    }
    // Follow: read what is appended; start over when the file was rotated.
    let mut pos = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let mut partial = String::new();
    loop {
        let _ = out.flush();
        std::thread::sleep(Duration::from_millis(500));
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if len < pos {
            pos = 0; // rotated
            partial.clear();
        }
        if len == pos {
            continue;
        }
        let Ok(mut f) = std::fs::File::open(&path) else {
            continue;
        };
        let mut text = String::new();
        if f.seek(std::io::SeekFrom::Start(pos)).is_err() || f.read_to_string(&mut text).is_err() {
            continue;
        }
        pos += text.len() as u64;
        partial.push_str(&text);
        // Only whole lines; keep a line still being written.
        let cut = partial.rfind('\n').map_or(0, |i| i + 1);
        let whole: String = partial.drain(..cut).collect();
        let entries: Vec<Entry> = journal::parse(&whole).collect();
        print(&entries, &mut out)?;
    }
}

/// `2026-11-26 07:50:01  tcp  45.20.0.10:443  ok.test  ↑1.2 KiB ↓35 KiB  allowed`
fn render(e: &Entry) -> String {
    let mut s = format!("{}  {:<4} {:<21}", timestamp(e.time), e.proto, e.dst);
    if let Some(n) = &e.name {
        s.push_str(&format!(" {n}"));
    }
    if let Some(secret) = &e.secret {
        s.push_str(&format!("  secret {secret}"));
        if let (Some(m), Some(p)) = (&e.method, &e.path) {
            s.push_str(&format!(" {m} {p}"));
        }
        if let Some(st) = e.status {
            s.push_str(&format!(" {st}"));
        }
    }
    if e.up > 0 || e.down > 0 {
        s.push_str(&format!("  up {} down {}", human(e.up), human(e.down)));
    }
    match e.decision {
        Decision::Allowed => s.push_str("  allowed"),
        Decision::Denied => s.push_str("  DENIED"),
    }
    if let Some(r) = &e.reason {
        s.push_str(&format!(" ({r})"));
    }
    if e.count > 1 {
        s.push_str(&format!(" ×{}", e.count));
    }
    s
}

/// UTC `YYYY-MM-DD HH:MM:SS` of a Unix time (the civil-from-days
/// algorithm; no time-zone database needed).
fn timestamp(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_dates() {
        assert_eq!(timestamp(0), "1970-01-01 00:00:00");
        assert_eq!(timestamp(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(timestamp(1_795_679_401), "2026-11-26 07:50:01");
    }

    #[test]
    fn lines_say_what_happened() {
        let mut e = Entry::new("udp", "10.1.2.3:53".into(), Decision::Denied);
        e.reason = Some("private".into());
        e.count = 7;
        let line = render(&e);
        assert!(
            line.contains("udp") && line.contains("10.1.2.3:53"),
            "{line}"
        );
        assert!(line.ends_with("DENIED (private) ×7"), "{line}");
    }
}
