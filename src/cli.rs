//! The command line: `herald serve`, `herald publish`, `herald subscribe`.
//!
//! Every flag has an environment variable `HERALD_<FLAG>`. The client
//! commands speak herald's public HTTP API like any other client would.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use futures_util::StreamExt;

use crate::cluster;
use crate::config::{self, Config, Cors, Secret};
use crate::k8s;

/// herald: a push hub for browsers (Server-Sent Events and WebSocket).
#[derive(Debug, Parser)]
#[command(name = "herald", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the hub.
    Serve(Box<ServeArgs>),
    /// Publish one event and print its id.
    Publish(PublishArgs),
    /// Print events as they arrive; reconnects and resumes by itself.
    Subscribe(SubscribeArgs),
    /// Load-test a pub/sub server (herald, nchan, Pushpin) and report.
    Bench(Box<crate::bench::BenchArgs>),
    /// Summarize a directory of bench JSON reports (Markdown table, ratios, SVG chart).
    BenchReport {
        /// The directory holding the reports.
        dir: std::path::PathBuf,
    },
    /// A bench worker process (started by `herald bench`).
    #[command(hide = true)]
    BenchWorker {
        /// What to do, as JSON.
        #[arg(long)]
        spec: String,
    },
}

/// Flags of `herald serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Public listener address [default: 0.0.0.0:8080, or 0.0.0.0:$HTTP_SERVER_PORT].
    #[arg(long, env = "HERALD_LISTEN", value_name = "ADDR", value_parser = config::parse_addr)]
    pub listen: Option<SocketAddr>,
    /// Compatibility: the port of the public listener (sse-cluster).
    #[arg(long, env = "HTTP_SERVER_PORT", hide = true)]
    pub http_server_port: Option<u16>,
    /// This node's name [default: the hostname].
    #[arg(long, env = "HERALD_NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
    /// Interval of SSE heartbeat comments and WebSocket pings.
    #[arg(long, env = "HERALD_HEARTBEAT", default_value = "15s", value_name = "DURATION", value_parser = config::parse_duration)]
    pub heartbeat: Duration,
    /// Reconnection delay announced at the start of every SSE stream.
    #[arg(long, env = "HERALD_SSE_RETRY", default_value = "2s", value_name = "DURATION", value_parser = config::parse_duration)]
    pub sse_retry: Duration,
    /// Events kept per channel for resume (0 keeps none).
    #[arg(long, env = "HERALD_HISTORY_SIZE", default_value_t = config::DEFAULT_HISTORY_SIZE, value_name = "N")]
    pub history_size: usize,
    /// How long an event stays in history.
    #[arg(long, env = "HERALD_HISTORY_TTL", default_value = "10m", value_name = "DURATION", value_parser = config::parse_duration)]
    pub history_ttl: Duration,
    /// Largest publish body.
    #[arg(long, env = "HERALD_MAX_MESSAGE_BYTES", default_value = "64KiB", value_name = "SIZE", value_parser = config::parse_size)]
    pub max_message_bytes: usize,
    /// Bytes a connection may fall behind before it is closed as too slow.
    #[arg(long, env = "HERALD_MAX_QUEUED_BYTES", default_value = "1MiB", value_name = "SIZE", value_parser = config::parse_size)]
    pub max_queued_bytes: usize,
    /// Require `Authorization: Bearer TOKEN` to publish. [default: none]
    #[arg(
        long,
        env = "HERALD_PUBLISH_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub publish_token: Option<String>,
    /// Allow publishing without a token from any address (default: loopback only).
    #[arg(long, env = "HERALD_ALLOW_ANONYMOUS_PUBLISH", action = clap::ArgAction::SetTrue, value_parser = config::parse_bool)]
    pub allow_anonymous_publish: bool,
    /// Allow these browser origins (comma-separated; `*` for any). [default: none]
    #[arg(
        long,
        env = "HERALD_CORS_ORIGIN",
        value_name = "ORIGIN",
        value_delimiter = ','
    )]
    pub cors_origin: Vec<String>,
    /// Compatibility: `true` allows any origin (sse-cluster).
    #[arg(long, env = "HTTP_SERVER_ENABLE_CORS", hide = true, action = clap::ArgAction::SetTrue, value_parser = config::parse_bool)]
    pub http_server_enable_cors: bool,
    /// Time to finish after SIGTERM or SIGINT.
    #[arg(long, env = "HERALD_SHUTDOWN_GRACE", default_value = "10s", value_name = "DURATION", value_parser = config::parse_duration)]
    pub shutdown_grace: Duration,
    /// After SIGTERM: keep the listener open this long (/readyz 503, new subscriptions refused, open streams flowing) before ending streams; 0 = at once; at most half of --shutdown-grace.
    #[arg(long, env = "HERALD_DRAIN_DELAY", default_value = "5s", value_name = "DURATION", value_parser = config::parse_duration)]
    pub drain_delay: Duration,
    /// A write blocked this long drops the connection.
    #[arg(long, env = "HERALD_WRITE_TIMEOUT", default_value = "10s", value_name = "DURATION", value_parser = config::parse_duration)]
    pub write_timeout: Duration,
    /// A new connection must send its first request head within this.
    #[arg(long, env = "HERALD_HEAD_TIMEOUT", default_value = "10s", value_name = "DURATION", value_parser = config::parse_duration)]
    pub head_timeout: Duration,
    /// A kept-alive connection must send its next request head within this (the idle timeout).
    #[arg(long, env = "HERALD_KEEP_ALIVE_TIMEOUT", default_value = "30s", value_name = "DURATION", value_parser = config::parse_duration)]
    pub keep_alive_timeout: Duration,
    /// A request body must arrive within this.
    #[arg(long, env = "HERALD_BODY_TIMEOUT", default_value = "30s", value_name = "DURATION", value_parser = config::parse_duration)]
    pub body_timeout: Duration,
    /// Connections still sending their first request head; more are closed at once.
    #[arg(long, env = "HERALD_MAX_HANDSHAKES", value_name = "N", default_value_t = config::DEFAULT_MAX_HANDSHAKES)]
    pub max_handshakes: usize,
    /// Open connections per client address (0 = no limit; behind a proxy every client has the proxy's address).
    #[arg(long, env = "HERALD_MAX_CONNECTIONS_PER_IP", value_name = "N", default_value_t = config::DEFAULT_MAX_CONNECTIONS_PER_IP)]
    pub max_connections_per_ip: usize,
    /// Channels kept; a subscribe or publish that would create one more is refused with 503.
    #[arg(long, env = "HERALD_MAX_CHANNELS", value_name = "N", default_value_t = config::DEFAULT_MAX_CHANNELS)]
    pub max_channels: usize,
    /// Kubeconfig file [default: the in-cluster service account, then KUBECONFIG, then ~/.kube/config].
    #[arg(long, env = "HERALD_KUBECONFIG", value_name = "PATH")]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Announce new versions of this Deployment to `k8s.deployment:NAMESPACE:NAME` (repeatable). [default: none]
    #[arg(long, env = "HERALD_WATCH_DEPLOYMENT", value_name = "NAMESPACE/NAME", value_delimiter = ',', value_parser = k8s::Deployments::parse_named)]
    pub watch_deployment: Vec<k8s::Deployments>,
    /// Announce new versions of every Deployment of a namespace (repeatable). [default: none]
    #[arg(long, env = "HERALD_WATCH_DEPLOYMENTS", value_name = "NAMESPACE", value_delimiter = ',', value_parser = k8s::Deployments::parse_all)]
    pub watch_deployments: Vec<k8s::Deployments>,
    /// Announce new versions of the Deployments a label selector matches (repeatable). [default: none]
    #[arg(long, env = "HERALD_WATCH_SELECTOR", value_name = "NAMESPACE/SELECTOR", value_parser = k8s::Deployments::parse_selected)]
    pub watch_selector: Vec<k8s::Deployments>,
    /// When a new version is live: the rollout is complete, or the first new pod is Ready.
    #[arg(
        long,
        env = "HERALD_ANNOUNCE_ON",
        value_enum,
        default_value = "complete"
    )]
    pub announce_on: AnnounceOnArg,
    /// Re-evaluate watched Deployments this often even without a change [default: 30s, or $SPA_RESYNC_SEC seconds].
    #[arg(long, env = "HERALD_RESYNC", value_name = "DURATION", value_parser = config::parse_duration)]
    pub resync: Option<Duration>,
    /// Stream the Events of this namespace to `k8s.events:NAMESPACE` (repeatable; `*` = all). [default: none]
    #[arg(long, env = "HERALD_WATCH_EVENTS", value_name = "NAMESPACE", value_delimiter = ',', value_parser = k8s::EventScope::parse)]
    pub watch_events: Vec<k8s::EventScope>,
    /// Also serve spa-reloader's WebSocket here: every path, one JSON version per frame. [default: none]
    #[arg(long, env = "HERALD_SPA_COMPAT_LISTEN", value_name = "ADDR", value_parser = config::parse_addr)]
    pub spa_compat_listen: Option<SocketAddr>,
    /// Compatibility (spa-reloader): the namespace watched [default: default].
    #[arg(long, env = "SPA_NAMESPACE", hide = true)]
    pub spa_namespace: Option<String>,
    /// Compatibility (spa-reloader): the Deployment watched (empty = all of the namespace).
    #[arg(long, env = "SPA_NAME", hide = true)]
    pub spa_name: Option<String>,
    /// Compatibility (spa-reloader): resync period in seconds.
    #[arg(long, env = "SPA_RESYNC_SEC", hide = true)]
    pub spa_resync_sec: Option<String>,
    /// Share channels with peers: none, static, dns, kubernetes, gossip (a mesh), or through redis or nats.
    #[arg(long, env = "HERALD_CLUSTER", value_name = "MODE", default_value = "none", value_parser = cluster::Mode::parse)]
    pub cluster: cluster::Mode,
    /// Static peers: internal listeners as host:port (comma-separated). [default: none]
    #[arg(
        long,
        env = "HERALD_PEERS",
        value_name = "HOST:PORT",
        value_delimiter = ','
    )]
    pub peers: Vec<String>,
    /// A DNS name listing the peers (a headless Service), with or without :PORT. [default: none]
    #[arg(long, env = "HERALD_PEERS_DNS", value_name = "NAME")]
    pub peers_dns: Option<String>,
    /// How often --peers-dns is re-resolved.
    #[arg(long, env = "HERALD_PEERS_DNS_INTERVAL", default_value = "10s", value_name = "DURATION", value_parser = config::parse_duration)]
    pub peers_dns_interval: Duration,
    /// The internal listener for peer traffic [default: 0.0.0.0:7000 when clustering].
    #[arg(long, env = "HERALD_INTERNAL_LISTEN", value_name = "ADDR", value_parser = config::parse_addr)]
    pub internal_listen: Option<SocketAddr>,
    /// Shared secret of peer traffic (required unless --internal-listen is loopback). [default: none]
    #[arg(
        long,
        env = "HERALD_CLUSTER_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub cluster_secret: Option<String>,
    /// Timeout of a peer or backplane request, of silence on a peer's stream, and of a publish's confirmation by the backplane [default: 10s, or $HTTP_CLIENT_TIMEOUT].
    #[arg(long, env = "HERALD_PEER_TIMEOUT", value_name = "DURATION", value_parser = config::parse_duration)]
    pub peer_timeout: Option<Duration>,
    /// Kubernetes mode: the Service whose EndpointSlices list the peers. [default: none]
    #[arg(long, env = "HERALD_KUBE_SERVICE", value_name = "NAME")]
    pub kube_service: Option<String>,
    /// Kubernetes mode: a label selector of the peer pods. [default: none]
    #[arg(long, env = "HERALD_KUBE_SELECTOR", value_name = "SELECTOR")]
    pub kube_selector: Option<String>,
    /// Kubernetes mode: the namespace [default: the pod's own, else the kubeconfig's].
    #[arg(long, env = "HERALD_KUBE_NAMESPACE", value_name = "NAMESPACE")]
    pub kube_namespace: Option<String>,
    /// Gossip mode: the UDP listener for membership [default: 0.0.0.0:7946, or 0.0.0.0:$GOSSIP_PORT].
    #[arg(long, env = "HERALD_GOSSIP_LISTEN", value_name = "ADDR", value_parser = config::parse_addr)]
    pub gossip_listen: Option<SocketAddr>,
    /// Gossip mode: seeds to join through, host[:port] (comma-separated). [default: none]
    #[arg(
        long,
        env = "HERALD_GOSSIP_SEEDS",
        value_name = "HOST:PORT",
        value_delimiter = ','
    )]
    pub gossip_seeds: Vec<String>,
    /// Gossip mode: the secret that authenticates and encrypts gossip (16+ characters). [default: none]
    #[arg(
        long,
        env = "HERALD_GOSSIP_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub gossip_secret: Option<String>,
    /// The IP peers reach this node on, when it listens on all interfaces (gossip mode). [default: none]
    #[arg(long, env = "HERALD_ADVERTISE_ADDR", value_name = "IP")]
    pub advertise_addr: Option<std::net::IpAddr>,
    /// Redis mode: the server, redis://[:PASSWORD@]HOST:PORT[/DB], or rediss:// for TLS. [default: none]
    #[arg(
        long,
        env = "HERALD_REDIS_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub redis_url: Option<String>,
    /// NATS mode: the server(s), nats://[USER:PASSWORD@]HOST:PORT, comma-separated; JetStream must be enabled. [default: none]
    #[arg(
        long,
        env = "HERALD_NATS_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub nats_url: Option<String>,
    /// Redis and NATS modes: a PEM CA file the backend's TLS certificate must chain to [default: the system's roots]; with NATS it also requires TLS.
    #[arg(long, env = "HERALD_BACKPLANE_CA", value_name = "FILE")]
    pub backplane_ca: Option<std::path::PathBuf>,
    /// Redis and NATS modes: prefix of every key, subject and stream, so clusters can share a server.
    #[arg(long, env = "HERALD_BACKPLANE_PREFIX", value_name = "NAME", default_value = cluster::DEFAULT_BACKPLANE_PREFIX)]
    pub backplane_prefix: String,
    /// Compatibility (sse-cluster): gossip seed hosts, comma-separated.
    #[arg(long, env = "GOSSIP_HOSTS", hide = true, value_delimiter = ',')]
    pub gossip_hosts: Vec<String>,
    /// Compatibility (sse-cluster): the gossip port.
    #[arg(long, env = "GOSSIP_PORT", hide = true)]
    pub gossip_port: Option<u16>,
    /// Compatibility (sse-cluster): the gossip secret.
    #[arg(long, env = "GOSSIP_SECRET_KEY", hide = true, hide_env_values = true)]
    pub gossip_secret_key: Option<String>,
    /// Compatibility (sse-cluster): the node-to-node timeout.
    #[arg(long, env = "HTTP_CLIENT_TIMEOUT", hide = true, value_name = "DURATION", value_parser = config::parse_duration)]
    pub http_client_timeout: Option<Duration>,
    /// Compatibility (spa-reloader): port of the WebSocket listener (all interfaces).
    #[arg(long, env = "SPA_WEBSOCKET_PORT", hide = true)]
    pub spa_websocket_port: Option<u16>,
}

