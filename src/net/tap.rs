//! The guest's TAP device and the addresses inside the VM's namespace.

use std::fs::{File, OpenOptions};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

/// Name of the TAP device inside the VM's namespace (every VM has its own
/// namespace, so every VM can use the same name).
pub const TAP_NAME: &str = "tap0";

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("cannot open /dev/net/tun (is the tun module loaded?)")]
    Open(#[source] std::io::Error),
    #[error("cannot create TAP device {0}")]
    Create(String, #[source] std::io::Error),
    #[error("netlink: {0}")]
    Netlink(String),
    #[error("no interface named {0}")]
    NoSuchInterface(String),
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Create the TAP device `name` in the current thread's namespace, with
/// virtio-net headers so QEMU can offload checksums and segmentation.
pub fn create_tap(name: &str) -> Result<File, TapError> {
    create_dev(
        name,
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
    )
}

/// Create the TUN device `name` (bare IP packets, no headers) in the
/// current thread's namespace. It vanishes when the descriptor is closed.
pub fn create_tun(name: &str) -> Result<File, TapError> {
    create_dev(name, (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short)
}

fn create_dev(name: &str, flags: libc::c_short) -> Result<File, TapError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(TapError::Open)?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags,
        _pad: [0; 22],
    };
    for (dst, src) in req
        .name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = src as libc::c_char;
    }
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `IfReq` has the
    // same size and layout (name, then the flags union member) and lives
    // for the duration of the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(TapError::Create(
            name.to_string(),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(file)
}

fn index_of(name: &str) -> Result<u32, TapError> {
    nix::net::if_::if_nametoindex(name).map_err(|_| TapError::NoSuchInterface(name.to_string()))
}

/// The gateway's MAC address in every VM's namespace (locally
/// administered, unicast; each VM has a link of its own).
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0x6d, 0x67, 0x00, 0x00, 0x01];

/// In the current thread's namespace: bring `lo` up, give `tap` the
/// gateway address and bring it up. Runs its own small runtime because
/// the netlink socket must be created in this thread's namespace.
///
/// With `net6` the gateway also gets its IPv6 address on `tap` (no
/// duplicate address detection, no router advertisements accepted: the
/// guest's address is static, from the seed); without it the namespace
/// has no IPv6 at all.
pub fn configure(
    tap: &str,
    gateway: Ipv4Addr,
    prefix: u8,
    net6: Option<crate::config::Net6>,
    tproxy: bool,
) -> Result<(), TapError> {
    let off: &[u8] = if net6.is_some() { b"0" } else { b"1" };
    for key in ["all", "default", tap] {
        ipv6_sysctl(key, "disable_ipv6", off)?;
    }
    if net6.is_some() {
        for name in ["accept_dad", "accept_ra", "autoconf", "forwarding"] {
            ipv6_sysctl(tap, name, b"0")?;
        }
    }
    let lo = index_of("lo")?;
    let tap_idx = index_of(tap)?;
    with_netlink(|handle| async move {
        // The gateway's MAC is the same at every start: a guest resumed
        // from a memory snapshot still has it in its ARP cache.
        handle
            .link()
            .set(
                rtnetlink::LinkUnspec::new_with_index(tap_idx)
                    .address(GATEWAY_MAC.to_vec())
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| TapError::Netlink(format!("gateway MAC: {e}")))?;
        for idx in [lo, tap_idx] {
            handle
                .link()
                .set(rtnetlink::LinkUnspec::new_with_index(idx).up().build())
                .execute()
                .await
                .map_err(|e| TapError::Netlink(format!("link {idx} up: {e}")))?;
        }
        handle
            .address()
            .add(tap_idx, gateway.into(), prefix)
            .execute()
            .await
            .map_err(|e| TapError::Netlink(format!("address {gateway}/{prefix}: {e}")))?;
        if let Some(n) = net6 {
            let p = crate::config::Net6::PREFIX;
            handle
                .address()
                .add(tap_idx, n.gateway.into(), p)
                .execute()
                .await
                .map_err(|e| TapError::Netlink(format!("address {}/{p}: {e}", n.gateway)))?;
        }
        if tproxy {
            tproxy_routing(&handle, lo, Ipv4Addr::UNSPECIFIED.into()).await?;
            if net6.is_some() {
                tproxy_routing(&handle, lo, std::net::Ipv6Addr::UNSPECIFIED.into()).await?;
            }
        }
        Ok(())
    })
}

