//! The composition root: binds the listener, builds the hub and router,
//! runs until the shutdown token is cancelled, then drains within the
//! grace period. Only this module knows every other one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backplane::{self, Backplane};
use crate::cluster;
use crate::config::Config;
use crate::http;
use crate::hub::Hub;
use crate::k8s;

/// Errors that stop a node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The public listener could not be bound.
    #[error("cannot listen on {addr} (--listen)")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The spa-reloader compatible listener could not be bound.
    #[error("cannot listen on {addr} (--spa-compat-listen / SPA_WEBSOCKET_PORT)")]
    BindCompat {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The internal (peer) listener could not be bound.
    #[error("cannot listen on {addr} (--internal-listen)")]
    BindInternal {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The gossip socket could not be bound.
    #[error("cannot listen on {addr} (--gossip-listen)")]
    BindGossip {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The Kubernetes client could not be set up.
    #[error(transparent)]
    Kube(#[from] crate::k8s::Error),
}

/// A bound, not yet running node.
pub struct App {
    listener: TcpListener,
    addr: SocketAddr,
    config: Arc<Config>,
    hub: Arc<Hub>,
    kube: Option<kube::Client>,
    compat: Option<(TcpListener, SocketAddr)>,
    internal: Option<(TcpListener, SocketAddr)>,
    gossip: Option<std::net::UdpSocket>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("addr", &self.addr)
            .field("compat", &self.compat_addr())
            .field("kube", &self.kube.is_some())
            .field(
                "gossip",
                &self.gossip.as_ref().and_then(|g| g.local_addr().ok()),
            )
            .finish_non_exhaustive()
    }
}

impl App {
    /// Validates the config and binds the listener (port 0 allowed).
    pub async fn bind(config: Config) -> Result<Self, Error> {
        config.validate()?;
        let listener = listen(config.listen).map_err(|source| Error::Bind {
            addr: config.listen,
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| Error::Bind {
            addr: config.listen,
            source,
        })?;
        let compat = match config.spa_compat_listen {
            None => None,
            Some(addr) => {
                let bind_err = |source| Error::BindCompat { addr, source };
                let l = listen(addr).map_err(bind_err)?;
                let local = l.local_addr().map_err(bind_err)?;
                Some((l, local))
            }
        };
        let internal = if config.cluster.mesh() {
            let addr = config.cluster.internal_listen;
            let bind_err = |source| Error::BindInternal { addr, source };
            let l = TcpListener::bind(addr).await.map_err(bind_err)?;
            let local = l.local_addr().map_err(bind_err)?;
            Some((l, local))
        } else {
            None
        };
        let gossip = if config.cluster.mode == cluster::Mode::Gossip {
            let addr = config.cluster.gossip_listen;
            let bind_err = |source| Error::BindGossip { addr, source };
            let s = std::net::UdpSocket::bind(addr).map_err(bind_err)?;
            s.set_nonblocking(true).map_err(bind_err)?;
            Some(s)
        } else {
            None
        };
        // A bad kubeconfig fails the start, not the first watch.
        let kube = if config.kube.enabled() || config.cluster.mode == cluster::Mode::Kubernetes {
            Some(k8s::client(&config.kube).await?)
        } else {
            None
        };
        let hub = Hub::new(config.hub());
        Ok(Self {
            listener,
            addr,
            config: Arc::new(config),
            hub,
            kube,
            compat,
            internal,
            gossip,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The spa-reloader compatible listener's address, if enabled.
    pub fn compat_addr(&self) -> Option<SocketAddr> {
        self.compat.as_ref().map(|(_, a)| *a)
    }

    /// The internal (peer) listener's address, if clustering.
    pub fn internal_addr(&self) -> Option<SocketAddr> {
        self.internal.as_ref().map(|(_, a)| *a)
    }

    /// The hub (for embedding and tests).
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Serves until `draining` is cancelled (SIGTERM); then, for the drain
    /// delay, keeps the listener open with `/readyz` 503 and new
    /// subscriptions refused while open streams keep flowing; then ends
    /// the streams and exits, all within the grace period.
    pub async fn run(self, draining: CancellationToken) -> Result<(), Error> {
        let Self {
            listener,
            addr,
            config,
            hub,
            kube,
            compat,
            internal,
            gossip,
        } = self;
        let tasks = TaskTracker::new();
        // The one token every task ends on, cancelled the drain delay after
        // `draining` (or when the caller drops out).
        let shutdown = CancellationToken::new();
        let delay = config.drain();
        tasks.spawn({
            let (draining, shutdown) = (draining.clone(), shutdown.clone());
            async move {
                tokio::select! {
                    () = draining.cancelled() => {}
                    () = shutdown.cancelled() => return,
                }
                if !delay.is_zero() {
                    tracing::info!(?delay, "draining: /readyz is 503 and new subscriptions are refused; open streams continue");
                    tokio::time::sleep(delay).await;
                }
                shutdown.cancel();
            }
        });
        tasks.spawn(sweep(hub.clone(), config.history_ttl, shutdown.clone()));
        let (tick_tx, ticks) = tokio::sync::watch::channel(0u64);
        tasks.spawn(http::heartbeat(tick_tx, config.heartbeat, shutdown.clone()));
        let sources = kube
            .as_ref()
            .filter(|_| config.kube.enabled())
            .map(|client| k8s::Sources::start(client, &config.kube, &hub, &tasks, &shutdown));
        let cluster = internal.map(|(listener, addr)| {
            let router = cluster::router(
                hub.clone(),
                config.cluster.secret.clone(),
                config.max_message_bytes,
                shutdown.clone(),
                tasks.clone(),
            );
            tasks.spawn(http::serve_internal(
                listener,
                router,
                config.limits.clone(),
                config.write_timeout,
                shutdown.clone(),
                tasks.clone(),
            ));
            tracing::info!(%addr, mode = ?config.cluster.mode, "internal listener for peers");
            cluster::Node::start(
                &config.node_name,
                &hub,
                &config.cluster,
                kube.clone(),
                gossip,
                &tasks,
                &shutdown,
            )
        });
        let backplane =
            config
                .cluster
                .backplane(config.history_ttl)
                .map(|options| match config.cluster.mode {
                    cluster::Mode::Nats => Backplane::start::<backplane::Nats>(
                        &config.node_name,
                        &hub,
                        &options,
                        &tasks,
                        &shutdown,
                    ),
                    _ => Backplane::start::<backplane::Redis>(
                        &config.node_name,
                        &hub,
                        &options,
                        &tasks,
                        &shutdown,
                    ),
                });
        if let Some(b) = &backplane {
            tracing::info!(mode = ?config.cluster.mode, url = %b.url(), "sharing channels through the backplane");
        }
        let state = http::State {
            cluster,
            backplane,
            sources,
            hub,
            config: config.clone(),
            draining: draining.clone(),
            shutdown: shutdown.clone(),
            tasks: tasks.clone(),
            ticks,
            admission: http::Admission::new(config.limits.clone()),
        };
        let router = http::router(state.clone());
        if let Some((listener, addr)) = compat {
            tracing::info!(%addr, "spa-reloader compatible WebSocket is listening");
            tasks.spawn(http::spa_compat::serve(listener, state.clone()));
        }
        tracing::info!(%addr, node = %config.node_name, "herald is listening");
        let grace = config.shutdown_grace;
        // The accept loop stops on the token (closing the listener); every
        // connection is a tracked task that ends itself on the token too,
        // but a client that does not read can hold its socket, so the grace
        // period bounds the wait.
        let served = async {
            http::serve(listener, router, state).await;
            tasks.close();
            tasks.wait().await;
        };
        tokio::select! {
            () = served => {}
            () = async {
                draining.cancelled().await;
                tokio::time::sleep(grace).await;
            } => {
                tracing::warn!(?grace, "connections still open after the grace period; exiting anyway");
            }
        }
        tracing::info!("herald stopped");
        Ok(())
    }
}

/// Accept queue of the public listener. A rollout or a network blip makes
/// thousands of browsers reconnect at once; with the usual 1,024 the
/// kernel drops SYNs and clients wait a full second to retry.
const ACCEPT_BACKLOG: u32 = 8192;

/// Binds the public listener with [`ACCEPT_BACKLOG`] (the kernel caps it at
/// `net.core.somaxconn`).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// Expires history and frees idle channels every so often.
async fn sweep(hub: Arc<Hub>, ttl: Duration, shutdown: CancellationToken) {
    let every = (ttl / 10).clamp(Duration::from_millis(100), Duration::from_secs(10));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => { hub.sweep(); }
        }
    }
}
