//! Live streams by `app/stream key`: one publisher each, any number of players. A stream keeps
//! what a player joining late needs to start at once on a keyframe: the metadata, the audio and
//! video sequence headers (codec configuration) and the current group of pictures (everything
//! since the last video keyframe).
//!
//! Fan-out never waits on a player: each has a bounded queue, and a player whose queue is full
//! skips ahead (everything until the next keyframe is dropped for it, so it resumes on a
//! picture it can decode). A player that keeps falling behind for [`LAG_LIMIT`] is dropped.
//! The publisher and the other players are never slowed down. When the publisher leaves, its
//! players are told ([`Media::Unpublished`]) and stay for the next one.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use rml_rtmp::sessions::StreamMetadata;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// How long a player may keep skipping before it is dropped.
pub const LAG_LIMIT: Duration = Duration::from_secs(10);
/// The most a group of pictures may hold; beyond it (a publisher sending no keyframes) it is
/// emptied and late joiners wait for the next keyframe.
const MAX_GOP_BYTES: usize = 32 * 1024 * 1024;
/// Audio messages kept for late joiners of a stream without video (a few seconds).
const MAX_AUDIO_ONLY: usize = 256;

/// One message of a live stream.
#[derive(Clone, Debug)]
pub enum Media {
    Video {
        timestamp: u32,
        data: Bytes,
        /// The message chunked for every player ([`crate::chunks`]), made by the first.
        chunked: Arc<OnceLock<Bytes>>,
    },
    Audio {
        timestamp: u32,
        data: Bytes,
        chunked: Arc<OnceLock<Bytes>>,
    },
    Metadata(Arc<StreamMetadata>),
    /// The publisher left; players stay for the next one (a reconnecting encoder).
    Unpublished,
}

impl Media {
    pub fn video(timestamp: u32, data: Bytes) -> Media {
        Media::Video {
            timestamp,
            data,
            chunked: Arc::default(),
        }
    }

    pub fn audio(timestamp: u32, data: Bytes) -> Media {
        Media::Audio {
            timestamp,
            data,
            chunked: Arc::default(),
        }
    }

    /// The message as chunks on the shared message stream, made once for all players.
    pub fn chunked(&self) -> Option<&Bytes> {
        match self {
            Media::Video {
                timestamp,
                data,
                chunked,
            } => Some(chunked.get_or_init(|| crate::chunks::video(*timestamp, data))),
            Media::Audio {
                timestamp,
                data,
                chunked,
            } => Some(chunked.get_or_init(|| crate::chunks::audio(*timestamp, data))),
            Media::Metadata(_) | Media::Unpublished => None,
        }
    }

    fn len(&self) -> usize {
        match self {
            Media::Video { data, .. } | Media::Audio { data, .. } => data.len(),
            Media::Metadata(_) | Media::Unpublished => 0,
        }
    }

    /// A video keyframe: frame type 1 in the FLV video tag's first byte (bits 4-6 in Enhanced
    /// RTMP's extended header, whose top bit is set; the high nibble otherwise).
    pub fn is_keyframe(&self) -> bool {
        match self {
            Media::Video { data, .. } => data.first().is_some_and(|b| {
                let frame_type = if b & 0x80 != 0 {
                    (b >> 4) & 0x07
                } else {
                    b >> 4
                };
                frame_type == 1
            }),
            _ => false,
        }
    }

    /// Codec configuration, which players need before any frame can be decoded: Enhanced
    /// RTMP's SequenceStart (packet type 0 in the low nibble), an AVC/HEVC sequence header
    /// (codec 7 or 12, packet type 0 in the second byte), or an AAC sequence header (sound
    /// format 10, packet type 0; sound format 9 is Enhanced RTMP audio with its packet type in
    /// the low nibble).
    fn is_sequence_header(&self) -> bool {
        match self {
            Media::Video { data, .. } => match data.first() {
                Some(b) if b & 0x80 != 0 => b & 0x0f == 0,
                Some(b) => matches!(b & 0x0f, 7 | 12) && data.get(1) == Some(&0),
                None => false,
            },
            Media::Audio { data, .. } => match data.first() {
                Some(b) if b >> 4 == 9 => b & 0x0f == 0,
                Some(b) => b >> 4 == 10 && data.get(1) == Some(&0),
                None => false,
            },
            Media::Metadata(_) | Media::Unpublished => false,
        }
    }
}

/// A player's end of a stream.
pub struct Subscription {
    pub id: u64,
    /// Metadata, sequence headers and the current group of pictures, to send first.
    pub initial: Vec<Media>,
    /// Everything after; closed when the publisher leaves or the player fell too far behind.
    pub live: mpsc::Receiver<Media>,
}

