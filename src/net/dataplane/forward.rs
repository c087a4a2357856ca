//! Host → guest forwards: a listener on the host side (a 0600 unix socket)
//! whose connections the supervisor carries into the VM's namespace.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpStream, UnixListener};

use crate::net::netns::NsSockets;

/// Open a TCP connection to `target` from inside the VM's namespace.
pub async fn connect_in(
    ns: &NsSockets,
    target: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    tokio::time::timeout(timeout, ns.connect(target))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// Whether an SSH server answers at `target`: connect and read its
/// identification string.
pub async fn ssh_banner(ns: &NsSockets, target: SocketAddr) -> bool {
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
pub async fn serve_unix(listener: UnixListener, ns: Arc<NsSockets>, target: SocketAddr) {
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
