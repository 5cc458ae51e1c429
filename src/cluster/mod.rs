//! The cluster: replicas that share every channel.
//!
//! A mesh backplane with a pull design. Every node keeps its own events
//! (its origin's stream) in its hub's history; every node reads every
//! peer's stream over one persistent HTTP connection per peer
//! (`GET /internal/v1/stream?from=POSITION`), applying each origin's events
//! in order. So:
//!
//! - forwarding to all peers is parallel by construction, a slow or dead
//!   peer only delays its own reader, and the publisher never waits;
//! - a reader that was away resumes from its position: "everything of
//!   origin O after N", served from history while still in retention;
//! - a starting node backfills every kept event (all origins) and the
//!   retained values from one peer (`/internal/v1/snapshot`) before
//!   `/readyz` turns 200.
//!
//! Subscribers see positions (see [`crate::hub::Position`]) as event ids,
//! so a `Last-Event-ID` from one node resumes exactly on any other.
//!
//! Peers are found by a [`Mode`]: a static list, or a DNS name re-resolved
//! periodically. Node-to-node traffic uses a separate internal listener,
//! authenticated with `--cluster-secret`.

mod gossip;
mod internal;
mod kube;
mod peer;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Secret;
use crate::hub::Hub;

pub use internal::{Line, apply, apply_all, client_body, deliver_to_client, router};

/// The mesh's wire-line parser, for the fuzz target (`fuzz/`).
#[doc(hidden)]
pub mod fuzz {
    /// One line a peer sent.
    pub fn line(data: &[u8]) {
        super::internal::fuzz_line(data);
    }
}

/// How peers are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// A single node.
    #[default]
    None,
    /// `--peers host:port,...`.
    Static,
    /// `--peers-dns NAME[:PORT]`, re-resolved every `--peers-dns-interval`.
    Dns,
    /// The Ready endpoints of a Service, or the Ready pods of a selector.
    Kubernetes,
    /// Gossip membership (SWIM over UDP).
    Gossip,
    /// A Redis backplane (see [`crate::backplane`]).
    Redis,
    /// A NATS JetStream backplane (see [`crate::backplane`]).
    Nats,
}

impl Mode {
    /// Reads `--cluster`.
    pub fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "none" => Self::None,
            "static" => Self::Static,
            "dns" => Self::Dns,
            "kubernetes" => Self::Kubernetes,
            "gossip" => Self::Gossip,
            "redis" => Self::Redis,
            "nats" => Self::Nats,
            other => {
                return Err(format!(
                    "{other:?}: expected none, static, dns, kubernetes, gossip, redis or nats"
                ));
            }
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Static => "static",
            Self::Dns => "dns",
            Self::Kubernetes => "kubernetes",
            Self::Gossip => "gossip",
            Self::Redis => "redis",
            Self::Nats => "nats",
        }
    }
}

/// The default internal listener when clustering.
pub const DEFAULT_INTERNAL_LISTEN: &str = "0.0.0.0:7000";

