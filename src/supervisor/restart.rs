//! The supervisor's restartable children (the WireGuard loop, the
//! dataplane), one policy for both ([`Helper`]): when one dies, the VM
//! fails closed (its sockets or TUN went with it) and it is started again
//! after a delay that doubles, from 1 s up to 60 s, while it keeps dying
//! soon after it started ([`Restart`]).

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
    /// For a child that was just started (`running`), or for none.
    pub fn new(running: bool) -> Restart {
        Restart {
            at: None,
            backoff: FIRST,
            running_since: running.then(Instant::now),
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

/// A child process the supervisor watches.
pub trait Child {
    fn process(&mut self) -> &mut tokio::process::Child;
}

impl Child for crate::wireguard::child::Tunnel {
    fn process(&mut self) -> &mut tokio::process::Child {
        &mut self.child
    }
}

impl Child for crate::net::dataplane::parent::Running {
    fn process(&mut self) -> &mut tokio::process::Child {
        &mut self.child
    }
}

/// What [`Helper::next`] resolved to.
pub enum Turn {
    Exited(std::io::Result<std::process::ExitStatus>),
    Due,
}

/// A restartable child: running or waiting for its next start.
pub struct Helper<T> {
    /// How the logs name it ("the dataplane").
    name: &'static str,
    /// What the guest lacks while it is down ("network").
    loss: &'static str,
    running: Option<T>,
    restart: Restart,
}

impl<T: Child> Helper<T> {
    /// `running`: the child started with the VM, if it has one.
    pub fn new(name: &'static str, loss: &'static str, running: Option<T>) -> Helper<T> {
        Helper {
            name,
            loss,
            restart: Restart::new(running.is_some()),
            running,
        }
    }

    /// The next thing to handle: the running child exited, or (while none
    /// runs) its new start is due.
    pub async fn next(&mut self) -> Turn {
        match self.running.as_mut() {
            Some(c) => Turn::Exited(c.process().wait().await),
            None => {
                self.restart.due().await;
                Turn::Due
            }
        }
    }

    /// The child exited with `status`: forget it, schedule a new start.
    pub fn exited(&mut self, status: std::io::Result<std::process::ExitStatus>) {
        let status = status
            .map(|s| s.to_string())
            .unwrap_or_else(|e| e.to_string());
        self.running = None;
        let delay = self.restart.failed();
        tracing::error!(
            "{} exited ({status}); the guest has no {}; starting it again in {} s",
            self.name,
            self.loss,
            delay.as_secs()
        );
    }

    /// The outcome of a new start.
    pub fn restarted<E: std::fmt::Display>(&mut self, started: Result<T, E>) {
        match started {
            Ok(t) => {
                tracing::info!("{} started again", self.name);
                self.running = Some(t);
                self.restart.started();
            }
            Err(e) => {
                let delay = self.restart.failed();
                tracing::error!(
                    "cannot start {} again: {e}; trying in {} s",
                    self.name,
                    delay.as_secs()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn delays_double_while_it_keeps_dying_and_reset_after_a_long_run() {
        let mut r = Restart::new(true);
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
