//! herald's WebSocket implementation as an echo server, for conformance
//! suites (Autobahn through `kosoku`, see README "Conformance"):
//!
//! ```text
//! cargo run --release --example ws_echo -- --listen 127.0.0.1:9001
//! ```
//!
//! It runs the handshake, frame decoder, UTF-8 checks, close handling and
//! writer that serve `/ws`, and echoes every message instead of reading
//! subscribe requests. `--max-message` (default 16MiB, what Autobahn's
//! largest cases send) replaces `/ws`'s 16 KiB client-message limit.

use clap::Parser;

/// Options.
#[derive(Parser)]
struct Args {
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: std::net::SocketAddr,
    /// The largest message echoed (e.g. 16MiB); larger ones close with 1009.
    #[arg(long, default_value = "16MiB", value_parser = herald::config::parse_size)]
    max_message: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("ws_echo listening on ws://{}", listener.local_addr()?);
    herald::http::conformance::ws_echo(listener, args.max_message).await?;
    Ok(())
}
