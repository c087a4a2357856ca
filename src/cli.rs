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
    /// Create (first time) or boot the VM and wait until it is ready.
    Up {
        /// Seconds to wait for the guest to answer SSH.
        #[arg(long, default_value_t = 600, value_name = "SECS")]
        timeout: u64,
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
    },
    /// Stop the VM and delete its disk, seed and records (never files in
    /// the project folder).
    Destroy,
    /// Show the VM's state.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// List every VM on this host.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Open a shell in the VM, or run a command (its exit code is returned).
    Ssh {
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
    /// Check this host: QEMU, a working accelerator, TUN, nftables, firmware, virtiofs.
    Doctor,
    /// Mount the shares' stores on their folders while the VM is halted
    /// (creating a missing store, so a workspace can be filled before the
    /// first `up`).
    Mount,
    /// Unmount the shares' stores mounted by `migrant mount`.
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
    /// (internal) ssh ProxyCommand: relay stdin/stdout to a unix socket.
    #[command(name = "__proxy", hide = true)]
    Proxy { socket: PathBuf },
}
