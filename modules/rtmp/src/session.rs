//! One RTMP connection: the handshake, then an rml_rtmp `ServerSession` whose events decide what
//! the connection is. A publisher's media goes to its stream ([`crate::streams`]); a player
//! gets the stream's start-up part (metadata, sequence headers, current group of pictures) and
//! then its live queue. Every packet the session produces goes out in order on this one socket,
//! as RTMP's chunk header compression requires.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use marchproxy_runtime::Stats;
use rml_rtmp::{
    handshake::{Handshake, HandshakeProcessResult, PeerType},
    sessions::{ServerSession, ServerSessionConfig, ServerSessionEvent, ServerSessionResult},
    time::RtmpTimestamp,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, tcp::OwnedWriteHalf},
    sync::mpsc,
    time::timeout,
};
use tracing::{debug, info, warn};

use crate::{
    Rtmp,
    chunks::{CHUNK_SIZE, SHARED_STREAM_ID},
    streams::{Media, Publishing, Stream, Streams},
};

/// How long the handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one write to a peer may block (a player that stopped reading is closed).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a publisher (or a connection that neither publishes nor plays yet) may send
/// nothing: a publisher whose network died without a close must not hold its key for good.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long players stay after their publisher left, for it (or another) to come back.
const REPUBLISH_WAIT: Duration = Duration::from_secs(30);
/// Bytes read at a time (publishers send media; players only acknowledgements).
const READ_BUFFER: usize = 4 * 1024;
/// Queued messages sent to a player in one write.
const MAX_BATCH: usize = 64;
/// The write buffer a player keeps between writes.
const MAX_KEPT_BUFFER: usize = 4 * 1024;

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// A player's place in its stream; leaving it (dropping) unsubscribes.
struct Watching {
    streams: Arc<Streams>,
    stream: Arc<Stream>,
    id: u64,
    /// The RTMP message stream the player asked to play on.
    stream_id: u32,
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.streams.unsubscribe(&self.stream, self.id);
    }
}

/// What the connection is doing.
enum Role {
    Idle,
    Publishing(Publishing),
    Playing(Watching),
}

/// Completes `handshake` on `socket` (a client's has sent its first bytes already); returns
/// the bytes that came after it.
pub async fn handshake(socket: &mut TcpStream, mut handshake: Handshake) -> Result<Vec<u8>, Error> {
    let mut buffer = [0u8; 4096];
    timeout(HANDSHAKE_TIMEOUT, async {
        loop {
            let read = socket.read(&mut buffer).await?;
            if read == 0 {
                return Err("closed during the handshake".into());
            }
            match handshake.process_bytes(&buffer[..read])? {
                HandshakeProcessResult::InProgress { response_bytes } => {
                    socket.write_all(&response_bytes).await?;
                }
                HandshakeProcessResult::Completed {
                    response_bytes,
                    remaining_bytes,
                } => {
                    socket.write_all(&response_bytes).await?;
                    return Ok(remaining_bytes);
                }
            }
        }
    })
    .await
    .map_err(|_| "no handshake in time")?
}

