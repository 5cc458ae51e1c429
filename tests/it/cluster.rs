//! Clusters of real `herald serve` processes on loopback (static peers):
//! every event everywhere exactly once, resume across nodes, catch-up
//! after SIGKILL, no delay from a SIGSTOPped node, late joiners, sser's
//! endpoint, targeted and all-channel publishes across nodes.

use std::collections::HashMap;
use std::process::Stdio;

use serde_json::json;
use tokio::process::{Child, Command};

use crate::support::{Sse, WAIT, eventually, http, signal};

const BIN: &str = env!("CARGO_BIN_EXE_herald");

use crate::support::free_port;

/// Starting a node process for a test: no HERALD_LISTEN from the caller's
/// environment, no output (unless HERALD_TEST_LOGS names a directory for
/// the nodes' logs, for a failure that needs them), killed with the test.
trait Quiet {
    fn quiet(&mut self) -> Child;
}

impl Quiet for Command {
    fn quiet(&mut self) -> Child {
        let log = std::env::var_os("HERALD_TEST_LOGS").map(|dir| {
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path =
                std::path::Path::new(&dir).join(format!("node-{}-{n}.log", std::process::id()));
            std::fs::File::create(path).unwrap()
        });
        self.env_remove("HERALD_LISTEN")
            .stdout(Stdio::null())
            .stderr(log.map_or_else(Stdio::null, Stdio::from))
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }
}

/// Subscribes over SSE to a node's public port.
async fn subscribe_on(public: u16, channel: &str) -> Sse {
    Sse::from_response(
        http()
            .get(format!("http://127.0.0.1:{public}/channel/{channel}"))
            .send()
            .await
            .unwrap(),
    )
}

/// Publishes text on a node's public port.
async fn publish_on(public: u16, channel: &str, data: &str) {
    let r = http()
        .post(format!("http://127.0.0.1:{public}/channel/{channel}"))
        .body(data.to_owned())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
}

/// A node's peers from /status: (addr, state, node name).
async fn peers_on(public: u16) -> Option<Vec<(String, String, String)>> {
    let v: serde_json::Value = http()
        .get(format!("http://127.0.0.1:{public}/status"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    Some(
        v["cluster"]["peers"]
            .as_array()?
            .iter()
            .map(|p| {
                let s = |k: &str| p[k].as_str().unwrap_or_default().to_owned();
                (s("addr"), s("state"), s("node"))
            })
            .collect(),
    )
}

pub(crate) struct Node {
    pub(crate) name: String,
    pub(crate) public: u16,
    internal: u16,
    child: Option<Child>,
}

impl Node {
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.public)
    }
}

/// What carries a cluster's events.
#[derive(Clone)]
pub(crate) enum Via {
    /// The mesh: a static list of peers.
    Mesh,
    /// A Redis backplane at this URL.
    Redis(String),
    /// A NATS backplane at this URL.
    Nats(String),
}

pub(crate) struct Cluster {
    pub(crate) nodes: Vec<Node>,
    peers: String,
    via: Via,
    /// More `herald serve` flags for every node.
    pub(crate) extra: Vec<String>,
}

impl Cluster {
    /// `n` nodes that list each other (themselves included, as a shared
    /// static list would).
    async fn start(n: usize) -> Self {
        Self::start_via(n, Via::Mesh).await
    }

    /// `n` nodes sharing channels through `via`.
    pub(crate) async fn start_via(n: usize, via: Via) -> Self {
        Self::start_via_with(n, via, &[]).await
    }

    /// `n` nodes through `via`, with more `herald serve` flags.
    pub(crate) async fn start_via_with(n: usize, via: Via, extra: &[&str]) -> Self {
        let mut c = Self::new(n, via);
        c.extra = extra.iter().map(|s| s.to_string()).collect();
        for i in 0..n {
            c.spawn(i);
        }
        for i in 0..n {
            c.ready(i).await;
        }
        c
    }

    /// `n` nodes through `via`, once they answer (ready or not).
    pub(crate) async fn start_via_unready(n: usize, via: Via) -> Self {
        let mut c = Self::new(n, via);
        for i in 0..n {
            c.spawn(i);
            let url = c.nodes[i].url("/healthz");
            let h = http();
            eventually(|| {
                let (h, url) = (h.clone(), url.clone());
                async move { h.get(url).send().await.is_ok_and(|r| r.status() == 200) }
            })
            .await;
        }
        c
    }

