//! What version of a Deployment is live, decided from the Deployment, its
//! ReplicaSets and their pods alone (no I/O, so every rule is unit-tested).
//!
//! A version is the set of (container, image, digest) the new pods really
//! run, plus the pod-template hash. The digest comes from the pods'
//! `imageID`, so a re-pushed tag is a new version; the template hash
//! changes on `kubectl rollout restart`, so that is one too. Scaling keeps
//! both, and so is never a new version.

use std::collections::BTreeSet;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use serde::Serialize;

/// The annotation the deployment controller numbers revisions with.
pub const REVISION: &str = "deployment.kubernetes.io/revision";
/// The label naming a ReplicaSet's (and its pods') template hash.
pub const TEMPLATE_HASH: &str = "pod-template-hash";

/// When a new version counts as live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AnnounceOn {
    /// The rollout is complete: the controller has seen the latest spec,
    /// every replica is updated and available, and no old pod is left
    /// (terminating ones included), so a reload cannot reach old code.
    #[default]
    Complete,
    /// The first new pod is Ready.
    FirstReady,
}

/// One container's image as the pods run it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Image {
    /// The container's name.
    pub container: String,
    /// The image reference the runtime reports (Docker-normalised).
    pub name: String,
    /// The image digest (hex, without `sha256:`), from the pod's `imageID`.
    pub sha256: String,
}

/// A live version of a Deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// Every container's image, in the template's container order.
    pub images: Vec<Image>,
    /// The pod-template hash of the ReplicaSet that runs it.
    pub pod_template_hash: String,
    /// The Deployment's revision number.
    pub revision: Option<u64>,
}

impl Version {
    /// True if `other` is the same version (the revision number aside: a
    /// rollback to an older template gets a new number, not new code).
    pub fn same_as(&self, other: &Version) -> bool {
        self.images == other.images && self.pod_template_hash == other.pod_template_hash
    }
}

/// The digest in an `imageID` (`repo@sha256:HEX`, `docker-pullable://…`,
/// or a bare `sha256:HEX`), if any.
pub fn digest(image_id: &str) -> Option<&str> {
    let hex = match image_id.rsplit_once("sha256:") {
        Some((_, hex)) => hex,
        None => return None,
    };
    (!hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
}

/// The version the Deployment runs now, if it counts as live under `on`;
/// `None` while a rollout is in progress (or nothing is running).
///
/// `replicasets` and `pods` may hold anything in the namespace: only the
/// Deployment's own (by controller owner reference) are looked at.
pub fn live<'a>(
    deployment: &Deployment,
    replicasets: impl IntoIterator<Item = &'a ReplicaSet>,
    pods: impl IntoIterator<Item = &'a Pod>,
    on: AnnounceOn,
) -> Option<Version> {
    let uid = deployment.metadata.uid.as_deref()?;
    let generation = deployment.metadata.generation.unwrap_or(0);
    let status = deployment.status.as_ref()?;
    if status.observed_generation.unwrap_or(0) < generation {
        return None;
    }
    let revision = annotation(&deployment.metadata, REVISION)?;
    let owned: Vec<&ReplicaSet> = replicasets
        .into_iter()
        .filter(|rs| controller(&rs.metadata) == Some(uid))
        .collect();
    let new_rs = owned
        .iter()
        .find(|rs| annotation(&rs.metadata, REVISION) == Some(revision))?;
    let new_uid = new_rs.metadata.uid.as_deref()?;
    let hash = label(&new_rs.metadata, TEMPLATE_HASH)?;
    let old_uids: BTreeSet<&str> = owned
        .iter()
        .filter_map(|rs| rs.metadata.uid.as_deref())
        .filter(|u| *u != new_uid)
        .collect();
    let mut new_pods = vec![];
    let mut old_left = false;
    for p in pods {
        match controller(&p.metadata) {
            Some(u) if u == new_uid && p.metadata.deletion_timestamp.is_none() => new_pods.push(p),
            Some(u) if u == new_uid => {}
            Some(u) if old_uids.contains(u) => old_left = true,
            _ => {}
        }
    }
    let ready: Vec<&Pod> = new_pods.iter().copied().filter(|p| is_ready(p)).collect();
    match on {
        AnnounceOn::Complete => {
            let want = deployment.spec.replicas.unwrap_or(1);
            let done = want > 0
                && status.updated_replicas.unwrap_or(0) == want
                && status.available_replicas.unwrap_or(0) == want
                && status.replicas.unwrap_or(0) == want
                && !old_left
                && usize::try_from(want).is_ok_and(|w| new_pods.len() == w && ready.len() == w);
            if !done {
                return None;
            }
        }
        AnnounceOn::FirstReady => {
            if ready.is_empty() {
                return None;
            }
        }
    }
    let images = images(deployment, &ready)?;
    Some(Version {
        images,
        pod_template_hash: hash.to_owned(),
        revision: revision.parse().ok(),
    })
}

