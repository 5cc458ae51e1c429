//! Kubernetes sources against the fake API server (`fake_kube`): versions
//! announced once a rollout is really live, Events streamed, the
//! spa-reloader compatible listener, and the fake's own fidelity checked
//! with the real `kubectl`.
//!
//! "Nothing was announced" is shown without sleeping: a sentinel
//! Deployment in the same namespace is rolled out after the change under
//! test; once its announcement arrives, herald has seen every earlier
//! change (each watch delivers in order), and a marker published to the
//! channel under test must be the next thing its subscriber reads.

use std::path::PathBuf;

use futures_util::{SinkExt, StreamExt};
use herald::config::Config;
use herald::k8s::{AnnounceOn, Deployments, EventScope};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::fake_kube::{FakeKube, Kind, now_rfc3339};
use crate::support::{Sse, TestHub, WAIT, config, eventually, tempdir};

const NS: &str = "apps";

fn channel(name: &str) -> String {
    format!("k8s.deployment:{NS}:{name}")
}

/// The fake with `web` (two containers, 2 replicas) and `sentinel` rolled
/// out, and herald watching them.
struct Env {
    fake: FakeKube,
    hub: TestHub,
    sentinel: Sse,
    markers: u32,
}

impl Env {
    async fn start(targets: Vec<Deployments>) -> Self {
        Self::start_with(targets, |_| {}).await
    }

    async fn start_with(mut targets: Vec<Deployments>, tweak: impl FnOnce(&mut Config)) -> Self {
        let fake = FakeKube::start().await;
        fake.create(FakeKube::deployment(
            NS,
            "web",
            2,
            &[("app", "app:v1"), ("proxy", "proxy:1")],
        ));
        fake.create(FakeKube::deployment(
            NS,
            "sentinel",
            1,
            &[("s", "sentinel:1")],
        ));
        fake.settle();
        targets.push(Deployments::parse_named(&format!("{NS}/sentinel")).unwrap());
        let hub = herald_on(&fake, targets, tweak).await;
        let mut sentinel = hub.sse(&format!("/channel/{}", channel("sentinel"))).await;
        version(&mut sentinel).await;
        Self {
            fake,
            hub,
            sentinel,
            markers: 0,
        }
    }

    async fn sub(&self, name: &str) -> Sse {
        self.hub.sse(&format!("/channel/{}", channel(name))).await
    }

    /// Returns once herald has seen every change made so far.
    async fn barrier(&mut self) {
        self.fake.restart(NS, "sentinel");
        self.fake.settle_deployment(NS, "sentinel");
        version(&mut self.sentinel).await;
    }

    /// Asserts that nothing was announced to `sub` since its last read.
    async fn assert_quiet(&mut self, sub: &mut Sse, name: &str) {
        self.barrier().await;
        self.markers += 1;
        let marker = format!("marker-{}", self.markers);
        self.hub.publish(&channel(name), &marker).await;
        let ev = sub.next().await;
        assert_eq!(ev.data, marker, "unexpected announcement: {ev:?}");
    }
}

async fn herald_on(
    fake: &FakeKube,
    targets: Vec<Deployments>,
    tweak: impl FnOnce(&mut Config),
) -> TestHub {
    let mut c = config();
    c.kube.kubeconfig = Some(fake.kubeconfig(&tempdir()));
    c.kube.deployments = targets;
    tweak(&mut c);
    TestHub::with(c).await
}

