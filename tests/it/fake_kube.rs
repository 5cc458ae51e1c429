//! A fake Kubernetes API server for tests, over real HTTP on loopback.
//!
//! No real API server can be had on the machines herald is tested on, so
//! this one does what herald's watchers and `kubectl` rely on, the way the
//! real one does it:
//!
//! - discovery: `/version`, `/api`, `/api/v1`, `/apis`, and each group's
//!   resource list;
//! - Deployments, ReplicaSets, Pods, Events and EndpointSlices: list (with
//!   label and field selectors) and watch (NDJSON, from a
//!   `resourceVersion`, with bookmarks, `timeoutSeconds`, and `410 Gone`
//!   for a version older than the kept history), get, create, replace
//!   (unconditional or with a matching `resourceVersion`), merge and
//!   strategic-merge patch, delete, and the Deployment `scale` subresource;
//! - a deployment controller and kubelet that roll out the way Kubernetes
//!   does, one step at a time under the test's control ([`FakeKube::step`],
//!   [`FakeKube::settle`]): a new template gets a new ReplicaSet named by
//!   the template's hash, new pods start, become Ready with the image
//!   digest the registry has for their tag *at that moment*
//!   ([`FakeKube::push_image`] re-pushes a tag), old pods terminate, and
//!   the Deployment's status follows;
//! - faults: [`FakeKube::set_down`] (every request 503s and open watches
//!   end) and [`FakeKube::expire_history`] (open watches end and resuming
//!   from any earlier version gets 410).
//!
//! Its fidelity is checked with the real `kubectl` (`kube::kubectl_*`).

#![allow(dead_code)]
// Test support: a failed request is the HTTP response to send, returned as
// is; the per-kind table printers are closures picked by kind.
#![allow(clippy::result_large_err, clippy::type_complexity)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// The kinds the fake serves.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub enum Kind {
    Deployment,
    ReplicaSet,
    Pod,
    Event,
    EndpointSlice,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::Deployment,
        Kind::ReplicaSet,
        Kind::Pod,
        Kind::Event,
        Kind::EndpointSlice,
    ];

    fn plural(self) -> &'static str {
        match self {
            Kind::Deployment => "deployments",
            Kind::ReplicaSet => "replicasets",
            Kind::Pod => "pods",
            Kind::Event => "events",
            Kind::EndpointSlice => "endpointslices",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Deployment => "Deployment",
            Kind::ReplicaSet => "ReplicaSet",
            Kind::Pod => "Pod",
            Kind::Event => "Event",
            Kind::EndpointSlice => "EndpointSlice",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::Deployment | Kind::ReplicaSet => "apps/v1",
            Kind::Pod | Kind::Event => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    fn short_names(self) -> Vec<&'static str> {
        match self {
            Kind::Deployment => vec!["deploy"],
            Kind::ReplicaSet => vec!["rs"],
            Kind::Pod => vec!["po"],
            Kind::Event => vec!["ev"],
            Kind::EndpointSlice => vec![],
        }
    }

    fn from_path(group_version: &str, plural: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.api_version() == group_version && k.plural() == plural)
    }
}

/// One change, as watches see it.
#[derive(Debug)]
struct Change {
    rv: u64,
    kind: Kind,
    namespace: String,
    typ: &'static str,
    object: Value,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    /// Recent changes, for watches that resume from a version.
    log: VecDeque<Arc<Change>>,
    /// Resuming from a version below this gets 410 Gone.
    floor: u64,
    /// The registry: image reference → digest (hex).
    digests: HashMap<String, String>,
    pushes: u64,
    uids: u64,
    pods: u64,
    down: bool,
}

const LOG_KEEP: usize = 10_000;

struct Shared {
    inner: Mutex<Inner>,
    changes: broadcast::Sender<Arc<Change>>,
    /// Bumped to end every open watch.
    cut: tokio::sync::watch::Sender<u64>,
    bookmark_every: Duration,
    /// Every request line served, for assertions.
    requests: Mutex<Vec<String>>,
    stop: CancellationToken,
}

/// The running fake; dropping it stops it.
pub struct FakeKube {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

impl FakeKube {
    /// Starts the fake on `127.0.0.1:0`.
    pub async fn start() -> Self {
        Self::start_with(Duration::from_millis(500)).await
    }