struct Player {
    id: u64,
    queue: mpsc::Sender<Media>,
    /// Set when the queue was full: skip until the next keyframe.
    lagging_since: Option<Instant>,
}

#[derive(Default)]
struct State {
    publisher: Option<u64>,
    published_at: Option<Instant>,
    metadata: Option<Arc<StreamMetadata>>,
    video_header: Option<Media>,
    audio_header: Option<Media>,
    gop: Vec<Media>,
    gop_bytes: usize,
    players: Vec<Player>,
}

pub struct Stream {
    pub app: String,
    pub key: String,
    state: Mutex<State>,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

/// A stream as the stats page shows it.
#[derive(Serialize)]
pub struct StreamStats {
    pub app: String,
    pub key: String,
    pub publishing: bool,
    pub players: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Average incoming bitrate since the publisher started.
    pub bitrate_kbps: u64,
    pub publishing_seconds: u64,
}

impl Stream {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is plain data replaced field by field; a panic elsewhere cannot tear it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes sent to a player of this stream (for the stats).
    pub fn sent(&self, bytes: usize) {
        self.bytes_out.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    fn stats(&self) -> StreamStats {
        let state = self.state();
        let seconds = state.published_at.map(|at| at.elapsed().as_secs_f64());
        let bytes_in = self.bytes_in.load(Ordering::Relaxed);
        StreamStats {
            app: self.app.clone(),
            key: self.key.clone(),
            publishing: state.publisher.is_some(),
            players: state.players.len(),
            bytes_in,
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            bitrate_kbps: seconds
                .filter(|s| *s > 0.0)
                .map_or(0, |s| (bytes_in as f64 * 8.0 / 1000.0 / s) as u64),
            publishing_seconds: seconds.unwrap_or_default() as u64,
        }
    }
}

/// Every stream of this instance.
pub struct Streams {
    streams: Mutex<HashMap<(String, String), Arc<Stream>>>,
    next_id: AtomicU64,
    /// Each new player's queue length (`player_queue`).
    queue: std::sync::atomic::AtomicUsize,
    metrics: Arc<Metrics>,
}

/// Why a publisher was refused.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("stream {0} already has a publisher")]
    Taken(String),
}

/// The publisher's hold on its stream; dropping it ends the stream for its players.
pub struct Publishing {
    streams: Arc<Streams>,
    pub stream: Arc<Stream>,
    /// Tells this publish from a later one on the same key.
    pub id: u64,
}

impl Streams {
    pub fn new(queue: usize, metrics: Arc<Metrics>) -> Arc<Streams> {
        Arc::new(Streams {
            streams: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            queue: std::sync::atomic::AtomicUsize::new(queue.max(16)),
            metrics,
        })
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Arc<Stream>>> {
        // The map only gains and loses entries; a panic elsewhere cannot tear it.
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stream `app/key`, created if needed, with `attach` run on its state while the map
    /// is still locked: a stream cannot be forgotten between being found and being joined.
    fn attach<T>(
        &self,
        app: &str,
        key: &str,
        attach: impl FnOnce(&mut State) -> T,
    ) -> (Arc<Stream>, T) {
        let mut map = self.map();
        let stream = map
            .entry((app.to_owned(), key.to_owned()))
            .or_insert_with(|| {
                self.metrics.streams.inc();
                Arc::new(Stream {
                    app: app.to_owned(),
                    key: key.to_owned(),
                    state: Mutex::new(State::default()),
                    bytes_in: AtomicU64::new(0),
                    bytes_out: AtomicU64::new(0),
                })
            });
        let stream = Arc::clone(stream);
        let attached = attach(&mut stream.state());
        drop(map);
        (stream, attached)
    }

    /// Forgets a stream with neither publisher nor players.
    fn forget_if_idle(&self, stream: &Arc<Stream>) {
        let mut map = self.map();
        let idle = {
            let state = stream.state();
            state.publisher.is_none() && state.players.is_empty()
        };
        let key = (stream.app.clone(), stream.key.clone());
        if idle && map.get(&key).is_some_and(|s| Arc::ptr_eq(s, stream)) {
            map.remove(&key);
            self.metrics.streams.dec();
        }
    }

    pub fn publish(self: &Arc<Self>, app: &str, key: &str) -> Result<Publishing, PublishError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (stream, taken) = self.attach(app, key, |state| {
            if state.publisher.is_some() {
                return true;
            }
            state.publisher = Some(id);
            state.published_at = Some(Instant::now());
            false
        });
        if taken {
            self.forget_if_idle(&stream);
            return Err(PublishError::Taken(format!("{app}/{key}")));
        }
        self.metrics.publishers.inc();
        Ok(Publishing {
            streams: Arc::clone(self),
            stream,
            id,
        })
    }

    /// A player joins `app/key` (waiting for a publisher when there is none yet).
    pub fn subscribe(&self, app: &str, key: &str) -> (Arc<Stream>, Subscription) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (queue, live) = mpsc::channel(self.queue.load(Ordering::Relaxed));
        let (stream, initial) = self.attach(app, key, |state| {
            let initial = state
                .metadata
                .iter()
                .map(|m| Media::Metadata(Arc::clone(m)))
                .chain(state.video_header.clone())
                .chain(state.audio_header.clone())
                .chain(state.gop.iter().cloned())
                .collect();
            state.players.push(Player {
                id,
                queue,
                lagging_since: None,
            });
            initial
        });
        self.metrics.players.inc();
        (stream, Subscription { id, initial, live })
    }

