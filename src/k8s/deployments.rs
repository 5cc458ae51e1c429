//! Deployment versions: one task per namespace keeps stores of the watched
//! Deployments, and of the namespace's ReplicaSets and Pods, and after each
//! change asks [`version::live`] what every Deployment runs. A version
//! different from the one last announced is published (retained) to
//! `k8s.deployment:NAMESPACE:NAME`.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::version::{self, AnnounceOn, Image, Version};
use super::{Deployments, Synced, Versions, deployment_channel, now_rfc3339};
use crate::hub::{ChannelName, Data, EventName, Hub, Publish};

/// What one namespace's task needs.
pub(super) struct Group {
    pub(super) client: kube::Client,
    pub(super) namespace: String,
    pub(super) targets: Vec<Deployments>,
    pub(super) hub: Arc<Hub>,
    pub(super) announce_on: AnnounceOn,
    pub(super) resync: Duration,
    pub(super) versions: tokio::sync::watch::Sender<Versions>,
    pub(super) synced: Synced,
    pub(super) shutdown: CancellationToken,
}

type Driver = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Watches `api` into a store; every change wakes `changed`.
fn reflect<K: super::Watched>(
    api: Api<K>,
    config: watcher::Config,
    changed: Arc<Notify>,
) -> (Store<K>, Driver) {
    let kind = K::kind(&()).into_owned();
    let (store, stream) = super::reflected(api, config);
    let driver = stream.for_each(move |event| {
        match event {
            Ok(_) => changed.notify_one(),
            Err(e) => {
                tracing::warn!(%kind, error = %e, "Kubernetes watch failed; retrying with backoff")
            }
        }
        std::future::ready(())
    });
    (store, Box::pin(driver))
}

pub(super) async fn run(group: Group) {
    let Group {
        client,
        namespace,
        targets,
        hub,
        announce_on,
        resync,
        versions,
        synced,
        shutdown,
    } = group;
    let changed = Arc::new(Notify::new());
    let mut drivers: Vec<Driver> = vec![];
    let mut deployments: Vec<Store<Deployment>> = vec![];
    for t in &targets {
        let config = match t {
            Deployments::Named { name, .. } => {
                watcher::Config::default().fields(&format!("metadata.name={name}"))
            }
            Deployments::All { .. } => watcher::Config::default(),
            Deployments::Selected { selector, .. } => watcher::Config::default().labels(selector),
        };
        let (store, driver) = reflect(
            Api::<Deployment>::namespaced(client.clone(), &namespace),
            config,
            changed.clone(),
        );
        deployments.push(store);
        drivers.push(driver);
    }
    let (replicasets, driver) = reflect(
        Api::<ReplicaSet>::namespaced(client.clone(), &namespace),
        watcher::Config::default(),
        changed.clone(),
    );
    drivers.push(driver);
    let (pods, driver) = reflect(
        Api::<Pod>::namespaced(client, &namespace),
        watcher::Config::default(),
        changed.clone(),
    );
    drivers.push(driver);
    let watching = futures_util::future::join_all(drivers);

    let evaluate = async {
        let ready = async {
            for s in &deployments {
                s.wait_until_ready().await.ok();
            }
            replicasets.wait_until_ready().await.ok();
            pods.wait_until_ready().await.ok();
        };
        ready.await;
        synced.mark();
        tracing::info!(%namespace, "Deployment watchers synced");
        let mut announcer = Announcer {
            namespace: &namespace,
            hub: &hub,
            versions: &versions,
            announced: HashMap::new(),
        };
        let mut tick = tokio::time::interval(resync);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            announcer.evaluate(&deployments, &replicasets, &pods, announce_on);
            tokio::select! {
                () = changed.notified() => {}
                _ = tick.tick() => {}
            }
        }
    };
    tokio::select! {
        () = shutdown.cancelled() => {}
        _ = watching => {}
        () = evaluate => {}
    }
}

/// What was announced per Deployment, and how to announce.
struct Announcer<'a> {
    namespace: &'a str,
    hub: &'a Arc<Hub>,
    versions: &'a tokio::sync::watch::Sender<Versions>,
    announced: HashMap<String, Version>,
}

/// The published message: spa-reloader's fields, then herald's.
#[derive(Serialize)]
struct Message<'a> {
    created_at: String,
    namespace: &'a str,
    name: &'a str,
    current_image: ImageRef<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    previous_image: Option<ImageRef<'a>>,
    images: &'a [Image],
    revision: Option<u64>,
    pod_template_hash: &'a str,
}

#[derive(Serialize)]
struct ImageRef<'a> {
    name: &'a str,
    sha256: &'a str,
}

impl<'a> From<&'a Image> for ImageRef<'a> {
    fn from(i: &'a Image) -> Self {
        Self {
            name: &i.name,
            sha256: &i.sha256,
        }
    }
}

