//! The composition root: binds the listener, builds the hub and router,
//! runs until the shutdown token is cancelled, then drains within the
//! grace period. Only this module knows every other one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::http;
use crate::hub::Hub;

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
}

/// A bound, not yet running node.
#[derive(Debug)]
pub struct App {
    listener: TcpListener,
    addr: SocketAddr,
    config: Arc<Config>,
    hub: Arc<Hub>,
}

impl App {
    /// Validates the config and binds the listener (port 0 allowed).
    pub async fn bind(config: Config) -> Result<Self, Error> {
        config.validate()?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| Error::Bind {
                addr: config.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| Error::Bind {
            addr: config.listen,
            source,
        })?;
        let hub = Hub::new(config.hub());
        Ok(Self {
            listener,
            addr,
            config: Arc::new(config),
            hub,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The hub (for embedding and tests).
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Serves until `shutdown` is cancelled, then ends open streams and
    /// exits within the grace period.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let Self {
            listener,
            addr,
            config,
            hub,
        } = self;
        let tasks = TaskTracker::new();
        tasks.spawn(sweep(hub.clone(), config.history_ttl, shutdown.clone()));
        let (tick_tx, ticks) = tokio::sync::watch::channel(0u64);
        tasks.spawn(http::heartbeat(tick_tx, config.heartbeat, shutdown.clone()));
        let state = http::State {
            hub,
            config: config.clone(),
            shutdown: shutdown.clone(),
            tasks: tasks.clone(),
            ticks,
        };
        let router = http::router(state.clone());
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
                shutdown.cancelled().await;
                tokio::time::sleep(grace).await;
            } => {
                tracing::warn!(?grace, "connections still open after the grace period; exiting anyway");
            }
        }
        tracing::info!("herald stopped");
        Ok(())
    }
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
