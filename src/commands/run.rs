//! `migrant run [--rm] [--snapshot] -- CMD…`: the one-shot mode for CI.
//!
//! 1. `migrant up --no-autoconnect` runs as a child process (in its own
//!    process group, so a signal reaches its hooks and Ansible too);
//! 2. CMD runs in the guest over SSH with standard input, output and
//!    error passed through; its exit code becomes ours;
//! 3. with `--rm` the VM is destroyed afterwards, also when `up` or CMD
//!    failed, and on SIGINT, SIGTERM or SIGHUP (which are passed on to the
//!    running child; the exit code is then 128 + the signal's number).
//!
//! With `--snapshot` the VM is first stopped (if it runs) and rebuilt from
//! its snapshot, so CMD always starts from the same state; `--rm` then
//! throws the run's changes away the same way instead of destroying the VM
//! and the snapshot the next run needs.
//!
//! Standard output carries CMD's output only: everything migrant, its
//! hooks and Ansible print goes to standard error.

use std::io::{IsTerminal, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use super::{Project, Result};
use crate::error::Error;
use crate::exit;
use crate::provision::hooks::Trigger;

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub rm: bool,
    pub snapshot: bool,
    /// Run in a clone made from the snapshot (throwaway with `rm`).
    pub clone: bool,
    /// The clone's name.
    pub name: Option<String>,
    /// Boot the snapshot's disk even when its memory could be resumed.
    pub cold: bool,
    pub timeout: u64,
    pub command: Vec<String>,
    /// Write the run's egress journal here (JSON), for a CI artifact.
    pub egress_report: Option<std::path::PathBuf>,
}

/// The child signals are passed on to: a pid, or minus a process group.
static CHILD: AtomicI32 = AtomicI32::new(0);
/// The last signal received (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNAL.store(sig, Ordering::SeqCst);
    let target = CHILD.load(Ordering::SeqCst);
    if target != 0 {
        // SAFETY: kill(2) is async-signal-safe; atomics are lock-free.
        unsafe {
            libc::kill(target, sig);
        }
    }
}

fn install_signal_handlers() -> Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only touches atomics and calls kill(2), both
        // async-signal-safe.
        unsafe { sigaction(sig, &action) }
            .map_err(|e| Error::io(format!("cannot handle {sig}"))(e.into()))?;
    }
    Ok(())
}

fn interrupted() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Wait for `child`, passing signals on to `target` meanwhile.
fn wait_forwarding(mut child: std::process::Child, target: i32) -> Result<ExitStatus> {
    CHILD.store(target, Ordering::SeqCst);
    // A signal that came before the child was registered.
    if let Some(sig) = interrupted() {
        // SAFETY: plain kill(2) of our own child (or its group).
        unsafe {
            libc::kill(target, sig);
        }
    }
    let status = child.wait();
    CHILD.store(0, Ordering::SeqCst);
    status.map_err(Error::io("waiting for a child process"))
}

/// Point file descriptor 1 at standard error; return the real standard
/// output (close-on-exec) for CMD.
fn divert_stdout() -> Result<OwnedFd> {
    let _ = std::io::stdout().flush();
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) and dup2 on the process's standard
    // descriptors; the new descriptor is owned by the returned OwnedFd.
    unsafe {
        let saved = libc::fcntl(1, libc::F_DUPFD_CLOEXEC, 3);
        if saved < 0 {
            return Err(Error::io("cannot duplicate standard output")(
                std::io::Error::last_os_error(),
            ));
        }
        let saved = OwnedFd::from_raw_fd(saved);
        if libc::dup2(2, 1) < 0 {
            return Err(Error::io("cannot redirect standard output")(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(saved)
    }
}

/// The command line the guest's shell runs: one argument as written (a
/// shell command line), several quoted word by word.
pub fn remote_command(args: &[String]) -> Result<String> {
    match args {
        [] => Err(Error::other(exit::USAGE, "run: no command given")),
        [one] => Ok(one.clone()),
        many => shlex::try_join(many.iter().map(String::as_str))
            .map_err(|e| Error::other(exit::USAGE, format!("run: {e}"))),
    }
}

/// The exit code for a finished child: its code, or 128 + the signal.
fn code_of(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(c), _) => c.clamp(0, 255) as u8,
        (None, Some(s)) => (128 + s).clamp(0, 255) as u8,
        _ => exit::SOFTWARE,
    }
}

