//! `migrant __netlab` (benchmarks, tests): a VM's network without the
//! VM. The namespace a caller made, set up as the supervisor sets up a
//! VM's (the same plan, ruleset and sockets), with the same confined
//! dataplane child and, in WireGuard mode, the same tunnel.

use std::sync::Arc;

use crate::net::dataplane::{self, Start, parent};
use crate::net::netns::NetNs;
use crate::net::plan::NetPlan;
use crate::net::{setup, tap};

/// The overflow id, `nobody` on Debian.
const NOBODY: u32 = 65_534;

/// `migrant __netlab`: the dataplane of the project at `project` on the
/// interface `tap0` of the namespace at `netns`, until SIGTERM or SIGINT;
/// the same confined child a VM gets.
pub fn netlab(
    netns: &std::path::Path,
    project: &std::path::Path,
) -> Result<(), Box<dyn std::error::Error>> {
    dataplane::raise_fd_limit();
    let cfg = crate::config::load(project)?;
    let ns = Arc::new(NetNs::open(netns)?);
    let wg = crate::wireguard::plan_for(&cfg)?;
    let net = NetPlan::of(
        &cfg,
        wg.as_ref().map(crate::wireguard::Plan::net),
        setup::host_upstreams(),
    );
    let (sockets, tun) = ns
        .run(|| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
            let tun = wg
                .as_ref()
                .map(crate::wireguard::create_tun_in_ns)
                .transpose()?;
            Ok((setup::setup_in_ns(tap::TAP_NAME, &net)?, tun))
        })?
        .map_err(|e| e as Box<dyn std::error::Error>)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let exe = std::env::current_exe()?;
        // The dataplane and tunnel drop to `nobody` (the caller, root in a
        // benchmark, made the namespace).
        let identity = crate::qemu::process::Identity {
            name: "nobody".into(),
            uid: nix::unistd::Uid::from_raw(NOBODY),
            gid: nix::unistd::Gid::from_raw(NOBODY),
            groups: Vec::new(),
        };
        // WireGuard mode: the same tunnel a VM would get.
        let mut tunnel = None;
        let wg_log =
            std::env::temp_dir().join(format!("migrant-netlab-wg-{}.log", std::process::id()));
        if let (Some(plan), Some(tun)) = (&wg, tun) {
            let udp = crate::wireguard::bind_udp(plan)?;
            tunnel = Some(
                crate::wireguard::bring_up(
                    &exe,
                    (plan, tun, udp),
                    &identity,
                    &wg_log,
                    cfg.network.wireguard_timeout,
                )
                .await?,
            );
        }
        let mut plan = dataplane::Plan::new(
            &cfg.name,
            net,
            crate::state::Mac([0x52, 0x54, 0x00, 0x6e, 0x6c, 0x01]),
            &identity,
            &std::env::temp_dir(),
        );
        // No VM to journal for.
        plan.journal = false;
        // Secrets: an authority and placeholders of this run's own (no VM
        // keeps them), the values read as `up` reads them; the authority's
        // certificate is written beside the Migrantfile for the benchmark's
        // clients, the placeholders printed.
        if !cfg.secrets.is_empty() {
            let values = crate::secrets::read_all(&cfg)?;
            let made = crate::secrets::vm::VmSecrets::make(&cfg)?;
            std::fs::write(project.join("netlab-ca.pem"), &made.authority.cert_pem)?;
            for p in &made.placeholders {
                println!("placeholder {} {}", p.name, p.text);
            }
            let roots = crate::secrets::upstream_roots()?;
            plan.broker = Some(dataplane::broker::Plan::new(&made, values, &roots));
        }
        let hub = parent::Hub::new(None);
        let kept = parent::Kept { sockets, ssh: None };
        let mut plane =
            parent::start(&exe, project, &plan, Start::default(), &kept, &ns, &hub).await?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        println!("ready");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            status = plane.child.wait() => {
                return Err(format!("the dataplane exited: {status:?}").into());
            }
        }
        eprintln!("{:?}", hub.stats().await);
        hub.ask(dataplane::link::ROUTE_COST_REQUEST).await;
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        if let Some(t) = &tunnel {
            eprintln!("{:?}", *t.reports.borrow());
        }
        if wg.is_some() {
            let _ = std::fs::remove_file(&wg_log);
        }
        Ok(())
    })
}
