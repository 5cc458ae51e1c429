//! `herald bench` smoke runs against herald (the full comparison with nchan
//! and Pushpin is `bench/compare`, too long for CI).

use tokio::process::Command;

use crate::support::{TestHub, WAIT};

const BIN: &str = env!("CARGO_BIN_EXE_herald");

async fn bench(hub: &TestHub, args: &[&str]) -> serde_json::Value {
    let out_file = std::env::temp_dir().join(format!(
        "herald-bench-{}-{}.json",
        std::process::id(),
        args.join("_").len()
    ));
    let sub = hub.url("/channel/{channel}");
    let ws = format!("ws://{}/ws?channel={{channel}}", hub.addr);
    let transport_ws = args.contains(&"ws");
    let pid = std::process::id().to_string();
    let mut cmd = Command::new(BIN);
    cmd.args([
        "bench",
        "--publish-url",
        &sub,
        "--pid",
        &pid,
        "--out",
        out_file.to_str().unwrap(),
    ])
    .args(["--subscribe-url", if transport_ws { &ws } else { &sub }])
    .args(args);
    let out = tokio::time::timeout(WAIT * 3, cmd.output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("| target |"), "{table}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&out_file).unwrap()).unwrap();
    std::fs::remove_file(out_file).unwrap();
    report
}

#[tokio::test]
async fn fanout_over_sse_and_websocket_counts_every_delivery() {
    let hub = TestHub::spawn().await;
    for transport in ["sse", "ws"] {
        let r = bench(
            &hub,
            &[
                "--transport",
                transport,
                "--subscribers",
                "300",
                "--messages",
                "20",
                "--rate",
                "200",
                "--per-process",
                "200",
                "--channel",
                transport,
            ],
        )
        .await;
        assert_eq!(r["connected"], 300, "{r}");
        assert_eq!(
            (
                r["expected"].as_u64(),
                r["delivered"].as_u64(),
                r["lost"].as_u64()
            ),
            (Some(6000), Some(6000), Some(0)),
            "{r}"
        );
        assert_eq!(r["duplicates"], 0);
        assert!(r["p99_ms"].as_f64().unwrap() > 0.0);
        assert!(
            r["cpu_seconds"].as_f64().unwrap() > 0.0,
            "the test process (the target) was measured"
        );
    }
}

#[tokio::test]
async fn the_channels_and_burst_scenarios_route_one_message_each() {
    let hub = TestHub::spawn().await;
    let r = bench(
        &hub,
        &[
            "--scenario",
            "channels",
            "--subscribers",
            "200",
            "--channel",
            "per",
        ],
    )
    .await;
    assert_eq!(
        (r["expected"].as_u64(), r["delivered"].as_u64()),
        (Some(200), Some(200)),
        "{r}"
    );
    let per = crate::support::get_json(&hub.url("/status?prefix=per-&channels=1000")).await;
    assert_eq!(per["channels_matching"], 200);
    assert_eq!(per["channels"].as_object().unwrap().len(), 200);
    let r = bench(
        &hub,
        &[
            "--scenario",
            "burst",
            "--subscribers",
            "200",
            "--channel",
            "burst",
        ],
    )
    .await;
    assert_eq!(
        (r["expected"].as_u64(), r["delivered"].as_u64()),
        (Some(200), Some(200)),
        "{r}"
    );
}

#[tokio::test]
async fn losses_are_reported_when_the_target_drops_messages() {
    // History 0 and a subscriber set that is cut mid-run would be flaky;
    // instead publish to a channel nobody subscribed to: every message is lost.
    let hub = TestHub::spawn().await;
    let sub = hub.url("/channel/{channel}");
    let elsewhere = hub.url("/channel/{channel}-elsewhere");
    let out = Command::new(BIN)
        .args([
            "bench",
            "--subscribe-url",
            &sub,
            "--publish-url",
            &elsewhere,
            "--subscribers",
            "50",
            "--messages",
            "5",
            "--rate",
            "100",
            "--drain",
            "300ms",
        ])
        .output();
    let out = tokio::time::timeout(WAIT, out).await.unwrap().unwrap();
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("| 0/250 | 250 |"), "{table}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("250 lost"));
}
