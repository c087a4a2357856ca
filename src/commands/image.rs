//! `migrant image list|pull|rm|prune` and `migrant storage`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::Result;
use crate::cli::ImageCmd;
use crate::error::Error;
use crate::exit;
use crate::image::cache::{self, FileLock, Kind};
use crate::size::human;
use crate::state::{Paths, Record, VmLock};

pub fn run(cmd: ImageCmd) -> Result<u8> {
    let paths = Paths::from_env();
    match cmd {
        ImageCmd::List { json } => list(&paths, json),
        ImageCmd::Pull { name, checksum } => pull(&paths, &name, checksum.as_deref()),
        ImageCmd::Rm { names } => rm(&paths, &names),
        ImageCmd::Prune => prune(&paths),
    }
}

/// One VM folder under `vms/`.
struct VmDir {
    name: String,
    dir: PathBuf,
    record: Option<Record>,
}

fn vm_dirs(paths: &Paths) -> Vec<VmDir> {
    let mut out: Vec<VmDir> = std::fs::read_dir(paths.vms())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let vm = paths.vm(&name);
            let record = Record::load(&vm.record()).ok().flatten();
            VmDir {
                name,
                dir: e.path(),
                record,
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Cached image → the VMs that use it (their record names it, or their
/// disk's backing file is it).
fn users(paths: &Paths) -> BTreeMap<PathBuf, Vec<String>> {
    let mut map: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
    for vm in vm_dirs(paths) {
        let mut bases = Vec::new();
        if let Some(r) = &vm.record {
            bases.push(r.base_image.clone());
        }
        let disk = vm.dir.join("disk.qcow2");
        if let Ok(info) = crate::image::info_as(&disk, Some("qcow2"), true)
            && let Some(b) = info.backing_filename
        {
            bases.push(PathBuf::from(b));
        }
        for b in bases {
            let names = map.entry(b).or_default();
            if !names.contains(&vm.name) {
                names.push(vm.name.clone());
            }
        }
    }
    map
}

#[derive(Debug, Serialize)]
struct ImageView {
    name: String,
    path: String,
    size: u64,
    source: Option<String>,
    alias: Option<String>,
    digest: Option<String>,
    added_at: Option<u64>,
    used_by: Vec<String>,
}

fn views(paths: &Paths) -> Vec<ImageView> {
    let users = users(paths);
    cache::entries(&paths.images())
        .into_iter()
        .map(|e| ImageView {
            name: e.file_name(),
            path: e.path.display().to_string(),
            size: cache::disk_usage(&e.path),
            source: e.meta.as_ref().map(|m| m.source.clone()),
            alias: e.meta.as_ref().and_then(|m| m.alias.clone()),
            digest: e.meta.as_ref().map(|m| m.digest.to_string()),
            added_at: e.meta.as_ref().map(|m| m.added_at),
            used_by: users.get(&e.path).cloned().unwrap_or_default(),
        })
        .collect()
}

fn list(paths: &Paths, json: bool) -> Result<u8> {
    let v = views(paths);
    if json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(0);
    }
    if v.is_empty() {
        println!("no cached images in {}", paths.images().display());
        return Ok(0);
    }
    for i in v {
        println!("{}", i.name);
        println!("    size:    {}", human(i.size));
        if let Some(a) = &i.alias {
            println!("    name:    {a}");
        }
        if let Some(s) = &i.source {
            println!("    source:  {s}");
        }
        if let Some(d) = &i.digest {
            println!("    digest:  {d}");
        }
        if let Some(t) = i.added_at {
            println!("    added:   {}", crate::image::age(t));
        }
        println!(
            "    used by: {}",
            if i.used_by.is_empty() {
                "-".to_string()
            } else {
                i.used_by.join(", ")
            }
        );
    }
    Ok(0)
}

fn pull(paths: &Paths, name: &str, checksum: Option<&str>) -> Result<u8> {
    let checksum = checksum
        .map(crate::image::Checksum::parse)
        .transpose()
        .map_err(|e| Error::other(exit::USAGE, format!("--checksum: {e}")))?;
    // A relative local path is relative to the current folder here.
    let looks_local = !name.contains("://")
        && (name.contains('/') || name.starts_with('.') || Path::new(name).is_file());
    let image = if looks_local {
        std::path::absolute(name)
            .map_err(Error::io(name.to_string()))?
            .display()
            .to_string()
    } else {
        name.to_string()
    };
    let source = crate::image::resolve(&image, checksum.as_ref())?;
    crate::state::ensure_dir(&paths.home, 0o711)?;
    crate::state::ensure_dir(&paths.images(), 0o711)?;
    let path = crate::image::obtain(&source, &paths.images(), "image")?;
    println!("==> image: {}", path.display());
    Ok(0)
}

fn remove_image(path: &Path) -> Result<u64> {
    let size = cache::disk_usage(path);
    std::fs::remove_file(path).map_err(Error::io(format!("cannot remove {}", path.display())))?;
    let _ = std::fs::remove_file(cache::meta_path(path));
    Ok(size)
}

fn rm(paths: &Paths, names: &[String]) -> Result<u8> {
    let users = users(paths);
    let entries = cache::entries(&paths.images());
    let mut code = 0;
    for name in names {
        let alias = crate::image::alias::find(name).map(|a| a.name);
        let matching: Vec<_> = entries
            .iter()
            .filter(|e| {
                e.file_name() == *name
                    || e.path == Path::new(name)
                    || e.meta.as_ref().is_some_and(|m| {
                        m.source == *name || (alias.is_some() && m.alias.as_deref() == alias)
                    })
            })
            .collect();
        if matching.is_empty() {
            eprintln!("migrant: error: no cached image {name:?} (`migrant image list` shows them)");
            code = exit::USAGE;
            continue;
        }
        for e in matching {
            if let Some(vms) = users.get(&e.path) {
                eprintln!(
                    "migrant: error: {} is used by {}; destroy {} first",
                    e.file_name(),
                    vms.join(", "),
                    if vms.len() == 1 { "it" } else { "them" }
                );
                code = exit::USAGE;
                continue;
            }
            let size = remove_image(&e.path)?;
            println!("removed {} ({})", e.file_name(), human(size));
        }
    }
    Ok(code)
}

/// Whether the process that wrote `.<name>.partial<pid>` still runs.
fn writer_alive(name: &str) -> bool {
    let digits: String = name
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    !digits.is_empty() && Path::new(&format!("/proc/{digits}")).exists()
}

fn prune(paths: &Paths) -> Result<u8> {
    let dir = paths.images();
    let users = users(paths);
    let mut freed = 0u64;
    let mut removed = 0;
    for e in cache::entries(&dir) {
        if users.contains_key(&e.path) {
            continue;
        }
        freed += remove_image(&e.path)?;
        removed += 1;
        println!("removed {}", e.file_name());
    }
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        let stale = match cache::kind(&name) {
            Kind::Meta => {
                let image = path.with_file_name(name.trim_end_matches(".json"));
                !image.exists()
            }
            Kind::Partial => {
                // `.<image>.partial`: its download holds `.<image>.lock`.
                let image = name.trim_start_matches('.').trim_end_matches(".partial");
                !FileLock::is_held(&dir.join(format!(".{image}.lock")))
            }
            Kind::Lock => !FileLock::is_held(&path),
            Kind::Temporary => !writer_alive(&name),
            Kind::Image | Kind::Other => false,
        };
        if stale {
            freed += cache::disk_usage(&path);
            if std::fs::remove_file(&path).is_ok() {
                removed += 1;
                println!("removed {name}");
            }
        }
    }
    println!(
        "==> pruned {removed} file(s), {} freed; images in use are kept",
        human(freed)
    );
    Ok(0)
}

#[derive(Debug, Serialize)]
struct FileView {
    role: String,
    path: String,
    size: u64,
}

#[derive(Debug, Serialize)]
struct VmView {
    name: String,
    state: String,
    total: u64,
    files: Vec<FileView>,
}

#[derive(Debug, Serialize)]
struct StorageView {
    images_dir: String,
    images_total: u64,
    images: Vec<ImageView>,
    downloads: Vec<FileView>,
    vms_dir: String,
    vms: Vec<VmView>,
    other: Vec<FileView>,
}

/// The role of a file in a VM's state folder.
fn vm_role(name: &str) -> Option<&'static str> {
    Some(match name {
        "disk.qcow2" => "disk",
        "seed.img" => "seed",
        "nvram.fd" => "nvram",
        "snapshot.qcow2" => "snapshot",
        "snapshot-nvram.fd" => "snapshot nvram",
        "snapshot.vmstate" => "snapshot memory",
        "snapshot.json" => "snapshot record",
        "record.json" => "record",
        "lock" => "lock",
        "serial.log" | "qemu.log" | "supervisor.log" | "wireguard.log" => "log",
        "egress.jsonl" | "egress.jsonl.1" => "egress journal",
        _ => return None,
    })
}

