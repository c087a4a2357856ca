//! `halt`, `destroy`, `ssh`, `console`.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::time::Duration;

use super::{Live, Project, Result, live, wait_unlocked};
use crate::config::Config;
use crate::error::Error;
use crate::exit;
use crate::provision::hooks::{self, Hook, Trigger};
use crate::state::{VmLock, VmPaths, VmState};
use crate::supervisor::control::{self, Request};

pub fn halt(p: &Project, force: bool, timeout: Option<u64>) -> Result<u8> {
    halt_vm(&p.vm, Some(&p.cfg), force, timeout)
}

/// `halt` of the VM at `vm`; without its configuration (`--name` for a VM
/// whose project is gone) no hooks run and the default timeout applies.
fn halt_vm(vm: &VmPaths, cfg: Option<&Config>, force: bool, timeout: Option<u64>) -> Result<u8> {
    let name = &vm.name;
    match live(vm)? {
        Live::NotCreated => {
            println!("==> {name}: not created");
            Ok(0)
        }
        Live::Stopped(_) => {
            println!("==> {name}: already stopped");
            Ok(0)
        }
        Live::Busy | Live::Active(_) => {
            let secs = timeout.unwrap_or(cfg.map_or(DEFAULT_HALT_TIMEOUT, |c| c.halt_timeout));
            // A failing pre-down blocks a graceful halt, not a forced one.
            if let Some(cfg) = cfg {
                let ip = Some(cfg.guest_ip());
                hooks::fire(cfg, Hook::PreDown, Trigger::Halt, ip, force)?;
            }
            println!(
                "==> {name}: {}",
                if force { "stopping" } else { "shutting down" }
            );
            stop(vm, force, secs)?;
            println!("==> {name}: stopped");
            if let Some(cfg) = cfg {
                hooks::fire(cfg, Hook::PostDown, Trigger::Halt, None, force)?;
            }
            Ok(0)
        }
    }
}

