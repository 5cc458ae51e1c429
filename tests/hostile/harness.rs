//! A `herald serve` process on free loopback ports, its RSS, raw clients.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::{Child, Command};

pub use crate::support::{eventually, free_port};

const BUILT: &str = env!("CARGO_BIN_EXE_herald");

/// The binary under test: `HERALD_BIN` (to try an older build), else this build's.
fn bin() -> String {
    std::env::var("HERALD_BIN").unwrap_or_else(|_| BUILT.to_owned())
}

/// Longest any single wait in a test may take before it fails.
pub const WAIT: Duration = Duration::from_secs(30);

/// A running `herald serve`; killed when dropped.
pub struct Herald {
    pub child: Child,
    pub addr: SocketAddr,
    pub internal: SocketAddr,
    pub http: reqwest::Client,
}

impl Herald {
    /// Starts `herald serve` with `args` and waits until `/healthz` answers.
    pub async fn start(args: &[&str]) -> Self {
        Self::spawn(args, None).await
    }

    /// Starts it allowed only `files` open files, logging to `log`.
    pub async fn start_limited(args: &[&str], files: u64, log: &std::path::Path) -> Self {
        Self::spawn(args, Some((files, log))).await
    }

    async fn spawn(args: &[&str], limited: Option<(u64, &std::path::Path)>) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let internal: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = match limited {
            None => Command::new(bin()),
            Some((files, _)) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={files}")).arg(bin());
                c
            }
        };
        cmd.arg("serve")
            .args(["--listen", &addr.to_string()])
            .args(["--internal-listen", &internal.to_string()])
            .args(["--node-name", "hostile"])
            .args(args)
            .env_remove("KUBECONFIG")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(match limited {
                Some((_, log)) => Stdio::from(std::fs::File::create(log).unwrap()),
                None if std::env::var_os("HERALD_TEST_LOGS").is_some() => Stdio::inherit(),
                None => Stdio::null(),
            })
            .kill_on_drop(true);
        let child = cmd.spawn().unwrap();
        let http = herald::cli::http_client().unwrap();
        let h = Self {
            child,
            addr,
            internal,
            http,
        };
        eventually(|| async { h.get_status("/healthz").await == Some(200) }).await;
        h
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn get_status(&self, path: &str) -> Option<u16> {
        let r = self.http.get(self.url(path)).send().await.ok()?;
        Some(r.status().as_u16())
    }

    /// `GET /status` as JSON.
    pub async fn status(&self) -> serde_json::Value {
        let r = self.http.get(self.url("/status")).send().await.unwrap();
        r.json().await.unwrap()
    }

    /// Resident memory of the process, in MiB.
    pub fn rss_mib(&self) -> f64 {
        let pid = self.child.id().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        kib / 1024.0
    }

    /// Fails unless the process's RSS is under `mib` (and it is alive).
    pub fn assert_rss_below(&mut self, mib: f64) {
        assert!(self.alive(), "herald exited");
        let rss = self.rss_mib();
        assert!(rss < mib, "RSS {rss:.1} MiB, bound {mib} MiB");
    }

    /// Publishes `n` events of `size` bytes to `channel`, 8 at a time.
    pub async fn fill(&self, channel: &str, n: usize, size: usize) {
        let body = "x".repeat(size);
        let url = self.url(&format!("/channel/{channel}"));
        let mut left = n;
        while left > 0 {
            let k = left.min(8);
            let sends = (0..k).map(|_| self.http.post(&url).body(body.clone()).send());
            for r in futures_util::future::join_all(sends).await {
                assert_eq!(r.unwrap().status(), 202);
            }
            left -= k;
        }
    }

    /// Publishes one text event; returns the status.
    pub async fn publish(&self, channel: &str, data: &str) -> u16 {
        let r = self
            .http
            .post(self.url(&format!("/channel/{channel}")))
            .body(data.to_owned())
            .send()
            .await
            .unwrap();
        r.status().as_u16()
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

/// A socket with a small receive buffer (a client that will not read),
/// from `127.0.0.x`.
pub async fn tiny_socket(addr: SocketAddr, from: u8) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.bind(format!("127.0.0.{from}:0").parse().unwrap())
        .unwrap();
    sock.connect(addr).await.unwrap()
}

/// Reads until `needle` has been seen or the peer closes; returns all read.
pub async fn read_until(stream: &mut TcpStream, needle: &[u8]) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + WAIT;
    while !buf.windows(needle.len()).any(|w| w == needle) {
        let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "timed out waiting for {:?}; got {:?}",
                    String::from_utf8_lossy(needle),
                    String::from_utf8_lossy(&buf)
                )
            })
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    buf
}

/// Reads until the peer closes (EOF or reset); the bytes read, or a panic
/// after `within`.
pub async fn read_to_close(stream: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => panic!(
                "not closed within {within:?}; got {:?}",
                String::from_utf8_lossy(&buf)
            ),
            Ok(Ok(0) | Err(_)) => return buf,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A masked client text frame.
pub fn ws_text(payload: &[u8]) -> Vec<u8> {
    ws_frame(0x81, payload)
}

/// A masked client frame with first byte `first`.
pub fn ws_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    herald::http::fuzz::masked_frame(first, payload, [7, 1, 9, 3])
}

/// Opens a WebSocket on a raw socket and reads the 101.
pub async fn ws_open(stream: &mut TcpStream, query: &str) {
    let req = format!(
        "GET /ws{query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let head = read_until(stream, b"\r\n\r\n").await;
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{:?}",
        String::from_utf8_lossy(&head)
    );
}
