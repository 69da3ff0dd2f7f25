//! PostgreSQL sessions. The client's startup packet is read here (SSL and GSS encryption
//! requests are declined, so the client goes on in plain text), the database and whether the
//! client wants a read-only session pick the server, the startup packet goes on to it, and the
//! server's answers come back: authentication passes through untouched, while the server's
//! cancel key is swapped for one of ours so a later `CancelRequest` (on a new connection, maybe
//! to another server address) reaches the server that owns the session. From the first
//! `ReadyForQuery` on, bytes are copied both ways.

use std::{io, sync::Arc};

use bytes::BytesMut;
use dashmap::DashMap;
use marchproxy::names::Endpoint;
use marchproxy_runtime::{http::TlsAcceptor, tcp::Accepted};
use rand::Rng;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};
use tracing::{debug, info};

use crate::{
    Dblb, Refusal,
    auth::AuthType,
    login,
    metrics::Outcome,
    pool::{Origin, Pool, PoolKey},
    relay::{self, Framing},
    table::{Engine, PoolMode, Want},
    transaction,
};

const PROTOCOL_3: u16 = 3;
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
/// PostgreSQL's own bound on a startup packet.
const MAX_STARTUP: u32 = 10_000;
/// Messages before the first ReadyForQuery are small (authentication, parameters, notices).
pub(crate) const MAX_STARTUP_MESSAGE: u32 = 1 << 20;

/// What a client opened its connection for.
#[derive(Debug, PartialEq)]
pub enum Startup {
    Session(Parameters),
    Cancel {
        pid: u32,
        secret: u32,
    },
    /// An SSLRequest the DBLB will accept (certificates are configured).
    Tls,
}

/// A startup packet's protocol version and parameters, in the client's order.
#[derive(Clone, Debug, PartialEq)]
pub struct Parameters {
    minor_version: u16,
    params: Vec<(String, String)>,
}

