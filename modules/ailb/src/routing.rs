//! Model routing: the catalog maps the names clients ask for (models and aliases) to a model's
//! deployments, and a model's [`Strategy`] orders them for each request: the first is tried,
//! the rest are the failover order. Deployments remember their load (requests in flight), their
//! speed (an EWMA of latency) and their failures; a failing one cools down and is skipped while
//! any other can take the request.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::providers::Provider;

/// How a model picks among its deployments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// At random, in proportion to the weights.
    #[default]
    Weighted,
    /// The one with the fewest requests in flight (ties by weight at random).
    LeastBusy,
    /// The one with the lowest latency lately (an EWMA; untried ones first).
    LowestLatency,
}

/// One provider serving one model.
pub struct Deployment {
    pub provider: Arc<Provider>,
    /// The provider's name for the model.
    pub model: String,
    pub weight: u32,
    in_flight: AtomicU32,
    /// Microseconds; 0 until the first answer.
    latency_ewma_us: AtomicU64,
    health: Mutex<Health>,
}

#[derive(Default)]
struct Health {
    consecutive_failures: u32,
    cooling_until: Option<Instant>,
}

/// Counts a request in flight on a deployment until dropped.
pub struct InFlight {
    deployment: Arc<Deployment>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.deployment.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Deployment {
    pub fn new(provider: Arc<Provider>, model: String, weight: u32) -> Self {
        Deployment {
            provider,
            model,
            weight,
            in_flight: AtomicU32::new(0),
            latency_ewma_us: AtomicU64::new(0),
            health: Mutex::new(Health::default()),
        }
    }

    /// `provider/model`, for logs and errors.
    pub fn label(&self) -> String {
        format!("{}/{}", self.provider.name, self.model)
    }

    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight {
            deployment: Arc::clone(self),
        }
    }

    /// Whether `other` is this deployment with the same settings (a rebuilt catalog keeps this
    /// one, with its load, latency and cooldown).
    pub fn same_as(&self, other: &Deployment) -> bool {
        *self.provider == *other.provider
            && self.model == other.model
            && self.weight == other.weight
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        // Health holds two plain fields; a panic elsewhere cannot leave them torn.
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn cooling(&self, now: Instant) -> bool {
        self.health().cooling_until.is_some_and(|until| until > now)
    }

    /// An answer came back (the first byte of it, for streams): resets the failure count and
    /// feeds the latency average.
    pub fn succeeded(&self, latency: Duration) {
        *self.health() = Health::default();
        let sample = latency.as_micros().min(u64::MAX as u128) as u64;
        let _ = self
            .latency_ewma_us
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
                Some(if old == 0 {
                    sample.max(1)
                } else {
                    (old * 4 + sample) / 5
                })
            });
    }

    /// A failure worth failing over for; cools the deployment down after `allowed` in a row, or
    /// at once when the provider asked to slow down (`retry_after`). True when it cooled down.
    pub fn failed(&self, allowed: u32, cooldown: Duration, retry_after: Option<Duration>) -> bool {
        let mut health = self.health();
        health.consecutive_failures += 1;
        let pause = match retry_after {
            Some(asked) => Some(asked.max(Duration::from_secs(1))),
            None if health.consecutive_failures >= allowed => Some(cooldown),
            None => None,
        };
        match pause.and_then(|pause| Instant::now().checked_add(pause)) {
            Some(until) if pause.is_some_and(|p| !p.is_zero()) => {
                health.cooling_until = Some(until);
                health.consecutive_failures = 0;
                true
            }
            _ => false,
        }
    }

    fn latency(&self) -> u64 {
        self.latency_ewma_us.load(Ordering::Acquire)
    }
}

pub struct Model {
    pub name: String,
    pub strategy: Strategy,
    pub deployments: Vec<Arc<Deployment>>,
}

impl Model {
    /// The deployments in the order to try them: the healthy ones by the strategy, then the
    /// cooling ones (better a provider that may have recovered than no answer at all).
    pub fn order(&self) -> Vec<Arc<Deployment>> {
        let now = Instant::now();
        let (mut healthy, mut cooling): (Vec<_>, Vec<_>) = self
            .deployments
            .iter()
            .cloned()
            .partition(|d| !d.cooling(now));
        self.arrange(&mut healthy);
        self.arrange(&mut cooling);
        healthy.extend(cooling);
        healthy
    }

