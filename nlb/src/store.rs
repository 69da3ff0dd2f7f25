//! Operator-set state on disk: operator routes, config sections, desired scale and version
//! weights, in `<state-dir>/state.json`.
//!
//! Every write goes to a temporary file that is flushed to disk and then renamed over the old
//! one, so a crash leaves either the old or the new state, never a torn file. Writes carry a
//! generation number; an older snapshot that loses a race is not written over a newer one.

use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};

use marchproxy::route::RouteSpec;

const FILE: &str = "state.json";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PersistedRoute {
    pub route: RouteSpec,
    /// Milliseconds since the Unix epoch.
    pub created_at_ms: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PersistedState {
    #[serde(default)]
    pub operator_routes: Vec<PersistedRoute>,
    /// Sections set through `UpdateNLBConfig`, as JSON, with when they were set.
    #[serde(default)]
    pub config: BTreeMap<String, PersistedSection>,
    /// Desired instance count per module kind name.
    #[serde(default)]
    pub desired_instances: BTreeMap<String, u32>,
    /// Traffic weight per version, per module kind name.
    #[serde(default)]
    pub version_weights: BTreeMap<String, BTreeMap<String, u32>>,
    /// The version each kind had active before its last change (where Rollback returns).
    #[serde(default)]
    pub previous_active: BTreeMap<String, String>,
    /// Gradual promotions under way, per module kind name: they go on after a restart.
    #[serde(default)]
    pub promotions: BTreeMap<String, PersistedPromotion>,
    /// Recent rollout events per module kind name, for status after a restart.
    #[serde(default)]
    pub rollout_events: BTreeMap<String, Vec<crate::rollout::RolloutEvent>>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PersistedPromotion {
    pub version: String,
    pub step_percent: u32,
    /// The split before the promotion began, where a rollback returns.
    pub before: BTreeMap<String, u32>,
    pub started_at_ms: u64,
    /// The version it is compared with (empty in files from before it was kept).
    #[serde(default)]
    pub stable: String,
    /// Steps taken, so a restart resumes at the same step.
    #[serde(default)]
    pub step: u32,
    #[serde(default)]
    pub failed_checks: u32,
    /// How long the step had been held for want of traffic (the progress deadline goes on).
    #[serde(default)]
    pub held_for_ms: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PersistedSection {
    pub data: serde_json::Value,
    pub updated_at_ms: u64,
}

/// A module registration as NLB replicas share it through etcd (the leases ride on the keys).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SharedInstance {
    /// `RegisterModuleRequest` (protobuf) with the instance's current routes and health.
    #[serde(with = "base64_bytes")]
    pub registration: Vec<u8>,
    pub registration_id: String,
    pub registered_at_ms: u64,
    pub draining: bool,
}

/// A heartbeat's stats, passed by the replica that received it to the one analysing rollouts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SharedStats {
    pub registration_id: String,
    /// `ModuleStats` (protobuf).
    #[serde(with = "base64_bytes")]
    pub stats: Vec<u8>,
}

/// Bytes as base64 text in JSON, readable with `etcdctl get`.
mod base64_bytes {
    use base64::{Engine, engine::general_purpose::STANDARD};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(deserializer)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot use state directory {path}: {source}; create it or pass another --state-dir")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "state file {path} is unreadable ({reason}); fix it, or move it away to start with empty operator state"
    )]
    Corrupt { path: PathBuf, reason: String },
}

/// The state directory, or nothing when the NLB runs without one (state lives in memory).
pub struct Store {
    dir: Option<PathBuf>,
    last_written: Mutex<u64>,
}

impl Store {
    pub fn open(dir: Option<&Path>) -> Result<Self, StoreError> {
        if let Some(dir) = dir {
            fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
                path: dir.to_owned(),
                source,
            })?;
        }
        Ok(Store {
            dir: dir.map(Path::to_owned),
            last_written: Mutex::new(0),
        })
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    pub fn load(&self) -> Result<PersistedState, StoreError> {
        let Some(dir) = &self.dir else {
            return Ok(PersistedState::default());
        };
        let path = dir.join(FILE);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|error| StoreError::Corrupt {
                path,
                reason: error.to_string(),
            }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                Ok(PersistedState::default())
            }
            Err(error) => Err(StoreError::Corrupt {
                path,
                reason: error.to_string(),
            }),
        }
    }

    /// Writes `state` unless a newer generation is already on disk. Blocking: call it from
    /// `spawn_blocking`.
    pub fn save(&self, generation: u64, state: &PersistedState) -> Result<(), StoreError> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        // A poisoned lock only means another save panicked; the counter is still meaningful.
        let mut last = self.last_written.lock().unwrap_or_else(|e| e.into_inner());
        if generation <= *last {
            return Ok(());
        }
        let path = dir.join(FILE);
        let temp = dir.join(format!("{FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            let bytes = serde_json::to_vec_pretty(state)?;
            let mut file = fs::File::create(&temp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            fs::rename(&temp, &path)?;
            fs::File::open(dir)?.sync_all()
        };
        write().map_err(|source| StoreError::Write { path, source })?;
        *last = generation;
        Ok(())
    }

    /// Whether `generation` (or a newer one) is on disk already, or there is no disk.
    pub fn is_saved(&self, generation: u64) -> bool {
        self.dir.is_none()
            || *self.last_written.lock().unwrap_or_else(|e| e.into_inner()) >= generation
    }

    /// Can the state directory take a write right now? (deep health checks)
    pub fn probe(&self) -> Result<(), StoreError> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        let path = dir.join(".probe");
        fs::write(&path, b"ok")
            .and_then(|()| fs::remove_file(&path))
            .map_err(|source| StoreError::Write { path, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_atomically_and_skips_older_generations() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(Some(dir.path())).unwrap();
        let mut state = PersistedState::default();
        state.desired_instances.insert("alb".into(), 3);
        store.save(2, &state).unwrap();
        let mut older = state.clone();
        older.desired_instances.insert("alb".into(), 1);
        store.save(1, &older).unwrap();
        let back = Store::open(Some(dir.path())).unwrap().load().unwrap();
        assert_eq!(back.desired_instances["alb"], 3);
        assert!(!dir.path().join("state.json.tmp").exists());
    }

    #[test]
    fn corrupt_state_is_an_error_not_an_empty_start() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE), b"{not json").unwrap();
        let error = Store::open(Some(dir.path())).unwrap().load().unwrap_err();
        assert!(error.to_string().contains("move it away"), "{error}");
    }
}