/// Why a startup packet was refused (the client gets this text in an ErrorResponse).
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// Closed between packets without a word, as port probes (and clients declined SSL
    /// they require) do.
    #[error("connection closed before a startup packet")]
    Closed,
    #[error("connection closed during startup: {0}")]
    Io(#[from] io::Error),
    #[error("startup packet length {0} is outside 8 to 10000 bytes")]
    Length(u32),
    #[error("protocol version {0}.{1} is not supported; PostgreSQL clients speak 3.x")]
    Version(u16, u16),
    #[error("malformed startup packet: {0}")]
    Malformed(&'static str),
    #[error("the startup packet names no user")]
    NoUser,
    #[error("more than one SSL or GSS encryption request")]
    Negotiation,
}

impl Parameters {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The parameters that set up a session (all but user, database, the application name
    /// and ours), sorted: what two clients must share to share a pooled connection.
    pub fn settings(&self) -> Vec<(String, String)> {
        let mut settings: Vec<(String, String)> = self
            .params
            .iter()
            .filter(|(key, _)| {
                !matches!(
                    key.as_str(),
                    "user"
                        | "database"
                        | "application_name"
                        | "fallback_application_name"
                        | "target_session_attrs"
                )
            })
            .cloned()
            .collect();
        settings.sort();
        settings
    }

    /// The database: named, or the user's name as PostgreSQL defaults it.
    pub fn database(&self) -> &str {
        self.get("database")
            .filter(|d| !d.is_empty())
            .or_else(|| self.get("user"))
            .unwrap_or_default()
    }

    /// Whether the client asked for a read-only session: `target_session_attrs` sent as a
    /// startup parameter (`read-only`, `standby`, `prefer-standby`), or
    /// `default_transaction_read_only` set through `options` (`PGOPTIONS='-c
    /// default_transaction_read_only=on'`).
    pub fn read_only(&self) -> bool {
        let by_attrs = self
            .get("target_session_attrs")
            .is_some_and(|a| matches!(a, "read-only" | "standby" | "prefer-standby"));
        let by_options = self.get("options").is_some_and(|options| {
            let options = options.replace(' ', "").to_ascii_lowercase();
            ["on", "true", "yes", "1"]
                .iter()
                .any(|v| options.contains(&format!("default_transaction_read_only={v}")))
        });
        by_attrs || by_options
    }

    /// The startup packet for the server: protocol 3.0, the same parameters, the database
    /// renamed when the route says so, and `target_session_attrs` and protocol options
    /// (`_pq_.*`) dropped (the DBLB relays 3.0 only; see [`Parameters::negotiation`]).
    pub fn encode(&self, database: Option<&str>) -> Vec<u8> {
        let mut body = Vec::with_capacity(256);
        body.extend_from_slice(&PROTOCOL_3.to_be_bytes());
        body.extend_from_slice(&0u16.to_be_bytes());
        let mut named_database = false;
        for (key, value) in &self.params {
            if key == "target_session_attrs" || key.starts_with("_pq_.") {
                continue;
            }
            let value = match (key.as_str(), database) {
                ("database", Some(renamed)) => {
                    named_database = true;
                    renamed
                }
                _ => value.as_str(),
            };
            for text in [key.as_str(), value] {
                body.extend_from_slice(text.as_bytes());
                body.push(0);
            }
        }
        if let (Some(renamed), false) = (database, named_database) {
            for text in ["database", renamed] {
                body.extend_from_slice(text.as_bytes());
                body.push(0);
            }
        }
        body.push(0);
        let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        packet.extend_from_slice(&body);
        packet
    }
}

impl Parameters {
    /// The NegotiateProtocolVersion message for a client that asked for more than protocol 3.0
    /// or for protocol options: the DBLB relays 3.0 (whose 4-byte cancel keys it maps), so it
    /// tells the client, as a server would, before the server's first answer.
    pub fn negotiation(&self) -> Option<Vec<u8>> {
        let options: Vec<&str> = self
            .params
            .iter()
            .map(|(key, _)| key.as_str())
            .filter(|key| key.starts_with("_pq_."))
            .collect();
        if self.minor_version == 0 && options.is_empty() {
            return None;
        }
        let mut body = 0u32.to_be_bytes().to_vec();
        body.extend_from_slice(&(options.len() as u32).to_be_bytes());
        for option in options {
            body.extend_from_slice(option.as_bytes());
            body.push(0);
        }
        let mut message = vec![b'v'];
        message.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        message.extend_from_slice(&body);
        Some(message)
    }
}

/// Reads the client's startup packet, declining GSS encryption requests on the way, and SSL
/// requests unless `offer_tls` (then the request itself is returned, unanswered).
pub async fn read_startup<S>(stream: &mut S, offer_tls: bool) -> Result<Startup, StartupError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut negotiations = 0;
    loop {
        let mut length = [0u8; 4];
        if stream.read(&mut length[..1]).await? == 0 {
            return Err(StartupError::Closed);
        }
        stream.read_exact(&mut length[1..]).await?;
        let length = u32::from_be_bytes(length);
        if !(8..=MAX_STARTUP).contains(&length) {
            return Err(StartupError::Length(length));
        }
        let mut body = vec![0u8; length as usize - 4];
        stream.read_exact(&mut body).await?;
        let code = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
        match code {
            SSL_REQUEST if offer_tls => return Ok(Startup::Tls),
            SSL_REQUEST | GSSENC_REQUEST => {
                negotiations += 1;
                if negotiations > 2 {
                    return Err(StartupError::Negotiation);
                }
                stream.write_all(b"N").await?;
            }
            CANCEL_REQUEST => {
                if body.len() != 12 {
                    return Err(StartupError::Malformed("a cancel request is 16 bytes"));
                }
                return Ok(Startup::Cancel {
                    pid: u32::from_be_bytes([body[4], body[5], body[6], body[7]]),
                    secret: u32::from_be_bytes([body[8], body[9], body[10], body[11]]),
                });
            }
            _ => {
                let (major, minor) = ((code >> 16) as u16, code as u16);
                if major != PROTOCOL_3 {
                    return Err(StartupError::Version(major, minor));
                }
                return parse_parameters(minor, &body[4..]).map(Startup::Session);
            }
        }
    }
}

fn parse_parameters(minor_version: u16, mut bytes: &[u8]) -> Result<Parameters, StartupError> {
    let mut params = Vec::new();
    let next = |bytes: &mut &[u8]| -> Result<String, StartupError> {
        let end = bytes
            .iter()
            .position(|&b| b == 0)
            .ok_or(StartupError::Malformed("a parameter is not NUL-terminated"))?;
        let text = std::str::from_utf8(&bytes[..end])
            .map_err(|_| StartupError::Malformed("a parameter is not UTF-8"))?
            .to_owned();
        *bytes = &bytes[end + 1..];
        Ok(text)
    };
    loop {
        let key = next(&mut bytes)?;
        if key.is_empty() {
            break;
        }
        let value = next(&mut bytes)?;
        params.push((key, value));
    }
    if !bytes.is_empty() {
        return Err(StartupError::Malformed("bytes after the parameter list"));
    }
    let parameters = Parameters {
        minor_version,
        params,
    };
    if parameters.get("user").is_none_or(str::is_empty) {
        return Err(StartupError::NoUser);
    }
    Ok(parameters)
}

/// A FATAL ErrorResponse: the client shows `message` and closes.
pub fn error_response(sqlstate: &str, message: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(message.len() + 32);
    for (field, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', sqlstate),
        (b'M', message),
    ] {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = vec![b'E'];
    packet.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    packet.extend_from_slice(&body);
    packet
}

fn cancel_request(pid: u32, secret: u32) -> [u8; 16] {
    let mut packet = [0u8; 16];
    packet[..4].copy_from_slice(&16u32.to_be_bytes());
    packet[4..8].copy_from_slice(&CANCEL_REQUEST.to_be_bytes());
    packet[8..12].copy_from_slice(&pid.to_be_bytes());
    packet[12..].copy_from_slice(&secret.to_be_bytes());
    packet
}

/// A client's cancel key: its secret and the server session it cancels now (none while a
/// pooled client is between transactions).
struct CancelEntry {
    secret: u32,
    target: Option<(Endpoint, u32, u32)>,
}

/// Cancel keys handed to clients, each naming the server session it cancels.
#[derive(Default)]
pub struct Cancels {
    keys: DashMap<u32, CancelEntry>,
}

/// A cancel key issued to a client, registered while it lives.
pub struct ClientKey<'a> {
    cancels: &'a Cancels,
    pid: u32,
    secret: u32,
}

impl ClientKey<'_> {
    /// The process id the client is told (ours, not a server's).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn secret(&self) -> u32 {
        self.secret
    }

    /// From now on, a cancel with this key reaches `server`'s session (`pid`, `secret`).
    pub fn point(&self, server: &Endpoint, key: Option<(u32, u32)>) {
        if let Some(mut entry) = self.cancels.keys.get_mut(&self.pid) {
            entry.target = key.map(|(pid, secret)| (server.clone(), pid, secret));
        }
    }

    pub fn clear(&self) {
        if let Some(mut entry) = self.cancels.keys.get_mut(&self.pid) {
            entry.target = None;
        }
    }
}

