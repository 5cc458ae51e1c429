//! The `herald` binary: serve (flags, env, signals), publish, subscribe.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::support::{Proxy, TestHub, WAIT, eventually};

const BIN: &str = env!("CARGO_BIN_EXE_herald");

use crate::support::free_port;

/// Starts `herald serve` with these env vars and waits until /healthz answers.
async fn serve(env: &[(&str, String)], args: &[&str], port: u16) -> Child {
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .args(args)
        .env_remove("HERALD_LISTEN")
        .env_remove("KUBECONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap();
    let http = crate::support::http();
    eventually(|| {
        let http = http.clone();
        async move {
            http.get(format!("http://127.0.0.1:{port}/healthz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        }
    })
    .await;
    child
}

fn sigterm(child: &Child) {
    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
}

#[tokio::test]
async fn serve_takes_the_port_from_http_server_port_and_exits_on_sigterm_with_open_streams() {
    let port = free_port();
    let mut child = serve(
        &[
            ("HTTP_SERVER_PORT", port.to_string()),
            ("HERALD_NODE_NAME", "cli-node".into()),
        ],
        &[],
        port,
    )
    .await;
    let http = crate::support::http();
    let status: serde_json::Value = http
        .get(format!("http://127.0.0.1:{port}/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["node"], "cli-node");
    let streams = futures_util::future::join_all((0..100).map(|_| {
        http.get(format!("http://127.0.0.1:{port}/channel/c"))
            .send()
    }))
    .await;
    assert!(
        streams
            .iter()
            .all(|s| s.as_ref().is_ok_and(|r| r.status() == 200))
    );
    let started = Instant::now();
    sigterm(&child);
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn flags_override_env_and_enable_cors_compat_works() {
    let port = free_port();
    let _child = serve(
        &[
            ("HTTP_SERVER_PORT", "1".into()),
            ("HTTP_SERVER_ENABLE_CORS", "true".into()),
        ],
        &["--listen", &format!("127.0.0.1:{port}")],
        port,
    )
    .await;
    let r = crate::support::http()
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .header("origin", "https://x.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
}

#[tokio::test]
async fn bad_flags_fail_with_a_message_naming_them() {
    for (args, flag) in [
        (vec!["serve", "--heartbeat", "often"], "--heartbeat"),
        (
            vec!["serve", "--max-queued-bytes", "1KiB"],
            "--max-queued-bytes",
        ),
        (vec!["serve", "--listen", "127.0.0.1:99999"], "--listen"),
        (vec!["serve", "--cluster", "redis"], "--redis-url"),
        (vec!["serve", "--cluster", "nats"], "--nats-url"),
        (
            vec!["serve", "--cluster", "redis", "--redis-url", "http://x"],
            "--redis-url",
        ),
        (
            vec!["serve", "--cluster", "nats", "--nats-url", "nats://:"],
            "--nats-url",
        ),
        (
            vec![
                "serve",
                "--cluster",
                "redis",
                "--redis-url",
                "redis://127.0.0.1:1",
                "--backplane-prefix",
                "a:b",
            ],
            "--backplane-prefix",
        ),
        (vec!["serve", "--cluster", "kafka"], "--cluster"),
        (
            vec![
                "serve",
                "--cluster",
                "redis",
                "--redis-url",
                "rediss://h:1",
                "--backplane-ca",
                "/nonexistent/ca.pem",
            ],
            "--backplane-ca",
        ),
        (
            vec![
                "serve",
                "--cluster",
                "redis",
                "--redis-url",
                "redis://h:1",
                "--backplane-ca",
                "Cargo.toml",
            ],
            "--backplane-ca",
        ),
    ] {
        let out = Command::new(BIN).args(&args).output().await.unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag), "{args:?}: {err}");
    }
    let out = Command::new(BIN)
        .args(["serve"])
        .env("HERALD_HISTORY_TTL", "forever")
        .output()
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--history-ttl"));
    // A bad URL is shown without its password, whatever the password
    // holds (an @, a :, a /), for Redis and every URL of a NATS list.
    for (mode, var, url) in [
        (
            "redis",
            "HERALD_REDIS_URL",
            "redis://:hunter2@127.0.0.1:notaport",
        ),
        (
            "redis",
            "HERALD_REDIS_URL",
            "redis://:hun/ter2@127.0.0.1:notaport",
        ),
        (
            "redis",
            "HERALD_REDIS_URL",
            "redis://app:hun@ter2@127.0.0.1:notaport",
        ),
        (
            "nats",
            "HERALD_NATS_URL",
            "nats://a:hun/ter2@n1:4222,nats://b:hun@ter2@:x",
        ),
    ] {
        let out = Command::new(BIN)
            .args(["serve", "--cluster", mode])
            .env(var, url)
            .output()
            .await
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{url}");
        let flag = format!("--{mode}-url");
        assert!(err.contains(&flag), "{url}: {err}");
        for part in ["hunter2", "hun/", "ter2", "hun@"] {
            assert!(!err.contains(part), "{url}: {err}");
        }
    }
}

#[tokio::test]
async fn publish_prints_the_id_and_reads_stdin() {
    let hub = TestHub::spawn().await;
    let mut sub = hub.sse("/channel/c").await;
    let out = Command::new(BIN)
        .args([
            "publish",
            "--url",
            &hub.url(""),
            "--event",
            "note",
            "--retain",
            "c",
            "hello",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let ev = sub.next().await;
    assert_eq!(
        (ev.id.as_str(), ev.event.as_str(), ev.data.as_str()),
        (id.as_str(), "note", "hello")
    );
    let mut child = Command::new(BIN)
        .args(["publish", "--url", &hub.url(""), "c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use tokio::io::AsyncWriteExt;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"from\nstdin").await.unwrap();
    drop(stdin);
    assert!(child.wait_with_output().await.unwrap().status.success());
    assert_eq!(sub.next_data().await, "from\nstdin");
    let out = Command::new(BIN)
        .args(["publish", "--url", &hub.url(""), "bad name", "x"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid channel name"));
    // From standard input, one trailing line break is dropped (only one).
    for (input, want) in [
        ("echoed\n", "echoed"),
        ("crlf\r\n", "crlf"),
        ("two\n\n", "two\n"),
    ] {
        let mut child = Command::new(BIN)
            .args(["publish", "--url", &hub.url(""), "c"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input.as_bytes()).await.unwrap();
        drop(stdin);
        assert!(child.wait_with_output().await.unwrap().status.success());
        assert_eq!(sub.next_data().await, want, "{input:?}");
    }
    // --json keeps the publisher's key order; a duplicate --id says so.
    for round in 0..2 {
        let out = Command::new(BIN)
            .args([
                "publish",
                "--url",
                &hub.url(""),
                "--json",
                "--id",
                "k1",
                "c",
                r#"{"z": 1, "a": 2}"#,
            ])
            .output()
            .await
            .unwrap();
        assert!(out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.contains("duplicate"), round == 1, "{err}");
    }
    assert_eq!(sub.next_data().await, r#"{"z":1,"a":2}"#);
}

#[tokio::test]
async fn subscribe_prints_events_and_resumes_after_a_cut_without_loss_or_repeat() {
    let hub = TestHub::spawn().await;
    let proxy = Proxy::start(hub.addr).await;
    let mut child = Command::new(BIN)
        .args([
            "subscribe",
            "--json",
            "--url",
            &format!("http://{}", proxy.addr),
            "c",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    eventually(|| async { hub.status().await["channels"]["c"]["subscribers"] == 1 }).await;
    hub.publish("c", "one").await;
    let next =
        |l: Option<String>| serde_json::from_str::<serde_json::Value>(&l.expect("output")).unwrap();
    let first = next(
        tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap()
            .unwrap(),
    );
    assert_eq!(
        (first["data"].as_str(), first["channel"].as_str()),
        (Some("one"), Some("c"))
    );
    proxy.cut_all();
    eventually(|| async { hub.status().await["channels"]["c"]["subscribers"] == 0 }).await;
    hub.publish("c", "two").await;
    hub.publish("c", "three").await;
    let second = next(
        tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap()
            .unwrap(),
    );
    let third = next(
        tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap()
            .unwrap(),
    );
    assert_eq!(
        (second["data"].as_str(), third["data"].as_str()),
        (Some("two"), Some("three"))
    );
    hub.publish("c", "four").await;
    let fourth = next(
        tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap()
            .unwrap(),
    );
    assert_eq!(fourth["data"], "four");
}

#[tokio::test]
async fn subscribe_count_exits_after_n_events_and_bad_channels_fail() {
    let hub = TestHub::spawn().await;
    hub.publish("c", "old").await;
    let id = hub.publish("c", "kept").await;
    let _ = id;
    let out = Command::new(BIN)
        .args([
            "subscribe",
            "--url",
            &hub.url(""),
            "--last-event-id",
            "garbage",
            "--count",
            "2",
            "c",
        ])
        .output();
    let out = tokio::time::timeout(WAIT, out).await.unwrap().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "old\nkept\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("reset"));
    let out = Command::new(BIN)
        .args(["subscribe", "--url", &hub.url(""), "no spaces"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid channel name"));
}

#[tokio::test]
async fn spa_reloaders_environment_starts_a_compatible_server() {
    use futures_util::StreamExt;
    let fake = crate::fake_kube::FakeKube::start().await;
    fake.create(crate::fake_kube::FakeKube::deployment(
        "toucan",
        "spa",
        1,
        &[("spa", "spa:1.0")],
    ));
    fake.settle();
    let dir = crate::support::tempdir();
    let kubeconfig = fake.kubeconfig(&dir);
    let (port, ws_port) = (free_port(), free_port());
    // spa-reloader's variables, and the kubeconfig as kube-rs finds it.
    let _child = serve(
        &[
            ("HERALD_LISTEN", format!("127.0.0.1:{port}")),
            ("KUBECONFIG", kubeconfig.to_string_lossy().into_owned()),
            ("SPA_NAMESPACE", "toucan".into()),
            ("SPA_NAME", "spa".into()),
            ("SPA_RESYNC_SEC", "30".into()),
            ("SPA_WEBSOCKET_PORT", ws_port.to_string()),
        ],
        &[],
        port,
    )
    .await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{ws_port}/"))
        .await
        .unwrap();
    let frame = tokio::time::timeout(WAIT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(frame.to_text().unwrap()).unwrap();
    assert_eq!(v["namespace"], "toucan");
    assert_eq!(v["name"], "spa");
    assert_eq!(v["current_image"]["name"], "docker.io/library/spa:1.0");
    assert_eq!(v["current_image"]["sha256"], fake.digest("spa:1.0"));
}

#[tokio::test]
async fn subscribe_json_names_the_channel_of_every_event_of_several() {
    let hub = TestHub::spawn().await;
    let mut child = Command::new(BIN)
        .args(["subscribe", "--json", "--url", &hub.url(""), "a", "b"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    eventually(|| async { hub.status().await["channels"]["b"]["subscribers"] == 1 }).await;
    hub.publish("a", "text on a").await;
    // Raw text: serde_json's own maps would sort the keys.
    let v: serde_json::Value = hub
        .http
        .post(hub.url("/channel/b?event=named"))
        .header("content-type", "application/json")
        .body(r#"{"data": {"z": 1, "a": [2]}}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut got = vec![];
    for _ in 0..2 {
        let l = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .expect("a line");
        got.push(serde_json::from_str::<serde_json::Value>(&l).unwrap());
    }
    assert_eq!(got[0]["channel"], "a");
    assert_eq!(got[0]["data"], "text on a");
    assert_eq!(got[1]["channel"], "b");
    assert_eq!(got[1]["event"], "named");
    assert_eq!(got[1]["id"], v["id"]);
    // JSON data as published (the publisher's key order).
    assert_eq!(got[1]["data"], r#"{"z":1,"a":[2]}"#);
}

/// Boolean environment variables, the compatibility ones too, take
/// 1/0, true/false and yes/no; anything else fails naming the flag and the
/// forms.
#[tokio::test]
async fn boolean_environment_values_take_every_usual_form() {
    for (value, on) in [
        ("1", true),
        ("yes", true),
        ("TRUE", true),
        ("0", false),
        ("no", false),
        ("false", false),
    ] {
        let port = free_port();
        let _child = serve(
            &[("HTTP_SERVER_ENABLE_CORS", value.into())],
            &["--listen", &format!("127.0.0.1:{port}")],
            port,
        )
        .await;
        let r = crate::support::http()
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .header("origin", "https://x.example")
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.headers().contains_key("access-control-allow-origin"),
            on,
            "HTTP_SERVER_ENABLE_CORS={value}"
        );
    }
    for var in ["HTTP_SERVER_ENABLE_CORS", "HERALD_ALLOW_ANONYMOUS_PUBLISH"] {
        let out = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env(var, "maybe")
            .output()
            .await
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("expected 1/0, true/false or yes/no"),
            "{var}: {err}"
        );
    }
}

/// `--help` shows the kind of every value and every default; a malformed
/// address names the flag and the form.
#[tokio::test]
async fn help_shows_placeholders_and_defaults_and_errors_show_the_form() {
    let out = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .await
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for want in [
        "--listen <ADDR>",
        "--heartbeat <DURATION>",
        "--max-message-bytes <SIZE>",
        "--history-size <N>",
        "[default: 15s]",
        "[default: 64KiB]",
        "--drain-delay <DURATION>",
        "[default: none]",
    ] {
        assert!(help.contains(want), "{want} missing from --help");
    }
    for (flag, value, form) in [
        ("--listen", "8080", "expected IP:PORT, e.g. 0.0.0.0:8080"),
        ("--internal-listen", "localhost", "expected IP:PORT"),
        ("--history-ttl", "forever", "write a duration such as 10s"),
    ] {
        let out = Command::new(BIN)
            .args(["serve", flag, value])
            .output()
            .await
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(flag) && err.contains(form),
            "{flag} {value}: {err}"
        );
    }
}