fn file_view(role: &str, path: &Path) -> FileView {
    FileView {
        role: role.to_string(),
        path: path.display().to_string(),
        size: cache::disk_usage(path),
    }
}

pub fn storage(json: bool) -> Result<u8> {
    let paths = Paths::from_env();
    let images = views(&paths);
    let mut downloads = Vec::new();
    let mut other = Vec::new();
    for e in std::fs::read_dir(paths.images())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        match cache::kind(&name) {
            Kind::Image | Kind::Meta => {}
            Kind::Partial => downloads.push(file_view(
                if FileLock::is_held(&path.with_file_name(name.replace(".partial", ".lock"))) {
                    "download in progress"
                } else {
                    "interrupted download (the next pull resumes it)"
                },
                &path,
            )),
            Kind::Lock => downloads.push(file_view(
                if FileLock::is_held(&path) {
                    "download lock (held)"
                } else {
                    "stale download lock (prune removes it)"
                },
                &path,
            )),
            Kind::Temporary => downloads.push(file_view(
                "temporary copy (prune removes it once its writer is gone)",
                &path,
            )),
            Kind::Other => other.push(file_view("unknown", &path)),
        }
    }
    let mut vms = Vec::new();
    for vm in vm_dirs(&paths) {
        let vp = paths.vm(&vm.name);
        let state = match &vm.record {
            None => "destroyed (no record; leftover files)".to_string(),
            Some(r) if VmLock::is_held(&vp) => r.state.to_string(),
            Some(_) => "stopped".to_string(),
        };
        let mut files = Vec::new();
        for e in std::fs::read_dir(&vm.dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            match vm_role(&name) {
                Some(role) => files.push(file_view(role, &e.path())),
                None => other.push(file_view("unknown", &e.path())),
            }
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        vms.push(VmView {
            name: vm.name,
            state,
            total: files.iter().map(|f| f.size).sum(),
            files,
        });
    }
    for e in std::fs::read_dir(paths.vms())
        .into_iter()
        .flatten()
        .flatten()
    {
        if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            other.push(file_view("unknown", &e.path()));
        }
    }
    for e in std::fs::read_dir(&paths.home)
        .into_iter()
        .flatten()
        .flatten()
    {
        let n = e.file_name().to_string_lossy().into_owned();
        if !matches!(n.as_str(), "images" | "vms" | "firmware") {
            other.push(file_view("unknown", &e.path()));
        }
    }
    let view = StorageView {
        images_dir: paths.images().display().to_string(),
        images_total: images.iter().map(|i| i.size).sum::<u64>()
            + downloads.iter().map(|d| d.size).sum::<u64>(),
        images,
        downloads,
        vms_dir: paths.vms().display().to_string(),
        vms,
        other,
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&view).unwrap_or_default()
        );
        return Ok(0);
    }
    println!(
        "Base images: {} ({})",
        view.images_dir,
        human(view.images_total)
    );
    if view.images.is_empty() && view.downloads.is_empty() {
        println!("  (none)");
    }
    for i in &view.images {
        let what = match (&i.alias, &i.source) {
            (Some(a), _) => a.clone(),
            (None, Some(s)) => s.clone(),
            _ => "unknown source".into(),
        };
        let used = if i.used_by.is_empty() {
            "unused".to_string()
        } else {
            format!("used by {}", i.used_by.join(", "))
        };
        println!("  {:<56} {:>10}  {what}; {used}", i.name, human(i.size));
    }
    for d in &view.downloads {
        println!("  {:<56} {:>10}  {}", short(&d.path), human(d.size), d.role);
    }
    println!("VMs: {}", view.vms_dir);
    if view.vms.is_empty() {
        println!("  (none)");
    }
    for v in &view.vms {
        println!("  {} ({}) {}", v.name, v.state, human(v.total));
        for f in &v.files {
            println!(
                "    {:<15} {:<20} {:>10}",
                f.role,
                short(&f.path),
                human(f.size)
            );
        }
    }
    if !view.other.is_empty() {
        println!("Other files (not migrant's):");
        for f in &view.other {
            println!("  {:<56} {:>10}", f.path, human(f.size));
        }
    }
    Ok(0)
}

fn short(path: &str) -> String {
    Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_writers() {
        let me = format!(".x.img.partial{}", std::process::id());
        assert!(writer_alive(&me));
        assert!(!writer_alive(".x.img.partial"));
        assert!(!writer_alive(".x.img.partial999999999"));
    }

    #[test]
    fn vm_roles() {
        assert_eq!(vm_role("snapshot.qcow2"), Some("snapshot"));
        assert_eq!(vm_role("nvram.fd"), Some("nvram"));
        assert_eq!(vm_role("notes.txt"), None);
    }
}
