//! `status`, `list`, `ip`, `info`.

use std::time::Duration;

use serde::Serialize;

use super::{Live, Project, Result, live};
use crate::state::{Paths, Record};
use crate::supervisor::control::{self, Request, Response};

#[derive(Debug, Serialize)]
struct StatusView {
    name: String,
    state: String,
    project: String,
    ip: Option<String>,
    /// The guest's IPv6 address (`ipv6 = true`, status of one project).
    #[serde(skip_serializing_if = "Option::is_none")]
    ipv6: Option<String>,
    accelerator: Option<String>,
    qemu_user: Option<String>,
    supervisor_pid: Option<u32>,
    qemu_pid: Option<u32>,
    uptime_secs: Option<u64>,
    last_stop: Option<String>,
    disk: Option<String>,
    /// `saved 5 minutes ago (412.0 MiB)`; `None` without a snapshot.
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshot: Option<String>,
    /// Migrantfile changes the VM does not have yet.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pending: Vec<String>,
    /// Egress counters from the running supervisor.
    network: Option<crate::net::dataplane::stats::StatsView>,
    /// Shared folders (status of one project only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    shares: Vec<crate::share::ShareView>,
    /// The WireGuard tunnel, while the VM runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    wireguard: Option<String>,
    /// Where the guest's DNS queries go, in WireGuard mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    dns: Option<String>,
    /// The project's lifecycle hooks (status of one project only).
    #[serde(skip_serializing_if = "Option::is_none")]
    hooks: Option<crate::provision::hooks::Present>,
    /// `list`: why the VM's project no longer stands for it (folder gone,
    /// Migrantfile not loading or naming another VM); `destroy --name`
    /// still removes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    orphan: Option<String>,
}

fn view(name: &str, live: &Live, project: &str) -> StatusView {
    let (state, rec): (String, Option<&Record>) = match live {
        Live::NotCreated => ("not created".into(), None),
        Live::Busy => ("busy".into(), None),
        Live::Stopped(r) => ("stopped".into(), Some(r)),
        Live::Active(r) => (r.state.to_string(), Some(r)),
    };
    let active = matches!(live, Live::Active(_));
    StatusView {
        name: name.to_string(),
        state,
        project: rec
            .map(|r| r.project_dir.display().to_string())
            .unwrap_or_else(|| project.to_string()),
        ip: rec.filter(|_| active).map(|r| r.guest_ip.to_string()),
        ipv6: None,
        accelerator: rec.filter(|_| active).and_then(|r| r.accel.clone()),
        qemu_user: rec.filter(|_| active).and_then(|r| r.qemu_user.clone()),
        supervisor_pid: rec.and_then(|r| r.supervisor_pid),
        qemu_pid: rec.and_then(|r| r.qemu_pid),
        uptime_secs: rec
            .and_then(|r| r.started_at)
            .map(|t| crate::state::now().saturating_sub(t)),
        last_stop: rec.and_then(|r| r.last_stop.clone()),
        disk: None,
        snapshot: None,
        pending: Vec::new(),
        network: None,
        shares: Vec::new(),
        wireguard: None,
        dns: None,
        hooks: None,
        orphan: None,
    }
}

/// Why the project recorded for VM `name` no longer stands for it, if so.
fn orphaned(name: &str, live: &Live) -> Option<String> {
    let (Live::Active(r) | Live::Stopped(r)) = live else {
        return None;
    };
    if !r.project_dir.join(crate::config::FILE_NAME).exists() {
        return Some("project gone".into());
    }
    match crate::config::load(&r.project_dir) {
        Ok(c) if c.name == name => None,
        Ok(_) => Some("Migrantfile names another VM".into()),
        Err(_) => Some("Migrantfile does not load".into()),
    }
}

fn print_view(v: &StatusView) {
    println!("name:        {}", v.name);
    println!("state:       {}", v.state);
    println!("project:     {}", v.project);
    if let Some(ip) = &v.ip {
        println!("ip:          {ip}");
    }
    if let Some(ip) = &v.ipv6 {
        println!("ipv6:        {ip}");
    }
    if let Some(a) = &v.accelerator {
        println!("accelerator: {a}");
    }
    if let Some(u) = &v.qemu_user {
        println!("qemu user:   {u}");
    }
    if let Some(pid) = v.qemu_pid {
        println!("qemu pid:    {pid}");
    }
    if let Some(s) = v.uptime_secs {
        println!("uptime:      {s} s");
    }
    if let Some(d) = &v.disk {
        println!("disk:        {d}");
    }
    if v.state != "not created" {
        println!("snapshot:    {}", v.snapshot.as_deref().unwrap_or("none"));
    }
    if let Some(l) = &v.last_stop {
        println!("last stop:   {l}");
    }
    for note in &v.pending {
        println!("pending:     {note}");
    }
    for s in &v.shares {
        print_share(s);
    }
    if let Some(w) = &v.wireguard {
        println!("wireguard:   {w}");
    }
    if let Some(d) = &v.dns {
        println!("dns:         {d}");
    }
    if let Some(h) = &v.hooks {
        let active = if h.active.is_empty() {
            "none".to_string()
        } else {
            h.active.join(" ")
        };
        println!("hooks:       {active}");
        if !h.not_executable.is_empty() {
            println!(
                "             not executable (skipped): {}",
                h.not_executable.join(" ")
            );
        }
    }
    if let Some(n) = &v.network {
        if let Some(why) = &n.dataplane {
            println!("dataplane:   {why}");
        }
        println!(
            "egress:      {} TCP connections, {} UDP flows",
            n.tcp_connections, n.udp_flows
        );
        if n.denied.is_empty() {
            println!("denied:      none");
        } else {
            let parts: Vec<String> = n.denied.iter().map(|(k, c)| format!("{k} {c}")).collect();
            println!(
                "denied:      {} (details in the supervisor log)",
                parts.join(", ")
            );
        }
    }
}