impl Drop for ClientKey<'_> {
    fn drop(&mut self) {
        self.cancels.keys.remove(&self.pid);
    }
}

impl Cancels {
    /// A fresh key for a client, pointing nowhere yet.
    pub fn issue(&self) -> ClientKey<'_> {
        let mut rng = rand::rng();
        let secret = rng.random::<u32>();
        loop {
            // Positive like a real backend pid, which some clients assume.
            let pid = rng.random_range(1..=i32::MAX as u32);
            if let dashmap::Entry::Vacant(slot) = self.keys.entry(pid) {
                slot.insert(CancelEntry {
                    secret,
                    target: None,
                });
                return ClientKey {
                    cancels: self,
                    pid,
                    secret,
                };
            }
        }
    }

    /// Sends the server the cancel request `pid` and `secret` stand for; returns the outcome
    /// for metrics. A wrong secret is treated as unknown, so keys cannot be probed.
    async fn forward(&self, pid: u32, secret: u32, timeout: std::time::Duration) -> &'static str {
        let target = match self.keys.get(&pid) {
            Some(entry) if entry.secret == secret => entry.target.clone(),
            _ => return "unknown",
        };
        // A pooled client between transactions has nothing running to cancel.
        let Some((server, server_pid, server_secret)) = target else {
            return "idle";
        };
        let sent = tokio::time::timeout(timeout, async {
            let mut stream = TcpStream::connect((server.host(), server.port())).await?;
            stream
                .write_all(&cancel_request(server_pid, server_secret))
                .await?;
            // The server answers a cancel request by closing; wait for that so the request
            // is read before we go.
            let mut rest = Vec::new();
            stream.read_to_end(&mut rest).await?;
            io::Result::Ok(())
        })
        .await;
        match sent {
            Ok(Ok(())) => {
                info!(%server, server_pid, "cancel request forwarded");
                "forwarded"
            }
            _ => "failed",
        }
    }
}

