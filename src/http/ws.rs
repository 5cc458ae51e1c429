//! WebSocket: `GET /ws?channel=a&channel=b[&lastEventId=ID]`.
//!
//! One task per connection (tracked, so shutdown waits for it) drives both
//! directions with `select!`: outbox batches are fed to the socket and
//! flushed once; client messages (`subscribe`, `unsubscribe`) are answered
//! in between; pings go out every heartbeat and a peer that answered
//! nothing since the last ping is closed.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use futures_util::SinkExt;
use serde::Deserialize;

use super::sse::resume_from;
use super::{ApiError, State as AppState, channel_list, query_pairs};
use crate::config::{MAX_CHANNELS_PER_CONNECTION, MAX_WS_CLIENT_MESSAGE_BYTES};
use crate::hub::{Batch, ChannelName, ClientId, Item, Outbox, Resume, Subscription};

/// Close code for a subscriber that fell too far behind (application range).
pub const CLOSE_SLOW: u16 = 4008;

pub(super) async fn upgrade(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    state.check_not_draining()?;
    // The handshake rules of the direct path (426 for another version, a
    // key of 16 bytes), before axum's extractor, which checks less.
    if let Err(r) =
        super::direct_ws::handshake(headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes())))
    {
        let (status, msg) = r.answer();
        let status =
            axum::http::StatusCode::from_u16(status).unwrap_or(axum::http::StatusCode::BAD_REQUEST);
        return Err(ApiError::new(status, msg));
    }
    let ws =
        ws.map_err(|e| ApiError::new(e.status(), format!("a WebSocket upgrade is required: {e}")))?;
    let pairs = query_pairs(query.as_deref());
    for (k, _) in &pairs {
        if k != "channel" && k != "lastEventId" {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter {k:?}: expected channel or lastEventId"
            )));
        }
    }
    let channels = channel_list(
        pairs
            .iter()
            .filter(|(k, _)| k == "channel")
            .map(|(_, v)| v.as_str()),
    )?;
    // Register before the 101 so nothing published after it is missed.
    let Registered {
        client,
        outbox,
        subs,
    } = register(&state, &channels, &resume_from(&headers, query.as_deref()))?;
    let tasks = state.tasks.clone();
    Ok(ws
        // tungstenite allocates its read buffer up front (128 KiB by
        // default); client frames are small, so an idle socket keeps 512 bytes.
        .read_buffer_size(512)
        // Queued frames are fed and flushed together; writes start once
        // this much is buffered or on flush.
        .write_buffer_size(16 * 1024)
        .max_message_size(MAX_WS_CLIENT_MESSAGE_BYTES)
        .max_frame_size(MAX_WS_CLIENT_MESSAGE_BYTES)
        .on_upgrade(move |socket| {
            let conn = Conn {
                state,
                client,
                outbox,
                subs,
            };
            tasks.track_future(conn.run(socket, channels))
        }))
}

/// A WebSocket subscriber registered on its initial channels.
pub(super) struct Registered {
    pub(super) client: ClientId,
    pub(super) outbox: Arc<Outbox>,
    pub(super) subs: HashMap<ChannelName, Subscription>,
}

/// Registers a new WebSocket subscriber on `channels`, queueing what
/// `resume` asks for. Shared by the hyper WebSocket and the direct one.
pub(super) fn register(
    state: &AppState,
    channels: &[ChannelName],
    resume: &Resume,
) -> Result<Registered, ApiError> {
    state.check_not_draining()?;
    let client = ClientId::generate();
    let outbox = state.hub.outbox();
    let mut subs = HashMap::new();
    for c in channels {
        subs.insert(c.clone(), state.hub.subscribe(c, &client, &outbox, resume)?);
    }
    Ok(Registered {
        client,
        outbox,
        subs,
    })
}

struct Conn {
    state: AppState,
    client: ClientId,
    outbox: Arc<Outbox>,
    subs: HashMap<ChannelName, Subscription>,
}

/// A message from the client.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum ClientMessage {
    Subscribe {
        channel: String,
        #[serde(rename = "lastEventId")]
        last_event_id: Option<String>,
    },
    Unsubscribe {
        channel: String,
    },
    /// The crane UI's request: a namespace's Events as an `EventList`.
    /// The UI also sent the user's token in-band; it is accepted and
    /// ignored (never logged): herald answers from the Events it already
    /// watches, with its own credentials, and only for namespaces it was
    /// told to publish.
    #[serde(rename = "GET_EVENTS")]
    GetEvents {
        namespace: Option<String>,
        #[serde(default)]
        #[allow(dead_code)]
        token: Option<serde::de::IgnoredAny>,
    },
}

