//! What makes a resumed guest a new machine, sent over the one login that
//! readies it (each SSH login costs most of a second under TCG).
//!
//! A memory snapshot holds the guest's kernel random generator: every
//! resume would draw the same bytes until the kernel reseeds, and a guest
//! kernel without a vmgenid driver (Debian 12's) does not reseed at the
//! new generation id. So at every resume the host sends fresh bytes,
//! which guest root mixes into the input pool and then makes the kernel
//! reseed from it (`RNDRESEEDCRNG`) before anything else runs. A clone is
//! also another machine: a new machine-id, its own name as hostname and
//! new SSH host keys, made after the reseed: ED25519 and ECDSA keys, each
//! moved into place whole (never a moment without one); the template's
//! RSA and DSA keys are removed, not remade (RSA takes seconds under TCG,
//! and every client since OpenSSH 6.5 takes ED25519). Before OpenSSH 9.8
//! each connection's sshd reads the keys from disk, so nothing restarts;
//! from 9.8 (`sshd-session`) the listener holds them and is reloaded, and
//! the login waits until it listens again.
//! The clock is set to the host's at the same time.

/// The guest side, as the SSH command line: it says `in` once logged in,
/// `go` once root waits for the host's lines (so the time is not late),
/// then `set`, `seeded` (or `mixed` without python3: the bytes are in the
/// pool, the reseed waits for the kernel's next one) and, for a clone,
/// `renewed`.
pub const SCRIPT: &str = r#"echo in; sudo -n sh -c '
echo go
read t; read seed; read id; read name
date -u -s "@$t" >/dev/null && echo set
if command -v python3 >/dev/null 2>&1 && python3 -c "import fcntl, os, sys
fd = os.open(\"/dev/urandom\", os.O_WRONLY)
os.write(fd, bytes.fromhex(sys.argv[1]))
fcntl.ioctl(fd, 0x5207)" "$seed"; then echo seeded
else printf %s "$seed" >/dev/urandom && echo mixed; fi
if [ -n "$id" ]; then
  printf "%s\n" "$id" >/etc/machine-id
  hostname "$name" && printf "%s\n" "$name" >/etc/hostname
  sed -i "s/^127\.0\.1\.1[[:space:]].*/127.0.1.1 $name/" /etc/hosts 2>/dev/null
  k=/etc/ssh/ssh_host
  rm -f "$k"_*_key.new "$k"_*_key.new.pub
  ssh-keygen -q -t ed25519 -N "" -f "$k"_ed25519_key.new &&
  ssh-keygen -q -t ecdsa -N "" -f "$k"_ecdsa_key.new || exit 1
  for t in ed25519 ecdsa; do
    mv -f "$k"_"$t"_key.new.pub "$k"_"$t"_key.pub && mv -f "$k"_"$t"_key.new "$k"_"$t"_key
  done
  rm -f "$k"_rsa_key "$k"_rsa_key.pub "$k"_dsa_key "$k"_dsa_key.pub
  if [ -x /usr/lib/openssh/sshd-session ] || [ -x /usr/libexec/sshd-session ]; then
    { systemctl reload ssh || systemctl reload sshd; } >/dev/null 2>&1
    for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
      sleep 0.1; ss -Hltn "sport = :22" 2>/dev/null | grep -q . && break
    done
  fi
  echo renewed
fi'"#;

/// A clone's new identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// 128 random bits, as `/etc/machine-id` holds them.
    pub machine_id: [u8; 16],
    /// The clone's name as a host name.
    pub hostname: String,
}

/// What the host sends after `go`: the time, the seed, and for a clone
/// its machine-id and hostname (empty lines otherwise).
pub fn input(now: std::time::Duration, seed: &[u8; 64], clone: Option<&Identity>) -> String {
    let (id, name) = match clone {
        Some(c) => (hex(&c.machine_id), c.hostname.clone()),
        None => (String::new(), String::new()),
    };
    format!(
        "{}.{:09}\n{}\n{id}\n{name}\n",
        now.as_secs(),
        now.subsec_nanos(),
        hex(seed)
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A VM name as a host name: letters, digits and `-`, at most 63, not
/// starting or ending with `-`.
pub fn hostname_for(vm: &str) -> String {
    let name: String = vm
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    let name = name.trim_matches('-');
    if name.is_empty() {
        "migrant".into()
    } else {
        name.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_from_vm_names() {
        assert_eq!(hostname_for("ci_job.7"), "ci-job-7");
        assert_eq!(hostname_for("-x-"), "x");
        assert_eq!(hostname_for("___"), "migrant");
        assert_eq!(hostname_for(&"a".repeat(80)).len(), 63);
    }

    #[test]
    fn the_input_is_four_lines() {
        let seed = [0xabu8; 64];
        let plain = input(std::time::Duration::new(5, 7), &seed, None);
        assert_eq!(plain, format!("5.000000007\n{}\n\n\n", "ab".repeat(64)));
        let id = Identity {
            machine_id: [1; 16],
            hostname: "c1".into(),
        };
        let clone = input(std::time::Duration::new(5, 7), &seed, Some(&id));
        let lines: Vec<&str> = clone.lines().collect();
        assert_eq!(lines[2], "01".repeat(16));
        assert_eq!(lines[3], "c1");
    }

    #[test]
    fn the_script_has_no_single_quote_inside_its_quoted_part() {
        let inner = SCRIPT
            .split_once("sh -c '")
            .map(|(_, rest)| rest)
            .unwrap_or("");
        assert_eq!(inner.matches('\'').count(), 1, "only the closing quote");
        assert!(inner.ends_with('\''));
    }
}