pub fn run(p: &Project, o: &RunOptions) -> Result<u8> {
    let remote = remote_command(&o.command)?;
    if o.snapshot && !p.vm.snapshot().exists() {
        // Checked first, so that nothing is created or stopped.
        return Err(crate::runstate::Refusal::Missing {
            name: p.cfg.name.clone(),
            what: "snapshot to run from",
            then: "; `migrant up`, then `migrant snapshot`, saves one",
        }
        .into());
    }
    if o.snapshot {
        super::up::check_resumable(p, o.cold)?;
    }
    install_signal_handlers()?;
    let stdout = divert_stdout()?;
    if o.clone {
        return run_clone(p, o, &remote, stdout);
    }
    let restored = if o.snapshot {
        super::disk::restore_snapshot(p, "run")
    } else {
        Ok(())
    };
    let result = restored.and_then(|()| up_and_run(p, o, &remote, stdout));
    if !o.rm {
        return result;
    }
    // With --snapshot, --rm throws the run's changes away but keeps the VM
    // and its snapshot for the next run; without it, the VM is destroyed.
    let cleanup = if o.snapshot { discard(p) } else { remove(p) };
    after_cleanup(cleanup, result)
}

/// CMD's result after `--rm`'s cleanup: a cleanup failure is the error
/// when CMD succeeded, and is said besides CMD's own result otherwise.
fn after_cleanup(cleanup: Result<()>, result: Result<u8>) -> Result<u8> {
    match (cleanup, result) {
        (Ok(()), result) => result,
        (Err(e), Ok(0)) => Err(e),
        (Err(e), result) => {
            eprintln!("migrant: error: {}", crate::exit::chain(&e));
            result
        }
    }
}

/// `--clone`: CMD in a clone of the VM's snapshot; the VM itself is not
/// touched. With `--rm` the clone is destroyed afterwards whatever
/// happened; without, it runs on (a CI driver's job VM) unless it never
/// came up.
fn run_clone(p: &Project, o: &RunOptions, remote: &str, stdout: OwnedFd) -> Result<u8> {
    let clone = super::clone::make(p, o.name.as_deref())?;
    eprintln!(
        "==> {}: a clone of {}'s snapshot ({})",
        clone.cfg.name,
        p.cfg.name,
        super::disk::snapshot_summary(&p.vm).unwrap_or_default()
    );
    let result = up_and_run(&clone, o, remote, stdout);
    let running = matches!(super::live(&clone.vm), Ok(super::Live::Active(_)));
    if o.rm || !running {
        return after_cleanup(remove(&clone), result);
    }
    eprintln!(
        "==> {name}: left running: `migrant ssh --name {name}`, `migrant destroy --name {name}`",
        name = clone.cfg.name
    );
    result
}

/// [`up_then_cmd`], then, with `--egress-report`, the run's journal
/// written (before any `--rm` cleanup removes it).
fn up_and_run(p: &Project, o: &RunOptions, remote: &str, stdout: OwnedFd) -> Result<u8> {
    let started = crate::state::now();
    let result = up_then_cmd(p, o, remote, stdout);
    let Some(file) = &o.egress_report else {
        return result;
    };
    match (egress_report(p, started, file), result) {
        (Ok(()), result) => result,
        (Err(e), Ok(0)) => Err(e),
        (Err(e), result) => {
            eprintln!("migrant: error: {}", crate::exit::chain(&e));
            result
        }
    }
}

/// The journal entries of this run (from `since` on) as one JSON
/// document in `file`, written as the invoking user.
fn egress_report(p: &Project, since: u64, file: &std::path::Path) -> Result<()> {
    use crate::net::dataplane::journal;
    // Flows are journaled when they end: let the last ones arrive.
    std::thread::sleep(Duration::from_secs(1));
    let entries: Vec<journal::Entry> = journal::read(&p.vm.state.join(journal::FILE))?
        .into_iter()
        .filter(|e| e.time >= since)
        .collect();
    let report = serde_json::json!({
        "vm": p.cfg.name,
        "since": since,
        "entries": entries,
    });
    let text = serde_json::to_vec_pretty(&report)
        .map_err(|e| Error::other(exit::SOFTWARE, e.to_string()))?;
    crate::provision::as_user::write_file(file, &text, 0o644)?;
    eprintln!(
        "==> {}: egress report written to {}",
        p.cfg.name,
        file.display()
    );
    Ok(())
}

