//! Keeping the NLB informed: register (retrying with capped backoff while the NLB is away),
//! heartbeat with live stats, register again when the NLB no longer knows this instance (it
//! restarted), and unregister with a drain on shutdown.

use std::{sync::Arc, time::Duration};

use marchproxy::{pb, time};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::shared::{NlbLink, Phase, Shared};

const FIRST_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(10);

/// Doubling delays from 200 ms to 10 s, each with up to 20 % random spread so restarted
/// modules do not knock on the NLB's door in step.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff { next: FIRST_RETRY }
    }

    fn step(&mut self) -> Duration {
        let spread = 0.8 + rand::random::<f64>() * 0.4;
        let delay = self.next.mul_f64(spread);
        self.next = (self.next * 2).min(MAX_RETRY);
        delay
    }
}

async fn register(shared: &Shared) -> Result<String, String> {
    let Some(link) = &shared.nlb else {
        return Err("no NLB configured".into());
    };
    let capabilities = [
        (
            "protocols".to_owned(),
            shared
                .module
                .protocols()
                .iter()
                .map(|p| marchproxy::names::protocol_name(*p))
                .collect::<Vec<_>>()
                .join(","),
        ),
        (
            "runtime_version".to_owned(),
            env!("CARGO_PKG_VERSION").to_owned(),
        ),
    ]
    .into();
    let mut instance = shared.instance();
    if shared.phase() != Phase::Stopping {
        // Serving already: the NLB may route here from the first moment.
        instance.health_status = pb::HealthStatus::Healthy as i32;
    }
    let request = pb::RegisterModuleRequest {
        instance: Some(instance),
        initial_routes: shared.routes().iter().map(pb::Route::from).collect(),
        health_config: shared.health_check.clone(),
        capabilities,
    };
    let used = link.at();
    let response = link
        .nlb()
        .register_module(request)
        .await
        .map_err(|status| failed(link, used, &status))?
        .into_inner();
    if !response.success {
        return Err(response.message);
    }
    Ok(response.registration_id)
}

async fn heartbeat(shared: &Shared, registration: &str) -> Result<pb::HeartbeatResponse, String> {
    let Some(link) = &shared.nlb else {
        return Err("no NLB configured".into());
    };
    let status = match shared.phase() {
        Phase::Stopping => pb::HealthStatus::Stopping,
        _ => pb::HealthStatus::Healthy,
    };
    let request = pb::HeartbeatRequest {
        instance_id: shared.instance_id.clone(),
        registration_id: registration.to_owned(),
        status: status as i32,
        current_stats: Some(shared.stats(false)),
        timestamp: Some(time::now()),
    };
    let used = link.at();
    link.nlb()
        .heartbeat(request)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| failed(link, used, &status))
}

/// A failed call to endpoint `used`, in words; the link moves to the next NLB replica when
/// that one is away.
fn failed(link: &NlbLink, used: usize, status: &tonic::Status) -> String {
    let failed_at = link.url_of(used).to_owned();
    match link.fail_over(used, status) {
        Some(next) => format!(
            "{:?} from {failed_at}: {}; trying {next} next",
            status.code(),
            status.message()
        ),
        None => format!("{:?}: {}", status.code(), status.message()),
    }
}

/// Waits `delay`, or less when `finished` flips (or its sender is gone); true when finished.
async fn pause(delay: Duration, finished: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => false,
        _ = async { finished.wait_for(|done| *done).await.map(|_| ()) } => true,
    }
}

