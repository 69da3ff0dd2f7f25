//! Version affinity during a rollout (policy `affinity`): a client, known by its source IP at
//! L4, keeps the version it first reached while the weights move, so a user does not flip
//! between versions from one connection to the next.
//!
//! A client's first version is drawn from a hash of its address (seeded with the rollout's
//! start) against the current weights, not at random: as the new version's weight grows, the
//! clients it takes over are always the same ones plus more. The table then holds each
//! client's version until it is idle for `affinity_idle_ms`, the version leaves the split, or
//! the rollout ends; a takeover moves the table to the new process.

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use marchproxy::names::ModuleKind;

use crate::handover::MovedPin;

/// Clients remembered at most; past it, idle ones are forgotten first and then new clients are
/// placed by their hash alone (still stable, just not pinned).
const MAX_CLIENTS: usize = 100_000;
/// A full table is swept of idle clients at most this often (a sweep walks all of it).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub struct Affinity {
    clients: HashMap<(ModuleKind, IpAddr), (String, Instant)>,
    swept: Option<Instant>,
}

/// FNV-1a over the seed and the address: fixed across Rust releases and processes, unlike
/// the standard library's hasher.
fn point(seed: u64, client: IpAddr, total: u32) -> u32 {
    let address = match client {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    let hash = seed
        .to_be_bytes()
        .iter()
        .chain(&address)
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
        });
    (hash % u64::from(total)) as u32
}

impl Affinity {
    /// The version `client` goes to among `weights` (the usable versions of `kind` with their
    /// weights, the rollout's new version first), or None when none has weight. With `pin`
    /// the answer is remembered; without (a prediction), nothing changes.
    #[allow(clippy::too_many_arguments)]
    pub fn version_for(
        &mut self,
        kind: ModuleKind,
        client: IpAddr,
        weights: &[(&str, u32)],
        idle: Duration,
        seed: u64,
        now: Instant,
        pin: bool,
    ) -> Option<String> {
        if let Some((version, seen)) = self.clients.get_mut(&(kind, client)) {
            let still_weighted = weights.iter().any(|(v, w)| v == version && *w > 0);
            if still_weighted && now.duration_since(*seen) < idle {
                if pin {
                    *seen = now;
                }
                return Some(version.clone());
            }
        }
        let total: u32 = weights.iter().map(|(_, w)| w).sum();
        if total == 0 {
            return None;
        }
        let mut point = point(seed, client, total);
        let version = weights.iter().find_map(|(v, w)| {
            if point < *w {
                Some((*v).to_owned())
            } else {
                point -= w;
                None
            }
        })?;
        if pin {
            self.pin(kind, client, version.clone(), now, idle);
        }
        Some(version)
    }

    fn pin(
        &mut self,
        kind: ModuleKind,
        client: IpAddr,
        version: String,
        seen: Instant,
        idle: Duration,
    ) {
        let full = self.clients.len() >= MAX_CLIENTS;
        if full
            && self
                .swept
                .is_none_or(|at| seen.duration_since(at) >= SWEEP_EVERY)
        {
            self.clients
                .retain(|_, (_, last)| seen.duration_since(*last) < idle);
            self.swept = Some(seen);
        }
        if self.clients.len() < MAX_CLIENTS || self.clients.contains_key(&(kind, client)) {
            self.clients.insert((kind, client), (version, seen));
        }
    }

    /// Forgets a kind's clients when its rollout ends.
    pub fn forget(&mut self, kind: ModuleKind) {
        self.clients.retain(|(k, _), _| *k != kind);
    }

    /// Every pin, for a takeover.
    pub fn pins(&self, now: Instant) -> Vec<MovedPin> {
        self.clients
            .iter()
            .map(|((kind, client), (version, seen))| MovedPin {
                kind: kind.name().to_owned(),
                client: *client,
                version: version.clone(),
                idle_ms: now.duration_since(*seen).as_millis() as u64,
            })
            .collect()
    }

    /// Pins a takeover brought.
    pub fn restore(&mut self, pins: Vec<MovedPin>, now: Instant) {
        for pin in pins.into_iter().take(MAX_CLIENTS) {
            let Ok(kind) = pin.kind.parse::<ModuleKind>() else {
                continue;
            };
            let seen = now
                .checked_sub(Duration::from_millis(pin.idle_ms))
                .unwrap_or(now);
            self.clients.insert((kind, pin.client), (pin.version, seen));
        }
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
        let at = |affinity: &mut Affinity, n, v2, when, pin| {
            affinity
                .version_for(
                    ModuleKind::Alb,
                    client(n),
                    &[("v2", v2), ("v1", 100 - v2)],
                    idle,
                    7,
                    when,
                    pin,
                )
                .unwrap()
        };
        let first: Vec<String> = (0..1000)
            .map(|n| at(&mut affinity, n, 10, now, true))
            .collect();
        let on_v2 = first.iter().filter(|v| *v == "v2").count();
        assert!((60..=140).contains(&on_v2), "{on_v2} of 1000 at 10 %");
        for n in 0..1000 {
            assert_eq!(
                at(&mut affinity, n, 60, now, true),
                first[n as usize],
                "client {n} kept its version"
            );
        }
        // Idle past the limit, a client is placed again by its hash: a v2 client stays on v2.
        let later = now + idle;
        let mut fresh = Affinity::default();
        for n in 0..1000 {
            let by_hash = at(&mut fresh, n, 60, later, false);
            assert_eq!(at(&mut affinity, n, 60, later, true), by_hash);
            if first[n as usize] == "v2" {
                assert_eq!(by_hash, "v2", "growing weights never move a client back");
            }
        }
        assert!(fresh.clients.is_empty(), "a prediction pins nobody");
        // A takeover moves the pins.
        let mut moved = Affinity::default();
        moved.restore(affinity.pins(later), later);
        assert_eq!(moved.clients.len(), 1000);
        affinity.forget(ModuleKind::Alb);
        assert!(affinity.clients.is_empty());
    }

    #[test]
    fn the_hash_is_fixed() {
        // Changing it would move every client of a rollout in progress across an upgrade.
        assert_eq!(point(7, client(1), 100), 43);
        assert_eq!(point(7, client(1), 1_000_003), 463_511);
        let spread: std::collections::BTreeSet<u32> =
            (0..200).map(|n| point(42, client(n), 10)).collect();
        assert_eq!(spread.len(), 10, "all ten buckets are used");
    }
}
