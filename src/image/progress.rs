//! Download progress: an indicatif bar on a terminal, plain lines (every
//! 10 % or 10 s) otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::size::human;

pub struct Progress {
    label: String,
    bar: Option<ProgressBar>,
    total: Option<u64>,
    last_line: Instant,
    last_tenth: u64,
}

impl Progress {
    /// A bar when stderr is a terminal, plain lines otherwise.
    pub fn new(label: &str) -> Progress {
        Progress::with_terminal(label, std::io::stderr().is_terminal())
    }

    pub fn with_terminal(label: &str, terminal: bool) -> Progress {
        let bar = terminal.then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_message(label.to_string());
            bar
        });
        Progress {
            label: label.to_string(),
            bar,
            total: None,
            last_line: Instant::now(),
            last_tenth: 0,
        }
    }

    /// The expected size, once known.
    pub fn set_total(&mut self, total: Option<u64>) {
        self.total = total;
        if let (Some(bar), Some(t)) = (&self.bar, total) {
            bar.set_length(t);
        }
    }

    /// `done` bytes are there (including resumed ones).
    pub fn update(&mut self, done: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            return;
        }
        let tenth = match self.total {
            Some(t) if t > 0 => done.saturating_mul(10) / t,
            _ => 0,
        };
        let due = self.last_line.elapsed() >= Duration::from_secs(10);
        if tenth > self.last_tenth || due {
            self.last_tenth = tenth;
            self.last_line = Instant::now();
            self.line(done);
        }
    }

    fn line(&self, done: u64) {
        match self.total {
            Some(t) if t > 0 => println!(
                "    {}: {}% ({} of {})",
                self.label,
                done.saturating_mul(100) / t,
                human(done),
                human(t)
            ),
            _ => println!("    {}: {}", self.label, human(done)),
        }
    }

    /// A message between progress updates (retries, resumes).
    pub fn note(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => println!("{text}"),
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
