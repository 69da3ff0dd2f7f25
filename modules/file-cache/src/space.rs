//! How full the cache may get: either an explicit byte budget for the cache's own entries, or
//! the use of the filesystem the cache lives on (as `df` counts it). Above the soft limit,
//! committing an entry first evicts the least recently used ones; at the hard limit, nothing
//! new is cached.

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

/// How often the filesystem is asked for its use; in between, the last answer is adjusted by
/// what the cache itself added or removed.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

pub(crate) enum Space {
    Budget(u64),
    Filesystem {
        dir: PathBuf,
        /// When it was sampled, the filesystem's size, the bytes used by others than the
        /// cache (its committed entries and the fills under way).
        sample: Mutex<Option<(Instant, u64, u64)>>,
    },
}

/// Room, in bytes: what the limits allow and what is taken by others.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Room {
    pub capacity: u64,
    pub others: u64,
}

impl Space {
    pub fn new(dir: &Path, budget: Option<u64>) -> Space {
        match budget {
            Some(bytes) => Space::Budget(bytes),
            None => Space::Filesystem {
                dir: dir.to_owned(),
                sample: Mutex::new(None),
            },
        }
    }

    /// The room now, given the cache's committed bytes and those its fills have written.
    pub fn room(&self, committed: u64, filling: u64) -> Room {
        match self {
            Space::Budget(bytes) => Room {
                capacity: *bytes,
                others: 0,
            },
            Space::Filesystem { dir, sample } => {
                // A poisoned sample is only a stale number; take it.
                let mut sample = sample.lock().unwrap_or_else(|e| e.into_inner());
                let fresh = sample.filter(|(at, ..)| at.elapsed() < SAMPLE_EVERY);
                let (capacity, others) = match fresh {
                    Some((_, capacity, others)) => (capacity, others),
                    None => {
                        let (capacity, used) = filesystem_use(dir);
                        let others = used.saturating_sub(committed).saturating_sub(filling);
                        *sample = Some((Instant::now(), capacity, others));
                        (capacity, others)
                    }
                };
                Room { capacity, others }
            }
        }
    }
}

impl Room {
    fn limit(&self, percent: u8) -> u64 {
        (u128::from(self.capacity) * u128::from(percent) / 100) as u64
    }

    /// Whether `committed` plus `more` bytes stays within `percent` of the capacity.
    pub fn within(&self, percent: u8, committed: u64, more: u64) -> bool {
        self.others.saturating_add(committed).saturating_add(more) <= self.limit(percent)
    }
}

/// The filesystem's size and used bytes (blocks in use, as `df` counts them: the root
/// reserve is neither used nor available).
fn filesystem_use(dir: &Path) -> (u64, u64) {
    match rustix::fs::statvfs(dir) {
        Ok(stat) => {
            let used = (stat.f_blocks - stat.f_bfree).saturating_mul(stat.f_frsize);
            let available = stat.f_bavail.saturating_mul(stat.f_frsize);
            (used + available, used)
        }
        // An unreadable filesystem is treated as full: the cache relays instead of writing.
        Err(_) => (0, 0),
    }
}
