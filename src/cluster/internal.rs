//! The internal listener: what peers (and sser-era apps) call.
//!
//! - `GET /internal/v1/stream?from=POSITION`: this node's own events after
//!   `from`'s entry for it, then live, as NDJSON; a `{"tick":ID}` line
//!   every second keeps the stream's liveness and lag visible.
//! - `GET /internal/v1/snapshot`: every kept event, for a starting node.
//! - `GET /internal/v1/channels`: channels with subscribers here.
//! - `POST /internal/v1/client`: a targeted publish for a client here.
//! - `POST /api/json/v1/send`: sser's endpoint, `{"stream","msg"}`.
//!
//! Every request needs `Authorization: Bearer SECRET` when
//! `--cluster-secret` is set.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::hub::{
    ChannelName, ClientId, Data, EventId, EventName, Hub, Origin, Position, Publish, SharedEvent,
};

/// One event on the wire between nodes.
#[derive(Debug, Serialize, Deserialize)]
pub struct Line {
    /// The origin node.
    pub origin: String,
    /// The origin's id.
    pub id: String,
    /// The channel.
    pub channel: String,
    /// The event name, if not `message`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// The data: JSON as published, or a string.
    pub data: Box<RawValue>,
    /// True if `data` is JSON that was published as JSON (not a string).
    #[serde(default)]
    pub json: bool,
    /// Reconnection delay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<u64>,
    /// Idempotency key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Kept as the channel's current value.
    #[serde(default)]
    pub retain: bool,
}

impl Line {
    /// The wire form of an event (which must have an origin).
    pub fn of(ev: &SharedEvent) -> Option<Self> {
        let (data, json) = raw(&ev.data)?;
        Some(Self {
            origin: ev.origin.as_ref()?.to_string(),
            id: ev.id.to_string(),
            channel: ev.channel.as_str().to_owned(),
            event: ev.name.as_ref().map(|n| n.as_str().to_owned()),
            data,
            json,
            retry: ev.retry,
            key: ev.key.clone(),
            retain: ev.retain,
        })
    }

    /// What to publish for this line; `None` if its data or event name is
    /// not valid.
    fn publish(self) -> Option<Publish> {
        let data = if self.json {
            Data::Json(self.data.get().to_owned())
        } else {
            Data::Text(serde_json::from_str::<String>(self.data.get()).ok()?)
        };
        let event = match self.event.as_deref().map(EventName::parse) {
            None => None,
            Some(n) => Some(n.ok()?),
        };
        Some(Publish {
            data,
            event,
            key: self.key,
            retry: self.retry,
            retain: self.retain,
        })
    }
}

/// The mesh wire-line fuzz target's body: a line that parses serializes
/// back to one that parses to the same line, and turning it into a
/// publish never panics (a valid one keeps its data).
pub(crate) fn fuzz_line(data: &[u8]) {
    let Ok(line) = serde_json::from_slice::<Line>(data) else {
        return;
    };
    let again = serde_json::to_vec(&line).expect("a parsed line serializes");
    let back: Line = serde_json::from_slice(&again).expect("a serialized line parses");
    assert_eq!(serde_json::to_vec(&back).ok(), Some(again));
    let json = line.json;
    if let Some(p) = line.publish() {
        assert_eq!(matches!(p.data, Data::Json(_)), json);
    }
}

/// Data as raw JSON, and whether it was published as JSON.
fn raw(data: &Data) -> Option<(Box<RawValue>, bool)> {
    Some(match data {
        Data::Json(raw) => (RawValue::from_string(raw.clone()).ok()?, true),
        Data::Text(t) => (
            RawValue::from_string(serde_json::to_string(t).ok()?).ok()?,
            false,
        ),
    })
}

