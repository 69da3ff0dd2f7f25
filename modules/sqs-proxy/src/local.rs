//! The embedded durable queue (`--queue local`): an append-only log of segment files in
//! `--queue-dir`, one record per message and one per delete, each checked by a CRC32.
//!
//! A single writer thread appends and `fdatasync`s; concurrent senders share one sync (group
//! commit), and a send returns only after the sync, so an acknowledged message survives a crash
//! or `kill -9`. The index of pending messages lives in memory (ids and file offsets, not
//! bodies) and is rebuilt by replaying the segments at start. A damaged tail of the last segment
//! (a crash mid-write: never acknowledged) is copied aside, then cut off; damage anywhere else
//! stops the start with the file named. Segments whose messages are all deleted are removed,
//! oldest first. Received messages stay invisible for the visibility timeout, then come back
//! unless deleted (at-least-once, like SQS). One process owns a directory at a time (an advisory
//! lock, released only after the writer has stopped).

use std::{
    collections::{BTreeMap, HashMap},
    fs::{self, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    thread::JoinHandle,
    time::Duration,
};

use tokio::{
    sync::{Notify, mpsc, oneshot},
    time::Instant,
};
use tracing::{error, info, warn};
use uuid::Uuid;

use crate::queue::{Queue, QueueError, Received};

/// A segment is closed and a new one started past this size.
const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// One commit writes at most about this much (plus one message), bounding the writer's buffer.
const COMMIT_BYTES: usize = 8 * 1024 * 1024;
/// Length, CRC32, kind, message id.
const HEADER_BYTES: usize = 4 + 4 + 1 + 16;
const KIND_MESSAGE: u8 = 1;
const KIND_DELETE: u8 = 2;

/// How the local queue bounds its work.
#[derive(Clone, Copy, Debug)]
pub struct LocalSettings {
    /// Longest a send waits for its write; a disk that stalls longer gets senders a 503.
    pub send_timeout: Duration,
    /// Messages waiting for the writer at once; senders beyond wait (within `send_timeout`).
    pub backlog: usize,
}

impl Default for LocalSettings {
    fn default() -> Self {
        LocalSettings {
            send_timeout: Duration::from_secs(10),
            backlog: 1024,
        }
    }
}

/// Where a pending message's body lies on disk.
#[derive(Clone, Copy, Debug)]
struct Entry {
    id: Uuid,
    segment: u64,
    offset: u64,
    len: u32,
    receive_count: u32,
    invisible_until: Option<Instant>,
    /// The receipt generation that may delete it; bumped by every receive.
    generation: u64,
}

#[derive(Default)]
struct Index {
    /// Pending messages in arrival order.
    pending: BTreeMap<u64, Entry>,
    by_id: HashMap<Uuid, u64>,
    /// Pending messages per segment; segments with none are removed, oldest first.
    live: BTreeMap<u64, usize>,
    next_order: u64,
    next_generation: u64,
}

impl Index {
    fn add(&mut self, id: Uuid, segment: u64, offset: u64, len: u32) {
        let order = self.next_order;
        self.next_order += 1;
        self.pending.insert(
            order,
            Entry {
                id,
                segment,
                offset,
                len,
                receive_count: 0,
                invisible_until: None,
                generation: 0,
            },
        );
        self.by_id.insert(id, order);
        *self.live.entry(segment).or_default() += 1;
    }

    fn remove(&mut self, id: &Uuid) {
        if let Some(order) = self.by_id.remove(id)
            && let Some(entry) = self.pending.remove(&order)
            && let Some(count) = self.live.get_mut(&entry.segment)
        {
            *count = count.saturating_sub(1);
        }
    }

    /// Whether the receipt `generation` still holds message `id` (received, not yet visible again).
    fn holds(&self, id: &Uuid, generation: u64, now: Instant) -> bool {
        self.by_id
            .get(id)
            .and_then(|order| self.pending.get(order))
            .is_some_and(|e| {
                e.generation == generation && e.invisible_until.is_some_and(|t| t > now)
            })
    }

    /// Segments before `current` with no pending message, oldest first, up to the first live one.
    fn take_dead_segments(&mut self, current: u64) -> Vec<u64> {
        let mut dead = Vec::new();
        while let Some((&segment, &count)) = self.live.first_key_value() {
            if segment >= current || count > 0 {
                break;
            }
            self.live.remove(&segment);
            dead.push(segment);
        }
        dead
    }
}

enum Record {
    Message {
        id: Uuid,
        body: String,
    },
    /// Deletes message `id` if receipt `generation` still holds it (checked by the writer).
    Delete {
        id: Uuid,
        generation: u64,
    },
}

struct Append {
    record: Record,
    done: oneshot::Sender<Result<(), QueueError>>,
}

struct Shared {
    dir: PathBuf,
    index: Mutex<Index>,
    arrived: Notify,
    /// The last write failure, until a write succeeds again (health reports it).
    failure: Mutex<Option<String>>,
}

impl Shared {
    fn index(&self) -> MutexGuard<'_, Index> {
        // The index stays consistent between statements, so a panic elsewhere leaves it usable.
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_failure(&self, failure: Option<String>) {
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = failure;
    }

    fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The durable local queue. Cheap to share behind an `Arc`.
pub struct LocalQueue {
    shared: Arc<Shared>,
    appends: mpsc::Sender<Append>,
    settings: LocalSettings,
    /// Joined on drop, so the directory is free once the queue is gone.
    writer: Option<JoinHandle<()>>,
    /// Held for the queue's life: one process per directory. Declared after `writer`, and
    /// released only after the writer thread ended.
    _lock: File,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot use queue directory {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "queue directory {0} is in use by another process (a running SQS proxy?); stop it, or run the puller inside it with --pull"
    )]
    Locked(PathBuf),
    #[error(
        "queue segment {path} is damaged at byte {offset} (not in the last segment, so not a torn write); move it aside to start without it"
    )]
    Corrupt { path: PathBuf, offset: u64 },
}

fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:020}.log"))
}

fn encode(record: &Record, out: &mut Vec<u8>) -> (u64, u32) {
    let (kind, id, body) = match record {
        Record::Message { id, body } => (KIND_MESSAGE, id, body.as_bytes()),
        Record::Delete { id, .. } => (KIND_DELETE, id, &[][..]),
    };
    // `send` refuses bodies of 4 GiB or more.
    let len = body.len() as u32;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&[kind]);
    crc.update(id.as_bytes());
    crc.update(body);
    out.extend(len.to_le_bytes());
    out.extend(crc.finalize().to_le_bytes());
    out.push(kind);
    out.extend(id.as_bytes());
    let body_offset = out.len() as u64;
    out.extend(body);
    (body_offset, len)
}

/// One record read back from a segment, or where reading stopped.
enum Decoded {
    Record {
        kind: u8,
        id: Uuid,
        body_offset: usize,
        len: u32,
        next: usize,
    },
    End,
    Damaged,
}

fn decode(bytes: &[u8], at: usize) -> Decoded {
    if at == bytes.len() {
        return Decoded::End;
    }
    let Some(header) = bytes.get(at..at + HEADER_BYTES) else {
        return Decoded::Damaged;
    };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let kind = header[8];
    let body_offset = at + HEADER_BYTES;
    let Some(body) = bytes.get(body_offset..body_offset + len as usize) else {
        return Decoded::Damaged;
    };
    let mut check = crc32fast::Hasher::new();
    check.update(&header[8..]);
    check.update(body);
    if check.finalize() != crc || !matches!(kind, KIND_MESSAGE | KIND_DELETE) {
        return Decoded::Damaged;
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&header[9..25]);
    Decoded::Record {
        kind,
        id: Uuid::from_bytes(id),
        body_offset,
        len,
        next: body_offset + len as usize,
    }
}

