//! Building `ssh` command lines that reach the guest through the
//! supervisor's forward (a unix socket), never through a host port.

use std::path::Path;
use std::process::Command;

/// Options shared by every ssh invocation: throwaway hosts, so no
/// known_hosts entries; only the given key.
pub fn base_command(exe: &Path, sock: &Path, key: &Path, user: &str, host: &str) -> Command {
    let mut cmd = Command::new("ssh");
    cmd.args(ssh_options(exe, sock, key));
    cmd.arg(format!("{user}@{host}"));
    cmd
}

/// Quote `s` for the shell that ssh runs ProxyCommand with.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

pub fn proxy_command(exe: &Path, sock: &Path) -> String {
    format!(
        "{} __proxy {}",
        sh_quote(&exe.to_string_lossy()),
        sh_quote(&sock.to_string_lossy())
    )
}

pub fn ssh_options(exe: &Path, sock: &Path, key: &Path) -> Vec<String> {
    vec![
        "-F".into(),
        "none".into(),
        "-i".into(),
        key.to_string_lossy().into_owned(),
        "-o".into(),
        "IdentitiesOnly=yes".into(),
        "-o".into(),
        "StrictHostKeyChecking=no".into(),
        "-o".into(),
        "UserKnownHostsFile=/dev/null".into(),
        "-o".into(),
        "LogLevel=ERROR".into(),
        "-o".into(),
        format!("ProxyCommand={}", proxy_command(exe, sock)),
    ]
}

/// Relay stdin/stdout to the unix socket `sock` (ssh's ProxyCommand).
/// Runs without an async runtime.
pub fn proxy(sock: &Path) -> std::io::Result<()> {
    use std::io::{Read, Write};
    use std::net::Shutdown;
    let stream = std::os::unix::net::UnixStream::connect(sock)?;
    let mut up = stream.try_clone()?;
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 32 * 1024];
        loop {
            let n = stdin.read(&mut buf)?;
            if n == 0 {
                break;
            }
            up.write_all(&buf[..n])?;
        }
        up.shutdown(Shutdown::Write)
    });
    let mut down = stream;
    let mut stdout = std::io::stdout().lock();
    let mut buf = [0u8; 32 * 1024];
    loop {
        let n = down.read(&mut buf)?;
        if n == 0 {
            break;
        }
        stdout.write_all(&buf[..n])?;
        stdout.flush()?;
    }
    drop(writer);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_command_is_quoted() {
        let c = proxy_command(
            Path::new("/usr/bin/migrant"),
            Path::new("/run/migrant/it's/ssh.sock"),
        );
        assert_eq!(
            c,
            r"'/usr/bin/migrant' __proxy '/run/migrant/it'\''s/ssh.sock'"
        );
    }
}
