//! Upstream test backends: small TCP servers standing behind module instances, so a test can see
//! which instance a connection reached and what bytes arrived.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

/// A running backend: its address and how many connections it has taken.
#[derive(Clone)]
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    connections: Arc<AtomicUsize>,
    accepting: tokio::task::AbortHandle,
}

impl Backend {
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Stops listening, as a killed process would: new connections are refused.
    pub fn kill(&self) {
        self.accepting.abort();
    }
}

/// A backend that answers each connection with `<name>\n` as soon as the first bytes arrive,
/// then echoes everything, and closes its side when the client closes its own.
pub async fn tagged_echo(name: &str) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free port");
    let addr = listener.local_addr().expect("bound");
    let connections = Arc::new(AtomicUsize::new(0));
    let tag = format!("{name}\n");
    let counted = Arc::clone(&connections);
    let accepting = tokio::spawn(async move {
        let connections = counted;
        while let Ok((mut stream, _)) = listener.accept().await {
            connections.fetch_add(1, Ordering::SeqCst);
            let tag = tag.clone();
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 16 * 1024];
                let mut tagged = false;
                loop {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if !tagged {
                                tagged = true;
                                if stream.write_all(tag.as_bytes()).await.is_err() {
                                    return;
                                }
                            }
                            if stream.write_all(&buffer[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = stream.shutdown().await;
            });
        }
    });
    Backend {
        addr,
        name: name.to_owned(),
        connections,
        accepting: accepting.abort_handle(),
    }
}

/// One short connection to `addr` sending `request`: the first line of the answer (a tagged
/// backend's name), or None when the connection failed or nothing came back.
pub async fn first_line(addr: SocketAddr, request: &[u8]) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream.write_all(request).await.ok()?;
    stream.shutdown().await.ok()?;
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut answer),
    )
    .await
    .ok()?
    .ok()?;
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
}
