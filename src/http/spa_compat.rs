//! spa-reloader's WebSocket, for its existing clients (`spa-reloader-vue`).
//!
//! Every path upgrades, as spa-reloader's did. Each Deployment version is
//! one bare JSON text frame, never several joined with newlines (which
//! made spa-reloader's own client fail to parse), and the current version
//! of every watched Deployment is sent right after connect (spa-reloader
//! sent nothing until the next rollout). Unlike spa-reloader, the
//! connection is read: pings are answered, a close is honoured, and a peer
//! that stops answering pings is dropped instead of lingering.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{FromRequestParts, Request, State};
use axum::response::{IntoResponse, Response};
use futures_util::SinkExt;
use tokio::net::TcpListener;

use super::{ApiError, State as AppState};
use crate::config::MAX_WS_CLIENT_MESSAGE_BYTES;

/// Serves the spa-reloader compatible WebSocket on `listener` until the
/// node shuts down.
pub async fn serve(listener: TcpListener, state: AppState) {
    let shutdown = state.shutdown.clone();
    let router = axum::Router::new().fallback(upgrade).with_state(state);
    // Small frames go out at once (as on the public listener).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    if let Err(e) = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "the spa-reloader compatible listener failed");
    }
}

async fn upgrade(State(state): State<AppState>, req: Request) -> Response {
    let (mut parts, _) = req.into_parts();
    let ws = match WebSocketUpgrade::from_request_parts(&mut parts, &state).await {
        Ok(ws) => ws,
        Err(e) => {
            return ApiError::new(
                axum::http::StatusCode::UPGRADE_REQUIRED,
                format!(
                    "this port serves spa-reloader's WebSocket (any path); connect with a WebSocket client: {e}"
                ),
            )
            .into_response();
        }
    };
    if let Err(e) = state.check_not_draining() {
        return e.into_response();
    }
    let Some(sources) = state.sources.clone() else {
        return ApiError::unavailable("no Deployment is watched").into_response();
    };
    let versions = sources.versions();
    let tasks = state.tasks.clone();
    ws.read_buffer_size(512)
        .max_message_size(MAX_WS_CLIENT_MESSAGE_BYTES)
        .max_frame_size(MAX_WS_CLIENT_MESSAGE_BYTES)
        .on_upgrade(move |socket| tasks.track_future(run(socket, state, versions)))
}

async fn run(
    mut socket: WebSocket,
    state: AppState,
    mut versions: tokio::sync::watch::Receiver<crate::k8s::Versions>,
) {
    let _guard = state.hub.connection();
    let mut ticks = state.ticker();
    let mut sent: BTreeMap<String, Arc<str>> = BTreeMap::new();
    let mut heard_since_ping = true;
    let timeout = state.config.write_timeout;
    loop {
        // What changed since the last round, one frame per Deployment.
        let current = versions.borrow_and_update().clone();
        let fresh: Vec<Arc<str>> = current
            .iter()
            .filter(|(ch, msg)| sent.get(*ch) != Some(*msg))
            .map(|(_, msg)| msg.clone())
            .collect();
        sent = current;
        if !fresh.is_empty() {
            let write = async {
                for m in fresh {
                    socket
                        .feed(Message::Text(Utf8Bytes::from(m.as_ref())))
                        .await?;
                }
                socket.flush().await
            };
            match tokio::time::timeout(timeout, write).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
        tokio::select! {
            biased;
            () = state.shutdown.cancelled() => break,
            // The watchers end only with the node.
            r = versions.changed() => if r.is_err() { break },
            msg = socket.recv() => {
                heard_since_ping = true;
                match msg {
                    None | Some(Err(_) | Ok(Message::Close(_))) => return,
                    // The protocol is send-only; anything the client says is ignored.
                    Some(Ok(_)) => {}
                }
            }
            r = ticks.changed() => {
                if r.is_err() {
                    break;
                }
                if !heard_since_ping {
                    close(&mut socket, timeout, "no answer to ping").await;
                    return;
                }
                heard_since_ping = false;
                if tokio::time::timeout(timeout, socket.send(Message::Ping(bytes::Bytes::new()))).await.is_err() {
                    return;
                }
            }
        }
    }
    close(&mut socket, timeout, "herald is restarting; reconnect").await;
}

/// Sends a close frame (1001, going away), within the write timeout.
async fn close(socket: &mut WebSocket, timeout: std::time::Duration, reason: &'static str) {
    let frame = CloseFrame {
        code: close_code::AWAY,
        reason: Utf8Bytes::from_static(reason),
    };
    let _ = tokio::time::timeout(timeout, socket.send(Message::Close(Some(frame)))).await;
}