/// Whole records that decode somewhere after `from` (a torn write can leave later pages intact;
/// anything else is damage the operator should look at).
fn records_after(bytes: &[u8], from: usize) -> usize {
    let (mut at, mut found) = (from + 1, 0);
    while at < bytes.len() {
        match decode(bytes, at) {
            Decoded::Record { next, .. } => {
                found += 1;
                at = next;
            }
            _ => at += 1,
        }
    }
    found
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Copies the damaged tail of `path` (from `at`) to a file beside it, then cuts it off.
fn set_aside_tail(
    dir: &Path,
    segment: u64,
    path: &Path,
    bytes: &[u8],
    at: usize,
) -> io::Result<PathBuf> {
    let aside = dir.join(format!("{segment:020}.damaged-at-{at}"));
    let mut copy = File::create(&aside)?;
    copy.write_all(&bytes[at..])?;
    copy.sync_all()?;
    let file = OpenOptions::new().write(true).open(path)?;
    file.set_len(at as u64)?;
    file.sync_all()?;
    sync_dir(dir)?;
    Ok(aside)
}

impl LocalQueue {
    /// Opens (or creates) the queue in `dir` and replays what it holds.
    pub fn open(dir: &Path, settings: LocalSettings) -> Result<Arc<Self>, OpenError> {
        let io_error = |source| OpenError::Io {
            path: dir.to_owned(),
            source,
        };
        fs::create_dir_all(dir).map_err(io_error)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))
            .map_err(io_error)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(OpenError::Locked(dir.to_owned())),
            Err(fs::TryLockError::Error(e)) => return Err(io_error(e)),
        }

        let mut segments: Vec<u64> = fs::read_dir(dir)
            .map_err(io_error)?
            .filter_map(|entry| {
                let name = entry.ok()?.file_name();
                name.to_str()?.strip_suffix(".log")?.parse().ok()
            })
            .collect();
        segments.sort_unstable();

        let mut index = Index::default();
        let mut tail = 0;
        for (position, &segment) in segments.iter().enumerate() {
            let path = segment_path(dir, segment);
            let bytes = fs::read(&path).map_err(io_error)?;
            let mut at = 0;
            loop {
                match decode(&bytes, at) {
                    Decoded::Record {
                        kind,
                        id,
                        body_offset,
                        len,
                        next,
                    } => {
                        if kind == KIND_MESSAGE {
                            index.add(id, segment, body_offset as u64, len);
                        } else {
                            index.remove(&id);
                        }
                        at = next;
                    }
                    Decoded::End => break,
                    Decoded::Damaged if position + 1 == segments.len() => {
                        let later = records_after(&bytes, at);
                        let aside =
                            set_aside_tail(dir, segment, &path, &bytes, at).map_err(io_error)?;
                        if later == 0 {
                            warn!(segment = %path.display(), offset = at, set_aside = %aside.display(), "cut off a torn write at the end of the queue (a crash mid-write; it was never acknowledged)");
                        } else {
                            error!(segment = %path.display(), offset = at, set_aside = %aside.display(), whole_records_after = later, "the queue's last segment is damaged before its end; the rest was set aside and may hold messages to recover by hand");
                        }
                        break;
                    }
                    Decoded::Damaged => {
                        return Err(OpenError::Corrupt {
                            path,
                            offset: at as u64,
                        });
                    }
                }
            }
            tail = at as u64;
            index.live.entry(segment).or_default();
        }
        let (current, size) = match segments.last() {
            Some(&last) => (last, tail),
            None => (1, 0),
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(dir, current))
            .map_err(io_error)?;
        sync_dir(dir).map_err(io_error)?;
        index.live.entry(current).or_default();
        for segment in index.take_dead_segments(current) {
            fs::remove_file(segment_path(dir, segment)).map_err(io_error)?;
        }
        info!(dir = %dir.display(), pending = index.pending.len(), segments = index.live.len(), "local queue opened");

        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            index: Mutex::new(index),
            arrived: Notify::new(),
            failure: Mutex::new(None),
        });
        let (appends, incoming) = mpsc::channel(settings.backlog.max(1));
        let writer = Writer {
            shared: Arc::clone(&shared),
            file,
            segment: current,
            size,
            broken: None,
        };
        let writer = std::thread::Builder::new()
            .name("local-queue-writer".to_owned())
            .spawn(move || writer.run(incoming))
            .map_err(io_error)?;
        Ok(Arc::new(LocalQueue {
            shared,
            appends,
            settings,
            writer: Some(writer),
            _lock: lock,
        }))
    }

    /// Messages stored and not deleted, and how many of them are received and invisible now.
    pub fn depth(&self) -> (usize, usize) {
        let index = self.shared.index();
        let now = Instant::now();
        let invisible = index
            .pending
            .values()
            .filter(|e| e.invisible_until.is_some_and(|t| t > now))
            .count();
        (index.pending.len(), invisible)
    }

    async fn append(&self, record: Record) -> Result<(), QueueError> {
        let stopped = || QueueError::Unavailable("the local queue's writer stopped".into());
        let (done, written) = oneshot::channel();
        self.appends
            .send(Append { record, done })
            .await
            .map_err(|_| stopped())?;
        written.await.map_err(|_| stopped())?
    }

    /// Each entry's body, or why it could not be read.
    fn read_bodies(dir: &Path, entries: &[Entry]) -> Vec<io::Result<String>> {
        let mut open: HashMap<u64, File> = HashMap::new();
        entries
            .iter()
            .map(|entry| {
                let file = match open.entry(entry.segment) {
                    std::collections::hash_map::Entry::Occupied(file) => file.into_mut(),
                    std::collections::hash_map::Entry::Vacant(slot) => {
                        slot.insert(File::open(segment_path(dir, entry.segment))?)
                    }
                };
                let mut body = vec![0u8; entry.len as usize];
                file.read_exact_at(&mut body, entry.offset)?;
                String::from_utf8(body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
            })
            .collect()
    }
}

