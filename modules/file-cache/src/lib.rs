//! A disk cache of whole files, for modules that serve the same large files to many clients
//! (the ALB's forward proxy for device updates, the wasm-registry's OCI blobs).
//!
//! - [`FileCache::lookup`] says what to do with a key: read a committed entry ([`Lookup::Hit`]),
//!   join the download already under way ([`Lookup::Wait`]), fetch it and fill the cache
//!   ([`Lookup::Fetch`]), or relay without caching because the disk is at its hard limit
//!   ([`Lookup::Relay`]).
//! - A fill writes a temporary file while every reader of the key streams from it (one upstream
//!   download in all), then checks the length and, when given, the SHA-256, and renames the file
//!   into place. A failed or short download is discarded and its readers end with an error; the
//!   last byte is held back until the verdict, so no client ever completes a file that was not
//!   committed whole.
//! - Above the soft limit the least recently used entries are evicted to make room ([`space`]);
//!   the index ([`index`]) survives restarts.
//!
//! Entries live in `<dir>/data/<key>`, fills in `<dir>/tmp/`, the index in `<dir>/index.jsonl`.

mod index;
mod metrics;
mod reader;
mod space;

use std::{
    collections::{HashMap, HashSet},
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures_core::Stream;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tracing::{debug, info, warn};

pub use crate::{
    index::EntryMeta,
    metrics::CacheMetrics,
    reader::{ReadError, Reader},
};
use crate::{index::Index, space::Space};

/// Bytes gathered before one write to the temporary file.
const WRITE_BATCH: usize = 256 * 1024;

/// Where and how big.
#[derive(Clone, Debug)]
pub struct Config {
    pub dir: PathBuf,
    /// A byte budget for the entries; without one, the limits apply to the filesystem's use.
    pub max_bytes: Option<u64>,
    /// Committing evicts least recently used entries to stay at or under this percentage.
    pub soft_limit_percent: u8,
    /// At or over this percentage, nothing new is cached (requests are relayed).
    pub hard_limit_percent: u8,
    /// Start empty: everything under `dir` is removed first.
    pub wipe: bool,
    /// A fill whose upstream sends nothing for this long fails.
    pub stall_timeout: Duration,
}

impl Config {
    pub fn new(dir: impl Into<PathBuf>) -> Config {
        Config {
            dir: dir.into(),
            max_bytes: None,
            soft_limit_percent: 75,
            hard_limit_percent: 80,
            wipe: false,
            stall_timeout: Duration::from_secs(30),
        }
    }
}

/// What names an entry: a content digest (`file_sha256`) or, for content nobody vouched for,
/// `URL_` and the SHA-256 of its URL. Always a safe file name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key(String);

impl Key {
    /// The key of content with this SHA-256 (64 hex digits, any case); `None` when it is not one.
    pub fn digest(hex_digest: &str) -> Option<Key> {
        (hex_digest.len() == 64 && hex_digest.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| Key(hex_digest.to_ascii_lowercase()))
    }

    pub fn url(url: &str) -> Key {
        Key(format!(
            "URL_{}",
            hex::encode(Sha256::digest(url.as_bytes()))
        ))
    }

    /// The content digest the key vouches for, when it is one.
    pub fn sha256(&self) -> Option<&str> {
        (!self.0.starts_with("URL_")).then_some(self.0.as_str())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a fill stands; readers of a download follow it.
#[derive(Clone, Debug)]
enum Progress {
    /// The filler is still asking upstream.
    Connecting,
    /// Readable up to `visible` bytes of the temporary file.
    Streaming {
        visible: u64,
    },
    /// Complete and checked: `size` bytes (committed or, when it did not fit, not).
    Done {
        size: u64,
    },
    Failed(Arc<str>),
    /// The filler gave up before streaming (upstream said no): readers fetch for themselves.
    Abandoned,
}

/// A fill under way.
struct Download {
    progress: watch::Sender<Progress>,
    /// Set when streaming starts.
    source: std::sync::OnceLock<(Arc<fs::File>, Arc<EntryMeta>, Option<u64>)>,
}

struct State {
    index: Index,
    downloads: HashMap<Key, Arc<Download>>,
    /// Keys whose fill outgrew the hard limit (their size unknown beforehand): relayed from
    /// then on, so a retry succeeds.
    too_large: HashSet<Key>,
}

/// At most this many keys are remembered as too large (then the set starts over).
const TOO_LARGE_KEYS: usize = 10_000;

struct Inner {
    data: PathBuf,
    tmp: PathBuf,
    space: Space,
    soft_percent: u8,
    hard_percent: u8,
    stall_timeout: Duration,
    /// Bytes the fills under way have written to their temporary files.
    filling: AtomicU64,
    state: Mutex<State>,
    metrics: CacheMetrics,
}

/// The cache; cheap to clone.
#[derive(Clone)]
pub struct FileCache {
    inner: Arc<Inner>,
}

/// What to do for a key.
pub enum Lookup {
    Hit(Reader),
    /// Another request is fetching it: wait for its download.
    Wait(Pending),
    /// Nobody has it: fetch it and [`Filler::fill`]; dropping the filler lets waiters go.
    Fetch(Filler),
    /// The cache is full to its hard limit: relay without caching.
    Relay,
}

impl FileCache {
    /// Opens (or creates) the cache: removes stale temporary files and reconciles the index
    /// with the files present.
    pub fn open(config: &Config, metrics: CacheMetrics) -> io::Result<FileCache> {
        if config.soft_limit_percent > config.hard_limit_percent || config.hard_limit_percent > 100
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "cache limits: the soft limit ({} %) must not exceed the hard limit ({} %), nor the hard limit 100 %",
                    config.soft_limit_percent, config.hard_limit_percent
                ),
            ));
        }
        let (data, tmp) = (config.dir.join("data"), config.dir.join("tmp"));
        if config.wipe {
            for path in [&data, &tmp, &config.dir.join("index.jsonl")] {
                match fs::metadata(path) {
                    Ok(meta) if meta.is_dir() => fs::remove_dir_all(path)?,
                    Ok(_) => fs::remove_file(path)?,
                    Err(_) => {}
                }
            }
            info!(dir = %config.dir.display(), "cache wiped at start-up");
        }
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(&data)?;
        fs::create_dir_all(&tmp)?;
        let index = Index::load(&config.dir, &data)?;
        metrics.stored(index.len(), index.bytes());
        Ok(FileCache {
            inner: Arc::new(Inner {
                space: Space::new(&config.dir, config.max_bytes),
                soft_percent: config.soft_limit_percent,
                hard_percent: config.hard_limit_percent,
                stall_timeout: config.stall_timeout,
                filling: AtomicU64::new(0),
                data,
                tmp,
                state: Mutex::new(State {
                    index,
                    downloads: HashMap::new(),
                    too_large: HashSet::new(),
                }),
                metrics,
            }),
        })
    }

    /// What to do for `key`; with `refetch` (the client found the entry corrupt), a committed
    /// entry is dropped first. Never blocks on I/O beyond opening one file.
    pub fn lookup(&self, key: &Key, refetch: bool) -> Lookup {
        let mut state = self.inner.lock();
        if let Some(download) = state.downloads.get(key) {
            return Lookup::Wait(Pending {
                download: Arc::clone(download),
            });
        }
        if refetch {
            if state.index.remove(key.as_str()).is_some() {
                let _ = fs::remove_file(self.inner.data.join(key.as_str()));
                info!(%key, "cache entry dropped on request (retry_caching)");
            }
        } else if let Some((size, meta)) = state.index.touch(key.as_str()) {
            match fs::File::open(self.inner.data.join(key.as_str())) {
                Ok(file) => return Lookup::Hit(Reader::committed(file, size, meta)),
                Err(error) => {
                    warn!(%key, %error, "cache entry unreadable; dropped");
                    state.index.remove(key.as_str());
                }
            }
        }
        self.inner
            .metrics
            .stored(state.index.len(), state.index.bytes());
        if state.too_large.contains(key) {
            return Lookup::Relay;
        }
        if !self.inner.below_hard_limit(state.index.bytes()) {
            self.inner.metrics.over_hard_limit();
            return Lookup::Relay;
        }
        let download = Arc::new(Download {
            progress: watch::Sender::new(Progress::Connecting),
            source: std::sync::OnceLock::new(),
        });
        state.downloads.insert(key.clone(), Arc::clone(&download));
        Lookup::Fetch(Filler {
            cache: self.clone(),
            key: key.clone(),
            download,
            filling: false,
        })
    }

    /// The whole entry, read and checked against its key's digest (a damaged one is dropped);
    /// blocking.
    pub fn read(&self, key: &Key) -> Option<Bytes> {
        let path = self.inner.data.join(key.as_str());
        self.inner.lock().index.touch(key.as_str())?;
        let bytes = fs::read(&path).ok()?;
        if let Some(digest) = key.sha256() {
            if hex::encode(Sha256::digest(&bytes)) != digest {
                warn!(%key, "cache entry damaged; dropped");
                self.inner.discard(key);
                return None;
            }
        }
        Some(Bytes::from(bytes))
    }

    /// Stores a whole entry at once (checked against its key's digest); blocking.
    pub fn insert(&self, key: &Key, meta: EntryMeta, bytes: &[u8]) -> io::Result<()> {
        if let Some(digest) = key.sha256() {
            if hex::encode(Sha256::digest(bytes)) != digest {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("the content's SHA-256 is not {digest}"),
                ));
            }
        }
        let (path, mut file) = self.inner.temporary(key)?;
        file.write_all(bytes)?;
        file.sync_data()?;
        self.inner
            .commit(key, &path, bytes.len() as u64, Arc::new(meta));
        Ok(())
    }

    pub fn contains(&self, key: &Key) -> bool {
        self.inner.lock().index.touch(key.as_str()).is_some()
    }

    /// Committed entries and their bytes.
    pub fn usage(&self) -> (usize, u64) {
        let state = self.inner.lock();
        (state.index.len(), state.index.bytes())
    }
}

