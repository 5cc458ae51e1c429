//! `POST /channel[/{channel}[/client/{client}]]`: publishing.
//!
//! A JSON body (`Content-Type: application/json`) is an envelope
//! `{"data", "event"?, "id"?, "retry"?, "retain"?}`; any other body is the
//! data itself as UTF-8 text, with `event`, `id`, `retry` and `retain` taken
//! from the query string.

use axum::Json;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode, header, request::Parts};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{ApiError, PathParams, Peer, State as AppState, query_pairs};
use crate::hub::{ChannelName, ClientId, Data, EventName, Publish, compact_json};

/// Longest idempotency key accepted.
const MAX_KEY_LEN: usize = 256;

type Accepted = (StatusCode, Json<serde_json::Value>);

pub(super) async fn channel(
    State(state): State<AppState>,
    PathParams(channel): PathParams<String>,
    req: Request,
) -> Result<Accepted, ApiError> {
    let channel = ChannelName::parse(&channel).map_err(ApiError::bad_request)?;
    let p = read(&state, req).await?;
    admit(&state)?;
    state.hub.admit(&channel)?;
    let published = state.hub.publish(&channel, p);
    if !published.duplicate {
        confirm(&state, published.id).await?;
    }
    let mut body = serde_json::json!({ "id": published.text() });
    if published.duplicate {
        body["duplicate"] = true.into();
    }
    Ok((StatusCode::ACCEPTED, Json(body)))
}

pub(super) async fn client(
    State(state): State<AppState>,
    PathParams((channel, client)): PathParams<(String, String)>,
    req: Request,
) -> Result<Accepted, ApiError> {
    let channel = ChannelName::parse(&channel).map_err(ApiError::bad_request)?;
    let client = ClientId::parse(&client).map_err(ApiError::bad_request)?;
    let p = read(&state, req).await?;
    if p.retain {
        return Err(ApiError::bad_request(
            "retain cannot be used when publishing to a single client",
        ));
    }
    if p.key.is_some() {
        return Err(ApiError::bad_request(
            "an idempotency id cannot be used when publishing to a single client",
        ));
    }
    match state.hub.publish_to_client(&channel, &client, p.clone()) {
        Ok(published) => Ok((
            StatusCode::ACCEPTED,
            Json(serde_json::json!({ "id": published.text() })),
        )),
        // In a cluster the client may be connected to another node.
        Err(e) => {
            let body = || crate::cluster::client_body(&channel, &client, &p);
            let forwarded = match (&state.cluster, &state.backplane) {
                (Some(c), _) => c.publish_to_client(body()).await,
                (None, Some(b)) => b
                    .publish_to_client(body())
                    .await
                    .map_err(ApiError::unavailable)?,
                (None, None) => false,
            };
            if forwarded {
                Ok((
                    StatusCode::ACCEPTED,
                    Json(serde_json::json!({ "forwarded": true })),
                ))
            } else {
                Err(e.into())
            }
        }
    }
}

pub(super) async fn all(State(state): State<AppState>, req: Request) -> Result<Accepted, ApiError> {
    let p = read(&state, req).await?;
    admit(&state)?;
    let everywhere = match (&state.cluster, &state.backplane) {
        (Some(c), _) => Some(c.channels_with_subscribers().await),
        (None, Some(b)) => Some(
            b.channels_with_subscribers()
                .await
                .map_err(ApiError::unavailable)?,
        ),
        (None, None) => None,
    };
    let out = match everywhere {
        // Every channel with subscribers on any node, published here once
        // and shared like any other event.
        Some(channels) => channels
            .iter()
            .filter_map(|n| ChannelName::parse(n).ok())
            .map(|ch| {
                let published = state.hub.publish(&ch, p.clone());
                (ch, published)
            })
            .collect(),
        None => state.hub.publish_all(&p),
    };
    if let Some(newest) = out
        .iter()
        .filter(|(_, p)| !p.duplicate)
        .map(|(_, p)| p.id)
        .max()
    {
        confirm(&state, newest).await?;
    }
    let ids: serde_json::Map<String, serde_json::Value> = out
        .iter()
        .map(|(c, p)| (c.to_string(), p.text().into()))
        .collect();
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "channels": out.len(), "ids": ids })),
    ))
}

/// With a backplane: refuses a publish while it is unreachable, so nothing
/// is applied that could not be shared.
fn admit(state: &AppState) -> Result<(), ApiError> {
    match &state.backplane {
        Some(b) => b.admit().map_err(ApiError::unavailable),
        None => Ok(()),
    }
}

/// With a backplane: waits until it has stored the event, so a 202 means
/// no node's failure can lose it.
async fn confirm(state: &AppState, id: crate::hub::EventId) -> Result<(), ApiError> {
    match &state.backplane {
        Some(b) => b.confirm(id).await.map_err(ApiError::unavailable),
        None => Ok(()),
    }
}

/// Authorizes, reads and validates a publish request.
async fn read(state: &AppState, req: Request) -> Result<Publish, ApiError> {
    let (parts, body) = req.into_parts();
    authorize(state, &parts)?;
    let limit = state.config.max_message_bytes;
    let bytes = read_body(
        &parts.headers,
        body,
        limit,
        state.config.limits.body_timeout,
    )
    .await?;
    parse_publish(is_json(&parts.headers), &bytes, parts.uri.query())
}

