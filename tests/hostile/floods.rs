//! Many connections at once: slowloris, handshake and per-address bounds,
//! running out of file descriptors.

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

use crate::harness::{Herald, eventually, read_to_close, read_until};

/// Raises this process's open-file limit to its hard limit.
fn more_files() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap()
}

/// A connection from `127.0.0.{from}`, closed with a reset when dropped:
/// thousands of them must not leave thousands of TIME_WAIT ports behind
/// for the tests that run next.
async fn connect_from(addr: std::net::SocketAddr, from: u8) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(format!("127.0.0.{from}:0").parse().unwrap())?;
    sock.set_zero_linger()?;
    sock.connect(addr).await
}

/// Slowloris: 5,000 connections from 50 addresses each send a request
/// head one byte a second. A normal subscriber still connects and gets an
/// event within 2 s, and RSS stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_does_not_lock_out_a_normal_subscriber() {
    let files = more_files();
    assert!(
        files > 11_000,
        "open-file limit {files}: run under scripts/test"
    );
    let h = Herald::start(&[]).await;
    let before = h.rss_mib();
    let mut slow = Vec::with_capacity(5000);
    for i in 0..5000u32 {
        let s = connect_from(h.addr, 10 + (i % 50) as u8).await.unwrap();
        slow.push(s);
    }
    let drip = tokio::spawn(async move {
        let head = b"GET /channel/slow HTTP/1.1\r\nHost: x\r\n";
        for b in head {
            for s in &mut slow {
                let _ = s.write_all(&[*b]).await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        slow
    });
    let start = Instant::now();
    let mut s = connect_from(h.addr, 200).await.unwrap();
    s.write_all(b"GET /channel/normal HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut s, b"retry:").await;
    assert_eq!(h.publish("normal", "hello").await, 202);
    read_until(&mut s, b"data: hello").await;
    let took = start.elapsed();
    assert!(took < Duration::from_secs(2), "{took:?}");
    let grew = h.rss_mib() - before;
    eprintln!("slowloris: normal subscriber in {took:?}; RSS grew by {grew:.1} MiB");
    assert!(grew < 64.0, "RSS grew by {grew:.1} MiB");
    drip.abort();
}

/// `--max-handshakes` and `--max-connections-per-ip`: a 503 at once, and
/// other addresses are still served.
#[tokio::test]
async fn handshake_and_per_address_bounds_answer_503() {
    let mut h = Herald::start(&["--max-handshakes", "10", "--max-connections-per-ip", "20"]).await;
    let mut idle = vec![];
    for _ in 0..10 {
        idle.push(connect_from(h.addr, 30).await.unwrap());
    }
    eventually(|| async { h.status().await["admission"]["handshaking"] == 10 }).await;
    let mut s = connect_from(h.addr, 31).await.unwrap();
    let resp = read_to_close(&mut s, Duration::from_secs(2)).await;
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    drop(idle);
    eventually(|| async { h.status().await["admission"]["handshaking"] == 0 }).await;
    // 20 open connections from one address; the 21st is refused.
    let mut open = vec![];
    for _ in 0..20 {
        let mut s = connect_from(h.addr, 32).await.unwrap();
        s.write_all(b"GET /channel/p HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        read_until(&mut s, b"retry:").await;
        open.push(s);
    }
    let mut s = connect_from(h.addr, 32).await.unwrap();
    let resp = read_to_close(&mut s, Duration::from_secs(2)).await;
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("--max-connections-per-ip"), "{text}");
    let mut other = connect_from(h.addr, 33).await.unwrap();
    other
        .write_all(b"GET /channel/p HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut other, b"retry:").await;
    let st = h.status().await;
    assert_eq!(st["admission"]["refused_per_ip"], 1);
    assert_eq!(st["admission"]["refused_handshakes"], 1);
    h.assert_rss_below(64.0);
}

/// Out of file descriptors: open connections are still served, accepting
/// resumes when some close, one warning per episode (no log flood), and
/// `/status` counts it.
#[tokio::test]
async fn running_out_of_file_descriptors_keeps_serving() {
    more_files();
    let log = std::env::temp_dir().join(format!("herald-hostile-fd-{}.log", std::process::id()));
    let mut h = Herald::start_limited(&[], 64, &log).await;
    // A kept-alive connection and a subscriber, opened before.
    let mut sub = TcpStream::connect(h.addr).await.unwrap();
    sub.write_all(b"GET /channel/fd HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut sub, b"retry:").await;
    let mut flood = vec![];
    for _ in 0..120 {
        if let Ok(s) = TcpStream::connect(h.addr).await {
            flood.push(s);
        }
    }
    eventually(|| async {
        h.status().await["admission"]["out_of_file_descriptors"]
            .as_u64()
            .unwrap_or(0)
            > 0
    })
    .await;
    // Publishing over a connection herald already holds still works.
    assert_eq!(h.publish("fd", "still-here").await, 202);
    read_until(&mut sub, b"data: still-here").await;
    let flood_for = Duration::from_millis(1500);
    tokio::time::sleep(flood_for).await; // a span of time for the log to flood, if it did
    drop(flood);
    eventually(|| async {
        match TcpStream::connect(h.addr).await {
            Ok(mut s) => {
                let _ = s
                    .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .await;
                let r = read_to_close(&mut s, Duration::from_secs(5)).await;
                r.starts_with(b"HTTP/1.1 200")
            }
            Err(_) => false,
        }
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let warnings = text.matches("out of file descriptors").count();
    assert!(warnings <= 2, "{warnings} warnings:\n{text}");
    let _ = std::fs::remove_file(&log);
    h.assert_rss_below(64.0);
}
