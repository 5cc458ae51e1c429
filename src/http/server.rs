//! The accept loop: each connection is one tracked task. The task reads the
//! first request head; an SSE subscribe is served directly (see
//! [`super::direct`]), everything else goes to hyper with the bytes already
//! read replayed in front of the socket.
//!
//! Everything a client can make this loop hold is bounded
//! ([`crate::config::Limits`]): connections still sending their first head
//! (`--max-handshakes`), connections per address
//! (`--max-connections-per-ip`), the time to send a head (`--head-timeout`,
//! then `--keep-alive-timeout` for every later one), HTTP/2 peers that stop
//! answering pings. When file descriptors run out, open connections are
//! still served and accepting backs off (10 ms, doubling to 1 s) with one
//! warning per episode, counted in `/status`.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use bytes::{Buf, Bytes};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_io_timeout::TimeoutWriter;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use super::{Peer, State, direct, direct_ws};
use crate::config::Limits;

/// Largest request head: longer ones are answered 431 by hyper.
pub(super) const HEAD_LIMIT: usize = 16 * 1024;
/// Most concurrent streams on one HTTP/2 connection.
const H2_MAX_STREAMS: u32 = 256;

/// Who may connect: the handshake and per-address bounds, and the
/// counters `/status` shows. One per listener.
#[derive(Debug, Default)]
pub struct Admission {
    limits: Limits,
    handshakes: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    refused_handshakes: AtomicU64,
    refused_per_ip: AtomicU64,
    accept_errors: AtomicU64,
    fd_exhausted: AtomicU64,
}

/// A connection counted against its address until dropped.
struct Admitted {
    admission: Arc<Admission>,
    ip: Option<IpAddr>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            let mut m = self.admission.per_ip.lock();
            if let Some(n) = m.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&ip);
                }
            }
            if m.is_empty() && m.capacity() > 1024 {
                m.shrink_to_fit();
            }
        }
    }
}

/// A connection counted as still in its handshake until dropped.
struct Handshake(Arc<Admission>);

impl Drop for Handshake {
    fn drop(&mut self) {
        self.0.handshakes.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Admission {
    /// Admission with these limits.
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            ..Self::default()
        })
    }

    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Admitted> {
        let max = self.limits.max_connections_per_ip;
        if max == 0 {
            return Some(Admitted {
                admission: self.clone(),
                ip: None,
            });
        }
        let mut m = self.per_ip.lock();
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            drop(m);
            self.refused_per_ip.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *n += 1;
        Some(Admitted {
            admission: self.clone(),
            ip: Some(ip),
        })
    }

    fn handshake(self: &Arc<Self>) -> Option<Handshake> {
        let n = self.handshakes.fetch_add(1, Ordering::Relaxed);
        let guard = Handshake(self.clone());
        if n >= self.limits.max_handshakes {
            self.refused_handshakes.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(guard)
    }

    /// The counters, for `/status`.
    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "handshaking": self.handshakes.load(Ordering::Relaxed),
            "addresses": self.per_ip.lock().len(),
            "refused_handshakes": self.refused_handshakes.load(Ordering::Relaxed),
            "refused_per_ip": self.refused_per_ip.load(Ordering::Relaxed),
            "accept_errors": self.accept_errors.load(Ordering::Relaxed),
            "out_of_file_descriptors": self.fd_exhausted.load(Ordering::Relaxed),
        })
    }
}

/// Accepts connections until `shutdown`, handing each to `serve` as a
/// tracked task. Out of file descriptors, it backs off instead of
/// spinning, and warns once per episode.
async fn accept_loop<F, Fut>(
    listener: TcpListener,
    admission: &Admission,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
    mut serve: F,
) where
    F: FnMut(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut backoff = Duration::ZERO;
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                if !backoff.is_zero() {
                    tracing::info!("accepting connections again");
                    backoff = Duration::ZERO;
                }
                let _ = stream.set_nodelay(true);
                tasks.spawn(serve(stream, peer));
            }
            Err(e) if out_of_files(&e) => {
                admission.fd_exhausted.fetch_add(1, Ordering::Relaxed);
                if backoff.is_zero() {
                    tracing::warn!(error = %e, "out of file descriptors: serving open connections, accepting again as they close");
                }
                backoff = (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
            }
            Err(e) => {
                // A connection reset before it was accepted: nothing to do.
                admission.accept_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "accept failed");
            }
        }
    }
}

fn out_of_files(e: &io::Error) -> bool {
    // EMFILE (24): this process; ENFILE (23): the system; ENOBUFS/ENOMEM.
    matches!(e.raw_os_error(), Some(23 | 24 | 105 | 12))
}

/// Accepts public connections until the shutdown token is cancelled.
pub async fn serve(listener: TcpListener, router: Router, state: State) {
    let (shutdown, tasks, admission) = (
        state.shutdown.clone(),
        state.tasks.clone(),
        state.admission.clone(),
    );
    accept_loop(listener, &admission, &shutdown, &tasks, |stream, peer| {
        connection(stream, peer, router.clone(), state.clone())
    })
    .await;
}

