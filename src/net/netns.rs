//! The VM's anonymous network namespace.
//!
//! The supervisor creates it with `unshare(CLONE_NEWNET)` on a short-lived
//! thread and keeps only a descriptor: no name under `/run/netns`, so when
//! the supervisor and QEMU are gone, the namespace is gone too. Work that
//! must happen inside (creating sockets, the TAP, netlink) runs on a scoped
//! thread that enters it; sockets keep their namespace afterwards.
//!
//! This is the one place that needs CAP_SYS_ADMIN for networking.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::sched::{CloneFlags, setns, unshare};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot create the VM's network namespace")]
    Create(#[source] std::io::Error),
    #[error("cannot enter the VM's network namespace")]
    Enter(#[source] std::io::Error),
    #[error("a thread working inside the VM's network namespace panicked")]
    Panicked,
}

/// A network namespace held by descriptor.
#[derive(Debug)]
pub struct NetNs {
    fd: OwnedFd,
}

impl NetNs {
    /// Create a new, empty network namespace (only a down `lo`).
    pub fn create() -> Result<NetNs, NetnsError> {
        std::thread::scope(|s| {
            s.spawn(|| -> Result<NetNs, NetnsError> {
                unshare(CloneFlags::CLONE_NEWNET).map_err(|e| NetnsError::Create(e.into()))?;
                let f = File::open("/proc/thread-self/ns/net").map_err(NetnsError::Create)?;
                Ok(NetNs { fd: f.into() })
            })
            .join()
            .map_err(|_| NetnsError::Panicked)?
        })
    }

    /// Hold an existing namespace, e.g. `/run/netns/NAME`.
    pub fn open(path: &std::path::Path) -> Result<NetNs, NetnsError> {
        let f = File::open(path).map_err(NetnsError::Enter)?;
        Ok(NetNs { fd: f.into() })
    }

    /// Run `f` on a thread inside this namespace and return its result.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
        std::thread::scope(|s| {
            s.spawn(|| -> Result<T, NetnsError> {
                setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(|e| NetnsError::Enter(e.into()))?;
                Ok(f())
            })
            .join()
            .map_err(|_| NetnsError::Panicked)?
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