pub async fn serve(rtmp: Arc<Rtmp>, mut socket: TcpStream, client: SocketAddr, stats: Arc<Stats>) {
    let _ = socket.set_nodelay(true);
    let remaining = match handshake(&mut socket, Handshake::new(PeerType::Server)).await {
        Ok(remaining) => remaining,
        Err(error) => {
            debug!(%client, %error, "RTMP handshake failed");
            return;
        }
    };
    let mut config = ServerSessionConfig::new();
    config.chunk_size = CHUNK_SIZE as u32;
    let (session, results) = match ServerSession::new(config) {
        Ok(created) => created,
        Err(error) => {
            warn!(%client, %error, "RTMP session not created");
            return;
        }
    };
    let (mut reader, writer) = socket.into_split();
    let mut connection = Connection {
        rtmp,
        session,
        writer,
        client,
        stats,
        role: Role::Idle,
        out: Vec::new(),
        waiting_since: None,
    };
    let mut live: Option<mpsc::Receiver<Media>> = None;
    let outcome = async {
        connection.handle(results, &mut live).await?;
        if !remaining.is_empty() {
            connection.input(&remaining, &mut live).await?;
        }
        let mut buffer = vec![0u8; READ_BUFFER];
        let mut heard = tokio::time::Instant::now();
        loop {
            // Players mostly listen (until their publisher has been gone too long); everyone
            // else must keep talking.
            let idle_until = match connection.role {
                Role::Playing(_) => connection.waiting_since.map(|since| since + REPUBLISH_WAIT),
                _ => Some(heard + IDLE_TIMEOUT),
            };
            tokio::select! {
                () = sleep_until(idle_until) => {
                    if matches!(connection.role, Role::Playing(_)) {
                        connection.finish_playing().await;
                        return Ok(());
                    }
                    return Err::<(), Error>(format!("nothing received for {} s", IDLE_TIMEOUT.as_secs()).into());
                }
                read = reader.read(&mut buffer) => {
                    let read = read?;
                    if read == 0 {
                        return Ok::<(), Error>(());
                    }
                    heard = tokio::time::Instant::now();
                    connection.stats.bytes_received(read as u64);
                    connection.input(&buffer[..read], &mut live).await?;
                }
                media = next(&mut live) => match media {
                    Some(media) => {
                        // Whatever else is queued goes in the same write.
                        let mut batch = vec![media];
                        while let Some(more) = live.as_mut().and_then(|l| l.try_recv().ok()) {
                            batch.push(more);
                            if batch.len() == MAX_BATCH {
                                break;
                            }
                        }
                        connection.play(batch).await?;
                    }
                    None => {
                        // This player fell too far behind and was let go.
                        connection.finish_playing().await;
                        return Ok(());
                    }
                },
            }
        }
    }
    .await;
    match (&outcome, &connection.role) {
        (Err(error), _) => debug!(client = %connection.client, %error, "RTMP connection closed"),
        (Ok(()), Role::Publishing(publishing)) => {
            info!(client = %connection.client, stream = %format!("{}/{}", publishing.stream.app, publishing.stream.key), "publisher left");
        }
        _ => {}
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

async fn next(live: &mut Option<mpsc::Receiver<Media>>) -> Option<Media> {
    match live {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

/// A stream key and its query arguments (`cam1?token=x`): the key names the stream, the
/// arguments go to the `on_publish` callback as nginx-rtmp passes them.
fn split_key(stream_key: &str) -> (&str, &str) {
    stream_key.split_once('?').unwrap_or((stream_key, ""))
}

struct Connection {
    rtmp: Arc<Rtmp>,
    session: ServerSession,
    writer: OwnedWriteHalf,
    client: SocketAddr,
    stats: Arc<Stats>,
    role: Role,
    /// Reused for each write to a player.
    out: Vec<u8>,
    /// A player's publisher left at this time and none has come back yet.
    waiting_since: Option<tokio::time::Instant>,
}

impl Connection {
    async fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        timeout(WRITE_TIMEOUT, self.writer.write_all(bytes))
            .await
            .map_err(|_| "the client stopped reading")??;
        self.stats.bytes_sent(bytes.len() as u64);
        Ok(())
    }

    async fn input(
        &mut self,
        bytes: &[u8],
        live: &mut Option<mpsc::Receiver<Media>>,
    ) -> Result<(), Error> {
        let results = self.session.handle_input(bytes)?;
        self.handle(results, live).await
    }

    async fn handle(
        &mut self,
        results: Vec<ServerSessionResult>,
        live: &mut Option<mpsc::Receiver<Media>>,
    ) -> Result<(), Error> {
        for result in results {
            match result {
                ServerSessionResult::OutboundResponse(packet) => self.write(&packet.bytes).await?,
                ServerSessionResult::RaisedEvent(event) => self.event(event, live).await?,
                ServerSessionResult::UnhandleableMessageReceived(_) => {}
            }
        }
        Ok(())
    }

    async fn accept(
        &mut self,
        request_id: u32,
        live: &mut Option<mpsc::Receiver<Media>>,
    ) -> Result<(), Error> {
        let results = self.session.accept_request(request_id)?;
        Box::pin(self.handle(results, live)).await
    }

    async fn event(
        &mut self,
        event: ServerSessionEvent,
        live: &mut Option<mpsc::Receiver<Media>>,
    ) -> Result<(), Error> {
        match event {
            ServerSessionEvent::ConnectionRequested { request_id, .. } => {
                self.accept(request_id, live).await?;
            }
            ServerSessionEvent::PublishStreamRequested {
                request_id,
                app_name,
                stream_key,
                ..
            } => {
                let (key, args) = split_key(&stream_key);
                self.publish(request_id, &app_name, key, args, live).await?;
            }
            ServerSessionEvent::PublishStreamFinished { .. } => self.role = Role::Idle,
            ServerSessionEvent::StreamMetadataChanged { metadata, .. } => {
                if let Role::Publishing(publishing) = &self.role {
                    publishing.push(Media::Metadata(Arc::new(metadata)));
                }
            }
            ServerSessionEvent::VideoDataReceived {
                data, timestamp, ..
            } => {
                if let Role::Publishing(publishing) = &self.role {
                    publishing.push(Media::video(timestamp.value, data));
                }
            }
            ServerSessionEvent::AudioDataReceived {
                data, timestamp, ..
            } => {
                if let Role::Publishing(publishing) = &self.role {
                    publishing.push(Media::audio(timestamp.value, data));
                }
            }
            ServerSessionEvent::PlayStreamRequested {
                request_id,
                app_name,
                stream_key,
                stream_id,
                ..
            } => {
                if !matches!(self.role, Role::Idle) {
                    let results = self.session.reject_request(
                        request_id,
                        "NetStream.Play.Failed",
                        "this connection already publishes or plays a stream",
                    )?;
                    return Box::pin(self.handle(results, live)).await;
                }
                self.accept(request_id, live).await?;
                let streams = Arc::clone(&self.rtmp.streams);
                let (stream_key, _) = split_key(&stream_key);
                let (stream, subscription) = streams.subscribe(&app_name, stream_key);
                info!(client = %self.client, stream = %format!("{app_name}/{stream_key}"), "player joined");
                self.role = Role::Playing(Watching {
                    streams,
                    stream,
                    id: subscription.id,
                    stream_id,
                });
                *live = Some(subscription.live);
                let mut initial = subscription.initial.into_iter().peekable();
                while initial.peek().is_some() {
                    self.play(initial.by_ref().take(MAX_BATCH)).await?;
                }
            }
            ServerSessionEvent::PlayStreamFinished { .. } => {
                self.role = Role::Idle;
                *live = None;
            }
            _ => {}
        }
        Ok(())
    }

    async fn publish(
        &mut self,
        request_id: u32,
        app: &str,
        key: &str,
        args: &str,
        live: &mut Option<mpsc::Receiver<Media>>,
    ) -> Result<(), Error> {
        let name = format!("{app}/{key}");
        let refusal = if !matches!(self.role, Role::Idle) {
            Some((
                "taken",
                "this connection already publishes or plays a stream".to_owned(),
            ))
        } else {
            let settings = self.rtmp.settings();
            match crate::auth::authorize(&settings, &self.rtmp.client, app, key, args, self.client)
                .await
            {
                Err(refusal) => Some((refusal.reason, refusal.message)),
                Ok(()) => match self.rtmp.streams.publish(app, key) {
                    Err(taken) => Some(("taken", taken.to_string())),
                    Ok(publishing) => {
                        self.role = Role::Publishing(publishing);
                        None
                    }
                },
            }
        };
        if let Some((reason, message)) = refusal {
            self.rtmp.metrics.refused(reason);
            warn!(client = %self.client, stream = %name, reason, %message, "publisher refused");
            let code = if reason == "taken" {
                "NetStream.Publish.BadName"
            } else {
                "NetStream.Publish.Unauthorized"
            };
            let results = self.session.reject_request(request_id, code, &message)?;
            Box::pin(self.handle(results, live)).await?;
            return Err(format!("publish refused: {message}").into());
        }
        self.accept(request_id, live).await?;
        info!(client = %self.client, stream = %name, "publisher started");
        if let Role::Publishing(publishing) = &self.role {
            self.rtmp.restream(publishing);
        }
        Ok(())
    }

    /// Sends messages of the played stream, in one write.
    async fn play(&mut self, batch: impl IntoIterator<Item = Media>) -> Result<(), Error> {
        let Role::Playing(watching) = &self.role else {
            return Ok(());
        };
        let (stream_id, stream) = (watching.stream_id, Arc::clone(&watching.stream));
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        for media in batch {
            if matches!(media, Media::Unpublished) {
                self.waiting_since = Some(tokio::time::Instant::now());
                continue;
            }
            self.waiting_since = None;
            if stream_id == SHARED_STREAM_ID {
                if let Some(chunked) = media.chunked() {
                    out.extend_from_slice(chunked);
                    continue;
                }
            }
            let packet = match media {
                Media::Video {
                    timestamp, data, ..
                } => self.session.send_video_data(
                    stream_id,
                    data,
                    RtmpTimestamp::new(timestamp),
                    false,
                )?,
                Media::Audio {
                    timestamp, data, ..
                } => self.session.send_audio_data(
                    stream_id,
                    data,
                    RtmpTimestamp::new(timestamp),
                    false,
                )?,
                Media::Metadata(metadata) => self.session.send_metadata(stream_id, &metadata)?,
                Media::Unpublished => continue,
            };
            out.extend_from_slice(&packet.bytes);
        }
        if !out.is_empty() {
            self.write(&out).await?;
            stream.sent(out.len());
            self.rtmp.metrics.bytes_sent.inc_by(out.len() as u64);
        }
        // A group of pictures sent at once may have grown it; keep only a modest buffer.
        if out.capacity() > MAX_KEPT_BUFFER {
            out = Vec::new();
        }
        self.out = out;
        Ok(())
    }

    /// Tells a player its stream ended (best effort: it may be gone already).
    async fn finish_playing(&mut self) {
        if let Role::Playing(watching) = &self.role {
            let stream_id = watching.stream_id;
            if let Ok(packet) = self.session.finish_playing(stream_id) {
                let _ = self.write(&packet.bytes).await;
            }
        }
        self.role = Role::Idle;
    }
}
