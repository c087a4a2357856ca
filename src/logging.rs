//! The one path every log line of migrant's processes takes: a tracing
//! subscriber whose writer admits lines through a token bucket. A guest
//! (or a compromised QEMU) that can make a process log per packet, per
//! datagram or per reset gets at most [`BURST`] lines at once and
//! [`PER_SECOND`] after that; the lines it made beyond are counted and
//! said in one line when logging resumes. Log files themselves are
//! capped by whoever writes them ([`crate::rotate`]), so both the rate and
//! the total are bounded.

use std::io::Write;
use std::sync::Mutex;
use std::time::Instant;

/// Lines admitted at once, after a quiet spell.
pub const BURST: f64 = 200.0;
/// Lines admitted per second when busy.
pub const PER_SECOND: f64 = 20.0;

/// A token bucket of log lines: pure (time is passed in), unit-tested.
#[derive(Debug)]
pub struct Bucket {
    tokens: f64,
    last: Option<Instant>,
    /// Lines refused since the last admitted one.
    suppressed: u64,
}

impl Default for Bucket {
    fn default() -> Self {
        Bucket {
            tokens: BURST,
            last: None,
            suppressed: 0,
        }
    }
}

impl Bucket {
    /// Whether a line may be written at `now`; `Some(n)` admits it after
    /// `n` refused ones (0 when none were).
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        if let Some(last) = self.last {
            let elapsed = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * PER_SECOND).min(BURST);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed = self.suppressed.saturating_add(1);
            None
        }
    }
}

static BUCKET: Mutex<Option<Bucket>> = Mutex::new(None);

/// The writer of one event: buffers the line, then writes it to stderr
/// if the bucket admits it.
pub struct Line(Vec<u8>);

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // A line longer than this is cut: one event, bounded bytes.
        let room = MAX_LINE.saturating_sub(self.0.len());
        self.0.extend_from_slice(&buf[..buf.len().min(room)]);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The longest line written (bytes).
pub const MAX_LINE: usize = 8 * 1024;

impl Drop for Line {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let admitted = match BUCKET.lock() {
            Ok(mut b) => b.get_or_insert_with(Bucket::default).admit(Instant::now()),
            // A poisoned lock: write, as a process without the limiter would.
            Err(_) => Some(0),
        };
        let Some(suppressed) = admitted else { return };
        let mut err = std::io::stderr().lock();
        if suppressed > 0 {
            let _ = writeln!(
                err,
                "(log: {suppressed} lines suppressed; at most {PER_SECOND} a second are written)"
            );
        }
        if !self.0.ends_with(b"\n") {
            self.0.push(b'\n');
        }
        let _ = err.write_all(&self.0);
    }
}

struct MakeLine;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for MakeLine {
    type Writer = Line;
    fn make_writer(&'a self) -> Line {
        Line(Vec::new())
    }
}

/// Install the subscriber: `MIGRANT_LOG`, or `default` (`-v`: debug of
/// migrant, `-vv`: everything), written to stderr through the bucket.
pub fn init(verbose: u8, default: &str) {
    let filter = match verbose {
        0 => std::env::var("MIGRANT_LOG").unwrap_or_else(|_| default.to_string()),
        1 => "migrant=debug".into(),
        _ => "debug".into(),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(MakeLine)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_flood_gets_the_burst_then_the_rate() {
        let mut b = Bucket::default();
        let t0 = Instant::now();
        let admitted = (0..10_000).filter(|_| b.admit(t0).is_some()).count();
        assert_eq!(admitted, BURST as usize);
        // One second later: PER_SECOND more, the first says how many
        // were refused meanwhile.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.admit(t1), Some(10_000 - BURST as u64));
        let more = (1..10_000).filter(|_| b.admit(t1).is_some()).count();
        assert_eq!(more, PER_SECOND as usize - 1);
        // A quiet minute refills only up to the burst.
        let t2 = t1 + Duration::from_secs(60);
        let refilled = (0..10_000).filter(|_| b.admit(t2).is_some()).count();
        assert_eq!(refilled, BURST as usize);
    }

    #[test]
    fn lines_are_cut_at_the_cap() {
        let mut l = Line(Vec::new());
        let big = vec![b'x'; MAX_LINE * 2];
        assert_eq!(l.write(&big).ok(), Some(big.len()));
        assert_eq!(l.0.len(), MAX_LINE);
        l.0.clear();
    }
}