impl Inner {
    /// Whether the committed entries and the fills under way stay under the hard limit.
    fn below_hard_limit(&self, committed: u64) -> bool {
        let filling = self.filling.load(Ordering::Relaxed);
        self.space.room(committed, filling).within(
            self.hard_percent,
            committed.saturating_add(filling),
            0,
        )
    }

    /// Whether the fills under way stay under the hard limit with every committed entry evicted:
    /// past that, a fill would take the disk from others, so it stops.
    fn fills_fit(&self, committed: u64) -> bool {
        let filling = self.filling.load(Ordering::Relaxed);
        self.space
            .room(committed, filling)
            .within(self.hard_percent, filling, 0)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change to the state is one call on the index or the map; a panic cannot tear it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn temporary(&self, key: &Key) -> io::Result<(PathBuf, fs::File)> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = self
            .tmp
            .join(format!("{key}.{}", NEXT.fetch_add(1, Ordering::Relaxed)));
        let file = fs::File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok((path, file))
    }

    fn discard(&self, key: &Key) {
        let mut state = self.lock();
        if state.index.remove(key.as_str()).is_some() {
            let _ = fs::remove_file(self.data.join(key.as_str()));
        }
        self.metrics.stored(state.index.len(), state.index.bytes());
    }

    /// Moves a complete temporary file into place, evicting least recently used entries first
    /// so the cache stays under its soft limit; an entry that cannot fit is not kept.
    fn commit(&self, key: &Key, temporary: &Path, size: u64, meta: Arc<EntryMeta>) -> bool {
        let mut state = self.lock();
        let replaced = state.index.remove(key.as_str()).is_some();
        let room = self
            .space
            .room(state.index.bytes(), self.filling.load(Ordering::Relaxed));
        let committed = if !room.within(self.soft_percent, 0, size) {
            info!(%key, size, capacity = room.capacity, "not cached: larger than the cache may hold");
            self.metrics.discarded("too_large");
            let _ = fs::remove_file(temporary);
            false
        } else {
            while !room.within(self.soft_percent, state.index.bytes(), size) {
                let Some(oldest) = state.index.oldest().map(str::to_owned) else {
                    break;
                };
                if let Some(freed) = state.index.remove(&oldest) {
                    let _ = fs::remove_file(self.data.join(&oldest));
                    self.metrics.evicted();
                    debug!(key = %oldest, bytes = freed, "evicted (least recently used)");
                }
            }
            match fs::rename(temporary, self.data.join(key.as_str())) {
                Ok(()) => {
                    state.index.insert(key.as_str(), size, meta);
                    self.metrics.committed();
                    true
                }
                Err(error) => {
                    warn!(%key, %error, "not cached: the entry could not be moved into place");
                    self.metrics.discarded("io");
                    let _ = fs::remove_file(temporary);
                    false
                }
            }
        };
        if replaced && !committed {
            let _ = fs::remove_file(self.data.join(key.as_str()));
        }
        self.metrics.stored(state.index.len(), state.index.bytes());
        committed
    }

