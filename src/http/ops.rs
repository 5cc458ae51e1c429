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
    } else if state.sources.as_ref().is_some_and(|s| !s.synced()) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                serde_json::json!({ "status": "syncing", "waiting_for": "the Kubernetes watchers' first list" }),
            ),
        )
    } else {
        (
            StatusCode::OK,
            Json(serde_json::json!({ "status": "ready" })),
        )
    }
}

pub(super) async fn status(State(state): State<AppState>) -> impl IntoResponse {
    let hub = state.hub.status();
    Json(serde_json::json!({
        "node": state.config.node_name,
        "version": env!("CARGO_PKG_VERSION"),
        "ready": !state.shutdown.is_cancelled()
            && state.sources.as_ref().is_none_or(|s| s.synced())
            && state.cluster.as_ref().is_none_or(|c| c.ready()),
        "cluster": state.cluster.as_ref().map(|c| c.status()),
        "kubernetes": state.sources.as_ref().map(|s| serde_json::json!({ "synced": s.synced() })),
        "connections": hub.connections,
        "slow_consumers_disconnected": hub.slow_consumers_disconnected,
        "events_published": hub.events_published,
        "channels": hub.channels,
    }))
}
