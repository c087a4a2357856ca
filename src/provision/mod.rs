//! After boot: SSH access, readiness, Ansible and lifecycle hooks.

pub mod ansible;
pub mod as_user;
pub mod hooks;
pub mod keys;
pub mod renew;
pub mod ssh;
pub mod sshconfig;