    /// Ends a download: waiters see `outcome`, later lookups see the index.
    fn finish(&self, key: &Key, download: &Arc<Download>, outcome: Progress) {
        let mut state = self.lock();
        if state
            .downloads
            .get(key)
            .is_some_and(|d| Arc::ptr_eq(d, download))
        {
            state.downloads.remove(key);
        }
        drop(state);
        download.progress.send_replace(outcome);
    }
}

/// A wait for another request's download.
pub struct Pending {
    download: Arc<Download>,
}

impl Pending {
    /// A reader of the download once it streams; `None` when its filler gave up or failed
    /// before the first byte (look the key up again).
    pub async fn ready(self) -> Option<Reader> {
        let mut progress = self.download.progress.subscribe();
        let streaming = progress
            .wait_for(|p| !matches!(p, Progress::Connecting))
            .await
            .ok()
            .is_some_and(|p| matches!(*p, Progress::Streaming { .. } | Progress::Done { .. }));
        if !streaming {
            return None;
        }
        let (file, meta, len) = self.download.source.get()?;
        Some(Reader::download(
            Arc::clone(file),
            Arc::clone(meta),
            *len,
            progress,
        ))
    }
}

/// The right and duty to fill one key.
pub struct Filler {
    cache: FileCache,
    key: Key,
    download: Arc<Download>,
    filling: bool,
}

