//! `mount`, `unmount`: from when an isolated share's store was an ext4
//! image root mounted on its folder. A share's folder is its store now,
//! its files always on the host: `mount` creates missing folders (a
//! workspace can be filled before the first `up`), `unmount` says there
//! is nothing to do.

use super::{Project, Result};
use crate::share;

pub fn mount(p: &Project) -> Result<u8> {
    share::check_old_images(&p.cfg)?;
    share::prepare_for_up(&p.cfg, &p.vm, true)?;
    for s in &p.cfg.shares {
        println!(
            "==> {}: share {:?}: its files are in {} (nothing to mount)",
            p.cfg.name,
            s.tag,
            s.host.display()
        );
    }
    Ok(0)
}

pub fn unmount(p: &Project) -> Result<u8> {
    println!(
        "==> {}: nothing to unmount: a share's folder is its store",
        p.cfg.name
    );
    Ok(0)
}
