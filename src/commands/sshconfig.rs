//! `migrant ssh-config`.

use super::{Project, Result, self_exe, ssh_key};
use crate::error::Error;
use crate::exit;
use crate::provision::sshconfig::{Block, render};

pub fn ssh_config(p: &Project, host: Option<&str>) -> Result<u8> {
    let key = ssh_key(&p.cfg)?;
    let exe = self_exe()?;
    let sock = p.vm.ssh_sock();
    let text = render(&Block {
        host: host.unwrap_or(&p.cfg.name),
        ip: p.cfg.guest_ip(),
        user: &p.cfg.ssh.user,
        key: &key,
        exe: &exe,
        sock: &sock,
    })
    .map_err(|e| Error::other(exit::CONFIG, e.to_string()))?;
    super::docs::write_stdout(text.as_bytes())
}