/// How the connection ends.
enum End {
    Close(u16, &'static str),
    /// The client closed: send the reply tungstenite queued.
    Reply,
    Drop,
}

impl Conn {
    async fn run(mut self, mut socket: WebSocket, initial: Vec<ChannelName>) {
        let _guard = self.state.hub.connection();
        let mut ok = true;
        for c in &initial {
            ok &= socket.feed(subscribed(c)).await.is_ok();
        }
        drop(initial);
        if !ok || socket.flush().await.is_err() {
            return;
        }
        // Pings ride the shared ticker: no timer per connection.
        let mut ticks = self.state.ticker();
        let mut heard_since_ping = true;
        let end = loop {
            tokio::select! {
                biased;
                () = self.state.shutdown.cancelled() => break End::Close(close_code::RESTART, "herald is restarting; reconnect"),
                batch = self.outbox.next_batch() => match batch {
                    Batch::Closed(_) => break End::Close(CLOSE_SLOW, "slow consumer: too far behind"),
                    Batch::Items(items) => {
                        let mut ok = true;
                        for item in items {
                            if let Some(m) = self.frame(item) {
                                ok &= socket.feed(m).await.is_ok();
                            }
                        }
                        if !ok || socket.flush().await.is_err() {
                            break End::Drop;
                        }
                    }
                },
                msg = socket.recv() => {
                    heard_since_ping = true;
                    match msg {
                        None => break End::Drop,
                        Some(Err(e)) => break read_error(&e),
                        Some(Ok(Message::Text(text))) => {
                            let replies = self.handle(&text);
                            let mut ok = true;
                            for r in replies {
                                ok &= socket.feed(r).await.is_ok();
                            }
                            if !ok || socket.flush().await.is_err() {
                                break End::Drop;
                            }
                        }
                        Some(Ok(Message::Binary(_))) => break End::Close(close_code::UNSUPPORTED, "binary frames are not supported"),
                        // tungstenite has queued the reply (the client's
                        // code echoed, or 1002 for one that may not be
                        // sent): flush it.
                        Some(Ok(Message::Close(_))) => break End::Reply,
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    }
                }
                r = ticks.changed() => {
                    if r.is_err() {
                        break End::Drop;
                    }
                    if !heard_since_ping {
                        break End::Close(close_code::AWAY, "no answer to ping");
                    }
                    heard_since_ping = false;
                    if socket.send(Message::Ping(bytes::Bytes::new())).await.is_err() {
                        break End::Drop;
                    }
                }
            }
        };
        if let End::Reply = end {
            let _ = tokio::time::timeout(self.state.config.write_timeout, socket.flush()).await;
            return;
        }
        if let End::Close(code, reason) = end {
            let frame = CloseFrame {
                code,
                reason: Utf8Bytes::from_static(reason),
            };
            let sent = tokio::time::timeout(
                self.state.config.write_timeout,
                socket.send(Message::Close(Some(frame))),
            )
            .await;
            if matches!(sent, Ok(Ok(()))) {
                // Read until the client's close (bounded): dropping a
                // socket with unread bytes resets it, and the reset can
                // destroy our close frame before the client reads it.
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
                    while let Some(Ok(_)) = socket.recv().await {}
                })
                .await;
            }
        }
    }

    /// The frame for a queued item; `None` for a channel unsubscribed since.
    fn frame(&self, item: Item) -> Option<Message> {
        match item {
            Item::Event(e) => {
                if !self.subs.contains_key(&e.channel) {
                    return None;
                }
                Utf8Bytes::try_from(e.ws().clone()).ok().map(Message::Text)
            }
            Item::Reset(r) => Utf8Bytes::try_from(r.ws()).ok().map(Message::Text),
        }
    }

    /// Answers one client message; errors become error frames.
    fn handle(&mut self, text: &str) -> Vec<Message> {
        handle(
            &self.state,
            &self.client,
            &self.outbox,
            &mut self.subs,
            text,
        )
        .iter()
        .map(json_frame)
        .collect()
    }
}

