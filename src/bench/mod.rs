//! `herald bench`: a load generator for SSE and WebSocket pub/sub servers
//! (herald, nchan, Pushpin), measured side by side by one tool.
//!
//! The coordinator (this process) spawns worker processes (`herald
//! bench-worker`), each holding up to `--per-process` subscriber
//! connections (the machine allows 20,000 open files per process). Workers
//! report over stdout as JSON lines; the coordinator publishes stamped
//! messages at the requested rate, samples the target's CPU and memory from
//! /proc, and merges the workers' tallies into one [`report::Report`].

pub mod payload;
pub mod procfs;
pub mod report;
pub mod tally;
pub mod wire;

use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::time::Instant;

use crate::config;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// N subscribers on one channel, M messages at rate R.
    Fanout,
    /// N idle connections: memory per connection.
    Idle,
    /// N subscribers each on its own channel, one message each.
    Channels,
    /// One message to N subscribers: time until the last receives it.
    Burst,
    /// Fan-out through a cluster: N subscribers spread over the nodes
    /// (one `--subscribe-url` each), M messages at rate R published on one
    /// node (`--publish-url`).
    Cluster,
}

/// How subscribers connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Server-Sent Events over HTTP/1.1.
    Sse,
    /// WebSocket.
    Ws,
}

/// How to publish to the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Publisher {
    /// `POST` the payload to the publish URL (herald, nchan).
    Herald,
    /// nchan's publisher location (same as herald: the body is the message).
    Nchan,
    /// Pushpin's HTTP publish API (`{"items": [...]}`).
    Pushpin,
}

/// Flags of `herald bench`.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct BenchArgs {
    /// Scenario.
    #[arg(long, value_enum, default_value = "fanout")]
    pub scenario: Scenario,
    /// Name of the target in the results (herald-sse, nchan-ws, ...).
    #[arg(long, default_value = "herald")]
    pub label: String,
    /// Subscriber transport.
    #[arg(long, value_enum, default_value = "sse")]
    pub transport: Transport,
    /// Subscribe URL; `{channel}` is replaced by the channel name. Several
    /// (comma-separated: a cluster's nodes) share the subscribers in turn.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "http://127.0.0.1:8080/channel/{channel}"
    )]
    pub subscribe_url: Vec<String>,
    /// Publish API of the target.
    #[arg(long, value_enum, default_value = "herald")]
    pub publisher: Publisher,
    /// Publish URL; `{channel}` is replaced by the channel name.
    #[arg(long, default_value = "http://127.0.0.1:8080/channel/{channel}")]
    pub publish_url: String,
    /// Subscriber connections.
    #[arg(long, default_value_t = 1000)]
    pub subscribers: u64,
    /// Messages to publish (fanout).
    #[arg(long, default_value_t = 10)]
    pub messages: u64,
    /// Messages per second (fanout).
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Payload size.
    #[arg(long, default_value = "100", value_parser = config::parse_size)]
    pub size: usize,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Source addresses to spread connections over (127.0.0.0/8).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    pub source: Vec<IpAddr>,
    /// Connections per worker process.
    #[arg(long, default_value_t = 15_000)]
    pub per_process: u64,
    /// Pids of the target (their descendants are included) for CPU and memory.
    #[arg(long, value_delimiter = ',')]
    pub pid: Vec<u32>,
    /// Longest wait for deliveries after the last publish.
    #[arg(long, default_value = "10s", value_parser = config::parse_duration)]
    pub drain: Duration,
    /// How long the idle scenario holds its connections.
    #[arg(long, default_value = "3s", value_parser = config::parse_duration)]
    pub hold: Duration,
    /// Longest wait for all connections to open.
    #[arg(long, default_value = "120s", value_parser = config::parse_duration)]
    pub connect_timeout: Duration,
    /// Channel name prefix (the channels scenario appends `-<n>`).
    #[arg(long, default_value = "bench")]
    pub channel: String,
    /// Bearer token for publishing.
    #[arg(long, env = "HERALD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
}

impl BenchArgs {
    fn expected_per_conn(&self) -> u64 {
        match self.scenario {
            Scenario::Fanout | Scenario::Cluster => self.messages,
            Scenario::Idle => 0,
            Scenario::Channels | Scenario::Burst => 1,
        }
    }

    fn channel_of(&self, conn: u64) -> String {
        match self.scenario {
            Scenario::Channels => format!("{}-{conn}", self.channel),
            _ => self.channel.clone(),
        }
    }
}

