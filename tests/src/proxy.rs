//! A TCP proxy that delays every chunk by a settable time in both directions: a slow network
//! or a slow backend, injected between two real processes without a production knob.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// A running proxy; stops accepting when dropped (open connections run on until closed).
pub struct DelayProxy {
    /// `127.0.0.1:PORT` to connect to instead of the upstream.
    pub addr: String,
    delay_ms: Arc<AtomicU64>,
    bytes_up: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl DelayProxy {
    /// Listens on a free loopback port and forwards each connection to `upstream`
    /// (`host:port`). When the upstream refuses, the client's connection is closed at once, as a
    /// dead backend would.
    pub async fn start(upstream: &str, delay: Duration) -> Self {
        let listener = bind_loopback().await;
        let addr = listener.local_addr().expect("local address").to_string();
        let delay_ms = Arc::new(AtomicU64::new(delay.as_millis() as u64));
        let bytes_up = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let upstream = upstream.to_string();
        let (d, b, c) = (delay_ms.clone(), bytes_up.clone(), connections.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let (upstream, d, b) = (upstream.clone(), d.clone(), b.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else { return };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pump(cr, sw, d.clone(), Some(b)), pump(sr, cw, d, None));
                });
            }
        });
        Self { addr, delay_ms, bytes_up, connections, accept }
    }

    /// Changes the delay for chunks read from now on (earlier ones keep their place in line).
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Bytes received from clients so far (a request reaching the proxy raises it).
    pub fn bytes_to_upstream(&self) -> u64 {
        self.bytes_up.load(Ordering::SeqCst)
    }

    /// Connections accepted from clients so far, whether or not the upstream answers (a client
    /// that never calls through the proxy leaves it at 0).
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// A listener on a port from [`crate::free_port`] (not port 0: see there). The proxy binds at
/// once, so a port taken by someone else between `free_port`'s check and this bind (CI saw
/// "Address already in use" here once) costs only a retry on the next port.
async fn bind_loopback() -> TcpListener {
    const ATTEMPTS: usize = 20;
    for attempt in 1..=ATTEMPTS {
        match TcpListener::bind(("127.0.0.1", crate::free_port())).await {
            Ok(listener) => return listener,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && attempt < ATTEMPTS => continue,
            Err(e) => panic!("bind a loopback port ({attempt} attempts): {e}"),
        }
    }
    unreachable!("the last attempt returns or panics")
}

/// Copies `from` to `to`, each chunk written `delay` after it was read, in order.
async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, delay_ms: Arc<AtomicU64>, counter: Option<Arc<AtomicU64>>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if let Some(c) = &counter {
                        c.fetch_add(n as u64, Ordering::SeqCst);
                    }
                    let due = Instant::now() + Duration::from_millis(delay_ms.load(Ordering::SeqCst));
                    if tx.send((due, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