/// Cluster configuration.
#[derive(Debug, Clone)]
pub struct Options {
    /// How peers are found.
    pub mode: Mode,
    /// Static peers (`host:port` of their internal listeners).
    pub peers: Vec<String>,
    /// DNS name (`name` or `name:port`; the port defaults to the internal
    /// listener's).
    pub peers_dns: Option<String>,
    /// How often the DNS name is re-resolved.
    pub peers_dns_interval: Duration,
    /// The internal listener.
    pub internal_listen: SocketAddr,
    /// Shared secret of peer traffic.
    pub secret: Option<Secret>,
    /// Timeout of one peer request (connect, snapshot) and of silence on a
    /// peer stream.
    pub peer_timeout: Duration,
    /// Kubernetes mode: the Service whose EndpointSlices list the peers.
    pub kube_service: Option<String>,
    /// Kubernetes mode: a label selector of the peer pods.
    pub kube_selector: Option<String>,
    /// Kubernetes mode: the namespace (default: the pod's own).
    pub kube_namespace: Option<String>,
    /// Gossip mode: the UDP listener.
    pub gossip_listen: SocketAddr,
    /// Gossip mode: seeds (`host:port`, or `host` with the gossip port).
    pub gossip_seeds: Vec<String>,
    /// Gossip mode: the secret that authenticates and encrypts gossip.
    pub gossip_secret: Option<Secret>,
    /// The IP peers reach this node on, when it listens on all interfaces.
    pub advertise: Option<std::net::IpAddr>,
    /// Redis mode: the server's URL.
    pub redis_url: Option<Secret>,
    /// NATS mode: the server's URL.
    pub nats_url: Option<Secret>,
    /// Redis and NATS modes: the prefix of every key, subject and stream.
    pub backplane_prefix: String,
    /// Redis and NATS modes: a PEM CA the backend's TLS certificate must
    /// chain to (instead of the system's roots).
    pub backplane_ca: Option<std::path::PathBuf>,
}

/// The default `--backplane-prefix`.
pub const DEFAULT_BACKPLANE_PREFIX: &str = "herald";

impl Default for Options {
    fn default() -> Self {
        Self {
            mode: Mode::None,
            peers: vec![],
            peers_dns: None,
            peers_dns_interval: Duration::from_secs(10),
            internal_listen: SocketAddr::from(([0, 0, 0, 0], 7000)),
            secret: None,
            peer_timeout: Duration::from_secs(10),
            kube_service: None,
            kube_selector: None,
            kube_namespace: None,
            gossip_listen: SocketAddr::from(([0, 0, 0, 0], 7946)),
            gossip_seeds: vec![],
            gossip_secret: None,
            advertise: None,
            redis_url: None,
            nats_url: None,
            backplane_prefix: DEFAULT_BACKPLANE_PREFIX.to_owned(),
            backplane_ca: None,
        }
    }
}

impl Options {
    /// True when clustering.
    pub fn enabled(&self) -> bool {
        self.mode != Mode::None
    }

    /// True for the modes where nodes talk to each other (the mesh), which
    /// need the internal listener; false for none, Redis and NATS.
    pub fn mesh(&self) -> bool {
        !matches!(self.mode, Mode::None | Mode::Redis | Mode::Nats)
    }

    /// Redis and NATS modes: the backplane's options.
    pub fn backplane(&self, history_ttl: Duration) -> Option<crate::backplane::Options> {
        let url = match self.mode {
            Mode::Redis => self.redis_url.clone()?,
            Mode::Nats => self.nats_url.clone()?,
            _ => return None,
        };
        Some(crate::backplane::Options {
            url,
            prefix: self.backplane_prefix.clone(),
            timeout: self.peer_timeout,
            history_ttl,
            ca: self.backplane_ca.clone(),
        })
    }