/// Serves one client connection on a PostgreSQL listener.
pub async fn serve(dblb: Arc<Dblb>, accepted: Accepted) {
    let Accepted {
        mut stream,
        client,
        listener,
        stats,
    } = accepted;
    let _ = stream.set_nodelay(true);
    let settings = dblb.settings();
    let offer_tls = dblb.tls.is_some();
    // One deadline for the whole start: the request, a TLS handshake, the startup packet.
    let deadline = tokio::time::Instant::now() + settings.startup_timeout();
    let first = tokio::time::timeout_at(deadline, read_startup(&mut stream, offer_tls)).await;
    match (first, &dblb.tls) {
        (Ok(Ok(Startup::Tls)), Some(tls)) => {
            let handshake = async {
                stream.write_all(b"S").await?;
                tls.accept(stream).await
            };
            match tokio::time::timeout_at(deadline, handshake).await {
                Ok(Ok(mut secured)) => {
                    let startup =
                        tokio::time::timeout_at(deadline, read_startup(&mut secured, false)).await;
                    session(dblb, secured, startup, client, listener.addr.port(), stats).await;
                }
                Ok(Err(error)) => {
                    debug!(%client, %error, "TLS handshake failed");
                    dblb.metrics
                        .session(Engine::Postgres.name(), Outcome::BadStartup);
                }
                Err(_) => {
                    debug!(%client, "TLS handshake not done in time");
                    dblb.metrics
                        .session(Engine::Postgres.name(), Outcome::BadStartup);
                }
            }
        }
        (first, _) => session(dblb, stream, first, client, listener.addr.port(), stats).await,
    }
}