/// The images the Ready pods run, in template order; `None` if a Ready
/// pod does not report a digest for one of its containers yet.
fn images(deployment: &Deployment, ready: &[&Pod]) -> Option<Vec<Image>> {
    let order: Vec<&str> = deployment
        .spec
        .template
        .spec
        .as_ref()
        .map(|s| s.containers.iter().map(|c| c.name.as_str()).collect())
        .unwrap_or_default();
    let mut set = BTreeSet::new();
    for p in ready {
        let statuses = p.status.as_ref()?.container_statuses.as_ref()?;
        for s in statuses {
            set.insert(Image {
                container: s.name.clone(),
                name: s.image.clone(),
                sha256: digest(&s.image_id)?.to_owned(),
            });
        }
    }
    let mut images: Vec<Image> = set.into_iter().collect();
    images.sort_by_key(|i| {
        order
            .iter()
            .position(|c| *c == i.container)
            .unwrap_or(usize::MAX)
    });
    (!images.is_empty()).then_some(images)
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn controller(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<&str> {
    meta.owner_references
        .as_ref()?
        .iter()
        .find(|r| r.controller == Some(true))
        .map(|r| r.uid.as_str())
}

fn annotation<'a>(
    meta: &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    key: &str,
) -> Option<&'a str> {
    meta.annotations.as_ref()?.get(key).map(String::as_str)
}

