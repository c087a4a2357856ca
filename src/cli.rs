//! Every command and flag, in one place.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Throwaway QEMU virtual machines for untrusted workloads, walled off
/// from the host and the LAN. Vagrant-style: a Migrantfile beside a
/// cloud-init.yml, then `migrant up`.
#[derive(Debug, Parser)]
#[command(name = "migrant", version, about, long_about = None)]
pub struct Cli {
    /// Project folder holding the Migrantfile (default: the current folder).
    #[arg(
        long,
        short = 'C',
        global = true,
        env = "MIGRANT_DIR",
        value_name = "DIR"
    )]
    pub dir: Option<PathBuf>,

    /// More log output (repeat for more).
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Write a commented Migrantfile and cloud-init.yml into the project folder.
    Init {
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Print the TOML equivalent of an original-style (bash) Migrantfile, comments kept.
    Convert {
        /// Keep the original as Migrantfile.orig and put the TOML in its place.
        #[arg(long)]
        write: bool,
    },
    /// Create (first time) or boot the VM and wait until it is ready.
    Up {
        /// Seconds to wait for the guest to answer SSH.
        #[arg(long, default_value_t = 600, value_name = "SECS")]
        timeout: u64,
        /// Do not connect afterwards, whatever the Migrantfile's autoconnect says.
        #[arg(long)]
        no_autoconnect: bool,
        /// (internal) The command hooks are told caused them (`run` uses it).
        #[arg(long, hide = true, value_enum, default_value = "up")]
        trigger: crate::provision::hooks::Trigger,
        /// Boot the disk even when a memory snapshot would be resumed (one
        /// taken on another QEMU or with other CPUs or memory cannot be).
        #[arg(long)]
        cold: bool,
        /// (internal) Start this clone of the project's VM (`run --clone`).
        #[arg(long, hide = true, value_name = "NAME")]
        instance: Option<String>,
    },
    /// Shut the VM down (ACPI power-down, forced after a timeout).
    Halt {
        /// Stop at once instead of asking the guest to power off.
        #[arg(long, short)]
        force: bool,
        /// Seconds to wait for the guest before forcing (default: the
        /// Migrantfile's halt_timeout).
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
        /// The VM of that name, from anywhere (its project may be gone).
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
    },
    /// Stop the VM and delete its disk, seed and records (never files in
    /// the project folder).
    Destroy {
        /// The VM of that name, from anywhere: also one whose project
        /// folder is gone or whose Migrantfile no longer loads.
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
    },
    /// Show the VM's state.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show the VM's WireGuard tunnel: per peer, its endpoint, the latest
    /// handshake and the bytes moved (no root needed).
    Wg {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show what the VM talked to: flows (destination, name, bytes),
    /// refusals with their reason, and DNS questions, from its egress
    /// journal (no root needed).
    Egress {
        /// One JSON object per line, as recorded.
        #[arg(long)]
        json: bool,
        /// Keep printing new entries as they are recorded.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Only refusals.
        #[arg(long)]
        denied: bool,
        /// Print the `allow_domains` that would have admitted what the VM
        /// did (a Migrantfile section, with counts per name), and the
        /// hosts each secret was sent to.
        #[arg(long, conflicts_with_all = ["json", "follow", "denied"])]
        suggest: bool,
    },
    /// List every VM on this host.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Open a shell in the VM, or run a command (its exit code is returned).
    Ssh {
        /// The VM of that name (a clone, or a VM of another project),
        /// from any folder.
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// Command to run in the guest.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Open host 127.0.0.1:PORT to the guest's 127.0.0.1:PORT until Ctrl-C
    /// (default ports: the Migrantfile's tunnel_ports).
    Tunnel {
        /// Ports to forward.
        ports: Vec<u16>,
    },
    /// Attach to the VM's serial console (detach with Ctrl-]).
    Console,
    /// Print the VM's IP address.
    Ip,
    /// Print the managed public key (~/.ssh/migrant.pub), creating the key pair if missing.
    Pubkey,
    /// Facts about the running VM from QEMU: state, accelerator, CPUs, memory, pids, uptime.
    Info {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Check this host: QEMU, a working accelerator, TUN, nftables, firmware, virtiofs; and what each VM's user namespace needs (user namespaces, subordinate ids, uidmap, modules).
    Doctor {
        /// Print only the commands (for root) that install the AppArmor
        /// profile letting this binary create user namespaces on hosts
        /// that restrict them (Ubuntu 23.10 and later).
        #[arg(long)]
        apparmor_profile: bool,
    },
    /// Grow the VM's disk to SIZE (default: the Migrantfile's `disk`): live
    /// while it runs, including the guest's root file system. Never shrinks.
    Resize {
        /// New size, like "40G" (powers of 1024).
        #[arg(value_name = "SIZE")]
        size: Option<String>,
    },
    /// Shut the VM down cleanly and save its disk as a snapshot; the VM
    /// stays down. With --memory: save the running VM's memory with its
    /// disk, so that `reset`, `run --snapshot` and `up` resume it in about
    /// a second instead of booting.
    Snapshot {
        /// Save memory and device state too (the VM must be running; it
        /// runs on afterwards unless --stop).
        #[arg(long)]
        memory: bool,
        /// With --memory: stop the VM once saved (`up` resumes it).
        #[arg(long, requires = "memory")]
        stop: bool,
    },
    /// Rebuild the VM from its snapshot and start it (no provisioning):
    /// resumed when the snapshot holds memory, booted otherwise.
    Reset {
        /// Seconds to wait for the guest to answer SSH.
        #[arg(long, default_value_t = 600, value_name = "SECS")]
        timeout: u64,
        /// Boot the snapshot's disk even when its memory could be resumed.
        #[arg(long)]
        cold: bool,
    },
    /// Show the image cache and every VM's files with their sizes.
    Storage {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Manage the base image cache.
    Image {
        #[command(subcommand)]
        command: ImageCmd,
    },
    /// Run the Ansible playbook (playbook.yml) against the running VM again.
    Provision {
        /// Extra arguments for ansible-playbook (e.g. `-- --tags web -v`).
        #[arg(last = true, value_name = "ANSIBLE_ARGS")]
        args: Vec<String>,
    },
    /// Print an OpenSSH config block for the VM (`ssh -F <(migrant ssh-config) NAME`).
    #[command(name = "ssh-config")]
    SshConfig {
        /// Host alias to use instead of the VM's name.
        #[arg(long, value_name = "ALIAS")]
        host: Option<String>,
    },
    /// For CI: bring the VM up, run CMD in it (stdin, stdout, stderr passed
    /// through; its exit code returned), optionally destroy it afterwards.
    Run {
        /// Destroy the VM afterwards, also when CMD fails or on Ctrl-C (with
        /// --snapshot: stop it and throw the run's changes away, keeping
        /// the VM and its snapshot).
        #[arg(long)]
        rm: bool,
        /// Stop the VM if it runs and start it from its snapshot
        /// (`migrant snapshot`), so CMD sees the same state every time. A
        /// memory snapshot (`snapshot --memory`) is resumed, not booted.
        #[arg(long)]
        snapshot: bool,
        /// With --snapshot: run in a clone of the VM made from its snapshot
        /// under a name of its own (destroyed afterwards with --rm, left
        /// running without); the VM itself is not touched, and any number
        /// of clones can run at once.
        #[arg(long, requires = "snapshot")]
        clone: bool,
        /// With --clone: the clone's name (default: the VM's name,
        /// `-clone-` and random characters).
        #[arg(long, requires = "clone", value_name = "NAME")]
        name: Option<String>,
        /// Boot the snapshot's disk even when its memory could be resumed.
        #[arg(long)]
        cold: bool,
        /// Seconds to wait for the guest to answer SSH.
        #[arg(long, default_value_t = 600, value_name = "SECS")]
        timeout: u64,
        /// Write what the VM talked to during this run (its egress journal's
        /// entries, JSON) to FILE: a CI artifact; `egress --suggest` reads
        /// the same journal.
        #[arg(long, value_name = "FILE")]
        egress_report: Option<PathBuf>,
        /// The command. One argument is a shell command line for the guest's
        /// shell; several are quoted and run as they are.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), or write one page per command into DIR.
    Man {
        /// Write migrant.1 and migrant-COMMAND.1 files into DIR instead.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
    /// Create the shares' folders, so a workspace can be filled before the
    /// first `up` (a share's folder is its store: nothing is mounted).
    Mount,
    /// Nothing to do: a share's folder is its store, never mounted (kept
    /// for scripts written for older versions).
    Unmount,

    /// (internal) The per-VM supervisor.
    #[command(name = "__supervisor", hide = true)]
    Supervisor {
        #[arg(long)]
        name: String,
        #[arg(long)]
        project: PathBuf,
        #[arg(long)]
        lock_fd: Option<i32>,
        #[arg(long)]
        progress_fd: Option<i32>,
        /// The validated config `up` hands down (JSON in a sealed memfd):
        /// the supervisor never reads the Migrantfile itself.
        #[arg(long)]
        config_fd: i32,
        /// The secrets to broker, with their values (JSON in a sealed
        /// memfd), when the project has any.
        #[arg(long)]
        secrets_fd: Option<i32>,
        /// Stop QEMU when the guest has not answered SSH this many seconds
        /// after start (the `up` that waited for it may be gone).
        #[arg(long)]
        boot_timeout: Option<u64>,
    },
    /// (internal) The embedded virtiofsd serving one share.
    #[command(name = "__virtiofsd", hide = true)]
    Virtiofsd {
        #[arg(long)]
        fd: i32,
        #[arg(long)]
        shared_dir: PathBuf,
        #[arg(long)]
        tag: String,
        /// Every file the guest makes belongs to this uid:gid on the host
        /// (the folder's owner).
        #[arg(long)]
        owner: String,
        /// uid:gid the guest sees the owner's files as (its login user's).
        #[arg(long)]
        guest_owner: String,
        /// The folder is an isolated share's store, capped at this many
        /// bytes.
        #[arg(long)]
        cap: Option<u64>,
    },
    /// (internal) Benchmarks: run the dataplane of the project's VM on the
    /// interface `tap0` of an existing namespace, until SIGTERM/SIGINT.
    #[command(name = "__netlab", hide = true)]
    Netlab {
        #[arg(long)]
        netns: PathBuf,
        #[arg(long)]
        project: PathBuf,
    },
    /// (internal) The dataplane of one VM (its plan on stdin).
    #[command(name = "__dataplane", hide = true)]
    Dataplane {
        /// The VM's state folder: names the VM in `ps`; never opened.
        #[arg(long)]
        vm: PathBuf,
    },
    /// (internal) The WireGuard packet loop of one VM.
    #[command(name = "__wg", hide = true)]
    WgLoop {
        #[arg(long)]
        tun_fd: i32,
        #[arg(long)]
        udp_fd: i32,
        #[arg(long)]
        report_fd: i32,
        #[arg(long)]
        uid: u32,
        #[arg(long)]
        gid: u32,
        #[arg(long)]
        parent: i32,
    },
    /// (internal) ssh ProxyCommand: relay stdin/stdout to a unix socket.
    #[command(name = "__proxy", hide = true)]
    Proxy { socket: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// Cached images: size, source, which VMs use them.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Download (or copy) an image into the cache: an image name, an
    /// http(s) URL or a local file.
    Pull {
        /// debian-12, https://…/disk.qcow2, /path/disk.qcow2
        name: String,
        /// "sha256:…", "sha512:…" or the URL of a checksum list.
        #[arg(long, value_name = "CHECKSUM")]
        checksum: Option<String>,
    },
    /// Remove cached images (by file name, image name or URL); images a VM
    /// uses are kept.
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove every image no VM uses, and leftovers of interrupted downloads.
    Prune,
}