/// Registers and heartbeats until `finished` (set once the instance has unregistered).
pub async fn maintain(shared: Arc<Shared>, mut finished: watch::Receiver<bool>) {
    let Some(link) = shared.nlb.clone() else {
        return;
    };
    let mut backoff = Backoff::new();
    let mut failures = 0u32;
    loop {
        if shared.phase() == Phase::Stopping || *finished.borrow() {
            return;
        }
        let registration = match register(&shared).await {
            Ok(id) => id,
            Err(error) => {
                failures += 1;
                let delay = backoff.step();
                if failures == 1 || failures.is_power_of_two() {
                    warn!(instance = %shared.instance_id, nlb = %link.url(), attempt = failures, retry_in_ms = delay.as_millis() as u64, %error, "cannot register with the NLB; retrying");
                }
                if pause(delay, &mut finished).await {
                    return;
                }
                continue;
            }
        };
        info!(instance = %shared.instance_id, nlb = %link.url(), attempts = failures + 1, "registered with the NLB");
        shared.set_registration(Some(registration.clone()));
        if shared.phase() == Phase::Stopping {
            // The shutdown began while this registration was on its way and found nothing to
            // unregister: do it now, so the NLB does not keep a leaving instance until it expires.
            unregister(&shared, shared.settings().drain_timeout()).await;
            return;
        }
        // Only Starting becomes Ready: a shutdown that began meanwhile stays a shutdown.
        shared.phase.send_if_modified(|phase| {
            let starting = *phase == Phase::Starting;
            if starting {
                *phase = Phase::Ready;
            }
            starting
        });
        backoff = Backoff::new();
        failures = 0;
        let mut missed = 0u32;
        loop {
            if pause(shared.settings().heartbeat_interval(), &mut finished).await {
                return;
            }
            match heartbeat(&shared, &registration).await {
                Ok(answer) if answer.acknowledged => {
                    if missed > 0 {
                        info!(instance = %shared.instance_id, missed, "heartbeats reach the NLB again");
                    }
                    missed = 0;
                    if answer.should_scale || !answer.instructions.is_empty() {
                        info!(instance = %shared.instance_id, should_scale = answer.should_scale, instructions = ?answer.instructions, "NLB instructions");
                    }
                }
                Ok(answer) => {
                    if shared.phase() == Phase::Stopping {
                        return;
                    }
                    warn!(instance = %shared.instance_id, reason = %answer.message, "the NLB does not know this registration; registering again");
                    shared.set_registration(None);
                    break;
                }
                Err(error) => {
                    missed += 1;
                    if missed == 1 || missed.is_power_of_two() {
                        warn!(instance = %shared.instance_id, missed, %error, "heartbeat failed; still serving, retrying");
                    }
                }
            }
        }
    }
}

/// Sends one heartbeat now (the drain at the NLB ends on the first report of no connections).
pub async fn report_now(shared: &Shared) {
    if let Some(registration) = shared.registration() {
        if let Err(error) = heartbeat(shared, &registration).await {
            warn!(instance = %shared.instance_id, %error, "final heartbeat failed");
        }
    }
}

/// Tells the NLB this instance leaves: graceful, so it stops sending new connections and waits
/// for the open ones (which heartbeats keep reporting) up to `drain`.
pub async fn unregister(shared: &Shared, drain: Duration) {
    let (Some(link), Some(registration)) = (&shared.nlb, shared.registration()) else {
        return;
    };
    let request = pb::UnregisterModuleRequest {
        instance_id: shared.instance_id.clone(),
        registration_id: registration,
        graceful: true,
        drain_timeout_seconds: i32::try_from(drain.as_secs().max(1)).unwrap_or(i32::MAX),
    };
    // A replica that is gone passes the call to the next (every replica knows the registration).
    let mut answer = Err(tonic::Status::unavailable("not sent"));
    for _ in 0..2 {
        let used = link.at();
        let mut call = tonic::Request::new(request.clone());
        call.set_timeout(drain + Duration::from_secs(5));
        answer = link.nlb().unregister_module(call).await;
        match &answer {
            Err(status) if link.fail_over(used, status).is_some() => {}
            _ => break,
        }
    }
    match answer {
        Ok(answer) => {
            info!(instance = %shared.instance_id, message = %answer.into_inner().message, "unregistered from the NLB")
        }
        Err(status) => {
            warn!(instance = %shared.instance_id, error = %status.message(), "could not unregister; the NLB will expire this instance")
        }
    }
    shared.set_registration(None);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap() {
        let mut backoff = Backoff::new();
        let delays: Vec<Duration> = (0..10).map(|_| backoff.step()).collect();
        assert!(delays[0] <= Duration::from_millis(240));
        assert!(delays[1] >= Duration::from_millis(320));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(12)));
        assert!(delays[9] >= Duration::from_secs(8));
    }
}
