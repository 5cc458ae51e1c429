//! Operations endpoints: liveness, readiness, status.

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;

use super::{ApiError, State as AppState};
use crate::hub::StatusQuery;

pub(super) async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Why the node is not ready (`status`, `waiting_for`), or `None`: the
/// one verdict `/readyz` and `/status` both give.
fn not_ready(state: &AppState) -> Option<(&'static str, Option<&'static str>)> {
    if state.draining.is_cancelled() || state.shutdown.is_cancelled() {
        Some(("draining", None))
    } else if state.cluster.as_ref().is_some_and(|c| !c.ready()) {
        Some(("joining", Some("the backfill from peers")))
    } else if state.backplane.as_ref().is_some_and(|b| !b.ready()) {
        Some(("joining", Some("the snapshot from the backplane")))
    } else if state.sources.as_ref().is_some_and(|s| !s.synced()) {
        Some(("syncing", Some("the Kubernetes watchers' first list")))
    } else {
        None
    }
}

pub(super) async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if let Some((status, waiting_for)) = not_ready(&state) {
        let mut body = serde_json::json!({ "status": status });
        if let Some(w) = waiting_for {
            body["waiting_for"] = w.into();
        }
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body));
    }
    let mut body = serde_json::json!({ "status": "ready" });
    // A backplane outage does not make the node unready: it still serves
    // its subscribers, and an unready verdict on every replica at once
    // would leave the Service with no endpoint at all. It is reported, and
    // publishes answer 503 until the backplane is back.
    if let Some(b) = &state.backplane {
        body["backplane"] = if b.up() { "connected" } else { "unavailable" }.into();
        if !b.up() {
            body["publishing"] = "refused".into();
        }
    }
    (StatusCode::OK, Json(body))
}

/// Most channels one `/status` answer lists.
const MAX_STATUS_CHANNELS: usize = 1000;

/// `?prefix=P&channels=N`: which channels `/status` lists.
fn status_query(query: Option<&str>) -> Result<StatusQuery, ApiError> {
    let mut q = StatusQuery::default();
    for (k, v) in super::query_pairs(query) {
        match k.as_str() {
            "prefix" => q.prefix = v,
            "channels" => {
                q.limit = v
                    .parse()
                    .ok()
                    .filter(|n| *n <= MAX_STATUS_CHANNELS)
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "channels={v:?}: expected a number from 0 to {MAX_STATUS_CHANNELS}"
                        ))
                    })?;
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {other:?}: expected prefix or channels"
                )));
            }
        }
    }
    Ok(q)
}

pub(super) async fn status(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<impl IntoResponse, ApiError> {
    let q = status_query(query.as_deref())?;
    let hub = state.hub.status(&q);
    Ok(Json(serde_json::json!({
        "node": state.config.node_name,
        "version": env!("CARGO_PKG_VERSION"),
        "ready": not_ready(&state).is_none(),
        "cluster": state
            .cluster
            .as_ref()
            .map(|c| c.status())
            .or_else(|| state.backplane.as_ref().map(|b| b.status())),
        "kubernetes": state.sources.as_ref().map(|s| serde_json::json!({ "synced": s.synced() })),
        "connections": hub.connections,
        "admission": state.admission.status(),
        "slow_consumers_disconnected": hub.slow_consumers_disconnected,
        "events_published": hub.events_published,
        "channel_count": hub.channel_count,
        "channels_matching": hub.channels_matching,
        "channels": hub.channels,
    })))
}
