//! The load generator's WebSocket client (`herald bench`'s reader,
//! `bench::wire::WsReader`, on herald's own frame codec) as an Autobahn
//! echo client, for `kosoku -m fuzzingserver` (see README "Conformance"):
//!
//! ```text
//! kosoku -m fuzzingserver -o DIR 127.0.0.1:9002 &
//! cargo run --release --example ws_fuzzing_client -- 127.0.0.1:9002
//! ```
//!
//! It asks for the number of cases, runs each one (echoing every message,
//! answering pings and closes, closing with the codec's code when the
//! server breaks the protocol), then asks for the reports.

use anyhow::{Context, bail};
use herald::bench::wire::{Error, WsItem, WsReader};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const AGENT: &str = "herald-bench";

/// One WebSocket connection to `path`: echoes until either side closes.
/// Returns the text messages received (for `getCaseCount`).
async fn run(addr: &str, path: &str) -> anyhow::Result<Vec<String>> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to {addr}"))?;
    stream.set_nodelay(true)?;
    stream
        .write_all(WsReader::request(addr, path).as_bytes())
        .await?;
    let mut reader = WsReader::default();
    let mut texts = vec![];
    let mut buf = vec![0u8; 64 * 1024];
    let mut closing = false;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(texts);
        }
        if closing {
            continue; // wait for the server to close the TCP connection
        }
        let mut out = vec![];
        let fed = reader.feed(&buf[..n], &mut |item| match item {
            WsItem::Text(t) => {
                texts.push(String::from_utf8_lossy(t).into_owned());
                out.extend(WsReader::frame(0x81, t));
            }
            WsItem::Binary(b) => out.extend(WsReader::frame(0x82, b)),
            WsItem::Ping(p) => out.extend(WsReader::pong(&p)),
            WsItem::Close(code) => {
                if !closing {
                    closing = true;
                    out.extend(WsReader::frame(0x88, &code.to_be_bytes()));
                }
            }
        });
        match fed {
            Ok(()) => {}
            Err(Error::WebSocket(code, _)) => {
                closing = true;
                out.extend(WsReader::frame(0x88, &code.to_be_bytes()));
            }
            Err(e) => bail!("{path}: {e}"),
        }
        if !out.is_empty() {
            // A server that already closed may reset: the case is decided.
            let _ = stream.write_all(&out).await;
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9002".to_owned());
    let count: usize = run(&addr, "/getCaseCount")
        .await?
        .first()
        .context("no case count")?
        .trim()
        .parse()
        .context("the case count is not a number")?;
    for case in 1..=count {
        if let Err(e) = run(&addr, &format!("/runCase?case={case}&agent={AGENT}")).await {
            eprintln!("case {case}: {e:#}");
        }
    }
    run(&addr, &format!("/updateReports?agent={AGENT}")).await?;
    println!("ran {count} cases");
    Ok(())
}
