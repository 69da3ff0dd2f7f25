//! Re-streaming: while a stream is published, it is pushed on to each matching destination as
//! an RTMP publisher would (handshake, `connect`, `publish`, then the media), reconnecting with
//! backoff if the destination drops, until the publisher leaves. The push reads the stream
//! like a player does, so a slow destination skips ahead instead of slowing anyone down.

use std::{sync::Arc, time::Duration};

use rml_rtmp::{
    handshake::{Handshake, PeerType},
    sessions::{
        ClientSession, ClientSessionConfig, ClientSessionEvent, ClientSessionResult,
        PublishRequestType,
    },
    time::RtmpTimestamp,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};
use tracing::{info, warn};

use crate::{
    config::Destination,
    metrics::Metrics,
    session::{Error, WRITE_TIMEOUT, handshake},
    streams::{Media, Streams, Subscription},
};

/// How long connecting and being accepted as a publisher may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
const INITIAL_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Pushes `app/key` to `destination` for as long as `publisher` publishes it (a later publish
/// on the same key starts its own push).
pub async fn push(
    streams: Arc<Streams>,
    metrics: Arc<Metrics>,
    app: String,
    key: String,
    publisher: u64,
    destination: Destination,
) {
    let target = format!(
        "rtmp://{}/{}/{}",
        destination.address, destination.app, destination.key
    );
    let name = format!("{app}/{key}");
    let mut backoff = INITIAL_BACKOFF;
    while streams.publisher(&app, &key) == Some(publisher) {
        let (stream, subscription) = streams.subscribe(&app, &key);
        let id = subscription.id;
        let result = relay(subscription, &destination, &metrics).await;
        streams.unsubscribe(&stream, id);
        match result {
            // The subscription ended: the publisher left, or the destination fell so far
            // behind that it was dropped (then, with the publisher still on, go again).
            Ok(()) => backoff = INITIAL_BACKOFF,
            Err(error) => {
                metrics
                    .restream_connects
                    .with_label_values(&["failed"])
                    .inc();
                warn!(stream = %name, %target, %error, retry_in_ms = backoff.as_millis() as u64, "re-streaming failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    info!(stream = %name, %target, "re-streaming ended with the publish");
}

/// One connection to the destination: set up, then the stream until it ends (Ok) or the
/// connection fails (Err).
async fn relay(
    mut subscription: Subscription,
    destination: &Destination,
    metrics: &Metrics,
) -> Result<(), Error> {
    let mut socket = timeout(SETUP_TIMEOUT, TcpStream::connect(&destination.address))
        .await
        .map_err(|_| "connect timed out")??;
    let _ = socket.set_nodelay(true);
    let mut start = Handshake::new(PeerType::Client);
    socket
        .write_all(&start.generate_outbound_p0_and_p1()?)
        .await?;
    let remaining = handshake(&mut socket, start).await?;
    let mut config = ClientSessionConfig::new();
    // Servers such as SRS and the large platforms want the URL being connected to.
    config.tc_url = Some(format!(
        "rtmp://{}/{}",
        destination.address, destination.app
    ));
    let (mut session, results) = ClientSession::new(config)?;
    let mut publisher = Publisher {
        socket,
        buffer: vec![0u8; 64 * 1024],
    };
    publisher.send(results).await?;
    let mut pending = session.handle_input(&remaining)?;
    publisher.send(std::mem::take(&mut pending)).await?;
    let request = session.request_connection(destination.app.clone())?;
    publisher.send(vec![request]).await?;
    publisher
        .wait_for(&mut session, |e| {
            matches!(e, ClientSessionEvent::ConnectionRequestAccepted)
        })
        .await?;
    let request = session.request_publishing(destination.key.clone(), PublishRequestType::Live)?;
    publisher.send(vec![request]).await?;
    publisher
        .wait_for(&mut session, |e| {
            matches!(e, ClientSessionEvent::PublishRequestAccepted)
        })
        .await?;
    metrics.restream_connects.with_label_values(&["ok"]).inc();
    info!(destination = %format!("{}/{}/{}", destination.address, destination.app, destination.key), "re-streaming");
    for media in std::mem::take(&mut subscription.initial) {
        publisher.media(&mut session, media).await?;
    }
    loop {
        tokio::select! {
            media = subscription.live.recv() => match media {
                // The publish this push belongs to is over.
                Some(Media::Unpublished) | None => return Ok(()),
                Some(media) => publisher.media(&mut session, media).await?,
            },
            read = publisher.socket.read(&mut publisher.buffer) => {
                let read = read?;
                if read == 0 {
                    return Err("the destination closed the connection".into());
                }
                let results = session.handle_input(&publisher.buffer[..read])?;
                publisher.send(results).await?;
            }
        }
    }
}

struct Publisher {
    socket: TcpStream,
    buffer: Vec<u8>,
}

impl Publisher {
    /// Writes the packets among `results` (events need no answer once publishing).
    async fn send(&mut self, results: Vec<ClientSessionResult>) -> Result<(), Error> {
        for result in results {
            if let ClientSessionResult::OutboundResponse(packet) = result {
                timeout(WRITE_TIMEOUT, self.socket.write_all(&packet.bytes))
                    .await
                    .map_err(|_| "the destination stopped reading")??;
            }
        }
        Ok(())
    }

    /// Reads until the session raises an event `wanted` accepts; a rejection fails.
    async fn wait_for(
        &mut self,
        session: &mut ClientSession,
        wanted: impl Fn(&ClientSessionEvent) -> bool,
    ) -> Result<(), Error> {
        timeout(SETUP_TIMEOUT, async {
            loop {
                let read = self.socket.read(&mut self.buffer).await?;
                if read == 0 {
                    return Err::<(), Error>("the destination closed the connection".into());
                }
                let results = session.handle_input(&self.buffer[..read])?;
                let mut accepted = false;
                for result in &results {
                    if let ClientSessionResult::RaisedEvent(event) = result {
                        if wanted(event) {
                            accepted = true;
                        }
                        if let ClientSessionEvent::ConnectionRequestRejected { description } = event
                        {
                            return Err(format!("connect refused: {description}").into());
                        }
                    }
                }
                self.send(results).await?;
                if accepted {
                    return Ok(());
                }
            }
        })
        .await
        .map_err(|_| "the destination did not accept in time")?
    }

    async fn media(&mut self, session: &mut ClientSession, media: Media) -> Result<(), Error> {
        let result = match media {
            Media::Video {
                timestamp, data, ..
            } => session.publish_video_data(data, RtmpTimestamp::new(timestamp), false)?,
            Media::Audio {
                timestamp, data, ..
            } => session.publish_audio_data(data, RtmpTimestamp::new(timestamp), false)?,
            Media::Metadata(metadata) => session.publish_metadata(&metadata)?,
            Media::Unpublished => return Ok(()),
        };
        self.send(vec![result]).await
    }
}