/// Waits until `/readyz` answers 200 (every watcher has listed).
async fn ready(hub: &TestHub) {
    eventually(|| async {
        hub.http
            .get(hub.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status()
            == 200
    })
    .await;
}

fn all() -> Vec<Deployments> {
    vec![Deployments::parse_all(NS).unwrap()]
}

/// The next event must be a version announcement.
async fn version(sub: &mut Sse) -> Value {
    let ev = sub.next().await;
    assert_eq!(ev.event, "version", "{ev:?}");
    serde_json::from_str(&ev.data).unwrap()
}

fn hash_of(fake: &FakeKube, name: &str) -> String {
    let d = fake.get(Kind::Deployment, NS, name).unwrap();
    let rev = d["metadata"]["annotations"]["deployment.kubernetes.io/revision"].clone();
    fake.list(Kind::ReplicaSet, NS)
        .into_iter()
        .find(|rs| {
            rs["metadata"]["ownerReferences"][0]["name"] == name
                && rs["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == rev
        })
        .unwrap()["metadata"]["labels"]["pod-template-hash"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn a_new_tag_is_announced_once_the_rollout_is_complete() {
    let mut env = Env::start(all()).await;
    let mut before = env.sub("web").await;
    let first = version(&mut before).await;
    let v1 = env.fake.digest("app:v1");
    assert_eq!(first["namespace"], NS);
    assert_eq!(first["name"], "web");
    assert_eq!(
        first["current_image"],
        json!({"name": "docker.io/library/app:v1", "sha256": v1})
    );
    assert!(first.get("previous_image").is_none(), "{first}");
    assert_eq!(
        first["images"],
        json!([
            {"container": "app", "name": "docker.io/library/app:v1", "sha256": v1},
            {"container": "proxy", "name": "docker.io/library/proxy:1", "sha256": env.fake.digest("proxy:1")},
        ])
    );
    assert_eq!(first["revision"], 1);
    assert_eq!(first["pod_template_hash"], hash_of(&env.fake, "web"));
    let created = first["created_at"].as_str().unwrap();
    assert!(created.parse::<jiff::Timestamp>().is_ok(), "{created}");

    env.fake.set_image(NS, "web", "app", "app:v2");
    // Every new pod Ready, the old ones still running: not yet.
    while env.fake.pods(NS, "web").0 < 2 {
        env.fake.step_deployment(NS, "web");
    }
    assert_eq!(env.fake.pods(NS, "web").1, 2);
    env.assert_quiet(&mut before, "web").await;
    // Old pods terminating: not yet either.
    env.fake.step_deployment(NS, "web");
    env.fake.step_deployment(NS, "web");
    assert_eq!(env.fake.pods(NS, "web").1, 2);
    env.assert_quiet(&mut before, "web").await;

    env.fake.settle_deployment(NS, "web");
    let v = version(&mut before).await;
    let v2 = env.fake.digest("app:v2");
    assert_eq!(
        v["current_image"],
        json!({"name": "docker.io/library/app:v2", "sha256": v2})
    );
    assert_eq!(
        v["previous_image"],
        json!({"name": "docker.io/library/app:v1", "sha256": v1})
    );
    assert_eq!(v["revision"], 2);
    assert_eq!(v["pod_template_hash"], hash_of(&env.fake, "web"));
    assert_ne!(v["pod_template_hash"], first["pod_template_hash"]);
    assert!(v["created_at"].as_str().unwrap() > first["created_at"].as_str().unwrap());

    // A subscriber that arrives later learns the current version at once.
    let mut after = env.sub("web").await;
    assert_eq!(version(&mut after).await, v);
    env.assert_quiet(&mut before, "web").await;
}

#[tokio::test]
async fn a_re_pushed_tag_is_a_new_version() {
    let mut env = Env::start(all()).await;
    let mut sub = env.sub("web").await;
    let first = version(&mut sub).await;
    let old = env.fake.digest("app:v1");
    let new = env.fake.push_image("app:v1");
    assert_ne!(old, new);
    // The pods are replaced (same template), and pull the new digest.
    for p in env.fake.list(Kind::Pod, NS) {
        if p["metadata"]["labels"]["app"] == "web" {
            env.fake
                .delete(Kind::Pod, NS, p["metadata"]["name"].as_str().unwrap());
        }
    }
    env.fake.settle_deployment(NS, "web");
    let v = version(&mut sub).await;
    assert_eq!(v["current_image"]["name"], "docker.io/library/app:v1");
    assert_eq!(v["current_image"]["sha256"], new);
    assert_eq!(v["previous_image"]["sha256"], old);
    assert_eq!(v["pod_template_hash"], first["pod_template_hash"]);
    env.assert_quiet(&mut sub, "web").await;
}

#[tokio::test]
async fn a_rollout_restart_is_a_new_version() {
    let mut env = Env::start(all()).await;
    let mut sub = env.sub("web").await;
    let first = version(&mut sub).await;
    env.fake.restart(NS, "web");
    env.fake.settle_deployment(NS, "web");
    let v = version(&mut sub).await;
    assert_eq!(v["current_image"], first["current_image"]);
    assert_ne!(v["pod_template_hash"], first["pod_template_hash"]);
    assert_eq!(v["revision"], 2);
    env.assert_quiet(&mut sub, "web").await;
}

#[tokio::test]
async fn scaling_and_resyncs_announce_nothing() {
    let mut env = Env::start_with(all(), |c| {
        c.kube.resync = std::time::Duration::from_millis(20);
    })
    .await;
    let mut sub = env.sub("web").await;
    version(&mut sub).await;
    env.fake.scale(NS, "web", 4);
    env.fake.settle_deployment(NS, "web");
    env.assert_quiet(&mut sub, "web").await;
    env.fake.scale(NS, "web", 1);
    env.fake.settle_deployment(NS, "web");
    env.assert_quiet(&mut sub, "web").await;
    // Writes that change nothing, as a resync or a status update makes them.
    env.fake.touch(Kind::Deployment, NS, "web");
    for p in env.fake.list(Kind::Pod, NS) {
        env.fake
            .touch(Kind::Pod, NS, p["metadata"]["name"].as_str().unwrap());
    }
    env.assert_quiet(&mut sub, "web").await;
}

#[tokio::test]
async fn an_expired_watch_mid_rollout_gives_exactly_one_announcement() {
    let mut env = Env::start(vec![
        Deployments::parse_named(&format!("{NS}/web")).unwrap(),
    ])
    .await;
    let mut sub = env.sub("web").await;
    version(&mut sub).await;
    let lists_before = list_requests(&env.fake);
    env.fake.set_image(NS, "web", "app", "app:v2");
    for _ in 0..3 {
        env.fake.step_deployment(NS, "web");
    }
    env.fake.expire_history();
    env.fake.step_deployment(NS, "web");
    // herald re-lists after the 410 (no resume from the expired version).
    eventually(|| async { list_requests(&env.fake) > lists_before }).await;
    env.fake.settle_deployment(NS, "web");
    let v = version(&mut sub).await;
    assert_eq!(v["current_image"]["name"], "docker.io/library/app:v2");
    env.assert_quiet(&mut sub, "web").await;
    // The watches asked for bookmarks.
    assert!(
        env.fake
            .requests()
            .iter()
            .any(|r| r.contains("watch=true") && r.contains("allowWatchBookmarks=true"))
    );
}

fn list_requests(fake: &FakeKube) -> usize {
    fake.requests()
        .iter()
        .filter(|r| r.starts_with("GET ") && r.contains("/pods?") && !r.contains("watch=true"))
        .count()
}

#[tokio::test]
async fn an_api_server_outage_mid_rollout_delays_the_announcement_and_loses_nothing() {
    let mut env = Env::start(all()).await;
    let mut sub = env.sub("web").await;
    version(&mut sub).await;
    env.fake.set_image(NS, "web", "app", "app:v2");
    env.fake.step_deployment(NS, "web");
    env.fake.step_deployment(NS, "web");
    env.fake.set_down(true);
    let seen = env.fake.requests().len();
    // herald notices and keeps trying with backoff: its pod watch fails
    // five times (503) before the server is back.
    eventually(|| async {
        env.fake.requests()[seen..]
            .iter()
            .filter(|r| r.contains("/pods"))
            .count()
            >= 5
    })
    .await;
    env.fake.settle_deployment(NS, "web");
    env.fake.set_down(false);
    let v = version(&mut sub).await;
    assert_eq!(v["current_image"]["name"], "docker.io/library/app:v2");
    assert_eq!(v["previous_image"]["name"], "docker.io/library/app:v1");
    env.assert_quiet(&mut sub, "web").await;
}

#[tokio::test]
async fn several_deployments_are_announced_each_on_its_own_channel() {
    let mut env = Env::start(vec![
        Deployments::parse_selected(&format!("{NS}/app in (web,api)")).unwrap(),
    ])
    .await;
    env.fake
        .create(FakeKube::deployment(NS, "api", 1, &[("api", "api:1")]));
    env.fake.settle_deployment(NS, "api");
    let mut web = env.sub("web").await;
    let mut api = env.sub("api").await;
    version(&mut web).await;
    assert_eq!(
        version(&mut api).await["current_image"]["name"],
        "docker.io/library/api:1"
    );
    env.fake.set_image(NS, "web", "app", "app:v3");
    env.fake.set_image(NS, "api", "api", "api:2");
    while env.fake.step_deployment(NS, "web") | env.fake.step_deployment(NS, "api") {}
    assert_eq!(
        version(&mut web).await["current_image"]["name"],
        "docker.io/library/app:v3"
    );
    assert_eq!(
        version(&mut api).await["current_image"]["name"],
        "docker.io/library/api:2"
    );
    env.assert_quiet(&mut web, "web").await;
    env.assert_quiet(&mut api, "api").await;
    // A Deployment the selector does not match is not announced.
    let other = env.hub.sse(&format!("/channel/{}", channel("other"))).await;
    env.fake
        .create(FakeKube::deployment(NS, "other", 1, &[("o", "o:1")]));
    env.fake.settle_deployment(NS, "other");
    let mut other = other;
    env.assert_quiet(&mut other, "other").await;
}

#[tokio::test]
async fn first_ready_announces_with_the_first_new_ready_pod() {
    let mut env = Env::start_with(all(), |c| c.kube.announce_on = AnnounceOn::FirstReady).await;
    let mut sub = env.sub("web").await;
    version(&mut sub).await;
    env.fake.set_image(NS, "web", "app", "app:v2");
    while env.fake.pods(NS, "web").0 < 1 {
        env.fake.step_deployment(NS, "web");
    }
    // Old pods are all still there, and nothing else will move.
    assert_eq!(env.fake.pods(NS, "web").1, 2);
    let v = version(&mut sub).await;
    assert_eq!(v["current_image"]["name"], "docker.io/library/app:v2");
    env.fake.settle_deployment(NS, "web");
    env.assert_quiet(&mut sub, "web").await;
}

#[tokio::test]
async fn readyz_waits_for_the_first_list() {
    let fake = FakeKube::start().await;
    fake.set_down(true);
    let hub = herald_on(&fake, all(), |_| {}).await;
    let r = hub.http.get(hub.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "syncing");
    assert_eq!(hub.status().await["kubernetes"]["synced"], false);
    fake.set_down(false);
    ready(&hub).await;
    assert_eq!(hub.status().await["kubernetes"]["synced"], true);
    // The watchers end with the node.
    let mut hub = hub;
    hub.stop().await;
}

#[tokio::test]
async fn a_kubeconfig_that_cannot_be_read_stops_the_start() {
    let mut c = config();
    c.kube.kubeconfig = Some(tempdir().join("missing"));
    c.kube.deployments = all();
    let e = herald::app::App::bind(c).await.unwrap_err().to_string();
    assert!(e.contains("--kubeconfig"), "{e}");
}

fn event(name: &str, reason: &str, count: u32) -> Value {
    let now = now_rfc3339();
    json!({
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": name, "namespace": NS},
        "involvedObject": {"kind": "Pod", "namespace": NS, "name": "web-abc"},
        "reason": reason, "message": format!("{reason} happened"), "type": "Normal",
        "count": count, "firstTimestamp": now, "lastTimestamp": now,
        "source": {"component": "kubelet"},
    })
}

#[tokio::test]
async fn events_are_streamed_and_listed_on_get_events() {
    let fake = FakeKube::start().await;
    fake.create(event("old", "Pulled", 1));
    let hub = herald_on(&fake, vec![], |c| {
        c.kube.events = vec![EventScope::parse(NS).unwrap()];
    })
    .await;
    ready(&hub).await;
    let mut sub = hub.sse(&format!("/channel/k8s.events:{NS}")).await;
    fake.create(event("new", "Started", 1));
    let ev = sub.next().await;
    assert_eq!(ev.event, "k8s.event");
    let e: Value = serde_json::from_str(&ev.data).unwrap();
    assert_eq!(
        e["reason"], "Started",
        "events from before the start are not news"
    );
    assert_eq!(e["message"], "Started happened");
    assert_eq!(e["type"], "Normal");
    assert_eq!(
        e["involvedObject"],
        json!({"kind": "Pod", "namespace": NS, "name": "web-abc"})
    );
    assert_eq!(e["count"], 1);
    assert!(e["firstTimestamp"].is_string() && e["lastTimestamp"].is_string());
    // An update is streamed again.
    fake.patch(Kind::Event, NS, "new", json!({"count": 2}));
    let e: Value = serde_json::from_str(&sub.next_data().await).unwrap();
    assert_eq!(
        (e["reason"].as_str(), e["count"].as_u64()),
        (Some("Started"), Some(2))
    );
    // After a re-list, only what changed in the gap is streamed.
    fake.expire_history();
    fake.create(event("gap", "Killing", 1));
    let e: Value = serde_json::from_str(&sub.next_data().await).unwrap();
    assert_eq!(e["reason"], "Killing");
    fake.create(event("later", "Scheduled", 1));
    let e: Value = serde_json::from_str(&sub.next_data().await).unwrap();
    assert_eq!(e["reason"], "Scheduled");

    // The crane UI's request, token and all.
    let mut ws = hub.ws("").await;
    ws.send_json(
        json!({"type": "GET_EVENTS", "namespace": NS, "token": {"access_token": "s3cret"}}),
    )
    .await;
    let reply = ws.next_json().await;
    assert_eq!(reply["type"], "GET_EVENTS", "{reply}");
    assert_eq!(reply["data"]["kind"], "EventList");
    let mut names: Vec<&str> = reply["data"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["gap", "later", "new", "old"]);
    // Malformed and unanswerable requests get error frames; the socket lives on.
    for (bad, says) in [
        (json!({"type": "GET_EVENTS"}), "needs a namespace"),
        (
            json!({"type": "GET_EVENTS", "namespace": "other"}),
            "not watched",
        ),
        (
            json!({"type": "GET_EVENTS", "namespace": 7}),
            "invalid message",
        ),
        (
            json!({"type": "GET_EVENTS", "namespace": NS, "extra": 1}),
            "invalid message",
        ),
        (json!("GET_EVENTS"), "invalid message"),
    ] {
        ws.send_json(bad.clone()).await;
        let r = ws.next_json().await;
        assert_eq!(r["type"], "error", "{bad} -> {r}");
        assert!(r["error"].as_str().unwrap().contains(says), "{bad} -> {r}");
    }
    ws.socket.send(Message::text("{not json")).await.unwrap();
    assert_eq!(ws.next_json().await["type"], "error");
    ws.send_json(json!({"type": "GET_EVENTS", "namespace": NS}))
        .await;
    assert_eq!(ws.next_json().await["type"], "GET_EVENTS");
    // ...then the live stream, if it subscribes.
    ws.send_json(json!({"type": "subscribe", "channel": format!("k8s.events:{NS}")}))
        .await;
    assert_eq!(ws.next_json().await["type"], "subscribed");
    fake.create(event("live", "Pulling", 1));
    let live = ws.next_json().await;
    assert_eq!(live["channel"], format!("k8s.events:{NS}"));
    assert_eq!(live["data"]["reason"], "Pulling");
}

#[tokio::test]
async fn get_events_without_kubernetes_says_how_to_enable_it() {
    let hub = TestHub::spawn().await;
    let mut ws = hub.ws("").await;
    ws.send_json(json!({"type": "GET_EVENTS", "namespace": "x"}))
        .await;
    let r = ws.next_json().await;
    assert_eq!(r["type"], "error");
    assert!(
        r["error"].as_str().unwrap().contains("--watch-events"),
        "{r}"
    );
}

/// Reads one text frame as JSON (it must be exactly one JSON value).
async fn frame(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> Value {
    loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame")
            .expect("open")
            .unwrap();
        match m {
            Message::Text(t) => {
                return serde_json::from_str(t.as_str()).expect("one JSON value per frame");
            }
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn the_spa_reloader_listener_sends_the_current_version_then_one_frame_per_version() {
    let mut env = Env::start_with(all(), |c| {
        c.spa_compat_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let compat = env.hub.compat.unwrap();
    // Every path upgrades.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{compat}/any/path?x=1"))
        .await
        .unwrap();
    let mut current = std::collections::BTreeMap::new();
    for _ in 0..2 {
        let v = frame(&mut ws).await;
        current.insert(v["name"].as_str().unwrap().to_owned(), v);
    }
    assert_eq!(current.keys().collect::<Vec<_>>(), ["sentinel", "web"]);
    assert_eq!(
        current["web"]["current_image"]["name"],
        "docker.io/library/app:v1"
    );
    // Two rollouts finishing together are two frames, never one joined.
    env.fake.set_image(NS, "web", "app", "app:v2");
    env.fake.restart(NS, "sentinel");
    env.fake.settle();
    let mut names = vec![];
    for _ in 0..2 {
        let v = frame(&mut ws).await;
        names.push(v["name"].as_str().unwrap().to_owned());
        if v["name"] == "web" {
            assert_eq!(v["current_image"]["name"], "docker.io/library/app:v2");
            assert_eq!(v["previous_image"]["name"], "docker.io/library/app:v1");
        }
    }
    names.sort();
    assert_eq!(names, ["sentinel", "web"]);
    version(&mut env.sentinel).await;
    // A plain GET is told what this port is.
    let r = env
        .hub
        .http
        .get(format!("http://{compat}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 426);
    assert!(r.text().await.unwrap().contains("WebSocket"));
    // Shutdown closes the compatible WebSocket too (1001) and ends.
    env.hub.stop().await;
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(u16::from(f.code), 1001);
                break;
            }
            Some(Ok(_)) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn events_of_every_namespace_go_to_their_own_channels() {
    let fake = FakeKube::start().await;
    let hub = herald_on(&fake, vec![], |c| {
        c.kube.events = vec![EventScope::parse("*").unwrap()];
    })
    .await;
    ready(&hub).await;
    let mut a = hub.sse("/channel/k8s.events:apps").await;
    let mut b = hub.sse("/channel/k8s.events:tools").await;
    fake.create(event("one", "Pulled", 1));
    let mut other = event("two", "Failed", 3);
    other["metadata"]["namespace"] = json!("tools");
    fake.create(other);
    let e: Value = serde_json::from_str(&a.next_data().await).unwrap();
    assert_eq!(e["reason"], "Pulled");
    let e: Value = serde_json::from_str(&b.next_data().await).unwrap();
    assert_eq!(
        (e["reason"].as_str(), e["count"].as_u64()),
        (Some("Failed"), Some(3))
    );
    let mut ws = hub.ws("").await;
    ws.send_json(json!({"type": "GET_EVENTS", "namespace": "tools"}))
        .await;
    let r = ws.next_json().await;
    assert_eq!(r["data"]["items"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["data"]["items"][0]["metadata"]["name"], "two");
}

/// The `kubectl` to check the fake with: `$KUBECTL`, else on `PATH`.
fn kubectl() -> Option<String> {
    let k = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    std::process::Command::new(&k)
        .args(["version", "--client"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| k)
}

struct Kubectl {
    bin: String,
    kubeconfig: PathBuf,
    dir: PathBuf,
}

impl Kubectl {
    /// Runs kubectl; returns (success, stdout + stderr).
    async fn run(&self, args: &[&str]) -> (bool, String) {
        let out = tokio::time::timeout(
            WAIT,
            tokio::process::Command::new(&self.bin)
                .arg("--kubeconfig")
                .arg(&self.kubeconfig)
                .args(args)
                .output(),
        )
        .await
        .expect("kubectl finishes")
        .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    async fn ok(&self, args: &[&str]) -> String {
        let (ok, text) = self.run(args).await;
        assert!(ok, "kubectl {args:?} failed: {text}");
        text
    }

    /// `kubectl VERB -f FILE` with `v` as the file. The fake serves no
    /// OpenAPI schema, so kubectl's client-side validation is off; the
    /// server still refuses what it must.
    async fn send(&self, verb: &str, v: &Value) -> (bool, String) {
        let p = self.dir.join(format!("{verb}.json"));
        std::fs::write(&p, serde_json::to_vec_pretty(v).unwrap()).unwrap();
        self.run(&[verb, "--validate=false", "-f", &p.to_string_lossy()])
            .await
    }
}

#[tokio::test]
async fn kubectl_agrees_with_the_fake() {
    let Some(bin) = kubectl() else {
        eprintln!(
            "SKIPPED kubectl_agrees_with_the_fake: no kubectl on this machine (scripts/test installs Debian's kubernetes-client)"
        );
        return;
    };
    let fake = FakeKube::start().await;
    let dir = tempdir();
    let k = Kubectl {
        bin,
        kubeconfig: fake.kubeconfig(&dir),
        dir,
    };
    let web = FakeKube::deployment(NS, "web", 2, &[("app", "app:v1"), ("proxy", "proxy:1")]);
    let (ok, out) = k.send("create", &web).await;
    assert!(ok && out.contains("deployment.apps/web created"), "{out}");
    let (ok, out) = k.send("create", &web).await;
    assert!(!ok && out.contains("already exists"), "{out}");
    fake.settle();

    let out = k.ok(&["get", "deployments", "-n", NS]).await;
    assert!(out.contains("web") && out.contains("2/2"), "{out}");
    let d: Value = serde_json::from_str(
        &k.ok(&["get", "deployment", "web", "-n", NS, "-o", "json"])
            .await,
    )
    .unwrap();
    assert_eq!(d["status"]["readyReplicas"], 2);
    assert_eq!(
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "1"
    );
    let pods = k
        .ok(&["get", "pods", "-n", NS, "-l", "app=web", "-o", "name"])
        .await;
    assert_eq!(pods.lines().count(), 2, "{pods}");
    let none = k
        .ok(&[
            "get",
            "pods",
            "-n",
            NS,
            "-l",
            "app in (nothing)",
            "-o",
            "name",
        ])
        .await;
    assert!(!none.contains("pod/"), "{none}");
    let rs = k.ok(&["get", "replicasets", "-n", NS, "-o", "name"]).await;
    assert!(rs.contains("replicaset.apps/web-"), "{rs}");

    // A watch sees what happens, live (`-o json` prints each change as a
    // watch event).
    let mut watch = tokio::process::Command::new(&k.bin)
        .arg("--kubeconfig")
        .arg(&k.kubeconfig)
        .args([
            "get",
            "deployments",
            "-n",
            NS,
            "-w",
            "--output-watch-events",
            "-o",
            "json",
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = watch.stdout.take().unwrap();
    let mut buf: Vec<u8> = vec![];
    let mut next_line = async || -> String {
        use tokio::io::AsyncReadExt;
        loop {
            let mut it = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
            if let Some(Ok(v)) = it.next() {
                let used = it.byte_offset();
                buf.drain(..used);
                return format!(
                    "{} {}",
                    v["type"].as_str().unwrap_or("?"),
                    v["object"]["metadata"]["name"].as_str().unwrap_or("?")
                );
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(WAIT, out.read(&mut chunk))
                .await
                .expect("watch output")
                .unwrap();
            assert!(n > 0, "the watch ended");
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    assert_eq!(next_line().await, "ADDED web");

    // Strategic merge keeps the other container.
    let out = k
        .ok(&["set", "image", "deployment/web", "app=app:v2", "-n", NS])
        .await;
    assert!(out.contains("image updated"), "{out}");
    let d = fake.get(Kind::Deployment, NS, "web").unwrap();
    let containers = &d["spec"]["template"]["spec"]["containers"];
    assert_eq!(containers[0]["image"], "app:v2");
    assert_eq!(containers[1]["image"], "proxy:1");
    assert_eq!(d["metadata"]["generation"], 2);
    assert_eq!(next_line().await, "MODIFIED web");
    fake.settle();
    let out = k
        .ok(&["rollout", "restart", "deployment/web", "-n", NS])
        .await;
    assert!(out.contains("restarted"), "{out}");
    let d = fake.get(Kind::Deployment, NS, "web").unwrap();
    assert!(
        d["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"]
            .is_string()
    );
    let out = k
        .ok(&["scale", "deployment/web", "--replicas=3", "-n", NS])
        .await;
    assert!(out.contains("scaled"), "{out}");
    assert_eq!(
        fake.get(Kind::Deployment, NS, "web").unwrap()["spec"]["replicas"],
        3
    );
    fake.settle();
    let d: Value = serde_json::from_str(
        &k.ok(&["get", "deployment", "web", "-n", NS, "-o", "json"])
            .await,
    )
    .unwrap();
    assert_eq!(d["status"]["readyReplicas"], 3);
    assert_eq!(
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "3"
    );

    let mut replaced = d.clone();
    replaced["spec"]["template"]["spec"]["containers"][1]["image"] = json!("proxy:2");
    let (ok, out) = k.send("replace", &replaced).await;
    assert!(ok && out.contains("replaced"), "{out}");
    // A stale resourceVersion is a conflict.
    let (ok, out) = k.send("replace", &d).await;
    assert!(!ok && out.contains("modified"), "{out}");

    let api = FakeKube::deployment(NS, "api", 1, &[("api", "api:1")]);
    assert!(k.send("create", &api).await.0);
    let mut seen = vec![];
    while !seen.iter().any(|l: &String| l == "ADDED api") {
        seen.push(next_line().await);
    }
    let out = k.ok(&["delete", "deployment", "api", "-n", NS]).await;
    assert!(out.contains("deleted"), "{out}");
    while next_line().await != "DELETED api" {}
    assert!(
        fake.list(Kind::Pod, NS)
            .iter()
            .all(|p| p["metadata"]["labels"]["app"] != "api")
    );
    let (ok, out) = k.run(&["get", "deployment", "api", "-n", NS]).await;
    assert!(!ok && out.contains("not found"), "{out}");
}

/// One line a Node spa-reloader client printed: a callback it fired.
async fn callback(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) -> Value {
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("a callback")
        .unwrap()
        .expect("the client is running");
    serde_json::from_str(&line).unwrap()
}

#[tokio::test]
async fn spa_reloader_clients_in_node_learn_the_current_version_then_the_next() {
    let node_ok = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !node_ok {
        eprintln!("SKIPPED: no node on this machine (scripts/test installs it)");
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node");
    assert!(
        dir.join("node_modules/ws").exists(),
        "tests/node has no node_modules: run `npm ci --prefix tests/node` (scripts/test does)"
    );
    let mut modes = vec!["contract"];
    if dir.join("node_modules/spa-reloader-vue").exists() {
        modes.push("package");
    } else {
        eprintln!(
            "NOTE: the npm package spa-reloader-vue is not installed (this machine's npm registry does not carry it); \
             only the client written to its documented rules runs"
        );
    }
    let fake = FakeKube::start().await;
    fake.create(FakeKube::deployment(NS, "web", 2, &[("app", "app:v1")]));
    fake.settle();
    let hub = herald_on(
        &fake,
        vec![Deployments::parse_named(&format!("{NS}/web")).unwrap()],
        |c| c.spa_compat_listen = Some("127.0.0.1:0".parse().unwrap()),
    )
    .await;
    let url = format!("ws://{}/ws", hub.compat.unwrap());
    let mut clients = vec![];
    for mode in modes {
        let mut child = tokio::process::Command::new("node")
            .arg(dir.join("spa-reloader-client.cjs"))
            .args([mode, &url])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(
            child.stdout.take().unwrap(),
        ));
        clients.push((mode, child, lines));
    }
    let v1 = fake.digest("app:v1");
    for (mode, _, lines) in &mut clients {
        let c = callback(lines).await;
        assert_eq!(c["received"]["current_image"]["sha256"], v1, "{mode}: {c}");
        assert!(c["stored"].is_null(), "{mode}: {c}");
    }
    fake.set_image(NS, "web", "app", "app:v2");
    fake.settle();
    let v2 = fake.digest("app:v2");
    for (mode, _, lines) in &mut clients {
        let c = callback(lines).await;
        assert_eq!(c["received"]["current_image"]["sha256"], v2, "{mode}: {c}");
        assert_eq!(c["received"]["previous_image"]["sha256"], v1, "{mode}: {c}");
        assert_eq!(c["stored"]["current_image"]["sha256"], v1, "{mode}: {c}");
    }
}

/// Figures for the record, not a pass/fail test (speed goals live in
/// benchmarks): `cargo test --test it k8s::figures -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "prints figures; run by hand"]
async fn figures() {
    let env = Env::start(all()).await;
    let mut sub = env.sub("web").await;
    version(&mut sub).await;
    let mut lat = vec![];
    for i in 0..50 {
        env.fake.set_image(NS, "web", "app", &format!("app:{i}"));
        env.fake.settle_deployment(NS, "web");
        let done = std::time::Instant::now();
        version(&mut sub).await;
        lat.push(done.elapsed());
    }
    lat.sort();
    println!(
        "rollout complete -> announcement received over SSE: median {:?}, p90 {:?}, max {:?} (50 rollouts)",
        lat[lat.len() / 2],
        lat[lat.len() * 9 / 10],
        lat[lat.len() - 1]
    );
    let before = env.fake.requests().len();
    tokio::time::sleep(std::time::Duration::from_secs(10)).await;
    let during = env.fake.requests().len() - before;
    println!(
        "API requests by herald in 10 s of idle watching (4 watches, bookmarks every 0.5 s): {during}"
    );
}

#[tokio::test]
async fn the_fakes_watches_honour_timeouts_bookmarks_and_expiry() {
    let fake = FakeKube::start_with(std::time::Duration::from_millis(100)).await;
    fake.create(FakeKube::deployment(NS, "web", 1, &[("app", "app:v1")]));
    let http = crate::support::http();
    let list: Value = http
        .get(format!(
            "{}/apis/apps/v1/namespaces/{NS}/deployments",
            fake.url()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();
    let watch = |q: String| {
        let http = http.clone();
        let url = format!(
            "{}/apis/apps/v1/namespaces/{NS}/deployments?watch=true&{q}",
            fake.url()
        );
        async move {
            let body = tokio::time::timeout(WAIT, async {
                http.get(url).send().await.unwrap().text().await.unwrap()
            })
            .await
            .expect("the watch ends by itself");
            body.lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .collect::<Vec<_>>()
        }
    };
    // Bookmarks carry the current version; the stream ends at its timeout.
    let events = watch(format!(
        "resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=1"
    ))
    .await;
    assert!(!events.is_empty());
    assert!(events.iter().all(|e| e["type"] == "BOOKMARK"), "{events:?}");
    assert_eq!(
        events[0]["object"]["metadata"]["resourceVersion"],
        rv.as_str()
    );
    // Changes after the version resumed from are replayed.
    fake.scale(NS, "web", 2);
    let events = watch(format!("resourceVersion={rv}&timeoutSeconds=1")).await;
    assert_eq!(events[0]["type"], "MODIFIED");
    assert_eq!(events[0]["object"]["spec"]["replicas"], 2);
    // An expired version is 410 Gone, as a watch ERROR event.
    fake.expire_history();
    let events = watch(format!("resourceVersion={rv}&timeoutSeconds=1")).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["type"], "ERROR");
    assert_eq!(events[0]["object"]["code"], 410);
    // Bad input is refused as the real server does.
    let r = http
        .get(format!(
            "{}/api/v1/namespaces/{NS}/pods?labelSelector=a%20in%20b",
            fake.url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .get(format!(
            "{}/apis/apps/v1/namespaces/{NS}/deployments/nope",
            fake.url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["reason"], "NotFound");
}

/// Two replicas in a cluster, both watching: each rollout reaches a
/// subscriber once, not once per replica (both announce it with the same
/// idempotency key, and a node drops the copy it learns from the other).
/// A node's position in node b's stream. b publishes nothing but its
/// announcements, and none for a version it learnt from a first (its hub
/// drops that as a duplicate).
async fn b_position(h: &TestHub) -> u64 {
    let st = h.status().await;
    let pos = st["cluster"]["position"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    pos.split(',')
        .find_map(|e| e.strip_prefix("b="))
        .map_or(0, |id| id.parse::<u64>().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_that_all_watch_announce_each_rollout_once() {
    let fake = FakeKube::start().await;
    fake.create(FakeKube::deployment(NS, "web", 1, &[("app", "app:v1")]));
    fake.settle();
    let ports = [crate::support::free_port(), crate::support::free_port()];
    let peers: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let mut hubs = vec![];
    for (name, port) in [("a", ports[0]), ("b", ports[1])] {
        let peers = peers.clone();
        let hub = herald_on(&fake, all(), |c| {
            c.node_name = name.into();
            c.cluster.mode = herald::cluster::Mode::Static;
            c.cluster.peers = peers;
            c.cluster.internal_listen = format!("127.0.0.1:{port}").parse().unwrap();
        })
        .await;
        hubs.push(hub);
    }
    for h in &hubs {
        ready(h).await;
    }
    let (a, b) = (&hubs[0], &hubs[1]);
    let mut sub = a.sse(&format!("/channel/{}", channel("web"))).await;
    let mut markers = 0;
    for round in 0..3 {
        if round > 0 {
            fake.set_image(NS, "web", "app", &format!("app:v{}", round + 1));
            fake.settle_deployment(NS, "web");
        }
        let want = format!("docker.io/library/app:v{}", round + 1);
        let v = version(&mut sub).await;
        assert_eq!(v["current_image"]["name"], want);
        // b has this version (announced, or learnt from a) ...
        let mut on_b = b.sse(&format!("/channel/{}", channel("web"))).await;
        while version(&mut on_b).await["current_image"]["name"] != want.as_str() {}
        // ... and a has applied everything b published: b's announcement,
        // if b made one, has reached a ...
        eventually(|| async { b_position(a).await >= b_position(b).await }).await;
        // ... and was not delivered: the next event is a marker.
        markers += 1;
        let marker = format!("marker-{markers}");
        a.publish(&channel("web"), &marker).await;
        assert_eq!(sub.next().await.data, marker);
    }
}

/// The spa-reloader listener's pings leave a client a whole heartbeat to
/// answer too: after ticks have happened, a new client that never answers
/// is closed (1001) only after more than one heartbeat, not pinged at once
/// on connect and closed at the next tick.
#[tokio::test]
async fn the_spa_reloader_listener_gives_a_new_client_a_whole_heartbeat() {
    use crate::support::RawWs;
    let beat = std::time::Duration::from_millis(300);
    let env = Env::start_with(all(), |c| {
        c.spa_compat_listen = Some("127.0.0.1:0".parse().unwrap());
        c.heartbeat = beat;
    })
    .await;
    let compat = env.hub.compat.unwrap();
    // A first client sees a ping: the ticker has ticked.
    let mut first = RawWs::connect(compat, false, "/").await;
    while first.frame().await.expect("open").opcode != 9 {}
    let mut silent = RawWs::connect(compat, false, "/").await;
    let connected = std::time::Instant::now();
    loop {
        let f = silent.frame().await.expect("a close frame");
        if f.opcode == 8 {
            assert_eq!(f.close_code(), Some(1001));
            break;
        }
    }
    assert!(
        connected.elapsed() > beat,
        "closed after {:?}",
        connected.elapsed()
    );
}
