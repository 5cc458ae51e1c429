//! HTTP adapters over the hub: SSE, WebSocket, publish and operations.
//!
//! Handlers validate input, turn it into hub calls, and turn hub results
//! into responses. Every error is JSON `{"error": "..."}` with a status
//! that says whose fault it is.

mod assets;
mod direct;
mod direct_ws;
mod error;
mod listener;
mod ops;
mod publish;
mod server;
pub mod spa_compat;
mod sse;
mod ws;
pub mod ws_codec;

use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderName, HeaderValue, Method};
use axum::routing::{get, post};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::{Config, Cors};
use crate::hub::{ChannelName, Hub};

pub use error::ApiError;
pub use listener::Peer;
pub use server::{Admission, serve, serve_internal};

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct State {
    /// The hub.
    pub hub: Arc<Hub>,
    /// The node's configuration.
    pub config: Arc<Config>,
    /// Cancelled when the node starts draining (SIGTERM): `/readyz` 503,
    /// new subscriptions refused, open streams flowing.
    pub draining: CancellationToken,
    /// Cancelled when streams end and the listener closes (the drain delay
    /// after `draining`).
    pub shutdown: CancellationToken,
    /// Tracks connection tasks (WebSockets) so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// The cluster node, if clustering as a mesh.
    pub cluster: Option<Arc<crate::cluster::Node>>,
    /// The backplane, if clustering through Redis or NATS.
    pub backplane: Option<Arc<crate::backplane::Backplane>>,
    /// The Kubernetes sources, if any are configured.
    pub sources: Option<Arc<crate::k8s::Sources>>,
    /// Ticks every `--heartbeat`: one shared timer instead of one per idle
    /// stream (see [`heartbeat`]).
    pub ticks: tokio::sync::watch::Receiver<u64>,
    /// The public listener's connection bounds and counters.
    pub admission: Arc<Admission>,
}

/// Drives the shared heartbeat: `tx` ticks every `every` until `shutdown`.
pub async fn heartbeat(
    tx: tokio::sync::watch::Sender<u64>,
    every: std::time::Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => tx.send_modify(|n| *n = n.wrapping_add(1)),
        }
    }
}

impl State {
    /// A state of its own: a new hub for `config`, a fresh shutdown
    /// token and tracker, a heartbeat that never ticks, no Kubernetes
    /// sources. For embedding a router and for tests.
    pub fn new(config: Config) -> Self {
        Self {
            hub: Hub::new(config.hub()),
            admission: Admission::new(config.limits.clone()),
            config: Arc::new(config),
            draining: CancellationToken::new(),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            sources: None,
            cluster: None,
            backplane: None,
            ticks: tokio::sync::watch::channel(0).1,
        }
    }

    /// A connection's view of the shared heartbeat: its first tick is the
    /// next one, not one that happened before it connected. (A clone of a
    /// `watch` receiver inherits what the original had seen, and the
    /// original in `State` has seen nothing: a WebSocket then pinged at
    /// once on connect and closed a client that had not answered by the
    /// next real tick, however soon that came.)
    pub(crate) fn ticker(&self) -> tokio::sync::watch::Receiver<u64> {
        let mut ticks = self.ticks.clone();
        ticks.mark_unchanged();
        ticks
    }

    /// Refuses new subscriptions while draining.
    fn check_not_draining(&self) -> Result<(), ApiError> {
        if self.draining.is_cancelled() || self.shutdown.is_cancelled() {
            return Err(ApiError::unavailable(
                "herald is shutting down; reconnect to another instance",
            ));
        }
        Ok(())
    }
}

/// Entry points of the parsers of untrusted input, for the fuzz targets
/// (`fuzz/`): each asserts its parser's invariants, not only that it does
/// not panic.
#[doc(hidden)]
pub mod fuzz {
    /// A request head, as the accept loop and both direct paths read it.
    pub fn request_head(data: &[u8]) {
        let state = super::server::head_state(data);
        let sse = super::direct::parse(data);
        let ws = super::direct_ws::parse(data);
        if sse.is_some() || ws.is_some() {
            // The direct paths only serve heads that are whole and valid.
            assert_eq!(state, Some(true));
        }
        assert!(!(sse.is_some() && ws.is_some()), "served by both paths");
    }

    /// Client WebSocket bytes, fed in two pieces at `cut`: never a panic,
    /// the buffers stay bounded, and messages built from `data` come out
    /// whole after masking and fragmentation.
    pub fn ws_frames(data: &[u8]) {
        super::ws_codec::fuzz_decoder(data);
    }

    /// A client WebSocket frame with first byte `first`, masked with
    /// `mask` (for tests that speak WebSocket on raw sockets).
    pub fn masked_frame(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        super::ws_codec::masked_frame(first, payload, mask)
    }

    /// A publish: body and query (split at the first NUL), as JSON and as
    /// text. Accepted data is never empty, JSON data parses and is compact
    /// (in the publisher's key order), and the event name is valid.
    pub fn publish(data: &[u8]) {
        let (query, body) = match data.iter().position(|b| *b == 0) {
            Some(i) => (std::str::from_utf8(&data[..i]).ok(), &data[i + 1..]),
            None => (None, data),
        };
        for json in [true, false] {
            let Ok(p) = super::publish::parse_publish(json, body, query) else {
                continue;
            };
            assert!(!p.data.is_empty());
            if let crate::hub::Data::Json(j) = &p.data {
                // Valid JSON, already compact (compacting it again changes
                // nothing), in the publisher's key order.
                let _: serde_json::Value = serde_json::from_str(j).expect("JSON data parses");
                assert_eq!(&crate::hub::compact_json(j), j, "JSON data is compact");
            }
            if let Some(e) = &p.event {
                assert!(crate::hub::EventName::parse(e.as_str()).is_ok());
            }
        }
    }
}

