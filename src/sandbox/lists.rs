//! Every seccomp allow-list, side by side as data: what each confined
//! helper may ask of the kernel once it reads the guest's bytes. Anything
//! not listed kills the whole process. A name is checked against the
//! running architecture's table by a unit test here (a typo fails the
//! build's tests, not a VM), and [`super::Filter::load`] refuses a name it
//! cannot resolve.
//!
//! virtiofsd installs its own filter (the `virtiofsd` crate's, per
//! thread); QEMU confines itself with `-sandbox on`.

/// What every confined helper's runtime may ask: I/O on descriptors it
/// holds, waiting, memory, time, randomness, signals, exiting.
pub const BASE: &[&str] = &[
    "read",
    "write",
    "readv",
    "writev",
    "recvfrom",
    "recvmsg",
    "recvmmsg",
    "poll",
    "ppoll",
    "fcntl",
    "close",
    "clock_gettime",
    "clock_nanosleep",
    "nanosleep",
    "futex",
    "getrandom",
    "mmap",
    "munmap",
    "mremap",
    "mprotect",
    "madvise",
    "brk",
    "rt_sigreturn",
    "rt_sigprocmask",
    "rt_sigaction",
    "sigaltstack",
    "sched_yield",
    "getpid",
    "gettid",
    // Signals to its own threads only: the kernel checks the thread group.
    "tgkill",
    "exit",
    "exit_group",
];

/// The dataplane, besides [`BASE`]: I/O on sockets and pipes (splice),
/// making sockets in the host's namespace (the families are checked by
/// argument: [`DATAPLANE_SOCKET_FAMILIES`]), waiting, threads for
/// blocking work. No open, no exec, no ptrace, no mount, no namespace
/// calls.
pub const DATAPLANE: &[&str] = &[
    // FIONREAD and friends on its own sockets (tokio, splice sizing).
    "ioctl",
    "pipe2",
    "splice",
    "connect",
    "accept4",
    "bind",
    "listen",
    "getsockname",
    "getpeername",
    "setsockopt",
    "getsockopt",
    "sendto",
    "sendmsg",
    "sendmmsg",
    "shutdown",
    "epoll_create1",
    "epoll_ctl",
    "epoll_wait",
    "epoll_pwait",
    "epoll_pwait2",
    "eventfd2",
    // Threads of the runtime's blocking pool (no new processes: the
    // flags are not checked, but without execve or a file system a new
    // process could do nothing the dataplane cannot).
    "clone",
    "clone3",
    "set_robust_list",
    "rseq",
    "sched_getaffinity",
    // The standard library asks for these on start-up and panics.
    "getcwd",
    "getuid",
    "geteuid",
];

/// `socket(family, …)` the dataplane may call, by its first argument:
/// IPv4 and IPv6 upstream sockets, netlink for routes and the host's
/// addresses.
pub const DATAPLANE_SOCKET_FAMILIES: &[i32] = &[libc::AF_INET, libc::AF_INET6, libc::AF_NETLINK];

/// The WireGuard packet loop: [`BASE`] alone, and for sending either
/// [`WIREGUARD_SEND_ANYWHERE`] (several peers, roaming) or, with one peer
/// and a connected socket, `sendto` without an address (checked by
/// argument in `wireguard::child`).
pub const WIREGUARD: &[&str] = BASE;

/// Sending calls the packet loop needs when its socket is not connected.
pub const WIREGUARD_SEND_ANYWHERE: &[&str] = &["sendto", "sendmsg", "sendmmsg"];

/// Calls allowed by argument somewhere (`Filter::allow_if`), to resolve
/// with the lists.
pub const BY_ARGUMENT: &[&str] = &[
    "socket",
    "socketpair",
    "prlimit64",
    "prctl",
    "sendto",
    "setsockopt",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_in_every_list_is_a_system_call_here() {
        for (list, names) in [
            ("BASE", BASE),
            ("DATAPLANE", DATAPLANE),
            ("WIREGUARD", WIREGUARD),
            ("WIREGUARD_SEND_ANYWHERE", WIREGUARD_SEND_ANYWHERE),
            ("BY_ARGUMENT", BY_ARGUMENT),
        ] {
            for name in names {
                assert!(
                    super::super::seccomp::resolve(name).is_some(),
                    "{list}: {name:?} is not a system call on this architecture"
                );
            }
        }
        assert!(super::super::seccomp::resolve("not_a_syscall").is_none());
    }

    #[test]
    fn no_list_names_a_call_twice() {
        for names in [BASE, DATAPLANE, WIREGUARD_SEND_ANYWHERE] {
            let mut sorted = names.to_vec();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), names.len());
        }
        for name in DATAPLANE {
            assert!(!BASE.contains(name), "{name} is in BASE already");
        }
    }
}
