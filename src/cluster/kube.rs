//! Peers from the Kubernetes API: the Ready endpoints of a Service (its
//! EndpointSlices) or the Ready pods a label selector matches, kept by a
//! kube-rs watch with bookmarks and backoff (never a LIST loop). A pod
//! that is not Ready, or terminating, is not a peer; it leaves the set as
//! soon as the watch says so.

use std::collections::BTreeSet;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What to watch.
#[derive(Debug, Clone)]
pub(super) enum Source {
    /// `--kube-service NAME`.
    Service(String),
    /// `--kube-selector SELECTOR`.
    Selector(String),
}

fn addr(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// The peers a Service's slices name: ready, not terminating endpoints,
/// on the port named `internal` (else the slice's first port, else
/// `default_port`).
pub(super) fn from_slices<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    default_port: u16,
) -> Vec<String> {
    let mut out = BTreeSet::new();
    for s in slices {
        let ports = s.ports.as_deref().unwrap_or_default();
        let port = ports
            .iter()
            .find(|p| p.name.as_deref() == Some("internal"))
            .or(ports.first())
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(default_port);
        for e in s.endpoints.as_deref().unwrap_or_default() {
            let c = e.conditions.as_ref();
            // A nil `ready` means ready (the API's rule).
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            if ready && !terminating {
                out.extend(e.addresses.iter().map(|a| addr(a, port)));
            }
        }
    }
    out.into_iter().collect()
}

/// The peers a selector's pods are: Ready, not terminating, with an IP.
pub(super) fn from_pods<'a>(pods: impl IntoIterator<Item = &'a Pod>, port: u16) -> Vec<String> {
    let mut out = BTreeSet::new();
    for p in pods {
        if p.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let Some(st) = &p.status else { continue };
        let ready = st
            .conditions
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        if let (true, Some(ip)) = (ready, st.pod_ip.as_deref().filter(|i| !i.is_empty())) {
            out.insert(addr(ip, port));
        }
    }
    out.into_iter().collect()
}

/// Watches `source` in `namespace`; sends the peer list after the first
/// list and after every change, until `stop`.
pub(super) async fn run(
    client: kube::Client,
    namespace: String,
    source: Source,
    port: u16,
    tx: watch::Sender<Option<Vec<String>>>,
    stop: CancellationToken,
) {
    match source {
        Source::Service(name) => {
            let cfg =
                watcher::Config::default().labels(&format!("kubernetes.io/service-name={name}"));
            let api: Api<EndpointSlice> = Api::namespaced(client, &namespace);
            follow(api, cfg, tx, stop, move |s: &Store<EndpointSlice>| {
                from_slices(s.state().iter().map(|a| &**a), port)
            })
            .await;
        }
        Source::Selector(sel) => {
            let cfg = watcher::Config::default().labels(&sel);
            let api: Api<Pod> = Api::namespaced(client, &namespace);
            follow(api, cfg, tx, stop, move |s: &Store<Pod>| {
                from_pods(s.state().iter().map(|a| &**a), port)
            })
            .await;
        }
    }
}

async fn follow<K: crate::k8s::Watched>(
    api: Api<K>,
    cfg: watcher::Config,
    tx: watch::Sender<Option<Vec<String>>>,
    stop: CancellationToken,
    peers: impl Fn(&Store<K>) -> Vec<String>,
) {
    let (store, events) = crate::k8s::reflected(api, cfg);
    let mut events = std::pin::pin!(events);
    loop {
        let ev = tokio::select! {
            () = stop.cancelled() => return,
            ev = events.next() => ev,
        };
        match ev {
            None => return,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "peer watch failed; retrying with backoff");
            }
            Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => {}
            Some(Ok(_)) => {
                // InitDone, Apply, Delete: the store is whole.
                let list = peers(&store);
                tx.send_if_modified(|cur| {
                    let changed = cur.as_ref() != Some(&list);
                    if changed {
                        *cur = Some(list);
                    }
                    changed
                });
            }
        }
    }
}

/// The pod's own namespace (in a cluster), if it can be read.
pub(super) fn own_namespace() -> Option<String> {
    std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn only_ready_endpoints_that_are_not_terminating_are_peers() {
        let s: EndpointSlice = serde_json::from_value(json!({
            "addressType": "IPv4", "metadata": {"name": "x"},
            "ports": [{"name": "public", "port": 8080}, {"name": "internal", "port": 7000}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": true, "terminating": true}},
                {"addresses": ["10.0.0.4"]},
                {"addresses": ["fd00::5"], "conditions": {"ready": true}},
            ],
        }))
        .unwrap();
        assert_eq!(
            from_slices([&s], 9),
            ["10.0.0.1:7000", "10.0.0.4:7000", "[fd00::5]:7000"]
        );
    }

    #[test]
    fn only_ready_pods_with_an_ip_are_peers() {
        let pod = |ip: &str, ready: &str, deleting: bool| -> Pod {
            let mut p: Pod = serde_json::from_value(json!({
                "metadata": {"name": ip},
                "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": ready}]},
            }))
            .unwrap();
            if deleting {
                p.metadata.deletion_timestamp =
                    Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                        jiff::Timestamp::UNIX_EPOCH,
                    ));
            }
            p
        };
        let pods = [
            pod("10.1.0.1", "True", false),
            pod("10.1.0.2", "False", false),
            pod("10.1.0.3", "True", true),
            pod("", "True", false),
        ];
        assert_eq!(from_pods(&pods, 7000), ["10.1.0.1:7000"]);
    }
}