impl Filler {
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// Whether an entry of `len` bytes (when known) could be kept; when not, drop the filler
    /// and relay.
    pub fn fits(&self, len: Option<u64>) -> bool {
        let inner = &self.cache.inner;
        let committed = inner.lock().index.bytes();
        let room = inner
            .space
            .room(committed, inner.filling.load(Ordering::Relaxed));
        room.within(inner.soft_percent, 0, len.unwrap_or(0))
    }

    /// Starts filling from `body` (the upstream answer's bytes, `len` of them when known,
    /// with SHA-256 `expected` when the key vouches for one) and returns this request's
    /// reader. The fill runs on its own: it completes even if every reader goes away.
    pub fn fill<S, E>(mut self, meta: EntryMeta, len: Option<u64>, body: S) -> io::Result<Reader>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        let inner = &self.cache.inner;
        let (path, file) = inner.temporary(&self.key)?;
        let reading = match file.try_clone() {
            Ok(reading) => Arc::new(reading),
            Err(error) => {
                let _ = fs::remove_file(&path);
                return Err(error);
            }
        };
        let meta = Arc::new(meta);
        // Set once, here: the filler is consumed.
        let _ = self
            .download
            .source
            .set((Arc::clone(&reading), Arc::clone(&meta), len));
        let progress = self.download.progress.subscribe();
        self.download
            .progress
            .send_replace(Progress::Streaming { visible: 0 });
        self.filling = true;
        let reader = Reader::download(reading, Arc::clone(&meta), len, progress);
        let fill = Fill {
            cache: self.cache.clone(),
            key: self.key.clone(),
            download: Arc::clone(&self.download),
            path,
            meta,
            len,
            counted: AtomicU64::new(0),
            finished: false,
        };
        tokio::spawn(fill.run(file, body));
        Ok(reader)
    }
}

impl Drop for Filler {
    fn drop(&mut self) {
        if !self.filling {
            self.cache
                .inner
                .finish(&self.key, &self.download, Progress::Abandoned);
        }
    }
}

/// A fill in progress: upstream bytes into the temporary file, then the verdict.
struct Fill {
    cache: FileCache,
    key: Key,
    download: Arc<Download>,
    path: PathBuf,
    meta: Arc<EntryMeta>,
    len: Option<u64>,
    /// What this fill added to the cache's `filling` bytes.
    counted: AtomicU64,
    finished: bool,
}

/// A fill stopped before its verdict (its task panicked or the runtime shut down): its readers
/// must not wait for ever, and its bytes are no longer being filled.
impl Drop for Fill {
    fn drop(&mut self) {
        self.uncount();
        if !self.finished {
            let _ = fs::remove_file(&self.path);
            let outcome = Progress::Failed("the fill stopped before its verdict".into());
            self.cache.inner.finish(&self.key, &self.download, outcome);
        }
    }
}

impl Fill {
    fn count(&self, bytes: u64) {
        self.counted.fetch_add(bytes, Ordering::Relaxed);
        self.cache.inner.filling.fetch_add(bytes, Ordering::Relaxed);
    }

