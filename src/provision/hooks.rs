//! Lifecycle hooks: executable `hooks/pre-up`, `post-up`, `pre-down` and
//! `post-down` beside the Migrantfile, with the original tool's semantics.
//!
//! * Hooks are tied to state transitions. `pre-up` runs before the VM
//!   starts (on creation: after its disk and seed are made, before QEMU);
//!   `post-up` once it is ready (SSH, cloud-init and provisioning done);
//!   `pre-down` before a stop; `post-down` after it.
//! * A failing `pre-up` aborts `up`. A failing `pre-down` aborts a
//!   graceful stop (`halt`, `snapshot`), never a forced or destructive one
//!   (`halt --force`, `destroy`, `reset`, `run --rm`). Post hooks only warn.
//! * Stops the supervisor makes on its own (a broken isolation guarantee,
//!   the guest powering off) run no hooks: hooks run from commands only.
//! * Missing hooks are skipped; a hook that exists but is not executable is
//!   skipped with a note.
//! * Hooks run as the user running migrant (a hook someone else may
//!   change is refused), with standard input from `/dev/null`, in the project
//!   folder, and with `MIGRANT_VM_NAME`, `MIGRANT_VM_DIR` (the project
//!   folder), `MIGRANT_HOOK`, `MIGRANT_TRIGGER` (the command) and
//!   `MIGRANT_VM_IP` (empty when the guest has no address yet, or is
//!   stopped).
//!
//! On first creation only, `pre-up` may write `.qemu-extra-args` into the
//! project folder, one QEMU argument a line (blank lines ignored). `up`
//! reads it right after `pre-up`, deletes it, and keeps the arguments in
//! the VM's state folder; the supervisor appends them to QEMU's command
//! line on every boot of that VM.

use std::io::Read;
use std::net::Ipv4Addr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use super::as_user::{self, AsUserError};
use super::keys::{Invoker, KeyError};
use crate::config::Config;
use crate::state::VmPaths;

/// One of the four hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    PreUp,
    PostUp,
    PreDown,
    PostDown,
}

impl Hook {
    pub fn name(self) -> &'static str {
        match self {
            Hook::PreUp => "pre-up",
            Hook::PostUp => "post-up",
            Hook::PreDown => "pre-down",
            Hook::PostDown => "post-down",
        }
    }
    fn is_pre(self) -> bool {
        matches!(self, Hook::PreUp | Hook::PreDown)
    }
}

/// The command that caused a hook to run (`MIGRANT_TRIGGER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Trigger {
    Up,
    Halt,
    Destroy,
    Snapshot,
    Reset,
    Run,
}

impl Trigger {
    pub fn name(self) -> &'static str {
        match self {
            Trigger::Up => "up",
            Trigger::Halt => "halt",
            Trigger::Destroy => "destroy",
            Trigger::Snapshot => "snapshot",
            Trigger::Reset => "reset",
            Trigger::Run => "run",
        }
    }
}

/// What a failing hook does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// The command stops with an error.
    Abort,
    /// A warning; the command goes on.
    Warn,
}