/// `--announce-on`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum AnnounceOnArg {
    /// When the rollout is complete (every replica updated and available, no old pod left).
    Complete,
    /// As soon as the first new pod is Ready.
    FirstReady,
}

impl ServeArgs {
    /// The typed configuration these flags describe.
    pub fn into_config(self) -> Result<Config, config::ConfigError> {
        let listen = self.listen.unwrap_or_else(|| {
            let port = self.http_server_port.unwrap_or(8080);
            SocketAddr::from(([0, 0, 0, 0], port))
        });
        let kube = self.kube_options()?;
        let cors = if self.http_server_enable_cors || self.cors_origin.iter().any(|o| o == "*") {
            Cors::Any
        } else if self.cors_origin.is_empty() {
            Cors::Off
        } else {
            for o in &self.cors_origin {
                if !(o.starts_with("http://") || o.starts_with("https://")) || o.ends_with('/') {
                    return Err(config::ConfigError::Invalid {
                        flag: "--cors-origin",
                        message: format!(
                            "{o:?} is not an origin; write scheme://host[:port], such as https://app.example.com"
                        ),
                    });
                }
            }
            Cors::Origins(self.cors_origin)
        };
        let spa_compat_listen = self.spa_compat_listen.or_else(|| {
            self.spa_websocket_port
                .map(|p| SocketAddr::from(([0, 0, 0, 0], p)))
        });
        let cluster = cluster::Options {
            mode: self.cluster,
            peers: self.peers.clone(),
            peers_dns: self.peers_dns.clone(),
            peers_dns_interval: self.peers_dns_interval,
            internal_listen: self.internal_listen.unwrap_or_else(|| {
                cluster::DEFAULT_INTERNAL_LISTEN
                    .parse()
                    .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 7000)))
            }),
            secret: self.cluster_secret.clone().map(Secret::new),
            peer_timeout: self
                .peer_timeout
                .or(self.http_client_timeout)
                .unwrap_or(Duration::from_secs(10)),
            kube_service: self.kube_service.clone(),
            kube_selector: self.kube_selector.clone(),
            kube_namespace: self.kube_namespace.clone(),
            gossip_listen: self.gossip_listen.unwrap_or_else(|| {
                SocketAddr::from(([0, 0, 0, 0], self.gossip_port.unwrap_or(7946)))
            }),
            gossip_seeds: if self.gossip_seeds.is_empty() {
                // sse-cluster skipped seeds naming this host.
                let host = config::default_node_name();
                self.gossip_hosts
                    .iter()
                    .filter(|h| !h.is_empty() && !h.contains(host.as_str()))
                    .cloned()
                    .collect()
            } else {
                self.gossip_seeds.clone()
            },
            gossip_secret: self
                .gossip_secret
                .clone()
                .or_else(|| self.gossip_secret_key.clone())
                .map(Secret::new),
            advertise: self.advertise_addr,
            redis_url: self.redis_url.clone().map(Secret::new),
            nats_url: self.nats_url.clone().map(Secret::new),
            backplane_prefix: self.backplane_prefix.clone(),
            backplane_ca: self.backplane_ca.clone(),
        };
        let config = Config {
            cluster,
            kube,
            spa_compat_listen,
            listen,
            node_name: self.node_name.unwrap_or_else(config::default_node_name),
            heartbeat: self.heartbeat,
            sse_retry: self.sse_retry,
            history_size: self.history_size,
            history_ttl: self.history_ttl,
            max_message_bytes: self.max_message_bytes,
            max_queued_bytes: self.max_queued_bytes,
            publish_token: self.publish_token.map(Secret::new),
            allow_anonymous_publish: self.allow_anonymous_publish,
            cors,
            shutdown_grace: self.shutdown_grace,
            drain_delay: self.drain_delay,
            write_timeout: self.write_timeout,
            limits: config::Limits {
                head_timeout: self.head_timeout,
                keep_alive_timeout: self.keep_alive_timeout,
                body_timeout: self.body_timeout,
                max_handshakes: self.max_handshakes,
                max_connections_per_ip: self.max_connections_per_ip,
                max_channels: self.max_channels,
            },
        };
        config.validate()?;
        Ok(config)
    }
}