/// Accepts connections for an internal router (peers): no direct paths
/// and no per-address limit (peers are few and share addresses behind
/// NAT), but the same timeouts and handshake bound.
pub async fn serve_internal(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    write_timeout: Duration,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let admission = Admission::new(Limits {
        max_connections_per_ip: 0,
        ..limits
    });
    let conn = Conn {
        limits: admission.limits.clone(),
        write_timeout,
        heartbeat: Duration::from_secs(15),
        shutdown: shutdown.clone(),
    };
    accept_loop(
        listener,
        &admission,
        &shutdown,
        &tasks,
        |mut stream, peer| {
            let (router, conn, admission) = (router.clone(), conn.clone(), admission.clone());
            async move {
                let Some(handshake) = admission.handshake() else {
                    refuse(&stream, "too many connections are starting; retry");
                    return;
                };
                let head = read_head(&mut stream, conn.limits.head_timeout, &conn.shutdown).await;
                let Some(head) = head else {
                    return;
                };
                drop(handshake);
                Box::pin(through_hyper(stream, head, peer, router, conn)).await;
            }
        },
    )
    .await;
}

/// What serving one connection through hyper needs.
#[derive(Debug, Clone)]
struct Conn {
    limits: Limits,
    write_timeout: Duration,
    heartbeat: Duration,
    shutdown: CancellationToken,
}

impl Conn {
    fn of(state: &State) -> Self {
        Self {
            limits: state.config.limits.clone(),
            write_timeout: state.config.write_timeout,
            heartbeat: state.config.heartbeat,
            shutdown: state.shutdown.clone(),
        }
    }
}

/// Answers 503 without reading the request, then closes (best effort,
/// never waits).
fn refuse(stream: &TcpStream, why: &str) {
    let body = serde_json::json!({ "error": why }).to_string();
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.try_write(resp.as_bytes());
}

async fn connection(mut stream: TcpStream, peer: SocketAddr, router: Router, state: State) {
    let Some(_admitted) = state.admission.admit(peer.ip()) else {
        refuse(
            &stream,
            "too many connections from this address (--max-connections-per-ip)",
        );
        return;
    };
    let Some(handshake) = state.admission.handshake() else {
        refuse(&stream, "too many connections are starting; retry");
        return;
    };
    let Some(head) = read_head(
        &mut stream,
        state.config.limits.head_timeout,
        &state.shutdown,
    )
    .await
    else {
        return;
    };
    drop(handshake);
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
    let conn = Conn::of(&state);
    drop(state);
    // Boxed: hyper's connection state is large, and every task is allocated
    // at the size of its largest state; direct SSE streams should not pay it.
    Box::pin(through_hyper(stream, head, peer, router, conn)).await;
}

/// Serves the connection with hyper (HTTP/1.1 and HTTP/2, upgrades), the
/// first request head replayed in front of the socket.
async fn through_hyper(
    stream: TcpStream,
    head: Bytes,
    peer: SocketAddr,
    router: Router,
    conn: Conn,
) {
    let mut io = TimeoutWriter::new(Rewind {
        prefix: head,
        inner: stream,
    });
    io.set_timeout(Some(conn.write_timeout));
    let service = router.map_request(move |req: hyper::Request<hyper::body::Incoming>| {
        let mut req = req.map(axum::body::Body::new);
        req.extensions_mut().insert(ConnectInfo(Peer(peer)));
        req
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Every later head, and the idle wait before it.
        .header_read_timeout(conn.limits.keep_alive_timeout)
        .max_buf_size(HEAD_LIMIT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(conn.heartbeat)
        .keep_alive_timeout(conn.write_timeout)
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_header_list_size(HEAD_LIMIT as u32);
    let served = builder.serve_connection_with_upgrades(
        TokioIo::new(Box::pin(io)),
        TowerToHyperService::new(service),
    );
    tokio::pin!(served);
    tokio::select! {
        _ = served.as_mut() => {}
        () = conn.shutdown.cancelled() => {
            served.as_mut().graceful_shutdown();
            let _ = served.await;
        }
    }
}

/// Whether `buf` holds a whole request head yet: `Some(true)` complete,
/// `Some(false)` invalid (hyper answers 400 at once), `None` partial.
/// httparse accepts bare-LF line ends, as hyper does.
pub(super) fn head_state(buf: &[u8]) -> Option<bool> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    match httparse::Request::new(&mut headers).parse(buf) {
        Ok(httparse::Status::Complete(_)) => Some(true),
        Ok(httparse::Status::Partial) => None,
        Err(_) => Some(false),
    }
}

/// Reads until the first request head is complete, invalid, or over the
/// limit (hyper then answers), within `--head-timeout`; `None` on EOF,
/// timeout or shutdown (the socket is closed).
async fn read_head(
    stream: &mut TcpStream,
    within: Duration,
    shutdown: &CancellationToken,
) -> Option<Bytes> {
    let mut buf = Vec::with_capacity(1024);
    let read = async {
        loop {
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(_) => {}
            }
            if buf.len() >= HEAD_LIMIT || head_state(&buf).is_some() {
                return true;
            }
        }
    };
    let ok = tokio::select! {
        r = tokio::time::timeout(within, read) => matches!(r, Ok(true)),
        () = shutdown.cancelled() => false,
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
        let head = read_head(&mut c2, Duration::from_secs(10), &state.shutdown);
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