/// What a worker is asked to do.
#[derive(Debug, Serialize, Deserialize)]
struct Spec {
    args: BenchArgs,
    first: u64,
    count: u64,
}

/// A line a worker prints.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum WorkerLine {
    Ready {
        connected: u64,
        failed: u64,
        errors: Vec<String>,
    },
    Done,
    Report(tally::Summary),
}

/// Runs a scenario against a target and returns the report.
pub async fn run(args: BenchArgs) -> anyhow::Result<report::Report> {
    if args.subscribers == 0 {
        bail!("--subscribers must be at least 1");
    }
    if args.rate <= 0.0 {
        bail!("--rate must be positive");
    }
    if args.subscribe_url.is_empty() {
        bail!("--subscribe-url: at least one URL");
    }
    if args.scenario == Scenario::Cluster && args.subscribe_url.len() < 2 {
        bail!(
            "--scenario cluster spreads subscribers over nodes: give --subscribe-url one URL per node, comma-separated"
        );
    }
    let pids = procfs::with_descendants(&args.pid);
    let cpu_before = procfs::cpu_seconds(&pids);
    let rss_baseline = procfs::rss_bytes(&pids);
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(rss_baseline));
    let sampler = {
        let (pids, peak) = (pids.clone(), peak.clone());
        tokio::spawn(async move {
            loop {
                peak.fetch_max(
                    procfs::rss_bytes(&pids),
                    std::sync::atomic::Ordering::Relaxed,
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let started = Instant::now();
    let exe = std::env::current_exe().context("finding the herald binary for worker processes")?;
    let mut workers = vec![];
    let mut first = 0;
    while first < args.subscribers {
        let count = args.per_process.min(args.subscribers - first);
        let spec = serde_json::to_string(&Spec {
            args: args.clone(),
            first,
            count,
        })?;
        let mut child = tokio::process::Command::new(&exe)
            .args(["bench-worker", "--spec", &spec])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting a worker process")?;
        let stdout = BufReader::new(child.stdout.take().context("worker stdout")?).lines();
        workers.push((child, stdout));
        first += count;
    }
    let mut connected = 0;
    let mut failed = 0;
    let mut errors = vec![];
    for (_, lines) in &mut workers {
        match tokio::time::timeout(args.connect_timeout, next_line(lines)).await {
            Ok(Ok(WorkerLine::Ready {
                connected: c,
                failed: f,
                errors: e,
            })) => {
                connected += c;
                failed += f;
                errors.extend(e);
            }
            Ok(Ok(other)) => bail!("worker said {other:?} before it was ready"),
            Ok(Err(e)) => return Err(e),
            Err(_) => bail!(
                "connections did not open within {:?} (--connect-timeout)",
                args.connect_timeout
            ),
        }
    }
    let connect_seconds = started.elapsed().as_secs_f64();
    let rss_connected = procfs::rss_bytes(&pids);
    let publish_started = Instant::now();
    let publish_errors = match args.scenario {
        Scenario::Idle => {
            tokio::time::sleep(args.hold).await;
            0
        }
        Scenario::Fanout | Scenario::Cluster => {
            publish(&args, args.messages, |seq| (args.channel.clone(), seq, 0)).await?
        }
        Scenario::Burst => publish(&args, 1, |_| (args.channel.clone(), 0, 0)).await?,
        Scenario::Channels => {
            let fast = BenchArgs {
                rate: f64::MAX,
                ..args.clone()
            };
            publish(&fast, args.subscribers, |i| (args.channel_of(i), 0, i)).await?
        }
    };
    let publish_seconds = publish_started.elapsed().as_secs_f64();
    // Wait until every worker has everything (or the drain time is over).
    if args.expected_per_conn() > 0 {
        let deadline = Instant::now() + args.drain;
        for (_, lines) in &mut workers {
            match tokio::time::timeout_at(deadline, next_line(lines)).await {
                Ok(Ok(WorkerLine::Done)) | Err(_) => {}
                Ok(Ok(other)) => bail!("unexpected worker line {other:?}"),
                Ok(Err(e)) => return Err(e),
            }
        }
    }
    let mut total = tally::Summary::default();
    for (child, lines) in &mut workers {
        let stdin = child.stdin.as_mut().context("worker stdin")?;
        stdin.write_all(b"report\n").await?;
        loop {
            match next_line(lines).await? {
                WorkerLine::Report(s) => {
                    total.merge(&s);
                    break;
                }
                WorkerLine::Done => continue,
                other => bail!("unexpected worker line {other:?}"),
            }
        }
    }
    let duration_seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = procfs::cpu_seconds(&pids) - cpu_before;
    sampler.abort();
    let rss_peak = peak
        .load(std::sync::atomic::Ordering::Relaxed)
        .max(procfs::rss_bytes(&pids));
    for (mut child, _) in workers {
        let _ = child.kill().await;
    }
    let report = report::Report::new(
        &args,
        report::Measured {
            connected,
            connect_failures: failed,
            connect_errors: errors.into_iter().take(5).collect(),
            connect_seconds,
            publish_errors,
            publish_seconds,
            duration_seconds,
            cpu_seconds,
            rss_baseline,
            rss_connected,
            rss_peak,
            pids_measured: pids.len(),
        },
        total,
    );
    if let Some(path) = &args.out {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

async fn next_line(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
) -> anyhow::Result<WorkerLine> {
    let line = lines.next_line().await?.context("a worker exited early")?;
    serde_json::from_str(&line).with_context(|| format!("worker said {line:?}"))
}

/// Publishes `count` messages at `args.rate`; `what(i)` gives the channel,
/// sequence number and channel index of message i. Returns the failures.
async fn publish(
    args: &BenchArgs,
    count: u64,
    what: impl Fn(u64) -> (String, u64, u64),
) -> anyhow::Result<u64> {
    let client = crate::cli::http_client()?;
    let limit = Arc::new(tokio::sync::Semaphore::new(64));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let period = if args.rate >= 1e9 {
        Duration::ZERO
    } else {
        Duration::from_secs_f64(1.0 / args.rate)
    };
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        if !period.is_zero() {
            tokio::time::sleep_until(start + period.mul_f64(i as f64)).await;
        }
        let permit = limit.clone().acquire_owned().await?;
        let (channel, seq, index) = what(i);
        let body = payload::stamp(seq, index, args.size);
        let req = match args.publisher {
            Publisher::Herald | Publisher::Nchan => client
                .post(args.publish_url.replace("{channel}", &channel))
                .header("content-type", "text/plain")
                .body(body),
            Publisher::Pushpin => {
                let item = serde_json::json!({"items": [{"channel": channel, "formats": {
                    "http-stream": {"content": format!("event: message\ndata: {body}\n\n")},
                    "ws-message": {"content": body},
                }}]});
                client
                    .post(&args.publish_url)
                    .header("content-type", "application/json")
                    .body(item.to_string())
            }
        };
        let req = match &args.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let errors = errors.clone();
        tasks.spawn(async move {
            let ok = req.send().await.is_ok_and(|r| r.status().is_success());
            if !ok {
                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            drop(permit);
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(errors.load(std::sync::atomic::Ordering::Relaxed))
}

/// `herald bench-worker`: holds `spec.count` subscribers and reports.
pub async fn worker(spec: &str) -> anyhow::Result<()> {
    let Spec { args, first, count } = serde_json::from_str(spec).context("bad worker spec")?;
    let args = Arc::new(args);
    let shared = Arc::new(tally::Shared::new(args.expected_per_conn()));
    let limit = Arc::new(tokio::sync::Semaphore::new(args.connect_concurrency.max(1)));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<Result<(), String>>();
    let mut conns = tokio::task::JoinSet::new();
    for i in first..first + count {
        let source = args.source[(i as usize) % args.source.len().max(1)];
        let url = args.subscribe_url[(i as usize) % args.subscribe_url.len().max(1)]
            .replace("{channel}", &args.channel_of(i));
        let (args, shared, limit, ready_tx) = (
            args.clone(),
            shared.clone(),
            limit.clone(),
            ready_tx.clone(),
        );
        conns.spawn(async move {
            let permit = limit.acquire_owned().await;
            let mut ready = Ready {
                tx: ready_tx,
                permit: permit.ok(),
                sent: false,
            };
            if let Err(e) = subscriber(&args, &url, source, &shared, &mut ready).await
                && !ready.sent
            {
                let _ = ready.tx.send(Err(e.to_string()));
            }
        });
    }
    drop(ready_tx);
    let (mut connected, mut failed, mut errors) = (0u64, 0u64, vec![]);
    while connected + failed < count {
        match ready_rx.recv().await {
            Some(Ok(())) => connected += 1,
            Some(Err(e)) => {
                failed += 1;
                if errors.len() < 5 {
                    errors.push(e);
                }
            }
            None => break,
        }
    }
    say(&WorkerLine::Ready {
        connected,
        failed,
        errors,
    })?;
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let expected = args.expected_per_conn();
    let mut done_said = expected == 0;
    loop {
        tokio::select! {
            line = stdin.next_line() => {
                if line?.is_none_or(|l| l.trim() == "report") {
                    say(&WorkerLine::Report(shared.summary(connected)))?;
                    conns.abort_all();
                    return Ok(());
                }
            }
            () = tokio::time::sleep(Duration::from_millis(20)), if !done_said => {
                if shared.complete() >= connected {
                    done_said = true;
                    say(&WorkerLine::Done)?;
                }
            }
        }
    }
}

fn say(line: &WorkerLine) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(line)?)?;
    out.flush()?;
    Ok(())
}

/// Tells the worker once that a connection is subscribed, and frees its
/// slot in the connect concurrency limit.
struct Ready {
    tx: tokio::sync::mpsc::UnboundedSender<Result<(), String>>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    sent: bool,
}

impl Ready {
    fn ok(&mut self) {
        if !self.sent {
            self.sent = true;
            self.permit = None;
            let _ = self.tx.send(Ok(()));
        }
    }
}

/// One subscriber: connect from `source`, signal readiness once subscribed,
/// then record every message until aborted.
async fn subscriber(
    args: &BenchArgs,
    url: &str,
    source: IpAddr,
    shared: &tally::Shared,
    ready: &mut Ready,
) -> anyhow::Result<()> {
    let parsed = reqwest::Url::parse(url).with_context(|| format!("bad URL {url}"))?;
    let host = parsed.host_str().context("URL without host")?.to_owned();
    let port = parsed.port_or_known_default().context("URL without port")?;
    let addr: SocketAddr = tokio::net::lookup_host((host.as_str(), port))
        .await?
        .next()
        .context("host has no address")?;
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if addr.is_ipv4() == source.is_ipv4() {
        sock.bind(SocketAddr::new(source, 0))?;
    }
    let mut stream = sock.connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut seen = shared.seen();
    let mut on_message = |msg: &[u8]| {
        if let Some(s) = payload::parse(msg) {
            let latency = payload::now_micros().saturating_sub(s.sent);
            shared.record(&mut seen, s.seq, latency);
        }
    };
    match args.transport {
        Transport::Sse => {
            let path = match parsed.query() {
                Some(q) => format!("{}?{q}", parsed.path()),
                None => parsed.path().to_owned(),
            };
            let req = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n"
            );
            stream.write_all(req.as_bytes()).await?;
            let mut reader = wire::SseReader::new();
            let mut buf = vec![0u8; 2048];
            loop {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    bail!("the server closed the stream");
                }
                reader.feed(&buf[..n], &mut on_message)?;
                if reader.open {
                    ready.ok();
                }
            }
        }
        Transport::Ws => {
            // A light reader like the SSE one: a tungstenite client per
            // connection costs the load generator more than the servers it
            // measures, and would inflate every target's WebSocket latency.
            let path = match parsed.query() {
                Some(q) => format!("{}?{q}", parsed.path()),
                None => parsed.path().to_owned(),
            };
            stream
                .write_all(wire::WsReader::request(&format!("{host}:{port}"), &path).as_bytes())
                .await?;
            // herald confirms subscriptions; the others are subscribed once
            // the handshake is done.
            let confirms = args.publisher == Publisher::Herald;
            let mut reader = wire::WsReader::default();
            let mut buf = vec![0u8; 2048];
            loop {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    bail!("the server closed the WebSocket");
                }
                let mut pongs = vec![];
                let mut closed = false;
                let mut confirmed = false;
                reader.feed(&buf[..n], &mut |item| match item {
                    wire::WsItem::Text(m) | wire::WsItem::Binary(m) => {
                        if confirms && !ready.sent && m.windows(12).any(|w| w == b"\"subscribed\"")
                        {
                            confirmed = true;
                        } else {
                            on_message(m);
                        }
                    }
                    wire::WsItem::Ping(p) => pongs.extend(wire::WsReader::pong(&p)),
                    wire::WsItem::Close(_) => closed = true,
                })?;
                if reader.open && (!confirms || confirmed) {
                    ready.ok();
                }
                if !pongs.is_empty() {
                    stream.write_all(&pongs).await?;
                }
                if closed {
                    bail!("the server closed the WebSocket");
                }
            }
        }
    }
}