impl Drop for LocalQueue {
    fn drop(&mut self) {
        // Closing the channel ends the writer after its current commit (milliseconds).
        self.appends = mpsc::channel(1).0;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// Owns the open segment; the only code that writes to the queue's files.
struct Writer {
    shared: Arc<Shared>,
    file: File,
    segment: u64,
    size: u64,
    /// Set when a partial write could not be cut off: the file no longer ends where the index
    /// thinks, so nothing more is written until a restart replays it.
    broken: Option<String>,
}

impl Writer {
    fn run(mut self, mut incoming: mpsc::Receiver<Append>) {
        let mut batch = Vec::new();
        while let Some(first) = incoming.blocking_recv() {
            let mut bytes = Self::size_of(&first.record);
            batch.push(first);
            while bytes < COMMIT_BYTES {
                match incoming.try_recv() {
                    Ok(next) => {
                        bytes += Self::size_of(&next.record);
                        batch.push(next);
                    }
                    Err(_) => break,
                }
            }
            self.commit(&mut batch);
        }
    }

    fn size_of(record: &Record) -> usize {
        HEADER_BYTES
            + match record {
                Record::Message { body, .. } => body.len(),
                Record::Delete { .. } => 0,
            }
    }

    /// Writes and syncs every append of `batch` at once, then applies them to the index.
    fn commit(&mut self, batch: &mut Vec<Append>) {
        if let Some(reason) = &self.broken {
            for append in batch.drain(..) {
                let _ = append
                    .done
                    .send(Err(QueueError::Unavailable(reason.clone())));
            }
            return;
        }
        // A delete whose receipt went stale since it was asked for is refused, not written:
        // the message was received again by someone else.
        let now = Instant::now();
        let mut accepted = Vec::with_capacity(batch.len());
        {
            let index = self.shared.index();
            for append in batch.drain(..) {
                match append.record {
                    Record::Delete { id, generation } if !index.holds(&id, generation, now) => {
                        let _ = append
                            .done
                            .send(Err(QueueError::StaleReceipt(format!("{id}.{generation}"))));
                    }
                    _ => accepted.push(append),
                }
            }
        }
        let mut bytes = Vec::new();
        let mut placed = Vec::with_capacity(accepted.len());
        for append in &accepted {
            let (body_offset, len) = encode(&append.record, &mut bytes);
            placed.push((self.size + body_offset, len));
        }
        let written = self
            .file
            .write_all(&bytes)
            .and_then(|()| self.file.sync_data());
        if let Err(write_error) = written {
            let segment = segment_path(&self.shared.dir, self.segment);
            let reason = format!("writing {}: {write_error}", segment.display());
            warn!(%reason, messages = accepted.len(), "local queue write failed; nothing of this batch was acknowledged");
            // Cut a partial write off so the next record starts where the index expects it.
            if let Err(cut_error) = self.file.set_len(self.size) {
                let broken = format!(
                    "{reason}; cutting the partial write off failed too ({cut_error}); restart the proxy (the damaged tail is set aside at start)"
                );
                error!(%broken, "local queue stopped writing");
                self.broken = Some(broken);
            }
            self.shared
                .set_failure(Some(self.broken.clone().unwrap_or(reason.clone())));
            for append in accepted {
                let _ = append.done.send(Err(QueueError::Storage(io::Error::new(
                    write_error.kind(),
                    reason.clone(),
                ))));
            }
            return;
        }
        self.shared.set_failure(None);
        self.size += bytes.len() as u64;
        let mut arrived = false;
        {
            let mut index = self.shared.index();
            for (append, (offset, len)) in accepted.iter().zip(placed) {
                match &append.record {
                    Record::Message { id, .. } => {
                        index.add(*id, self.segment, offset, len);
                        arrived = true;
                    }
                    Record::Delete { id, .. } => index.remove(id),
                }
            }
        }
        for append in accepted {
            let _ = append.done.send(Ok(()));
        }
        if arrived {
            self.shared.arrived.notify_waiters();
        }
        if self.size >= SEGMENT_BYTES
            && let Err(error) = self.roll()
        {
            warn!(dir = %self.shared.dir.display(), %error, "cannot start a new queue segment; appending to the current one");
        }
        self.remove_dead_segments();
    }

    fn roll(&mut self) -> io::Result<()> {
        let next = self.segment + 1;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(&self.shared.dir, next))?;
        sync_dir(&self.shared.dir)?;
        self.shared.index().live.entry(next).or_default();
        self.file = file;
        self.segment = next;
        self.size = 0;
        Ok(())
    }

    fn remove_dead_segments(&self) {
        let dead = self.shared.index().take_dead_segments(self.segment);
        for segment in dead {
            let path = segment_path(&self.shared.dir, segment);
            if let Err(error) = fs::remove_file(&path) {
                warn!(segment = %path.display(), %error, "cannot remove a fully deleted queue segment");
            }
        }
    }
}

fn parse_receipt(receipt: &str) -> Option<(Uuid, u64)> {
    let (id, generation) = receipt.split_once('.')?;
    Some((id.parse().ok()?, generation.parse().ok()?))
}

#[tonic::async_trait]
impl Queue for LocalQueue {
    fn describe(&self) -> String {
        format!("local {}", self.shared.dir.display())
    }

