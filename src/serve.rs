//! The gRPC services every MarchProxy server answers beside its own: `grpc.health.v1` (open to
//! all, for load balancers and orchestrators) and server reflection (behind the cluster key, like
//! the rest of the API).

use tonic::service::{Routes, interceptor::InterceptedService};
use tonic_health::server::HealthReporter;

use crate::{auth::RequireApiKey, pb};

/// Reflection could not be built from the compiled-in descriptors.
#[derive(Debug, thiserror::Error)]
#[error("cannot build gRPC reflection: {0}")]
pub struct ReflectionError(String);

/// Health (open) and reflection v1 and v1alpha (guarded by `auth`), as routes to add services
/// to; the reporter sets each service's serving status.
pub fn standard_routes(auth: RequireApiKey) -> Result<(HealthReporter, Routes), ReflectionError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ReflectionError(e.to_string()))?;
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ReflectionError(e.to_string()))?;
    let routes = Routes::new(health)
        .add_service(InterceptedService::new(v1, auth.clone()))
        .add_service(InterceptedService::new(v1alpha, auth));
    Ok((reporter, routes))
}

/// A bound TCP listener and the address it got (port 0 resolved).
pub struct Bound {
    pub listener: tokio::net::TcpListener,
    pub addr: std::net::SocketAddr,
}

/// A listener could not be bound; says which and with which flag to move it.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({what}): {source}; pick a free address with {flag}")]
pub struct BindError {
    pub addr: std::net::SocketAddr,
    pub what: &'static str,
    pub flag: &'static str,
    pub source: std::io::Error,
}

/// Binds `addr` for `what`, configured by `flag`.
pub async fn bind(
    addr: std::net::SocketAddr,
    what: &'static str,
    flag: &'static str,
) -> Result<Bound, BindError> {
    let fail = |source| BindError {
        addr,
        what,
        flag,
        source,
    };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(fail)?;
    let addr = listener.local_addr().map_err(fail)?;
    Ok(Bound { listener, addr })
}

/// Waits until `open()` is 0 or `timeout` passes, waking on each `closed` notification (the
/// closer calls `notify_waiters` after lowering the count). Returns what is still open.
pub async fn drain(
    open: impl Fn() -> i64,
    closed: &tokio::sync::Notify,
    timeout: std::time::Duration,
) -> i64 {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        // Registered before reading the count, so a close in between is not missed.
        let woken = closed.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let left = open();
        if left <= 0 || tokio::time::Instant::now() >= deadline {
            return left.max(0);
        }
        tokio::select! {
            () = &mut woken => {}
            () = tokio::time::sleep_until(deadline) => {}
        }
    }
}

/// A server stream of `make()` every `interval` (the first at once), ending when the client goes
/// away or `stop` completes, so a graceful shutdown is never held open by a long-lived stream.
pub fn every<T: Send + 'static>(
    interval: std::time::Duration,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
    mut make: impl FnMut() -> T + Send + 'static,
) -> tokio_stream::wrappers::ReceiverStream<Result<T, tonic::Status>> {
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        tokio::pin!(stop);
        let mut ticks = tokio::time::interval(interval);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = &mut stop => return,
                () = sender.closed() => return,
            }
            if sender.send(Ok(make())).await.is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(receiver)
}

/// `stream` relayed until it ends, the client goes away, or `stop` completes.
pub fn until<T: Send + 'static>(
    mut stream: impl tokio_stream::Stream<Item = Result<T, tonic::Status>> + Send + Unpin + 'static,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio_stream::wrappers::ReceiverStream<Result<T, tonic::Status>> {
    use tokio_stream::StreamExt;
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        tokio::pin!(stop);
        loop {
            let item = tokio::select! {
                item = stream.next() => item,
                () = &mut stop => return,
            };
            let Some(item) = item else { return };
            if sender.send(item).await.is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(receiver)
}
