//! A VM's user namespace, owned by the user who runs migrant, for running
//! without root. Inside it, id 0 is that user (the VM's files, which are
//! the user's own, are root's there, and root there holds every
//! capability over the namespaces it creates: the VM's network namespace,
//! its TAP, nftables, routes), and id 1 is the VM's own identity: one id
//! of the user's subordinate range, distinct per VM, as which QEMU, the
//! dataplane and the tunnel run. On the host that id owns nothing of the
//! user's, so a compromised QEMU reads none of the user's files, no other
//! VM's disk, and signals nothing. Nothing else is mapped.
//!
//! The mapping is written by `newuidmap`/`newgidmap` (setuid root, from
//! `uidmap`), which allow it only within the ranges `/etc/subuid` and
//! `/etc/subgid` give the user.

use std::os::fd::OwnedFd;
use std::process::Command;

use crate::subid::Range;

#[derive(Debug, thiserror::Error)]
pub enum UsernsError {
    #[error(
        "{user} has no subordinate {kind}s left for VM {index} ({have} in /etc/sub{kind}); `migrant doctor` says how to add a range"
    )]
    NoIds {
        user: String,
        kind: &'static str,
        index: u32,
        have: u64,
    },
    #[error("{what}")]
    Os {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} refused the mapping: {stderr}")]
    Mapping {
        program: &'static str,
        stderr: String,
    },
}

impl UsernsError {
    pub fn exit_code(&self) -> u8 {
        match self {
            UsernsError::NoIds { .. } | UsernsError::Mapping { .. } => crate::exit::UNAVAILABLE,
            UsernsError::Os { .. } => crate::exit::SOFTWARE,
        }
    }
}

/// Who is who in a VM's user namespace (host ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// The user: root inside.
    pub user: (u32, u32),
    /// The VM's identity: id 1 inside.
    pub vm: (u32, u32),
    /// The group of the user's base images, which every VM of the user
    /// reads and nobody else: group 2 inside, the first subordinate gid.
    pub images: u32,
}

/// Inside the namespace, the VM's identity.
pub const VM_ID: u32 = 1;
/// Inside the namespace, the group that may read the user's base images.
pub const IMAGES_GID: u32 = 2;

/// The host's uid for `id` of this process's user namespace, by
/// `/proc/self/uid_map` (`None` when unmapped or unreadable).
pub fn host_uid(id: u32) -> Option<u32> {
    host_id("/proc/self/uid_map", id)
}

fn host_id(file: &str, id: u32) -> Option<u32> {
    let map = std::fs::read_to_string(file).ok()?;
    map.lines().find_map(|line| {
        let f: Vec<u32> = line
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        match f[..] {
            [inside, outside, count] if id >= inside && id - inside < count => {
                outside.checked_add(id - inside)
            }
            _ => None,
        }
    })
}

impl Mapping {
    /// The mapping of VM number `index` (0, 1, …: distinct per VM of the
    /// user) for the user `name` with ids `user`, from their subordinate
    /// ranges: the index-th uid, and the (index + 1)-th gid (the first is
    /// the images group).
    pub fn for_vm(
        name: &str,
        user: (u32, u32),
        (uids, gids): (&[Range], &[Range]),
        index: u32,
    ) -> Result<Mapping, UsernsError> {
        let pick = |ranges: &[Range], kind, n: Option<u32>| {
            n.and_then(|n| nth_id(ranges, n))
                .ok_or_else(|| UsernsError::NoIds {
                    user: name.to_string(),
                    kind,
                    index,
                    have: crate::subid::total(ranges),
                })
        };
        Ok(Mapping {
            user,
            vm: (
                pick(uids, "uid", Some(index))?,
                pick(gids, "gid", index.checked_add(1))?,
            ),
            images: pick(gids, "gid", Some(0))?,
        })
    }

    /// `newuidmap PID` arguments after the pid: `0 USER 1` and `1 VM 1`.
    pub fn uid_args(&self) -> Vec<String> {
        triples(&[(0, self.user.0), (VM_ID, self.vm.0)])
    }

    /// `newgidmap PID` arguments after the pid: `0 USER 1`, `1 VM 1` and
    /// `2 IMAGES 1`.
    pub fn gid_args(&self) -> Vec<String> {
        triples(&[
            (0, self.user.1),
            (VM_ID, self.vm.1),
            (IMAGES_GID, self.images),
        ])
    }
}

fn triples(ids: &[(u32, u32)]) -> Vec<String> {
    ids.iter()
        .flat_map(|(inside, outside)| [inside.to_string(), outside.to_string(), "1".into()])
        .collect()
}

/// The `index`-th id of `ranges`, in file order (overlapping ranges
/// would give one id twice: `subid::total` counts them once, and a range
/// `usermod` adds never overlaps).
fn nth_id(ranges: &[Range], index: u32) -> Option<u32> {
    let mut left = index;
    for r in ranges {
        if left < r.count {
            return r.start.checked_add(left);
        }
        left -= r.count;
    }
    None
}

