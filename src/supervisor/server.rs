//! The control socket's server: status, info, resume, resize and halt
//! requests from later commands, answered from QMP and the dataplane.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};

use super::control::{Info, Request, Response};
use crate::net::dataplane;
use crate::net::netns::NetNs;
use crate::qemu::{self, Accelerator, qmp::Qmp};
use crate::state::{self, Record};

pub(super) enum Control {
    Halt {
        force: bool,
        timeout: Duration,
        done: oneshot::Sender<Response>,
        /// Fired once the answer was written to the client.
        flushed: oneshot::Receiver<()>,
    },
    SaveMemory {
        stop: bool,
        done: oneshot::Sender<Response>,
        flushed: oneshot::Receiver<()>,
    },
}

pub(super) struct Shared {
    pub(super) qmp: Qmp,
    pub(super) rec: Record,
    pub(super) accel: Accelerator,
    pub(super) qemu_pid: Option<u32>,
    pub(super) hub: Arc<dataplane::parent::Hub>,
    pub(super) ns: Arc<NetNs>,
}

pub(super) async fn serve_control(
    listener: tokio::net::UnixListener,
    shared: Arc<Shared>,
    ctl: mpsc::Sender<Control>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = Arc::clone(&shared);
        let ctl = ctl.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let (flushed_tx, flushed_rx) = oneshot::channel();
                let resp = match serde_json::from_str::<Request>(&line) {
                    Ok(req) => handle(req, &shared, &ctl, flushed_rx).await,
                    Err(e) => Response::Error {
                        message: format!("bad request: {e}"),
                    },
                };
                let mut out = serde_json::to_vec(&resp).unwrap_or_default();
                out.push(b'\n');
                let written = w.write_all(&out).await;
                let _ = w.flush().await;
                let _ = flushed_tx.send(());
                if written.is_err() {
                    break;
                }
            }
        });
    }
}

