//! The user-facing commands. Each returns the process exit code or an
//! [`Error`] whose exit code `main` uses.

mod clone;
mod disk;
mod docs;
mod drift;
mod egress;
mod host;
mod image;
mod lifecycle;
mod provision;
mod query;
mod run;
mod share;
mod sshconfig;
mod suggest;
mod up;
mod wg;

use std::path::PathBuf;

use crate::cli::{Cli, Cmd};
use crate::config::{self, Config};
use crate::error::Error;
use crate::state::{Paths, VmLock, VmPaths};

pub type Result<T> = std::result::Result<T, Error>;

/// Dispatch a parsed command line (not the hidden modes).
pub fn run(cli: Cli) -> Result<u8> {
    refuse_sudo()?;
    let dir = project_dir(cli.dir.clone())?;
    match cli.command {
        Cmd::Init { force } => host::init(&dir, force),
        Cmd::Convert { write } => host::convert(&dir, write),
        Cmd::Pubkey => host::pubkey(&key_for(&dir)?),
        Cmd::Doctor { apparmor_profile } => host::doctor(apparmor_profile),
        Cmd::List { json } => query::list(json),
        Cmd::Up {
            timeout,
            no_autoconnect,
            trigger,
            cold,
            instance,
        } => up::up(
            &match instance {
                Some(n) => Project::load_clone(&dir, &n)?,
                None => Project::load(&dir)?,
            },
            &up::UpOptions {
                timeout,
                autoconnect: !no_autoconnect,
                trigger,
                cold,
            },
        ),
        Cmd::Halt {
            force,
            timeout,
            name: Some(n),
        } => lifecycle::halt_named(&n, force, timeout),
        Cmd::Halt { force, timeout, .. } => {
            lifecycle::halt(&Project::load_own(&dir)?, force, timeout)
        }
        Cmd::Destroy { name: Some(n) } => lifecycle::destroy_named(&n),
        Cmd::Destroy { name: None } => lifecycle::destroy(&Project::load_own(&dir)?),
        Cmd::Status { json } => query::status(&Project::load(&dir)?, json),
        Cmd::Ip => query::ip(&Project::load_own(&dir)?),
        Cmd::Wg { json } => wg::wg(&Project::load_own(&dir)?, json),
        Cmd::Egress { suggest: true, .. } => egress::suggest(&Project::load_own(&dir)?),
        Cmd::Egress {
            json,
            follow,
            denied,
            suggest: false,
        } => egress::egress(&Project::load_own(&dir)?, json, follow, denied),
        Cmd::Info { json } => query::info(&Project::load_own(&dir)?, json),
        Cmd::Ssh {
            name: Some(n),
            command,
        } => lifecycle::ssh_named(&n, &command),
        Cmd::Ssh {
            name: None,
            command,
        } => lifecycle::ssh(&Project::load_own(&dir)?, &command),
        Cmd::Console => lifecycle::console(&Project::load_own(&dir)?),
        Cmd::Resize { size } => disk::resize(&Project::load_own(&dir)?, size.as_deref()),
        Cmd::Snapshot { memory: false, .. } => disk::snapshot(&Project::load_own(&dir)?),
        Cmd::Snapshot { memory: true, stop } => {
            disk::snapshot_memory(&Project::load_own(&dir)?, stop)
        }
        Cmd::Reset { timeout, cold } => disk::reset(&Project::load_own(&dir)?, timeout, cold),
        Cmd::Storage { json } => image::storage(json),
        Cmd::Image { command } => image::run(command),
        Cmd::Provision { args } => provision::provision(&Project::load_own(&dir)?, &args),
        Cmd::SshConfig { host } => {
            sshconfig::ssh_config(&Project::load_own(&dir)?, host.as_deref())
        }
        Cmd::Run {
            rm,
            snapshot,
            clone,
            name,
            cold,
            timeout,
            egress_report,
            command,
        } => run::run(
            &Project::load_own(&dir)?,
            &run::RunOptions {
                rm,
                snapshot,
                clone,
                name,
                cold,
                timeout,
                command,
                egress_report,
            },
        ),
        Cmd::Completions { shell } => docs::completions(shell),
        Cmd::Man { out_dir } => docs::man(out_dir.as_deref()),
        Cmd::Tunnel { ports } => lifecycle::tunnel(&Project::load_own(&dir)?, &ports),
        Cmd::Mount => share::mount(&Project::load_own(&dir)?),
        Cmd::Unmount => share::unmount(&Project::load_own(&dir)?),
        Cmd::Supervisor { .. }
        | Cmd::Proxy { .. }
        | Cmd::Netlab { .. }
        | Cmd::Dataplane { .. }
        | Cmd::Virtiofsd { .. }
        | Cmd::WgLoop { .. } => Err(Error::other(
            crate::exit::SOFTWARE,
            "internal mode reached the command dispatcher",
        )),
    }
}