    /// Checks the combination; errors name the flag.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.peer_timeout.is_zero() {
            return Err(("--peer-timeout", "must be greater than zero".into()));
        }
        match self.mode {
            Mode::None => return Ok(()),
            Mode::Redis | Mode::Nats => return self.validate_backplane(),
            Mode::Static if self.peers.is_empty() => {
                return Err((
                    "--peers",
                    "--cluster static needs --peers host:port,...".into(),
                ));
            }
            Mode::Dns if self.peers_dns.is_none() => {
                return Err(("--peers-dns", "--cluster dns needs --peers-dns NAME".into()));
            }
            Mode::Kubernetes if self.kube_service.is_some() == self.kube_selector.is_some() => {
                return Err((
                    "--kube-service",
                    "--cluster kubernetes needs exactly one of --kube-service NAME and --kube-selector SELECTOR".into(),
                ));
            }
            Mode::Gossip => {
                if self
                    .gossip_secret
                    .as_ref()
                    .is_some_and(|s| s.expose().len() < 16)
                {
                    return Err((
                        "--gossip-secret",
                        "is not a usable key: it must be at least 16 characters".into(),
                    ));
                }
                if self.gossip_secret.is_none() && !self.gossip_listen.ip().is_loopback() {
                    return Err((
                        "--gossip-secret",
                        format!(
                            "required when --gossip-listen ({}) is not loopback-only: gossip must be authenticated",
                            self.gossip_listen
                        ),
                    ));
                }
                for (flag, addr) in [
                    ("--gossip-listen", self.gossip_listen),
                    ("--internal-listen", self.internal_listen),
                ] {
                    if addr.ip().is_unspecified() && self.advertise.is_none() {
                        return Err((
                            "--advertise-addr",
                            format!(
                                "{flag} listens on all interfaces ({addr}); say which IP peers reach this node on"
                            ),
                        ));
                    }
                }
            }
            _ => {}
        }
        if self.secret.is_none() && !self.internal_listen.ip().is_loopback() {
            return Err((
                "--cluster-secret",
                format!(
                    "required when --internal-listen ({}) is not loopback-only: peer traffic must be authenticated",
                    self.internal_listen
                ),
            ));
        }
        if self.secret.as_ref().is_some_and(|s| s.expose().len() < 16) {
            return Err(("--cluster-secret", "must be at least 16 characters".into()));
        }
        Ok(())
    }

    fn validate_backplane(&self) -> Result<(), (&'static str, String)> {
        if let Some(ca) = &self.backplane_ca
            && let Err(e) = std::fs::read(ca)
        {
            return Err(("--backplane-ca", format!("{}: {e}", ca.display())));
        }
        let p = &self.backplane_prefix;
        if p.is_empty()
            || p.len() > 32
            || !p
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err((
                "--backplane-prefix",
                format!("{p:?}: 1 to 32 characters of a-z A-Z 0-9 _ -"),
            ));
        }
        match self.mode {
            Mode::Redis => {
                let Some(url) = &self.redis_url else {
                    return Err((
                        "--redis-url",
                        "--cluster redis needs --redis-url redis://HOST:PORT".into(),
                    ));
                };
                if self.backplane_ca.is_some() && !url.expose().starts_with("rediss://") {
                    return Err((
                        "--backplane-ca",
                        "is for TLS: give --redis-url as rediss://HOST:PORT".into(),
                    ));
                }
                if let Err(e) = redis::IntoConnectionInfo::into_connection_info(url.expose()) {
                    return Err((
                        "--redis-url",
                        format!(
                            "{}: not a Redis URL ({e})",
                            crate::backplane::redact(url.expose())
                        ),
                    ));
                }
            }
            Mode::Nats => {
                let Some(url) = &self.nats_url else {
                    return Err((
                        "--nats-url",
                        "--cluster nats needs --nats-url nats://HOST:PORT".into(),
                    ));
                };
                let ok = url
                    .expose()
                    .split(',')
                    .all(|u| u.trim().parse::<async_nats::ServerAddr>().is_ok());
                if !ok {
                    return Err((
                        "--nats-url",
                        format!(
                            "{}: not a NATS URL (nats://HOST:PORT, comma-separated)",
                            crate::backplane::redact(url.expose())
                        ),
                    ));
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// The channels with subscribers here and `remote` (other nodes'
/// answers), sorted, once each: what `POST /channel` publishes to.
pub fn with_local_channels(hub: &Hub, remote: Vec<String>) -> Vec<String> {
    let mut all: Vec<String> = hub
        .channels_with_subscribers()
        .iter()
        .map(|c| c.as_str().to_owned())
        .chain(remote)
        .collect();
    all.sort();
    all.dedup();
    all
}

/// A peer as `/status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerStatus {
    /// Its internal address.
    pub addr: String,
    /// Its node name, once known.
    pub node: Option<String>,
    /// `connecting`, `catching-up`, `live`, `retrying`, or `self`.
    pub state: &'static str,
    /// How far behind its stream this node is (from ids, which are
    /// microsecond clocks), in milliseconds.
    pub lag_ms: Option<u64>,
    /// Events applied from it.
    pub applied: u64,
    /// The last error, if retrying.
    pub error: Option<String>,
}

/// What a peer answered to a snapshot request.
enum Snapshot {
    /// The address is this node's own listener.
    Own,
    /// Another node's kept events and retained values.
    Peer(Vec<internal::Line>),
}

/// A running cluster node.
#[derive(Debug)]
pub struct Node {
    name: Arc<str>,
    hub: Arc<Hub>,
    options: Options,
    http: reqwest::Client,
    peers: Mutex<BTreeMap<String, Arc<peer::Link>>>,
    ready: AtomicBool,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl Node {
    /// Starts discovery and the peer links on `tasks`. Kubernetes mode
    /// needs `client`.
    pub fn start(
        name: &str,
        hub: &Arc<Hub>,
        options: &Options,
        client: Option<::kube::Client>,
        gossip_socket: Option<std::net::UdpSocket>,
        tasks: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> Arc<Self> {
        // reqwest is built without a default TLS provider: herald uses ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(options.peer_timeout)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .unwrap_or_default();
        let node = Arc::new(Self {
            name: Arc::from(name),
            hub: hub.clone(),
            options: options.clone(),
            http,
            peers: Mutex::new(BTreeMap::new()),
            ready: AtomicBool::new(false),
            tasks: tasks.clone(),
            shutdown: shutdown.clone(),
        });
        let (found_tx, found) = tokio::sync::watch::channel(None);
        if let (Mode::Kubernetes, Some(client)) = (options.mode, client) {
            let namespace = options
                .kube_namespace
                .clone()
                .or_else(kube::own_namespace)
                .unwrap_or_else(|| client.default_namespace().to_owned());
            let source = match (&options.kube_service, &options.kube_selector) {
                (Some(svc), _) => kube::Source::Service(svc.clone()),
                (None, Some(sel)) => kube::Source::Selector(sel.clone()),
                (None, None) => kube::Source::Selector(String::new()),
            };
            tasks.spawn(kube::run(
                client,
                namespace,
                source,
                options.internal_listen.port(),
                found_tx,
                shutdown.clone(),
            ));
        } else if let (Mode::Gossip, Some(socket)) = (options.mode, gossip_socket) {
            let advertise = |a: SocketAddr| match options.advertise {
                Some(ip) if a.ip().is_unspecified() => SocketAddr::new(ip, a.port()),
                _ => a,
            };
            let gossip_addr = advertise(socket.local_addr().unwrap_or(options.gossip_listen));
            let internal = advertise(options.internal_listen);
            let seeds = options.gossip_seeds.clone();
            let default_port = options.gossip_listen.port();
            let secret = options.gossip_secret.clone();
            let stop = shutdown.clone();
            tasks.spawn(async move {
                let Ok(socket) = tokio::net::UdpSocket::from_std(socket) else {
                    tracing::error!("cannot use the gossip socket");
                    return;
                };
                let mut resolved = vec![];
                for seed in seeds {
                    let target = if seed.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
                        seed.clone()
                    } else {
                        format!("{seed}:{default_port}")
                    };
                    match tokio::net::lookup_host(&target).await {
                        Ok(a) => resolved.extend(a),
                        Err(e) => tracing::warn!(seed = %target, error = %e, "cannot resolve a gossip seed"),
                    }
                }
                gossip::run(
                    socket,
                    gossip_addr,
                    internal,
                    resolved,
                    gossip::Seal::new(secret.as_ref().map(Secret::expose)),
                    found_tx,
                    stop,
                )
                .await;
            });
        }
        tasks.spawn(node.clone().run(found));
        node
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// True once the node has backfilled and caught up with its peers.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The cluster for `/status`.
    pub fn status(&self) -> serde_json::Value {
        let peers: Vec<PeerStatus> = self.peers.lock().values().map(|l| l.status()).collect();
        serde_json::json!({
            "mode": self.options.mode.name(),
            "self": &*self.name,
            "ready": self.ready(),
            "position": self.hub.position().to_string(),
            "peers": peers,
        })
    }

    fn authorize(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.options.secret {
            Some(s) => req.bearer_auth(s.expose()),
            None => req,
        }
    }

    /// Discovery, then the first backfill, then readiness. Until a backfill
    /// succeeded the node stays unready, and retries (with backoff, with
    /// the peers found meanwhile) until a peer answered with a snapshot or
    /// the node knows it is alone.
    async fn run(self: Arc<Self>, mut found: tokio::sync::watch::Receiver<Option<Vec<String>>>) {
        let mut tick = tokio::time::interval(match self.options.mode {
            Mode::Dns => self.options.peers_dns_interval,
            _ => Duration::from_secs(3600),
        });
        let watched = matches!(self.options.mode, Mode::Kubernetes | Mode::Gossip);
        // Backfills that found no peer, in a row.
        let mut failures = 0u32;
        loop {
            let again = (failures > 0 && !self.ready()).then(|| crate::retry::delay(failures));
            let wait_retry = async {
                match again {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            let addrs = if watched {
                tokio::select! {
                    () = self.shutdown.cancelled() => return,
                    r = found.changed() => if r.is_err() { return },
                    () = wait_retry => {}
                }
                match found.borrow_and_update().clone() {
                    Some(list) => list,
                    None => continue,
                }
            } else {
                tokio::select! {
                    () = self.shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                    () = wait_retry => {}
                }
                self.discover().await
            };
            self.reconcile(&addrs);
            if !self.ready() {
                if self.backfill().await {
                    self.ready.store(true, Ordering::Release);
                    tracing::info!(node = %self.name, peers = addrs.len(), "cluster node is ready");
                } else {
                    failures = failures.saturating_add(1);
                }
            }
        }
    }

    /// The peer addresses the mode finds now.
    async fn discover(&self) -> Vec<String> {
        match self.options.mode {
            Mode::Static => self.options.peers.clone(),
            Mode::Dns => {
                let Some(name) = &self.options.peers_dns else {
                    return vec![];
                };
                let target = if name
                    .rsplit_once(':')
                    .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
                {
                    name.clone()
                } else {
                    format!("{name}:{}", self.options.internal_listen.port())
                };
                match tokio::net::lookup_host(&target).await {
                    Ok(addrs) => {
                        let mut v: Vec<String> = addrs.map(|a| a.to_string()).collect();
                        v.sort();
                        v.dedup();
                        v
                    }
                    Err(e) => {
                        tracing::warn!(name = %target, error = %e, "cannot resolve --peers-dns; keeping the current peers");
                        self.peers.lock().keys().cloned().collect()
                    }
                }
            }
            _ => vec![],
        }
    }

    /// Starts links to new peers and stops links to peers that are gone.
    fn reconcile(self: &Arc<Self>, addrs: &[String]) {
        let mut peers = self.peers.lock();
        peers.retain(|addr, link| {
            let keep = addrs.contains(addr);
            if !keep {
                tracing::info!(peer = %addr, "peer left");
                link.stop();
            }
            keep
        });
        for addr in addrs {
            if !peers.contains_key(addr) {
                let link = peer::Link::new(addr.clone(), self.shutdown.child_token());
                peers.insert(addr.clone(), link.clone());
                self.tasks.spawn(link.run(self.clone()));
            }
        }
    }

    /// Asks every peer for its snapshot (history and retained values of
    /// every origin, this node's own included: what it held before a
    /// restart), applies the largest first and then the others (each adds
    /// only what the ones before lacked), then waits until every peer link
    /// has caught up or given up for now, bounded by the peer timeout.
    /// Returns false (stay unready, try again) if no peer answered and
    /// the node is not alone; this node's own address is never asked twice
    /// and never used.
    async fn backfill(&self) -> bool {
        let links: Vec<Arc<peer::Link>> = self.peers.lock().values().cloned().collect();
        let others: Vec<&Arc<peer::Link>> = links.iter().filter(|l| !l.is_self()).collect();
        let answers =
            futures_util::future::join_all(others.iter().map(|l| self.fetch_snapshot(l.addr())))
                .await;
        let mut snapshots = vec![];
        let mut failed = vec![];
        for (link, answer) in others.iter().zip(answers) {
            match answer {
                Ok(Snapshot::Own) => link.mark_self(),
                Ok(Snapshot::Peer(lines)) => snapshots.push((link.addr(), lines)),
                Err(e) => failed.push(format!("{}: {e}", link.addr())),
            }
        }
        if snapshots.is_empty() && !failed.is_empty() {
            tracing::warn!(
                node = %self.name,
                errors = %failed.join("; "),
                "no peer answered with a snapshot; not ready until one does"
            );
            return false;
        }
        if snapshots.is_empty() {
            tracing::info!(node = %self.name, "no peers: this node is alone");
        }
        // The peer with the most history first.
        snapshots.sort_by_key(|(_, lines)| std::cmp::Reverse(lines.len()));
        for (k, (addr, lines)) in snapshots.into_iter().enumerate() {
            let kept = lines.len();
            let n = internal::apply_all(&self.hub, &self.name, lines);
            tracing::info!(peer = %addr, kept, applied = n, first = k == 0, "backfilled from peer");
        }
        for e in &failed {
            tracing::warn!(node = %self.name, error = %e, "a peer gave no snapshot");
        }
        let deadline = tokio::time::Instant::now() + self.options.peer_timeout;
        while tokio::time::Instant::now() < deadline && !self.shutdown.is_cancelled() {
            if links.iter().all(|l| l.settled()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    async fn fetch_snapshot(&self, addr: &str) -> Result<Snapshot, String> {
        let resp = self
            .authorize(self.http.get(format!("http://{addr}/internal/v1/snapshot")))
            .timeout(self.options.peer_timeout)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("status {}", resp.status()));
        }
        let node = resp
            .headers()
            .get(internal::NODE_HEADER)
            .and_then(|v| v.to_str().ok());
        if node == Some(&*self.name) {
            return Ok(Snapshot::Own);
        }
        let lines: Vec<internal::Line> = resp.json().await.map_err(|e| e.to_string())?;
        Ok(Snapshot::Peer(lines))
    }

    /// Channels with subscribers on any node (for `POST /channel`).
    pub async fn channels_with_subscribers(&self) -> Vec<String> {
        let answers = self
            .ask_peers(|http, addr| http.get(format!("http://{addr}/internal/v1/channels")))
            .await;
        let mut remote = vec![];
        for r in answers.into_iter().flatten() {
            remote.extend(r.json::<Vec<String>>().await.unwrap_or_default());
        }
        with_local_channels(&self.hub, remote)
    }

    /// Sends one request to every peer but this node, in parallel, with the
    /// secret and the peer timeout; the successful answers.
    async fn ask_peers(
        &self,
        request: impl Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    ) -> Vec<Option<reqwest::Response>> {
        let links: Vec<Arc<peer::Link>> = self.peers.lock().values().cloned().collect();
        let asks = links.iter().filter(|l| !l.is_self()).map(|l| {
            let req = self
                .authorize(request(&self.http, l.addr()))
                .timeout(self.options.peer_timeout);
            async move { req.send().await.ok().filter(|r| r.status().is_success()) }
        });
        futures_util::future::join_all(asks).await
    }

    /// Offers a targeted publish to every peer; true if one delivered it.
    pub async fn publish_to_client(&self, body: serde_json::Value) -> bool {
        self.ask_peers(|http, addr| {
            http.post(format!("http://{addr}/internal/v1/client"))
                .json(&body)
        })
        .await
        .iter()
        .any(Option::is_some)
    }
}
