//! `mount`, `unmount`: host access to the shares' stores while the VM is
//! halted.

use super::{Live, Project, Result, live};
use crate::error::Error;
use crate::exit;
use crate::share::{self, image};
use crate::state::VmLock;

pub fn mount(p: &Project) -> Result<u8> {
    let name = &p.cfg.name;
    if !p.cfg.shares.iter().any(|s| share::image_of(s).is_some()) {
        println!("==> {name}: {}: nothing to mount", no_images(p));
        return Ok(0);
    }
    match live(&p.vm)? {
        Live::Active(_) => {
            println!("==> {name}: running; its stores are mounted while it runs");
            return Ok(0);
        }
        Live::Busy => {
            return Err(crate::runstate::Refusal::busy(name).into());
        }
        _ => {}
    }
    let _lock = VmLock::try_acquire(&p.vm)?;
    share::check_paths(&p.cfg)?;
    if let Some(rec) = share::load_recorded(&p.vm)? {
        share::check_drift(&p.cfg, &rec)?;
    }
    let owner = image::Owner::invoker();
    for (s, img) in p
        .cfg
        .shares
        .iter()
        .filter_map(|s| Some((s, share::image_of(s)?)))
    {
        if !s.host.exists() {
            owner.mkdir(&s.host).map_err(|why| {
                Error::other(exit::NOPERM, format!("create {}: {why}", s.host.display()))
            })?;
        }
        if !img.exists() {
            println!(
                "==> {name}: creating the {} store {}",
                crate::size::as_written(s.size),
                img.display()
            );
            image::create(&img, s.size, &owner).map_err(|(why, code)| {
                share::ShareError::Create {
                    tag: s.tag.clone(),
                    image: img.clone(),
                    why,
                    code,
                }
            })?;
        }
        if share::mount_store(&s.tag, &img, &s.host)? {
            println!(
                "==> {name}: mounted {} on {}",
                img.display(),
                s.host.display()
            );
        } else {
            println!("==> {name}: {} is already mounted", s.host.display());
        }
    }
    Ok(0)
}

pub fn unmount(p: &Project) -> Result<u8> {
    let name = &p.cfg.name;
    match live(&p.vm)? {
        Live::Active(_) | Live::Busy => {
            return Err(Error::other(
                exit::TEMPFAIL,
                format!("{name} is running: its stores stay mounted until `migrant halt`"),
            ));
        }
        _ => {}
    }
    if !p.cfg.shares.iter().any(|s| share::image_of(s).is_some()) {
        println!("==> {name}: {}: nothing to unmount", no_images(p));
        return Ok(0);
    }
    let _lock = VmLock::try_acquire(&p.vm)?;
    for (s, img) in p
        .cfg
        .shares
        .iter()
        .filter_map(|s| Some((s, share::image_of(s)?)))
    {
        if share::unmount_store(&s.tag, &img, &s.host)? {
            println!("==> {name}: unmounted {}", s.host.display());
        } else {
            println!("==> {name}: {} was not mounted", s.host.display());
        }
    }
    Ok(0)
}

/// Why no share has an image to mount.
fn no_images(p: &Project) -> &'static str {
    match p.cfg.shares.iter().any(|s| s.isolation) {
        // Run as a user, an isolated share's store is its folder.
        true => "each store is its share's folder, its files already there",
        false => "no isolated shares",
    }
}
