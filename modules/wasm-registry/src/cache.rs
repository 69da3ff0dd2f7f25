//! Modules cached on disk by digest (`<dir>/sha256/<hex>`), and which digest each reference
//! resolved to (`<dir>/refs/<sha256 of the reference>`), so a module asked for again is served
//! without the registry. Bounded by size: the least recently used modules go first.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use hyper::body::Bytes;
use tracing::{debug, warn};

use crate::registry::digest_of;

pub struct Cache {
    dir: PathBuf,
    max_bytes: u64,
}

/// Writes to a file of its own, then renames: readers see the whole file or none, and two
/// writers of one digest never share a temporary file.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let unique = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let partial = path.with_extension(format!("{}-{unique}.partial", std::process::id()));
    fs::write(&partial, bytes)?;
    fs::rename(&partial, path)
}

impl Cache {
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Self> {
        fs::create_dir_all(dir.join("sha256"))?;
        fs::create_dir_all(dir.join("refs"))?;
        Ok(Cache {
            dir: dir.to_owned(),
            max_bytes,
        })
    }

    fn blob_path(&self, digest: &str) -> Option<PathBuf> {
        let hex = digest.strip_prefix("sha256:")?;
        (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| self.dir.join("sha256").join(hex))
    }

    fn ref_path(&self, reference: &str) -> PathBuf {
        let key = digest_of(reference.as_bytes());
        self.dir.join("refs").join(&key["sha256:".len()..])
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

    /// The module with `digest`, checked against it.
    pub fn blob(&self, digest: &str) -> Option<(String, Bytes)> {
        let path = self.blob_path(digest)?;
        let bytes = fs::read(&path).ok()?;
        if digest_of(&bytes) != digest {
            warn!(%digest, "cached module damaged; dropped");
            let _ = fs::remove_file(&path);
            return None;
        }
        // Recently used: the eviction goes by modification time.
        if let Ok(file) = fs::File::options().append(true).open(&path) {
            let _ = file.set_modified(SystemTime::now());
        }
        Some((digest.to_owned(), Bytes::from(bytes)))
    }

    /// Remembers `reference` -> `digest` and stores the bytes, then trims the cache.
    pub fn store(&self, reference: &str, digest: &str, bytes: &[u8]) {
        let Some(path) = self.blob_path(digest) else {
            return;
        };
        if let Err(error) = write_atomically(&path, bytes)
            .and_then(|()| write_atomically(&self.ref_path(reference), digest.as_bytes()))
        {
            warn!(%digest, %error, "module not cached");
            return;
        }
        self.trim();
    }

    /// Marks `reference` as just checked against the registry.
    pub fn refresh(&self, reference: &str) {
        let path = self.ref_path(reference);
        if let Ok(file) = fs::File::options().append(true).open(&path) {
            let _ = file.set_modified(SystemTime::now());
        }
    }

    fn trim(&self) {
        let Ok(entries) = fs::read_dir(self.dir.join("sha256")) else {
            return;
        };
        let mut blobs: Vec<(SystemTime, u64, PathBuf)> = entries
            .filter_map(|e| {
                let e = e.ok()?;
                // Files being written are not counted or evicted.
                if e.file_name().to_string_lossy().ends_with(".partial") {
                    return None;
                }
                let meta = e.metadata().ok()?;
                Some((meta.modified().ok()?, meta.len(), e.path()))
            })
            .collect();
        let mut total: u64 = blobs.iter().map(|b| b.1).sum();
        blobs.sort();
        for (_, size, path) in blobs {
            if total <= self.max_bytes {
                break;
            }
            debug!(path = %path.display(), "evicting the least recently used module");
            if fs::remove_file(&path).is_ok() {
                total -= size;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_looks_up_and_evicts_the_least_recent() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 25).unwrap();
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