/// The session after its startup packet, over plain TCP or TLS.
async fn session<S>(
    dblb: Arc<Dblb>,
    stream: S,
    startup: Result<Result<Startup, StartupError>, tokio::time::error::Elapsed>,
    client: std::net::SocketAddr,
    listener_port: u16,
    stats: Arc<marchproxy_runtime::Stats>,
) where
    S: ClientStream,
{
    let mut stream = stream;
    let settings = dblb.settings();
    let startup = match startup {
        Ok(Ok(startup)) => startup,
        Ok(Err(StartupError::Closed)) => {
            debug!(%client, "connection closed before a startup packet");
            return;
        }
        Ok(Err(error)) => {
            debug!(%client, %error, "PostgreSQL startup refused");
            dblb.metrics
                .session(Engine::Postgres.name(), Outcome::BadStartup);
            if !matches!(error, StartupError::Io(_)) {
                refuse(stream, &error_response("08P01", &error.to_string())).await;
            }
            return;
        }
        Err(_) => {
            debug!(%client, "PostgreSQL startup packet not sent in time");
            dblb.metrics
                .session(Engine::Postgres.name(), Outcome::BadStartup);
            return;
        }
    };
    let parameters = match startup {
        Startup::Cancel { pid, secret } => {
            let outcome = dblb
                .cancels
                .forward(pid, secret, settings.connect_timeout())
                .await;
            debug!(%client, outcome, "cancel request");
            dblb.metrics.cancel(outcome);
            return;
        }
        Startup::Session(parameters) => parameters,
        // Only offered once, before TLS.
        Startup::Tls => {
            dblb.metrics
                .session(Engine::Postgres.name(), Outcome::BadStartup);
            return;
        }
    };
    let request = stats.request();
    if settings.auth_type != AuthType::Passthrough {
        let key = dblb.cancels.issue();
        let served = login::serve(&dblb, stream, parameters, listener_port, &key, &stats).await;
        let outcome = served.unwrap_or_else(|error| {
            debug!(%client, %error, "PostgreSQL session ended with an error");
            Outcome::Served
        });
        dblb.metrics.session(Engine::Postgres.name(), outcome);
        request.finish(outcome == Outcome::Served);
        return;
    }
    let want = Want {
        engine: Engine::Postgres,
        listener_port,
        database: parameters.database(),
        read_only: parameters.read_only(),
        tried: &[],
    };
    let (lease, mut server) = match dblb.open(want).await {
        Ok(opened) => opened,
        Err(refusal) => {
            info!(%client, database = parameters.database(), %refusal, "PostgreSQL session refused");
            dblb.metrics
                .session(Engine::Postgres.name(), refusal.outcome());
            let (sqlstate, message) = match &refusal {
                Refusal::NoRoute => ("3D000", refusal.to_string()),
                Refusal::Unavailable(_) => ("57P03", refusal.to_string()),
                Refusal::Full(_) => ("53300", refusal.to_string()),
            };
            refuse(stream, &error_response(sqlstate, &message)).await;
            return;
        }
    };
    debug!(%client, database = parameters.database(), backend = %lease.backend.address, route = %lease.route_id, mode = ?lease.pool_mode, "PostgreSQL session");
    let key = dblb.cancels.issue();
    let database = lease
        .backend_database
        .clone()
        .unwrap_or_else(|| parameters.database().to_owned());
    let served = async {
        server
            .write_all(&parameters.encode(lease.backend_database.as_deref()))
            .await?;
        if let Some(negotiation) = parameters.negotiation() {
            stream.write_all(&negotiation).await?;
        }
        let Some(LoggedIn { server_key, early }) =
            login(&mut stream, &mut server, &lease.backend.address, &key).await?
        else {
            // The server refused the login; its error has reached the client.
            return Ok(());
        };
        match lease.pool_mode {
            PoolMode::Session => {
                server.write_all(&early).await?;
                let queries = dblb.metrics.query_counter(Engine::Postgres.name());
                relay::session(stream.halves(), server, Framing::Postgres, &queries, &stats).await
            }
            PoolMode::Transaction => {
                let pool_key = PoolKey {
                    server: Some(lease.backend.address.to_string()),
                    listener_port,
                    read_only: parameters.read_only(),
                    user: parameters.get("user").unwrap_or_default().to_owned(),
                    database,
                    settings: parameters.settings(),
                };
                let pool = dblb.pools.join(pool_key, || {
                    Pool::new(
                        &lease.route_id,
                        Origin::ClientLogins,
                        dblb.freed(),
                        dblb.metrics.pool_idle(&lease.route_id),
                    )
                });
                // The login connection may serve any client of the pool from now on; this
                // client's cancel key follows its own transactions instead.
                key.clear();
                pool.adopt(server, lease, server_key);
                transaction::serve(&dblb, stream, early, &pool, &key, &stats).await
            }
        }
    };
    if let Err(error) = served.await {
        debug!(%client, %error, "PostgreSQL session ended with an error");
    }
    dblb.metrics
        .session(Engine::Postgres.name(), Outcome::Served);
    request.finish(true);
}

/// A client connection, plain or TLS, and how it splits into halves that move on their own.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send {
    type Reader: AsyncRead + Unpin + Send;
    type Writer: AsyncWrite + Unpin + Send;

    fn halves(self) -> (Self::Reader, Self::Writer);
}