fn project_dir(given: Option<PathBuf>) -> Result<PathBuf> {
    let dir = match given {
        Some(d) => expand_home(d),
        None => std::env::current_dir().map_err(Error::io("current directory"))?,
    };
    std::fs::canonicalize(&dir).map_err(|e| {
        Error::other(
            crate::exit::USAGE,
            format!("project folder {}: {e}", dir.display()),
        )
    })
}

/// `sudo migrant` is refused (77): migrant runs as the user whose VMs
/// they are, never as root acting for them. Root's own VMs (a shell that
/// is root, `SUDO_UID` unset or 0) take the same path as anyone's.
fn refuse_sudo() -> Result<()> {
    let euid = nix::unistd::Uid::effective().as_raw();
    match sudo_invoker(euid, std::env::var("SUDO_UID").ok().as_deref()) {
        None => Ok(()),
        Some(uid) => Err(Error::other(
            crate::exit::NOPERM,
            format!(
                "migrant does not run through sudo (it was invoked by uid {uid}): run it as \
                 yourself; it needs no root (`migrant doctor` says what the host must offer)"
            ),
        )),
    }
}

/// The uid that ran this root process through sudo, when another user did.
fn sudo_invoker(euid: u32, sudo_uid: Option<&str>) -> Option<u32> {
    let uid = sudo_uid?.trim().parse::<u32>().ok()?;
    (euid == 0 && uid != 0).then_some(uid)
}

/// Refused (78) when the project has a shared folder: `what` cannot
/// hold one, `why` says why and what to do.
pub fn refuse_shares(cfg: &config::Config, what: &str, why: &str) -> Result<()> {
    match cfg.shares.first() {
        Some(share) => Err(Error::other(
            crate::exit::CONFIG,
            format!(
                "{}: {what} cannot hold shared folders (share {:?} in {}): {why}",
                cfg.name,
                share.tag,
                cfg.file.display()
            ),
        )),
        None => Ok(()),
    }
}

/// `N` random bytes from the kernel.
pub fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    let mut f = std::fs::File::open("/dev/urandom").map_err(Error::io("/dev/urandom"))?;
    std::io::Read::read_exact(&mut f, &mut b).map_err(Error::io("/dev/urandom"))?;
    Ok(b)
}

/// A loaded project: its configuration and its VM's files.
pub struct Project {
    pub cfg: Config,
    pub paths: Paths,
    pub vm: VmPaths,
}

impl Project {
    pub fn load(dir: &std::path::Path) -> Result<Project> {
        let cfg = config::load(dir)?;
        for w in &cfg.warnings {
            eprintln!("warning: {w}");
        }
        let paths = Paths::from_env();
        let vm = paths.vm(&cfg.name);
        Ok(Project { cfg, paths, vm })
    }

    /// The project's clone `name` (`up --instance`, run by `run
    /// --clone`): refused unless it is a clone this project's VM made.
    pub fn load_clone(dir: &std::path::Path, name: &str) -> Result<Project> {
        let mut p = Project::load(dir)?;
        let vm = p.paths.vm(name);
        match crate::state::Record::load(&vm.record())? {
            Some(rec)
                if rec.template.as_deref() == Some(&p.cfg.name) && rec.project_dir == p.cfg.dir =>
            {
                p.cfg.name = name.to_string();
                p.vm = vm;
                Ok(p)
            }
            _ => Err(Error::other(
                crate::exit::USAGE,
                format!("{name} is not a clone of {}", p.cfg.name),
            )),
        }
    }