/// A publish from its body (JSON envelope or text) and query string: the
/// pure part of [`read`], which the fuzz target drives.
pub(crate) fn parse_publish(
    json: bool,
    bytes: &[u8],
    query: Option<&str>,
) -> Result<Publish, ApiError> {
    let query = Query::parse(query)?;
    if json {
        let env: Envelope = serde_json::from_slice(bytes)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
        let data = if env.data.get() == "null" {
            return Err(ApiError::bad_request("data must not be null"));
        } else if env.data.get().starts_with('"') {
            let s: String = serde_json::from_str(env.data.get())
                .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
            Data::Text(s)
        } else {
            Data::Json(compact_json(env.data.get()))
        };
        build(
            data,
            env.event.or(query.event),
            env.id.or(query.id),
            env.retry.or(query.retry),
            env.retain.or(query.retain).unwrap_or(false),
        )
    } else {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| ApiError::bad_request("the body is not valid UTF-8 text"))?
            .to_owned();
        build(
            Data::Text(text),
            query.event,
            query.id,
            query.retry,
            query.retain.unwrap_or(false),
        )
    }
}

fn build(
    data: Data,
    event: Option<String>,
    key: Option<String>,
    retry: Option<u64>,
    retain: bool,
) -> Result<Publish, ApiError> {
    if data.is_empty() {
        return Err(ApiError::bad_request(
            "you cannot send the empty string as a message",
        ));
    }
    let event = event
        .map(|e| EventName::parse(&e))
        .transpose()
        .map_err(ApiError::bad_request)?;
    if let Some(k) = &key
        && (k.is_empty() || k.len() > MAX_KEY_LEN || k.chars().any(char::is_control))
    {
        return Err(ApiError::bad_request(format!(
            "invalid id: an idempotency key is 1 to {MAX_KEY_LEN} bytes without control characters"
        )));
    }
    Ok(Publish {
        data,
        event,
        key,
        retry,
        retain,
    })
}

/// The JSON envelope. Unknown fields are refused by name.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    data: Box<RawValue>,
    event: Option<String>,
    id: Option<String>,
    retry: Option<u64>,
    retain: Option<bool>,
}

#[derive(Debug, Default)]
struct Query {
    event: Option<String>,
    id: Option<String>,
    retry: Option<u64>,
    retain: Option<bool>,
}

impl Query {
    fn parse(q: Option<&str>) -> Result<Self, ApiError> {
        let mut out = Self::default();
        for (k, v) in query_pairs(q) {
            match k.as_str() {
                "event" => out.event = Some(v),
                "id" => out.id = Some(v),
                "retry" => {
                    out.retry = Some(v.parse().map_err(|_| {
                        ApiError::bad_request(format!(
                            "invalid query parameter retry={v:?}: milliseconds expected"
                        ))
                    })?);
                }
                "retain" => {
                    // Exactly these: a typo must not publish a retained
                    // value (or fail to) silently.
                    out.retain = Some(match v.as_str() {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        _ => {
                            return Err(ApiError::bad_request(format!(
                                "invalid query parameter retain={v:?}: expected true or false (or 1 or 0)"
                            )));
                        }
                    });
                }
                other => {
                    return Err(ApiError::bad_request(format!(
                        "unknown query parameter {other:?}: expected event, id, retry or retain"
                    )));
                }
            }
        }
        Ok(out)
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    within: std::time::Duration,
) -> Result<bytes::Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the message is larger than the limit of {limit} bytes (--max-message-bytes)"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let read = tokio::time::timeout(within, axum::body::to_bytes(body, limit)).await;
    let Ok(read) = read else {
        return Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the body did not arrive within {} (--body-timeout)",
                humantime::format_duration(within)
            ),
        ));
    };
    read.map_err(|e| {
        if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
            || e.to_string().contains("length limit")
        {
            too_large()
        } else {
            ApiError::bad_request(format!("could not read the body: {e}"))
        }
    })
}

/// Publishing needs the token if one is set; without one, only loopback
/// clients may publish unless anonymous publishing is allowed.
fn authorize(state: &AppState, parts: &Parts) -> Result<(), ApiError> {
    if let Some(token) = &state.config.publish_token {
        let given = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        return match given {
            Some(g) if constant_time_eq(g.as_bytes(), token.expose().as_bytes()) => Ok(()),
            Some(_) => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "the bearer token does not match --publish-token",
            )),
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "publishing needs the header Authorization: Bearer <token> (the hub's --publish-token)",
            )),
        };
    }
    if state.config.allow_anonymous_publish {
        return Ok(());
    }
    let peer = parts.extensions.get::<ConnectInfo<Peer>>().map(|c| c.0.0);
    match peer {
        Some(addr) if addr.ip().is_loopback() || is_mapped_loopback(addr.ip()) => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "publishing from outside loopback needs a token: start herald with --publish-token TOKEN \
             (HERALD_PUBLISH_TOKEN) and send Authorization: Bearer TOKEN, or allow anyone with \
             --allow-anonymous-publish",
        )),
    }
}

fn is_mapped_loopback(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
        std::net::IpAddr::V4(_) => false,
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
