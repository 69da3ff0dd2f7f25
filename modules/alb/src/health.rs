//! Active health checks: for each pool that has a `health_check_path`, one task GETs that path
//! on every server each interval (all servers at once, each within the timeout) and feeds the
//! results to the servers' thresholds. The task holds the pool weakly: when a routing change
//! replaces the pool, the old task ends by itself and the new pool's task takes over.

use std::{
    sync::{Arc, Weak},
    time::Duration,
};

use axum::{
    body::Body,
    http::{Request, header},
};

use crate::{pool::Pool, proxy::UpstreamClient, table::Table};

/// Starts a checker for every pool of `table` that asks for one.
pub fn start(table: &Table, client: &UpstreamClient) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    for route in &table.routes {
        if route.pool.health.is_some() {
            runtime.spawn(check_forever(
                Arc::downgrade(&route.pool),
                route.policy.upstream_scheme,
                client.clone(),
            ));
        }
    }
}

async fn check_forever(pool: Weak<Pool>, scheme: &'static str, client: UpstreamClient) {
    loop {
        let Some(current) = pool.upgrade() else {
            return;
        };
        let Some(check) = current.health.clone() else {
            return;
        };
        let path = check.health_check_path.clone().unwrap_or_default();
        let mut round = tokio::task::JoinSet::new();
        for index in 0..current.servers.len() {
            let (pool, client, path, check) = (
                Arc::clone(&current),
                client.clone(),
                path.clone(),
                check.clone(),
            );
            round.spawn(async move {
                let server = &pool.servers[index];
                let result = probe(&client, scheme, &server.address, &path, check.timeout()).await;
                let detail = match &result {
                    Ok(status) => format!("GET {path} answered {status}"),
                    Err(problem) => problem.clone(),
                };
                let passed = result.is_ok_and(|status| (200..400).contains(&status));
                if let Some(healthy) = server.checked(passed, &check) {
                    pool.log_verdict(server, healthy, &detail);
                }
            });
        }
        drop(current);
        while round.join_next().await.is_some() {}
        tokio::time::sleep(check.interval()).await;
    }
}

async fn probe(
    client: &UpstreamClient,
    scheme: &str,
    address: &str,
    path: &str,
    timeout: Duration,
) -> Result<u16, String> {
    let request = Request::get(format!("{scheme}://{address}{path}"))
        .header(header::USER_AGENT, "marchproxy-alb-health-check")
        .body(Body::empty())
        .map_err(|e| format!("health check request: {e}"))?;
    match tokio::time::timeout(timeout, client.request(request)).await {
        Ok(Ok(response)) => Ok(response.status().as_u16()),
        Ok(Err(error)) => Err(format!("GET {path} failed: {error}")),
        Err(_) => Err(format!(
            "GET {path} took longer than {} ms",
            timeout.as_millis()
        )),
    }
}