impl ClientStream for TcpStream {
    type Reader = tokio::net::tcp::OwnedReadHalf;
    type Writer = tokio::net::tcp::OwnedWriteHalf;

    /// Lock-free owned halves, for the common plain case.
    fn halves(self) -> (Self::Reader, Self::Writer) {
        self.into_split()
    }
}

impl ClientStream for marchproxy_runtime::http::TlsStream<TcpStream> {
    type Reader = tokio::io::ReadHalf<Self>;
    type Writer = tokio::io::WriteHalf<Self>;

    /// One TLS session under both halves, so they share it through a lock.
    fn halves(self) -> (Self::Reader, Self::Writer) {
        tokio::io::split(self)
    }
}

/// A server connection past its login.
struct LoggedIn {
    /// The server's cancel key for the connection.
    server_key: Option<(u32, u32)>,
    /// What the client sent after its authentication, before the login ended.
    early: BytesMut,
}

/// Relays a login: the client's authentication messages to the server and the server's
/// answers back, up to the server's first ReadyForQuery. The server's cancel key is swapped
/// for `key`, which then points at it. Returns None when the server ended the login (its
/// error has reached the client).
async fn login<S>(
    client: &mut S,
    server: &mut TcpStream,
    server_address: &Endpoint,
    key: &ClientKey<'_>,
) -> io::Result<Option<LoggedIn>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut from_client, mut from_server) =
        (BytesMut::with_capacity(1024), BytesMut::with_capacity(4096));
    let mut server_key = None;
    // Once the client sends anything but an authentication answer, the rest waits for the
    // end of the login (it belongs to the session, not to this connection's login).
    let mut authenticating = true;
    loop {
        tokio::select! {
            read = client.read_buf(&mut from_client), if authenticating => {
                if read? == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the client left during login"));
                }
                while from_client.len() >= 5 {
                    let length = u32::from_be_bytes([from_client[1], from_client[2], from_client[3], from_client[4]]);
                    if from_client[0] != b'p' || !(4..=MAX_STARTUP_MESSAGE).contains(&length) {
                        authenticating = false;
                        break;
                    }
                    let size = length as usize + 1;
                    if from_client.len() < size {
                        break;
                    }
                    server.write_all(&from_client.split_to(size)).await?;
                }
            }
            read = server.read_buf(&mut from_server) => {
                if read? == 0 {
                    return Ok(None);
                }
                while from_server.len() >= 5 {
                    let length = u32::from_be_bytes([from_server[1], from_server[2], from_server[3], from_server[4]]);
                    if !(4..=MAX_STARTUP_MESSAGE).contains(&length) {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("server message of {length} bytes during login"),
                        ));
                    }
                    let size = length as usize + 1;
                    if from_server.len() < size {
                        break;
                    }
                    let mut message = from_server.split_to(size);
                    if message[0] == b'K' && size == 13 {
                        let pid = u32::from_be_bytes([message[5], message[6], message[7], message[8]]);
                        let secret = u32::from_be_bytes([message[9], message[10], message[11], message[12]]);
                        server_key = Some((pid, secret));
                        key.point(server_address, server_key);
                        message[5..9].copy_from_slice(&key.pid.to_be_bytes());
                        message[9..13].copy_from_slice(&key.secret.to_be_bytes());
                    }
                                        client.write_all(&message).await?;
                    client.flush().await?;
                                                            if message[0] == b'Z' {
                        client.write_all(&from_server).await?;
                        client.flush().await?;
                        return Ok(Some(LoggedIn { server_key, early: from_client }));
                    }
                }
            }
        }
    }
}

/// Sends a client its last message and closes without a reset: the rest of what it sent is
/// read and dropped first (briefly), since closing with unread bytes makes the kernel answer
/// with a reset that can reach the client before the message.
async fn refuse<S>(mut stream: S, message: &[u8])
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if stream.write_all(message).await.is_err() || stream.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        let mut left = 64 * 1024;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left -= n.min(left),
            }
        }
    })
    .await;
}