    /// `n` nodes on free ports that list each other (themselves included,
    /// as a shared static list would), not started.
    fn new(n: usize, via: Via) -> Self {
        let nodes: Vec<Node> = (0..n)
            .map(|i| Node {
                name: format!("n{i}"),
                public: free_port(),
                internal: free_port(),
                child: None,
            })
            .collect();
        let peers = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.internal))
            .collect::<Vec<_>>()
            .join(",");
        Self {
            nodes,
            peers,
            via,
            extra: vec![],
        }
    }

    pub(crate) fn spawn(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        let (mode, flag, target) = match &self.via {
            Via::Mesh => ("static", "--peers", self.peers.clone()),
            Via::Redis(url) => ("redis", "--redis-url", url.clone()),
            Via::Nats(url) => ("nats", "--nats-url", url.clone()),
        };
        let child = Command::new(BIN)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{}", n.public),
                "--internal-listen",
                &format!("127.0.0.1:{}", n.internal),
                "--node-name",
                &n.name,
                "--cluster",
                mode,
                flag,
                &target,
                "--peer-timeout",
                "2s",
                "--heartbeat",
                "1s",
            ])
            .args(&self.extra)
            .quiet();
        n.child = Some(child);
    }

    pub(crate) async fn ready(&self, i: usize) {
        let url = self.nodes[i].url("/readyz");
        let h = http();
        eventually(|| {
            let (h, url) = (h.clone(), url.clone());
            async move { h.get(url).send().await.is_ok_and(|r| r.status() == 200) }
        })
        .await;
    }

    pub(crate) async fn publish(&self, i: usize, channel: &str, data: &str) {
        let r = http()
            .post(self.nodes[i].url(&format!("/channel/{channel}")))
            .body(data.to_owned())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{:?}", r.text().await);
    }

    pub(crate) async fn sse(&self, i: usize, channel: &str, last_event_id: Option<&str>) -> Sse {
        self.sse_at(i, &format!("/channel/{channel}"), last_event_id)
            .await
    }

    /// An SSE subscriber of node `i` at `path` (several channels).
    pub(crate) async fn sse_at(&self, i: usize, path: &str, last_event_id: Option<&str>) -> Sse {
        let mut req = http().get(self.nodes[i].url(path));
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        Sse::from_response(
            tokio::time::timeout(WAIT, req.send())
                .await
                .unwrap()
                .unwrap(),
        )
    }

    pub(crate) fn signal(&self, i: usize, sig: &str) {
        signal(self.nodes[i].child.as_ref().unwrap().id().unwrap(), sig);
    }

    pub(crate) async fn kill(&mut self, i: usize) {
        self.signal(i, "-KILL");
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.wait().await;
        }
    }
}

/// Reads `n` events; returns (data, id) pairs.
pub(crate) async fn read(sub: &mut Sse, n: usize) -> Vec<(String, String)> {
    let mut out = vec![];
    while out.len() < n {
        let ev = sub.next().await;
        out.push((ev.data, ev.id));
    }
    out
}

/// Asserts that the next event is a marker published now (so nothing else
/// was pending: no duplicate, nothing extra).
pub(crate) async fn assert_next_is_marker(
    c: &Cluster,
    node: usize,
    sub: &mut Sse,
    channel: &str,
    marker: &str,
) {
    c.publish(node, channel, marker).await;
    let ev = sub.next().await;
    assert_eq!(ev.data, marker, "unexpected event {ev:?}");
}

/// Every publisher's events arrive in its order, each exactly once.
fn check_exactly_once_in_order(got: &[(String, String)], publishers: usize, per: usize) {
    let mut seen: HashMap<String, Vec<usize>> = HashMap::new();
    for (data, _) in got {
        let (p, i) = data.split_once('-').unwrap();
        seen.entry(p.to_owned())
            .or_default()
            .push(i.parse().unwrap());
    }
    assert_eq!(seen.len(), publishers, "{got:?}");
    for (p, seq) in seen {
        assert_eq!(seq, (0..per).collect::<Vec<_>>(), "publisher {p}");
    }
}