impl ServeArgs {
    /// The Kubernetes sources: herald's flags, plus spa-reloader's
    /// environment when any of it is set (`SPA_NAMESPACE` defaulting to
    /// `default`, `SPA_NAME` empty or unset = every Deployment).
    fn kube_options(&self) -> Result<k8s::Options, config::ConfigError> {
        let mut deployments: Vec<k8s::Deployments> = self
            .watch_deployment
            .iter()
            .chain(&self.watch_deployments)
            .chain(&self.watch_selector)
            .cloned()
            .collect();
        let spa = self.spa_namespace.is_some()
            || self.spa_name.is_some()
            || self.spa_websocket_port.is_some()
            || self.spa_resync_sec.is_some();
        if spa {
            let ns = self.spa_namespace.as_deref().unwrap_or("default");
            let target = match self.spa_name.as_deref().map(str::trim) {
                None | Some("") => k8s::Deployments::parse_all(ns),
                Some(name) => k8s::Deployments::parse_named(&format!("{ns}/{name}")),
            };
            let target = target.map_err(|message| config::ConfigError::Invalid {
                flag: "SPA_NAMESPACE/SPA_NAME",
                message,
            })?;
            if !deployments.contains(&target) {
                deployments.push(target);
            }
        }
        let resync = match (self.resync, &self.spa_resync_sec) {
            (Some(d), _) => d,
            (None, Some(secs)) => secs
                .trim()
                .parse::<u64>()
                .map(Duration::from_secs)
                .map_err(|_| config::ConfigError::Invalid {
                    flag: "SPA_RESYNC_SEC",
                    message: format!("{secs:?} is not a whole number of seconds"),
                })?,
            (None, None) => config::DEFAULT_RESYNC,
        };
        Ok(k8s::Options {
            kubeconfig: self.kubeconfig.clone(),
            deployments,
            announce_on: match self.announce_on {
                AnnounceOnArg::Complete => k8s::AnnounceOn::Complete,
                AnnounceOnArg::FirstReady => k8s::AnnounceOn::FirstReady,
            },
            resync,
            events: self.watch_events.clone(),
        })
    }
}