    /// Starts the fake, sending watch bookmarks every `bookmark_every`.
    pub async fn start_with(bookmark_every: Duration) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (changes, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                rv: 1000,
                ..Inner::default()
            }),
            changes,
            cut: tokio::sync::watch::channel(0).0,
            bookmark_every,
            requests: Mutex::new(vec![]),
            stop: CancellationToken::new(),
        });
        let app = axum::Router::new()
            .fallback(route)
            .with_state(shared.clone());
        let stop = shared.stop.clone();
        // Watch events are small writes: no Nagle delay (the real API
        // server sets TCP_NODELAY too, as Go does by default).
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
                .unwrap();
        });
        Self { addr, shared }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig for this server into `dir`; returns its path.
    pub fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\nusers:\n- name: fake\n  user:\n    token: fake-token\n",
            self.url()
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    /// The request lines served so far (`GET /apis/...?...`).
    pub fn requests(&self) -> Vec<String> {
        self.shared.requests.lock().clone()
    }

    /// Creates an object (as `POST` does); returns it as stored.
    pub fn create(&self, object: Value) -> Value {
        let kind = kind_of(&object).expect("a kind the fake serves");
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        create(&self.shared, kind, &ns, object).expect("create")
    }

    /// A Deployment of `replicas` pods running one container per image.
    pub fn deployment(ns: &str, name: &str, replicas: u32, images: &[(&str, &str)]) -> Value {
        let containers: Vec<Value> = images
            .iter()
            .map(|(c, i)| json!({"name": c, "image": i}))
            .collect();
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {"containers": containers}
                }
            }
        })
    }

    /// The stored object, if any.
    pub fn get(&self, kind: Kind, ns: &str, name: &str) -> Option<Value> {
        let inner = self.shared.inner.lock();
        inner
            .objects
            .get(&(kind, ns.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Every stored object of a kind in a namespace.
    pub fn list(&self, kind: Kind, ns: &str) -> Vec<Value> {
        let inner = self.shared.inner.lock();
        inner
            .objects
            .iter()
            .filter(|((k, n, _), _)| *k == kind && n == ns)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Applies a strategic-merge patch to an object (as `PATCH` does).
    pub fn patch(&self, kind: Kind, ns: &str, name: &str, patch: Value) -> Value {
        patch_object(&self.shared, kind, ns, name, &patch, true).expect("patch")
    }

    /// Sets a Deployment's image for one container (`kubectl set image`).
    pub fn set_image(&self, ns: &str, name: &str, container: &str, image: &str) {
        self.patch(
            Kind::Deployment,
            ns,
            name,
            json!({"spec": {"template": {"spec": {"containers": [{"name": container, "image": image}]}}}}),
        );
    }

    /// `kubectl rollout restart`.
    pub fn restart(&self, ns: &str, name: &str) {
        // Sub-second, so two restarts within a second differ (kubectl's
        // own stamp has seconds only; tests restart faster than that).
        let now = jiff::Timestamp::now().to_string();
        self.patch(
            Kind::Deployment,
            ns,
            name,
            json!({"spec": {"template": {"metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": now}}}}}),
        );
    }

    /// `kubectl scale`.
    pub fn scale(&self, ns: &str, name: &str, replicas: u32) {
        self.patch(
            Kind::Deployment,
            ns,
            name,
            json!({"spec": {"replicas": replicas}}),
        );
    }

    /// Re-pushes a tag: pods that start from now on get a new digest.
    pub fn push_image(&self, image: &str) -> String {
        let mut inner = self.shared.inner.lock();
        inner.pushes += 1;
        let digest = fake_digest(&format!("{image}#{}", inner.pushes));
        inner.digests.insert(normalize_image(image), digest.clone());
        digest
    }

    /// The digest the registry has for an image now.
    pub fn digest(&self, image: &str) -> String {
        let mut inner = self.shared.inner.lock();
        digest_locked(&mut inner, image)
    }

    /// Re-writes an object with no change but a new `resourceVersion`, as
    /// a controller's status update or a resync does.
    pub fn touch(&self, kind: Kind, ns: &str, name: &str) {
        let mut inner = self.shared.inner.lock();
        let key = (kind, ns.to_owned(), name.to_owned());
        if let Some(obj) = inner.objects.get(&key).cloned() {
            commit(&self.shared, &mut inner, kind, "MODIFIED", obj);
        }
    }

    /// One step of every rollout in progress (a pod created, becoming
    /// Ready, terminating or gone). Returns false when nothing moved.
    pub fn step(&self) -> bool {
        self.step_if(|_| true)
    }

    /// One step of one Deployment's rollout.
    pub fn step_deployment(&self, ns: &str, name: &str) -> bool {
        self.step_if(|d| d["metadata"]["namespace"] == ns && d["metadata"]["name"] == name)
    }

    fn step_if(&self, which: impl Fn(&Value) -> bool) -> bool {
        let mut inner = self.shared.inner.lock();
        let moved = step_locked(&self.shared, &mut inner, &which);
        sync_status(&self.shared, &mut inner);
        moved
    }

    /// Steps until every rollout is complete.
    pub fn settle(&self) {
        for _ in 0..10_000 {
            if !self.step() {
                return;
            }
        }
        panic!("rollouts never settled");
    }

    /// Steps one Deployment until its rollout is complete.
    pub fn settle_deployment(&self, ns: &str, name: &str) {
        for _ in 0..10_000 {
            if !self.step_deployment(ns, name) {
                return;
            }
        }
        panic!("the rollout never settled");
    }

    /// Deletes an object (as `DELETE` does, owned objects included).
    pub fn delete(&self, kind: Kind, ns: &str, name: &str) {
        let target = Target {
            kind,
            namespace: Some(ns.to_owned()),
            name: Some(name.to_owned()),
            scale: false,
        };
        let r = delete(&self.shared, &target, name);
        assert_eq!(r.status(), 200);
        let mut inner = self.shared.inner.lock();
        sync_status(&self.shared, &mut inner);
    }

    /// (Ready pods of the current template, pods of older ones) of a Deployment.
    pub fn pods(&self, ns: &str, name: &str) -> (usize, usize) {
        let inner = self.shared.inner.lock();
        let d = &inner.objects[&(Kind::Deployment, ns.to_owned(), name.to_owned())];
        let hash = template_hash(&d["spec"]["template"]);
        let (mut new_ready, mut old) = (0, 0);
        for rs in owned_by(&inner, Kind::ReplicaSet, ns, &d["metadata"]["uid"]) {
            let pods = owned_by(&inner, Kind::Pod, ns, &rs["metadata"]["uid"]);
            if rs["metadata"]["labels"]["pod-template-hash"] == json!(hash) {
                new_ready += pods
                    .iter()
                    .filter(|p| is_ready(p) && !terminating(p))
                    .count();
            } else {
                old += pods.len();
            }
        }
        (new_ready, old)
    }

    /// Takes the server down (every request gets 503, open watches end)
    /// or brings it back.
    pub fn set_down(&self, down: bool) {
        self.shared.inner.lock().down = down;
        if down {
            self.shared.cut.send_modify(|n| *n += 1);
        }
    }

    /// Forgets the change history: open watches end, and a watch that
    /// resumes from any version before now gets `410 Gone`.
    pub fn expire_history(&self) {
        {
            let mut inner = self.shared.inner.lock();
            inner.floor = inner.rv + 1;
            inner.log.clear();
        }
        self.shared.cut.send_modify(|n| *n += 1);
    }

    /// Open watch streams (for synchronising tests).
    pub fn watchers(&self) -> usize {
        self.shared.changes.receiver_count()
    }
}

// ---------------------------------------------------------------- routing

async fn route(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    shared
        .requests
        .lock()
        .push(format!("{method} {path}?{query}"));
    if shared.inner.lock().down {
        return status(503, "ServiceUnavailable", "the fake API server is down");
    }
    let table = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"));
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = match axum::body::to_bytes(req.into_body(), 16 << 20).await {
        Ok(b) => b,
        Err(e) => return status(400, "BadRequest", &e.to_string()),
    };
    let q: HashMap<String, String> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    match discovery(&path) {
        Some(v) if method == Method::GET => return json_response(200, &v),
        Some(_) => return status(405, "MethodNotAllowed", "discovery is read-only"),
        None => {}
    }
    // Namespaces exist as soon as they are named (kubectl looks them up).
    if let Some(ns) = path
        .strip_prefix("/api/v1/namespaces/")
        .filter(|n| !n.contains('/'))
    {
        return if method == Method::GET {
            json_response(
                200,
                &json!({"kind": "Namespace", "apiVersion": "v1",
                    "metadata": {"name": ns, "uid": format!("ns-{ns}"), "resourceVersion": "1"},
                    "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}),
            )
        } else {
            status(
                405,
                "MethodNotAllowed",
                "the fake's namespaces are read-only",
            )
        };
    }
    let Some(target) = Target::parse(&path) else {
        return status(
            404,
            "NotFound",
            &format!("the server could not find {path}"),
        );
    };
    match (&method, &target.name, target.scale) {
        (&Method::GET, None, _) if q.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            watch(shared, target, q)
        }
        (&Method::GET, None, _) => list(&shared, &target, &q, table),
        (&Method::GET, Some(name), false) => get(&shared, &target, name, table),
        (&Method::GET, Some(name), true) => scale_get(&shared, &target, name),
        (&Method::POST, None, _) => match parse_body(&body, &content_type) {
            Ok(obj) => match create(&shared, target.kind, target.namespace_or_default(), obj) {
                Ok(v) => json_response(201, &v),
                Err(r) => r,
            },
            Err(r) => r,
        },
        (&Method::PUT, Some(name), scale) => match parse_body(&body, &content_type) {
            Ok(obj) if scale => scale_put(&shared, &target, name, &obj),
            Ok(obj) => replace(&shared, &target, name, obj),
            Err(r) => r,
        },
        (&Method::PATCH, Some(name), scale) => {
            let strategic = match content_type.split(';').next().unwrap_or_default().trim() {
                "application/strategic-merge-patch+json" => true,
                "application/merge-patch+json" => false,
                other => {
                    return status(
                        415,
                        "UnsupportedMediaType",
                        &format!(
                            "the fake supports merge and strategic-merge patches, not {other:?}"
                        ),
                    );
                }
            };
            let patch: Value = match serde_json::from_slice(&body) {
                Ok(p) => p,
                Err(e) => return status(400, "BadRequest", &format!("invalid patch: {e}")),
            };
            let ns = target.namespace_or_default().to_owned();
            if scale {
                let replicas = patch["spec"]["replicas"].clone();
                let p = json!({"spec": {"replicas": replicas}});
                return match patch_object(&shared, target.kind, &ns, name, &p, false) {
                    Ok(_) => scale_get(&shared, &target, name),
                    Err(r) => r,
                };
            }
            match patch_object(&shared, target.kind, &ns, name, &patch, strategic) {
                Ok(v) => json_response(200, &v),
                Err(r) => r,
            }
        }
        (&Method::DELETE, Some(name), false) => delete(&shared, &target, name),
        _ => status(
            405,
            "MethodNotAllowed",
            &format!("{method} is not supported on {path}"),
        ),
    }
}

/// A resource path: `/api/v1[/namespaces/NS]/PLURAL[/NAME[/scale]]` or the
/// same under `/apis/GROUP/VERSION`.
struct Target {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
    scale: bool,
}

impl Target {
    fn parse(path: &str) -> Option<Target> {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (gv, rest) = match parts.as_slice() {
            ["api", "v1", rest @ ..] => ("v1".to_owned(), rest),
            ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
            _ => return None,
        };
        let (namespace, rest) = match rest {
            ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
            _ => (None, rest),
        };
        let (plural, name, scale) = match rest {
            [p] => (*p, None, false),
            [p, n] => (*p, Some((*n).to_owned()), false),
            [p, n, "scale"] => (*p, Some((*n).to_owned()), true),
            _ => return None,
        };
        let kind = Kind::from_path(&gv, plural)?;
        if scale && kind != Kind::Deployment {
            return None;
        }
        Some(Target {
            kind,
            namespace,
            name,
            scale,
        })
    }

    fn namespace_or_default(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }
}

fn discovery(path: &str) -> Option<Value> {
    let resources = |gv: &str| -> Value {
        let mut list = vec![];
        for k in Kind::ALL.into_iter().filter(|k| k.api_version() == gv) {
            list.push(json!({
                "name": k.plural(), "singularName": k.name().to_lowercase(), "namespaced": true,
                "kind": k.name(), "shortNames": k.short_names(),
                "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
            }));
            if k == Kind::Pod {
                list.push(
                    json!({"name": "namespaces", "singularName": "namespace", "namespaced": false,
                    "kind": "Namespace", "shortNames": ["ns"], "verbs": ["get"]}),
                );
            }
            if k == Kind::Deployment {
                list.push(
                    json!({"name": "deployments/scale", "singularName": "", "namespaced": true,
                    "group": "autoscaling", "version": "v1", "kind": "Scale",
                    "verbs": ["get", "patch", "update"]}),
                );
            }
        }
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list})
    };
    let group = |name: &str, version: &str| {
        let gv = format!("{name}/{version}");
        json!({"name": name, "versions": [{"groupVersion": gv, "version": version}],
               "preferredVersion": {"groupVersion": gv, "version": version}})
    };
    Some(match path.trim_end_matches('/') {
        "/version" => json!({
            "major": "1", "minor": "33", "gitVersion": "v1.33.0-herald-fake",
            "gitCommit": "0000000", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
            "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64"
        }),
        "/api" => json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
        "/api/v1" => resources("v1"),
        "/apis" => json!({"kind": "APIGroupList", "apiVersion": "v1",
            "groups": [group("apps", "v1"), group("discovery.k8s.io", "v1")]}),
        "/apis/apps" => group("apps", "v1"),
        "/apis/apps/v1" => resources("apps/v1"),
        "/apis/discovery.k8s.io" => group("discovery.k8s.io", "v1"),
        "/apis/discovery.k8s.io/v1" => resources("discovery.k8s.io/v1"),
        _ => return None,
    })
}

