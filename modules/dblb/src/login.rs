//! PostgreSQL clients the DBLB authenticates itself (`module.auth_type` `trust` or
//! `scram-sha-256`, users from `module.auth_file`), and the server logins it makes for them.
//!
//! A client proves its password to the DBLB; it then joins the pool of its user, database and
//! settings and is greeted as a server would greet it (AuthenticationOk, the ParameterStatus
//! messages of the pool's first login, a cancel key of ours, ReadyForQuery), without a server
//! login of its own. Server connections are logged in by the DBLB when a pool needs one more,
//! with the password the auth file gives or the SCRAM client key the client's proof revealed.

use std::{io, sync::Arc, time::Duration};

use bytes::{Bytes, BytesMut};
use marchproxy_runtime::Stats;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};
use tracing::{debug, info};

use crate::{
    Dblb, Refusal,
    auth::{
        AuthFile, AuthType, MECHANISM, ScramClient, ScramError, ScramServer, ServerPassword,
        mock_secret,
    },
    held,
    metrics::Outcome,
    pool::{Origin, Pool, PoolKey},
    postgres::{ClientKey, ClientStream, MAX_STARTUP_MESSAGE, Parameters, error_response},
    table::{Engine, Lease, Want},
    transaction,
};

const AUTH_OK: u32 = 0;
const AUTH_CLEARTEXT: u32 = 3;
const AUTH_MD5: u32 = 5;
const AUTH_SASL: u32 = 10;
const AUTH_SASL_CONTINUE: u32 = 11;
const AUTH_SASL_FINAL: u32 = 12;

/// How to log in one more server connection for a pool: where the client connected, what it
/// asked for and how the DBLB proves the user's password.
pub struct Recipe {
    pub listener_port: u16,
    pub read_only: bool,
    pub parameters: Parameters,
    pub password: ServerPassword,
}

/// A server connection the DBLB logged in.
pub struct ServerLogin {
    pub stream: TcpStream,
    pub lease: Lease,
    pub key: Option<(u32, u32)>,
    /// Its ParameterStatus messages.
    pub greeting: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("the server {server} refused the DBLB's login: {message}")]
    Server { server: String, message: String },
    #[error(
        "the server {server} asks for {method} authentication; the DBLB logs in with SCRAM-SHA-256, a plain password from module.auth_file, or none (trust)"
    )]
    Method { server: String, method: String },
    #[error("logging in to the server {server}: {source}")]
    Scram { server: String, source: ScramError },
    #[error("logging in to the server {server}: {source}")]
    Io { server: String, source: io::Error },
    #[error("the server {server} did not finish the login within {timeout:?}")]
    Timeout { server: String, timeout: Duration },
}

impl LoginError {
    /// The SQLSTATE a client is told.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            LoginError::Refused(Refusal::NoRoute) => "3D000",
            LoginError::Refused(Refusal::Full(_)) => "53300",
            LoginError::Refused(Refusal::Unavailable(_)) => "57P03",
            LoginError::Server { .. } | LoginError::Method { .. } | LoginError::Scram { .. } => {
                "28000"
            }
            LoginError::Io { .. } | LoginError::Timeout { .. } => "08006",
        }
    }
}

/// Reads one message (type byte, length, body) from `stream`, buffering in `buffer`.
pub async fn read_message<S>(stream: &mut S, buffer: &mut BytesMut) -> io::Result<(u8, Bytes)>
where
    S: AsyncRead + Unpin,
{
    loop {
        if buffer.len() >= 5 {
            let length = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]);
            if !(4..=MAX_STARTUP_MESSAGE).contains(&length) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a message of {length} bytes during login"),
                ));
            }
            let size = length as usize + 1;
            if buffer.len() >= size {
                let mut message = buffer.split_to(size).freeze();
                let kind = message[0];
                return Ok((kind, message.split_off(5)));
            }
        }
        if stream.read_buf(buffer).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// A protocol message: its type byte, its length, then `parts`.
pub(crate) fn message(kind: u8, parts: &[&[u8]]) -> Vec<u8> {
    let length: usize = parts.iter().map(|p| p.len()).sum::<usize>() + 4;
    let mut message = Vec::with_capacity(length + 1);
    message.push(kind);
    message.extend_from_slice(&(length as u32).to_be_bytes());
    for part in parts {
        message.extend_from_slice(part);
    }
    message
}

fn authentication(code: u32, data: &[u8]) -> Vec<u8> {
    message(b'R', &[&code.to_be_bytes(), data])
}