fn up_then_cmd(p: &Project, o: &RunOptions, remote: &str, stdout: OwnedFd) -> Result<u8> {
    let mut up = Command::new(super::self_exe()?);
    up.arg("-C")
        .arg(&p.cfg.dir)
        .args(["up", "--no-autoconnect", "--trigger", "run", "--timeout"])
        .arg(o.timeout.to_string())
        .args(o.cold.then_some("--cold"));
    if o.clone {
        up.arg("--instance").arg(&p.cfg.name);
    }
    up.stdin(Stdio::null()).process_group(0);
    let child = up.spawn().map_err(Error::io("cannot start `migrant up`"))?;
    let pgid = child.id() as i32;
    let status = wait_forwarding(child, -pgid)?;
    if let Some(sig) = interrupted() {
        return Ok(128 + sig as u8);
    }
    if !status.success() {
        // `up` said what went wrong.
        return Ok(code_of(status));
    }

    let tty = std::io::stdin().is_terminal() && nix::unistd::isatty(&stdout).unwrap_or(false);
    let mut ssh = super::ssh_command(&p.cfg, &p.vm)?;
    ssh.args(["-o", "BatchMode=yes"])
        .arg(if tty { "-t" } else { "-T" })
        .arg("--")
        .arg(remote)
        .stdout(Stdio::from(stdout));
    eprintln!("==> {}: running {remote}", p.cfg.name);
    let child = ssh.spawn().map_err(Error::io("cannot run ssh"))?;
    let pid = child.id() as i32;
    let status = wait_forwarding(child, pid)?;
    if let Some(sig) = interrupted() {
        return Ok(128 + sig as u8);
    }
    let code = code_of(status);
    if code == 255 {
        eprintln!(
            "warning: {}: ssh exited with 255: the command's own exit code, or an SSH failure",
            p.cfg.name
        );
    }
    Ok(code)
}

/// `--rm --snapshot`: stop the VM and rebuild its disk from the snapshot.
fn discard(p: &Project) -> Result<()> {
    eprintln!(
        "==> {}: discarding the run's changes (--rm --snapshot)",
        p.cfg.name
    );
    retry("restore", || super::disk::restore_snapshot(p, "run"))
}

/// Destroy the VM for `--rm`.
fn remove(p: &Project) -> Result<()> {
    eprintln!("==> {}: removing the VM (--rm)", p.cfg.name);
    retry("destroy", || {
        super::lifecycle::destroy_as(p, Trigger::Run).map(drop)
    })
}

/// Try `step` for up to 30 s: a VM whose `up` was interrupted may still be
/// setting itself up (its lock held, no control socket yet).
fn retry(what: &str, mut step: impl FnMut() -> Result<()>) -> Result<()> {
    let mut last = None;
    for _ in 0..30 {
        match step() {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::debug!("{what}: {e}");
                last = Some(e);
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
    Err(last.unwrap_or_else(|| Error::other(exit::SOFTWARE, format!("{what} did not finish"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_argument_is_a_command_line() {
        let r = remote_command(&["make test && make lint".to_string()]);
        assert_eq!(r.ok().as_deref(), Some("make test && make lint"));
    }

    #[test]
    fn several_arguments_are_quoted() {
        let args: Vec<String> = ["sh", "-c", "exit 3"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let r = remote_command(&args).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(shlex::split(&r), Some(args));
        let args: Vec<String> = ["echo", "it's", "$HOME", ""]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let r = remote_command(&args).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(shlex::split(&r), Some(args));
    }

    #[test]
    fn empty_and_nul_are_usage_errors() {
        assert_eq!(
            remote_command(&[]).map_err(|e| e.exit_code()).err(),
            Some(exit::USAGE)
        );
        let args = vec!["a".to_string(), "b\0".to_string()];
        assert_eq!(
            remote_command(&args).map_err(|e| e.exit_code()).err(),
            Some(exit::USAGE)
        );
    }

    #[test]
    fn exit_codes_of_children() {
        assert_eq!(code_of(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(code_of(ExitStatus::from_raw(libc::SIGINT)), 130);
    }
}