/// Answers a client over its rate limit: its startup packet is read, then refused in words.
pub async fn refuse_rate_limited(
    accepted: Accepted,
    retry_after: std::time::Duration,
    tls: Option<TlsAcceptor>,
) {
    let message = format!(
        "too many connections from {}: over the rate limit; retry in {} s",
        accepted.client.ip(),
        retry_after.as_secs().max(1)
    );
    let refusal = error_response("53300", &message);
    let mut stream = accepted.stream;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    let startup = tokio::time::timeout_at(deadline, read_startup(&mut stream, tls.is_some())).await;
    match (startup, tls) {
        (Ok(Ok(Startup::Session(_))), _) => refuse(stream, &refusal).await,
        // A client that requires SSL reads the refusal over TLS, not "no SSL support".
        (Ok(Ok(Startup::Tls)), Some(tls)) => {
            let secured = async {
                stream.write_all(b"S").await?;
                let mut secured = tls.accept(stream).await?;
                let startup = read_startup(&mut secured, false).await;
                io::Result::Ok((secured, startup))
            };
            if let Ok(Ok((secured, Ok(Startup::Session(_))))) =
                tokio::time::timeout_at(deadline, secured).await
            {
                refuse(secured, &refusal).await;
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup_packet(params: &[(&str, &str)]) -> Vec<u8> {
        Parameters {
            minor_version: 0,
            params: params
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
        .encode(None)
    }

    #[tokio::test]
    async fn startup_packets_are_read_and_bad_ones_refused() {
        let mut ssl = 8u32.to_be_bytes().to_vec();
        ssl.extend_from_slice(&SSL_REQUEST.to_be_bytes());
        let session = startup_packet(&[
            ("user", "ann"),
            ("options", "-c default_transaction_read_only=on"),
        ]);
        let (mut client, mut server) = tokio::io::duplex(4096);
        client
            .write_all(&[ssl.clone(), session].concat())
            .await
            .unwrap();
        let Startup::Session(parameters) = read_startup(&mut server, false).await.unwrap() else {
            panic!("a session startup")
        };
        assert_eq!(
            parameters.database(),
            "ann",
            "the database defaults to the user"
        );
        assert!(parameters.read_only());
        let mut answer = [0u8; 1];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"N", "SSL is declined");

        let renamed = Parameters {
            minor_version: 0,
            params: vec![
                ("user".into(), "ann".into()),
                ("target_session_attrs".into(), "read-only".into()),
            ],
        };
        let encoded = renamed.encode(Some("app"));
        let (mut client, mut server) = tokio::io::duplex(4096);
        client.write_all(&encoded).await.unwrap();
        let Startup::Session(read_back) = read_startup(&mut server, false).await.unwrap() else {
            panic!("a session startup")
        };
        assert_eq!(read_back.get("database"), Some("app"));
        assert_eq!(read_back.get("target_session_attrs"), None);

        for (bad, why) in [
            (vec![0, 0, 0, 4], "Length"),
            (vec![0, 0, 0xff, 0xff], "Length"),
            (
                [
                    &12u32.to_be_bytes()[..],
                    &0x0002_0000u32.to_be_bytes(),
                    b"x\0x\0",
                ]
                .concat(),
                "Version",
            ),
            (
                [
                    &12u32.to_be_bytes()[..],
                    &0x0003_0000u32.to_be_bytes(),
                    b"user",
                ]
                .concat(),
                "Malformed",
            ),
            (startup_packet(&[("database", "x")]), "NoUser"),
            (
                [ssl.clone(), ssl.clone(), ssl.clone()].concat(),
                "Negotiation",
            ),
            (vec![0, 0, 0, 9, 0], "Io"),
            (vec![], "Closed"),
        ] {
            let (mut client, mut server) = tokio::io::duplex(4096);
            client.write_all(&bad).await.unwrap();
            client.shutdown().await.unwrap();
            let error = read_startup(&mut server, false).await.unwrap_err();
            assert!(
                format!("{error:?}").starts_with(why),
                "{error:?} for {bad:?}"
            );
        }
    }
}
