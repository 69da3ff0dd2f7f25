//! The byte relay between a client and a module instance, tuned for many short connections
//! (what `bench/run.sh` measures against HAProxy): each direction copies through its own
//! buffer and shuts its write side down when its read side ends (half-close), except when the
//! other direction is already done, since both sockets close right after and the close says
//! it; buffers are not zeroed; keepalive probes are set on the upstream socket only once the
//! connection has lived a while. Per short connection that is four system calls fewer than
//! `tokio::io::copy_bidirectional` plus up-front keepalive.

use std::{
    os::fd::{AsRawFd, BorrowedFd},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

/// Read size per direction: large enough that bulk transfers are not bound by system calls.
const BUFFER: usize = 32 * 1024;
/// A connection still open after this long gets keepalive probes on its upstream socket.
const LONG_LIVED: Duration = Duration::from_secs(5);

/// Copies both ways until both directions end (or one fails); returns the bytes sent up (to
/// the module) and down (to the client). `keep_alive` is applied to the upstream socket once
/// the connection has lived [`LONG_LIVED`].
pub async fn relay(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    keep_alive: fn(socket2::SockRef<'_>),
) -> (u64, u64) {
    let upstream_fd = upstream.as_raw_fd();
    let done = AtomicBool::new(false);
    let (mut client_read, mut client_write) = client.split();
    let (mut upstream_read, mut upstream_write) = upstream.split();
    let both = async {
        tokio::try_join!(
            pump(&mut client_read, &mut upstream_write, &done),
            pump(&mut upstream_read, &mut client_write, &done),
        )
    };
    tokio::pin!(both);
    let copied = tokio::select! {
        copied = &mut both => copied,
        () = tokio::time::sleep(LONG_LIVED) => {
            // SAFETY: `upstream` is borrowed by `both` until this function returns, so the
            // descriptor stays open for this short borrow.
            let fd = unsafe { BorrowedFd::borrow_raw(upstream_fd) };
            keep_alive(socket2::SockRef::from(&fd));
            both.await
        }
    };
    copied.unwrap_or((0, 0))
}

/// One direction: copies until `from` ends, then shuts `to` down unless the other direction
/// already finished (`done`).
async fn pump<R, W>(from: &mut R, to: &mut W, done: &AtomicBool) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buffer = Vec::with_capacity(BUFFER);
    let mut copied = 0;
    loop {
        buffer.clear();
        // `read_buf` fills the spare capacity: nothing is zeroed first.
        if from.read_buf(&mut buffer).await? == 0 {
            break;
        }
        to.write_all(&buffer).await?;
        copied += buffer.len() as u64;
    }
    if !done.swap(true, Ordering::Relaxed) {
        to.shutdown().await?;
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dialed = TcpStream::connect(listener.local_addr().unwrap());
        let (dialed, accepted) = tokio::join!(dialed, listener.accept());
        (dialed.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn half_close_passes_and_every_byte_arrives() {
        // client <-> [near | relay | far_near] <-> module
        let (mut client, mut near) = pair().await;
        let (mut far_near, mut module) = pair().await;
        let relayed = tokio::spawn(async move { relay(&mut near, &mut far_near, |_| {}).await });
        let upload: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        client.write_all(&upload).await.unwrap();
        client.shutdown().await.unwrap();
        // The module sees the whole upload and then EOF, while its way back is still open.
        let mut received = Vec::new();
        module.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, upload);
        module
            .write_all(b"answer after the client's EOF")
            .await
            .unwrap();
        module.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"answer after the client's EOF");
        assert_eq!(relayed.await.unwrap(), (200_000, 29));
    }
}