/// The `M` (message) field of an ErrorResponse body.
fn error_text(body: &[u8]) -> String {
    body.split(|&b| b == 0)
        .find_map(|field| field.strip_prefix(b"M"))
        .map(|text| String::from_utf8_lossy(text).into_owned())
        .unwrap_or_else(|| "no message".to_owned())
}

/// Logs a new server connection in for `recipe`: a server the route picks, the startup
/// packet, the server's authentication answered, up to its first ReadyForQuery. With
/// `queue`, waits in the queue for a server with room; without, None when all are full.
pub async fn log_in(
    dblb: &Dblb,
    recipe: &Recipe,
    queue: bool,
) -> Result<Option<ServerLogin>, LoginError> {
    let settings = dblb.settings();
    let want = Want {
        engine: Engine::Postgres,
        listener_port: recipe.listener_port,
        database: recipe.parameters.database(),
        read_only: recipe.read_only,
        tried: &[],
    };
    let opened = if queue {
        Some(dblb.open(want).await?)
    } else {
        dblb.open_unless_full(want).await?
    };
    let Some((lease, mut stream)) = opened else {
        return Ok(None);
    };
    let server = lease.backend.address.to_string();
    let timeout = settings.startup_timeout();
    let exchanged = tokio::time::timeout(timeout, exchange(&mut stream, recipe, &lease, &server))
        .await
        .unwrap_or_else(|_| {
            Err(LoginError::Timeout {
                server: server.clone(),
                timeout,
            })
        });
    dblb.metrics.server_login(
        &lease.route_id,
        if exchanged.is_ok() { "ok" } else { "failed" },
    );
    let (key, greeting) = exchanged?;
    debug!(%server, route = %lease.route_id, user = recipe.parameters.get("user"), "server connection logged in by the DBLB");
    Ok(Some(ServerLogin {
        stream,
        lease,
        key,
        greeting,
    }))
}

type Greeted = (Option<(u32, u32)>, Vec<u8>);

async fn exchange(
    stream: &mut TcpStream,
    recipe: &Recipe,
    lease: &Lease,
    server: &str,
) -> Result<Greeted, LoginError> {
    let io_error = |source| LoginError::Io {
        server: server.to_owned(),
        source,
    };
    let scram = |source| LoginError::Scram {
        server: server.to_owned(),
        source,
    };
    stream
        .write_all(&recipe.parameters.encode(lease.backend_database.as_deref()))
        .await
        .map_err(io_error)?;
    let mut buffer = BytesMut::with_capacity(1024);
    let (mut key, mut greeting) = (None, Vec::new());
    let mut started: Option<ScramClient> = None;
    let mut answered = None;
    loop {
        let (kind, body) = read_message(stream, &mut buffer).await.map_err(io_error)?;
        let code = (kind == b'R' && body.len() >= 4)
            .then(|| u32::from_be_bytes([body[0], body[1], body[2], body[3]]));
        let reply = match (kind, code) {
            (b'R', Some(AUTH_OK)) if started.is_some() || answered.is_some() => {
                return Err(scram(ScramError::ServerSignature));
            }
            (b'R', Some(AUTH_OK)) => None,
            (b'R', Some(AUTH_CLEARTEXT)) => match &recipe.password {
                ServerPassword::Plain(password) => {
                    Some(message(b'p', &[password.as_bytes(), b"\0"]))
                }
                _ => {
                    return Err(method(
                        server,
                        "cleartext password (without a plain password in module.auth_file)",
                    ));
                }
            },
            (b'R', Some(AUTH_MD5)) => return Err(method(server, "md5")),
            (b'R', Some(AUTH_SASL)) => {
                let offered = body[4..]
                    .split(|&b| b == 0)
                    .any(|mechanism| mechanism == MECHANISM.as_bytes());
                if !offered || matches!(recipe.password, ServerPassword::None) {
                    return Err(method(
                        server,
                        "SASL (without a password in module.auth_file)",
                    ));
                }
                let (client, first) = ScramClient::start(&recipe.password);
                started = Some(client);
                let first = first.as_bytes();
                Some(message(
                    b'p',
                    &[
                        MECHANISM.as_bytes(),
                        b"\0",
                        &(first.len() as u32).to_be_bytes(),
                        first,
                    ],
                ))
            }
            (b'R', Some(AUTH_SASL_CONTINUE)) => {
                let client = started
                    .take()
                    .ok_or_else(|| scram(ScramError::Malformed("an unasked SASL continuation")))?;
                // Thousands of hashes (as many as the server asks): off the async workers.
                let server_first = body.slice(4..);
                let (last, final_message) =
                    tokio::task::spawn_blocking(move || client.answer(&server_first))
                        .await
                        .map_err(|e| io_error(io::Error::other(e)))?
                        .map_err(scram)?;
                answered = Some(last);
                Some(message(b'p', &[final_message.as_bytes()]))
            }
            (b'R', Some(AUTH_SASL_FINAL)) => {
                let last = answered
                    .take()
                    .ok_or_else(|| scram(ScramError::Malformed("an unasked SASL final message")))?;
                last.verify(&body[4..]).map_err(scram)?;
                None
            }
            (b'R', code) => {
                return Err(method(server, &format!("an unknown method ({code:?})")));
            }
            (b'S', _) => {
                greeting.extend_from_slice(&message(b'S', &[&body]));
                None
            }
            (b'K', _) if body.len() == 8 => {
                key = Some((
                    u32::from_be_bytes([body[0], body[1], body[2], body[3]]),
                    u32::from_be_bytes([body[4], body[5], body[6], body[7]]),
                ));
                None
            }
            (b'E', _) => {
                return Err(LoginError::Server {
                    server: server.to_owned(),
                    message: error_text(&body),
                });
            }
            (b'Z', _) => return Ok((key, greeting)),
            // Notices and protocol negotiation need no answer.
            _ => None,
        };
        if let Some(reply) = reply {
            stream.write_all(&reply).await.map_err(io_error)?;
        }
    }
}

