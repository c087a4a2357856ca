//! The per-VM supervisor: owns the VM's network namespace, its dataplane
//! and QEMU. Started by `migrant up` as `migrant __supervisor …` in a new
//! session; lives exactly as long as the VM. [`prepare`] readies
//! everything, [`start`] starts the children, [`running`] watches them,
//! [`server`] answers the control socket.

pub mod control;
pub mod error;
mod identity;
mod memory;
pub mod netlab;
mod prepare;
pub mod progress;
mod restart;
mod running;
mod serial;
mod server;
mod start;

use std::path::PathBuf;

use crate::state::{self, Paths, VmPaths};
use progress::{Progress, Reporter};

pub use error::SupervisorError;

use crate::error::Error;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    Error::io(what)
}

/// Arguments of the hidden `__supervisor` mode.
#[derive(Debug, Clone)]
pub struct Args {
    pub name: String,
    pub project: PathBuf,
    /// Inherited descriptor holding the VM's lock.
    pub lock_fd: Option<i32>,
    /// Inherited write end of the progress pipe.
    pub progress_fd: Option<i32>,
    /// Inherited descriptor holding the validated config (see
    /// [`config::Config::handover`]).
    pub config_fd: i32,
    /// Inherited descriptor holding the secrets to broker (see
    /// [`crate::net::dataplane::broker::Plan`]).
    pub secrets_fd: Option<i32>,
    /// Seconds after which a guest that has not answered SSH is stopped.
    pub boot_timeout: Option<u64>,
}

/// Adopt a descriptor number given on our command line by our parent
/// (`None` when absent or not open).
fn adopt(fd: Option<i32>) -> Option<std::fs::File> {
    crate::sandbox::inherited(fd?).ok().map(std::fs::File::from)
}

/// Entry point of `migrant __supervisor`. Returns the process exit code.
pub fn main(args: Args) -> u8 {
    let _lock = adopt(args.lock_fd).map(state::VmLock::from_inherited);
    let mut reporter = Reporter::new(adopt(args.progress_fd));
    crate::net::dataplane::raise_fd_limit();
    let paths = Paths::from_env();
    let vm = paths.vm(&args.name);
    // First, while this process has one thread.
    let entered = identity::enter(&paths, &vm);
    let log = capture_output(&vm);
    let result = entered.and_then(|()| run(&args, &vm, &mut reporter));
    let code = match &result {
        Ok(()) => 0,
        Err(e) => {
            let message = crate::exit::chain(e);
            tracing::error!("{message}");
            reporter.send(&Progress::Failed {
                message,
                code: e.exit_code(),
            });
            e.exit_code()
        }
    };
    cleanup(&vm);
    if let Some(drain) = log {
        release_output(&drain);
    }
    code
}

/// `supervisor.log` is rotated at this size.
pub const LOG_CAP: u64 = 2 << 20;

/// Send this process's stdout and stderr (and so its children's: the
/// dataplane, the tunnel) into a pipe drained into `supervisor.log`,
/// capped at [`LOG_CAP`] with one previous file. On failure the output
/// stays where `up` put it (logged: the rate limit still holds).
fn capture_output(vm: &VmPaths) -> Option<crate::rotate::Drain> {
    let captured = (|| -> std::io::Result<crate::rotate::Drain> {
        let (write, drain) =
            crate::rotate::capped_log("supervisor-log", &vm.supervisor_log(), LOG_CAP)?;
        for fd in [libc::STDOUT_FILENO, libc::STDERR_FILENO] {
            // SAFETY: dup2 onto the standard descriptors, which this
            // process owns; `write` stays open for the call.
            if unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&write), fd) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(drain)
    })();
    match captured {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::warn!("supervisor log stays uncapped: {e}");
            None
        }
    }
}

/// Close this process's ends of the log pipe and let the drain finish
/// (the children are gone by now; it waits at most two seconds).
fn release_output(drain: &crate::rotate::Drain) {
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        for fd in [libc::STDOUT_FILENO, libc::STDERR_FILENO] {
            // SAFETY: dup2 of an open descriptor onto a standard one.
            unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), fd) };
        }
    }
    drain.wait(std::time::Duration::from_secs(2));
}

/// Remove the runtime files and mark the record stopped.
fn cleanup(vm: &VmPaths) {
    if let Err(e) = crate::runstate::stopped(vm, None) {
        tracing::warn!("cannot mark the VM stopped: {e}");
    }
}

fn run(args: &Args, vm: &VmPaths, reporter: &mut Reporter) -> Result<(), Error> {
    let p = prepare::prepare(args, vm)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io("tokio runtime"))?;
    // block_on runs the root future on this (the main) thread, so QEMU is
    // forked by the thread that lives as long as the VM.
    let deadline = args.boot_timeout.map(|s| {
        (
            s,
            tokio::time::Instant::now() + std::time::Duration::from_secs(s),
        )
    });
    rt.block_on(start::supervise(p, vm, reporter, deadline))
}
