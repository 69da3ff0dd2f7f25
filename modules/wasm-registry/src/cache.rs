//! Modules cached on disk: the blobs by digest in the shared file cache
//! ([`marchproxy_file_cache`], under `<dir>/blobs`: bounded, least recently used out first,
//! checked against their digest when read), and which digest each reference resolved to
//! (`<dir>/refs/<sha256 of the reference>`), so a module asked for again is served without the
//! registry.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use hyper::body::Bytes;
use marchproxy_file_cache::{CacheMetrics, Config, EntryMeta, FileCache, Key};
use tracing::warn;

use crate::registry::digest_of;

pub struct Cache {
    refs: PathBuf,
    blobs: FileCache,
}

/// Writes to a file of its own, then renames: readers see the whole file or none, and two
/// writers of one reference never share a temporary file.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let unique = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let partial = path.with_extension(format!("{}-{unique}.partial", std::process::id()));
    fs::write(&partial, bytes)?;
    fs::rename(&partial, path)
}

/// The file-cache key of an OCI digest (`sha256:<hex>`).
fn blob_key(digest: &str) -> Option<Key> {
    Key::digest(digest.strip_prefix("sha256:")?)
}

impl Cache {
    /// The cache under `dir`, its blobs within `max_bytes`.
    pub fn open(dir: &Path, max_bytes: u64, metrics: CacheMetrics) -> std::io::Result<Self> {
        let refs = dir.join("refs");
        fs::create_dir_all(&refs)?;
        let mut config = Config::new(dir.join("blobs"));
        config.max_bytes = Some(max_bytes);
        // The budget is the limit itself: evict to stay within all of it.
        config.soft_limit_percent = 100;
        config.hard_limit_percent = 100;
        Ok(Cache {
            refs,
            blobs: FileCache::open(&config, metrics)?,
        })
    }

    fn ref_path(&self, reference: &str) -> PathBuf {
        let key = digest_of(reference.as_bytes());
        self.refs.join(&key["sha256:".len()..])
    }

    /// The cached module `reference` resolved to, if it was resolved within `fresh` (digest
    /// references never go stale) and its bytes are still intact.
    pub fn lookup(&self, reference: &str, fresh: Option<Duration>) -> Option<(String, Bytes)> {
        let path = self.ref_path(reference);
        if let Some(fresh) = fresh {
            let age = fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())?;
            if age > fresh {
                return None;
            }
        }
        let digest = fs::read_to_string(&path).ok()?;
        self.blob(digest.trim())
    }

    /// The module with `digest`, checked against it (a damaged one is dropped).
    pub fn blob(&self, digest: &str) -> Option<(String, Bytes)> {
        let bytes = self.blobs.read(&blob_key(digest)?)?;
        Some((digest.to_owned(), bytes))
    }

    /// Remembers `reference` -> `digest` and stores the bytes (evicting the least recently
    /// used modules beyond the budget).
    pub fn store(&self, reference: &str, digest: &str, bytes: &[u8]) {
        let Some(key) = blob_key(digest) else {
            return;
        };
        let meta = EntryMeta {
            url: Some(reference.to_owned()),
            ..EntryMeta::default()
        };
        if let Err(error) = self
            .blobs
            .insert(&key, meta, bytes)
            .and_then(|()| write_atomically(&self.ref_path(reference), digest.as_bytes()))
        {
            warn!(%digest, %error, "module not cached");
        }
    }

    /// Marks `reference` as just checked against the registry.
    pub fn refresh(&self, reference: &str) {
        let path = self.ref_path(reference);
        if let Ok(file) = fs::File::options().append(true).open(&path) {
            let _ = file.set_modified(SystemTime::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_looks_up_and_evicts_the_least_recent() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = CacheMetrics::new("test", |opts| opts);
        let cache = Cache::open(dir.path(), 25, metrics).unwrap();
        let (a, b) = (vec![1u8; 10], vec![2u8; 10]);
        cache.store("reg/a:v1", &digest_of(&a), &a);
        cache.store("reg/b:v1", &digest_of(&b), &b);
        assert_eq!(cache.lookup("reg/a:v1", None).unwrap().1, a);
        assert!(
            cache.lookup("reg/a:v1", Some(Duration::ZERO)).is_none(),
            "stale tag"
        );
        let c = vec![3u8; 10];
        cache.store("reg/c:v1", &digest_of(&c), &c);
        assert!(
            cache.lookup("reg/b:v1", None).is_none(),
            "b was the least recently used"
        );
        assert!(cache.lookup("reg/a:v1", None).is_some());
        assert!(cache.lookup("reg/c:v1", None).is_some());
        assert!(cache.blob("sha256:../../etc").is_none());
    }
}
