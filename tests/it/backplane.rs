//! Redis and NATS backplanes against real servers (Debian's `redis-server`
//! and `nats-server`, which `scripts/test` installs): each test starts its
//! own server on a free loopback port, restarts or kills it by PID, and
//! runs the mesh's delivery, resume and retained-value checks on it.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use crate::cluster::{
    Cluster, Via, assert_next_is_marker, every_event_everywhere_once, killed_node_catches_up,
    late_node_backfills, multi_channel_resume_is_exact, targeted_and_all_cross_nodes,
};
use crate::support::{WAIT, eventually, free_port, get_json, http, signal, tempdir};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Redis,
    Nats,
}

/// A backend server process of the test's own.
struct Server {
    kind: Kind,
    port: u16,
    /// NATS: the monitoring port.
    monitor: u16,
    dir: std::path::PathBuf,
    /// Extra arguments (a password, JetStream off).
    extra: Vec<String>,
    /// Whether its data survives a restart (Redis: AOF, fsync always;
    /// NATS: the same store directory). Otherwise it comes back empty.
    keeps_data: bool,
    child: Option<Child>,
}

fn binary(name: &str) -> String {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"] {
        let p = format!("{dir}/{name}");
        if std::path::Path::new(&p).exists() {
            return p;
        }
    }
    panic!("{name} is not installed: scripts/test installs it (apt-get install {name})");
}

impl Server {
    async fn start(kind: Kind) -> Self {
        Self::start_with(kind, &[]).await
    }

    async fn start_with(kind: Kind, extra: &[&str]) -> Self {
        let mut s = Self::later(kind);
        s.extra = extra.iter().map(|s| s.to_string()).collect();
        s.spawn();
        s.wait_up().await;
        s
    }

    /// A server that is not running yet, on a reserved port.
    fn later(kind: Kind) -> Self {
        Self {
            kind,
            port: free_port(),
            monitor: free_port(),
            dir: tempdir(),
            extra: vec![],
            keeps_data: kind == Kind::Nats,
            child: None,
        }
    }

    fn spawn(&mut self) {
        let port = self.port.to_string();
        let mut cmd = match self.kind {
            Kind::Redis => {
                let mut c = Command::new(binary("redis-server"));
                c.args(["--bind", "127.0.0.1", "--port", &port, "--save", ""]);
                if self.keeps_data {
                    c.args(["--appendonly", "yes", "--appendfsync", "always"]);
                } else {
                    c.args(["--appendonly", "no"]);
                }
                c.arg("--dir").arg(&self.dir);
                c
            }
            Kind::Nats => {
                let mut c = Command::new(binary("nats-server"));
                c.args(["-a", "127.0.0.1", "-p", &port, "-m"])
                    .arg(self.monitor.to_string());
                if !self.extra.iter().any(|a| a == "--no-jetstream") {
                    c.arg("-js").arg("-sd").arg(&self.dir);
                }
                c
            }
        };
        cmd.args(self.extra.iter().filter(|a| *a != "--no-jetstream"));
        self.child = Some(
            cmd.stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap(),
        );
    }