fn method(server: &str, method: &str) -> LoginError {
    LoginError::Method {
        server: server.to_owned(),
        method: method.to_owned(),
    }
}

/// Why a client was not let in.
#[derive(Debug, thiserror::Error)]
enum Denied {
    #[error("the user is not in module.auth_file")]
    UnknownUser,
    #[error("{0}")]
    Scram(#[from] ScramError),
    #[error("the client sent {0} instead of a SASL answer")]
    Unexpected(char),
    #[error("the client asked for the SASL mechanism {0}; the DBLB speaks SCRAM-SHA-256")]
    Mechanism(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Authenticates a client against the auth file; returns how the DBLB logs in as its user.
async fn authenticate<S>(
    client: &mut S,
    user: &str,
    auth_type: AuthType,
    file: Option<&AuthFile>,
) -> Result<ServerPassword, Denied>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let credentials = file.and_then(|file| file.get(user));
    let plain = || {
        credentials
            .and_then(|c| c.password.clone())
            .map_or(ServerPassword::None, ServerPassword::Plain)
    };
    match auth_type {
        AuthType::Trust if file.is_none() || credentials.is_some() => return Ok(plain()),
        AuthType::Passthrough | AuthType::Trust => return Err(Denied::UnknownUser),
        AuthType::ScramSha256 => {}
    }
    // An unknown user goes through the exchange too, against a stand-in secret, so a client
    // cannot tell it from a wrong password.
    let secret = credentials.map_or_else(|| mock_secret(user), |c| c.secret().clone());
    client
        .write_all(&authentication(AUTH_SASL, b"SCRAM-SHA-256\0\0"))
        .await?;
    client.flush().await?;
    let mut buffer = BytesMut::with_capacity(512);
    let (kind, body) = read_message(client, &mut buffer).await?;
    if kind != b'p' {
        return Err(Denied::Unexpected(kind as char));
    }
    let name_end = body
        .iter()
        .position(|&b| b == 0)
        .ok_or(ScramError::Malformed("no mechanism name"))?;
    if &body[..name_end] != MECHANISM.as_bytes() {
        return Err(Denied::Mechanism(
            String::from_utf8_lossy(&body[..name_end]).into_owned(),
        ));
    }
    let declared = body
        .get(name_end + 1..name_end + 5)
        .map(|length| i32::from_be_bytes([length[0], length[1], length[2], length[3]]));
    let first = &body[(name_end + 5).min(body.len())..];
    if declared != Some(first.len() as i32) {
        return Err(
            ScramError::Malformed("the client-first message is not the length it says").into(),
        );
    }
    let (exchange, server_first) = ScramServer::start(&secret, first)?;
    client
        .write_all(&authentication(AUTH_SASL_CONTINUE, server_first.as_bytes()))
        .await?;
    client.flush().await?;
    let (kind, body) = read_message(client, &mut buffer).await?;
    if kind != b'p' {
        return Err(Denied::Unexpected(kind as char));
    }
    let finished = exchange.finish(&body);
    let credentials = credentials.ok_or(Denied::UnknownUser)?;
    let (client_key, server_final) = finished?;
    client
        .write_all(&authentication(AUTH_SASL_FINAL, server_final.as_bytes()))
        .await?;
    Ok(match &credentials.password {
        Some(password) => ServerPassword::Plain(password.clone()),
        None => ServerPassword::ScramKey { client_key, secret },
    })
}

/// Serves a client the DBLB authenticates itself, from after its startup packet to its end.
pub async fn serve<S>(
    dblb: &Arc<Dblb>,
    mut client: S,
    parameters: Parameters,
    listener_port: u16,
    key: &ClientKey<'_>,
    stats: &Stats,
) -> io::Result<Outcome>
where
    S: ClientStream,
{
    let settings = dblb.settings();
    let user = parameters.get("user").unwrap_or_default().to_owned();
    let file = dblb.auth_file();
    // A server tells the client which protocol it speaks before anything else.
    if let Some(negotiation) = parameters.negotiation() {
        client.write_all(&negotiation).await?;
    }
    let authenticated = tokio::time::timeout(
        settings.startup_timeout(),
        authenticate(&mut client, &user, settings.auth_type, file.as_deref()),
    )
    .await;
    let password = match authenticated {
        Ok(Ok(password)) => password,
        Ok(Err(denied)) => {
            info!(user, %denied, "PostgreSQL client refused: authentication failed");
            let message = format!("password authentication failed for user \"{user}\"");
            client.write_all(&error_response("28P01", &message)).await?;
            client.shutdown().await?;
            return Ok(Outcome::AuthFailed);
        }
        Err(_) => return Ok(Outcome::AuthFailed),
    };
    let read_only = parameters.read_only();
    let pool_key = PoolKey {
        server: None,
        listener_port,
        read_only,
        user,
        database: parameters.database().to_owned(),
        settings: parameters.settings(),
    };
    let recipe = Arc::new(Recipe {
        listener_port,
        read_only,
        parameters,
        password,
    });
    let pool = match dblb.pools.join_existing(&pool_key) {
        Some(pool) => {
            pool.update_recipe(Arc::clone(&recipe));
            pool
        }
        None => {
            let queued = log_in(dblb, &recipe, true).await.and_then(|login| {
                login.ok_or_else(|| {
                    Refusal::Full("every server is at its max_connections".to_owned()).into()
                })
            });
            let login = match queued {
                Ok(login) => login,
                Err(error) => {
                    info!(database = recipe.parameters.database(), %error, "PostgreSQL session refused: no server login");
                    let outcome = match &error {
                        LoginError::Refused(refusal) => refusal.outcome(),
                        _ => Outcome::Unavailable,
                    };
                    client
                        .write_all(&error_response(error.sqlstate(), &error.to_string()))
                        .await?;
                    client.shutdown().await?;
                    return Ok(outcome);
                }
            };
            let route_id = login.lease.route_id.clone();
            let origin = Origin::Dblb {
                mode: login.lease.pool_mode,
                greeting: login.greeting,
                recipe: std::sync::Mutex::new(Arc::clone(&recipe)),
            };
            let pool = dblb.pools.join(pool_key, || {
                Pool::new(
                    &route_id,
                    origin,
                    dblb.freed(),
                    dblb.metrics.pool_idle(&route_id),
                )
            });
            pool.adopt(login.stream, login.lease, login.key);
            pool
        }
    };
    let Origin::Dblb { greeting, .. } = &pool.origin else {
        // Pools of clients' own logins have a server in their key; this one has none.
        return Err(io::Error::other("a pool of clients' own logins"));
    };
    let key_data = [key.pid().to_be_bytes(), key.secret().to_be_bytes()].concat();
    let greeted = [
        authentication(AUTH_OK, &[]),
        greeting.clone(),
        message(b'K', &[&key_data]),
        message(b'Z', &[b"I"]),
    ]
    .concat();
    client.write_all(&greeted).await?;
    client.flush().await?;
    debug!(route = %pool.route_id, holds_sessions = pool.holds_sessions(), "PostgreSQL client authenticated by the DBLB");
    if pool.holds_sessions() {
        held::serve(dblb, client, &pool, key, stats).await?;
    } else {
        transaction::serve(dblb, client, BytesMut::new(), &pool, key, stats).await?;
    }
    Ok(Outcome::Served)
}
