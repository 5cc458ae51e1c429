//! The accept loop: each connection is one tracked task. The task reads the
//! first request head; an SSE subscribe is served directly (see
//! [`super::direct`]), everything else goes to hyper with the bytes already
//! read replayed in front of the socket.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use bytes::{Buf, Bytes};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_io_timeout::TimeoutWriter;
use tower::ServiceExt;

use super::{Peer, State, direct, direct_ws};

/// Longest a client may take to send its first request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest first request head read before handing over to hyper.
const HEAD_LIMIT: usize = 16 * 1024;

/// Accepts connections until the shutdown token is cancelled.
pub async fn serve(listener: TcpListener, router: Router, state: State) {
    loop {
        let accepted = tokio::select! {
            () = state.shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let (router, st) = (router.clone(), state.clone());
                state.tasks.spawn(connection(stream, peer, router, st));
            }
            Err(e) => {
                // Out of file descriptors, or a reset during the handshake:
                // log, wait a moment, keep accepting.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn connection(mut stream: TcpStream, peer: SocketAddr, router: Router, state: State) {
    let Some(head) = read_head(&mut stream, &state).await else {
        return;
    };
    if let Some(sub) = direct::parse(&head)
        && let Some(session) = direct::register(&state, &sub)
    {
        drop(head);
        direct::serve(stream, state, sub, session).await;
        return;
    }
    if let Some(up) = direct_ws::parse(&head)
        && let Some(session) = direct_ws::register(&state, &up)
    {
        drop(head);
        direct_ws::serve(stream, state, up, session).await;
        return;
    }
    // Boxed: hyper's connection state is large, and every task is allocated
    // at the size of its largest state; direct SSE streams should not pay it.
    Box::pin(through_hyper(stream, head, peer, router, state)).await;
}

/// Serves the connection with hyper (HTTP/1.1 and HTTP/2, upgrades), the
/// first request head replayed in front of the socket.
async fn through_hyper(
    stream: TcpStream,
    head: Bytes,
    peer: SocketAddr,
    router: Router,
    state: State,
) {
    let mut io = TimeoutWriter::new(Rewind {
        prefix: head,
        inner: stream,
    });
    io.set_timeout(Some(state.config.write_timeout));
    let service = router.map_request(move |req: hyper::Request<hyper::body::Incoming>| {
        let mut req = req.map(axum::body::Body::new);
        req.extensions_mut().insert(ConnectInfo(Peer(peer)));
        req
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(
        TokioIo::new(Box::pin(io)),
        TowerToHyperService::new(service),
    );
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        () = state.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Reads until the end of the first request head (or the limit, or EOF).
async fn read_head(stream: &mut TcpStream, state: &State) -> Option<Bytes> {
    let mut buf = Vec::with_capacity(1024);
    let read = async {
        loop {
            if buf.len() >= HEAD_LIMIT || buf.windows(4).any(|w| w == b"\r\n\r\n") {
                return true;
            }
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(_) => {}
            }
        }
    };
    let ok = tokio::select! {
        r = tokio::time::timeout(HEAD_TIMEOUT, read) => matches!(r, Ok(true)),
        () = state.shutdown.cancelled() => false,
    };
    ok.then(|| Bytes::from(buf))
}

/// A socket with bytes already read put back in front.
struct Rewind {
    prefix: Bytes,
    inner: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if !self.prefix.has_remaining() {
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connection_tasks_stay_small() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let config = crate::config::Config::defaults(addr);
        let state = State::new(config);
        let mut c2 = TcpStream::connect(addr).await.unwrap();
        let head = read_head(&mut c2, &state);
        eprintln!("read_head future: {} bytes", std::mem::size_of_val(&head));
        drop(head);
        let sub = direct::parse(b"GET /channel/a HTTP/1.1\r\n\r\n").unwrap();
        let session = direct::register(&state, &sub).unwrap();
        let serve = direct::serve(c2, state.clone(), sub, session);
        eprintln!(
            "direct::serve future: {} bytes",
            std::mem::size_of_val(&serve)
        );
        drop(serve);
        let fut = connection(client, addr, super::super::router(state.clone()), state);
        let size = std::mem::size_of_val(&fut);
        eprintln!("connection future: {size} bytes");
        // Every direct SSE stream's task is this big (debug layout; release
        // is smaller): keep it well under the 4 KiB per connection budget.
        assert!(size < 2048, "{size}");
    }
}