    /// A player leaves.
    pub fn unsubscribe(&self, stream: &Arc<Stream>, id: u64) {
        let removed = {
            let mut state = stream.state();
            let before = state.players.len();
            state.players.retain(|p| p.id != id);
            before != state.players.len()
        };
        if removed {
            self.metrics.players.dec();
        }
        self.forget_if_idle(stream);
    }

    /// The queue length of players joining from now on.
    pub fn set_queue(&self, queue: usize) {
        self.queue.store(queue.max(16), Ordering::Relaxed);
    }

    /// The id of `app/key`'s publisher now, if it has one.
    pub fn publisher(&self, app: &str, key: &str) -> Option<u64> {
        let stream = self.map().get(&(app.to_owned(), key.to_owned())).cloned();
        stream.and_then(|s| s.state().publisher)
    }

    pub fn stats(&self) -> Vec<StreamStats> {
        let streams: Vec<Arc<Stream>> = self.map().values().cloned().collect();
        let mut stats: Vec<StreamStats> = streams.iter().map(|s| s.stats()).collect();
        stats.sort_by(|a, b| (&a.app, &a.key).cmp(&(&b.app, &b.key)));
        stats
    }
}

impl Publishing {
    /// One message from the publisher: kept for late joiners as needed, then offered to every
    /// player without waiting.
    pub fn push(&self, media: Media) {
        let metrics = &self.streams.metrics;
        let size = media.len();
        self.stream
            .bytes_in
            .fetch_add(size as u64, Ordering::Relaxed);
        metrics.bytes_received.inc_by(size as u64);
        let mut state = self.stream.state();
        match &media {
            Media::Metadata(metadata) => state.metadata = Some(Arc::clone(metadata)),
            Media::Video { .. } if media.is_sequence_header() => {
                state.video_header = Some(media.clone());
            }
            Media::Audio { .. } if media.is_sequence_header() => {
                state.audio_header = Some(media.clone());
            }
            _ => {
                if media.is_keyframe() {
                    state.gop.clear();
                    state.gop_bytes = 0;
                }
                let audio_only = state.video_header.is_none() && !media.is_keyframe();
                if state.gop_bytes + size > MAX_GOP_BYTES
                    || (audio_only && state.gop.len() >= MAX_AUDIO_ONLY)
                {
                    // No keyframe for too long (or no video at all): start over, so the cache
                    // never begins in the middle of a group of pictures.
                    state.gop.clear();
                    state.gop_bytes = 0;
                }
                state.gop_bytes += size;
                state.gop.push(media.clone());
            }
        }
        // A lagging player resumes on a keyframe (or, without video, on any audio frame).
        let resumable = media.is_keyframe()
            || (state.video_header.is_none() && matches!(media, Media::Audio { .. }));
        let now = Instant::now();
        let before = state.players.len();
        state.players.retain_mut(|player| {
            if let Some(since) = player.lagging_since {
                if now.duration_since(since) >= LAG_LIMIT {
                    metrics.players_dropped.inc();
                    return false;
                }
                if !resumable {
                    return true;
                }
            }
            match player.queue.try_send(media.clone()) {
                Ok(()) => {
                    player.lagging_since = None;
                    true
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    if player.lagging_since.is_none() {
                        metrics.player_skips.inc();
                        player.lagging_since = Some(now);
                    }
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        let gone = before - state.players.len();
        drop(state);
        metrics.players.sub(gone as i64);
    }
}

impl Drop for Publishing {
    fn drop(&mut self) {
        {
            let mut state = self.stream.state();
            if state.publisher != Some(self.id) {
                return;
            }
            let players = std::mem::take(&mut state.players);
            let before = players.len();
            *state = State::default();
            // Players stay for the next publisher (as with nginx-rtmp and SRS), told that this
            // one left; one too far behind to be told (or already gone) is let go.
            state.players = players
                .into_iter()
                .filter(|player| player.queue.try_send(Media::Unpublished).is_ok())
                .collect();
            let gone = before - state.players.len();
            self.streams.metrics.players.sub(gone as i64);
        }
        self.streams.metrics.publishers.dec();
        self.streams.forget_if_idle(&self.stream);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn video(keyframe: bool, timestamp: u32) -> Media {
        let first = if keyframe { 0x17 } else { 0x27 };
        Media::video(timestamp, Bytes::from(vec![first, 1, 0, 0, 0, 42]))
    }

    fn streams(queue: usize) -> Arc<Streams> {
        Streams::new(queue, Arc::new(Metrics::new(|o| o)))
    }

    #[test]
    fn late_players_start_with_headers_and_the_last_keyframe() {
        let streams = streams(16);
        let publishing = streams.publish("live", "k").unwrap();
        assert!(
            streams.publish("live", "k").is_err(),
            "one publisher per key"
        );
        publishing.push(Media::video(0, Bytes::from_static(&[0x17, 0, 0, 0, 0])));
        publishing.push(video(true, 0));
        publishing.push(video(false, 40));
        publishing.push(video(true, 80));
        publishing.push(video(false, 120));
        let (_, player) = streams.subscribe("live", "k");
        let timestamps: Vec<u32> = player
            .initial
            .iter()
            .map(|m| match m {
                Media::Video { timestamp, .. } => *timestamp,
                _ => u32::MAX,
            })
            .collect();
        assert_eq!(
            timestamps,
            vec![0, 80, 120],
            "sequence header, then the last GOP"
        );
        assert!(player.initial[1].is_keyframe());
    }

    #[test]
    fn enhanced_rtmp_and_legacy_headers() {
        let video = |bytes: &[u8]| Media::video(0, Bytes::copy_from_slice(bytes));
        // Enhanced RTMP HEVC: keyframe + SequenceStart, keyframe + CodedFrames, inter frame.
        assert!(video(b"\x90hvc1").is_keyframe() && video(b"\x90hvc1").is_sequence_header());
        assert!(video(b"\x91hvc1").is_keyframe() && !video(b"\x91hvc1").is_sequence_header());
        assert!(!video(b"\xa1hvc1").is_keyframe());
        // Legacy AVC: sequence header, keyframe NALUs, inter frame NALUs.
        assert!(video(&[0x17, 0]).is_sequence_header());
        assert!(video(&[0x17, 1]).is_keyframe() && !video(&[0x17, 1]).is_sequence_header());
        assert!(!video(&[0x27, 1]).is_keyframe());
        let aac = Media::audio(0, Bytes::from_static(&[0xaf, 0]));
        assert!(aac.is_sequence_header());
    }

    #[test]
    fn audio_only_streams_keep_a_few_seconds() {
        let streams = streams(16);
        let publishing = streams.publish("radio", "k").unwrap();
        for n in 0..1000 {
            publishing.push(Media::audio(n, Bytes::from_static(&[0xaf, 1, 9])));
        }
        let (_, player) = streams.subscribe("radio", "k");
        assert!(
            player.initial.len() <= MAX_AUDIO_ONLY,
            "{}",
            player.initial.len()
        );
    }

    #[test]
    fn a_full_player_skips_to_the_next_keyframe() {
        let streams = streams(16);
        let publishing = streams.publish("live", "k").unwrap();
        let (_, mut slow) = streams.subscribe("live", "k");
        let (_, mut fast) = streams.subscribe("live", "k");
        for n in 0..20 {
            publishing.push(video(false, n));
            while fast.live.try_recv().is_ok() {}
        }
        publishing.push(video(false, 100));
        publishing.push(video(true, 200));
        let mut seen = Vec::new();
        while let Ok(Media::Video { timestamp, .. }) = slow.live.try_recv() {
            seen.push(timestamp);
        }
        assert_eq!(seen.len(), 16, "the queue's worth");
        publishing.push(video(false, 300));
        publishing.push(video(true, 400));
        publishing.push(video(false, 500));
        let after: Vec<u32> = std::iter::from_fn(|| match slow.live.try_recv() {
            Ok(Media::Video { timestamp, .. }) => Some(timestamp),
            _ => None,
        })
        .collect();
        assert_eq!(after, vec![400, 500], "resumed on the keyframe");
        drop(publishing);
        let mut last = None;
        while let Ok(media) = fast.live.try_recv() {
            last = Some(media);
        }
        assert!(
            matches!(last, Some(Media::Unpublished)),
            "players are told the publisher left"
        );
        let again = streams.publish("live", "k").unwrap();
        again.push(Media::video(0, Bytes::from_static(&[0x17, 0, 0, 0, 0])));
        assert!(
            matches!(fast.live.try_recv(), Ok(Media::Video { timestamp: 0, .. })),
            "and get the next publisher's stream"
        );
    }
}