    /// [`Project::load`] for a command that acts on the VM (stops,
    /// destroys, attaches to or changes it) or reports what only this
    /// project's VM may report (its address, its tunnel, its traffic, its
    /// devices): refused (78) when the VM of
    /// that name was built for another project folder, so a second folder
    /// whose Migrantfile has the same `name` never touches the first's VM.
    pub fn load_own(dir: &std::path::Path) -> Result<Project> {
        let p = Project::load(dir)?;
        if let Some(rec) = crate::state::Record::load(&p.vm.record())?
            && rec.project_dir != p.cfg.dir
        {
            return Err(Error::other(
                crate::exit::CONFIG,
                format!(
                    "the VM {:?} belongs to the project {} (this is {}): run the command there (migrant -C {}), or give this project another `name` in {}",
                    p.cfg.name,
                    rec.project_dir.display(),
                    p.cfg.dir.display(),
                    rec.project_dir.display(),
                    p.cfg.file.display()
                ),
            ));
        }
        Ok(p)
    }
}

pub use crate::runstate::{Live, process_is};

/// The VM's state; a stale record (dead supervisor) is repaired here.
pub fn live(vm: &VmPaths) -> Result<Live> {
    Ok(crate::runstate::live(vm)?)
}

/// Wait until nothing holds the VM's lock.
pub fn wait_unlocked(vm: &VmPaths, timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if !VmLock::is_held(vm) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    !VmLock::is_held(vm)
}

/// A leading `~` (alone or as `~/`) of a path given on the command line
/// or in the environment: the invoking user's home (through sudo, theirs),
/// as a shell would have expanded it. Other paths are returned as given.
fn expand_home(path: PathBuf) -> PathBuf {
    let Some(text) = path.to_str() else {
        return path;
    };
    if text != "~" && !text.starts_with("~/") {
        return path;
    }
    match crate::config::invoking_user_home() {
        Some(home) => home.join(text.trim_start_matches('~').trim_start_matches('/')),
        None => path,
    }
}

/// `MIGRANT_KEY_PATH`, when set and not empty: the private key for this
/// invocation, over the Migrantfile's (as in the original tool).
fn key_from_env() -> Option<PathBuf> {
    let given = std::env::var_os("MIGRANT_KEY_PATH").filter(|v| !v.is_empty())?;
    let path = expand_home(PathBuf::from(given));
    Some(std::path::absolute(&path).unwrap_or(path))
}

/// The private key used for the guest: `MIGRANT_KEY_PATH`, else the
/// Migrantfile's, else the managed one (`~/.ssh/migrant`).
pub fn ssh_key(cfg: &Config) -> Result<PathBuf> {
    if let Some(k) = key_from_env() {
        return Ok(k);
    }
    match &cfg.ssh.key {
        Some(k) => Ok(k.clone()),
        None => Ok(crate::provision::keys::Invoker::current()?.managed_key()),
    }
}

/// The key `pubkey` shows: [`ssh_key`] of the project in `dir` when it has
/// a Migrantfile, else `MIGRANT_KEY_PATH` or the managed key.
fn key_for(dir: &std::path::Path) -> Result<PathBuf> {
    if let Some(k) = key_from_env() {
        return Ok(k);
    }
    let named = if dir.join(config::FILE_NAME).exists() {
        config::ssh_key(dir)?
    } else {
        None
    };
    match named {
        Some(k) => Ok(k),
        None => Ok(crate::provision::keys::Invoker::current()?.managed_key()),
    }
}

/// `ssh` to the VM through its supervisor's socket, as the Migrantfile's
/// user with its key.
pub fn ssh_command(cfg: &Config, vm: &crate::state::VmPaths) -> Result<std::process::Command> {
    Ok(crate::provision::ssh::base_command(
        &self_exe()?,
        &vm.ssh_sock(),
        &ssh_key(cfg)?,
        &cfg.ssh.user,
        &cfg.name,
    ))
}

pub fn self_exe() -> Result<PathBuf> {
    std::env::current_exe().map_err(Error::io("cannot find the migrant executable"))
}

#[cfg(test)]
mod tests {
    use super::sudo_invoker;

    #[test]
    fn only_another_user_through_sudo_is_refused() {
        assert_eq!(sudo_invoker(0, Some("1000")), Some(1000));
        // Root's own shell, with or without sudo in between.
        assert_eq!(sudo_invoker(0, None), None);
        assert_eq!(sudo_invoker(0, Some("0")), None);
        // A user who set the variable gains or loses nothing by it.
        assert_eq!(sudo_invoker(1000, Some("1001")), None);
        assert_eq!(sudo_invoker(0, Some("not a uid")), None);
    }
}