/// Flags of `herald publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The hub's URL.
    #[arg(long, env = "HERALD_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Event name (default: message).
    #[arg(long, env = "HERALD_EVENT")]
    pub event: Option<String>,
    /// Keep as the channel's current value for new subscribers.
    #[arg(long)]
    pub retain: bool,
    /// Send DATA as JSON (it must be valid JSON).
    #[arg(long)]
    pub json: bool,
    /// Idempotency key: publishing the same key again is acknowledged, not delivered twice.
    #[arg(long, value_name = "KEY")]
    pub id: Option<String>,
    /// Bearer token for a hub started with --publish-token.
    #[arg(long, env = "HERALD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The channel.
    pub channel: String,
    /// The data (read from standard input when left out).
    pub data: Option<String>,
}

/// Flags of `herald subscribe`.
#[derive(Debug, Args)]
pub struct SubscribeArgs {
    /// The hub's URL.
    #[arg(long, env = "HERALD_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Resume after this event id.
    #[arg(long, env = "HERALD_LAST_EVENT_ID", value_name = "ID")]
    pub last_event_id: Option<String>,
    /// Print each event as a JSON line {"id", "event", "data"} instead of its data.
    #[arg(long)]
    pub json: bool,
    /// Exit after this many events (for scripts; resets do not count).
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// The channels.
    #[arg(required = true)]
    pub channels: Vec<String>,
}