// ---------------------------------------------------------------- reads

fn list(shared: &Shared, target: &Target, q: &HashMap<String, String>, table: bool) -> Response {
    let selector = match Selector::parse(q) {
        Ok(s) => s,
        Err(e) => return status(400, "BadRequest", &e),
    };
    let inner = shared.inner.lock();
    let items: Vec<Value> = inner
        .objects
        .iter()
        .filter(|((k, ns, _), obj)| {
            *k == target.kind
                && target.namespace.as_ref().is_none_or(|t| t == ns)
                && selector.matches(obj)
        })
        .map(|(_, v)| v.clone())
        .collect();
    if table {
        return json_response(200, &as_table(target.kind, &items, inner.rv));
    }
    json_response(
        200,
        &json!({
            "kind": format!("{}List", target.kind.name()),
            "apiVersion": target.kind.api_version(),
            "metadata": {"resourceVersion": inner.rv.to_string()},
            "items": items,
        }),
    )
}

fn get(shared: &Shared, target: &Target, name: &str, table: bool) -> Response {
    let inner = shared.inner.lock();
    match inner.objects.get(&(
        target.kind,
        target.namespace_or_default().to_owned(),
        name.to_owned(),
    )) {
        Some(v) if table => json_response(
            200,
            &as_table(target.kind, std::slice::from_ref(v), inner.rv),
        ),
        Some(v) => json_response(200, v),
        None => not_found(target.kind, name),
    }
}