    async fn send(&self, body: String) -> Result<String, QueueError> {
        if u32::try_from(body.len()).is_err() {
            return Err(QueueError::Refused("a message must be under 4 GiB".into()));
        }
        let id = Uuid::new_v4();
        // On timeout the write may still land: the sender, told 503, may send it again
        // (a duplicate, never a loss).
        tokio::time::timeout(
            self.settings.send_timeout,
            self.append(Record::Message { id, body }),
        )
        .await
        .map_err(|_| QueueError::Busy(self.appends.max_capacity() - self.appends.capacity()))??;
        Ok(id.to_string())
    }

    async fn receive(
        &self,
        max: usize,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<Received>, QueueError> {
        let deadline = Instant::now() + wait;
        loop {
            let arrived = self.shared.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let now = Instant::now();
            let mut next_visible: Option<Instant> = None;
            let taken: Vec<Entry> = {
                let mut index = self.shared.index();
                let mut generation = index.next_generation;
                let mut taken = Vec::new();
                for entry in index.pending.values_mut() {
                    if taken.len() == max {
                        break;
                    }
                    match entry.invisible_until {
                        Some(until) if until > now => {
                            next_visible = Some(next_visible.map_or(until, |t| t.min(until)));
                        }
                        _ => {
                            generation += 1;
                            entry.generation = generation;
                            entry.receive_count += 1;
                            entry.invisible_until = Some(now + visibility);
                            taken.push(*entry);
                        }
                    }
                }
                index.next_generation = generation;
                taken
            };
            if !taken.is_empty() {
                let dir = self.shared.dir.clone();
                let reading = taken.clone();
                let bodies = tokio::task::spawn_blocking(move || Self::read_bodies(&dir, &reading))
                    .await
                    .map_err(|e| QueueError::Storage(io::Error::other(e)))?;
                let mut received = Vec::with_capacity(taken.len());
                for (entry, body) in taken.into_iter().zip(bodies) {
                    match body {
                        Ok(body) => received.push(Received {
                            message_id: entry.id.to_string(),
                            body,
                            receipt: format!("{}.{}", entry.id, entry.generation),
                            receive_count: entry.receive_count,
                        }),
                        Err(read_error) => {
                            // It would fail the same way on every delivery: drop it, loudly.
                            error!(dir = %self.shared.dir.display(), message_id = %entry.id, %read_error, "an unreadable message was removed from the queue");
                            let _ = self
                                .append(Record::Delete {
                                    id: entry.id,
                                    generation: entry.generation,
                                })
                                .await;
                        }
                    }
                }
                if !received.is_empty() {
                    return Ok(received);
                }
                continue;
            }
            if now >= deadline {
                return Ok(Vec::new());
            }
            let until = next_visible.map_or(deadline, |t| t.min(deadline));
            tokio::select! {
                () = arrived => {}
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }

    async fn delete(&self, receipt: &str) -> Result<(), QueueError> {
        let (id, generation) =
            parse_receipt(receipt).ok_or_else(|| QueueError::StaleReceipt(receipt.to_owned()))?;
        self.append(Record::Delete { id, generation }).await
    }

    async fn check(&self) -> Result<String, String> {
        let (pending, invisible) = self.depth();
        if let Some(failure) = self.shared.failure() {
            return Err(format!("the last write failed: {failure}"));
        }
        if self.appends.is_closed() {
            return Err("the local queue's writer stopped; restart the proxy".into());
        }
        Ok(format!(
            "{pending} messages pending ({invisible} being handled) in {}",
            self.shared.dir.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Duration = Duration::ZERO;
    const LONG: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn survives_reopening_and_forgets_what_was_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let queue = LocalQueue::open(dir.path(), LocalSettings::default()).unwrap();
        let first = queue.send(r#"{"n":1}"#.into()).await.unwrap();
        let second = queue.send(r#"{"n":2}"#.into()).await.unwrap();
        let got = queue.receive(1, NOW, LONG).await.unwrap();
        assert_eq!(got[0].message_id, first);
        queue.delete(&got[0].receipt).await.unwrap();
        drop(queue);

        let queue = LocalQueue::open(dir.path(), LocalSettings::default()).unwrap();
        let got = queue.receive(10, NOW, LONG).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].message_id.as_str(), got[0].body.as_str()),
            (second.as_str(), r#"{"n":2}"#)
        );
    }

    #[tokio::test]
    async fn a_second_process_is_refused_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let _queue = LocalQueue::open(dir.path(), LocalSettings::default()).unwrap();
        let error = LocalQueue::open(dir.path(), LocalSettings::default())
            .err()
            .unwrap();
        assert!(matches!(error, OpenError::Locked(_)), "{error}");
    }

    #[tokio::test]
    async fn unacknowledged_messages_come_back_after_the_visibility_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let queue = LocalQueue::open(dir.path(), LocalSettings::default()).unwrap();
        queue.send("a".into()).await.unwrap();
        let first = queue
            .receive(10, NOW, Duration::from_millis(50))
            .await
            .unwrap();
        assert!(queue.receive(10, NOW, LONG).await.unwrap().is_empty());
        let again = queue.receive(10, LONG, LONG).await.unwrap();
        assert_eq!(again[0].message_id, first[0].message_id);
        assert_eq!(again[0].receive_count, 2);
        assert!(matches!(
            queue.delete(&first[0].receipt).await,
            Err(QueueError::StaleReceipt(_))
        ));
        queue.delete(&again[0].receipt).await.unwrap();
        assert_eq!(queue.depth(), (0, 0));
    }

    #[tokio::test]
    async fn a_long_poll_wakes_when_a_message_arrives() {
        let dir = tempfile::tempdir().unwrap();
        let queue = LocalQueue::open(dir.path(), LocalSettings::default()).unwrap();
        let waiting = {
            let queue = Arc::clone(&queue);
            tokio::spawn(async move { queue.receive(10, LONG, LONG).await })
        };
        tokio::task::yield_now().await;
        let id = queue.send("late".into()).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the long poll did not wake")
            .unwrap()
            .unwrap();
        assert_eq!(got[0].message_id, id);
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_off_and_damage_elsewhere_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let queue = LocalQueue::open(dir.path(), LocalSettings::default()).unwrap();
        let kept = queue.send("kept".into()).await.unwrap();
        drop(queue);
        let segment = segment_path(dir.path(), 1);
        let whole = fs::read(&segment).unwrap();
        let mut torn = whole.clone();
        torn.extend_from_slice(&whole[..HEADER_BYTES + 2]);
        fs::write(&segment, &torn).unwrap();

        let queue = LocalQueue::open(dir.path(), LocalSettings::default()).unwrap();
        assert_eq!(fs::read(&segment).unwrap(), whole);
        let aside = dir
            .path()
            .join(format!("{:020}.damaged-at-{}", 1, whole.len()));
        assert_eq!(
            fs::read(aside).unwrap(),
            &torn[whole.len()..],
            "the torn tail is kept aside"
        );
        let got = queue.receive(10, NOW, LONG).await.unwrap();
        assert_eq!(
            got.iter().map(|m| &m.message_id).collect::<Vec<_>>(),
            [&kept]
        );
        drop(queue);

        let mut damaged = whole.clone();
        damaged[HEADER_BYTES] ^= 0xff;
        fs::write(&segment, &damaged).unwrap();
        fs::write(segment_path(dir.path(), 2), b"").unwrap();
        let error = LocalQueue::open(dir.path(), LocalSettings::default())
            .err()
            .unwrap();
        assert!(
            matches!(error, OpenError::Corrupt { offset: 0, .. }),
            "{error}"
        );
    }

    #[test]
    fn fully_deleted_segments_go_oldest_first() {
        let mut index = Index::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        index.add(a, 1, 0, 1);
        index.add(b, 2, 0, 1);
        index.live.entry(3).or_default();
        index.remove(&b);
        assert!(
            index.take_dead_segments(3).is_empty(),
            "segment 1 still holds a"
        );
        index.remove(&a);
        assert_eq!(index.take_dead_segments(3), [1, 2]);
    }
}
