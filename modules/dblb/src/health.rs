//! Active health checks that speak each server's protocol, every `health_check.interval_seconds`
//! for every server in the table. PostgreSQL: a startup packet for the check user; any
//! authentication request, or a refusal about the user or database, means the server takes
//! logins; "starting up", "shutting down" (57P0x) or "too many connections" (53xxx) mean it
//! cannot. MySQL: the greeting (an ERR packet instead, such as "too many connections", fails),
//! then a login attempt as the check user without a password, so the server never counts an
//! aborted handshake against our address (as HAProxy's `mysql-check` does), then COM_QUIT.

use std::{io, sync::Arc};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinSet,
};
use tracing::{info, warn};

use crate::{
    Dblb,
    config::HealthCheck,
    mysql,
    table::{Backend, Engine},
};

/// Checks every server, forever (the caller aborts the task at shutdown).
pub async fn run(dblb: Arc<Dblb>) {
    loop {
        let check = dblb.settings().health_check;
        let mut checks = JoinSet::new();
        for backend in dblb.table().backends() {
            let check = check.clone();
            checks.spawn(async move {
                let verdict =
                    match tokio::time::timeout(check.timeout(), probe(&backend, &check)).await {
                        Ok(verdict) => verdict,
                        Err(_) => Err(format!("no answer within {:?}", check.timeout())),
                    };
                (backend, verdict)
            });
        }
        while let Some(Ok((backend, verdict))) = checks.join_next().await {
            let passed = verdict.is_ok();
            match (backend.checked(passed, &check), verdict) {
                (Some(true), _) => {
                    info!(backend = %backend.address, protocol = backend.engine.name(), "backend back in: health checks pass");
                }
                (Some(false), Err(why)) => {
                    warn!(backend = %backend.address, protocol = backend.engine.name(), %why, "backend out: health checks fail");
                }
                _ => {}
            }
        }
        tokio::time::sleep(check.interval()).await;
    }
}

async fn probe(backend: &Backend, check: &HealthCheck) -> Result<(), String> {
    let address = &backend.address;
    let mut stream = TcpStream::connect((address.host(), address.port()))
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let answered = match backend.engine {
        Engine::Postgres => probe_postgres(&mut stream, check).await,
        Engine::Mysql => probe_mysql(&mut stream, check).await,
    };
    answered.map_err(|e| e.to_string())?
}

async fn probe_postgres(
    stream: &mut TcpStream,
    check: &HealthCheck,
) -> io::Result<Result<(), String>> {
    let mut body = 0x0003_0000u32.to_be_bytes().to_vec();
    for text in [
        "user",
        &check.user,
        "database",
        &check.database,
        "application_name",
        "marchproxy-health",
    ] {
        body.extend_from_slice(text.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    stream.write_all(&packet).await?;
    let kind = stream.read_u8().await?;
    let length = stream.read_u32().await?;
    let mut message = vec![0u8; length.clamp(4, 8192) as usize - 4];
    stream.read_exact(&mut message).await?;
    let verdict = match kind {
        // An authentication request (or AuthenticationOk under trust), or a protocol version
        // negotiation: the server takes logins.
        b'R' | b'v' => Ok(()),
        b'E' => {
            let field = |code: u8| {
                message
                    .split(|&b| b == 0)
                    .find(|f| f.first() == Some(&code))
                    .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
                    .unwrap_or_default()
            };
            let sqlstate = field(b'C');
            if sqlstate.starts_with("57P") || sqlstate.starts_with("53") {
                Err(format!(
                    "server refuses logins: {} ({sqlstate})",
                    field(b'M')
                ))
            } else {
                Ok(())
            }
        }
        other => Err(format!(
            "unexpected message type {:?} at startup",
            other as char
        )),
    };
    // Terminate, so a server that trusted us ends the session politely.
    let _ = stream.write_all(&[b'X', 0, 0, 0, 4]).await;
    Ok(verdict)
}

async fn probe_mysql(
    stream: &mut TcpStream,
    check: &HealthCheck,
) -> io::Result<Result<(), String>> {
    let greeting = read_packet(stream).await?;
    match greeting.first() {
        Some(0x0a) => {}
        Some(0xff) => {
            return Ok(Err(format!(
                "server refuses connections: {}",
                error_text(&greeting)
            )));
        }
        _ => return Ok(Err("not a MySQL greeting".into())),
    }
    // CLIENT_LONG_PASSWORD | CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION.
    let capabilities: u32 = 0x0001 | 0x0200 | 0x8000;
    let mut login = capabilities.to_le_bytes().to_vec();
    login.extend_from_slice(&(1u32 << 24).to_le_bytes());
    login.push(33);
    login.extend_from_slice(&[0; 23]);
    login.extend_from_slice(check.user.as_bytes());
    login.push(0);
    login.push(0);
    stream.write_all(&mysql::packet(1, &login)).await?;
    let answer = read_packet(stream).await?;
    let verdict = match answer.first() {
        // OK, or an authentication switch request: the server takes logins.
        Some(0x00) | Some(0xfe) => Ok(()),
        Some(0xff) => {
            let code = u16::from_le_bytes([
                answer.get(1).copied().unwrap_or(0),
                answer.get(2).copied().unwrap_or(0),
            ]);
            // 1045 (access denied) and 1044 (no access to a database) are answers from a
            // server that works; the rest (too many connections, host blocked ...) is not.
            if matches!(code, 1044 | 1045 | 1698) {
                Ok(())
            } else {
                Err(format!("server refuses logins: {}", error_text(&answer)))
            }
        }
        _ => Err("unexpected answer to the login".into()),
    };
    let _ = stream.write_all(&mysql::packet(0, &[0x01])).await;
    Ok(verdict)
}

async fn read_packet(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).await?;
    let length = u32::from_le_bytes([header[0], header[1], header[2], 0]) as usize;
    if length > 64 * 1024 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "oversized packet at connect",
        ));
    }
    let mut payload = vec![0u8; length];
    stream.read_exact(&mut payload).await?;
    Ok(payload)
}

/// An ERR packet's code and message.
fn error_text(payload: &[u8]) -> String {
    if payload.len() < 3 {
        return "malformed error packet".into();
    }
    let code = u16::from_le_bytes([payload[1], payload[2]]);
    let message = payload[3..]
        .strip_prefix(b"#")
        .map_or(&payload[3..], |rest| rest.get(5..).unwrap_or_default());
    format!("{} ({code})", String::from_utf8_lossy(message))
}
