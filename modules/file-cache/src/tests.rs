use std::{io, time::Duration};

use bytes::Bytes;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::{Config, EntryMeta, FileCache, Key, Lookup, Reader, reader::ReadError};

fn metrics() -> crate::CacheMetrics {
    crate::CacheMetrics::new("test", |opts| opts)
}

/// A cache whose limits never depend on how full this machine's disk is.
fn roomy(dir: &std::path::Path) -> Config {
    let mut config = Config::new(dir);
    config.soft_limit_percent = 100;
    config.hard_limit_percent = 100;
    config
}

fn open(dir: &std::path::Path, max_bytes: Option<u64>) -> FileCache {
    let mut config = roomy(dir);
    config.max_bytes = max_bytes;
    FileCache::open(&config, metrics()).unwrap()
}

/// A body the test feeds chunk by chunk.
fn channel_body() -> (
    mpsc::UnboundedSender<Result<Bytes, io::Error>>,
    impl futures_core::Stream<Item = Result<Bytes, io::Error>> + Send + Unpin + 'static,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (tx, Box::pin(stream))
}

async fn read_all(reader: Reader) -> Result<Vec<u8>, ReadError> {
    let mut stream = Box::pin(reader.into_stream());
    let mut all = Vec::new();
    while let Some(chunk) = stream.next().await {
        all.extend_from_slice(&chunk?);
    }
    Ok(all)
}

fn fetch(cache: &FileCache, key: &Key) -> crate::Filler {
    match cache.lookup(key, false) {
        Lookup::Fetch(filler) => filler,
        _ => panic!("expected to fetch {key}"),
    }
}

async fn wait(cache: &FileCache, key: &Key) -> Reader {
    match cache.lookup(key, false) {
        Lookup::Wait(pending) => pending.ready().await.expect("the download streams"),
        _ => panic!("expected a download under way for {key}"),
    }
}

fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn committed(cache: &FileCache, key: &Key) -> Option<Reader> {
    match cache.lookup(key, false) {
        Lookup::Hit(reader) => Some(reader),
        Lookup::Fetch(_) => None,
        _ => panic!("unexpected lookup result for {key}"),
    }
}

#[tokio::test]
async fn one_download_serves_every_reader_and_is_committed() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), None);
    let bytes = content(1_000_000, 7);
    let key = Key::digest(&hex::encode(Sha256::digest(&bytes))).unwrap();
    let filler = fetch(&cache, &key);
    let early = cache.lookup(&key, false);
    let (tx, body) = channel_body();
    let first = filler
        .fill(EntryMeta::default(), Some(bytes.len() as u64), body)
        .unwrap();
    let Lookup::Wait(early) = early else {
        panic!("a lookup while connecting waits")
    };
    let early = early.ready().await.unwrap();
    tx.send(Ok(Bytes::copy_from_slice(&bytes[..400_000])))
        .unwrap();
    let late = wait(&cache, &key).await;
    tx.send(Ok(Bytes::copy_from_slice(&bytes[400_000..])))
        .unwrap();
    drop(tx);
    for reader in [first, early, late] {
        assert_eq!(read_all(reader).await.unwrap(), bytes);
    }
    let hit = committed(&cache, &key).expect("committed after the download");
    assert!(hit.is_committed());
    assert_eq!(read_all(hit).await.unwrap(), bytes);
    assert_eq!(cache.usage(), (1, bytes.len() as u64));
}

#[tokio::test]
async fn a_download_cut_midway_fails_its_readers_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), None);
    let key = Key::url("http://example.test/cut");
    let (tx, body) = channel_body();
    let reader = fetch(&cache, &key)
        .fill(EntryMeta::default(), Some(1000), body)
        .unwrap();
    tx.send(Ok(Bytes::from(vec![1; 600]))).unwrap();
    tx.send(Err(io::Error::other("connection reset"))).unwrap();
    let error = read_all(reader).await.unwrap_err();
    assert!(error.to_string().contains("connection reset"), "{error}");
    let (tx, body) = channel_body();
    // Short: the stream ends before its length.
    let reader = fetch(&cache, &key)
        .fill(EntryMeta::default(), Some(1000), body)
        .unwrap();
    tx.send(Ok(Bytes::from(vec![1; 999]))).unwrap();
    drop(tx);
    let error = read_all(reader).await.unwrap_err();
    assert!(error.to_string().contains("999 of 1000"), "{error}");
    assert!(committed(&cache, &key).is_none());
    assert_eq!(cache.usage(), (0, 0));
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );
}

#[tokio::test]
async fn the_last_byte_waits_for_the_digest_check() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), None);
    let key = Key::digest(&"ab".repeat(32)).unwrap();
    let (tx, body) = channel_body();
    let mut reader = fetch(&cache, &key)
        .fill(EntryMeta::default(), None, body)
        .unwrap();
    tx.send(Ok(Bytes::from(vec![5; 300_000]))).unwrap();
    let mut read = 0;
    while read < 299_999 {
        read += reader.chunk().await.unwrap().unwrap().len();
    }
    assert_eq!(read, 299_999, "all but the last byte before the verdict");
    drop(tx);
    let error = reader.chunk().await.unwrap().unwrap_err();
    assert!(error.to_string().contains("SHA-256"), "{error}");
    assert!(committed(&cache, &key).is_none());
}