/// Makes an HTTP client for the client commands (rustls with ring; the
/// provider is installed first, since reqwest is built without one).
pub fn http_client() -> anyhow::Result<reqwest::Client> {
    // Installing fails only if a provider is installed already: fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .context("building the HTTP client")
}

/// Reads the `{"error": ...}` message of a failed response.
async fn error_message(resp: reqwest::Response) -> String {
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    let msg = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        .unwrap_or(body);
    format!("{status}: {msg}")
}

/// `herald publish`.
pub async fn publish(args: PublishArgs) -> anyhow::Result<()> {
    let data = match args.data {
        Some(d) => d,
        None => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading DATA from standard input")?;
            // `echo hello | herald publish c` publishes "hello": one
            // trailing line break (what echo and editors add) is dropped.
            if s.ends_with('\n') {
                s.pop();
                if s.ends_with('\r') {
                    s.pop();
                }
            }
            s
        }
    };
    let base = args.url.trim_end_matches('/');
    let channel = urlencode(&args.channel);
    let client = http_client()?;
    let req = if args.json {
        // As written: parsing into a Value would sort the keys.
        let raw: &serde_json::value::RawValue =
            serde_json::from_str(&data).context("DATA is not valid JSON (--json)")?;
        let mut body = format!("{{\"data\":{}", raw.get());
        for (field, value) in [("event", &args.event), ("id", &args.id)] {
            if let Some(v) = value {
                body.push_str(&format!(
                    ",\"{field}\":{}",
                    serde_json::Value::from(v.as_str())
                ));
            }
        }
        if args.retain {
            body.push_str(",\"retain\":true");
        }
        body.push('}');
        client
            .post(format!("{base}/channel/{channel}"))
            .header("content-type", "application/json")
            .body(body)
    } else {
        let mut query = vec![];
        if let Some(e) = &args.event {
            query.push(format!("event={}", urlencode(e)));
        }
        if let Some(k) = &args.id {
            query.push(format!("id={}", urlencode(k)));
        }
        if args.retain {
            query.push("retain=true".into());
        }
        let q = if query.is_empty() {
            String::new()
        } else {
            format!("?{}", query.join("&"))
        };
        client
            .post(format!("{base}/channel/{channel}{q}"))
            .header("content-type", "text/plain; charset=utf-8")
            .body(data)
    };
    let req = match &args.token {
        Some(t) => req.bearer_auth(t),
        None => req,
    };
    let resp = req
        .send()
        .await
        .with_context(|| format!("publishing to {base}"))?;
    if !resp.status().is_success() {
        bail!("publish refused: {}", error_message(resp).await);
    }
    let v: serde_json::Value = resp.json().await.context("reading the hub's answer")?;
    let id = v.get("id").and_then(|i| i.as_str()).unwrap_or_default();
    println!("{id}");
    if v.get("duplicate").and_then(serde_json::Value::as_bool) == Some(true) {
        eprintln!(
            "herald: a duplicate of an event already published with this --id; nothing was delivered again"
        );
    }
    Ok(())
}

fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The channel and data text of an `envelope=json` event (data
/// `{"channel":C,"data":D}`; D's text as published, a string's as is). A
/// reset carries `{"channel","reason"}` and is shown whole.
fn unwrap_envelope(event: &str, data: &str) -> (Option<String>, String) {
    #[derive(serde::Deserialize)]
    struct Envelope<'a> {
        channel: String,
        #[serde(borrow)]
        data: Option<&'a serde_json::value::RawValue>,
    }
    let Ok(env) = serde_json::from_str::<Envelope<'_>>(data) else {
        return (None, data.to_owned());
    };
    if event == "herald.reset" {
        return (Some(env.channel), data.to_owned());
    }
    let text = match env.data {
        None => String::new(),
        Some(raw) => {
            serde_json::from_str::<String>(raw.get()).unwrap_or_else(|_| raw.get().to_owned())
        }
    };
    (Some(env.channel), text)
}

/// `herald subscribe`: follows the stream, reconnecting with backoff and
/// resuming from the last id it printed.
pub async fn subscribe(args: SubscribeArgs) -> anyhow::Result<()> {
    let base = args.url.trim_end_matches('/').to_owned();
    let query: Vec<String> = args
        .channels
        .iter()
        .map(|c| format!("stream={}", urlencode(c)))
        .collect();
    // With --json every line names its channel: the stream's envelope
    // says which channel each event came from.
    let envelope = if args.json { "&envelope=json" } else { "" };
    let url = format!("{base}/events?{}{envelope}", query.join("&"));
    let client = http_client()?;
    let mut last_id = args.last_event_id.clone();
    let mut retry = Duration::from_secs(2);
    let mut failures: u32 = 0;
    let mut printed: u64 = 0;
    let stdout = std::io::stdout();
    loop {
        let mut req = client.get(&url).header("accept", "text/event-stream");
        if let Some(id) = &last_id {
            req = req.header("last-event-id", id.as_str());
        }
        match req.send().await {
            Ok(resp) if resp.status().is_success() => {
                failures = 0;
                let mut events = eventsource_stream::EventStream::new(resp.bytes_stream());
                while let Some(ev) = events.next().await {
                    let Ok(ev) = ev else { break };
                    if let Some(r) = ev.retry {
                        retry = r;
                    }
                    if !ev.id.is_empty() {
                        last_id = Some(ev.id.clone());
                    }
                    let mut out = stdout.lock();
                    if args.json {
                        let (channel, data) = unwrap_envelope(&ev.event, &ev.data);
                        let line = serde_json::json!({"id": ev.id, "event": ev.event, "channel": channel, "data": data});
                        writeln!(out, "{line}")?;
                    } else if ev.event == "herald.reset" {
                        eprintln!("herald: reset: {}", ev.data);
                    } else {
                        writeln!(out, "{}", ev.data)?;
                    }
                    out.flush()?;
                    if ev.event != "herald.reset" {
                        printed += 1;
                    }
                    if args.count.is_some_and(|n| printed >= n) {
                        return Ok(());
                    }
                }
                eprintln!("herald: stream ended; reconnecting");
            }
            Ok(resp) if resp.status().is_client_error() => {
                bail!("subscribe refused: {}", error_message(resp).await);
            }
            Ok(resp) => eprintln!("herald: {}; reconnecting", error_message(resp).await),
            Err(e) => eprintln!("herald: {e}; reconnecting"),
        }
        failures = failures.saturating_add(1);
        tokio::time::sleep(backoff(retry, failures)).await;
    }
}

