//! A TCP forwarder that can cut the line: what a network partition does between one process
//! and a server (every open connection reset, new ones refused), and mending it afterwards on
//! the same port.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tokio::{net::TcpListener, task::AbortHandle};

pub struct Cutter {
    pub addr: SocketAddr,
    target: SocketAddr,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Cutter {
    /// Forwards a free loopback port to `target`.
    pub async fn start(target: SocketAddr) -> Cutter {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free port");
        let cutter = Cutter {
            addr: listener.local_addr().expect("a bound address"),
            target,
            tasks: Arc::default(),
        };
        cutter.serve(listener);
        cutter
    }

    fn serve(&self, listener: TcpListener) {
        let (target, tasks) = (self.target, Arc::clone(&self.tasks));
        let accepting = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let relay = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                lock(&tasks).push(relay.abort_handle());
            }
        });
        lock(&self.tasks).push(accepting.abort_handle());
    }

    /// Drops every connection and stops listening.
    pub fn cut(&self) {
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
    }

    /// Listens again on the same port.
    pub async fn mend(&self) {
        let listener = TcpListener::bind(self.addr)
            .await
            .expect("the cut port is free again");
        self.serve(listener);
    }
}

impl Drop for Cutter {
    fn drop(&mut self) {
        self.cut();
    }
}

fn lock<T>(mutex: &Mutex<Vec<T>>) -> std::sync::MutexGuard<'_, Vec<T>> {
    // A panicked relay leaves a valid list of handles behind.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