/// herald's WebSocket as a conformance echo server (`examples/ws_echo.rs`,
/// which Autobahn's cases run against): the handshake, frame decoder,
/// UTF-8 checks, close handling and writer of `/ws`, not a copy of them.
#[doc(hidden)]
pub mod conformance {
    /// Serves every connection of `listener` as a WebSocket that echoes
    /// each message (text and binary, up to `max_message` bytes).
    pub async fn ws_echo(
        listener: tokio::net::TcpListener,
        max_message: usize,
    ) -> std::io::Result<()> {
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            tokio::spawn(super::direct_ws::echo(stream, max_message));
        }
    }
}

/// The public router.
pub fn router(state: State) -> Router {
    let cors = cors_layer(&state.config.cors);
    let router = Router::new()
        .route("/channel", post(publish::all))
        .route(
            "/channel/{channel}",
            get(sse::channel).post(publish::channel),
        )
        .route(
            "/channel/{channel}/client/{client}",
            get(sse::channel_client).post(publish::client),
        )
        .route("/events", get(sse::events))
        .route("/ws", get(ws::upgrade))
        .route("/", get(assets::demo))
        .route("/herald.js", get(assets::client_js))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/status", get(ops::status))
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .with_state(state);
    // Outside CORS, so that a repeated Origin is refused before CORS reads
    // the first one.
    let router = match cors {
        Some(layer) => router.layer(layer),
        None => router,
    };
    router.layer(axum::middleware::from_fn(refuse_repeated_headers))
}

/// Headers that must appear at most once: which of two `Last-Event-ID`s
/// or `Origin`s a server honours differs between servers and proxies, so
/// herald takes neither (`400`, on both paths: the direct ones hand such a
/// head to hyper, which answers here).
pub(crate) const SINGLE_HEADERS: [&str; 2] = ["last-event-id", "origin"];

/// The first of [`SINGLE_HEADERS`] that `names` holds more than once.
pub(crate) fn repeated<'a>(names: impl Iterator<Item = &'a str>) -> Option<&'static str> {
    let mut seen = [0u8; SINGLE_HEADERS.len()];
    for name in names {
        for (k, single) in SINGLE_HEADERS.iter().enumerate() {
            if name.eq_ignore_ascii_case(single) {
                seen[k] += 1;
                if seen[k] > 1 {
                    return Some(single);
                }
            }
        }
    }
    None
}

async fn refuse_repeated_headers(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match repeated(req.headers().keys().flat_map(|k| {
        // One key per name: count its values.
        std::iter::repeat_n(k.as_str(), req.headers().get_all(k).iter().count())
    })) {
        Some(name) => ApiError::bad_request(format!(
            "the {} header is given more than once: send it once",
            header_title(name)
        ))
        .into_response(),
        None => next.run(req).await,
    }
}

/// `last-event-id` as people write it: `Last-Event-ID`.
fn header_title(name: &str) -> &'static str {
    match name {
        "last-event-id" => "Last-Event-ID",
        _ => "Origin",
    }
}

fn cors_layer(cors: &Cors) -> Option<CorsLayer> {
    let origin = match cors {
        Cors::Off => return None,
        Cors::Any => AllowOrigin::any(),
        Cors::Origins(list) => AllowOrigin::list(
            list.iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect::<Vec<_>>(),
        ),
    };
    Some(
        CorsLayer::new()
            .allow_origin(origin)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers([
                axum::http::header::CONTENT_TYPE,
                axum::http::header::AUTHORIZATION,
                HeaderName::from_static("last-event-id"),
            ])
            .expose_headers([HeaderName::from_static("herald-client-id")])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

/// A path parameter, with malformed paths (such as invalid UTF-8 after
/// percent-decoding) answered as JSON errors like everything else.
pub(crate) struct PathParams<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for PathParams<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Self(p.0))
            .map_err(|e| ApiError::bad_request(format!("invalid path: {}", e.body_text())))
    }
}

/// Frames queued for one connection, written together: a single frame is
/// sent as its shared bytes (no copy); several are concatenated.
fn join(frames: impl IntoIterator<Item = bytes::Bytes>) -> bytes::Bytes {
    let mut frames = frames.into_iter();
    let Some(first) = frames.next() else {
        return bytes::Bytes::new();
    };
    let Some(second) = frames.next() else {
        return first;
    };
    let mut out = bytes::BytesMut::with_capacity(first.len() + second.len());
    out.extend_from_slice(&first);
    out.extend_from_slice(&second);
    for f in frames {
        out.extend_from_slice(&f);
    }
    out.freeze()
}

/// Reads `name=value` pairs of a query string (repeated names allowed).
fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// Parses a list of channel names, dropping repeats, within the limit.
fn channel_list<'a>(names: impl Iterator<Item = &'a str>) -> Result<Vec<ChannelName>, ApiError> {
    let mut out: Vec<ChannelName> = vec![];
    for n in names {
        let c = ChannelName::parse(n).map_err(ApiError::bad_request)?;
        if !out.contains(&c) {
            out.push(c);
        }
    }
    if out.len() > crate::config::MAX_CHANNELS_PER_CONNECTION {
        return Err(ApiError::bad_request(format!(
            "too many channels: at most {} per connection",
            crate::config::MAX_CHANNELS_PER_CONNECTION
        )));
    }
    Ok(out)
}
