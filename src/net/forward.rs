//! Host → guest forwards: a listener on the host side (a 0600 unix socket)
//! whose connections the supervisor carries into the VM's namespace.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpStream, UnixListener};

use super::netns::NetNs;

/// Open a TCP connection to `target` from inside the VM's namespace.
pub async fn connect_in(
    ns: &Arc<NetNs>,
    target: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let ns = Arc::clone(ns);
    let std_stream = tokio::task::spawn_blocking(move || {
        ns.run(|| std::net::TcpStream::connect_timeout(&target, timeout))
            .map_err(std::io::Error::other)?
    })
    .await
    .map_err(std::io::Error::other)??;
    std_stream.set_nonblocking(true)?;
    TcpStream::from_std(std_stream)
}

/// Whether an SSH server answers at `target`: connect and read its
/// identification string.
pub async fn ssh_banner(ns: &Arc<NetNs>, target: SocketAddr) -> bool {
    let Ok(mut s) = connect_in(ns, target, Duration::from_secs(2)).await else {
        return false;
    };
    let mut buf = [0u8; 8];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await,
        Ok(Ok(_)) if buf.starts_with(b"SSH-")
    )
}

/// Serve `listener` forever: each connection is relayed to `target`
/// inside the namespace, both directions, half-close respected.
pub async fn serve_unix(listener: UnixListener, ns: Arc<NetNs>, target: SocketAddr) {
    loop {
        let (mut client, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("forward to {target}: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ns = Arc::clone(&ns);
        tokio::spawn(async move {
            match connect_in(&ns, target, Duration::from_secs(10)).await {
                Ok(mut upstream) => {
                    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await
                    {
                        tracing::debug!("forward to {target}: {e}");
                    }
                }
                Err(e) => tracing::info!("forward to {target}: connect: {e}"),
            }
        });
    }
}
