//! The egress journal: what a VM talked to, for `migrant egress`.
//!
//! Users run untrusted agents and want to see where they went. Every flow
//! the proxy relays (when it ends, with its bytes), every refusal and every
//! DNS question the gateway answers becomes one JSON line in
//! `egress.jsonl` in the VM's state folder (0644, like the VM's record:
//! readable without root). The guest decides how much happens, so the
//! journal is bounded three ways: entries go through a bounded queue
//! (beyond it they are counted as dropped, never waited for), refusals of
//! the same kind to the same place within a second become one line with a
//! count, and the file is rotated at [`MAX_BYTES`] keeping one previous
//! file: at most 2 × [`MAX_BYTES`] on disk per VM.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The journal's file name in the VM's state folder.
pub const FILE: &str = "egress.jsonl";
/// Rotated at this size; one previous file (`egress.jsonl.1`) is kept.
pub const MAX_BYTES: u64 = 4 << 20;
/// Entries waiting to be written at most.
const QUEUE: usize = 4096;
/// Refusals are summed over this interval.
const FLUSH: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Allowed,
    Denied,
}

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Unix time, seconds.
    pub time: u64,
    /// `tcp`, `udp` or `dns`.
    pub proto: String,
    /// Where the guest meant to go (`ip:port`); for `dns`, the question's
    /// type.
    pub dst: String,
    /// The TLS SNI, HTTP Host, or DNS name the flow was for, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Bytes from the guest, and to it.
    #[serde(default)]
    pub up: u64,
    #[serde(default)]
    pub down: u64,
    pub decision: Decision,
    /// Why it was refused, or the rule that let it through (`hole`,
    /// `tunnel`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Identical refusals summed into this line.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub count: u64,
    /// A request the credential broker handled: the secret it carried
    /// (its name, never its value), the method, the path (without the
    /// query) and the server's status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
}

fn one() -> u64 {
    1
}

fn is_one(n: &u64) -> bool {
    *n == 1
}