/// Answers one client message (`subscribe` / `unsubscribe`) with the JSON
/// replies to send; errors become `{"type":"error"}` replies. Shared by the
/// hyper WebSocket and the direct one.
pub(super) fn handle(
    state: &AppState,
    client: &ClientId,
    outbox: &Arc<Outbox>,
    subs: &mut HashMap<ChannelName, Subscription>,
    text: &str,
) -> Vec<serde_json::Value> {
    {
        let msg = match serde_json::from_str::<ClientMessage>(text) {
            Ok(m) => m,
            Err(e) => return vec![error_json(&format!("invalid message: {e}"))],
        };
        match msg {
            ClientMessage::Subscribe {
                channel,
                last_event_id,
            } => {
                let channel = match ChannelName::parse(&channel) {
                    Ok(c) => c,
                    Err(e) => return vec![error_json(&e.to_string())],
                };
                if subs.contains_key(&channel) {
                    return vec![error_json(&format!("already subscribed to {channel}"))];
                }
                if subs.len() >= MAX_CHANNELS_PER_CONNECTION {
                    return vec![error_json(&format!(
                        "too many channels: at most {MAX_CHANNELS_PER_CONNECTION} per connection"
                    ))];
                }
                let resume = Resume::parse(last_event_id.as_deref());
                match state.hub.subscribe(&channel, client, outbox, &resume) {
                    Ok(s) => {
                        subs.insert(channel.clone(), s);
                        vec![subscribed_json(&channel)]
                    }
                    Err(e) => vec![error_json(&e.to_string())],
                }
            }
            ClientMessage::Unsubscribe { channel } => {
                let found = ChannelName::parse(&channel)
                    .ok()
                    .and_then(|c| subs.remove(&c).map(|_| c));
                match found {
                    Some(c) => {
                        vec![serde_json::json!({"type": "unsubscribed", "channel": c.as_str()})]
                    }
                    None => vec![error_json(&format!("not subscribed to {channel:?}"))],
                }
            }
            ClientMessage::GetEvents { namespace, .. } => vec![get_events(state, namespace)],
        }
    }
}

/// `{"type":"GET_EVENTS","data":<EventList>}`, or an error naming what
/// to do.
fn get_events(state: &AppState, namespace: Option<String>) -> serde_json::Value {
    let Some(sources) = &state.sources else {
        return error_json(
            "herald watches no Kubernetes Events; start it with --watch-events NAMESPACE",
        );
    };
    let Some(namespace) = namespace.filter(|n| !n.is_empty()) else {
        return error_json(
            "GET_EVENTS needs a namespace: {\"type\":\"GET_EVENTS\",\"namespace\":\"NS\"}",
        );
    };
    match sources.event_list(&namespace) {
        Ok(list) => serde_json::json!({"type": "GET_EVENTS", "data": list}),
        Err(e) => error_json(&e.to_string()),
    }
}

/// The close to send for a read error: the code the direct path sends for
/// the same fault (a protocol error is answered, never a bare TCP close).
fn read_error(e: &axum::Error) -> End {
    use std::error::Error as _;
    use tungstenite::Error as E;
    let mut source = e.source();
    while let Some(s) = source {
        match s.downcast_ref::<tungstenite::Error>() {
            // RFC 6455 5.2: a 64-bit length has its top bit clear; one
            // that does not is a broken frame, not a big message.
            Some(E::Capacity(tungstenite::error::CapacityError::MessageTooLong {
                size, ..
            })) if *size as u64 >> 63 != 0 => {
                return End::Close(
                    close_code::PROTOCOL,
                    "a 64-bit length must have its top bit clear",
                );
            }
            Some(E::Capacity(_)) => return End::Close(close_code::SIZE, "message too big"),
            Some(E::Utf8(_)) => return End::Close(close_code::INVALID, "text is not UTF-8"),
            Some(E::Protocol(_)) => return End::Close(close_code::PROTOCOL, "protocol error"),
            _ => {}
        }
        source = s.source();
    }
    End::Drop
}

fn subscribed(c: &ChannelName) -> Message {
    json_frame(&subscribed_json(c))
}

/// `{"type":"subscribed","channel":C}`.
pub(super) fn subscribed_json(c: &ChannelName) -> serde_json::Value {
    serde_json::json!({"type": "subscribed", "channel": c.as_str()})
}

/// `{"type":"error","error":MSG}`.
pub(super) fn error_json(msg: &str) -> serde_json::Value {
    serde_json::json!({"type": "error", "error": msg})
}

fn json_frame(v: &serde_json::Value) -> Message {
    Message::Text(Utf8Bytes::from(v.to_string()))
}
