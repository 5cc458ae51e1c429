//! The public listener: TCP with `TCP_NODELAY` and a write timeout.
//!
//! The write timeout is what finally frees a connection whose client
//! stopped reading: once its outbox overflows the hub forgets it, and the
//! socket is dropped when a write has been blocked for `--write-timeout`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use tokio::net::{TcpListener, TcpStream};
use tokio_io_timeout::TimeoutWriter;

/// A TCP listener whose connections time out blocked writes.
#[derive(Debug)]
pub struct Listener {
    inner: TcpListener,
    write_timeout: Duration,
}

impl Listener {
    /// Wraps a bound listener.
    pub fn new(inner: TcpListener, write_timeout: Duration) -> Self {
        Self {
            inner,
            write_timeout,
        }
    }
}

impl axum::serve::Listener for Listener {
    type Io = Pin<Box<TimeoutWriter<TcpStream>>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    // Small frames must not wait for Nagle's algorithm.
                    let _ = stream.set_nodelay(true);
                    let mut io = TimeoutWriter::new(stream);
                    io.set_timeout(Some(self.write_timeout));
                    return (Box::pin(io), addr);
                }
                Err(e) => {
                    // Out of file descriptors or a reset during the
                    // handshake: log, wait a moment, keep accepting.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// The client's address, as a handler extractor (`ConnectInfo<Peer>`).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

impl Connected<IncomingStream<'_, Listener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, Listener>) -> Self {
        Self(*stream.remote_addr())
    }
}

impl Connected<SocketAddr> for Peer {
    fn connect_info(addr: SocketAddr) -> Self {
        Self(addr)
    }
}