/// Ask the supervisor to stop the VM and wait until it has exited.
pub(super) fn stop(vm: &VmPaths, force: bool, secs: u64) -> Result<()> {
    let req = Request::Halt {
        force,
        timeout_secs: secs,
    };
    // Forced stops take: quit (≤ 10 s) + wait (5 s) + kill.
    let answer_within = Duration::from_secs(secs + 30);
    match control::request(&vm.control_sock(), &req, answer_within) {
        Ok(_) => {}
        Err(control::ControlError::Connect { .. }) if !VmLock::is_held(vm) => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    if wait_unlocked(vm, Duration::from_secs(30)) {
        Ok(())
    } else {
        Err(Error::other(
            exit::SOFTWARE,
            format!(
                "the supervisor of {} did not exit after stopping the VM",
                vm.name
            ),
        ))
    }
}

pub fn destroy(p: &Project) -> Result<u8> {
    destroy_as(p, Trigger::Destroy)
}

/// `destroy`, with the command hooks are told caused it. Hooks run for a
/// VM that exists, running or not; a failing pre-down cannot block it.
pub fn destroy_as(p: &Project, trigger: Trigger) -> Result<u8> {
    destroy_vm(&p.vm, Some(&p.cfg), trigger)
}

/// `destroy` of the VM at `vm`; without its configuration (`--name` for a
/// VM whose project is gone) no hooks run.
fn destroy_vm(vm: &VmPaths, cfg: Option<&Config>, trigger: Trigger) -> Result<u8> {
    let name = &vm.name;
    crate::runstate::refuse_with_clones(vm)?;
    let state = live(vm)?;
    let exists = matches!(state, Live::Active(_) | Live::Stopped(_));
    if exists && let Some(cfg) = cfg {
        let ip = matches!(state, Live::Active(_)).then(|| cfg.guest_ip());
        hooks::fire(cfg, Hook::PreDown, trigger, ip, true)?;
    }
    match state {
        Live::NotCreated if !vm.state.exists() => {
            println!("==> {name}: not created");
            return Ok(0);
        }
        Live::Active(r) => {
            println!("==> {name}: stopping");
            if let Err(e) = stop(vm, true, 0) {
                // The supervisor does not answer: stop it the hard way; its
                // QEMU dies with it (parent-death signal).
                tracing::warn!("{e}; killing the supervisor");
                if let Some(pid) = r.supervisor_pid
                    && is_our_supervisor(pid)
                {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                if !wait_unlocked(vm, Duration::from_secs(10)) {
                    return Err(e);
                }
                live(vm)?;
            }
        }
        _ => {}
    }
    let _lock = VmLock::try_acquire(vm)?;
    let rec = crate::state::Record::load(&vm.record())?;
    if let Some(r) = &rec
        && r.state != VmState::Stopped
    {
        live(vm)?;
    }
    remove_tree(&vm.state)?;
    // Its identity is free again once its files are gone.
    if let Some(id) = rec.and_then(|r| r.vm_id) {
        crate::state::release_vm_id(&crate::state::Paths::from_env().ids(), vm, id);
    }
    let _ = std::fs::remove_dir_all(&vm.run);
    println!("==> {name}: destroyed");
    if exists && let Some(cfg) = cfg {
        hooks::fire(cfg, Hook::PostDown, trigger, None, true)?;
    }
    Ok(0)
}

/// The default `halt_timeout`, for a VM whose Migrantfile cannot be read.
const DEFAULT_HALT_TIMEOUT: u64 = 60;

/// A VM named on the command line (`halt --name`, `destroy --name`), from
/// anywhere: with its project's configuration when that still loads and
/// names it, else without (no hooks; said).
fn by_name(name: &str) -> Result<(VmPaths, Option<Config>)> {
    crate::config::check_name(name).map_err(|e| Error::other(exit::USAGE, e))?;
    let vm = crate::state::Paths::from_env().vm(name);
    let Some(rec) = crate::state::Record::load(&vm.record())? else {
        return Err(Error::other(
            exit::UNAVAILABLE,
            format!("no VM named {name}"),
        ));
    };
    match crate::config::load(&rec.project_dir) {
        Ok(cfg) if cfg.name == name && cfg.dir == rec.project_dir => Ok((vm, Some(cfg))),
        // A clone: its template's project, under the clone's name.
        Ok(mut cfg) if rec.template.as_ref() == Some(&cfg.name) && cfg.dir == rec.project_dir => {
            cfg.name = name.to_string();
            Ok((vm, Some(cfg)))
        }
        Ok(_) => {
            println!(
                "==> {name}: {} now names another VM; no hooks run",
                rec.project_dir.display()
            );
            Ok((vm, None))
        }
        Err(e) => {
            println!("==> {name}: its project does not load ({e}); no hooks run");
            Ok((vm, None))
        }
    }
}

/// `ssh --name NAME`: needs the VM's project (its user and key).
pub fn ssh_named(name: &str, command: &[String]) -> Result<u8> {
    let (vm, cfg) = by_name(name)?;
    let cfg = cfg.ok_or_else(|| {
        Error::other(
            exit::CONFIG,
            format!("{name}: its project does not name it any more; no SSH user or key to use"),
        )
    })?;
    let p = Project {
        cfg,
        paths: crate::state::Paths::from_env(),
        vm,
    };
    ssh(&p, command)
}

/// `halt --name NAME`.
pub fn halt_named(name: &str, force: bool, timeout: Option<u64>) -> Result<u8> {
    let (vm, cfg) = by_name(name)?;
    halt_vm(&vm, cfg.as_ref(), force, timeout)
}

/// `destroy --name NAME`.
pub fn destroy_named(name: &str) -> Result<u8> {
    let (vm, cfg) = by_name(name)?;
    destroy_vm(&vm, cfg.as_ref(), Trigger::Destroy)
}

fn remove_tree(dir: &std::path::Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("cannot remove {}", dir.display()))(e)),
    }
}

fn is_our_supervisor(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| c.split(|&b| b == 0).any(|a| a == b"__supervisor"))
        .unwrap_or(false)
}

fn require_running(p: &Project) -> Result<()> {
    match live(&p.vm)? {
        Live::Active(r) if r.state == VmState::Running || r.state == VmState::Paused => Ok(()),
        Live::Active(_) | Live::Busy => Err(crate::runstate::Refusal::busy(&p.cfg.name).into()),
        _ => Err(
            crate::runstate::Refusal::not_running(&p.cfg.name, "; `migrant up` starts it").into(),
        ),
    }
}