    async fn wait_up(&self) {
        let (kind, port, monitor) = (self.kind, self.port, self.monitor);
        eventually(|| async move {
            match kind {
                Kind::Redis => tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok(),
                Kind::Nats => http()
                    .get(format!("http://127.0.0.1:{monitor}/varz"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200),
            }
        })
        .await;
    }

    fn url(&self) -> String {
        match self.kind {
            Kind::Redis => format!("redis://127.0.0.1:{}", self.port),
            Kind::Nats => format!("nats://127.0.0.1:{}", self.port),
        }
    }

    fn via(&self) -> Via {
        match self.kind {
            Kind::Redis => Via::Redis(self.url()),
            Kind::Nats => Via::Nats(self.url()),
        }
    }

    /// SIGKILL, by PID.
    async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.start_kill().unwrap();
            c.wait().await.unwrap();
        }
    }

    async fn restart(&mut self) {
        if !self.keeps_data {
            // NATS: a new store directory (Redis without AOF keeps nothing).
            self.dir = tempdir();
        }
        self.spawn();
        self.wait_up().await;
    }

    /// Connections from herald nodes (named clients), and for NATS the
    /// subscriptions they hold.
    async fn herald_connections(&self) -> (usize, usize) {
        match self.kind {
            Kind::Redis => {
                let list = redis(self.port, &["CLIENT".into(), "LIST".into()]).await;
                // Every connection but this one.
                (list.lines().filter(|l| l.contains("id=")).count() - 1, 0)
            }
            Kind::Nats => {
                let v = get_json(&format!("http://127.0.0.1:{}/connz?subs=1", self.monitor)).await;
                let conns = v["connections"].as_array().cloned().unwrap_or_default();
                let herald: Vec<_> = conns
                    .iter()
                    .filter(|c| c["name"].as_str().is_some_and(|n| n.starts_with("herald ")))
                    .collect();
                let subs = herald
                    .iter()
                    .map(|c| c["subscriptions"].as_u64().unwrap_or(0) as usize)
                    .sum();
                (herald.len(), subs)
            }
        }
    }
}

