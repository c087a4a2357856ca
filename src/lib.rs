//! migrant: throwaway QEMU virtual machines for untrusted workloads.
//!
//! README.md and SECURITY.md describe the architecture and the promises.
//! The binary in `src/main.rs` is a thin shell over this crate.

pub mod acl;
pub mod cli;
pub mod commands;
pub mod config;
pub mod error;
pub mod exit;
pub mod firmware;
pub mod hostreq;
pub mod image;
pub mod lockfile;
pub mod logging;
pub mod memsnap;
pub mod net;
pub mod nofollow;
pub mod provision;
pub mod qemu;
pub mod rotate;
pub mod runstate;
pub mod sandbox;
pub mod secrets;
pub mod seed;
pub mod share;
pub mod size;
pub mod state;
pub mod subid;
pub mod supervisor;
pub mod userfile;
pub mod userns;
pub mod wireguard;
