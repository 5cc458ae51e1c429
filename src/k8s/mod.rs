//! Kubernetes sources: Deployment versions and cluster Events, published
//! into the hub like any other events.
//!
//! Everything here is level-triggered: watchers (kube-rs, with bookmarks
//! and backoff) keep stores of Deployments, ReplicaSets, Pods and Events,
//! and each change re-evaluates the state from the stores. So a watch that
//! expires (410), a dropped connection or an API server that is away for a
//! while costs a re-list, never a lost or repeated announcement: what is
//! announced is compared with what was last announced, not with the last
//! event seen.
//!
//! The module depends on the hub, never the reverse; the HTTP layer asks
//! [`Sources`] for what it serves (`GET_EVENTS`, the spa-reloader feed,
//! readiness).

mod deployments;
mod events;
pub mod version;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::hub::Hub;
pub use version::AnnounceOn;

/// Errors of the Kubernetes sources.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kubeconfig given could not be used.
    #[error("cannot use the kubeconfig {path} (--kubeconfig): {source}")]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// No client configuration was found.
    #[error(
        "no Kubernetes client configuration: run herald in a cluster (service account), or give --kubeconfig or KUBECONFIG: {0}"
    )]
    Infer(#[source] kube::config::InferConfigError),
    /// The client could not be built.
    #[error("cannot create the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    /// `GET_EVENTS` for a namespace herald does not watch.
    #[error("events of namespace {0:?} are not watched; start herald with --watch-events {0}")]
    NotWatched(String),
    /// `GET_EVENTS` before the first list completed.
    #[error("events of namespace {0:?} are not synced yet; retry shortly")]
    NotSynced(String),
}

/// Which Deployments to follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deployments {
    /// One Deployment (`--watch-deployment NAMESPACE/NAME`).
    Named {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// Every Deployment of a namespace (`--watch-deployments NAMESPACE`).
    All {
        /// The namespace.
        namespace: String,
    },
    /// Deployments matching a label selector
    /// (`--watch-selector NAMESPACE/SELECTOR`).
    Selected {
        /// The namespace.
        namespace: String,
        /// The label selector, as `kubectl -l` takes it.
        selector: String,
    },
}

impl Deployments {
    /// Reads `--watch-deployment NAMESPACE/NAME`.
    pub fn parse_named(s: &str) -> Result<Self, String> {
        let (ns, name) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected NAMESPACE/NAME"))?;
        check_name("namespace", ns, 63)?;
        check_name("deployment name", name, 253)?;
        Ok(Self::Named {
            namespace: ns.to_owned(),
            name: name.to_owned(),
        })
    }

    /// Reads `--watch-deployments NAMESPACE`.
    pub fn parse_all(s: &str) -> Result<Self, String> {
        check_name("namespace", s, 63)?;
        Ok(Self::All {
            namespace: s.to_owned(),
        })
    }

    /// Reads `--watch-selector NAMESPACE/SELECTOR`.
    pub fn parse_selected(s: &str) -> Result<Self, String> {
        let (ns, selector) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected NAMESPACE/LABEL_SELECTOR"))?;
        check_name("namespace", ns, 63)?;
        if selector.trim().is_empty() {
            return Err(format!(
                "{s:?}: the label selector is empty (use --watch-deployments for all)"
            ));
        }
        Ok(Self::Selected {
            namespace: ns.to_owned(),
            selector: selector.trim().to_owned(),
        })
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        match self {
            Self::Named { namespace, .. }
            | Self::All { namespace }
            | Self::Selected { namespace, .. } => namespace,
        }
    }
}

/// Whose Events to stream.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum EventScope {
    /// Every namespace the client may see (`--watch-events '*'`).
    All,
    /// One namespace.
    Namespace(String),
}

impl EventScope {
    /// Reads `--watch-events NAMESPACE|*`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "*" {
            return Ok(Self::All);
        }
        check_name("namespace", s, 63)?;
        Ok(Self::Namespace(s.to_owned()))
    }

    fn covers(&self, ns: &str) -> bool {
        match self {
            Self::All => true,
            Self::Namespace(n) => n == ns,
        }
    }
}

/// A DNS-1123 name (what Kubernetes accepts for namespaces and Deployments).
fn check_name(what: &str, s: &str, max: usize) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a valid {what}: lower-case letters, digits, '-' and '.', at most {max}, starting and ending alphanumeric"
        ))
    }
}

/// Configuration of the Kubernetes sources.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// A kubeconfig file; `None` = in-cluster, then `KUBECONFIG`, then
    /// `~/.kube/config`, as kube-rs resolves it.
    pub kubeconfig: Option<PathBuf>,
    /// Deployments whose versions are announced.
    pub deployments: Vec<Deployments>,
    /// When a new version counts as live.
    pub announce_on: AnnounceOn,
    /// How often every watched Deployment is re-evaluated even without a
    /// change (spa-reloader's `SPA_RESYNC_SEC`); never re-announces.
    pub resync: Duration,
    /// Namespaces whose Events are streamed.
    pub events: Vec<EventScope>,
}

impl Options {
    /// True if any source is configured (and so a client is needed).
    pub fn enabled(&self) -> bool {
        !self.deployments.is_empty() || !self.events.is_empty()
    }
}

/// The channel a Deployment's versions are published to.
pub fn deployment_channel(namespace: &str, name: &str) -> String {
    format!("k8s.deployment:{namespace}:{name}")
}