    fn uncount(&self) {
        let counted = self.counted.swap(0, Ordering::Relaxed);
        self.cache
            .inner
            .filling
            .fetch_sub(counted, Ordering::Relaxed);
    }

    async fn run<S, E>(mut self, file: fs::File, body: S)
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        let outcome = match self.write(file, body).await {
            Ok(size) => {
                // From here its bytes are the commit's to count.
                self.uncount();
                let (cache, key, path, meta) = (
                    self.cache.clone(),
                    self.key.clone(),
                    self.path.clone(),
                    Arc::clone(&self.meta),
                );
                // Renames and evictions touch the disk: off the async workers.
                let committed = tokio::task::spawn_blocking(move || {
                    cache.inner.commit(&key, &path, size, meta)
                })
                .await
                .unwrap_or_else(|_| {
                    let _ = fs::remove_file(&self.path);
                    false
                });
                if committed {
                    info!(key = %self.key, size, url = self.meta.url.as_deref().unwrap_or(""), "cached");
                }
                Progress::Done { size }
            }
            Err(why) => {
                warn!(key = %self.key, url = self.meta.url.as_deref().unwrap_or(""), reason = %why, "not cached: the download failed; its clients get an error");
                self.cache.inner.metrics.discarded("download");
                let _ = fs::remove_file(&self.path);
                Progress::Failed(why.into())
            }
        };
        self.finished = true;
        self.uncount();
        self.cache.inner.finish(&self.key, &self.download, outcome);
    }

    /// Writes the body to `file` in batches, showing readers all but the last byte; checks the
    /// length and digest. The number of bytes on success.
    async fn write<S, E>(&self, file: fs::File, mut body: S) -> Result<u64, String>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        let mut sink = Some((file, Sha256::new()));
        let mut batch: Vec<Bytes> = Vec::new();
        let (mut batched, mut written) = (0usize, 0u64);
        let stall = self.cache.inner.stall_timeout;
        loop {
            let next = tokio::time::timeout(stall, body.next())
                .await
                .map_err(|_| format!("upstream sent nothing for {} ms", stall.as_millis()))?;
            let end = match next {
                Some(Ok(chunk)) => {
                    batched += chunk.len();
                    batch.push(chunk);
                    false
                }
                Some(Err(error)) => return Err(format!("upstream body failed: {error}")),
                None => true,
            };
            if batched >= WRITE_BATCH || (end && batched > 0) {
                let (mut file, mut hasher) = sink.take().ok_or("the cache file was lost")?;
                let chunks = std::mem::take(&mut batch);
                let result = tokio::task::spawn_blocking(move || {
                    for chunk in &chunks {
                        file.write_all(chunk)?;
                        hasher.update(chunk);
                    }
                    Ok::<_, io::Error>((file, hasher))
                })
                .await
                .map_err(|e| format!("writing the cache file: {e}"))?
                .map_err(|e| format!("writing the cache file: {e}"))?;
                sink = Some(result);
                written += batched as u64;
                self.count(batched as u64);
                batched = 0;
                let committed = self.cache.inner.lock().index.bytes();
                if !self.cache.inner.fills_fit(committed) {
                    let mut state = self.cache.inner.lock();
                    if state.too_large.len() >= TOO_LARGE_KEYS {
                        state.too_large.clear();
                    }
                    state.too_large.insert(self.key.clone());
                    return Err(
                        "the file outgrew the cache's hard limit; it is relayed from now on"
                            .to_owned(),
                    );
                }
                if self.len.is_some_and(|len| written > len) {
                    return Err(format!(
                        "upstream sent more than its Content-Length ({} bytes)",
                        self.len.unwrap_or(0)
                    ));
                }
                self.download.progress.send_replace(Progress::Streaming {
                    visible: written - 1,
                });
            }
            if end {
                break;
            }
        }
        if let Some(len) = self.len {
            if written != len {
                return Err(format!("upstream sent {written} of {len} bytes"));
            }
        }
        let (file, hasher) = sink.ok_or("the cache file was lost")?;
        if let Some(expected) = self.key.sha256() {
            let actual = hex::encode(hasher.finalize());
            if actual != expected {
                return Err(format!(
                    "the content's SHA-256 is {actual}, not the {expected} asked for"
                ));
            }
        }
        tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .map_err(|e| format!("syncing the cache file: {e}"))?
            .map_err(|e| format!("syncing the cache file: {e}"))?;
        Ok(written)
    }
}

#[cfg(test)]
mod tests;
