//! `migrant provision`, and the provisioning step of `up`.

use super::{Live, Project, Result, live, self_exe, ssh_key};
use crate::provision::ansible::{self, PLAYBOOK, Target};
use crate::state::{Record, VmState};

pub fn provision(p: &Project, extra: &[String]) -> Result<u8> {
    match live(&p.vm)? {
        Live::Active(r) if r.state == VmState::Running => {}
        Live::Active(_) | Live::Busy => {
            return Err(crate::runstate::Refusal::Busy {
                name: p.cfg.name.clone(),
                now: "starting, stopping or paused; try again",
            }
            .into());
        }
        _ => {
            return Err(crate::runstate::Refusal::not_running(
                &p.cfg.name,
                "; `migrant up` starts it",
            )
            .into());
        }
    }
    if !p.cfg.dir.join(PLAYBOOK).is_file() {
        eprintln!(
            "no {PLAYBOOK} in {}; nothing to provision",
            p.cfg.dir.display()
        );
        return Ok(0);
    }
    run_playbook(p, extra)?;
    Ok(0)
}

/// Run the playbook and record that the VM is provisioned.
pub fn run_playbook(p: &Project, extra: &[String]) -> Result<()> {
    let key = ssh_key(&p.cfg)?;
    let exe = self_exe()?;
    let sock = p.vm.ssh_sock();
    println!("==> {}: provisioning with {PLAYBOOK}", p.cfg.name);
    ansible::run(
        &p.cfg.dir,
        &Target {
            name: &p.cfg.name,
            ip: p.cfg.guest_ip(),
            user: &p.cfg.ssh.user,
            key: &key,
            exe: &exe,
            sock: &sock,
        },
        extra,
    )?;
    mark_provisioned(p)?;
    println!("==> {}: provisioned", p.cfg.name);
    Ok(())
}

pub fn mark_provisioned(p: &Project) -> Result<()> {
    Record::update(&p.vm.record(), |r| r.provisioned = true)?;
    Ok(())
}