    fn arrange(&self, deployments: &mut Vec<Arc<Deployment>>) {
        let mut rng = rand::rng();
        // A weighted shuffle first: it breaks every strategy's ties by weight.
        let mut shuffled = Vec::with_capacity(deployments.len());
        while !deployments.is_empty() {
            let total: u64 = deployments.iter().map(|d| u64::from(d.weight)).sum();
            let mut pick = rng.random_range(0..total.max(1));
            let index = deployments
                .iter()
                .position(|d| {
                    let weight = u64::from(d.weight);
                    if pick < weight {
                        true
                    } else {
                        pick -= weight;
                        false
                    }
                })
                .unwrap_or(0);
            shuffled.push(deployments.swap_remove(index));
        }
        match self.strategy {
            Strategy::Weighted => {}
            Strategy::LeastBusy => shuffled.sort_by_key(|d| d.in_flight()),
            Strategy::LowestLatency => shuffled.sort_by_key(|d| d.latency()),
        }
        *deployments = shuffled;
    }
}

/// Models by every name clients may use.
#[derive(Default)]
pub struct Catalog {
    by_name: HashMap<String, Arc<Model>>,
}

impl Catalog {
    /// Adds `model` under `name`; returns the model already there, if any (and keeps it).
    pub fn insert(&mut self, name: &str, model: Arc<Model>) -> Option<String> {
        if let Some(existing) = self.by_name.get(name) {
            return Some(existing.name.clone());
        }
        self.by_name.insert(name.to_owned(), model);
        None
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Model>> {
        self.by_name.get(name)
    }

    /// This catalog's own copy of `deployment` when it has one with the same settings.
    pub fn existing(&self, deployment: &Deployment) -> Option<Arc<Deployment>> {
        self.by_name
            .values()
            .flat_map(|model| &model.deployments)
            .find(|known| known.same_as(deployment))
            .cloned()
    }

    /// Every name (models and aliases), sorted, with its model.
    pub fn names(&self) -> Vec<(&str, &Arc<Model>)> {
        let mut names: Vec<_> = self
            .by_name
            .iter()
            .map(|(name, model)| (name.as_str(), model))
            .collect();
        names.sort_by_key(|(name, _)| *name);
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::ProviderKind;

    fn deployment(name: &str, weight: u32) -> Arc<Deployment> {
        let provider =
            Provider::new(name, ProviderKind::Openai, "http://127.0.0.1:9/v1", None).unwrap();
        Arc::new(Deployment::new(Arc::new(provider), "m".into(), weight))
    }

    fn model(strategy: Strategy, deployments: Vec<Arc<Deployment>>) -> Model {
        Model {
            name: "m".into(),
            strategy,
            deployments,
        }
    }

    #[test]
    fn weights_share_first_choices() {
        let model = model(
            Strategy::Weighted,
            vec![deployment("heavy", 3), deployment("light", 1)],
        );
        let heavy = (0..4000)
            .filter(|_| model.order()[0].provider.name == "heavy")
            .count();
        // 3000 expected; the bounds are over 10 standard deviations (~27) wide.
        assert!(
            (2700..3300).contains(&heavy),
            "heavy first {heavy} times of 4000"
        );
        assert_eq!(
            model.order().len(),
            2,
            "the other one stays as the failover"
        );
    }

    #[test]
    fn least_busy_and_lowest_latency() {
        let (a, b) = (deployment("a", 1), deployment("b", 1));
        let busy = model(Strategy::LeastBusy, vec![Arc::clone(&a), Arc::clone(&b)]);
        let _held = a.start();
        assert_eq!(busy.order()[0].provider.name, "b");

        let fast = model(
            Strategy::LowestLatency,
            vec![Arc::clone(&a), Arc::clone(&b)],
        );
        a.succeeded(Duration::from_millis(5));
        b.succeeded(Duration::from_millis(50));
        assert_eq!(fast.order()[0].provider.name, "a");
    }

    #[test]
    fn failing_deployments_cool_down_and_go_last() {
        let (a, b) = (deployment("a", 100), deployment("b", 1));
        let model = model(Strategy::Weighted, vec![Arc::clone(&a), Arc::clone(&b)]);
        assert!(!a.failed(2, Duration::from_secs(60), None));
        assert!(a.failed(2, Duration::from_secs(60), None));
        for _ in 0..50 {
            let order = model.order();
            assert_eq!(order[0].provider.name, "b");
            assert_eq!(order[1].provider.name, "a", "still tried when b fails too");
        }
        assert!(b.failed(5, Duration::from_secs(60), Some(Duration::from_secs(2))));
        assert!(b.cooling(Instant::now()));
    }
}