/// In the current thread's namespace: give the TUN `name` its address and
/// MTU, bring it up and route each of `routes` into it.
///
/// With `v6` (`ipv6 = true`) also its IPv6 address and IPv6 routes.
pub fn configure_tun(
    name: &str,
    address: ipnet::Ipv4Net,
    mtu: u16,
    routes: &[ipnet::Ipv4Net],
    v6: Option<&(ipnet::Ipv6Net, Vec<ipnet::Ipv6Net>)>,
) -> Result<(), TapError> {
    let idx = index_of(name)?;
    if v6.is_some() {
        for key in ["disable_ipv6", "accept_dad", "accept_ra"] {
            ipv6_sysctl(name, key, b"0")?;
        }
    }
    with_netlink(|handle| async move {
        handle
            .link()
            .set(
                rtnetlink::LinkUnspec::new_with_index(idx)
                    .mtu(u32::from(mtu))
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| TapError::Netlink(format!("{name} up: {e}")))?;
        handle
            .address()
            .add(idx, address.addr().into(), address.prefix_len())
            .execute()
            .await
            .map_err(|e| TapError::Netlink(format!("address {address}: {e}")))?;
        let routes6 = v6.map(|(_, r)| r.as_slice()).unwrap_or_default();
        let nets = routes
            .iter()
            .map(|n| ipnet::IpNet::from(*n))
            .chain(routes6.iter().map(|n| ipnet::IpNet::from(*n)));
        if let Some((address6, _)) = v6 {
            handle
                .address()
                .add(idx, address6.addr().into(), address6.prefix_len())
                .execute()
                .await
                .map_err(|e| TapError::Netlink(format!("address {address6}: {e}")))?;
        }
        for net in nets {
            let route = rtnetlink::RouteMessageBuilder::<std::net::IpAddr>::new()
                .destination_prefix(net.network(), net.prefix_len())
                .map_err(|e| TapError::Netlink(format!("route {net}: {e}")))?
                .output_interface(idx)
                .build();
            match handle.route().add(route).execute().await {
                Ok(()) => {}
                // The interface address's own subnet route already
                // covers an AllowedIPs entry equal to it.
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {}
                Err(e) => return Err(TapError::Netlink(format!("route {net}: {e}"))),
            }
        }
        Ok(())
    })
}

/// Run `work` with a netlink handle of the current thread's namespace, on
/// a runtime of its own (these run on threads that entered a namespace,
/// outside any runtime); the connection ends with it.
fn with_netlink<F, Fut>(work: F) -> Result<(), TapError>
where
    F: FnOnce(rtnetlink::Handle) -> Fut,
    Fut: std::future::Future<Output = Result<(), TapError>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| TapError::Netlink(e.to_string()))?;
    rt.block_on(async move {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| TapError::Netlink(e.to_string()))?;
        let task = tokio::spawn(conn);
        let result = work(handle).await;
        task.abort();
        result
    })
}

/// Set `/proc/sys/net/ipv6/conf/<iface>/<key>` of the current thread's
/// namespace, if the kernel has it (a host without IPv6 has none).
fn ipv6_sysctl(iface: &str, key: &str, value: &[u8]) -> Result<(), TapError> {
    let path = format!("/proc/sys/net/ipv6/conf/{iface}/{key}");
    if !std::path::Path::new(&path).exists() {
        return Ok(());
    }
    std::fs::write(&path, value).map_err(|e| TapError::Netlink(format!("{path}: {e}")))
}

/// Packets the ruleset marked for the proxy are delivered locally
/// whatever their destination: a policy rule for the mark and a `local`
/// default route in its table, for the family of `any`.
async fn tproxy_routing(
    handle: &rtnetlink::Handle,
    lo: u32,
    any: std::net::IpAddr,
) -> Result<(), TapError> {
    let rule = handle.rule().add();
    let added = match any {
        std::net::IpAddr::V4(_) => {
            rule.v4()
                .fw_mark(super::nft::TPROXY_MARK)
                .table_id(super::nft::TPROXY_TABLE)
                .action(rtnetlink::packet_route::rule::RuleAction::ToTable)
                .execute()
                .await
        }
        std::net::IpAddr::V6(_) => {
            rule.v6()
                .fw_mark(super::nft::TPROXY_MARK)
                .table_id(super::nft::TPROXY_TABLE)
                .action(rtnetlink::packet_route::rule::RuleAction::ToTable)
                .execute()
                .await
        }
    };
    added.map_err(|e| TapError::Netlink(format!("tproxy rule ({any}): {e}")))?;
    let route = rtnetlink::RouteMessageBuilder::<std::net::IpAddr>::new()
        .destination_prefix(any, 0)
        .map_err(|e| TapError::Netlink(format!("tproxy route ({any}): {e}")))?
        .output_interface(lo)
        .table_id(super::nft::TPROXY_TABLE)
        .kind(rtnetlink::packet_route::route::RouteType::Local)
        .scope(rtnetlink::packet_route::route::RouteScope::Host)
        .build();
    handle
        .route()
        .add(route)
        .execute()
        .await
        .map_err(|e| TapError::Netlink(format!("tproxy route ({any}): {e}")))
}
