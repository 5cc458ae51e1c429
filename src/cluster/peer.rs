//! One peer link: reads the peer's stream of its own events and applies
//! them, reconnecting with backoff and resuming from this node's position.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::Node;
use super::internal::{self, Line};
use crate::hub::EventId;

/// A link to one peer.
#[derive(Debug)]
pub(super) struct Link {
    addr: String,
    stop: CancellationToken,
    inner: Mutex<State>,
    applied: AtomicU64,
    /// True once the first attempt has caught up, or failed.
    settled: AtomicBool,
}

#[derive(Debug, Default)]
struct State {
    node: Option<String>,
    state: &'static str,
    error: Option<String>,
    /// The peer's newest id (from ticks) and the newest applied, in µs.
    peer_last: u64,
    applied_last: u64,
}

impl Link {
    pub(super) fn new(addr: String, stop: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            addr,
            stop,
            inner: Mutex::new(State {
                state: "connecting",
                ..State::default()
            }),
            applied: AtomicU64::new(0),
            settled: AtomicBool::new(false),
        })
    }

    pub(super) fn addr(&self) -> &str {
        &self.addr
    }

    pub(super) fn stop(&self) {
        self.stop.cancel();
    }

    pub(super) fn settled(&self) -> bool {
        self.settled.load(Ordering::Acquire)
    }

    pub(super) fn is_self(&self) -> bool {
        self.inner.lock().state == "self"
    }

    /// The address turned out to be this node's own listener (its snapshot
    /// said so): the link stops following it.
    pub(super) fn mark_self(&self) {
        self.set("self", None);
        self.settled.store(true, Ordering::Release);
        self.stop.cancel();
    }

    pub(super) fn status(&self) -> super::PeerStatus {
        let s = self.inner.lock();
        super::PeerStatus {
            addr: self.addr.clone(),
            node: s.node.clone(),
            state: s.state,
            lag_ms: (s.peer_last > 0).then(|| s.peer_last.saturating_sub(s.applied_last) / 1000),
            applied: self.applied.load(Ordering::Relaxed),
            error: s.error.clone(),
        }
    }

    fn set(&self, state: &'static str, error: Option<String>) {
        let mut s = self.inner.lock();
        s.state = state;
        s.error = error;
    }

    pub(super) async fn run(self: Arc<Self>, node: Arc<Node>) {
        let mut failures: u32 = 0;
        loop {
            let ended = tokio::select! {
                () = self.stop.cancelled() => return,
                r = self.follow(&node) => r,
            };
            self.settled.store(true, Ordering::Release);
            match ended {
                Ok(Follow::IsSelf) => {
                    self.set("self", None);
                    return;
                }
                Ok(Follow::Ended) => failures = 0,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    self.set("retrying", Some(e));
                }
            }
            // A stream that ended cleanly is reopened at once (the first wait).
            let wait = crate::retry::delay(failures.max(1));
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One connection: streams until it ends or fails.
    async fn follow(&self, node: &Node) -> Result<Follow, String> {
        let last_error = self.inner.lock().error.clone();
        self.set("connecting", last_error);
        let from = node.hub.position().to_string();
        let resp = node
            .authorize(node.http.get(format!(
                "http://{}/internal/v1/stream?from={}",
                self.addr,
                form_urlencoded::byte_serialize(from.as_bytes()).collect::<String>()
            )))
            .send()
            .await
            .map_err(|e| format!("connect: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("status {}", resp.status()));
        }
        let mut body = resp.bytes_stream();
        let mut buf: Vec<u8> = vec![];
        let silence = node.options.peer_timeout;
        self.set("catching-up", None);
        loop {
            let chunk = match tokio::time::timeout(silence, body.next()).await {
                Err(_) => return Err(format!("silent for {silence:?}")),
                Ok(None) => return Ok(Follow::Ended),
                Ok(Some(Err(e))) => return Err(format!("read: {e}")),
                Ok(Some(Ok(c))) => c,
            };
            buf.extend_from_slice(&chunk);
            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                if let Some(f) = self.handle(node, &line) {
                    return Ok(f);
                }
            }
        }
    }

    fn handle(&self, node: &Node, line: &[u8]) -> Option<Follow> {
        if let Ok(t) = serde_json::from_slice::<Tick>(line) {
            if t.node == node.name() {
                // Our own listener (DNS, or a static list that names us).
                return Some(Follow::IsSelf);
            }
            let last = t.tick.parse::<EventId>().map_or(0, EventId::as_u64);
            let mut s = self.inner.lock();
            s.peer_last = last;
            s.node = Some(t.node);
            // Ticks follow every event sent before them: caught up.
            s.applied_last = s.applied_last.max(
                node.hub
                    .position()
                    .get(s.node.as_deref().unwrap_or_default())
                    .as_u64(),
            );
            if s.state != "live" {
                s.state = "live";
                drop(s);
                self.settled.store(true, Ordering::Release);
            }
            return None;
        }
        match serde_json::from_slice::<Line>(line) {
            Ok(l) => {
                if l.origin == node.name() {
                    // Our own stream (DNS or a static list naming us).
                    return Some(Follow::IsSelf);
                }
                {
                    let mut s = self.inner.lock();
                    if s.node.as_deref() != Some(l.origin.as_str()) {
                        s.node = Some(l.origin.clone());
                    }
                    s.applied_last = s
                        .applied_last
                        .max(l.id.parse::<EventId>().map_or(0, EventId::as_u64));
                }
                if internal::apply(&node.hub, node.name(), l) {
                    self.applied.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                tracing::warn!(peer = %self.addr, error = %e, "ignoring a malformed line from a peer")
            }
        }
        None
    }
}

#[derive(serde::Deserialize)]
struct Tick {
    tick: String,
    node: String,
}

enum Follow {
    Ended,
    IsSelf,
}