/// How a failure of `hook` is treated when `trigger` runs it. `forced`:
/// the stop does not wait for the guest (`halt --force`).
pub fn on_failure(hook: Hook, trigger: Trigger, forced: bool) -> OnFailure {
    match hook {
        Hook::PreUp => OnFailure::Abort,
        Hook::PreDown => match trigger {
            Trigger::Halt | Trigger::Snapshot if !forced => OnFailure::Abort,
            _ => OnFailure::Warn,
        },
        Hook::PostUp | Hook::PostDown => OnFailure::Warn,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    // "<hook> hook failed": the words the original tool printed, which
    // scripts look for.
    #[error("{hook} hook failed ({status}): {path}; {what} aborted")]
    Failed {
        hook: &'static str,
        path: PathBuf,
        status: String,
        what: &'static str,
    },
    #[error("cannot run the {hook} hook {path}")]
    Spawn {
        hook: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the {hook} hook cannot run")]
    AsUser {
        hook: &'static str,
        #[source]
        source: AsUserError,
    },
    #[error(transparent)]
    Invoker(#[from] KeyError),
    #[error("{path}: {reason}")]
    ExtraArgs { path: PathBuf, reason: String },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl HookError {
    pub fn exit_code(&self) -> u8 {
        match self {
            // "Not now": the hook said no; the user may retry.
            HookError::Failed { .. } => crate::exit::TEMPFAIL,
            HookError::Spawn { .. } | HookError::AsUser { .. } => crate::exit::CONFIG,
            HookError::ExtraArgs { .. } => crate::exit::CONFIG,
            HookError::Invoker(e) => e.exit_code(),
            HookError::Io { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                crate::exit::NOPERM
            }
            HookError::Io { .. } => crate::exit::SOFTWARE,
        }
    }
}

/// Where `hook` lives for the project folder `dir`.
pub fn path(dir: &Path, hook: Hook) -> PathBuf {
    dir.join("hooks").join(hook.name())
}

/// The environment a hook gets, beyond what migrant itself has.
pub fn env(
    hook: Hook,
    trigger: Trigger,
    name: &str,
    dir: &Path,
    ip: Option<Ipv4Addr>,
) -> Vec<(&'static str, String)> {
    vec![
        ("MIGRANT_VM_NAME", name.to_string()),
        ("MIGRANT_VM_DIR", dir.display().to_string()),
        ("MIGRANT_HOOK", hook.name().to_string()),
        ("MIGRANT_TRIGGER", trigger.name().to_string()),
        (
            "MIGRANT_VM_IP",
            ip.map(|i| i.to_string()).unwrap_or_default(),
        ),
    ]
}

/// Whether `hook` is there to run: `Some(path)` for an executable file;
/// a present but non-executable one is reported and skipped.
/// Every hook, in lifecycle order.
pub const ALL: [Hook; 4] = [Hook::PreUp, Hook::PostUp, Hook::PreDown, Hook::PostDown];

/// The project's hooks, for `status`: those that will run, and those that
/// exist but are not executable (skipped).
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize)]
pub struct Present {
    pub active: Vec<&'static str>,
    pub not_executable: Vec<&'static str>,
}

pub fn present(dir: &Path) -> Present {
    let mut out = Present::default();
    for h in ALL {
        match std::fs::metadata(path(dir, h)) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {
                out.active.push(h.name())
            }
            Ok(m) if m.is_file() => out.not_executable.push(h.name()),
            _ => {}
        }
    }
    out
}

fn find(dir: &Path, hook: Hook) -> Option<PathBuf> {
    let p = path(dir, hook);
    let meta = std::fs::metadata(&p).ok()?;
    if !meta.is_file() {
        return None;
    }
    if meta.permissions().mode() & 0o111 == 0 {
        eprintln!(
            "note: {} is not executable; skipped (chmod +x to use it)",
            p.display()
        );
        return None;
    }
    Some(p)
}

/// Run `hook` of the project `cfg` if it exists; `ip` is the guest's
/// address when it has one. A failure is an error only when
/// [`on_failure`] says so (otherwise a warning is printed).
pub fn fire(
    cfg: &Config,
    hook: Hook,
    trigger: Trigger,
    ip: Option<Ipv4Addr>,
    forced: bool,
) -> Result<(), HookError> {
    let policy = on_failure(hook, trigger, forced);
    let result = run_one(cfg, hook, trigger, ip);
    match (result, policy) {
        (Ok(()), _) => Ok(()),
        (Err(HookError::Failed { path, status, .. }), OnFailure::Warn) => {
            eprintln!(
                "warning: {} hook failed ({status}): {}",
                hook.name(),
                path.display()
            );
            Ok(())
        }
        (Err(e), OnFailure::Warn) => {
            eprintln!(
                "warning: {}",
                crate::exit::chain(&e as &dyn std::error::Error)
            );
            Ok(())
        }
        (Err(e), OnFailure::Abort) => Err(e),
    }
}

fn what_aborts(hook: Hook, trigger: Trigger) -> &'static str {
    match (hook, trigger) {
        (Hook::PreUp, Trigger::Run) => "`run`",
        (Hook::PreUp, _) => "starting the VM",
        (_, Trigger::Snapshot) => "the snapshot",
        _ => "the halt",
    }
}