impl Announcer<'_> {
    fn evaluate(
        &mut self,
        deployments: &[Store<Deployment>],
        replicasets: &Store<ReplicaSet>,
        pods: &Store<Pod>,
        on: AnnounceOn,
    ) {
        let rss = replicasets.state();
        let pods = pods.state();
        // Pods by their controller, so each Deployment looks at its own.
        let mut by_owner: HashMap<&str, Vec<&Pod>> = HashMap::new();
        for p in &pods {
            if let Some(owner) = p
                .owner_references()
                .iter()
                .find(|r| r.controller == Some(true))
            {
                by_owner.entry(owner.uid.as_str()).or_default().push(p);
            }
        }
        let mut seen = HashSet::new();
        for store in deployments {
            for d in store.state() {
                let name = d.name_any();
                if !seen.insert(name.clone()) {
                    continue;
                }
                let uid = d.uid().unwrap_or_default();
                let own_rss: Vec<&ReplicaSet> = rss
                    .iter()
                    .map(|rs| &**rs)
                    .filter(|rs| {
                        rs.owner_references()
                            .iter()
                            .any(|r| r.controller == Some(true) && r.uid == uid)
                    })
                    .collect();
                let own_pods = own_rss
                    .iter()
                    .filter_map(|rs| rs.metadata.uid.as_deref())
                    .flat_map(|u| by_owner.get(u).into_iter().flatten().copied());
                let Some(v) = version::live(&d, own_rss.iter().copied(), own_pods, on) else {
                    continue;
                };
                if self
                    .announced
                    .get(&name)
                    .is_some_and(|prev| prev.same_as(&v))
                {
                    continue;
                }
                self.announce(&name, &uid, v);
            }
        }
        // A Deployment that is gone is announced afresh if it comes back.
        self.announced.retain(|name, _| seen.contains(name));
    }

    fn announce(&mut self, name: &str, uid: &str, v: Version) {
        let channel = deployment_channel(self.namespace, name);
        let previous = self.announced.get(name);
        let Some(current) = v.images.first() else {
            return;
        };
        let msg = Message {
            created_at: now_rfc3339(),
            namespace: self.namespace,
            name,
            current_image: current.into(),
            previous_image: previous.and_then(|p| p.images.first()).map(Into::into),
            images: &v.images,
            revision: v.revision,
            pod_template_hash: &v.pod_template_hash,
        };
        let json = match serde_json::to_string(&msg) {
            Ok(j) => j,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a version announcement");
                return;
            }
        };
        match ChannelName::parse(&channel) {
            Ok(c) => {
                self.hub.publish(
                    &c,
                    Publish {
                        data: Data::Json(json.clone()),
                        event: EventName::parse("version").ok(),
                        key: Some(announcement_key(uid, &v)),
                        retry: None,
                        retain: true,
                    },
                );
            }
            Err(e) => {
                tracing::warn!(%channel, error = %e, "cannot publish this Deployment's versions: its channel name is too long");
            }
        }
        tracing::info!(
            namespace = self.namespace,
            deployment = name,
            image = %current.name,
            sha256 = %current.sha256,
            pod_template_hash = %v.pod_template_hash,
            "new version is live"
        );
        self.versions.send_modify(|m| {
            m.insert(channel, Arc::from(json));
        });
        self.announced.insert(name.to_owned(), v);
    }
}

/// The idempotency key of an announcement: the same on every replica that
/// watches the Deployment, so in a cluster each rollout reaches a
/// subscriber once, not once per replica (the hub drops a key it has
/// seen); different for anything that is a new version: a new revision
/// (rollouts, rollbacks, restarts), new digests (a re-pushed tag), or a
/// Deployment created again (a new uid).
fn announcement_key(uid: &str, v: &Version) -> String {
    let mut images = ring::digest::Context::new(&ring::digest::SHA256);
    for i in &v.images {
        for part in [&i.container, &i.name, &i.sha256] {
            images.update(part.as_bytes());
            images.update(b"\n");
        }
    }
    let digest: String = images
        .finish()
        .as_ref()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect();
    let revision = v.revision.map_or_else(|| "-".to_owned(), |r| r.to_string());
    format!(
        "k8s.version:{uid}:{revision}:{}:{digest}",
        v.pod_template_hash
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::version::Image;

    fn v(revision: u64, hash: &str, sha: &str) -> Version {
        Version {
            images: vec![Image {
                container: "app".into(),
                name: "app:v1".into(),
                sha256: sha.into(),
            }],
            pod_template_hash: hash.into(),
            revision: Some(revision),
        }
    }

    #[test]
    fn every_replica_keys_a_version_alike_and_new_versions_apart() {
        let k = announcement_key("u1", &v(1, "h1", "aa"));
        assert_eq!(k, announcement_key("u1", &v(1, "h1", "aa")));
        for other in [
            announcement_key("u1", &v(3, "h1", "aa")), // a rollback to it
            announcement_key("u1", &v(1, "h1", "bb")), // a re-pushed tag
            announcement_key("u1", &v(2, "h2", "aa")), // a restart
            announcement_key("u2", &v(1, "h1", "aa")), // created again
        ] {
            assert_ne!(k, other);
        }
    }
}