fn watch(shared: Arc<Shared>, target: Target, q: HashMap<String, String>) -> Response {
    let selector = match Selector::parse(&q) {
        Ok(s) => s,
        Err(e) => return status(400, "BadRequest", &e),
    };
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let from = q.get("resourceVersion").cloned().unwrap_or_default();
    let matches = {
        let target_ns = target.namespace.clone();
        let kind = target.kind;
        move |c: &Change| {
            c.kind == kind
                && target_ns.as_ref().is_none_or(|t| *t == c.namespace)
                && selector.matches(&c.object)
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let mut cut = shared.cut.subscribe();
    // Under the lock: the backlog and the live subscription meet exactly.
    let (backlog, mut live, mut last) = {
        let inner = shared.inner.lock();
        let live = shared.changes.subscribe();
        match from.as_str() {
            "" | "0" => {
                let items: Vec<Bytes> = inner
                    .objects
                    .iter()
                    .filter(|((k, ns, _), obj)| {
                        *k == target.kind
                            && target.namespace.as_ref().is_none_or(|t| t == ns)
                            && matches(&Change {
                                rv: 0,
                                kind: *k,
                                namespace: ns.clone(),
                                typ: "ADDED",
                                object: (*obj).clone(),
                            })
                    })
                    .map(|(_, v)| line("ADDED", v))
                    .collect();
                (Ok(items), live, inner.rv)
            }
            v => match v.parse::<u64>() {
                Err(_) => {
                    return status(400, "BadRequest", &format!("invalid resourceVersion {v:?}"));
                }
                Ok(rv) if rv < inner.floor || rv > inner.rv => (
                    Err(line(
                        "ERROR",
                        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                            "status": "Failure", "reason": "Expired", "code": 410,
                            "message": format!("too old resource version: {rv} ({})", inner.floor)}),
                    )),
                    live,
                    rv,
                ),
                Ok(rv) => {
                    let items = inner
                        .log
                        .iter()
                        .filter(|c| c.rv > rv && matches(c))
                        .map(|c| line(c.typ, &c.object))
                        .collect();
                    (Ok(items), live, inner.rv)
                }
            },
        }
    };
    let kind = target.kind;
    tokio::spawn(async move {
        let items = match backlog {
            Ok(items) => items,
            Err(gone) => {
                let _ = tx.send(gone).await;
                return;
            }
        };
        for i in items {
            if tx.send(i).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(shared.bookmark_every);
        tick.tick().await;
        loop {
            tokio::select! {
                () = shared.stop.cancelled() => return,
                () = &mut deadline => return,
                _ = cut.changed() => return,
                _ = tx.closed() => return,
                c = live.recv() => match c {
                    Ok(c) => {
                        if c.rv <= last {
                            continue;
                        }
                        last = c.rv;
                        if matches(&c) && tx.send(line(c.typ, &c.object)).await.is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                },
                _ = tick.tick(), if bookmarks => {
                    let b = json!({"kind": kind.name(), "apiVersion": kind.api_version(),
                        "metadata": {"resourceVersion": last.to_string()}});
                    if tx.send(line("BOOKMARK", &b)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}

/// Server-side printing (`Accept: ...;as=Table`), as kubectl asks for it,
/// with the columns the real server prints for each kind.
fn as_table(kind: Kind, items: &[Value], rv: u64) -> Value {
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let (columns, cells): (Vec<&str>, Box<dyn Fn(&Value) -> Vec<Value>>) = match kind {
        Kind::Deployment => (
            vec!["Name", "Ready", "Up-to-date", "Available", "Age"],
            Box::new(move |o| {
                let s = &o["status"];
                vec![
                    o["metadata"]["name"].clone(),
                    json!(format!(
                        "{}/{}",
                        n(&s["readyReplicas"]),
                        n(&o["spec"]["replicas"])
                    )),
                    json!(n(&s["updatedReplicas"])),
                    json!(n(&s["availableReplicas"])),
                    json!(age(o)),
                ]
            }),
        ),
        Kind::ReplicaSet => (
            vec!["Name", "Desired", "Current", "Ready", "Age"],
            Box::new(move |o| {
                vec![
                    o["metadata"]["name"].clone(),
                    json!(n(&o["spec"]["replicas"])),
                    json!(n(&o["status"]["replicas"])),
                    json!(n(&o["status"]["readyReplicas"])),
                    json!(age(o)),
                ]
            }),
        ),
        Kind::Pod => (
            vec!["Name", "Ready", "Status", "Restarts", "Age"],
            Box::new(|o| {
                let cs = o["status"]["containerStatuses"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let ready = cs.iter().filter(|c| c["ready"] == json!(true)).count();
                let status = if terminating(o) {
                    json!("Terminating")
                } else {
                    o["status"]["phase"].clone()
                };
                vec![
                    o["metadata"]["name"].clone(),
                    json!(format!("{ready}/{}", cs.len())),
                    status,
                    json!(0),
                    json!(age(o)),
                ]
            }),
        ),
        Kind::Event => (
            vec!["Last Seen", "Type", "Reason", "Object", "Message"],
            Box::new(|o| {
                let obj = &o["involvedObject"];
                vec![
                    json!(age(o)),
                    o["type"].clone(),
                    o["reason"].clone(),
                    json!(format!(
                        "{}/{}",
                        obj["kind"].as_str().unwrap_or_default().to_lowercase(),
                        obj["name"].as_str().unwrap_or_default()
                    )),
                    o["message"].clone(),
                ]
            }),
        ),
        Kind::EndpointSlice => (
            vec!["Name", "Age"],
            Box::new(|o| vec![o["metadata"]["name"].clone(), json!(age(o))]),
        ),
    };
    let defs: Vec<Value> = columns
        .iter()
        .map(|c| {
            json!({"name": c, "type": "string", "format": if *c == "Name" { "name" } else { "" },
                "description": "", "priority": 0})
        })
        .collect();
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            json!({"cells": cells(o), "object": {"kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]}})
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv.to_string()}, "columnDefinitions": defs, "rows": rows})
}

fn age(o: &Value) -> String {
    let created = o["metadata"]["creationTimestamp"]
        .as_str()
        .and_then(|t| t.parse::<jiff::Timestamp>().ok());
    match created {
        Some(t) => {
            let secs = jiff::Timestamp::now().duration_since(t).as_secs().max(0);
            if secs < 120 {
                format!("{secs}s")
            } else {
                format!("{}m", secs / 60)
            }
        }
        None => "<unknown>".into(),
    }
}

fn line(typ: &str, object: &Value) -> Bytes {
    let mut s = serde_json::to_vec(&json!({"type": typ, "object": object})).unwrap();
    s.push(b'\n');
    Bytes::from(s)
}

// ---------------------------------------------------------------- writes

fn parse_body(body: &[u8], content_type: &str) -> Result<Value, Response> {
    if content_type.contains("yaml") {
        return Err(status(
            415,
            "UnsupportedMediaType",
            "the fake reads JSON bodies (kubectl sends JSON)",
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| status(400, "BadRequest", &format!("invalid JSON body: {e}")))
}

fn create(shared: &Shared, kind: Kind, ns: &str, mut obj: Value) -> Result<Value, Response> {
    let Some(name) = obj["metadata"]["name"].as_str().map(str::to_owned) else {
        return Err(status(422, "Invalid", "metadata.name: Required value"));
    };
    let mut inner = shared.inner.lock();
    let key = (kind, ns.to_owned(), name.clone());
    if inner.objects.contains_key(&key) {
        return Err(status_with(
            409,
            "AlreadyExists",
            &format!("{} \"{name}\" already exists", kind.plural()),
            kind,
            &name,
        ));
    }
    inner.uids += 1;
    let uid = format!("00000000-0000-4000-8000-{:012x}", inner.uids);
    obj["apiVersion"] = json!(kind.api_version());
    obj["kind"] = json!(kind.name());
    let meta = obj["metadata"].as_object_mut().unwrap();
    meta.insert("namespace".into(), json!(ns));
    meta.insert("uid".into(), json!(uid));
    meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
    if kind == Kind::Deployment {
        meta.insert("generation".into(), json!(1));
        if obj["spec"]["replicas"].is_null() {
            obj["spec"]["replicas"] = json!(1);
        }
        obj["status"] = json!({});
    }
    let stored = commit(shared, &mut inner, kind, "ADDED", obj);
    if kind == Kind::Deployment {
        reconcile(shared, &mut inner);
        sync_status(shared, &mut inner);
        return Ok(inner.objects[&key].clone());
    }
    Ok(stored)
}

fn replace(shared: &Shared, target: &Target, name: &str, mut obj: Value) -> Response {
    let ns = target.namespace_or_default().to_owned();
    let key = (target.kind, ns.clone(), name.to_owned());
    let mut inner = shared.inner.lock();
    let Some(old) = inner.objects.get(&key).cloned() else {
        return not_found(target.kind, name);
    };
    if let Some(rv) = obj["metadata"]["resourceVersion"].as_str()
        && rv
            != old["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_default()
    {
        return status_with(
            409,
            "Conflict",
            &format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                target.kind.plural()
            ),
            target.kind,
            name,
        );
    }
    // Identity and status are the server's (status is a subresource).
    for f in ["uid", "creationTimestamp", "namespace", "generation"] {
        obj["metadata"][f] = old["metadata"][f].clone();
    }
    obj["metadata"]["name"] = json!(name);
    if target.kind == Kind::Deployment {
        obj["status"] = old["status"].clone();
        if obj["spec"]["replicas"].is_null() {
            obj["spec"]["replicas"] = json!(1);
        }
    }
    let v = update_locked(shared, &mut inner, target.kind, &old, obj);
    json_response(200, &v)
}

fn patch_object(
    shared: &Shared,
    kind: Kind,
    ns: &str,
    name: &str,
    patch: &Value,
    strategic: bool,
) -> Result<Value, Response> {
    let key = (kind, ns.to_owned(), name.to_owned());
    let mut inner = shared.inner.lock();
    let Some(old) = inner.objects.get(&key).cloned() else {
        return Err(not_found(kind, name));
    };
    let mut obj = old.clone();
    merge(&mut obj, patch, strategic);
    for f in ["uid", "creationTimestamp", "namespace", "name"] {
        obj["metadata"][f] = old["metadata"][f].clone();
    }
    Ok(update_locked(shared, &mut inner, kind, &old, obj))
}

/// Stores an update; a Deployment whose spec changed gets a new generation
/// and its controller reconciles.
fn update_locked(
    shared: &Shared,
    inner: &mut Inner,
    kind: Kind,
    old: &Value,
    mut obj: Value,
) -> Value {
    obj["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
    if obj == *old {
        // A no-op write stores nothing and sends no event, as Kubernetes.
        return obj;
    }
    if kind == Kind::Deployment && obj["spec"] != old["spec"] {
        let g = old["metadata"]["generation"].as_u64().unwrap_or(1);
        obj["metadata"]["generation"] = json!(g + 1);
    }
    let key = key_of(kind, &obj);
    commit(shared, inner, kind, "MODIFIED", obj);
    if kind == Kind::Deployment {
        reconcile(shared, inner);
        sync_status(shared, inner);
    }
    inner.objects[&key].clone()
}

fn delete(shared: &Shared, target: &Target, name: &str) -> Response {
    let ns = target.namespace_or_default().to_owned();
    let mut inner = shared.inner.lock();
    let key = (target.kind, ns.clone(), name.to_owned());
    let Some(obj) = inner.objects.get(&key).cloned() else {
        return not_found(target.kind, name);
    };
    let gone = remove(shared, &mut inner, target.kind, &obj);
    // The garbage collector: what the object owned goes with it.
    let uid = obj["metadata"]["uid"].clone();
    let mut owners = vec![uid];
    while let Some(owner) = owners.pop() {
        let owned: Vec<(Kind, Value)> = inner
            .objects
            .iter()
            .filter(|((_, n, _), o)| *n == ns && controller_uid(o) == Some(&owner))
            .map(|((k, _, _), o)| (*k, o.clone()))
            .collect();
        for (k, o) in owned {
            owners.push(o["metadata"]["uid"].clone());
            remove(shared, &mut inner, k, &o);
        }
    }
    json_response(200, &gone)
}

fn remove(shared: &Shared, inner: &mut Inner, kind: Kind, obj: &Value) -> Value {
    let key = key_of(kind, obj);
    inner.objects.remove(&key);
    inner.rv += 1;
    let rv = inner.rv;
    let mut obj = obj.clone();
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    log(shared, inner, kind, "DELETED", obj.clone());
    obj
}

fn scale_get(shared: &Shared, target: &Target, name: &str) -> Response {
    let inner = shared.inner.lock();
    let key = (
        Kind::Deployment,
        target.namespace_or_default().to_owned(),
        name.to_owned(),
    );
    let Some(d) = inner.objects.get(&key) else {
        return not_found(Kind::Deployment, name);
    };
    let selector = d["spec"]["selector"]["matchLabels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    json_response(
        200,
        &json!({
            "kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": {"name": name, "namespace": key.1, "uid": d["metadata"]["uid"],
                "resourceVersion": d["metadata"]["resourceVersion"]},
            "spec": {"replicas": d["spec"]["replicas"]},
            "status": {"replicas": d["status"]["replicas"].as_u64().unwrap_or(0), "selector": selector},
        }),
    )
}

fn scale_put(shared: &Shared, target: &Target, name: &str, obj: &Value) -> Response {
    let p = json!({"spec": {"replicas": obj["spec"]["replicas"]}});
    match patch_object(
        shared,
        Kind::Deployment,
        target.namespace_or_default(),
        name,
        &p,
        false,
    ) {
        Ok(_) => scale_get(shared, target, name),
        Err(r) => r,
    }
}

/// Stores `obj` with the next resourceVersion and tells the watches.
fn commit(
    shared: &Shared,
    inner: &mut Inner,
    kind: Kind,
    typ: &'static str,
    mut obj: Value,
) -> Value {
    inner.rv += 1;
    obj["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
    inner.objects.insert(key_of(kind, &obj), obj.clone());
    log(shared, inner, kind, typ, obj.clone());
    obj
}

fn log(shared: &Shared, inner: &mut Inner, kind: Kind, typ: &'static str, object: Value) {
    let change = Arc::new(Change {
        rv: inner.rv,
        kind,
        namespace: object["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        typ,
        object,
    });
    inner.log.push_back(change.clone());
    if inner.log.len() > LOG_KEEP
        && let Some(old) = inner.log.pop_front()
    {
        inner.floor = old.rv + 1;
    }
    let _ = shared.changes.send(change);
}

fn key_of(kind: Kind, obj: &Value) -> (Kind, String, String) {
    (
        kind,
        obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned(),
        obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

fn kind_of(obj: &Value) -> Option<Kind> {
    let api_version = obj["apiVersion"].as_str()?;
    let kind = obj["kind"].as_str()?;
    Kind::ALL
        .into_iter()
        .find(|k| k.api_version() == api_version && k.name() == kind)
}

/// JSON merge patch (RFC 7386); with `strategic`, lists of objects with a
/// `name` merge element by element on it, as Kubernetes' strategic merge
/// does for containers, and `$` directives are dropped.
fn merge(target: &mut Value, patch: &Value, strategic: bool) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().unwrap();
    for (k, v) in p {
        if strategic && k.starts_with('$') {
            continue;
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        match (t.get_mut(k), v) {
            (Some(Value::Array(old)), Value::Array(new))
                if strategic && new.iter().all(|e| e.get("name").is_some()) =>
            {
                for e in new {
                    match old.iter_mut().find(|o| o.get("name") == e.get("name")) {
                        Some(o) => merge(o, e, true),
                        None => old.push(e.clone()),
                    }
                }
            }
            (Some(existing), _) => merge(existing, v, strategic),
            (None, _) => {
                let mut fresh = Value::Null;
                merge(&mut fresh, v, strategic);
                t.insert(k.clone(), fresh);
            }
        }
    }
}

// ---------------------------------------------------------------- controller

fn controller_uid(obj: &Value) -> Option<&Value> {
    obj["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|r| r["controller"] == json!(true))
        .map(|r| &r["uid"])
}

fn template_hash(template: &Value) -> String {
    // FNV-1a over the canonical JSON, spelt with Kubernetes' safe alphabet.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in serde_json::to_vec(template).unwrap() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut s = String::new();
    for _ in 0..10 {
        s.push(ALPHABET[(h % ALPHABET.len() as u64) as usize] as char);
        h /= ALPHABET.len() as u64;
    }
    s
}

fn deployments(inner: &Inner) -> Vec<Value> {
    inner
        .objects
        .iter()
        .filter(|((k, _, _), _)| *k == Kind::Deployment)
        .map(|(_, v)| v.clone())
        .collect()
}

fn owned_by(inner: &Inner, kind: Kind, ns: &str, uid: &Value) -> Vec<Value> {
    inner
        .objects
        .iter()
        .filter(|((k, n, _), o)| *k == kind && n == ns && controller_uid(o) == Some(uid))
        .map(|(_, v)| v.clone())
        .collect()
}

/// The deployment controller's reaction to a spec change: a ReplicaSet for
/// the current template exists, and carries the newest revision.
fn reconcile(shared: &Shared, inner: &mut Inner) {
    for d in deployments(inner) {
        let ns = d["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let name = d["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let hash = template_hash(&d["spec"]["template"]);
        let rss = owned_by(inner, Kind::ReplicaSet, &ns, &d["metadata"]["uid"]);
        let revision_of = |rs: &Value| {
            rs["metadata"]["annotations"]["deployment.kubernetes.io/revision"]
                .as_str()
                .and_then(|r| r.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let newest = rss.iter().map(revision_of).max().unwrap_or(0);
        let current = rss
            .iter()
            .find(|rs| rs["metadata"]["labels"]["pod-template-hash"] == json!(hash));
        let revision = match current {
            Some(rs) if revision_of(rs) == newest => newest,
            Some(rs) => {
                // Rolling back to an older template re-uses its ReplicaSet
                // with a new revision.
                let mut rs = rs.clone();
                rs["metadata"]["annotations"]["deployment.kubernetes.io/revision"] =
                    json!((newest + 1).to_string());
                commit(shared, inner, Kind::ReplicaSet, "MODIFIED", rs);
                newest + 1
            }
            None => {
                let mut template = d["spec"]["template"].clone();
                template["metadata"]["labels"]["pod-template-hash"] = json!(hash);
                let mut selector = d["spec"]["selector"].clone();
                selector["matchLabels"]["pod-template-hash"] = json!(hash);
                inner.uids += 1;
                let rs = json!({
                    "apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "metadata": {
                        "name": format!("{name}-{hash}"), "namespace": ns,
                        "uid": format!("00000000-0000-4000-8000-{:012x}", inner.uids),
                        "creationTimestamp": now_rfc3339(),
                        "labels": template["metadata"]["labels"].clone(),
                        "annotations": {"deployment.kubernetes.io/revision": (newest + 1).to_string()},
                        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                            "name": name, "uid": d["metadata"]["uid"], "controller": true,
                            "blockOwnerDeletion": true}],
                    },
                    "spec": {"replicas": 0, "selector": selector, "template": template},
                    "status": {"replicas": 0},
                });
                commit(shared, inner, Kind::ReplicaSet, "ADDED", rs);
                newest + 1
            }
        };
        let key = key_of(Kind::Deployment, &d);
        let mut d = inner.objects[&key].clone();
        let before = d.clone();
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"] =
            json!(revision.to_string());
        if d != before {
            commit(shared, inner, Kind::Deployment, "MODIFIED", d);
        }
    }
}

fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

fn terminating(pod: &Value) -> bool {
    !pod["metadata"]["deletionTimestamp"].is_null()
}

/// One action per Deployment whose rollout is not complete.
fn step_locked(shared: &Shared, inner: &mut Inner, which: &dyn Fn(&Value) -> bool) -> bool {
    let mut moved = false;
    for d in deployments(inner).into_iter().filter(|d| which(d)) {
        let ns = d["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let hash = template_hash(&d["spec"]["template"]);
        let desired = d["spec"]["replicas"].as_u64().unwrap_or(1) as usize;
        let rss = owned_by(inner, Kind::ReplicaSet, &ns, &d["metadata"]["uid"]);
        let Some(new_rs) = rss
            .iter()
            .find(|rs| rs["metadata"]["labels"]["pod-template-hash"] == json!(hash))
            .cloned()
        else {
            continue;
        };
        let mut new_pods = vec![];
        let mut old_pods = vec![];
        for rs in &rss {
            for p in owned_by(inner, Kind::Pod, &ns, &rs["metadata"]["uid"]) {
                if rs["metadata"]["uid"] == new_rs["metadata"]["uid"] {
                    new_pods.push(p);
                } else {
                    old_pods.push(p);
                }
            }
        }
        let live_new: Vec<&Value> = new_pods.iter().filter(|p| !terminating(p)).collect();
        if live_new.len() < desired {
            create_pod(shared, inner, &new_rs);
        } else if live_new.len() > desired {
            let p = live_new[live_new.len() - 1].clone();
            start_terminating(shared, inner, p);
        } else if let Some(p) = live_new.iter().find(|p| !is_ready(p)) {
            make_ready(shared, inner, (*p).clone());
        } else if let Some(p) = old_pods.iter().find(|p| !terminating(p)) {
            start_terminating(shared, inner, p.clone());
        } else if let Some(p) = old_pods.iter().chain(&new_pods).find(|p| terminating(p)) {
            remove(shared, inner, Kind::Pod, &p.clone());
        } else {
            continue;
        }
        moved = true;
    }
    moved
}

fn create_pod(shared: &Shared, inner: &mut Inner, rs: &Value) {
    inner.pods += 1;
    inner.uids += 1;
    let suffix: String = template_hash(&json!(inner.pods)).chars().take(5).collect();
    let template = &rs["spec"]["template"];
    let statuses: Vec<Value> = template["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            json!({"name": c["name"], "image": normalize_image(c["image"].as_str().unwrap_or_default()),
                "imageID": "", "ready": false, "started": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ContainerCreating"}}})
        })
        .collect();
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": format!("{}-{suffix}", rs["metadata"]["name"].as_str().unwrap_or_default()),
            "namespace": rs["metadata"]["namespace"],
            "uid": format!("00000000-0000-4000-8000-{:012x}", inner.uids),
            "creationTimestamp": now_rfc3339(),
            "labels": template["metadata"]["labels"],
            "annotations": template["metadata"]["annotations"],
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": rs["metadata"]["name"], "uid": rs["metadata"]["uid"], "controller": true,
                "blockOwnerDeletion": true}],
        },
        "spec": template["spec"],
        "status": {"phase": "Pending", "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": statuses},
    });
    commit(shared, inner, Kind::Pod, "ADDED", pod);
}

fn make_ready(shared: &Shared, inner: &mut Inner, mut pod: Value) {
    let statuses: Vec<Value> = pod["status"]["containerStatuses"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|mut s| {
            let image = s["image"].as_str().unwrap_or_default().to_owned();
            let digest = digest_locked(inner, &image);
            let repo = image_repo(&image);
            s["imageID"] = json!(format!("{repo}@sha256:{digest}"));
            s["ready"] = json!(true);
            s["started"] = json!(true);
            s["state"] = json!({"running": {"startedAt": now_rfc3339()}});
            s
        })
        .collect();
    pod["status"] = json!({"phase": "Running", "podIP": "10.0.0.1",
        "conditions": [{"type": "Ready", "status": "True"}], "containerStatuses": statuses});
    commit(shared, inner, Kind::Pod, "MODIFIED", pod);
}

fn start_terminating(shared: &Shared, inner: &mut Inner, mut pod: Value) {
    pod["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
    pod["metadata"]["deletionGracePeriodSeconds"] = json!(30);
    commit(shared, inner, Kind::Pod, "MODIFIED", pod);
}

/// ReplicaSet and Deployment status from the pods, written only on change.
fn sync_status(shared: &Shared, inner: &mut Inner) {
    for d in deployments(inner) {
        let ns = d["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let hash = template_hash(&d["spec"]["template"]);
        let desired = d["spec"]["replicas"].as_u64().unwrap_or(1);
        let (mut total, mut updated, mut ready) = (0u64, 0u64, 0u64);
        for rs in owned_by(inner, Kind::ReplicaSet, &ns, &d["metadata"]["uid"]) {
            let pods: Vec<Value> = owned_by(inner, Kind::Pod, &ns, &rs["metadata"]["uid"])
                .into_iter()
                .filter(|p| !terminating(p))
                .collect();
            let n = pods.len() as u64;
            let r = pods.iter().filter(|p| is_ready(p)).count() as u64;
            let is_new = rs["metadata"]["labels"]["pod-template-hash"] == json!(hash);
            total += n;
            ready += r;
            if is_new {
                updated += n;
            }
            let mut next = rs.clone();
            next["spec"]["replicas"] = json!(if is_new { desired } else { 0 });
            next["status"] = json!({"replicas": n, "readyReplicas": r, "availableReplicas": r,
                "fullyLabeledReplicas": n, "observedGeneration": 1});
            if next != rs {
                commit(shared, inner, Kind::ReplicaSet, "MODIFIED", next);
            }
        }
        let complete = updated == desired && total == desired && ready == desired;
        let mut next = d.clone();
        next["status"] = json!({
            "observedGeneration": d["metadata"]["generation"],
            "replicas": total, "updatedReplicas": updated, "readyReplicas": ready,
            "availableReplicas": ready, "unavailableReplicas": desired.saturating_sub(ready),
            "conditions": [
                {"type": "Available", "status": if ready >= desired { "True" } else { "False" }},
                {"type": "Progressing", "status": "True",
                 "reason": if complete { "NewReplicaSetAvailable" } else { "ReplicaSetUpdated" }},
            ],
        });
        if next != d {
            commit(shared, inner, Kind::Deployment, "MODIFIED", next);
        }
    }
}

// ---------------------------------------------------------------- images

/// Docker's normalisation: `nginx:1` → `docker.io/library/nginx:1`.
pub fn normalize_image(image: &str) -> String {
    let (name, tag) = match image.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => (n.to_owned(), t.to_owned()),
        _ => (image.to_owned(), "latest".to_owned()),
    };
    let name = match name.split_once('/') {
        None => format!("docker.io/library/{name}"),
        Some((host, _)) if host.contains('.') || host.contains(':') || host == "localhost" => name,
        Some(_) => format!("docker.io/{name}"),
    };
    format!("{name}:{tag}")
}

fn image_repo(image: &str) -> String {
    let n = normalize_image(image);
    n.rsplit_once(':').map_or(n.clone(), |(r, _)| r.to_owned())
}

fn digest_locked(inner: &mut Inner, image: &str) -> String {
    let key = normalize_image(image);
    inner
        .digests
        .entry(key.clone())
        .or_insert_with(|| fake_digest(&key))
        .clone()
}

fn fake_digest(seed: &str) -> String {
    let mut out = String::new();
    let mut h: u64 = 0x8422_2325_cbf2_9ce4;
    for round in 0..4u8 {
        for b in seed.bytes().chain([round]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        out.push_str(&format!("{h:016x}"));
    }
    out
}

// ---------------------------------------------------------------- selectors

/// Label and field selectors, as the API server reads them.
#[derive(Clone, Debug, Default)]
struct Selector {
    labels: Vec<Requirement>,
    fields: Vec<(String, String, bool)>,
}

#[derive(Clone, Debug)]
enum Requirement {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    Absent(String),
}

impl Selector {
    fn parse(q: &HashMap<String, String>) -> Result<Self, String> {
        let mut s = Selector::default();
        if let Some(l) = q.get("labelSelector") {
            for part in split_top(l) {
                let part = part.trim();
                if part.is_empty() {
                    continue;
                }
                let req = if let Some((k, v)) = part.split_once("!=") {
                    Requirement::Ne(k.trim().into(), v.trim().into())
                } else if let Some((k, v)) = part.split_once("==") {
                    Requirement::Eq(k.trim().into(), v.trim().into())
                } else if let Some((k, v)) = part.split_once('=') {
                    Requirement::Eq(k.trim().into(), v.trim().into())
                } else if let Some((k, v)) = part.split_once(" notin ") {
                    Requirement::NotIn(k.trim().into(), set(v)?)
                } else if let Some((k, v)) = part.split_once(" in ") {
                    Requirement::In(k.trim().into(), set(v)?)
                } else if let Some(k) = part.strip_prefix('!') {
                    Requirement::Absent(k.trim().into())
                } else if part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
                {
                    Requirement::Exists(part.into())
                } else {
                    return Err(format!("unable to parse requirement: {part:?}"));
                };
                s.labels.push(req);
            }
        }
        if let Some(f) = q.get("fieldSelector") {
            for part in f.split(',').filter(|p| !p.is_empty()) {
                let (k, v, eq) = if let Some((k, v)) = part.split_once("!=") {
                    (k, v, false)
                } else if let Some((k, v)) = part.split_once("==") {
                    (k, v, true)
                } else if let Some((k, v)) = part.split_once('=') {
                    (k, v, true)
                } else {
                    return Err(format!("invalid field selector: {part:?}"));
                };
                if !["metadata.name", "metadata.namespace"].contains(&k) {
                    return Err(format!("field label not supported: {k}"));
                }
                s.fields.push((k.into(), v.into(), eq));
            }
        }
        Ok(s)
    }

    fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        let label = |k: &str| labels.get(k).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|r| match r {
            Requirement::Eq(k, v) => label(k) == Some(v),
            Requirement::Ne(k, v) => label(k) != Some(v),
            Requirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::NotIn(k, vs) => label(k).is_none_or(|l| !vs.iter().any(|v| v == l)),
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::Absent(k) => label(k).is_none(),
        });
        let fields_ok = self.fields.iter().all(|(k, v, eq)| {
            let actual = match k.as_str() {
                "metadata.name" => obj["metadata"]["name"].as_str(),
                _ => obj["metadata"]["namespace"].as_str(),
            };
            (actual == Some(v.as_str())) == *eq
        });
        labels_ok && fields_ok
    }
}

/// Splits on commas outside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let mut out = vec![];
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn set(v: &str) -> Result<Vec<String>, String> {
    let v = v.trim();
    let inner = v
        .strip_prefix('(')
        .and_then(|v| v.strip_suffix(')'))
        .ok_or_else(|| format!("expected a set in parentheses, got {v:?}"))?;
    Ok(inner.split(',').map(|s| s.trim().to_owned()).collect())
}

// ---------------------------------------------------------------- responses

fn json_response(code: u16, v: &Value) -> Response {
    (
        StatusCode::from_u16(code).unwrap(),
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(v).unwrap(),
    )
        .into_response()
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    json_response(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}),
    )
}

fn status_with(code: u16, reason: &str, message: &str, kind: Kind, name: &str) -> Response {
    json_response(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code,
            "details": {"name": name, "group": kind.api_version().split_once('/').map_or("", |(g, _)| g),
                "kind": kind.plural()}}),
    )
}

fn not_found(kind: Kind, name: &str) -> Response {
    status_with(
        404,
        "NotFound",
        &format!("{} \"{name}\" not found", kind.plural()),
        kind,
        name,
    )
}

pub fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}