fn run_one(
    cfg: &Config,
    hook: Hook,
    trigger: Trigger,
    ip: Option<Ipv4Addr>,
) -> Result<(), HookError> {
    let Some(path) = find(&cfg.dir, hook) else {
        return Ok(());
    };
    let who = Invoker::current().map_err(KeyError::from)?;
    let as_user = |source| HookError::AsUser {
        hook: hook.name(),
        source,
    };
    as_user::check_runnable(&path, &who).map_err(as_user)?;
    println!("==> {}: running the {} hook", cfg.name, hook.name());
    let mut cmd = Command::new(&path);
    cmd.current_dir(&cfg.dir)
        .envs(env(hook, trigger, &cfg.name, &cfg.dir, ip))
        .stdin(Stdio::null());
    let status = cmd.status().map_err(|source| HookError::Spawn {
        hook: hook.name(),
        path: path.clone(),
        source,
    })?;
    if status.success() {
        return Ok(());
    }
    Err(HookError::Failed {
        hook: hook.name(),
        path,
        status: describe(status),
        what: if hook.is_pre() {
            what_aborts(hook, trigger)
        } else {
            "nothing"
        },
    })
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}

/// The file `pre-up` may write, in the project folder.
pub const EXTRA_ARGS_FILE: &str = ".qemu-extra-args";
/// The original tool's name for it (virt-install arguments, which mean
/// nothing to QEMU).
const LEGACY_EXTRA_ARGS_FILE: &str = ".virt-install-extra-args";
/// A bigger file is refused.
const EXTRA_ARGS_MAX: u64 = 64 * 1024;

/// Options that would undo how migrant confines and controls QEMU.
const REFUSED_OPTIONS: [&str; 5] = ["sandbox", "runas", "chroot", "run-with", "daemonize"];

/// Split the file's text into arguments: one a line, blank lines ignored,
/// a trailing `\r` dropped; options that would undo QEMU's confinement
/// are refused.
pub fn parse_extra_args(text: &str) -> Result<Vec<String>, String> {
    let mut args = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        let opt = line.trim_start_matches('-');
        if line.starts_with('-') && REFUSED_OPTIONS.contains(&opt) {
            return Err(format!(
                "line {}: {line} is not allowed (migrant sets how QEMU is confined)",
                i + 1
            ));
        }
        if line.contains('\0') {
            return Err(format!("line {}: contains a NUL byte", i + 1));
        }
        args.push(line.to_string());
    }
    Ok(args)
}

/// After `pre-up` on first creation: move `.qemu-extra-args` from the
/// project folder into the VM's state. The file must be a regular file
/// of the invoking user (never followed through a symlink: its lines end
/// up on QEMU's command line, which every user can read).
pub fn take_extra_args(cfg: &Config, vm: &VmPaths) -> Result<Vec<String>, HookError> {
    let legacy = cfg.dir.join(LEGACY_EXTRA_ARGS_FILE);
    if legacy.exists() {
        eprintln!(
            "warning: {} holds virt-install arguments, which QEMU does not take; ignored and removed (write QEMU arguments to {EXTRA_ARGS_FILE})",
            legacy.display()
        );
        let _ = std::fs::remove_file(&legacy);
    }
    let path = cfg.dir.join(EXTRA_ARGS_FILE);
    let io = |source| HookError::Io {
        path: path.clone(),
        source,
    };
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(HookError::ExtraArgs {
                path,
                reason: "is a symbolic link".into(),
            });
        }
        Err(e) => return Err(io(e)),
    };
    let meta = file.metadata().map_err(io)?;
    let who = Invoker::current().map_err(KeyError::from)?;
    let bad = |reason: String| HookError::ExtraArgs {
        path: path.clone(),
        reason,
    };
    if !meta.is_file() {
        return Err(bad("is not a regular file".into()));
    }
    if meta.uid() != who.uid.as_raw() {
        return Err(bad(format!(
            "belongs to uid {}, not to {} (uid {})",
            meta.uid(),
            who.name,
            who.uid
        )));
    }
    if meta.len() > EXTRA_ARGS_MAX {
        return Err(bad(format!("is larger than {EXTRA_ARGS_MAX} bytes")));
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(io)?;
    let args = parse_extra_args(&text).map_err(bad)?;
    std::fs::remove_file(&path).map_err(io)?;
    if !args.is_empty() {
        store_extra_args(vm, &args)?;
        println!(
            "==> {}: QEMU gets {} extra argument(s) from {EXTRA_ARGS_FILE}",
            cfg.name,
            args.len()
        );
    }
    Ok(args)
}

