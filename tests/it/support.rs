//! Test harness: a hub on a free loopback port, and real clients.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, Stream, StreamExt};
use herald::app::App;
use herald::config::Config;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// Longest any single wait in a test may take before it fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// A config for tests: loopback, port 0.
pub fn config() -> Config {
    let mut c = Config::defaults("127.0.0.1:0".parse().unwrap());
    // Tests that stop a hub stop it at once (the drain has its own test).
    c.drain_delay = Duration::ZERO;
    c
}

/// A running hub; dropping it shuts it down.
pub struct TestHub {
    pub addr: SocketAddr,
    /// The spa-reloader compatible listener, if configured.
    pub compat: Option<SocketAddr>,
    pub hub: Arc<herald::hub::Hub>,
    pub token: CancellationToken,
    pub done: Option<tokio::task::JoinHandle<()>>,
    pub http: reqwest::Client,
}

impl TestHub {
    pub async fn spawn() -> Self {
        Self::with(config()).await
    }

    pub async fn with(config: Config) -> Self {
        let app = App::bind(config).await.expect("bind 127.0.0.1:0");
        let addr = app.local_addr();
        let compat = app.compat_addr();
        let hub = app.hub().clone();
        let token = CancellationToken::new();
        let done = tokio::spawn({
            let token = token.clone();
            async move { app.run(token).await.expect("server runs") }
        });
        Self {
            addr,
            compat,
            hub,
            token,
            done: Some(done),
            http: crate::support::http(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Publishes text; returns the event id.
    pub async fn publish(&self, channel: &str, data: &str) -> String {
        let resp = self
            .http
            .post(self.url(&format!("/channel/{channel}")))
            .body(data.to_owned())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202, "{:?}", resp.text().await);
        let v: serde_json::Value = resp.json().await.unwrap();
        v["id"].as_str().unwrap().to_owned()
    }

    /// Publishes a JSON envelope; returns status and body.
    pub async fn publish_json(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let resp = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// Opens an SSE stream and waits for the 200.
    pub async fn sse(&self, path: &str) -> Sse {
        self.sse_with(path, None).await
    }

    pub async fn sse_with(&self, path: &str, last_event_id: Option<&str>) -> Sse {
        let mut req = self.http.get(self.url(path));
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let resp = tokio::time::timeout(WAIT, req.send())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        Sse::new(resp)
    }

    /// Opens a WebSocket and waits for one `subscribed` frame per channel.
    pub async fn ws(&self, query: &str) -> Ws {
        let url = format!("ws://{}/ws{query}", self.addr);
        let (socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let mut ws = Ws { socket };
        let n = query.matches("channel=").count();
        for _ in 0..n {
            assert_eq!(ws.next_json().await["type"], "subscribed");
        }
        ws
    }

    /// Stops the server and waits for it to exit.
    pub async fn stop(&mut self) {
        self.token.cancel();
        if let Some(done) = self.done.take() {
            tokio::time::timeout(WAIT, done).await.unwrap().unwrap();
        }
    }

    pub async fn status(&self) -> serde_json::Value {
        get_json(&self.url("/status")).await
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// A parsed SSE event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ev {
    pub id: String,
    pub event: String,
    pub data: String,
}

type EvStream = std::pin::Pin<Box<dyn Stream<Item = Option<Ev>> + Send>>;

/// An SSE client over a real HTTP response.
pub struct Sse {
    pub headers: reqwest::header::HeaderMap,
    events: EvStream,
}

impl Sse {
    pub fn from_response(resp: reqwest::Response) -> Self {
        assert_eq!(resp.status(), 200);
        Self::new(resp)
    }

    fn new(resp: reqwest::Response) -> Self {
        let headers = resp.headers().clone();
        let events = eventsource_stream::EventStream::new(resp.bytes_stream()).map(|r| {
            r.ok().map(|e| Ev {
                id: e.id,
                event: e.event,
                data: e.data,
            })
        });
        Self {
            headers,
            events: Box::pin(events),
        }
    }

    /// The next event; panics on end of stream or timeout.
    pub async fn next(&mut self) -> Ev {
        self.try_next().await.expect("stream ended")
    }

    /// The next event, or `None` at the end of the stream.
    pub async fn try_next(&mut self) -> Option<Ev> {
        tokio::time::timeout(WAIT, self.events.next())
            .await
            .expect("timed out waiting for an event")
            .flatten()
    }

    pub async fn next_data(&mut self) -> String {
        self.next().await.data
    }

    /// Waits for the end of the stream.
    pub async fn ends(&mut self) {
        while self.try_next().await.is_some() {}
    }
}

/// A WebSocket client.
pub struct Ws {
    pub socket: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
}

impl Ws {
    pub async fn next_msg(&mut self) -> Option<Message> {
        loop {
            let m = tokio::time::timeout(WAIT, self.socket.next())
                .await
                .expect("timed out waiting for a frame")?;
            match m {
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                Ok(m) => return Some(m),
                Err(_) => return None,
            }
        }
    }

    pub async fn next_json(&mut self) -> serde_json::Value {
        match self.next_msg().await {
            Some(Message::Text(t)) => serde_json::from_str(&t).unwrap(),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    pub async fn send_json(&mut self, v: serde_json::Value) {
        self.socket
            .send(Message::text(v.to_string()))
            .await
            .unwrap();
    }

    /// Waits for a close frame and returns its code.
    pub async fn close_code(&mut self) -> u16 {
        loop {
            match self.next_msg().await {
                Some(Message::Close(Some(f))) => return f.code.into(),
                Some(Message::Close(None)) | None => panic!("closed without a code"),
                Some(_) => continue,
            }
        }
    }
}

/// A TCP proxy that can cut every connection it carries.
pub struct Proxy {
    pub addr: SocketAddr,
    cut: tokio::sync::watch::Sender<u64>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let cut_rx = cut.subscribe();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let mut cut_rx = cut_rx.clone();
                cut_rx.mark_unchanged();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        Self { addr, cut }
    }

    /// Drops every open connection (new ones are still accepted).
    pub fn cut_all(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

/// Reads from a raw socket until `needle` has been seen; returns all read.
pub async fn read_until(stream: &mut TcpStream, needle: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if String::from_utf8_lossy(&buf).contains(needle) {
            return String::from_utf8_lossy(&buf).into_owned();
        }
        let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "timed out waiting for {needle:?}; got {:?}",
                    String::from_utf8_lossy(&buf)
                )
            })
            .unwrap();
        assert!(
            n > 0,
            "closed before {needle:?}; got {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Sends a raw HTTP/1.1 GET and returns the socket.
pub async fn raw_get(addr: SocketAddr, path: &str, extra: &str) -> TcpStream {
    get_on(addr, false, path, extra).await
}

/// Sends `GET path` with `extra` headers on a raw socket: as the first
/// request of a connection (served directly) or, if `hyper`, after a
/// kept-alive `/healthz` (so hyper serves it). Returns the socket, the
/// response pending.
pub async fn get_on(addr: SocketAddr, hyper: bool, path: &str, extra: &str) -> TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = TcpStream::connect(addr).await.unwrap();
    if hyper {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        read_until(&mut s, "\"ok\"}").await;
    }
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n").as_bytes())
        .await
        .unwrap();
    s
}

/// Polls an observable condition (a status endpoint, not a clock) until it
/// holds; fails after [`WAIT`].
pub async fn eventually<F, Fut>(mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition never held"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A new empty directory of this test process.
pub fn tempdir() -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "herald-it-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// GETs a URL and reads its JSON body.
pub async fn get_json(url: &str) -> serde_json::Value {
    http().get(url).send().await.unwrap().json().await.unwrap()
}

/// Sends a signal (`-STOP`, `-KILL`, ...) to a process, by PID.
pub fn signal(pid: u32, sig: &str) {
    assert!(
        std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
}

/// A port free right now on every address: herald binds some of them on
/// `0.0.0.0` or on other 127.0.0.x addresses, and a port the kernel picks
/// for `127.0.0.1` alone may be held elsewhere (a client socket on
/// 127.0.0.5, or one in TIME_WAIT), which makes such a bind fail.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An HTTP client (rustls with ring, as the CLI uses).
pub fn http() -> reqwest::Client {
    herald::cli::http_client().unwrap()
}

/// A subscriber that never reads: a raw socket with a tiny receive buffer,
/// returned once its stream has started.
pub async fn stalled_subscriber(addr: SocketAddr, path: &str) -> TcpStream {
    use tokio::io::AsyncWriteExt;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    read_until(&mut s, "retry: 2000\n").await;
    s
}

/// A WebSocket client on a raw socket, frame by frame: it answers pings
/// only when told to, and sends whatever frames a test builds.
pub struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

/// A frame from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The close code of a close frame.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == 8 && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

impl RawWs {
    /// Upgrades `GET path` on `addr`; after a kept-alive `/healthz` first
    /// if `hyper` (so hyper serves it), else as the first request (the
    /// direct path). `extra` headers replace the default upgrade headers
    /// when they start with "!" (the rest is sent as is).
    pub async fn connect(addr: SocketAddr, hyper: bool, path: &str) -> Self {
        Self::try_connect(addr, hyper, path, "")
            .await
            .unwrap_or_else(|head| panic!("no 101: {head}"))
    }

    /// As [`RawWs::connect`] with more headers; `Err(response head)` if the
    /// answer is not 101.
    pub async fn try_connect(
        addr: SocketAddr,
        hyper: bool,
        path: &str,
        extra: &str,
    ) -> Result<Self, String> {
        let headers = match extra.strip_prefix('!') {
            Some(own) => own.to_owned(),
            None => format!(
                "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}"
            ),
        };
        let stream = get_on(addr, hyper, path, &headers).await;
        let mut ws = Self {
            stream,
            buf: vec![],
        };
        let head = ws.head().await;
        if head.starts_with("HTTP/1.1 101") {
            Ok(ws)
        } else {
            Err(head)
        }
    }

    async fn fill(&mut self) -> bool {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(WAIT, self.stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Ok(_) => false,
            Err(_) => panic!("timed out waiting for the server"),
        }
    }

    /// The response head (and, if not 101, what followed).
    async fn head(&mut self) -> String {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end + 4]).into_owned();
                if head.starts_with("HTTP/1.1 101") {
                    self.buf.drain(..end + 4);
                    return head;
                }
                // An error: read its body too (content-length; it is small).
                let len = head
                    .to_ascii_lowercase()
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap_or(0))
                    })
                    .unwrap_or(0usize);
                while self.buf.len() < end + 4 + len && self.fill().await {}
                return String::from_utf8_lossy(&self.buf).into_owned();
            }
            if !self.fill().await {
                return String::from_utf8_lossy(&self.buf).into_owned();
            }
        }
    }

    /// The next frame, or `None` once the server closed the connection.
    pub async fn frame(&mut self) -> Option<Frame> {
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// The next frame that is not a ping (pings are not answered).
    pub async fn frame_not_ping(&mut self) -> Option<Frame> {
        loop {
            let f = self.frame().await?;
            if f.opcode != 9 {
                return Some(f);
            }
        }
    }

    /// Sends one masked frame: `first` is FIN/RSV/opcode.
    pub async fn send(&mut self, first: u8, payload: &[u8]) {
        self.send_raw(&herald::http::fuzz::masked_frame(
            first,
            payload,
            [1, 2, 3, 4],
        ))
        .await;
    }

    /// Sends bytes as they are.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        // A server that closed first may reset: that is its answer.
        let _ = self.stream.write_all(bytes).await;
    }
}

/// One unmasked server frame at the start of `b`, and its length.
fn parse_server_frame(b: &[u8]) -> Option<(Frame, usize)> {
    if b.len() < 2 {
        return None;
    }
    assert_eq!(b[1] & 0x80, 0, "server frames are unmasked");
    let (len, at) = match b[1] & 0x7f {
        126 => (u16::from_be_bytes([*b.get(2)?, *b.get(3)?]) as usize, 4),
        127 => (
            u64::from_be_bytes(b.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let payload = b.get(at..at + len)?.to_vec();
    Some((
        Frame {
            fin: b[0] & 0x80 != 0,
            opcode: b[0] & 0x0f,
            payload,
        },
        at + len,
    ))
}