/// Applies one line from a peer; false if it was invalid or already here.
pub fn apply(hub: &Hub, me: &str, l: Line) -> bool {
    let (Ok(channel), Ok(id)) = (ChannelName::parse(&l.channel), l.id.parse::<EventId>()) else {
        tracing::warn!(origin = %l.origin, "ignoring a malformed event from a peer");
        return false;
    };
    if !crate::hub::valid_origin(&l.origin) {
        return false;
    }
    let origin: Origin = Arc::from(l.origin.as_str());
    let Some(p) = l.publish() else {
        return false;
    };
    if &*origin == me {
        // One of this node's own events, learnt back after a restart.
        hub.observe_own(id);
    }
    hub.apply_remote(&channel, &origin, id, p)
}

/// Applies a snapshot's lines (every origin's kept events and retained
/// values, in any order): sorted by origin and id first, since each
/// origin's events must be applied in id order. Returns how many applied.
pub fn apply_all(hub: &Hub, me: &str, mut lines: Vec<Line>) -> usize {
    lines.sort_by(|a, b| {
        (&a.origin, a.id.parse::<EventId>().ok()).cmp(&(&b.origin, b.id.parse::<EventId>().ok()))
    });
    lines.dedup_by(|a, b| a.origin == b.origin && a.id == b.id);
    lines
        .into_iter()
        .map(|l| apply(hub, me, l))
        .filter(|applied| *applied)
        .count()
}

/// What the internal handlers share.
#[derive(Clone)]
struct Internal {
    hub: Arc<Hub>,
    secret: Option<crate::config::Secret>,
    max_message_bytes: usize,
    shutdown: tokio_util::sync::CancellationToken,
    tasks: tokio_util::task::TaskTracker,
}

/// The internal router. Its streams run on `tasks` and end on `shutdown`.
pub fn router(
    hub: Arc<Hub>,
    secret: Option<crate::config::Secret>,
    max_message_bytes: usize,
    shutdown: tokio_util::sync::CancellationToken,
    tasks: tokio_util::task::TaskTracker,
) -> axum::Router {
    let state = Internal {
        hub,
        secret,
        max_message_bytes,
        shutdown,
        tasks,
    };
    axum::Router::new()
        .route("/internal/v1/stream", get(stream))
        .route("/internal/v1/snapshot", get(snapshot))
        .route("/internal/v1/channels", get(channels))
        .route("/internal/v1/client", post(client))
        .route("/api/json/v1/send", post(sser_send).put(sser_send))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state)
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({"error": msg.into()}))).into_response()
}

