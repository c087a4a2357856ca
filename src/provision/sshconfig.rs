//! `migrant ssh-config`: an OpenSSH client configuration block for the
//! VM, usable by plain `ssh -F`, `scp`, `rsync -e ssh` and VS Code
//! Remote-SSH. It reaches the guest the way `migrant ssh` does: a
//! `ProxyCommand` relaying to the supervisor's SSH socket, never a host
//! port.

use std::path::Path;

use super::ssh::proxy_command;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SshConfigError {
    #[error("{what} {value:?} cannot be written into an ssh_config file")]
    Unwritable { what: &'static str, value: String },
}

/// What goes into the block.
#[derive(Debug, Clone)]
pub struct Block<'a> {
    /// The `Host` alias.
    pub host: &'a str,
    /// The guest's address (informational: the ProxyCommand ignores it).
    pub ip: std::net::Ipv4Addr,
    pub user: &'a str,
    pub key: &'a Path,
    pub exe: &'a Path,
    pub sock: &'a Path,
}

fn unwritable(what: &'static str, value: &str) -> SshConfigError {
    SshConfigError::Unwritable {
        what,
        value: value.to_string(),
    }
}

/// A value ssh_config reads as one argument: double-quoted, with `%`
/// (ssh's token character) doubled. Quotes, backslashes and control
/// characters cannot be written portably and are refused.
fn arg(what: &'static str, value: &str) -> Result<String, SshConfigError> {
    if value.is_empty() || value.contains(['"', '\\']) || value.chars().any(char::is_control) {
        return Err(unwritable(what, value));
    }
    Ok(format!("\"{}\"", value.replace('%', "%%")))
}

/// The `Host` block, ending with a newline.
pub fn render(b: &Block) -> Result<String, SshConfigError> {
    if b.host.is_empty()
        || b.host.chars().any(|c| c.is_whitespace() || c.is_control())
        || b.host.contains(['"', '\\', '#'])
    {
        return Err(unwritable("host alias", b.host));
    }
    // ProxyCommand takes the rest of the line, runs it with /bin/sh after
    // expanding % tokens; sh_quote makes each path one shell word.
    for (what, p) in [("migrant executable", b.exe), ("SSH socket", b.sock)] {
        let s = p.to_string_lossy();
        if s.chars().any(char::is_control) {
            return Err(unwritable(what, &s));
        }
    }
    let proxy = proxy_command(b.exe, b.sock).replace('%', "%%");
    Ok(format!(
        "Host {host}\n  HostName {ip}\n  User {user}\n  IdentityFile {key}\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  ProxyCommand {proxy}\n",
        host = b.host,
        ip = b.ip,
        user = arg("user", b.user)?,
        key = arg("key path", &b.key.to_string_lossy())?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn block<'a>(host: &'a str, key: &'a Path, sock: &'a Path) -> Block<'a> {
        Block {
            host,
            ip: Ipv4Addr::new(10, 0, 2, 15),
            user: "migrant",
            key,
            exe: Path::new("/usr/local/bin/migrant"),
            sock,
        }
    }

    #[test]
    fn block_text() {
        let text = render(&block(
            "box",
            Path::new("/home/u/.ssh/migrant"),
            Path::new("/run/migrant/box/ssh.sock"),
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            text,
            "Host box\n  HostName 10.0.2.15\n  User \"migrant\"\n  IdentityFile \"/home/u/.ssh/migrant\"\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  ProxyCommand '/usr/local/bin/migrant' __proxy '/run/migrant/box/ssh.sock'\n"
        );
    }

    #[test]
    fn percent_and_spaces() {
        let text = render(&block(
            "b",
            Path::new("/home/my user/100%/key"),
            Path::new("/run/m%/ssh.sock"),
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(text.contains("IdentityFile \"/home/my user/100%%/key\"\n"));
        assert!(text.contains("__proxy '/run/m%%/ssh.sock'\n"));
    }

    #[test]
    fn refuses_what_ssh_would_misread() {
        let sock = Path::new("/s");
        assert!(render(&block("a b", Path::new("/k"), sock)).is_err());
        assert!(render(&block("", Path::new("/k"), sock)).is_err());
        assert!(render(&block("b", Path::new("/k\"q"), sock)).is_err());
        assert!(render(&block("b", Path::new("/k\nProxyCommand x"), sock)).is_err());
        assert!(render(&block("b", Path::new("/k"), Path::new("/s\nx"))).is_err());
    }
}
