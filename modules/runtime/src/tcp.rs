//! A TCP data plane for modules that speak their own protocol over plain connections (the RTMP
//! module, the echo): every listener accepts, each connection is counted in [`Stats`] while it
//! is open, the client's address comes from the PROXY v2 header on `+proxy` listeners, the rate
//! limiter is asked per client (a refused client's connection is closed: that is how L4 says no),
//! and accepting stops when the runtime drains (open connections finish on their own).

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpStream, task::JoinSet};
use tracing::debug;

use crate::{DataListener, DataPlane, ModuleError, Stats, Stopping, Subject, Verdict};

/// How long a client on a `+proxy` listener may take to send its PROXY header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves every listener of `plane` with `on_connection(stream, client, stats)` until the
/// runtime stops accepting.
pub async fn serve<F, Fut>(plane: DataPlane, on_connection: F) -> Result<(), ModuleError>
where
    F: Fn(TcpStream, SocketAddr, Arc<Stats>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let DataPlane {
        listeners,
        stats,
        limiter,
        mut stopping,
    } = plane;
    let mut accepting = JoinSet::new();
    for data in listeners {
        let (stats, limiter, mut stopping, on_connection) = (
            Arc::clone(&stats),
            Arc::clone(&limiter),
            stopping.clone(),
            on_connection.clone(),
        );
        accepting.spawn(async move {
            while let Some((mut stream, peer)) = accept(&data, &mut stopping).await {
                let (stats, limiter, on_connection) = (
                    Arc::clone(&stats),
                    Arc::clone(&limiter),
                    on_connection.clone(),
                );
                let proxy_protocol = data.proxy_protocol;
                tokio::spawn(async move {
                    let _open = stats.connection();
                    let Some(client) = client_address(&mut stream, peer, proxy_protocol).await
                    else {
                        return;
                    };
                    let subject = Subject {
                        client_ip: Some(client.ip()),
                        ..Subject::default()
                    };
                    if let Verdict::Limited { limit_id, .. } = limiter.check(&subject) {
                        debug!(%client, limit = %limit_id, "connection refused by rate limit");
                        stats.rate_limited();
                        return;
                    }
                    on_connection(stream, client, Arc::clone(&stats)).await;
                });
            }
        });
    }
    stopping.wait().await;
    while accepting.join_next().await.is_some() {}
    Ok(())
}

/// The next connection on `data`, or None once the runtime stops accepting.
pub(crate) async fn accept(
    data: &DataListener,
    stopping: &mut Stopping,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            accepted = data.listener.accept() => accepted,
            () = stopping.wait() => return None,
        };
        match accepted {
            Ok(accepted) => return Some(accepted),
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                debug!(%error, listener = %data.addr, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The client's address: from the PROXY v2 header on `+proxy` listeners (None, after logging,
/// when it does not come), else the peer's.
pub(crate) async fn client_address(
    stream: &mut TcpStream,
    peer: SocketAddr,
    proxy_protocol: bool,
) -> Option<SocketAddr> {
    if !proxy_protocol {
        return Some(peer);
    }
    match marchproxy::proxy_protocol::read(stream, HEADER_TIMEOUT).await {
        Ok(client) => Some(client.unwrap_or(peer)),
        Err(error) => {
            debug!(%peer, %error, "connection closed");
            None
        }
    }
}