fn label<'a>(
    meta: &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    key: &str,
) -> Option<&'a str> {
    meta.labels.as_ref()?.get(key).map(String::as_str)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::json;

    fn deployment(replicas: i32, generation: i64, observed: i64, revision: &str) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "ns", "uid": "d1", "generation": generation,
                "annotations": {REVISION: revision}},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                "template": {"spec": {"containers": [{"name": "app", "image": "app:1"}, {"name": "side", "image": "side:1"}]}}},
            "status": {"observedGeneration": observed, "replicas": replicas,
                "updatedReplicas": replicas, "availableReplicas": replicas},
        }))
        .unwrap()
    }

    fn rs(uid: &str, revision: &str, hash: &str) -> ReplicaSet {
        serde_json::from_value(json!({
            "metadata": {"name": format!("web-{hash}"), "uid": uid,
                "labels": {TEMPLATE_HASH: hash}, "annotations": {REVISION: revision},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": "d1", "controller": true}]},
        }))
        .unwrap()
    }

    fn pod(rs: &str, ready: bool, digests: (&str, &str)) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "x", "uid": rs, "controller": true}]},
            "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
                "containerStatuses": [
                    {"name": "side", "image": "docker.io/library/side:1", "imageID": format!("docker.io/library/side@sha256:{}", digests.1), "ready": ready, "restartCount": 0},
                    {"name": "app", "image": "docker.io/library/app:1", "imageID": format!("docker-pullable://docker.io/library/app@sha256:{}", digests.0), "ready": ready, "restartCount": 0},
                ]},
        }))
        .unwrap()
    }

    #[test]
    fn digests_are_read_from_every_image_id_form() {
        assert_eq!(
            digest("docker.io/library/nginx@sha256:abc123"),
            Some("abc123")
        );
        assert_eq!(
            digest("docker-pullable://nginx@sha256:ABCDEF"),
            Some("ABCDEF")
        );
        assert_eq!(digest("sha256:0f"), Some("0f"));
        assert_eq!(digest(""), None);
        assert_eq!(digest("docker.io/library/nginx:1.25"), None);
        assert_eq!(digest("x@sha256:"), None);
        assert_eq!(digest("x@sha256:zz"), None);
    }

    #[test]
    fn a_complete_rollout_is_live_with_every_container_in_template_order() {
        let d = deployment(2, 3, 3, "2");
        let rss = [rs("old", "1", "aaa"), rs("new", "2", "bbb")];
        let pods = [
            pod("new", true, ("a1", "51")),
            pod("new", true, ("a1", "51")),
        ];
        let v = live(&d, &rss, &pods, AnnounceOn::Complete).unwrap();
        assert_eq!(v.pod_template_hash, "bbb");
        assert_eq!(v.revision, Some(2));
        let names: Vec<_> = v.images.iter().map(|i| i.container.as_str()).collect();
        assert_eq!(names, ["app", "side"]);
        assert_eq!(v.images[0].sha256, "a1");
        assert_eq!(v.images[0].name, "docker.io/library/app:1");
    }

    #[test]
    fn nothing_is_live_mid_rollout() {
        let rss = [rs("old", "1", "aaa"), rs("new", "2", "bbb")];
        let done = [pod("new", true, ("a", "5")), pod("new", true, ("a", "5"))];
        // The controller has not seen the latest spec.
        assert!(live(&deployment(2, 4, 3, "2"), &rss, &done, AnnounceOn::Complete).is_none());
        // An old pod is left (running or terminating).
        let mut with_old = done.to_vec();
        with_old.push(pod("old", true, ("0", "5")));
        assert!(
            live(
                &deployment(2, 3, 3, "2"),
                &rss,
                &with_old,
                AnnounceOn::Complete
            )
            .is_none()
        );
        let mut terminating = pod("old", false, ("0", "5"));
        terminating.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::UNIX_EPOCH),
        );
        let mut with_terminating = done.to_vec();
        with_terminating.push(terminating);
        assert!(
            live(
                &deployment(2, 3, 3, "2"),
                &rss,
                &with_terminating,
                AnnounceOn::Complete
            )
            .is_none()
        );
        // A new pod is not Ready yet.
        let half = [pod("new", true, ("a", "5")), pod("new", false, ("a", "5"))];
        assert!(live(&deployment(2, 3, 3, "2"), &rss, &half, AnnounceOn::Complete).is_none());
        // ...but first-ready announces it.
        assert!(
            live(
                &deployment(2, 3, 3, "2"),
                &rss,
                &half,
                AnnounceOn::FirstReady
            )
            .is_some()
        );
        // A Ready pod that reports no digest yet.
        let no_digest = [pod("new", true, ("a", "")), pod("new", true, ("a", "5"))];
        assert!(
            live(
                &deployment(2, 3, 3, "2"),
                &rss,
                &no_digest,
                AnnounceOn::Complete
            )
            .is_none()
        );
        // Status still counting replicas the pods do not show.
        let mut d = deployment(2, 3, 3, "2");
        d.status.as_mut().unwrap().available_replicas = Some(1);
        assert!(live(&d, &rss, &done, AnnounceOn::Complete).is_none());
        // Scaled to zero: nothing runs, nothing to announce.
        assert!(live(&deployment(0, 3, 3, "2"), &rss, &[], AnnounceOn::Complete).is_none());
    }

    #[test]
    fn digests_and_template_hashes_make_versions_and_revisions_do_not() {
        let rss = [rs("new", "2", "bbb")];
        let v1 = live(
            &deployment(1, 1, 1, "2"),
            &rss,
            &[pod("new", true, ("a", "5"))],
            AnnounceOn::Complete,
        )
        .unwrap();
        let repushed = live(
            &deployment(1, 1, 1, "2"),
            &rss,
            &[pod("new", true, ("a2", "5"))],
            AnnounceOn::Complete,
        )
        .unwrap();
        assert!(!v1.same_as(&repushed));
        let restarted = live(
            &deployment(1, 1, 1, "3"),
            &[rs("new2", "3", "ccc")],
            &[pod("new2", true, ("a", "5"))],
            AnnounceOn::Complete,
        )
        .unwrap();
        assert!(!v1.same_as(&restarted));
        let mut renumbered = v1.clone();
        renumbered.revision = Some(9);
        assert!(v1.same_as(&renumbered));
    }

    #[test]
    fn other_owners_are_ignored() {
        let d = deployment(1, 1, 1, "2");
        let mut foreign = rs("f", "2", "fff");
        foreign.metadata.owner_references.as_mut().unwrap()[0].uid = "other".into();
        assert!(
            live(
                &d,
                &[foreign],
                &[pod("f", true, ("a", "5"))],
                AnnounceOn::Complete
            )
            .is_none()
        );
    }
}