fn store_extra_args(vm: &VmPaths, args: &[String]) -> Result<(), HookError> {
    crate::qemu::extra::store(vm, args).map_err(|source| HookError::Io {
        path: crate::qemu::extra::stored_path(vm),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_has_the_originals_variables() {
        let e = env(
            Hook::PostUp,
            Trigger::Up,
            "box",
            Path::new("/p/box"),
            Some(Ipv4Addr::new(10, 0, 2, 15)),
        );
        assert_eq!(
            e,
            vec![
                ("MIGRANT_VM_NAME", "box".to_string()),
                ("MIGRANT_VM_DIR", "/p/box".to_string()),
                ("MIGRANT_HOOK", "post-up".to_string()),
                ("MIGRANT_TRIGGER", "up".to_string()),
                ("MIGRANT_VM_IP", "10.0.2.15".to_string()),
            ]
        );
        let e = env(Hook::PreUp, Trigger::Run, "box", Path::new("/p"), None);
        assert!(e.contains(&("MIGRANT_VM_IP", String::new())));
        assert!(e.contains(&("MIGRANT_TRIGGER", "run".to_string())));
    }

    #[test]
    fn failure_policy() {
        use OnFailure::*;
        assert_eq!(on_failure(Hook::PreUp, Trigger::Up, false), Abort);
        assert_eq!(on_failure(Hook::PreUp, Trigger::Run, false), Abort);
        assert_eq!(on_failure(Hook::PreUp, Trigger::Reset, false), Abort);
        assert_eq!(on_failure(Hook::PreDown, Trigger::Halt, false), Abort);
        assert_eq!(on_failure(Hook::PreDown, Trigger::Snapshot, false), Abort);
        assert_eq!(on_failure(Hook::PreDown, Trigger::Halt, true), Warn);
        assert_eq!(on_failure(Hook::PreDown, Trigger::Destroy, false), Warn);
        assert_eq!(on_failure(Hook::PreDown, Trigger::Reset, false), Warn);
        assert_eq!(on_failure(Hook::PreDown, Trigger::Run, false), Warn);
        for t in [Trigger::Up, Trigger::Halt, Trigger::Destroy, Trigger::Run] {
            assert_eq!(on_failure(Hook::PostUp, t, false), Warn);
            assert_eq!(on_failure(Hook::PostDown, t, false), Warn);
        }
    }

    #[test]
    fn extra_args_one_a_line() {
        assert_eq!(
            parse_extra_args("-smbios\ntype=11,value=a b\n\n  \r\n-device\r\nvirtio-rng-pci\n"),
            Ok(vec![
                "-smbios".to_string(),
                "type=11,value=a b".to_string(),
                "-device".to_string(),
                "virtio-rng-pci".to_string()
            ])
        );
        assert_eq!(parse_extra_args(""), Ok(vec![]));
        for bad in ["-sandbox\noff", "--runas\nroot", "-daemonize", "-chroot\n/"] {
            let e = parse_extra_args(bad).expect_err(bad);
            assert!(e.contains("not allowed"), "{e}");
        }
        // An option's value may look like anything.
        assert!(parse_extra_args("-name\nsandbox").is_ok());
    }

    fn project(dir: &Path) -> Config {
        std::fs::write(
            dir.join("Migrantfile"),
            "name = \"hooked\"\nimage = \"/images/base.qcow2\"\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        crate::config::load(dir).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn hooks_run_in_order_with_their_environment() {
        let t = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let dir = t.path();
        std::fs::create_dir(dir.join("hooks")).unwrap_or_else(|e| panic!("{e}"));
        let log = dir.join("log");
        assert_eq!(present(dir), Present::default());
        for h in ALL {
            let p = path(dir, h);
            std::fs::write(
                &p,
                format!(
                    "#!/bin/sh\necho \"$MIGRANT_HOOK $MIGRANT_TRIGGER $MIGRANT_VM_NAME [$MIGRANT_VM_IP] $(pwd)\" >> {}\n[ \"$MIGRANT_HOOK\" != pre-down ]\n",
                    log.display()
                ),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        // `status` lists them; one made unexecutable is named as skipped.
        let all = || present(dir);
        assert_eq!(all().active, ["pre-up", "post-up", "pre-down", "post-down"]);
        std::fs::set_permissions(
            path(dir, Hook::PostDown),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(all().not_executable, ["post-down"]);
        assert_eq!(all().active.len(), 3);
        std::fs::set_permissions(
            path(dir, Hook::PostDown),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let cfg = project(dir);
        let ip = Some(Ipv4Addr::new(10, 0, 2, 15));
        fire(&cfg, Hook::PreUp, Trigger::Up, None, false).unwrap_or_else(|e| panic!("{e}"));
        fire(&cfg, Hook::PostUp, Trigger::Up, ip, false).unwrap_or_else(|e| panic!("{e}"));
        // pre-down fails: it blocks a halt, not a destroy.
        let e = fire(&cfg, Hook::PreDown, Trigger::Halt, ip, false)
            .expect_err("pre-down failure must abort a halt");
        assert_eq!(e.exit_code(), crate::exit::TEMPFAIL);
        assert!(e.to_string().contains("the halt aborted"), "{e}");
        assert!(
            e.to_string().starts_with("pre-down hook failed (exit 1)"),
            "{e}"
        );
        fire(&cfg, Hook::PreDown, Trigger::Halt, ip, true).unwrap_or_else(|e| panic!("{e}"));
        fire(&cfg, Hook::PreDown, Trigger::Destroy, ip, false).unwrap_or_else(|e| panic!("{e}"));
        fire(&cfg, Hook::PostDown, Trigger::Destroy, None, false).unwrap_or_else(|e| panic!("{e}"));
        let text = std::fs::read_to_string(&log).unwrap_or_else(|e| panic!("{e}"));
        let d = dir.display();
        assert_eq!(
            text,
            format!(
                "pre-up up {n} [] {d}\npost-up up {n} [10.0.2.15] {d}\npre-down halt {n} [10.0.2.15] {d}\npre-down halt {n} [10.0.2.15] {d}\npre-down destroy {n} [10.0.2.15] {d}\npost-down destroy {n} [] {d}\n",
                n = cfg.name
            )
        );
    }

    #[test]
    fn missing_and_non_executable_hooks_are_skipped() {
        let t = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let dir = t.path();
        let cfg = project(dir);
        fire(&cfg, Hook::PreUp, Trigger::Up, None, false).unwrap_or_else(|e| panic!("{e}"));
        std::fs::create_dir(dir.join("hooks")).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(path(dir, Hook::PreUp), "#!/bin/sh\nexit 1\n")
            .unwrap_or_else(|e| panic!("{e}"));
        fire(&cfg, Hook::PreUp, Trigger::Up, None, false).unwrap_or_else(|e| panic!("{e}"));
    }
}