pub fn ssh(p: &Project, command: &[String]) -> Result<u8> {
    require_running(p)?;
    let mut cmd = super::ssh_command(&p.cfg, &p.vm)?;
    if !command.is_empty() {
        cmd.arg("--").args(command);
    }
    // exec: ssh's exit code becomes ours.
    let err = cmd.exec();
    Err(Error::other(
        exit::UNAVAILABLE,
        format!("cannot run ssh: {err}"),
    ))
}

/// Forward host 127.0.0.1:PORT to the guest's 127.0.0.1:PORT over SSH
/// (through the supervisor's forward), until interrupted.
pub fn tunnel(p: &Project, ports: &[u16]) -> Result<u8> {
    let ports: Vec<u16> = if ports.is_empty() {
        p.cfg.tunnel_ports.clone()
    } else {
        ports.to_vec()
    };
    if ports.is_empty() {
        return Err(Error::other(
            exit::USAGE,
            format!(
                "no ports: give them (`migrant tunnel 8000`) or set tunnel_ports in {}",
                p.cfg.file.display()
            ),
        ));
    }
    if let Some(0) = ports.iter().find(|&&p| p == 0) {
        return Err(Error::other(exit::USAGE, "port 0 cannot be forwarded"));
    }
    require_running(p)?;
    let mut cmd = super::ssh_command(&p.cfg, &p.vm)?;
    cmd.args(["-N", "-o", "ExitOnForwardFailure=yes"]);
    for port in &ports {
        cmd.arg("-L")
            .arg(format!("127.0.0.1:{port}:127.0.0.1:{port}"));
        eprintln!(
            "==> {}: 127.0.0.1:{port} -> guest 127.0.0.1:{port}",
            p.cfg.name
        );
    }
    eprintln!("==> {}: forwarding until Ctrl-C", p.cfg.name);
    let err = cmd.exec();
    Err(Error::other(
        exit::UNAVAILABLE,
        format!("cannot run ssh: {err}"),
    ))
}

/// Ctrl-]
const DETACH: u8 = 0x1d;

pub fn console(p: &Project) -> Result<u8> {
    // Also while starting: watching the boot is what a console is for.
    if !matches!(live(&p.vm)?, Live::Active(_)) {
        require_running(p)?;
    }
    let sock = p.vm.console_sock();
    let stream = std::os::unix::net::UnixStream::connect(&sock)
        .map_err(Error::io(format!("cannot attach to {}", sock.display())))?;
    eprintln!(
        "Connected to the serial console of {} (detach with Ctrl-])",
        p.cfg.name
    );
    let stdin = std::io::stdin();
    let saved = nix::sys::termios::tcgetattr(&stdin).ok();
    if let Some(t) = &saved {
        let mut raw = t.clone();
        nix::sys::termios::cfmakeraw(&mut raw);
        let _ = nix::sys::termios::tcsetattr(&stdin, nix::sys::termios::SetArg::TCSANOW, &raw);
    }
    let mut down = stream.try_clone().map_err(Error::io("console socket"))?;
    std::thread::spawn(move || {
        let mut out = std::io::stdout();
        let mut buf = [0u8; 4096];
        while let Ok(n) = down.read(&mut buf) {
            if n == 0 || out.write_all(&buf[..n]).is_err() {
                break;
            }
            let _ = out.flush();
        }
    });
    let mut up = stream;
    let mut buf = [0u8; 1024];
    let mut input = stdin.lock();
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        let end = chunk.iter().position(|&b| b == DETACH);
        let send = &chunk[..end.unwrap_or(n)];
        if up.write_all(send).is_err() || end.is_some() {
            break;
        }
    }
    if let Some(t) = &saved {
        let _ = nix::sys::termios::tcsetattr(&stdin, nix::sys::termios::SetArg::TCSANOW, t);
    }
    eprintln!("\r\nDetached from {}", p.cfg.name);
    Ok(0)
}
