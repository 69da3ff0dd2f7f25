//! A TCP data plane for modules that speak their own protocol over plain connections (the RTMP
//! module, the DBLB, the echo): every listener accepts, each connection is counted in [`Stats`]
//! while it is open, the client's address comes from the PROXY v2 header on `+proxy` listeners,
//! the rate limiter is asked per client (a refused client's connection is closed, which is how
//! L4 says no, or answered in the protocol's words by [`serve_refusing`]), and accepting stops
//! when the runtime drains (open connections finish on their own).

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use marchproxy::pb;
use tokio::{net::TcpStream, task::JoinSet};
use tracing::debug;

use crate::{DataListener, DataPlane, ModuleError, Stats, Stopping, Subject, Verdict};

/// How long a client on a `+proxy` listener may take to send its PROXY header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a connection came in: the listener's address and the protocol `--listen` named.
#[derive(Clone, Copy, Debug)]
pub struct Listening {
    pub addr: SocketAddr,
    pub protocol: Option<pb::Protocol>,
}

/// A connection past its PROXY header, counted in `stats` while this value lives.
pub struct Accepted {
    pub stream: TcpStream,
    /// The client (from the PROXY header on `+proxy` listeners).
    pub client: SocketAddr,
    pub listener: Listening,
    pub stats: Arc<Stats>,
}

/// Serves every listener of `plane` with `on_connection` until the runtime stops accepting;
/// a client over its rate limit is closed at once.
pub async fn serve<F, Fut>(plane: DataPlane, on_connection: F) -> Result<(), ModuleError>
where
    F: Fn(Accepted) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    serve_refusing(plane, on_connection, |_, _| async {}).await
}

/// As [`serve`], with `on_refused(connection, retry_after)` answering a client over its rate
/// limit in the protocol's own words before the connection closes.
pub async fn serve_refusing<F, Fut, R, RFut>(
    plane: DataPlane,
    on_connection: F,
    on_refused: R,
) -> Result<(), ModuleError>
where
    F: Fn(Accepted) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
    R: Fn(Accepted, Duration) -> RFut + Clone + Send + Sync + 'static,
    RFut: Future<Output = ()> + Send + 'static,
{
    let DataPlane {
        listeners,
        stats,
        limiter,
        mut stopping,
    } = plane;
    let mut accepting = JoinSet::new();
    for data in listeners {
        let (stats, limiter, mut stopping, on_connection, on_refused) = (
            Arc::clone(&stats),
            Arc::clone(&limiter),
            stopping.clone(),
            on_connection.clone(),
            on_refused.clone(),
        );
        let listener = Listening {
            addr: data.addr,
            protocol: data.protocol,
        };
        accepting.spawn(async move {
            while let Some((mut stream, peer)) = accept(&data, &mut stopping).await {
                let (stats, limiter, on_connection, on_refused) = (
                    Arc::clone(&stats),
                    Arc::clone(&limiter),
                    on_connection.clone(),
                    on_refused.clone(),
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
                    let verdict = limiter.check(&subject);
                    let accepted = Accepted {
                        stream,
                        client,
                        listener,
                        stats: Arc::clone(&stats),
                    };
                    match verdict {
                        Verdict::Limited {
                            limit_id,
                            retry_after,
                        } => {
                            debug!(%client, limit = %limit_id, "connection refused by rate limit");
                            stats.rate_limited();
                            on_refused(accepted, retry_after).await;
                        }
                        Verdict::Allowed => on_connection(accepted).await,
                    }
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
