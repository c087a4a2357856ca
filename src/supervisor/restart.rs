//! When to start a child that died (the WireGuard loop, the dataplane)
//! again: after a delay that doubles, from 1 s up to 60 s, while it keeps
//! dying soon after it started.

use std::time::Duration;

use tokio::time::Instant;

const FIRST: Duration = Duration::from_secs(1);
const LONGEST: Duration = Duration::from_secs(60);

pub struct Restart {
    at: Option<Instant>,
    backoff: Duration,
    /// Since when the child runs; `None` while it does not.
    running_since: Option<Instant>,
}

impl Restart {
    /// For a child that was just started.
    pub fn new() -> Restart {
        Restart {
            at: None,
            backoff: FIRST,
            running_since: Some(Instant::now()),
        }
    }

    /// The child died or could not start: schedule the next start; returns
    /// how long until then.
    pub fn failed(&mut self) -> Duration {
        if self
            .running_since
            .take()
            .is_some_and(|t| t.elapsed() > LONGEST)
        {
            self.backoff = FIRST;
        }
        let delay = self.backoff;
        self.at = Some(Instant::now() + delay);
        self.backoff = (self.backoff * 2).min(LONGEST);
        delay
    }

    /// The child runs again.
    pub fn started(&mut self) {
        self.running_since = Some(Instant::now());
        self.at = None;
    }

    /// Resolves when a start is due (never while none is scheduled).
    pub async fn due(&mut self) {
        match self.at {
            Some(at) => {
                tokio::time::sleep_until(at).await;
                self.at = None;
            }
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn delays_double_while_it_keeps_dying_and_reset_after_a_long_run() {
        let mut r = Restart::new();
        assert_eq!(r.failed(), Duration::from_secs(1));
        r.due().await;
        assert_eq!(r.failed(), Duration::from_secs(2));
        r.due().await;
        for _ in 0..10 {
            r.failed();
            r.due().await;
        }
        assert_eq!(r.failed(), LONGEST);
        r.due().await;
        r.started();
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(r.failed(), FIRST);
    }
}