pub(crate) async fn every_event_everywhere_once(n: usize, per: usize, via: Via) {
    let c = Cluster::start_via(n, via).await;
    let mut subs = vec![];
    for i in 0..n {
        subs.push(c.sse(i, "c", None).await);
    }
    for k in 0..per {
        for i in 0..n {
            c.publish(i, "c", &format!("p{i}-{k}")).await;
        }
    }
    let mut firsts = vec![];
    for s in &mut subs {
        let got = read(s, n * per).await;
        check_exactly_once_in_order(&got, n, per);
        firsts.push(got);
    }
    // Nothing else is pending anywhere: a marker is the next event.
    c.publish(0, "c", "end").await;
    for s in &mut subs {
        assert_eq!(s.next().await.data, "end");
    }
    // A subscriber moves: it read half of node 0's stream, then resumes on
    // the last node with that Last-Event-ID.
    let half = n * per / 2;
    let (_, resume_id) = firsts[0][half - 1].clone();
    for k in per..per + 3 {
        c.publish(1, "c", &format!("p1-{k}")).await;
    }
    let mut moved = c.sse(n - 1, "c", Some(&resume_id)).await;
    // The rest of the first batch, the markers, and the new ones.
    let want: Vec<String> = firsts[0][half..]
        .iter()
        .map(|(d, _)| d.clone())
        .chain(std::iter::once("end".to_owned()))
        .chain((per..per + 3).map(|k| format!("p1-{k}")))
        .collect();
    let got: Vec<String> = read(&mut moved, want.len())
        .await
        .into_iter()
        .map(|(d, _)| d)
        .collect();
    let mut got_sorted = got.clone();
    got_sorted.sort();
    let mut want_sorted = want.clone();
    want_sorted.sort();
    assert_eq!(got_sorted, want_sorted, "lost or repeated events on resume");
    assert_next_is_marker(&c, n - 1, &mut moved, "c", "after-move").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_deliver_every_event_everywhere_once_and_resume_across_nodes() {
    every_event_everywhere_once(3, 10, Via::Mesh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_deliver_every_event_everywhere_once_and_resume_across_nodes() {
    every_event_everywhere_once(5, 4, Via::Mesh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_resume_a_multi_channel_stream_exactly_after_a_cut_anywhere() {
    multi_channel_resume_is_exact(Via::Mesh).await;
}

/// Events of two channels published on every node in turn: each node's
/// multi-channel stream is in that node's apply order, a client cut after
/// any event resumes from its id on the same node with exactly the rest in
/// the same order, and on another node with exactly the rest.
pub(crate) async fn multi_channel_resume_is_exact(via: Via) {
    const PATH: &str = "/events?stream=a&stream=b";
    let c = Cluster::start_via(3, via).await;
    let mut live = vec![];
    for i in 0..3 {
        live.push(c.sse_at(i, PATH, None).await);
    }
    let n = 12;
    for k in 0..n {
        let channel = ["a", "b"][k % 2];
        c.publish(k % 3, channel, &format!("{channel}{}", k / 2))
            .await;
    }
    let mut resumed = vec![];
    for (i, sub) in live.iter_mut().enumerate() {
        let got = read(sub, n).await;
        for cut in 0..n {
            let (_, id) = &got[cut];
            let mut same = c.sse_at(i, PATH, Some(id)).await;
            let rest = read(&mut same, n - cut - 1).await;
            assert_eq!(rest, got[cut + 1..], "node {i}, resumed after event {cut}");
            let other = (i + 1 + cut % 2) % 3;
            let mut moved = c.sse_at(other, PATH, Some(id)).await;
            let mut rest: Vec<String> = read(&mut moved, n - cut - 1)
                .await
                .into_iter()
                .map(|(d, _)| d)
                .collect();
            rest.sort();
            let mut want: Vec<String> = got[cut + 1..].iter().map(|(d, _)| d.clone()).collect();
            want.sort();
            assert_eq!(rest, want, "node {i} -> node {other}, after event {cut}");
            resumed.push(same);
            resumed.push(moved);
        }
    }
    // Nothing else was pending on any of them.
    c.publish(1, "b", "marker").await;
    for s in resumed.iter_mut().chain(live.iter_mut()) {
        assert_eq!(s.next().await.data, "marker");
    }
    // A position from the future: a reset per channel and everything kept,
    // then live events (not hidden behind it).
    let future = "n0=9999999999999999,n1=9999999999999999,n2=9999999999999999";
    let mut s = c.sse_at(2, PATH, Some(future)).await;
    for _ in 0..2 {
        assert_eq!(s.next().await.event, "herald.reset");
    }
    assert_eq!(read(&mut s, n + 1).await.len(), n + 1);
    assert_next_is_marker(&c, 0, &mut s, "a", "after-future").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_catches_up_and_a_stopped_node_delays_no_one() {
    killed_node_catches_up(Via::Mesh).await;
}

pub(crate) async fn killed_node_catches_up(via: Via) {
    let mut c = Cluster::start_via(3, via).await;
    let mut s0 = c.sse(0, "k", None).await;
    c.publish(0, "k", "before").await;
    let (_, before_id) = read(&mut s0, 1).await.remove(0);
    c.kill(1).await;
    for k in 0..5 {
        c.publish(0, "k", &format!("down-{k}")).await;
    }
    read(&mut s0, 5).await;
    c.spawn(1);
    c.ready(1).await;
    // The restarted node has what was published while it was down.
    let mut s1 = c.sse(1, "k", Some(&before_id)).await;
    let got: Vec<String> = read(&mut s1, 5).await.into_iter().map(|(d, _)| d).collect();
    assert_eq!(got, (0..5).map(|k| format!("down-{k}")).collect::<Vec<_>>());
    // Its own new events reach the others.
    c.publish(1, "k", "from-restarted").await;
    assert_eq!(read(&mut s0, 1).await[0].0, "from-restarted");
    assert_eq!(read(&mut s1, 1).await[0].0, "from-restarted");

    // A stopped node: the others go on without it.
    let mut s2 = c.sse(2, "k", Some(&before_id)).await;
    read(&mut s2, 6).await;
    c.signal(2, "-STOP");
    for k in 0..3 {
        c.publish(0, "k", &format!("while-stopped-{k}")).await;
    }
    let got: Vec<String> = read(&mut s1, 3).await.into_iter().map(|(d, _)| d).collect();
    assert_eq!(
        got,
        ["while-stopped-0", "while-stopped-1", "while-stopped-2"]
    );
    c.signal(2, "-CONT");
    let got: Vec<String> = read(&mut s2, 3).await.into_iter().map(|(d, _)| d).collect();
    assert_eq!(
        got,
        ["while-stopped-0", "while-stopped-1", "while-stopped-2"]
    );
}

/// A node restarted after SIGKILL backfills from its peers, never from its
/// own listener (a static list names it, and sorts it first here), and
/// takes every peer's snapshot, so it comes back with its own events and
/// retained value even when the first peer it asks lacks some of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_backfills_its_own_events_from_every_peer_never_from_itself() {
    let mut c = Cluster::start(3).await;
    // Roles by the order a node walks its peer list in (address order):
    // the restarted node first, then a peer that will lack its newest
    // events, then one that has everything.
    let mut order: Vec<usize> = (0..3).collect();
    order.sort_by_key(|&i| format!("127.0.0.1:{}", c.nodes[i].internal));
    let [r, lacking, full] = [order[0], order[1], order[2]];
    let mut on_full = c.sse(full, "own", None).await;
    let mut on_lacking = c.sse(lacking, "own", None).await;
    let resp = http()
        .post(c.nodes[r].url("/channel/app.version?retain=true&event=version"))
        .body("v1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    for k in 0..3 {
        c.publish(r, "own", &format!("e{k}")).await;
    }
    let seen = read(&mut on_full, 3).await;
    read(&mut on_lacking, 3).await;
    c.signal(lacking, "-STOP");
    for k in 3..5 {
        c.publish(r, "own", &format!("e{k}")).await;
    }
    read(&mut on_full, 2).await;
    c.kill(r).await;
    c.signal(lacking, "-CONT");
    c.spawn(r);
    c.ready(r).await;
    let mut fresh = c.sse(r, "app.version", None).await;
    let ev = fresh.next().await;
    assert_eq!((ev.event.as_str(), ev.data.as_str()), ("version", "v1"));
    let mut resumed = c.sse(r, "own", Some(&seen[0].1)).await;
    let got: Vec<String> = read(&mut resumed, 4)
        .await
        .into_iter()
        .map(|(d, _)| d)
        .collect();
    assert_eq!(got, ["e1", "e2", "e3", "e4"]);
    assert_next_is_marker(&c, r, &mut resumed, "own", "after-restart").await;
    // Its new ids are above the old ones: the others take them.
    assert_eq!(on_full.next().await.data, "after-restart");
}

/// A node whose peers do not answer stays unready (and says so at warn
/// level) however long that lasts, and turns ready once one answers; a
/// node whose list names only itself knows it is alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_is_unready_until_a_peer_answers_or_it_knows_it_is_alone() {
    use tokio::io::AsyncBufReadExt;
    let mut c = Cluster::new(2, Via::Mesh);
    let n = &c.nodes[0];
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{}", n.public),
            "--internal-listen",
            &format!("127.0.0.1:{}", n.internal),
            "--node-name",
            &n.name,
            "--cluster",
            "static",
            "--peers",
            &c.peers,
            "--peer-timeout",
            "200ms",
        ])
        .env_remove("HERALD_LISTEN")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // herald logs to stdout.
    let mut log = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    // Several failed rounds, each longer than the peer timeout: still 503.
    let mut warned = 0;
    while warned < 3 {
        let line = tokio::time::timeout(WAIT, log.next_line())
            .await
            .expect("a warning about the missing snapshot")
            .unwrap()
            .expect("the node exited");
        if line.contains(" WARN ") && line.contains("no peer answered with a snapshot") {
            warned += 1;
        }
    }
    // Keep reading, so that the node never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });
    let readyz = http().get(n.url("/readyz")).send().await.unwrap();
    assert_eq!(readyz.status(), 503);
    c.nodes[0].child = Some(child);
    c.spawn(1);
    c.ready(1).await;
    c.ready(0).await;

    // Alone: a list of only itself.
    let port = free_port();
    let internal = format!("127.0.0.1:{}", free_port());
    let _alone = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--internal-listen",
            &internal,
            "--node-name",
            "alone",
            "--cluster",
            "static",
            "--peers",
            &internal,
        ])
        .quiet();
    let url = format!("http://127.0.0.1:{port}/readyz");
    eventually(|| {
        let url = url.clone();
        async move {
            http()
                .get(url)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_node_backfills_history_and_retained_values_before_it_is_ready() {
    late_node_backfills(Via::Mesh).await;
}

pub(crate) async fn late_node_backfills(via: Via) {
    let mut c = Cluster::start_via(3, via).await;
    c.kill(2).await;
    let r = http()
        .post(c.nodes[0].url("/channel/app.version?retain=true&event=version"))
        .body("v7")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let mut s0 = c.sse(0, "late", None).await;
    c.publish(0, "late", "first").await;
    let (_, first_id) = read(&mut s0, 1).await.remove(0);
    for k in 0..4 {
        c.publish(1, "late", &format!("h-{k}")).await;
    }
    c.spawn(2);
    c.ready(2).await;
    // The retained value, to a fresh subscriber.
    let mut fresh = c.sse(2, "app.version", None).await;
    let ev = fresh.next().await;
    assert_eq!((ev.event.as_str(), ev.data.as_str()), ("version", "v7"));
    // History, from an id another node issued.
    let mut s2 = c.sse(2, "late", Some(&first_id)).await;
    let got: Vec<String> = read(&mut s2, 4).await.into_iter().map(|(d, _)| d).collect();
    assert_eq!(got, ["h-0", "h-1", "h-2", "h-3"]);
    c.publish(2, "late", "from-late").await;
    assert_eq!(read(&mut s0, 5).await[4].0, "from-late");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sser_targeted_and_all_channel_publishes_cross_nodes() {
    let c = Cluster::start(3).await;
    let h = http();
    // sser's endpoint on the internal listener.
    let mut s2 = c.sse(2, "counter", None).await;
    let r = h
        .post(format!(
            "http://127.0.0.1:{}/api/json/v1/send",
            c.nodes[0].internal
        ))
        .body(json!({"stream": "counter", "msg": "42"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(s2.next().await.data, "42");
    let r = h
        .post(format!(
            "http://127.0.0.1:{}/api/json/v1/send",
            c.nodes[0].internal
        ))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // The internal listener is not the public one.
    let r = h
        .post(c.nodes[0].url("/api/json/v1/send"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    targeted_and_all_cross_nodes(&c).await;
}

/// A targeted publish reaches the client on whichever node holds it (404
/// when none does), and `POST /channel` reaches a channel with subscribers
/// on another node only.
pub(crate) async fn targeted_and_all_cross_nodes(c: &Cluster) {
    let h = http();
    // A client connected to node 2 only, addressed on node 0.
    let mut only = Sse::from_response(
        h.get(c.nodes[2].url("/channel/direct/client/alice"))
            .send()
            .await
            .unwrap(),
    );
    let r = h
        .post(c.nodes[0].url("/channel/direct/client/alice"))
        .body("for alice")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(only.next().await.data, "for alice");
    let r = h
        .post(c.nodes[0].url("/channel/direct/client/bob"))
        .body("for nobody")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // POST /channel on node 0 reaches a channel with subscribers on node 1 only.
    let mut s1 = c.sse(1, "elsewhere", None).await;
    let r = h
        .post(c.nodes[0].url("/channel"))
        .body("to every channel")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(s1.next().await.data, "to every channel");
}

#[tokio::test]
async fn peer_traffic_needs_the_secret_and_a_public_internal_listener_needs_one() {
    let port = free_port();
    let ip = port_less();
    let out = std::process::Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--cluster",
            "static",
            "--peers",
            "127.0.0.1:1",
            "--internal-listen",
            &ip,
        ])
        .env_remove("HERALD_LISTEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--cluster-secret"), "{err}");

    let internal = free_port();
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--internal-listen",
            &format!("127.0.0.1:{internal}"),
            "--node-name",
            "solo",
            "--cluster",
            "static",
            "--peers",
            &format!("127.0.0.1:{internal}"),
            "--cluster-secret",
            "correct-horse-battery-staple",
        ])
        .quiet();
    let h = http();
    let url = format!("http://127.0.0.1:{internal}/internal/v1/snapshot");
    eventually(|| {
        let (h, url) = (h.clone(), url.clone());
        async move { h.get(url).send().await.is_ok() }
    })
    .await;
    assert_eq!(h.get(&url).send().await.unwrap().status(), 401);
    let bad = h.get(&url).bearer_auth("wrong").send().await.unwrap();
    assert_eq!(bad.status(), 401);
    let ok = h
        .get(&url)
        .bearer_auth("correct-horse-battery-staple")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    child.kill().await.unwrap();
}

/// A `--cluster kubernetes` node in namespace `apps` of the fake API
/// server, finding its peers by `source` (`--kube-service NAME` or
/// `--kube-selector SELECTOR`).
fn kube_node(
    public: u16,
    internal: &str,
    name: &str,
    source: [&str; 2],
    kubeconfig: &std::path::Path,
) -> Child {
    Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{public}"),
            "--internal-listen",
            internal,
            "--node-name",
            name,
            "--cluster",
            "kubernetes",
            "--kube-namespace",
            "apps",
            "--peer-timeout",
            "2s",
        ])
        .args(source)
        .env("KUBECONFIG", kubeconfig)
        .quiet()
}

/// A non-loopback address to bind the internal listener on (all interfaces).
fn port_less() -> String {
    format!("0.0.0.0:{}", free_port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_mode_follows_the_ready_endpoints_of_a_service() {
    use crate::fake_kube::{FakeKube, Kind};
    let fake = FakeKube::start().await;
    let dir = crate::support::tempdir();
    let kubeconfig = fake.kubeconfig(&dir);
    // Three nodes on 127.0.0.1-3, one internal port, as pods would be.
    let port = free_port();
    let ip = |i: usize| format!("127.0.0.{}", i + 1);
    let endpoints = |ready: [bool; 3], terminating: [bool; 3]| -> serde_json::Value {
        json!((0..3)
            .map(|i| json!({"addresses": [ip(i)], "conditions": {"ready": ready[i], "terminating": terminating[i]}}))
            .collect::<Vec<_>>())
    };
    fake.create(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "herald-abcde", "namespace": "apps",
            "labels": {"kubernetes.io/service-name": "herald"}},
        "addressType": "IPv4",
        "ports": [{"name": "internal", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints([true, true, false], [false; 3]),
    }));
    let publics: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let children: Vec<Child> = publics
        .iter()
        .enumerate()
        .map(|(i, public)| {
            kube_node(
                *public,
                &format!("{}:{port}", ip(i)),
                &format!("k{i}"),
                ["--kube-service", "herald"],
                &kubeconfig,
            )
        })
        .collect();
    // Node 0 follows node 1 (and itself), not the unready node 2.
    let peers_of = |public: u16| async move {
        peers_on(public)
            .await
            .map(|p| p.into_iter().map(|(a, st, _)| (a, st)).collect::<Vec<_>>())
    };
    let addr = |i: usize| format!("{}:{port}", ip(i));
    eventually(|| async {
        peers_of(publics[0]).await.is_some_and(|p| {
            p.contains(&(addr(0), "self".into()))
                && p.contains(&(addr(1), "live".into()))
                && !p.iter().any(|(a, _)| *a == addr(2))
        })
    })
    .await;
    // Node 2 becomes ready: it joins; node 1 terminates: it leaves at once.
    fake.patch(
        Kind::EndpointSlice,
        "apps",
        "herald-abcde",
        json!({"endpoints": endpoints([true, true, true], [false, true, false])}),
    );
    eventually(|| async {
        peers_of(publics[0]).await.is_some_and(|p| {
            p.contains(&(addr(2), "live".into())) && !p.iter().any(|(a, _)| *a == addr(1))
        })
    })
    .await;
    let mut sub0 = subscribe_on(publics[0], "k").await;
    publish_on(publics[2], "k", "from k2").await;
    assert_eq!(sub0.next().await.data, "from k2");
    // The watch expires (410) and resumes: a later change is still seen.
    fake.expire_history();
    fake.patch(
        Kind::EndpointSlice,
        "apps",
        "herald-abcde",
        json!({"endpoints": endpoints([true, true, true], [false; 3])}),
    );
    eventually(|| async {
        peers_of(publics[0])
            .await
            .is_some_and(|p| p.contains(&(addr(1), "live".into())))
    })
    .await;
    drop(children);
}

/// Can this machine give a process its own /etc/hosts (a mount namespace)?
fn can_unshare() -> bool {
    std::process::Command::new("unshare")
        .args(["--mount", "true"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_mode_follows_the_addresses_a_name_resolves_to() {
    if !can_unshare() {
        eprintln!(
            "SKIPPED dns_mode_follows_the_addresses_a_name_resolves_to: no mount namespaces here (unshare --mount failed), so no private /etc/hosts"
        );
        return;
    }
    // The name resolves through a hosts file of our own, bind-mounted over
    // /etc/hosts in each node's private mount namespace; it first lists
    // nodes 0 and 1 only.
    let dir = crate::support::tempdir();
    let hosts = dir.join("hosts");
    std::fs::write(&hosts, "127.0.0.1 herald-peers\n127.0.0.2 herald-peers\n").unwrap();
    let port = free_port();
    let publics: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut children = vec![];
    for (i, public) in publics.iter().enumerate() {
        let cmd = format!(
            "mount --bind {hosts} /etc/hosts && exec {BIN} serve --listen 127.0.0.1:{public} \
             --internal-listen 127.0.0.{n}:{port} --node-name d{i} --cluster dns \
             --peers-dns herald-peers --peers-dns-interval 200ms --peer-timeout 2s",
            hosts = hosts.display(),
            n = i + 1,
        );
        children.push(
            Command::new("unshare")
                .args(["--mount", "sh", "-c", &cmd])
                .quiet(),
        );
    }
    let peers = |public: u16| async move {
        peers_on(public).await.map(|p| {
            p.into_iter()
                .map(|(a, st, _)| format!("{a} {st}"))
                .collect::<Vec<_>>()
        })
    };
    let a = |i: usize, state: &str| format!("127.0.0.{}:{port} {state}", i + 1);
    eventually(|| async {
        peers(publics[0])
            .await
            .is_some_and(|p| p.contains(&a(0, "self")) && p.contains(&a(1, "live")) && p.len() == 2)
    })
    .await;
    // The name now resolves to node 2 too: it is followed within an interval.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&hosts)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"127.0.0.3 herald-peers\n"))
        .unwrap();
    eventually(|| async {
        peers(publics[0])
            .await
            .is_some_and(|p| p.contains(&a(2, "live")))
    })
    .await;
    let mut sub = subscribe_on(publics[1], "d").await;
    publish_on(publics[2], "d", "from d2").await;
    assert_eq!(sub.next().await.data, "from d2");
    drop(children);
}

/// Runs a shell command; true on success.
fn sh(cmd: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", cmd])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Two network namespaces, each reachable from here over its own veth
/// pair, and linked to each other by a third that the test cuts.
struct Netns {
    a: String,
    b: String,
}

impl Netns {
    fn setup(tag: u32) -> Option<Self> {
        let (a, b) = (format!("hra{tag}"), format!("hrb{tag}"));
        let n = Self { a, b };
        n.teardown();
        let (a, b) = (&n.a, &n.b);
        let ok = [
            format!("ip netns add {a}"),
            format!("ip netns add {b}"),
            format!("ip link add {a}r type veth peer name {a}n netns {a}"),
            format!("ip link add {b}r type veth peer name {b}n netns {b}"),
            format!("ip link add {a}x netns {a} type veth peer name {b}x netns {b}"),
            format!("ip addr add 10.201.1.1/24 dev {a}r && ip link set {a}r up"),
            format!("ip addr add 10.201.2.1/24 dev {b}r && ip link set {b}r up"),
            format!("ip -n {a} addr add 10.201.1.2/24 dev {a}n && ip -n {a} link set {a}n up && ip -n {a} link set lo up"),
            format!("ip -n {b} addr add 10.201.2.2/24 dev {b}n && ip -n {b} link set {b}n up && ip -n {b} link set lo up"),
            format!("ip -n {a} addr add 10.201.3.1/24 dev {a}x && ip -n {a} link set {a}x up"),
            format!("ip -n {b} addr add 10.201.3.2/24 dev {b}x && ip -n {b} link set {b}x up"),
        ]
        .iter()
        .all(|c| sh(c));
        ok.then_some(n)
    }

    fn link(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        assert!(sh(&format!(
            "ip -n {a} link set {a}x {state} && ip -n {b} link set {b}x {state}",
            a = self.a,
            b = self.b
        )));
    }

    fn teardown(&self) {
        sh(&format!("ip netns del {}", self.a));
        sh(&format!("ip netns del {}", self.b));
        sh(&format!("ip link del {}r", self.a));
        sh(&format!("ip link del {}r", self.b));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.teardown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_heals_and_every_subscriber_has_every_event() {
    let Some(net) = Netns::setup(std::process::id() % 100_000) else {
        eprintln!(
            "SKIPPED a_partition_heals_and_every_subscriber_has_every_event: network namespaces are not permitted here (ip netns add failed)"
        );
        return;
    };
    let secret = "partition-test-secret-0123";
    let node = |ns: &str, name: &str, public: &str, internal: &str| {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                BIN,
                "serve",
                "--listen",
                public,
                "--internal-listen",
                internal,
                "--node-name",
                name,
                "--cluster",
                "static",
                "--peers",
                "10.201.3.1:7000,10.201.3.2:7000",
                "--cluster-secret",
                secret,
                "--allow-anonymous-publish",
                "--peer-timeout",
                "1s",
                "--heartbeat",
                "1s",
            ])
            .quiet()
    };
    let _a = node(&net.a, "pa", "10.201.1.2:8080", "10.201.3.1:7000");
    let _b = node(&net.b, "pb", "10.201.2.2:8080", "10.201.3.2:7000");
    let (ua, ub) = ("http://10.201.1.2:8080", "http://10.201.2.2:8080");
    let h = http();
    for u in [ua, ub] {
        let url = format!("{u}/readyz");
        eventually(|| {
            let (h, url) = (h.clone(), url.clone());
            async move { h.get(url).send().await.is_ok_and(|r| r.status() == 200) }
        })
        .await;
    }
    let sub = |u: &'static str| {
        let h = h.clone();
        async move { Sse::from_response(h.get(format!("{u}/channel/p")).send().await.unwrap()) }
    };
    let publish = |u: &'static str, d: String| {
        let h = h.clone();
        async move {
            let r = h
                .post(format!("{u}/channel/p"))
                .body(d)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 202);
        }
    };
    let (mut sa, mut sb) = (sub(ua).await, sub(ub).await);
    publish(ua, "before".into()).await;
    assert_eq!(sa.next().await.data, "before");
    assert_eq!(sb.next().await.data, "before");

    net.link(false);
    // Both notice: the peer stream goes silent past --peer-timeout.
    for u in [ua, ub] {
        let url = format!("{u}/status");
        eventually(|| {
            let (h, url) = (h.clone(), url.clone());
            async move {
                let Ok(r) = h.get(url).send().await else {
                    return false;
                };
                let v: serde_json::Value = r.json().await.unwrap_or_default();
                v["cluster"]["peers"].as_array().is_some_and(|ps| {
                    ps.iter()
                        .any(|p| p["state"] != "self" && p["state"] != "live")
                })
            }
        })
        .await;
    }
    for k in 0..3 {
        publish(ua, format!("a-{k}")).await;
        publish(ub, format!("b-{k}")).await;
    }
    // Each side goes on with its own events.
    let mut got_a: Vec<String> = vec![];
    let mut got_b: Vec<String> = vec![];
    for _ in 0..3 {
        got_a.push(sa.next().await.data);
        got_b.push(sb.next().await.data);
    }
    assert_eq!(got_a, ["a-0", "a-1", "a-2"]);
    assert_eq!(got_b, ["b-0", "b-1", "b-2"]);

    net.link(true);
    // After the heal, each has the other side's events, in their order.
    for _ in 0..3 {
        got_a.push(sa.next().await.data);
        got_b.push(sb.next().await.data);
    }
    assert_eq!(&got_a[3..], ["b-0", "b-1", "b-2"]);
    assert_eq!(&got_b[3..], ["a-0", "a-1", "a-2"]);
    // And nothing twice: a marker is next everywhere.
    publish(ua, "after".into()).await;
    assert_eq!(sa.next().await.data, "after");
    assert_eq!(sb.next().await.data, "after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_mode_finds_the_members_and_keeps_strangers_out() {
    let secret = "gossip-secret-for-tests-42";
    let start = |i: usize, gossip: u16, seed: Option<u16>, secret: &str| {
        let (public, internal) = (free_port(), free_port());
        let mut args = vec![
            "serve".to_owned(),
            "--listen".into(),
            format!("127.0.0.1:{public}"),
            "--internal-listen".into(),
            format!("127.0.0.1:{internal}"),
            "--node-name".into(),
            format!("g{i}"),
            "--cluster".into(),
            "gossip".into(),
            "--gossip-listen".into(),
            format!("127.0.0.1:{gossip}"),
            "--gossip-secret".into(),
            secret.to_owned(),
            "--peer-timeout".into(),
            "2s".into(),
        ];
        if let Some(s) = seed {
            args.extend(["--gossip-seeds".into(), format!("127.0.0.1:{s}")]);
        }
        let child = Command::new(BIN).args(&args).quiet();
        (public, internal, child)
    };
    let ports: Vec<u16> = (0..5).map(|_| free_port()).collect();
    let mut nodes = vec![start(0, ports[0], None, secret)];
    for i in 1..3 {
        nodes.push(start(i, ports[i], Some(ports[0]), secret));
    }
    let h = http();
    let live_peers = |public: u16| async move {
        peers_on(public).await.map(|p| {
            p.into_iter()
                .filter(|(_, st, _)| st == "live")
                .map(|(_, _, node)| node)
                .collect::<Vec<_>>()
        })
    };
    for (public, _, _) in &nodes {
        let public = *public;
        eventually(|| async { live_peers(public).await.is_some_and(|p| p.len() == 2) }).await;
    }
    // A late member joins through any member.
    nodes.push(start(3, ports[3], Some(ports[2]), secret));
    let p0 = nodes[0].0;
    eventually(|| async {
        live_peers(p0)
            .await
            .is_some_and(|p| p.contains(&"g3".to_owned()))
    })
    .await;
    let mut sub = subscribe_on(nodes[3].0, "g").await;
    publish_on(p0, "g", "to the late member").await;
    assert_eq!(sub.next().await.data, "to the late member");
    // A node with another secret cannot join: its gossip is not accepted.
    let stranger = start(4, ports[4], Some(ports[0]), "some-other-secret-value");
    let ps = stranger.0;
    eventually(|| async {
        h.get(format!("http://127.0.0.1:{ps}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    // Membership has no event for "refused"; watch it through several
    // gossip rounds (200 ms each) instead.
    for _ in 0..20 {
        assert!(!live_peers(p0).await.unwrap().contains(&"g4".to_owned()));
        assert_eq!(live_peers(ps).await.unwrap(), Vec::<String>::new());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // A key too short to be a key stops the start.
    let out = std::process::Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--cluster",
            "gossip",
            "--gossip-listen",
            "127.0.0.1:0",
            "--gossip-secret",
            "short",
            "--internal-listen",
            "127.0.0.1:0",
        ])
        .env_remove("HERALD_LISTEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--gossip-secret") && err.contains("16 characters"),
        "{err}"
    );
    drop(nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_mode_can_follow_the_ready_pods_of_a_selector() {
    use crate::fake_kube::{FakeKube, Kind};
    let fake = FakeKube::start().await;
    let dir = crate::support::tempdir();
    let kubeconfig = fake.kubeconfig(&dir);
    let port = free_port();
    let ip = |i: usize| format!("127.0.0.{}", i + 11);
    let pod = |i: usize, ready: bool| {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("herald-{i}"), "namespace": "apps", "labels": {"app": "herald"}},
            "spec": {"containers": [{"name": "herald", "image": "herald:1"}]},
            "status": {"phase": "Running", "podIP": ip(i),
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
        })
    };
    fake.create(pod(0, true));
    fake.create(pod(1, false));
    let publics: Vec<u16> = (0..2).map(|_| free_port()).collect();
    let _children: Vec<Child> = publics
        .iter()
        .enumerate()
        .map(|(i, public)| {
            kube_node(
                *public,
                &format!("{}:{port}", ip(i)),
                &format!("s{i}"),
                ["--kube-selector", "app=herald"],
                &kubeconfig,
            )
        })
        .collect();
    let has = |public: u16, i: usize, state: &'static str| async move {
        peers_on(public).await.is_some_and(|p| {
            p.iter()
                .any(|(a, st, _)| *a == format!("{}:{port}", ip(i)) && st == state)
        })
    };
    eventually(|| async { has(publics[1], 0, "live").await }).await;
    assert!(!has(publics[0], 1, "live").await);
    // The pod turns Ready: node 0 follows it.
    fake.patch(
        Kind::Pod,
        "apps",
        "herald-1",
        json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
    );
    eventually(|| async { has(publics[0], 1, "live").await }).await;
    let mut sub = subscribe_on(publics[0], "s").await;
    publish_on(publics[1], "s", "from s1").await;
    assert_eq!(sub.next().await.data, "from s1");
    // It is deleted (terminating): it leaves at once.
    fake.patch(
        Kind::Pod,
        "apps",
        "herald-1",
        json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}),
    );
    eventually(|| async {
        peers_on(publics[0])
            .await
            .is_some_and(|p| !p.iter().any(|(a, _, _)| *a == format!("{}:{port}", ip(1))))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_id_a_publish_returns_resumes_on_any_node() {
    let c = Cluster::start(2).await;
    let publish = |data: &'static str| {
        let url = c.nodes[0].url("/channel/ids");
        async move {
            let r = http().post(url).body(data).send().await.unwrap();
            assert_eq!(r.status(), 202);
            r.json::<serde_json::Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let first = publish("one").await;
    assert!(first.contains("n0="), "a position: {first}");
    publish("two").await;
    let mut s = c.sse(1, "ids", Some(&first)).await;
    assert_eq!(s.next().await.data, "two");
}
