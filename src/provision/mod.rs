//! After boot: SSH access, readiness, and (later) Ansible and hooks.

pub mod keys;
pub mod ssh;