fn print_share(s: &crate::share::ShareView) {
    // Sizes as the Migrantfile writes them (`size = "10G"`).
    use crate::size::as_written as human;
    let guest = s.guest.as_deref().unwrap_or("(not mounted by migrant)");
    let state = if !s.isolation {
        "plain folder, no cap".to_string()
    } else {
        format!(
            "{} used of {}",
            s.used.map(human).unwrap_or_else(|| "?".into()),
            s.cap.map(human).unwrap_or_else(|| "?".into())
        )
    };
    println!("share:       {} {} -> {guest}: {state}", s.tag, s.host);
}

pub fn status(p: &Project, json: bool) -> Result<u8> {
    let l = live(&p.vm)?;
    let mut v = view(&p.cfg.name, &l, &p.cfg.dir.display().to_string());
    v.shares = crate::share::views(&p.cfg);
    v.hooks = Some(crate::provision::hooks::present(&p.cfg.dir));
    if p.vm.disk().exists() {
        v.disk = Some(p.vm.disk().display().to_string());
    }
    v.snapshot = super::disk::snapshot_summary(&p.vm);
    if let Live::Active(r) | Live::Stopped(r) = &l {
        let now = if matches!(l, Live::Active(_)) {
            super::drift::When::Running
        } else {
            super::drift::When::Stopped
        };
        v.pending = super::drift::pending_changes(p, r, now);
    }
    // The guest has the IPv6 address its seed gave it, if IPv6 is on.
    if matches!(l, Live::Active(_))
        && let Some(net6) = p.cfg.net6()
        && super::drift::built_with_ipv6(&p.vm) == Some(true)
    {
        v.ipv6 = Some(net6.guest.to_string());
    }
    if matches!(l, Live::Active(_))
        && let Ok(Response::Status { network, .. }) = control::request(
            &p.vm.control_sock(),
            &Request::Status,
            Duration::from_secs(10),
        )
    {
        v.network = Some(network);
    }
    if matches!(l, Live::Active(_)) && p.cfg.network.wireguard.is_some() {
        v.wireguard = Some(
            super::wg::summary(p)
                .unwrap_or_else(|| "DOWN: the tunnel process is gone; no egress".into()),
        );
        v.dns = super::wg::dns_summary(p);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        print_view(&v);
    }
    Ok(0)
}

pub fn list(json: bool) -> Result<u8> {
    let paths = Paths::from_env();
    let mut views = Vec::new();
    if let Ok(rd) = std::fs::read_dir(paths.vms()) {
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for name in names {
            let vm = paths.vm(&name);
            let l = live(&vm)?;
            if l == Live::NotCreated {
                continue;
            }
            let mut v = view(&name, &l, "");
            v.orphan = orphaned(&name, &l);
            views.push(v);
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&views).unwrap_or_default()
        );
    } else if views.is_empty() {
        println!("no VMs");
    } else {
        println!("{:<24} {:<12} {:<15} PROJECT", "NAME", "STATE", "IP");
        for v in views {
            let orphan = v
                .orphan
                .as_ref()
                .map(|why| format!("  ({why}: `migrant destroy --name {}` removes it)", v.name))
                .unwrap_or_default();
            println!(
                "{:<24} {:<12} {:<15} {}{orphan}",
                v.name,
                v.state,
                v.ip.as_deref().unwrap_or("-"),
                v.project
            );
        }
    }
    Ok(0)
}

pub fn ip(p: &Project) -> Result<u8> {
    match live(&p.vm)? {
        Live::Active(r) => {
            println!("{}", r.guest_ip);
            Ok(0)
        }
        _ => Err(crate::runstate::Refusal::not_running(&p.cfg.name, "").into()),
    }
}

pub fn info(p: &Project, json: bool) -> Result<u8> {
    if !matches!(live(&p.vm)?, Live::Active(_)) {
        return Err(crate::runstate::Refusal::not_running(&p.cfg.name, "").into());
    }
    let resp = control::request(
        &p.vm.control_sock(),
        &Request::Info,
        Duration::from_secs(30),
    )?;
    let Response::Info(i) = resp else {
        return Err(crate::runstate::Refusal::UnexpectedAnswer.into());
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&i).unwrap_or_default());
    } else {
        println!("name:           {}", p.cfg.name);
        println!("state:          {}", i.status);
        println!(
            "accelerator:    {}{}",
            i.accelerator,
            if i.kvm_enabled { " (KVM enabled)" } else { "" }
        );
        println!("cpus:           {}", i.cpus);
        println!("memory:         {} MiB", i.memory_bytes / (1024 * 1024));
        println!("ip:             {}", i.guest_ip);
        println!(
            "qemu pid:       {}",
            i.qemu_pid
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into())
        );
        println!("qemu user:      {}", i.qemu_user);
        println!("supervisor pid: {}", i.supervisor_pid);
        println!("uptime:         {} s", i.uptime_secs);
    }
    Ok(0)
}