/// One Redis command over RESP; the reply as text (an array's items one
/// per line).
async fn redis(port: u16, args: &[String]) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(req.as_bytes()).await.unwrap();
    let mut r = BufReader::new(s);
    let mut out = String::new();
    let mut pending = 1;
    while pending > 0 {
        pending -= 1;
        let mut head = String::new();
        r.read_line(&mut head).await.unwrap();
        let (kind, rest) = head.split_at(1);
        let n: i64 = rest.trim().parse().unwrap_or(0);
        match kind {
            "$" if n >= 0 => {
                let mut body = vec![0; n as usize + 2];
                r.read_exact(&mut body).await.unwrap();
                out.push_str(&String::from_utf8_lossy(&body[..n as usize]));
                out.push('\n');
            }
            "*" => pending += n.max(0),
            _ => out.push_str(&head),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_two_nodes_deliver_every_event_everywhere_once_and_resume_across_nodes() {
    let s = Server::start(Kind::Redis).await;
    every_event_everywhere_once(2, 6, s.via()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_three_nodes_deliver_every_event_everywhere_once_and_resume_across_nodes() {
    let s = Server::start(Kind::Redis).await;
    every_event_everywhere_once(3, 8, s.via()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_two_nodes_deliver_every_event_everywhere_once_and_resume_across_nodes() {
    let s = Server::start(Kind::Nats).await;
    every_event_everywhere_once(2, 6, s.via()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_three_nodes_deliver_every_event_everywhere_once_and_resume_across_nodes() {
    let s = Server::start(Kind::Nats).await;
    every_event_everywhere_once(3, 8, s.via()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_three_nodes_resume_a_multi_channel_stream_exactly_after_a_cut_anywhere() {
    let s = Server::start(Kind::Redis).await;
    multi_channel_resume_is_exact(s.via()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_three_nodes_resume_a_multi_channel_stream_exactly_after_a_cut_anywhere() {
    let s = Server::start(Kind::Nats).await;
    multi_channel_resume_is_exact(s.via()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_late_node_loads_history_and_retained_values_before_it_is_ready() {
    let s = Server::start(Kind::Redis).await;
    late_node_backfills(s.via()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_a_late_node_loads_history_and_retained_values_before_it_is_ready() {
    let s = Server::start(Kind::Nats).await;
    late_node_backfills(s.via()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_restarted_hub_node_catches_up_and_a_stopped_one_delays_no_one() {
    let s = Server::start(Kind::Redis).await;
    killed_node_catches_up(s.via()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_a_restarted_hub_node_catches_up_and_a_stopped_one_delays_no_one() {
    let s = Server::start(Kind::Nats).await;
    killed_node_catches_up(s.via()).await;
}

/// The answers so far, by publish number.
type Log = Vec<(usize, Answer)>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_targeted_and_all_channel_publishes_cross_nodes() {
    let s = Server::start(Kind::Redis).await;
    targeted_and_all_cross_nodes(&Cluster::start_via(3, s.via()).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_targeted_and_all_channel_publishes_cross_nodes() {
    let s = Server::start(Kind::Nats).await;
    targeted_and_all_cross_nodes(&Cluster::start_via(3, s.via()).await).await;
}

/// How a publish was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Accepted,
    /// 503, nothing published.
    Refused,
    /// 503, delivered here but not confirmed by the backend.
    Unconfirmed,
}

async fn publish_answer(url: &str, data: &str) -> Answer {
    let r = http().post(url).body(data.to_owned()).send().await.unwrap();
    match r.status().as_u16() {
        202 => Answer::Accepted,
        503 => {
            assert_eq!(
                r.headers().get("retry-after").and_then(|v| v.to_str().ok()),
                Some("1")
            );
            let msg = r.json::<serde_json::Value>().await.unwrap()["error"]
                .as_str()
                .unwrap()
                .to_owned();
            if msg.contains("nothing was published") {
                Answer::Refused
            } else {
                assert!(msg.contains("did not confirm"), "{msg}");
                Answer::Unconfirmed
            }
        }
        other => panic!("unexpected status {other}: {:?}", r.text().await),
    }
}

/// A publisher on node 0 goes on while the backend is killed and started
/// again: every event answered 202 reaches every subscriber on every node
/// exactly once and in order, nothing refused with 503 ever arrives, and a
/// node started after the restart has the whole history.
async fn backend_restart_mid_stream(kind: Kind, keeps_data: bool) {
    let mut server = Server::later(kind);
    server.keeps_data = keeps_data;
    server.restart().await;
    let mut c = Cluster::start_via(4, server.via()).await;
    c.kill(3).await;
    let mut subs = vec![];
    for i in 0..3 {
        subs.push(c.sse(i, "live", None).await);
    }
    let url = c.nodes[0].url("/channel/live");
    let (tx, mut answers) = tokio::sync::mpsc::unbounded_channel::<(usize, Answer)>();
    let stop = tokio_util::sync::CancellationToken::new();
    let publisher = tokio::spawn({
        let (url, stop) = (url.clone(), stop.clone());
        async move {
            let mut k = 0;
            while !stop.is_cancelled() {
                let a = publish_answer(&url, &format!("e-{k}")).await;
                tx.send((k, a)).unwrap();
                k += 1;
                // A steady stream, not a synchronisation.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let mut log: Log = vec![];
    let mut recv_until = async |log: &mut Log, done: &dyn Fn(&Log) -> bool| {
        while !done(log) {
            let a = tokio::time::timeout(WAIT, answers.recv())
                .await
                .unwrap()
                .unwrap();
            log.push(a);
        }
    };
    recv_until(&mut log, &|l| l.len() >= 30).await;
    server.kill().await;
    let killed_at = log.len();
    // The node notices and refuses.
    recv_until(&mut log, &|l| {
        l[killed_at..]
            .iter()
            .filter(|(_, a)| *a == Answer::Refused)
            .count()
            >= 5
    })
    .await;
    server.restart().await;
    let restarted_at = log.len();
    recv_until(&mut log, &|l| {
        l[restarted_at..]
            .iter()
            .filter(|(_, a)| *a == Answer::Accepted)
            .count()
            >= 30
    })
    .await;
    stop.cancel();
    publisher.await.unwrap();
    while let Ok(a) = answers.try_recv() {
        log.push(a);
    }
    let accepted: Vec<String> = log
        .iter()
        .filter(|(_, a)| *a == Answer::Accepted)
        .map(|(k, _)| format!("e-{k}"))
        .collect();
    let answer: HashMap<String, Answer> = log.iter().map(|(k, a)| (format!("e-{k}"), *a)).collect();
    assert!(
        log.iter().any(|(_, a)| *a == Answer::Refused),
        "no publish was refused during the outage: {log:?}"
    );
    // The end marker, once the backend accepts again.
    c.publish(0, "live", "end").await;
    for (i, sub) in subs.iter_mut().enumerate() {
        let mut got = vec![];
        loop {
            let ev = sub.next().await;
            if ev.data == "end" {
                break;
            }
            got.push(ev.data);
        }
        for d in &got {
            assert_ne!(
                answer.get(d),
                Some(&Answer::Refused),
                "node {i} delivered {d}, which was refused with 503"
            );
        }
        let delivered_accepted: Vec<&String> = got
            .iter()
            .filter(|d| answer.get(*d) == Some(&Answer::Accepted))
            .collect();
        assert_eq!(
            delivered_accepted,
            accepted.iter().collect::<Vec<_>>(),
            "node {i}: an event answered 202 was lost, repeated or reordered"
        );
        let mut unique = got.clone();
        unique.dedup();
        assert_eq!(unique.len(), got.len(), "node {i} repeated an event");
    }
    // A node started now has everything accepted, from the backend.
    c.spawn(3);
    c.ready(3).await;
    let mut late = c
        .sse(3, "live", Some(&format!("{}=0", c.nodes[0].name)))
        .await;
    let mut got = vec![];
    loop {
        let ev = late.next().await;
        if ev.data == "end" {
            break;
        }
        if answer.get(&ev.data) == Some(&Answer::Accepted) {
            got.push(ev.data);
        }
    }
    assert_eq!(got, accepted, "the late node's history");
    assert_next_is_marker(&c, 3, &mut late, "live", "after-late").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_mid_stream_loses_no_accepted_event() {
    backend_restart_mid_stream(Kind::Redis, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_that_loses_its_data_mid_stream_loses_no_accepted_event() {
    backend_restart_mid_stream(Kind::Redis, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_mid_stream_loses_no_accepted_event() {
    backend_restart_mid_stream(Kind::Nats, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_that_loses_its_data_mid_stream_loses_no_accepted_event() {
    backend_restart_mid_stream(Kind::Nats, false).await;
}

/// Subscribers cost the backend nothing: a node holds the same backend
/// connections (and NATS subscriptions) with 0 and with 150 subscribers on
/// 15 channels.
async fn one_backend_subscription_per_node(kind: Kind) {
    let server = Server::start(kind).await;
    let c = Cluster::start_via(3, server.via()).await;
    // A writer, a reader and a question listener per node (Redis: the
    // listener's pub/sub connection and the one it answers on).
    let per_node = if kind == Kind::Redis { 4 } else { 3 };
    let server = &server;
    eventually(|| async move { server.herald_connections().await.0 == 3 * per_node }).await;
    let before = server.herald_connections().await;
    let mut subs = vec![];
    for i in 0..3 {
        for k in 0..50 {
            subs.push((k % 15, c.sse(i, &format!("ch{}", k % 15), None).await));
        }
    }
    c.publish(1, "ch3", "x").await;
    for (ch, s) in &mut subs {
        if *ch == 3 {
            assert_eq!(s.next().await.data, "x");
        }
    }
    assert_eq!(server.herald_connections().await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_subscribers_add_no_backend_subscriptions() {
    one_backend_subscription_per_node(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_subscribers_add_no_backend_subscriptions() {
    one_backend_subscription_per_node(Kind::Nats).await;
}

/// Concurrent publishes are written in pipelined batches, not one round
/// trip each.
async fn writes_are_batched(kind: Kind) {
    let server = Server::start(kind).await;
    let c = Cluster::start_via(2, server.via()).await;
    let mut sub = c.sse(1, "burst", None).await;
    let publishes = (0..200).map(|k| {
        let url = c.nodes[0].url("/channel/burst");
        async move { publish_answer(&url, &format!("b-{k}")).await }
    });
    let answers = futures_util::future::join_all(publishes).await;
    assert!(answers.iter().all(|a| *a == Answer::Accepted));
    for _ in 0..200 {
        sub.next().await;
    }
    let st = status(&c, 0).await;
    let bp = &st["cluster"]["backplane"];
    assert_eq!(bp["written"], 200, "{bp}");
    let batches = bp["write_batches"].as_u64().unwrap();
    eprintln!("{kind:?}: 200 concurrent publishes, {batches} pipelined writes");
    assert!(
        batches < 150,
        "200 concurrent publishes took {batches} writes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_writes_are_batched() {
    writes_are_batched(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_writes_are_batched() {
    writes_are_batched(Kind::Nats).await;
}

/// A node gone for good is forgotten once its events expired (readers
/// stop reading its stream); one that comes back under that name is listed
/// again and its events reach the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_node_gone_for_good_is_forgotten_and_one_that_returns_is_read() {
    let server = Server::start(Kind::Redis).await;
    let mut c = Cluster::start_via_unready(2, server.via()).await;
    c.extra = vec!["--history-ttl".into(), "1s".into()];
    for i in 0..2 {
        c.kill(i).await;
        c.spawn(i);
        c.ready(i).await;
    }
    let mut s0 = c.sse(0, "gone", None).await;
    c.publish(1, "gone", "before").await;
    assert_eq!(s0.next().await.data, "before");
    let listed = |name: &'static str| {
        let port = server.port;
        async move {
            redis(port, &["SMEMBERS".into(), "herald:origins".into()])
                .await
                .lines()
                .any(|l| l == name)
        }
    };
    assert!(listed("n1").await);
    c.kill(1).await;
    // Its stream would expire by itself (after twice the retention, at
    // least a minute); gone now, as if that minute had passed.
    redis(server.port, &["DEL".into(), "herald:stream:n1".into()]).await;
    eventually(|| async { !listed("n1").await }).await;
    c.spawn(1);
    c.ready(1).await;
    c.publish(1, "gone", "back").await;
    assert_eq!(s0.next().await.data, "back");
}

/// A CA and a certificate for 127.0.0.1 it signed, made with openssl:
/// (ca.pem, server.pem, server.key).
fn test_certificates() -> (String, String, String) {
    let dir = tempdir();
    let path = |f: &str| dir.join(f).to_str().unwrap().to_owned();
    std::fs::write(path("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl is installed (scripts/test installs it)");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=herald test CA",
        "-keyout",
        &path("ca.key"),
        "-out",
        &path("ca.pem"),
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        &path("server.key"),
        "-out",
        &path("server.csr"),
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        &path("server.csr"),
        "-CA",
        &path("ca.pem"),
        "-CAkey",
        &path("ca.key"),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &path("san.ext"),
        "-out",
        &path("server.pem"),
    ]);
    (path("ca.pem"), path("server.pem"), path("server.key"))
}

/// TLS to the backend: nodes that trust the backend's CA
/// (`--backplane-ca`) share channels over it; a node that does not is not
/// ready, refuses publishes and says why.
async fn over_tls(kind: Kind) {
    let (ca, cert, key) = test_certificates();
    let mut server = Server::later(kind);
    let port = server.port.to_string();
    server.extra = match kind {
        Kind::Redis => vec![
            "--port".into(),
            "0".into(),
            "--tls-port".into(),
            port.clone(),
            "--tls-cert-file".into(),
            cert,
            "--tls-key-file".into(),
            key,
            "--tls-auth-clients".into(),
            "no".into(),
        ],
        Kind::Nats => vec![
            "--tls".into(),
            "--tlscert".into(),
            cert,
            "--tlskey".into(),
            key,
        ],
    };
    server.restart().await;
    let via = match kind {
        Kind::Redis => Via::Redis(format!("rediss://127.0.0.1:{port}")),
        Kind::Nats => Via::Nats(format!("tls://127.0.0.1:{port}")),
    };
    let c = Cluster::start_via_with(2, via.clone(), &["--backplane-ca", &ca]).await;
    let mut s1 = c.sse(1, "secure", None).await;
    c.publish(0, "secure", "over tls").await;
    assert_eq!(s1.next().await.data, "over tls");

    let stranger = Cluster::start_via_unready(1, via).await;
    let url = stranger.nodes[0].url("/status");
    eventually(|| {
        let url = url.clone();
        async move {
            get_json(&url).await["cluster"]["backplane"]["last_error"]
                .as_str()
                .is_some_and(|e| e.to_lowercase().contains("certificate"))
        }
    })
    .await;
    assert_eq!(
        publish_answer(&stranger.nodes[0].url("/channel/secure"), "x").await,
        Answer::Refused
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_with_a_private_ca() {
    over_tls(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_over_tls_with_a_private_ca() {
    over_tls(Kind::Nats).await;
}

async fn status(c: &Cluster, i: usize) -> serde_json::Value {
    get_json(&c.nodes[i].url("/status")).await
}

/// A node whose backend is not there yet: not ready, publishes refused
/// with 503, the state in /status; ready and accepting once it is. The
/// password in the URL never shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_node_waits_for_its_backend_and_never_shows_the_password() {
    let mut server = Server::later(Kind::Redis);
    // A password with an @ in it: the last @ ends the user info.
    server.extra = vec!["--requirepass".into(), "s3cret@pass".into()];
    let url = format!("redis://:s3cret@pass@127.0.0.1:{}", server.port);
    let mut c = Cluster::start_via_unready(1, Via::Redis(url)).await;
    let r = http().get(c.nodes[0].url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.text().await.unwrap().contains("backplane"));
    assert_eq!(
        publish_answer(&c.nodes[0].url("/channel/a"), "x").await,
        Answer::Refused
    );
    let st = status(&c, 0).await;
    assert_eq!(st["cluster"]["backplane"]["publishing"], "refused");
    for part in ["s3cret", "pass@"] {
        assert!(!st.to_string().contains(part), "{st}");
    }
    assert!(
        st["cluster"]["backplane"]["url"]
            .as_str()
            .unwrap()
            .contains(":***@")
    );
    server.restart().await;
    c.ready(0).await;
    let mut s = c.sse(0, "a", None).await;
    c.publish(0, "a", "after").await;
    assert_eq!(s.next().await.data, "after");
    let st = status(&c, 0).await;
    assert_eq!(st["cluster"]["backplane"]["writer"], "connected");
    assert!(!st.to_string().contains("s3cret"));
    c.kill(0).await;
}

/// NATS without JetStream: herald says what is missing instead of running
/// with weaker guarantees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_without_jetstream_is_reported_and_refused() {
    let server = Server::start_with(Kind::Nats, &["--no-jetstream"]).await;
    let c = Cluster::start_via_unready(1, server.via()).await;
    let h = http();
    let url = c.nodes[0].url("/status");
    eventually(|| {
        let (h, url) = (h.clone(), url.clone());
        async move {
            let v: serde_json::Value = h.get(url).send().await.unwrap().json().await.unwrap();
            v["cluster"]["backplane"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("JetStream"))
        }
    })
    .await;
    let r = h.get(c.nodes[0].url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(
        publish_answer(&c.nodes[0].url("/channel/a"), "x").await,
        Answer::Refused
    );
}

/// A 202 means the backend has the event: with Redis frozen (SIGSTOP), a
/// publish is delivered to the node's own subscribers at once but answered
/// 503 once the confirmation times out, never 202; publishing is accepted
/// again once Redis runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_202_waits_for_the_backend() {
    let server = Server::start(Kind::Redis).await;
    let c = Cluster::start_via(2, server.via()).await;
    let pid = server.child.as_ref().unwrap().id().unwrap();
    let mut local = c.sse(0, "frozen", None).await;
    signal(pid, "-STOP");
    let url = c.nodes[0].url("/channel/frozen");
    let publishing = tokio::spawn(async move { publish_answer(&url, "x").await });
    // Local delivery does not wait for the backend.
    assert_eq!(local.next().await.data, "x");
    assert!(
        !publishing.is_finished(),
        "the publish did not wait for Redis"
    );
    let answer = publishing.await.unwrap();
    signal(pid, "-CONT");
    assert_eq!(answer, Answer::Unconfirmed);
    let mut s = c.sse(1, "frozen", None).await;
    eventually(|| async {
        publish_answer(&c.nodes[0].url("/channel/frozen"), "again").await == Answer::Accepted
    })
    .await;
    // "x" may arrive too (Redis may have read it before it froze).
    while s.next().await.data != "again" {}
}
