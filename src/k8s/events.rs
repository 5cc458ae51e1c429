//! Cluster Events: each new or updated Event is published, as compact JSON,
//! to `k8s.events:NAMESPACE`; a store keeps the current ones for
//! `GET_EVENTS`.
//!
//! Events that existed before herald started are not news and are not
//! published. After a re-list (a watch that expired, an API server that
//! was away), only Events whose `resourceVersion` changed in the gap are.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Event;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use parking_lot::Mutex;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{EventScope, Synced, events_channel};
use crate::hub::{ChannelName, Data, EventName, Hub, Publish};

/// What one watch needs.
pub(super) struct Watch {
    pub(super) client: kube::Client,
    pub(super) scope: EventScope,
    pub(super) hub: Arc<Hub>,
    pub(super) store: Arc<Store>,
    pub(super) synced: Synced,
    pub(super) shutdown: CancellationToken,
}

/// The current Events of a scope, by (namespace, name).
#[derive(Debug, Default)]
pub(super) struct Store {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    synced: bool,
    events: HashMap<(String, String), Event>,
}

impl Store {
    /// A namespace's Events as an `EventList`, oldest first; `None` before
    /// the first list completed.
    pub(super) fn list(&self, namespace: &str) -> Option<serde_json::Value> {
        let inner = self.inner.lock();
        if !inner.synced {
            return None;
        }
        let mut items: Vec<&Event> = inner
            .events
            .iter()
            .filter(|((ns, _), _)| ns == namespace)
            .map(|(_, e)| e)
            .collect();
        items.sort_by_key(|e| (last_seen(e), e.metadata.name.clone()));
        Some(json!({
            "kind": "EventList",
            "apiVersion": "v1",
            "metadata": {},
            "items": items,
        }))
    }
}

fn key(e: &Event) -> (String, String) {
    (e.namespace().unwrap_or_default(), e.name_any())
}

fn last_seen(e: &Event) -> Option<jiff::Timestamp> {
    e.last_timestamp
        .as_ref()
        .map(|t| t.0)
        .or_else(|| {
            e.series
                .as_ref()
                .and_then(|s| s.last_observed_time.as_ref())
                .map(|t| t.0)
        })
        .or_else(|| e.event_time.as_ref().map(|t| t.0))
        .or_else(|| e.first_timestamp.as_ref().map(|t| t.0))
}

/// The compact form streamed to subscribers.
fn compact(e: &Event) -> serde_json::Value {
    let first = e
        .first_timestamp
        .as_ref()
        .map(|t| t.0)
        .or_else(|| e.event_time.as_ref().map(|t| t.0));
    let count = e
        .count
        .or_else(|| e.series.as_ref().map(|s| s.count.unwrap_or(1)))
        .unwrap_or(1);
    let o = &e.involved_object;
    json!({
        "type": e.type_,
        "reason": e.reason,
        "message": e.message,
        "involvedObject": {"kind": o.kind, "namespace": o.namespace, "name": o.name},
        "count": count,
        "firstTimestamp": first.map(|t| t.to_string()),
        "lastTimestamp": last_seen(e).map(|t| t.to_string()),
    })
}

fn publish(hub: &Hub, e: &Event) {
    let ns = e.namespace().unwrap_or_default();
    let channel = match ChannelName::parse(&events_channel(&ns)) {
        Ok(c) => c,
        Err(err) => {
            tracing::warn!(namespace = %ns, error = %err, "cannot publish this namespace's Events");
            return;
        }
    };
    hub.publish(
        &channel,
        Publish {
            data: Data::Json(compact(e).to_string()),
            event: EventName::parse("k8s.event").ok(),
            // The same on every replica watching: one copy per change.
            key: e
                .metadata
                .uid
                .as_deref()
                .zip(e.metadata.resource_version.as_deref())
                .map(|(uid, rv)| format!("k8s.event:{uid}:{rv}")),
            retry: None,
            retain: false,
        },
    );
}

fn changed(old: Option<&Event>, new: &Event) -> bool {
    old.is_none_or(|o| o.metadata.resource_version != new.metadata.resource_version)
}

pub(super) async fn run(w: Watch) {
    let Watch {
        client,
        scope,
        hub,
        store,
        synced,
        shutdown,
    } = w;
    let api: Api<Event> = match &scope {
        EventScope::All => Api::all(client),
        EventScope::Namespace(ns) => Api::namespaced(client, ns),
    };
    let mut stream = std::pin::pin!(
        watcher(api, watcher::Config::default())
            .default_backoff()
            .modify(|e: &mut Event| e.managed_fields_mut().clear())
    );
    let mut synced = Some(synced);
    let mut relist: Option<HashMap<(String, String), Event>> = None;
    loop {
        let item = tokio::select! {
            () = shutdown.cancelled() => return,
            item = stream.next() => item,
        };
        let Some(item) = item else { return };
        let event = match item {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!(scope = ?scope, error = %e, "Kubernetes Event watch failed; retrying with backoff");
                continue;
            }
        };
        match event {
            watcher::Event::Init => relist = Some(HashMap::new()),
            watcher::Event::InitApply(e) => {
                if let Some(buf) = relist.as_mut() {
                    buf.insert(key(&e), e);
                }
            }
            watcher::Event::InitDone => {
                let fresh = relist.take().unwrap_or_default();
                let mut inner = store.inner.lock();
                if inner.synced {
                    for e in fresh.values() {
                        if changed(inner.events.get(&key(e)), e) {
                            publish(&hub, e);
                        }
                    }
                }
                inner.events = fresh;
                inner.synced = true;
                drop(inner);
                if let Some(s) = synced.take() {
                    tracing::info!(scope = ?scope, "Event watcher synced");
                    s.mark();
                }
            }
            watcher::Event::Apply(e) => {
                let mut inner = store.inner.lock();
                if changed(inner.events.get(&key(&e)), &e) {
                    publish(&hub, &e);
                }
                inner.events.insert(key(&e), e);
            }
            watcher::Event::Delete(e) => {
                store.inner.lock().events.remove(&key(&e));
            }
        }
    }
}
