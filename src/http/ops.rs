//! Operations endpoints: liveness, readiness, status.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;

use super::State as AppState;

pub(super) async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({ "status": "ok" }))
}

pub(super) async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.shutdown.is_cancelled() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "draining" })),
        )
    } else if state.cluster.as_ref().is_some_and(|c| !c.ready()) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                serde_json::json!({ "status": "joining", "waiting_for": "the backfill from peers" }),
            ),
        )
    } else if state.backplane.as_ref().is_some_and(|b| !b.ready()) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                serde_json::json!({ "status": "joining", "waiting_for": "the snapshot from the backplane" }),
            ),
        )
    } else if state.sources.as_ref().is_some_and(|s| !s.synced()) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                serde_json::json!({ "status": "syncing", "waiting_for": "the Kubernetes watchers' first list" }),
            ),
        )
    } else {
        let mut body = serde_json::json!({ "status": "ready" });
        // A backplane outage does not make the node unready: it still
        // serves its subscribers, and an unready verdict on every replica
        // at once would leave the Service with no endpoint at all. It is
        // reported, and publishes answer 503 until the backplane is back.
        if let Some(b) = &state.backplane {
            body["backplane"] = if b.up() { "connected" } else { "unavailable" }.into();
            if !b.up() {
                body["publishing"] = "refused".into();
            }
        }
        (StatusCode::OK, Json(body))
    }
}

pub(super) async fn status(State(state): State<AppState>) -> impl IntoResponse {
    let hub = state.hub.status();
    Json(serde_json::json!({
        "node": state.config.node_name,
        "version": env!("CARGO_PKG_VERSION"),
        "ready": !state.shutdown.is_cancelled()
            && state.sources.as_ref().is_none_or(|s| s.synced())
            && state.cluster.as_ref().is_none_or(|c| c.ready())
            && state.backplane.as_ref().is_none_or(|b| b.ready()),
        "cluster": state
            .cluster
            .as_ref()
            .map(|c| c.status())
            .or_else(|| state.backplane.as_ref().map(|b| b.status())),
        "kubernetes": state.sources.as_ref().map(|s| serde_json::json!({ "synced": s.synced() })),
        "connections": hub.connections,
        "slow_consumers_disconnected": hub.slow_consumers_disconnected,
        "events_published": hub.events_published,
        "channels": hub.channels,
    }))
}
