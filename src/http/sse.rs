//! Server-Sent Events: `GET /channel/{c}`, `/channel/{c}/client/{id}` and
//! `/events?stream=a&stream=b`.
//!
//! The subscription is registered (and any replay queued) before the
//! handler returns, and the body opens with a `retry:` field that is ready
//! at once, so the 200 and headers reach the client immediately: once a
//! client has them, every later publish reaches it. The stream ends by
//! itself on shutdown and when the connection's outbox overflows.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::{ApiError, PathParams, State as AppState, channel_list, query_pairs};
use crate::hub::{
    Batch, ChannelName, ClientId, ConnectionGuard, Item, Outbox, Resume, Subscription,
};

/// The heartbeat: a comment line on every tick of the shared ticker
/// (every `--heartbeat`, busy or idle: a proxy or client that times out
/// silence sees bytes at that interval). No blank line after it, so no
/// parser dispatches an empty event for it.
pub(super) const HEARTBEAT: &[u8] = b": ping\n";

pub(super) async fn channel(
    State(state): State<AppState>,
    PathParams(channel): PathParams<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let channels = channel_list(std::iter::once(channel.as_str()))?;
    let format = Format::from_query(query.as_deref())?;
    open(&state, channels, None, &headers, query.as_deref(), format)
}

pub(super) async fn channel_client(
    State(state): State<AppState>,
    PathParams((channel, client)): PathParams<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let channels = channel_list(std::iter::once(channel.as_str()))?;
    let client = ClientId::parse(&client).map_err(ApiError::bad_request)?;
    let format = Format::from_query(query.as_deref())?;
    open(
        &state,
        channels,
        Some(client),
        &headers,
        query.as_deref(),
        format,
    )
}

pub(super) async fn events(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let pairs = query_pairs(query.as_deref());
    let names = pairs
        .iter()
        .filter(|(k, _)| k == "stream")
        .map(|(_, v)| v.as_str());
    let channels = channel_list(names)?;
    if channels.is_empty() {
        return Err(ApiError::bad_request(
            "a stream name is required as part of the query parameters",
        ));
    }
    let format = Format::from_query(query.as_deref())?;
    open(&state, channels, None, &headers, query.as_deref(), format)
}

/// `Last-Event-ID` header, else the `lastEventId` query parameter.
pub(super) fn resume_from(headers: &HeaderMap, query: Option<&str>) -> Resume {
    let header = headers
        .get("last-event-id")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    resume(header, query)
}

/// Where a subscriber starts: the `Last-Event-ID` header if it sent a
/// non-empty one, else the first `lastEventId` query parameter (an
/// `EventSource` cannot set headers on its first connect, nor can a
/// browser WebSocket). An empty header is no header: some proxies and
/// clients send `Last-Event-ID:` with nothing after it. A repeated header
/// never gets here (400, see `http::SINGLE_HEADERS`).
pub(super) fn resume(header: Option<String>, query: Option<&str>) -> Resume {
    let param = || {
        query_pairs(query)
            .into_iter()
            .find(|(k, _)| k == "lastEventId")
            .map(|(_, v)| v)
    };
    let header = header.filter(|h| !h.trim().is_empty());
    Resume::parse(header.or_else(param).as_deref())
}

/// A registered SSE subscriber, before it is attached to a transport.
pub(super) struct Session {
    pub(super) client: ClientId,
    pub(super) outbox: Arc<Outbox>,
    pub(super) subs: Vec<Subscription>,
    pub(super) guard: ConnectionGuard,
}

/// Validates nothing further: registers `client` (or a generated id) on
/// every channel, queueing what `resume` asks for.
pub(super) fn register(
    state: &AppState,
    channels: &[ChannelName],
    client: Option<ClientId>,
    resume: &Resume,
) -> Result<Session, ApiError> {
    state.check_not_draining()?;
    let client = client.unwrap_or_else(ClientId::generate);
    let outbox = state.hub.outbox();
    let subs = channels
        .iter()
        .map(|c| state.hub.subscribe(c, &client, &outbox, resume))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Session {
        client,
        outbox,
        subs,
        guard: state.hub.connection(),
    })
}