/// The server's retry delay for the first attempt, then exponential with
/// full jitter, at most 30 s.
fn backoff(retry: Duration, failures: u32) -> Duration {
    use rand::Rng;
    if failures <= 1 {
        return retry;
    }
    let cap = Duration::from_secs(30);
    let exp = retry.saturating_mul(1 << failures.min(10)).min(cap);
    Duration::from_millis(
        rand::rng().random_range(0..=u64::try_from(exp.as_millis()).unwrap_or(30_000)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(args: &[&str]) -> Result<Config, String> {
        let mut argv = vec!["herald", "serve"];
        argv.extend(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        let Command::Serve(s) = cli.command else {
            unreachable!()
        };
        s.into_config().map_err(|e| e.to_string())
    }

    #[test]
    fn serve_works_with_no_flags() {
        let c = serve(&[]).unwrap();
        assert_eq!(c.listen.to_string(), config::DEFAULT_LISTEN);
        assert_eq!(c.heartbeat, config::DEFAULT_HEARTBEAT);
        assert_eq!(c.max_message_bytes, 65536);
        assert_eq!(c.history_size, 1000);
        assert_eq!(c.cors, Cors::Off);
    }

    #[test]
    fn bad_values_name_the_flag() {
        let e = serve(&["--heartbeat", "soon"]).unwrap_err();
        assert!(e.contains("--heartbeat"), "{e}");
        let e = serve(&["--max-message-bytes", "lots"]).unwrap_err();
        assert!(e.contains("--max-message-bytes"), "{e}");
        let e = serve(&["--cors-origin", "example.com"]).unwrap_err();
        assert!(e.contains("--cors-origin"), "{e}");
        let e = serve(&["--listen", "nowhere"]).unwrap_err();
        assert!(e.contains("--listen"), "{e}");
    }

    #[test]
    fn limits_are_read_and_checked() {
        let c = serve(&[]).unwrap();
        assert_eq!(c.limits, config::Limits::default());
        let c = serve(&[
            "--head-timeout",
            "2s",
            "--keep-alive-timeout",
            "1m",
            "--body-timeout",
            "500ms",
            "--max-handshakes",
            "100",
            "--max-connections-per-ip",
            "0",
            "--max-channels",
            "5000",
        ])
        .unwrap();
        assert_eq!(
            c.limits,
            config::Limits {
                head_timeout: Duration::from_secs(2),
                keep_alive_timeout: Duration::from_secs(60),
                body_timeout: Duration::from_millis(500),
                max_handshakes: 100,
                max_connections_per_ip: 0,
                max_channels: 5000,
            }
        );
        for (flag, bad) in [
            ("--head-timeout", "0s"),
            ("--keep-alive-timeout", "0s"),
            ("--body-timeout", "0s"),
            ("--max-handshakes", "0"),
            ("--max-channels", "0"),
            ("--head-timeout", "soon"),
            ("--max-connections-per-ip", "many"),
        ] {
            let e = serve(&[flag, bad]).unwrap_err();
            assert!(e.contains(flag), "{flag} {bad}: {e}");
        }
    }

    #[test]
    fn units_are_read() {
        let c = serve(&[
            "--heartbeat",
            "250ms",
            "--max-queued-bytes",
            "2MiB",
            "--cors-origin",
            "https://a.example,https://b.example",
        ])
        .unwrap();
        assert_eq!(c.heartbeat, Duration::from_millis(250));
        assert_eq!(c.max_queued_bytes, 2 << 20);
        assert_eq!(
            c.cors,
            Cors::Origins(vec!["https://a.example".into(), "https://b.example".into()])
        );
    }

    #[test]
    fn kubernetes_flags_are_read_and_checked() {
        let c = serve(&[
            "--watch-deployment",
            "shop/web",
            "--watch-deployments",
            "tools",
            "--watch-selector",
            "shop/tier in (front,edge),app",
            "--watch-events",
            "shop",
            "--watch-events",
            "*",
            "--announce-on",
            "first-ready",
            "--resync",
            "5m",
            "--kubeconfig",
            "/etc/kube.conf",
            "--spa-compat-listen",
            "127.0.0.1:9000",
        ])
        .unwrap();
        let k = &c.kube;
        assert_eq!(
            k.deployments,
            vec![
                k8s::Deployments::Named {
                    namespace: "shop".into(),
                    name: "web".into()
                },
                k8s::Deployments::All {
                    namespace: "tools".into()
                },
                k8s::Deployments::Selected {
                    namespace: "shop".into(),
                    selector: "tier in (front,edge),app".into()
                },
            ]
        );
        assert_eq!(
            k.events,
            vec![
                k8s::EventScope::Namespace("shop".into()),
                k8s::EventScope::All
            ]
        );
        assert_eq!(k.announce_on, k8s::AnnounceOn::FirstReady);
        assert_eq!(k.resync, Duration::from_secs(300));
        assert_eq!(
            k.kubeconfig.as_deref(),
            Some(std::path::Path::new("/etc/kube.conf"))
        );
        assert_eq!(c.spa_compat_listen, Some("127.0.0.1:9000".parse().unwrap()));
        // Nothing Kubernetes by default.
        let c = serve(&[]).unwrap();
        assert!(!c.kube.enabled());
        assert_eq!(c.kube.resync, config::DEFAULT_RESYNC);
        assert_eq!(c.kube.announce_on, k8s::AnnounceOn::Complete);

        for (args, says) in [
            (&["--watch-deployment", "web"][..], "--watch-deployment"),
            (&["--watch-deployment", "Shop/web"][..], "namespace"),
            (&["--watch-deployment", "shop/"][..], "deployment name"),
            (&["--watch-deployments", "a_b"][..], "--watch-deployments"),
            (
                &["--watch-selector", "shop/ "][..],
                "label selector is empty",
            ),
            (&["--watch-events", "**"][..], "--watch-events"),
            (&["--announce-on", "soon"][..], "--announce-on"),
            (
                &["--resync", "0s", "--watch-deployments", "a"][..],
                "--resync",
            ),
            (
                &["--spa-compat-listen", "0.0.0.0:8080"][..],
                "--spa-compat-listen",
            ),
            (
                &["--spa-compat-listen", "127.0.0.1:9000"][..],
                "no Deployment is watched",
            ),
        ] {
            let e = serve(args).unwrap_err();
            assert!(e.contains(says), "{args:?}: {e}");
        }
    }

    #[test]
    fn spa_reloaders_environment_means_what_it_documents() {
        // SPA_NAMESPACE (default `default`), SPA_NAME (empty = all),
        // SPA_RESYNC_SEC (seconds), SPA_WEBSOCKET_PORT (all interfaces);
        // the hidden flags are those variables.
        let c = serve(&["--spa-websocket-port", "9090", "--listen", "0.0.0.0:8081"]).unwrap();
        assert_eq!(
            c.kube.deployments,
            vec![k8s::Deployments::All {
                namespace: "default".into()
            }]
        );
        assert_eq!(c.spa_compat_listen, Some("0.0.0.0:9090".parse().unwrap()));
        let c = serve(&[
            "--spa-namespace",
            "toucan",
            "--spa-name",
            "spa",
            "--spa-resync-sec",
            "45",
        ])
        .unwrap();
        assert_eq!(
            c.kube.deployments,
            vec![k8s::Deployments::Named {
                namespace: "toucan".into(),
                name: "spa".into()
            }]
        );
        assert_eq!(c.kube.resync, Duration::from_secs(45));
        let c = serve(&["--spa-namespace", "toucan", "--spa-name", ""]).unwrap();
        assert_eq!(
            c.kube.deployments,
            vec![k8s::Deployments::All {
                namespace: "toucan".into()
            }]
        );
        // herald's own flag wins over SPA_RESYNC_SEC.
        let c = serve(&[
            "--spa-namespace",
            "a",
            "--spa-resync-sec",
            "45",
            "--resync",
            "1s",
        ])
        .unwrap();
        assert_eq!(c.kube.resync, Duration::from_secs(1));
        let e = serve(&["--spa-namespace", "a", "--spa-resync-sec", "soon"]).unwrap_err();
        assert!(e.contains("SPA_RESYNC_SEC"), "{e}");
        let e = serve(&["--spa-namespace", "Bad"]).unwrap_err();
        assert!(e.contains("SPA_NAMESPACE"), "{e}");
        // spa-reloader's default port is herald's too: a clear error.
        let e = serve(&["--spa-websocket-port", "8080"]).unwrap_err();
        assert!(e.contains("collides with --listen"), "{e}");
    }

    #[test]
    fn cluster_flags_are_read_and_checked() {
        let c = serve(&[
            "--cluster",
            "static",
            "--peers",
            "10.0.0.1:7000,10.0.0.2:7000",
            "--cluster-secret",
            "0123456789abcdef",
            "--node-name",
            "a",
        ])
        .unwrap();
        assert_eq!(c.cluster.mode, cluster::Mode::Static);
        assert_eq!(c.cluster.peers, ["10.0.0.1:7000", "10.0.0.2:7000"]);
        assert_eq!(
            c.cluster.internal_listen.to_string(),
            cluster::DEFAULT_INTERNAL_LISTEN
        );
        assert_eq!(c.hub().origin.as_deref(), Some("a"));
        // sse-cluster's variables, through their hidden flags.
        let c = serve(&[
            "--cluster",
            "gossip",
            "--gossip-port",
            "42000",
            "--gossip-hosts",
            "seed-0,seed-1",
            "--gossip-secret-key",
            "0123456789abcdef",
            "--http-client-timeout",
            "3s",
            "--internal-listen",
            "127.0.0.1:7000",
            "--advertise-addr",
            "10.1.2.3",
        ])
        .unwrap();
        assert_eq!(c.cluster.gossip_listen.to_string(), "0.0.0.0:42000");
        assert_eq!(c.cluster.gossip_seeds, ["seed-0", "seed-1"]);
        assert_eq!(c.cluster.peer_timeout, Duration::from_secs(3));
        assert!(c.cluster.gossip_secret.is_some());
        for (args, says) in [
            (&["--cluster", "mesh"][..], "--cluster"),
            (&["--cluster", "static"][..], "--peers"),
            (&["--cluster", "dns"][..], "--peers-dns"),
            (
                &["--cluster", "static", "--peers", "a:1"][..],
                "--cluster-secret",
            ),
            (
                &[
                    "--cluster",
                    "static",
                    "--peers",
                    "a:1",
                    "--cluster-secret",
                    "short",
                ][..],
                "--cluster-secret",
            ),
            (
                &[
                    "--cluster",
                    "kubernetes",
                    "--internal-listen",
                    "127.0.0.1:7000",
                ][..],
                "--kube-service",
            ),
            (
                &[
                    "--cluster",
                    "gossip",
                    "--internal-listen",
                    "127.0.0.1:7000",
                    "--gossip-listen",
                    "127.0.0.1:7946",
                    "--gossip-secret",
                    "short",
                ][..],
                "--gossip-secret",
            ),
            (
                &[
                    "--cluster",
                    "gossip",
                    "--internal-listen",
                    "127.0.0.1:7000",
                    "--gossip-secret",
                    "0123456789abcdef",
                ][..],
                "--advertise-addr",
            ),
            (
                &[
                    "--cluster",
                    "static",
                    "--peers",
                    "a:1",
                    "--internal-listen",
                    "127.0.0.1:7000",
                    "--node-name",
                    "a b",
                ][..],
                "--node-name",
            ),
        ] {
            let e = serve(args).unwrap_err();
            assert!(e.contains(says), "{args:?}: {e}");
        }
    }

    #[test]
    fn backoff_is_bounded() {
        for f in 0..100 {
            assert!(backoff(Duration::from_secs(2), f) <= Duration::from_secs(30));
        }
        assert_eq!(
            backoff(Duration::from_millis(500), 1),
            Duration::from_millis(500)
        );
    }
}