/// The channel a namespace's Events are published to.
pub fn events_channel(namespace: &str) -> String {
    format!("k8s.events:{namespace}")
}

/// Builds the client from `--kubeconfig`, or as kube-rs infers it.
pub async fn client(options: &Options) -> Result<kube::Client, Error> {
    let config = match &options.kubeconfig {
        Some(path) => {
            let kc =
                kube::config::Kubeconfig::read_from(path).map_err(|source| Error::Kubeconfig {
                    path: path.clone(),
                    source,
                })?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|source| Error::Kubeconfig {
                    path: path.clone(),
                    source,
                })?
        }
        None => kube::Config::infer().await.map_err(Error::Infer)?,
    };
    kube::Client::try_from(config).map_err(Error::Client)
}

/// The latest announcement of every watched Deployment, by channel: what
/// the spa-reloader compatible listener sends.
pub type Versions = BTreeMap<String, Arc<str>>;

/// The running sources. Their tasks live on the node's tracker and end
/// with its token.
#[derive(Debug)]
pub struct Sources {
    /// Watch groups that have not completed their first list.
    pending: Arc<AtomicUsize>,
    versions: tokio::sync::watch::Sender<Versions>,
    events: Vec<(EventScope, Arc<events::Store>)>,
}

impl Sources {
    /// Starts every configured watcher on `tasks`.
    pub fn start(
        client: &kube::Client,
        options: &Options,
        hub: &Arc<Hub>,
        tasks: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> Arc<Self> {
        let (versions, _) = tokio::sync::watch::channel(Versions::new());
        let mut groups: BTreeMap<&str, Vec<Deployments>> = BTreeMap::new();
        for d in &options.deployments {
            groups.entry(d.namespace()).or_default().push(d.clone());
        }
        let mut scopes = options.events.clone();
        scopes.sort();
        scopes.dedup();
        if scopes.contains(&EventScope::All) {
            scopes = vec![EventScope::All];
        }
        let pending = Arc::new(AtomicUsize::new(groups.len() + scopes.len()));
        for (ns, targets) in groups {
            tasks.spawn(deployments::run(deployments::Group {
                client: client.clone(),
                namespace: ns.to_owned(),
                targets,
                hub: hub.clone(),
                announce_on: options.announce_on,
                resync: options.resync,
                versions: versions.clone(),
                synced: Synced(pending.clone()),
                shutdown: shutdown.clone(),
            }));
        }
        let mut stores = vec![];
        for scope in scopes {
            let store = Arc::new(events::Store::default());
            stores.push((scope.clone(), store.clone()));
            tasks.spawn(events::run(events::Watch {
                client: client.clone(),
                scope,
                hub: hub.clone(),
                store,
                synced: Synced(pending.clone()),
                shutdown: shutdown.clone(),
            }));
        }
        Arc::new(Self {
            pending,
            versions,
            events: stores,
        })
    }

    /// True once every watcher has completed its first list. It stays
    /// true while the API server is away later: subscribers are still
    /// served, and the watchers catch up when it is back.
    pub fn synced(&self) -> bool {
        self.pending.load(Ordering::Acquire) == 0
    }

    /// The latest announcement of every Deployment, as it changes.
    pub fn versions(&self) -> tokio::sync::watch::Receiver<Versions> {
        self.versions.subscribe()
    }

    /// The Events of a watched namespace as a Kubernetes `EventList`
    /// (what the crane UI's `GET_EVENTS` asked for).
    pub fn event_list(&self, namespace: &str) -> Result<serde_json::Value, Error> {
        let (_, store) = self
            .events
            .iter()
            .find(|(s, _)| s.covers(namespace))
            .ok_or_else(|| Error::NotWatched(namespace.to_owned()))?;
        store
            .list(namespace)
            .ok_or_else(|| Error::NotSynced(namespace.to_owned()))
    }
}

/// What kube-rs can watch into a store here.
pub trait Watched:
    kube::Resource<DynamicType = ()>
    + Clone
    + std::fmt::Debug
    + serde::de::DeserializeOwned
    + Send
    + Sync
    + 'static
{
}

impl<K> Watched for K where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static
{
}

/// A watch of `api` kept in a store, with bookmarks, the default backoff
/// and managed fields dropped (they are large and never read). The
/// stream must be polled for the store to follow.
pub fn reflected<K: Watched>(
    api: kube::Api<K>,
    config: kube::runtime::watcher::Config,
) -> (
    kube::runtime::reflector::Store<K>,
    impl futures_util::Stream<
        Item = Result<kube::runtime::watcher::Event<K>, kube::runtime::watcher::Error>,
    > + Send,
) {
    use kube::ResourceExt;
    use kube::runtime::WatchStreamExt;
    let (store, writer) = kube::runtime::reflector::store();
    let stream = kube::runtime::watcher(api, config)
        .default_backoff()
        .modify(|o: &mut K| o.managed_fields_mut().clear())
        .reflect(writer);
    (store, stream)
}

/// Counts one watch group as synced, once.
#[derive(Debug)]
struct Synced(Arc<AtomicUsize>);

impl Synced {
    fn mark(self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// RFC 3339 in UTC with microseconds, always the same width, so texts
/// compare as the times do (spa-reloader-vue compares `created_at`).
fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}
