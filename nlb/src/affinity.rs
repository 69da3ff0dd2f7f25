//! Version affinity during a rollout (policy `affinity`): a client, known by its source IP at
//! L4, keeps the version it first reached while the weights move, so a user does not flip
//! between versions from one connection to the next.
//!
//! A client's first version is drawn from a hash of its address against the current weights,
//! not at random: the same client lands on the same side on every NLB replica and after a
//! restart, and as the new version's weight grows the clients it takes over are always the
//! same ones plus more. The table then holds each client's version until it is idle for
//! `affinity_idle_ms`, the version leaves the split, or the rollout ends.

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    net::IpAddr,
    time::{Duration, Instant},
};

use marchproxy::names::ModuleKind;

/// Clients remembered at most; past it, idle ones are forgotten first and then new clients are
/// placed by their hash alone (still stable, just not pinned).
const MAX_CLIENTS: usize = 100_000;

#[derive(Debug, Default)]
pub struct Affinity {
    clients: HashMap<(ModuleKind, IpAddr), (String, Instant)>,
}

impl Affinity {
    /// The version `client` goes to among `weights` (the usable versions of `kind` with their
    /// weights, the rollout's new version first), or None when none has weight.
    pub fn version_for(
        &mut self,
        kind: ModuleKind,
        client: IpAddr,
        weights: &[(&str, u32)],
        idle: Duration,
        seed: u64,
        now: Instant,
    ) -> Option<String> {
        if let Some((version, seen)) = self.clients.get_mut(&(kind, client)) {
            let still_weighted = weights.iter().any(|(v, w)| v == version && *w > 0);
            if still_weighted && now.duration_since(*seen) < idle {
                *seen = now;
                return Some(version.clone());
            }
        }
        let total: u32 = weights.iter().map(|(_, w)| w).sum();
        if total == 0 {
            return None;
        }
        let mut hasher = DefaultHasher::new();
        (seed, client).hash(&mut hasher);
        let mut point = (hasher.finish() % u64::from(total)) as u32;
        let version = weights.iter().find_map(|(v, w)| {
            if point < *w {
                Some((*v).to_owned())
            } else {
                point -= w;
                None
            }
        })?;
        if self.clients.len() >= MAX_CLIENTS {
            self.clients
                .retain(|_, (_, seen)| now.duration_since(*seen) < idle);
        }
        if self.clients.len() < MAX_CLIENTS {
            self.clients.insert((kind, client), (version.clone(), now));
        }
        Some(version)
    }

    /// Forgets a kind's clients when its rollout ends.
    pub fn forget(&mut self, kind: ModuleKind) {
        self.clients.retain(|(k, _), _| *k != kind);
    }

    pub fn clients(&self, kind: ModuleKind) -> usize {
        self.clients.keys().filter(|(k, _)| *k == kind).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(n: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000u32 + n))
    }

    #[test]
    fn clients_keep_their_version_while_the_weight_grows() {
        let mut affinity = Affinity::default();
        let now = Instant::now();
        let idle = Duration::from_secs(60);
        let first: Vec<String> = (0..1000)
            .map(|n| {
                affinity
                    .version_for(
                        ModuleKind::Alb,
                        client(n),
                        &[("v2", 10), ("v1", 90)],
                        idle,
                        7,
                        now,
                    )
                    .unwrap()
            })
            .collect();
        let on_v2 = first.iter().filter(|v| *v == "v2").count();
        assert!((60..=140).contains(&on_v2), "{on_v2} of 1000 at 10 %");
        for n in 0..1000 {
            let again = affinity
                .version_for(
                    ModuleKind::Alb,
                    client(n),
                    &[("v2", 60), ("v1", 40)],
                    idle,
                    7,
                    now,
                )
                .unwrap();
            assert_eq!(again, first[n as usize], "client {n} kept its version");
        }
        // A client idle past the limit is placed again, and by its hash a v2 client stays on v2.
        let later = now + idle;
        let mut fresh = Affinity::default();
        for n in 0..1000 {
            let placed = affinity
                .version_for(
                    ModuleKind::Alb,
                    client(n),
                    &[("v2", 60), ("v1", 40)],
                    idle,
                    7,
                    later,
                )
                .unwrap();
            let by_hash = fresh
                .version_for(
                    ModuleKind::Alb,
                    client(n),
                    &[("v2", 60), ("v1", 40)],
                    idle,
                    7,
                    later,
                )
                .unwrap();
            assert_eq!(placed, by_hash);
            if first[n as usize] == "v2" {
                assert_eq!(placed, "v2", "growing weights never move a client back");
            }
        }
        affinity.forget(ModuleKind::Alb);
        assert_eq!(affinity.clients(ModuleKind::Alb), 0);
    }
}