impl Entry {
    pub fn new(proto: &str, dst: String, decision: Decision) -> Entry {
        Entry {
            time: now(),
            proto: proto.to_string(),
            dst,
            name: None,
            up: 0,
            down: 0,
            decision,
            reason: None,
            count: 1,
            secret: None,
            method: None,
            path: None,
            status: None,
        }
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Where the dataplane records; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Journal {
    tx: Option<tokio::sync::mpsc::Sender<Entry>>,
    dropped: Arc<AtomicU64>,
}

impl Journal {
    /// A journal that records nothing (tests, benchmarks).
    pub fn disabled() -> Journal {
        Journal::default()
    }

    /// Start the writer task for `path` (root's alone) on the current runtime.
    pub fn open(path: PathBuf) -> Journal {
        let mut out = file(path);
        Journal::with_sink(Box::new(move |lines: &[u8]| out.write_lines(lines)))
    }

    /// Start the writer task on the current runtime, handing batches of
    /// whole lines to `sink` (the dataplane child: to the supervisor,
    /// which appends them to [`file`]).
    pub fn with_sink(sink: Sink) -> Journal {
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        tokio::spawn(writer(sink, rx, Arc::clone(&dropped)));
        Journal {
            tx: Some(tx),
            dropped,
        }
    }

    /// Record `e`, never waiting: a full queue drops it (counted).
    pub fn record(&self, e: Entry) {
        if let Some(tx) = &self.tx
            && tx.try_send(e).is_err()
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

type Key = (String, String, Option<String>, Option<String>);

/// Where the journal's lines go.
pub type Sink = Box<dyn FnMut(&[u8]) -> std::io::Result<()> + Send>;

/// The journal file of a VM, for the supervisor to append the lines its
/// dataplane sends: rotated at [`MAX_BYTES`], readable by root and
/// `owner` (the VM's owner) only.
pub fn file(path: PathBuf) -> crate::rotate::Rotating {
    crate::rotate::Rotating::new(path, MAX_BYTES, 0o600)
}

async fn writer(sink: Sink, mut rx: tokio::sync::mpsc::Receiver<Entry>, dropped: Arc<AtomicU64>) {
    let mut file = File::new(sink);
    let mut pending: HashMap<Key, Entry> = HashMap::new();
    let mut tick = tokio::time::interval(FLUSH);
    loop {
        tokio::select! {
            e = rx.recv() => match e {
                Some(e) if e.decision == Decision::Denied => {
                    let key = (e.proto.clone(), e.dst.clone(), e.name.clone(), e.reason.clone());
                    // Bounded by the queue's rate and the flush interval;
                    // a guest spraying addresses gets one line each.
                    if pending.len() >= QUEUE {
                        file.write(&e);
                    } else {
                        pending.entry(key).and_modify(|p| p.count += 1).or_insert(e);
                    }
                }
                Some(e) => file.write(&e),
                None => break,
            },
            _ = tick.tick() => {
                for (_, e) in pending.drain() {
                    file.write(&e);
                }
                file.flush();
                let lost = dropped.swap(0, Ordering::Relaxed);
                if lost > 0 {
                    let mut e = Entry::new("-", "-".into(), Decision::Denied);
                    e.reason = Some("journal-overflow".into());
                    e.count = lost;
                    file.write(&e);
                }
            }
        }
    }
    for (_, e) in pending.drain() {
        file.write(&e);
    }
    file.flush();
}

/// Lines waiting for the sink, gathered and handed over once per flush
/// (every [`FLUSH`], or at 64 KiB), not one system call per flow.
struct File {
    out: Sink,
    pending: Vec<u8>,
}

impl File {
    fn new(out: Sink) -> File {
        File {
            out,
            pending: Vec::new(),
        }
    }

    fn write(&mut self, e: &Entry) {
        let Ok(line) = serde_json::to_vec(e) else {
            return;
        };
        // Whole lines only: rotation never splits one.
        if self.pending.len() + line.len() + 1 > 64 * 1024 {
            self.flush();
        }
        self.pending.extend_from_slice(&line);
        self.pending.push(b'\n');
    }

    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        // One write per whole line when a rotation is due, so each file
        // holds whole lines; else all at once.
        let text = std::mem::take(&mut self.pending);
        if let Err(err) = (self.out)(&text) {
            tracing::warn!("egress journal: {err}");
        }
    }
}

/// Every entry of the journal at `path` (previous file first); lines that
/// are not entries are skipped.
pub fn read(path: &Path) -> Result<Vec<Entry>, crate::state::StateError> {
    let mut out = Vec::new();
    for p in [crate::rotate::previous(path), path.to_path_buf()] {
        match std::fs::read_to_string(&p) {
            Ok(text) => out.extend(parse(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(crate::state::io_err(&p)(e)),
        }
    }
    Ok(out)
}

/// The entries in `text` (one JSON object per line).
pub fn parse(text: &str) -> impl Iterator<Item = Entry> + '_ {
    text.lines()
        .filter_map(|l| serde_json::from_str::<Entry>(l).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refusals_are_summed_and_the_file_is_bounded() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join(FILE);
        let j = Journal::open(path.clone());
        let mut ok = Entry::new("tcp", "45.20.0.10:443".into(), Decision::Allowed);
        ok.name = Some("ok.test".into());
        ok.up = 10;
        ok.down = 20;
        j.record(ok.clone());
        for _ in 0..1000 {
            let mut e = Entry::new("udp", "10.1.2.3:53".into(), Decision::Denied);
            e.reason = Some("private".into());
            j.record(e);
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(FLUSH * 2).await;
        let got = read(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got.first(), Some(&ok));
        let denied: Vec<_> = got
            .iter()
            .filter(|e| e.decision == Decision::Denied)
            .collect();
        assert!(!denied.is_empty());
        assert!(denied.len() <= 3, "not summed: {}", denied.len());
        assert_eq!(denied.iter().map(|e| e.count).sum::<u64>(), 1000);

        // Far more than the limit: rotated, never more than twice it.
        let mut big = Entry::new("tcp", "45.20.0.10:80".into(), Decision::Allowed);
        big.name = Some("x".repeat(1000));
        for _ in 0..(3 * MAX_BYTES / 1000) {
            j.record(big.clone());
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(FLUSH * 2).await;
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        assert!(size(&path) <= MAX_BYTES);
        assert!(size(&crate::rotate::previous(&path)) <= MAX_BYTES);
        assert!(size(&crate::rotate::previous(&path)) > 0, "never rotated");
    }
}