/// The `retry:` field that opens every stream. It ends with one line
/// break, not a blank line: a parser applies `retry:` as it reads the
/// line, and a blank line would dispatch an empty event in the parsers
/// that do not follow the rule that an event without data is not
/// dispatched (`@microsoft/fetch-event-source`, `httpx-sse`).
pub(super) fn prelude(state: &AppState) -> Bytes {
    Bytes::from(format!("retry: {}\n", state.config.sse_retry.as_millis()))
}

fn open(
    state: &AppState,
    channels: Vec<ChannelName>,
    client: Option<ClientId>,
    headers: &HeaderMap,
    query: Option<&str>,
    format: Format,
) -> Result<Response, ApiError> {
    let session = register(state, &channels, client, &resume_from(headers, query))?;
    let client = session.client.clone();
    let conn = Conn {
        prelude: Some(prelude(state)),
        outbox: session.outbox,
        _subs: session.subs,
        _guard: session.guard,
        shutdown: state.shutdown.clone(),
        ticks: state.ticker(),
        format,
    };
    let body = Body::from_stream(futures_util::stream::unfold(conn, Conn::next));
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    if let Ok(v) = HeaderValue::from_str(client.as_str()) {
        h.insert("herald-client-id", v);
    }
    Ok(resp)
}

/// One SSE connection's state, owned by its body stream.
struct Conn {
    prelude: Option<Bytes>,
    outbox: Arc<Outbox>,
    _subs: Vec<Subscription>,
    _guard: ConnectionGuard,
    shutdown: CancellationToken,
    /// The shared heartbeat (no timer per stream).
    ticks: tokio::sync::watch::Receiver<u64>,
    format: Format,
}

impl Conn {
    /// The next chunk: everything queued, coalesced; or a heartbeat on a
    /// tick of the shared ticker; or the end (shutdown, too slow).
    async fn next(mut self) -> Option<(Result<Bytes, Infallible>, Self)> {
        if let Some(p) = self.prelude.take() {
            return Some((Ok(p), self));
        }
        let chunk = tokio::select! {
            biased;
            () = self.shutdown.cancelled() => return None,
            batch = self.outbox.next_batch() => match batch {
                Batch::Items(items) => encode(items, self.format),
                Batch::Closed(_) => return None,
            },
            r = self.ticks.changed() => match r {
                Ok(()) => Bytes::from_static(HEARTBEAT),
                Err(_) => return None,
            },
        };
        Some((Ok(chunk), self))
    }
}

/// How a stream frames its events' data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum Format {
    /// The data as published.
    #[default]
    Plain,
    /// `{"channel":C,"data":D}` (`envelope=json`): the channel of each event
    /// of a multi-channel stream, readable by a plain `EventSource`.
    Envelope,
}

impl Format {
    /// Reads `envelope=` from a query: absent is plain, `json` the
    /// envelope, anything else an error.
    pub(super) fn from_query(query: Option<&str>) -> Result<Self, ApiError> {
        match query_pairs(query)
            .into_iter()
            .find(|(k, _)| k == "envelope")
            .map(|(_, v)| v)
            .as_deref()
        {
            None => Ok(Self::Plain),
            Some("json") => Ok(Self::Envelope),
            Some(other) => Err(ApiError::bad_request(format!(
                "envelope: expected json (envelope=json), got {other:?}"
            ))),
        }
    }
}

/// The SSE frames of a batch, written together.
pub(super) fn encode(items: VecDeque<Item>, format: Format) -> Bytes {
    super::join(items.iter().map(|item| match (item, format) {
        (Item::Event(e), Format::Plain) => e.sse().clone(),
        (Item::Event(e), Format::Envelope) => e.sse_envelope().clone(),
        (Item::Reset(r), _) => r.sse(),
    }))
}