async fn auth(State(s): State<Internal>, req: Request, next: Next) -> Response {
    if let Some(secret) = &s.secret {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), secret.expose().as_bytes())) {
            return error(
                StatusCode::UNAUTHORIZED,
                "peer traffic needs Authorization: Bearer <--cluster-secret>",
            );
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn line_bytes(l: &impl Serialize) -> Option<Bytes> {
    let mut v = serde_json::to_vec(l).ok()?;
    v.push(b'\n');
    Some(Bytes::from(v))
}

#[derive(Deserialize)]
struct StreamQuery {
    #[serde(default)]
    from: Option<String>,
}

async fn stream(
    State(s): State<Internal>,
    axum::extract::Query(q): axum::extract::Query<StreamQuery>,
) -> Response {
    let Some(me) = s.hub.config().origin.clone() else {
        return error(StatusCode::NOT_FOUND, "this node is not clustered");
    };
    let from = match q.from.as_deref().filter(|f| !f.is_empty()) {
        None => Position::new(),
        Some(f) => match Position::parse(f) {
            Some(p) => p,
            None => return error(StatusCode::BAD_REQUEST, "from: not a position"),
        },
    };
    let mut after = from.get(&me);
    // Subscribe before reading the backlog, so nothing falls between.
    let mut live = s.hub.applied();
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    let hub = s.hub.clone();
    let shutdown = s.shutdown.clone();
    s.tasks.spawn(async move {
        let send_backlog = |after: EventId| hub.own_events_after(after);
        let mut backlog = send_backlog(after);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            for ev in backlog.drain(..) {
                if ev.id <= after {
                    continue;
                }
                after = ev.id;
                if let Some(b) = Line::of(&ev).as_ref().and_then(line_bytes)
                    && tx.send(b).await.is_err()
                {
                    return;
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tx.closed() => return,
                _ = tick.tick() => {
                    let t = serde_json::json!({"tick": hub.position().get(&me).to_string(), "node": &*me});
                    if let Some(b) = line_bytes(&t)
                        && tx.send(b).await.is_err()
                    {
                        return;
                    }
                }
                ev = live.recv() => match ev {
                    Ok(ev) => backlog.push(ev),
                    // Fell behind the live feed: read history instead.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => backlog = send_backlog(after),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "stream"))
}

/// The header naming the node that answers a snapshot: a node whose peer
/// list names itself must not backfill from its own (empty) history.
pub(super) const NODE_HEADER: &str = "herald-node";

async fn snapshot(State(s): State<Internal>) -> Response {
    let lines: Vec<Line> = s.hub.snapshot().iter().filter_map(Line::of).collect();
    let me = s
        .hub
        .config()
        .origin
        .as_deref()
        .unwrap_or_default()
        .to_owned();
    ([(NODE_HEADER, me)], Json(lines)).into_response()
}

async fn channels(State(s): State<Internal>) -> Response {
    Json(super::with_local_channels(&s.hub, vec![])).into_response()
}

/// The body of a targeted publish offered to peers.
pub fn client_body(channel: &ChannelName, client: &ClientId, p: &Publish) -> serde_json::Value {
    let line = raw(&p.data).map(|(data, json)| Line {
        origin: String::new(),
        id: "0".into(),
        channel: channel.as_str().to_owned(),
        event: p.event.as_ref().map(|n| n.as_str().to_owned()),
        data,
        json,
        retry: p.retry,
        key: None,
        retain: false,
    });
    serde_json::json!({"channel": channel.as_str(), "client": client.as_str(), "line": line})
}

#[derive(Deserialize)]
struct ClientPublish {
    channel: String,
    client: String,
    line: Line,
}

async fn client(State(s): State<Internal>, body: Bytes) -> Response {
    match deliver_to_client(&s.hub, &body) {
        Ok(()) => StatusCode::OK.into_response(),
        Err((status, msg)) => error(status, msg),
    }
}

/// Delivers a targeted publish offered by another node (a
/// [`client_body`]) if the client is connected here.
pub fn deliver_to_client(hub: &Hub, body: &[u8]) -> Result<(), (StatusCode, String)> {
    let bad = |m: &str| (StatusCode::BAD_REQUEST, m.to_owned());
    let p = serde_json::from_slice::<ClientPublish>(body).map_err(|_| bad("invalid JSON"))?;
    let (Ok(channel), Ok(client)) = (ChannelName::parse(&p.channel), ClientId::parse(&p.client))
    else {
        return Err(bad("invalid channel or client"));
    };
    let publish = p
        .line
        .publish()
        .ok_or_else(|| bad("invalid data or event name"))?;
    let publish = Publish {
        key: None,
        retain: false,
        ..publish
    };
    hub.publish_to_client(&channel, &client, publish)
        .map(|_| ())
        .map_err(|e| (StatusCode::NOT_FOUND, e.to_string()))
}

#[derive(Deserialize)]
struct SserSend {
    stream: String,
    msg: String,
}

/// sser's `POST /api/json/v1/send`: `{"stream": S, "msg": M}` → 200.
async fn sser_send(State(s): State<Internal>, body: Bytes) -> Response {
    let Ok(m) = serde_json::from_slice::<SserSend>(&body) else {
        return error(StatusCode::BAD_REQUEST, "invalid JSON");
    };
    if m.msg.len() > s.max_message_bytes {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "msg is larger than {} bytes (--max-message-bytes)",
                s.max_message_bytes
            ),
        );
    }
    if m.msg.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "you cannot send the empty string as a message",
        );
    }
    let Ok(channel) = ChannelName::parse(&m.stream) else {
        return error(StatusCode::BAD_REQUEST, "invalid stream name");
    };
    s.hub.publish(
        &channel,
        Publish {
            data: Data::Text(m.msg),
            event: None,
            key: None,
            retry: None,
            retain: false,
        },
    );
    StatusCode::OK.into_response()
}