#[tokio::test]
async fn an_abandoned_fetch_lets_waiters_go() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), None);
    let key = Key::url("http://example.test/404");
    let filler = fetch(&cache, &key);
    let Lookup::Wait(pending) = cache.lookup(&key, false) else {
        panic!("expected to wait")
    };
    drop(filler);
    assert!(pending.ready().await.is_none());
    assert!(matches!(cache.lookup(&key, false), Lookup::Fetch(_)));
}

async fn store(cache: &FileCache, key: &Key, bytes: &[u8]) {
    let body = futures_util::stream::iter([Ok::<_, io::Error>(Bytes::copy_from_slice(bytes))]);
    let reader = fetch(cache, key)
        .fill(EntryMeta::default(), Some(bytes.len() as u64), body)
        .unwrap();
    read_all(reader).await.unwrap();
    // The reader ends at the verdict; the commit is done before it is announced.
    assert!(cache.contains(key), "{key} committed");
}

#[tokio::test]
async fn least_recently_used_entries_make_room_within_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), Some(3_000));
    let keys: Vec<Key> = (0..3).map(|i| Key::url(&format!("http://x/{i}"))).collect();
    for key in &keys {
        store(&cache, key, &[1; 1000]).await;
    }
    // The first is used again; the second is now the least recently used.
    assert!(committed(&cache, &keys[0]).is_some());
    let fourth = Key::url("http://x/3");
    store(&cache, &fourth, &[2; 1000]).await;
    assert_eq!(cache.usage(), (3, 3_000));
    assert!(cache.contains(&keys[0]) && cache.contains(&fourth));
    assert!(!cache.contains(&keys[1]));
    // Larger than the whole budget: refused when its size is known; when it is not, the fill
    // stops at the hard limit and the key is relayed from then on.
    let huge = Key::url("http://x/huge");
    let filler = fetch(&cache, &huge);
    assert!(!filler.fits(Some(5_000)));
    let body = futures_util::stream::iter([Ok::<_, io::Error>(Bytes::from(vec![3; 5_000]))]);
    let reader = filler.fill(EntryMeta::default(), None, body).unwrap();
    let error = read_all(reader).await.unwrap_err();
    assert!(error.to_string().contains("hard limit"), "{error}");
    assert!(matches!(cache.lookup(&huge, false), Lookup::Relay));
    assert!(cache.contains(&keys[0]), "the entries kept stay");
    assert_eq!(cache.usage(), (3, 3_000));
}

#[tokio::test]
async fn entries_survive_a_restart_and_strays_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let key = Key::url("http://x/kept");
    let meta = EntryMeta {
        content_type: Some("application/octet-stream".into()),
        compression: Some("zst".into()),
        ..EntryMeta::default()
    };
    {
        let cache = open(dir.path(), None);
        cache.insert(&key, meta.clone(), b"kept bytes").unwrap();
        cache
            .insert(&Key::url("http://x/lost"), EntryMeta::default(), b"lost")
            .unwrap();
    }
    std::fs::remove_file(
        dir.path()
            .join("data")
            .join(Key::url("http://x/lost").as_str()),
    )
    .unwrap();
    std::fs::write(dir.path().join("data").join("stray"), b"no index row").unwrap();
    std::fs::write(
        dir.path().join("tmp").join("half"),
        b"a fill cut by a crash",
    )
    .unwrap();
    let cache = open(dir.path(), None);
    assert_eq!(cache.usage(), (1, 10));
    let hit = committed(&cache, &key).unwrap();
    assert_eq!(hit.meta(), &meta);
    assert_eq!(read_all(hit).await.unwrap(), b"kept bytes");
    assert!(!dir.path().join("data").join("stray").exists());
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );
    drop(cache);
    let mut config = roomy(dir.path());
    config.wipe = true;
    let wiped = FileCache::open(&config, metrics()).unwrap();
    assert_eq!(wiped.usage(), (0, 0));
}

#[tokio::test]
async fn refetch_drops_the_entry_and_read_checks_the_digest() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), None);
    let bytes = b"module bytes".to_vec();
    let key = Key::digest(&hex::encode(Sha256::digest(&bytes))).unwrap();
    cache.insert(&key, EntryMeta::default(), &bytes).unwrap();
    assert_eq!(cache.read(&key).unwrap(), bytes);
    assert!(cache.insert(&key, EntryMeta::default(), b"other").is_err());
    std::fs::write(dir.path().join("data").join(key.as_str()), b"damaged bytes").unwrap();
    assert!(cache.read(&key).is_none(), "a damaged entry is not served");
    assert!(!cache.contains(&key));
    cache.insert(&key, EntryMeta::default(), &bytes).unwrap();
    assert!(matches!(cache.lookup(&key, true), Lookup::Fetch(_)));
    assert!(!cache.contains(&key));
    assert!(Key::digest("../../etc/passwd").is_none());
}

#[tokio::test]
async fn a_stalled_upstream_is_given_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = roomy(dir.path());
    config.stall_timeout = Duration::from_millis(200);
    let cache = FileCache::open(&config, metrics()).unwrap();
    let key = Key::url("http://x/stalled");
    let (tx, body) = channel_body();
    let reader = fetch(&cache, &key)
        .fill(EntryMeta::default(), None, body)
        .unwrap();
    tx.send(Ok(Bytes::from_static(b"a little"))).unwrap();
    let error = tokio::time::timeout(Duration::from_secs(10), read_all(reader))
        .await
        .expect("the fill gives up within its stall timeout")
        .unwrap_err();
    assert!(error.to_string().contains("nothing for 200 ms"), "{error}");
    drop(tx);
}