/// Make the calling process's new user namespace (and, with `net`, a
/// network namespace it owns) mapped as `mapping`, and become root in
/// it. Call while the process has one thread: a process with more may
/// not enter a new user namespace.
///
/// The mapping is written from outside: a child forked before the
/// namespace exists waits until it does, then runs `newuidmap` and
/// `newgidmap` on this process.
pub fn enter(mapping: &Mapping, net: bool) -> Result<(), UsernsError> {
    let os = |what| {
        move |e: nix::Error| UsernsError::Os {
            what,
            source: e.into(),
        }
    };
    let (ready_r, ready_w) = nix::unistd::pipe().map_err(os("pipe"))?;
    let me = nix::unistd::getpid();
    // SAFETY: the caller has one thread (documented above), so the child
    // may run anything; it only reads a pipe and spawns the two helpers.
    match unsafe { nix::unistd::fork() }.map_err(os("fork"))? {
        nix::unistd::ForkResult::Child => {
            drop(ready_w);
            let code = match map_from_outside(ready_r, me.as_raw(), mapping) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("migrant: {e}");
                    1
                }
            };
            // SAFETY: leave the forked child without running the parent's
            // exit handlers or destructors.
            unsafe { libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(ready_r);
            let mut flags = nix::sched::CloneFlags::CLONE_NEWUSER;
            if net {
                flags |= nix::sched::CloneFlags::CLONE_NEWNET;
            }
            let made = nix::sched::unshare(flags);
            // Told either way: on failure the child maps nothing (EOF).
            if made.is_ok() {
                let _ = nix::unistd::write(&ready_w, b"1");
            }
            drop(ready_w);
            let status = nix::sys::wait::waitpid(child, None).map_err(os("wait"))?;
            made.map_err(os("cannot create a user namespace"))?;
            match status {
                nix::sys::wait::WaitStatus::Exited(_, 0) => {}
                other => {
                    return Err(UsernsError::Mapping {
                        program: "newuidmap/newgidmap",
                        stderr: format!("{other:?}"),
                    });
                }
            }
            nix::unistd::setresgid(0.into(), 0.into(), 0.into())
                .map_err(os("setresgid in the user namespace"))?;
            nix::unistd::setresuid(0.into(), 0.into(), 0.into())
                .map_err(os("setresuid in the user namespace"))?;
            Ok(())
        }
    }
}

/// In the forked child: once the parent's namespace exists, map it.
fn map_from_outside(ready: OwnedFd, pid: i32, mapping: &Mapping) -> Result<(), UsernsError> {
    let mut b = [0u8; 1];
    match nix::unistd::read(&ready, &mut b) {
        Ok(1) => {}
        _ => {
            return Err(UsernsError::Mapping {
                program: "unshare",
                stderr: "the namespace was not made".into(),
            });
        }
    }
    for (program, args) in [
        ("newuidmap", mapping.uid_args()),
        ("newgidmap", mapping.gid_args()),
    ] {
        let out = Command::new(program)
            .arg(pid.to_string())
            .args(args)
            .output()
            .map_err(|source| UsernsError::Os {
                what: "cannot run newuidmap/newgidmap (apt-get install uidmap)",
                source,
            })?;
        if !out.status.success() {
            return Err(UsernsError::Mapping {
                program,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u32, count: u32) -> Range {
        Range { start, count }
    }

    #[test]
    fn each_vm_gets_its_own_id_from_the_users_ranges() {
        let uids = [r(100000, 3), r(500000, 65536)];
        let gids = [r(200000, 65536)];
        let m = |i| Mapping::for_vm("alice", (1000, 1001), (&uids, &gids), i);
        let first = m(0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(first.vm, (100000, 200001));
        assert_eq!(first.images, 200000);
        assert_eq!(
            first.uid_args(),
            ["0", "1000", "1", "1", "100000", "1"].map(String::from)
        );
        assert_eq!(
            first.gid_args(),
            ["0", "1001", "1", "1", "200001", "1", "2", "200000", "1"].map(String::from)
        );
        // Past the first range, into the second.
        assert_eq!(m(3).map(|m| m.vm.0).ok(), Some(500000));
        assert_eq!(m(4).map(|m| m.vm.0).ok(), Some(500001));
        // Every VM shares the images group, and has a gid of its own.
        assert_eq!(
            m(4).map(|m| (m.vm.1, m.images)).ok(),
            Some((200005, 200000))
        );
        // No gid left for VM 65535 (the first is the images group):
        // refused, naming what is missing.
        let e = m(65535).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("no subordinate gids left for VM 65535"), "{e}");
        assert!(Mapping::for_vm("bob", (1, 1), (&[], &[]), 0).is_err());
    }
}