/// The proxy's counters plus the refusals nftables counted itself
/// (connections to closed gateway ports never reach the proxy, spoofed
/// packets are dropped before it).
async fn network_view(shared: &Shared) -> dataplane::stats::StatsView {
    use crate::net::{dataplane::policy::Denial, nft};
    let mut view = shared.hub.stats().await;
    if !shared.hub.running() {
        view.dataplane = Some("stopped; nothing leaves the VM until it is started again".into());
    }
    let ns = Arc::clone(&shared.ns);
    let read = tokio::task::spawn_blocking(move || {
        ns.run(|| nft::read_counters([nft::GATEWAY_REFUSED, nft::SPOOFED, nft::MULTICAST]))
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r.map_err(|e| e.to_string()))
    .and_then(|r| r.map_err(|e| e.to_string()));
    match read {
        Ok(counts) => {
            for (n, why) in counts.into_iter().zip([
                Denial::GatewayPort,
                Denial::SpoofedSource,
                Denial::Multicast,
            ]) {
                if n > 0 {
                    *view.denied.entry(why.as_str().to_string()).or_default() += n;
                }
            }
        }
        Err(e) => tracing::warn!("reading nftables' counters: {e}"),
    }
    view
}

async fn handle(
    req: Request,
    shared: &Shared,
    ctl: &mpsc::Sender<Control>,
    flushed: oneshot::Receiver<()>,
) -> Response {
    match req {
        Request::Status => match shared.qmp.run(qapi::qmp::query_status {}).await {
            Ok(s) => {
                let network = network_view(shared).await;
                Response::Status {
                    state: format!("{:?}", s.status).to_lowercase(),
                    lease_seen: *shared.hub.lease.borrow(),
                    network,
                }
            }
            Err(e) => Response::Error {
                message: e.to_string(),
            },
        },
        Request::Info => match info(shared).await {
            Ok(i) => Response::Info(i),
            Err(e) => Response::Error {
                message: e.to_string(),
            },
        },
        Request::Resume => match shared.qmp.run(qapi::qmp::cont {}).await {
            Ok(_) => Response::Done,
            Err(e) => Response::Error {
                message: e.to_string(),
            },
        },
        Request::Resize { size } => resize(shared, size).await,
        Request::Halt {
            force,
            timeout_secs,
        } => {
            let (done, wait) = oneshot::channel();
            let sent = ctl
                .send(Control::Halt {
                    force,
                    timeout: Duration::from_secs(timeout_secs),
                    done,
                    flushed,
                })
                .await;
            if sent.is_err() {
                return Response::Error {
                    message: "the VM is already stopping".into(),
                };
            }
            wait.await.unwrap_or(Response::Done)
        }
        Request::SaveMemory { stop } => {
            let (done, wait) = oneshot::channel();
            if ctl
                .send(Control::SaveMemory {
                    stop,
                    done,
                    flushed,
                })
                .await
                .is_err()
            {
                return Response::Error {
                    message: "the VM is stopping".into(),
                };
            }
            wait.await.unwrap_or(Response::Error {
                message: "the VM stopped during the snapshot".into(),
            })
        }
    }
}

/// The drive id of the VM's disk on QEMU's command line.
const DISK_DRIVE: &str = "disk0";

/// Grow the disk live; never shrink it.
async fn resize(shared: &Shared, size: u64) -> Response {
    let blocks = match shared.qmp.run(qapi::qmp::query_block {}).await {
        Ok(b) => b,
        Err(e) => {
            return Response::Error {
                message: e.to_string(),
            };
        }
    };
    let Some(current) = blocks
        .iter()
        .find(|b| b.device == DISK_DRIVE)
        .and_then(|b| b.inserted.as_ref())
        .map(|i| u64::try_from(i.image.base.virtual_size).unwrap_or(0))
    else {
        return Response::Error {
            message: format!("QEMU reports no drive {DISK_DRIVE}"),
        };
    };
    if size < current {
        return Response::Error {
            message: format!("shrinking is refused: the disk is {current} bytes, {size} requested"),
        };
    }
    if size == current {
        return Response::Resized {
            from: current,
            to: current,
        };
    }
    let Ok(bytes) = i64::try_from(size) else {
        return Response::Error {
            message: format!("{size} bytes is too large"),
        };
    };
    let cmd = qapi::qmp::block_resize {
        device: Some(DISK_DRIVE.to_string()),
        node_name: None,
        size: bytes,
    };
    match shared.qmp.run(cmd).await {
        Ok(_) => {
            tracing::info!("disk grown from {current} to {size} bytes");
            Response::Resized {
                from: current,
                to: size,
            }
        }
        Err(e) => Response::Error {
            message: format!("block_resize: {e}"),
        },
    }
}

async fn info(shared: &Shared) -> Result<Info, qemu::qmp::QmpError> {
    let status = shared.qmp.run(qapi::qmp::query_status {}).await?;
    let kvm = shared.qmp.run(qapi::qmp::query_kvm {}).await?;
    let cpus = shared.qmp.run(qapi::qmp::query_cpus_fast {}).await?;
    let mem = shared
        .qmp
        .run(qapi::qmp::query_memory_size_summary {})
        .await?;
    Ok(Info {
        status: format!("{:?}", status.status).to_lowercase(),
        running: status.running,
        accelerator: shared.accel.as_str().to_string(),
        kvm_enabled: kvm.enabled,
        cpus: cpus.len(),
        memory_bytes: mem.base_memory,
        qemu_pid: shared.qemu_pid,
        supervisor_pid: std::process::id(),
        qemu_user: shared.rec.qemu_user.clone().unwrap_or_default(),
        uptime_secs: shared
            .rec
            .started_at
            .map(|t| state::now().saturating_sub(t))
            .unwrap_or(0),
        guest_ip: shared.rec.guest_ip.to_string(),
        lease_seen: *shared.hub.lease.borrow(),
    })
}
