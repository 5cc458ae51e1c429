use super::*;

fn cfg(history_size: usize) -> Config {
    Config {
        history_size,
        history_ttl: Duration::from_secs(600),
        max_queued_bytes: 1 << 20,
        max_channels: usize::MAX,
        origin: None,
    }
}

fn ch(s: &str) -> ChannelName {
    ChannelName::parse(s).unwrap()
}

fn text(s: &str) -> Publish {
    Publish {
        data: Data::Text(s.into()),
        event: None,
        key: None,
        retry: None,
        retain: false,
    }
}

/// Everything an outbox holds now (replays read to their end), batch by
/// batch, as the writer takes it.
fn take_all(o: &Outbox) -> Result<Vec<Item>, Closed> {
    let mut out = vec![];
    loop {
        match o.try_batch() {
            None => return Ok(out),
            Some(Batch::Closed(c)) => return Err(c),
            Some(Batch::Items(items)) => out.extend(items),
        }
    }
}

/// What an outbox holds, as "data" strings and "reset:<channel>".
fn drain(o: &Outbox) -> Vec<String> {
    match take_all(o) {
        Err(c) => vec![format!("closed:{c:?}")],
        Ok(items) => items
            .into_iter()
            .map(|i| match i {
                Item::Event(e) => e.data.as_text().to_owned(),
                Item::Reset(r) => format!("reset:{}", r.channel),
            })
            .collect(),
    }
}

fn sub(hub: &Arc<Hub>, c: &str, from: &Resume) -> (Arc<Outbox>, Subscription) {
    let o = hub.outbox();
    let s = hub
        .subscribe(&ch(c), &ClientId::generate(), &o, from)
        .unwrap();
    (o, s)
}

#[test]
fn subscribers_receive_events_of_their_channel_only() {
    let hub = Hub::new(cfg(10));
    let (a, _sa) = sub(&hub, "a", &Resume::Fresh);
    let (b, _sb) = sub(&hub, "b", &Resume::Fresh);
    hub.publish(&ch("a"), text("1"));
    assert_eq!(drain(&a), ["1"]);
    assert!(drain(&b).is_empty());
}

#[test]
fn resume_replays_strictly_after_the_id_then_goes_live() {
    let hub = Hub::new(cfg(10));
    let ids: Vec<_> = (0..5)
        .map(|i| hub.publish(&ch("a"), text(&i.to_string())).id)
        .collect();
    let (o, _s) = sub(&hub, "a", &Resume::After(ids[1]));
    hub.publish(&ch("a"), text("5"));
    assert_eq!(drain(&o), ["2", "3", "4", "5"]);
}

#[test]
fn one_id_resumes_every_channel_of_a_stream() {
    let hub = Hub::new(cfg(10));
    hub.publish(&ch("a"), text("a1"));
    let mid = hub.publish(&ch("b"), text("b1")).id;
    hub.publish(&ch("a"), text("a2"));
    hub.publish(&ch("b"), text("b2"));
    let (oa, _s1) = sub(&hub, "a", &Resume::After(mid));
    let (ob, _s2) = sub(&hub, "b", &Resume::After(mid));
    assert_eq!(drain(&oa), ["a2"]);
    assert_eq!(drain(&ob), ["b2"]);
}

#[test]
fn an_id_older_than_history_resets_then_replays_everything() {
    let hub = Hub::new(cfg(3));
    let first = hub.publish(&ch("a"), text("0")).id;
    for i in 1..5 {
        hub.publish(&ch("a"), text(&i.to_string()));
    }
    let (o, _s) = sub(&hub, "a", &Resume::After(first));
    assert_eq!(drain(&o), ["reset:a", "2", "3", "4"]);
}

#[test]
fn an_id_at_the_edge_of_history_needs_no_reset() {
    let hub = Hub::new(cfg(3));
    let ids: Vec<_> = (0..5)
        .map(|i| hub.publish(&ch("a"), text(&i.to_string())).id)
        .collect();
    // 0 and 1 were evicted; a client that saw 1 has missed nothing.
    let (o, _s) = sub(&hub, "a", &Resume::After(ids[1]));
    assert_eq!(drain(&o), ["2", "3", "4"]);
}

#[test]
fn unknown_and_foreign_ids_reset() {
    let hub = Hub::with_ids(cfg(10), IdGen::starting_at(1_000_000));
    hub.publish(&ch("a"), text("x"));
    for from in [
        Resume::Unknown("abc".into()),
        Resume::After(EventId::from_u64(5)), // before this hub
        Resume::After(EventId::from_u64(u64::MAX / 2)), // from the future
    ] {
        let (o, _s) = sub(&hub, "a", &from);
        assert_eq!(drain(&o), ["reset:a", "x"], "{from:?}");
    }
}

#[test]
fn retained_value_goes_first_to_new_subscribers_only() {
    let hub = Hub::new(cfg(10));
    let mut p = text("v1");
    p.retain = true;
    let id = hub.publish(&ch("a"), p).id;
    hub.publish(&ch("a"), text("other"));
    let (o, _s) = sub(&hub, "a", &Resume::Fresh);
    assert_eq!(drain(&o), ["v1"]);
    let (o, _s) = sub(&hub, "a", &Resume::After(id));
    assert_eq!(drain(&o), ["other"]);
}

#[test]
fn retained_value_survives_history_and_comes_with_a_reset() {
    let hub = Hub::new(cfg(2));
    let mut p = text("v1");
    p.retain = true;
    let first = hub.publish(&ch("a"), p).id;
    for i in 0..3 {
        hub.publish(&ch("a"), text(&i.to_string()));
    }
    let (o, _s) = sub(&hub, "a", &Resume::Fresh);
    assert_eq!(drain(&o), ["v1"]);
    let (o, _s) = sub(&hub, "a", &Resume::After(first));
    assert_eq!(
        drain(&o),
        ["reset:a", "1", "2"],
        "v1 was seen: after {first:?}"
    );
    let (o, _s) = sub(&hub, "a", &Resume::Unknown("?".into()));
    assert_eq!(drain(&o), ["reset:a", "v1", "1", "2"]);
}

#[test]
fn idempotency_key_acknowledges_the_first_id_and_delivers_once() {
    let hub = Hub::new(cfg(10));
    let (o, _s) = sub(&hub, "a", &Resume::Fresh);
    let mut p = text("x");
    p.key = Some("k1".into());
    let first = hub.publish(&ch("a"), p.clone());
    let again = hub.publish(&ch("a"), p.clone());
    assert!(!first.duplicate);
    assert_eq!(
        again,
        Published {
            id: first.id,
            duplicate: true,
            wire: None,
        }
    );
    assert_eq!(drain(&o), ["x"]);
    // Same key, another channel: not a duplicate.
    assert!(!hub.publish(&ch("b"), p).duplicate);
}

#[test]
fn idempotency_key_is_forgotten_when_its_event_leaves_history() {
    let hub = Hub::new(cfg(1));
    let mut p = text("x");
    p.key = Some("k".into());
    hub.publish(&ch("a"), p.clone());
    hub.publish(&ch("a"), text("y"));
    assert!(!hub.publish(&ch("a"), p).duplicate);
}

#[test]
fn a_client_id_can_connect_once_per_channel() {
    let hub = Hub::new(cfg(10));
    let id = ClientId::parse("tab1").unwrap();
    let o = hub.outbox();
    let s = hub.subscribe(&ch("a"), &id, &o, &Resume::Fresh).unwrap();
    assert!(matches!(
        hub.subscribe(&ch("a"), &id, &hub.outbox(), &Resume::Fresh),
        Err(Error::ClientIdTaken { .. })
    ));
    assert!(
        hub.subscribe(&ch("b"), &id, &hub.outbox(), &Resume::Fresh)
            .is_ok()
    );
    drop(s);
    assert!(hub.subscribe(&ch("a"), &id, &o, &Resume::Fresh).is_ok());
}

#[test]
fn targeted_publish_reaches_one_client_and_stays_out_of_history() {
    let hub = Hub::new(cfg(10));
    let id = ClientId::parse("me").unwrap();
    let mine = hub.outbox();
    let _s1 = hub.subscribe(&ch("a"), &id, &mine, &Resume::Fresh).unwrap();
    let (other, _s2) = sub(&hub, "a", &Resume::Fresh);
    hub.publish_to_client(&ch("a"), &id, text("hi")).unwrap();
    assert_eq!(drain(&mine), ["hi"]);
    assert!(drain(&other).is_empty());
    assert_eq!(hub.status(&StatusQuery::default()).channels["a"].history, 0);
    let missing = ClientId::parse("nobody").unwrap();
    assert!(matches!(
        hub.publish_to_client(&ch("a"), &missing, text("x")),
        Err(Error::NoSuchClient { .. })
    ));
    assert!(hub.publish_to_client(&ch("zzz"), &id, text("x")).is_err());
}

#[test]
fn publish_all_reaches_every_channel_with_subscribers_with_distinct_ids() {
    let hub = Hub::new(cfg(10));
    let (a, _sa) = sub(&hub, "a", &Resume::Fresh);
    let (b, _sb) = sub(&hub, "b", &Resume::Fresh);
    hub.publish(&ch("lonely"), text("history only"));
    let out = hub.publish_all(&text("all"));
    assert_eq!(out.len(), 2);
    assert_ne!(out[0].1.id, out[1].1.id);
    assert_eq!(drain(&a), ["all"]);
    assert_eq!(drain(&b), ["all"]);
}

#[test]
fn slow_subscriber_is_cut_off_and_others_get_everything() {
    let hub = Hub::new(Config {
        max_queued_bytes: 1000,
        ..cfg(10)
    });
    let (slow, _s1) = sub(&hub, "a", &Resume::Fresh);
    let (fast, _s2) = sub(&hub, "a", &Resume::Fresh);
    for i in 0..100 {
        hub.publish(&ch("a"), text(&format!("{i:0100}")));
        assert_eq!(drain(&fast).len(), 1);
    }
    assert_eq!(drain(&slow), ["closed:Slow"]);
    assert_eq!(
        hub.status(&StatusQuery::default())
            .slow_consumers_disconnected,
        1
    );
}

#[test]
fn channels_are_freed_when_the_last_subscriber_leaves_without_history() {
    let hub = Hub::new(cfg(0));
    let (_o, s) = sub(&hub, "a", &Resume::Fresh);
    hub.publish(&ch("a"), text("x"));
    assert_eq!(hub.channel_count(), 1);
    drop(s);
    assert_eq!(hub.channel_count(), 0);
    hub.publish(&ch("b"), text("nobody listens"));
    assert_eq!(hub.channel_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn history_expires_after_its_ttl_and_the_channel_is_freed() {
    let hub = Hub::new(Config {
        history_ttl: Duration::from_secs(60),
        ..cfg(10)
    });
    let first = hub.publish(&ch("a"), text("old")).id;
    hub.publish(&ch("a"), text("old2"));
    tokio::time::advance(Duration::from_secs(30)).await;
    hub.publish(&ch("a"), text("new"));
    tokio::time::advance(Duration::from_secs(31)).await;
    assert_eq!(hub.sweep(), 1);
    assert_eq!(hub.status(&StatusQuery::default()).channels["a"].history, 1);
    // The expired event makes resuming from before it a reset.
    let (o, s) = sub(&hub, "a", &Resume::After(first));
    assert_eq!(drain(&o), ["reset:a", "new"]);
    drop(s);
    tokio::time::advance(Duration::from_secs(30)).await;
    assert_eq!(hub.sweep(), 0);
    // A channel made again later still knows something was lost.
    let (o, _s) = sub(&hub, "a", &Resume::After(first));
    assert_eq!(drain(&o), ["reset:a"]);
}

#[test]
fn a_million_short_lived_channels_leave_nothing_behind() {
    let hub = Hub::new(cfg(0));
    for i in 0..1_000_000 {
        let (_o, _s) = sub(&hub, &format!("c{i}"), &Resume::Fresh);
    }
    assert_eq!(hub.channel_count(), 0);
    hub.sweep();
    assert!(
        hub.channels.capacity() < 10_000,
        "{}",
        hub.channels.capacity()
    );
}

#[test]
fn concurrent_publishers_keep_per_channel_order() {
    let hub = Hub::new(cfg(100_000));
    let (o, _s) = sub(&hub, "a", &Resume::Fresh);
    std::thread::scope(|s| {
        for t in 0..4 {
            let hub = &hub;
            s.spawn(move || {
                for i in 0..1000 {
                    hub.publish(&ch("a"), text(&format!("{t}-{i}")));
                }
            });
        }
    });
    let Some(Batch::Items(items)) = o.try_batch() else {
        panic!()
    };
    assert_eq!(items.len(), 4000);
    let ids: Vec<_> = items
        .iter()
        .map(|i| match i {
            Item::Event(e) => e.id,
            Item::Reset(_) => unreachable!(),
        })
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
}

mod cluster {
    use super::*;

    fn node(name: &str) -> Arc<Hub> {
        Hub::new(Config {
            origin: Some(Origin::from(name)),
            ..cfg(100)
        })
    }

    fn data(ev: &Item) -> String {
        match ev {
            Item::Event(e) => e.data.as_text().to_owned(),
            Item::Reset(_) => "RESET".into(),
        }
    }

    fn drain(outbox: &Arc<Outbox>) -> Vec<Item> {
        take_all(outbox).unwrap_or_default()
    }

    /// A local publish whose key was seen already leaves the node's
    /// position where it was: a position must never name an event that
    /// exists nowhere (peers could never catch up to it).
    #[test]
    fn a_duplicate_publish_does_not_move_the_position() {
        let a = node("a");
        let keyed = || Publish {
            key: Some("k".into()),
            ..text("x")
        };
        let first = a.publish(&ch("c"), keyed());
        let before = a.position();
        let again = a.publish(&ch("c"), keyed());
        assert!(again.duplicate);
        assert_eq!(again.id, first.id);
        assert_eq!(a.position(), before);
    }

    /// A position no node can have reached is unknown: a reset and
    /// everything kept, and live events are delivered (not skipped as
    /// "already seen").
    #[test]
    fn a_position_from_the_future_gets_a_reset_and_live_events() {
        let a = node("a");
        let c = ch("c");
        a.publish(&c, text("kept"));
        let future = Resume::parse(Some("a=9999999999999999,b=9999999999999999"));
        let (o, _s) = sub(&a, "c", &future);
        a.publish(&c, text("live"));
        let got: Vec<String> = drain(&o).iter().map(data).collect();
        assert_eq!(got, ["RESET", "kept", "live"]);
        // Another origin's entry far ahead of the clock is the same.
        let ahead = format!("a={}", a.position().get("a"));
        let ahead = format!("{ahead},b=9999999999999999");
        let (o, _s) = sub(&a, "c", &Resume::parse(Some(&ahead)));
        a.publish(&c, text("live2"));
        let got: Vec<String> = drain(&o).iter().map(data).collect();
        assert_eq!(got, ["RESET", "kept", "live", "live2"]);
        // A position a little ahead (a client from a node that is ahead) is
        // honoured: nothing replayed, and what it had is not sent again.
        let near = a.position().to_string();
        let (o, _s) = sub(&a, "c", &Resume::parse(Some(&near)));
        a.publish(&c, text("live3"));
        let got: Vec<String> = drain(&o).iter().map(data).collect();
        assert_eq!(got, ["live3"]);
    }

    /// Copies node `from`'s own events to `to`, as a peer stream does.
    fn replicate(from: &Hub, to: &Hub) {
        for ev in from.own_events_after(EventId::from_u64(0)) {
            to.apply_remote(
                &ev.channel,
                ev.origin.as_ref().unwrap(),
                ev.id,
                Publish {
                    data: ev.data.clone(),
                    event: ev.name.clone(),
                    key: ev.key.clone(),
                    retry: ev.retry,
                    retain: ev.retain,
                },
            );
        }
    }

    #[test]
    fn the_newest_retained_value_wins_in_any_arrival_order() {
        let c = ch("v");
        let (a, b) = (node("a"), node("b"));
        let mut p = text("old");
        p.retain = true;
        a.publish(&c, p);
        let mut p = text("new");
        p.retain = true;
        b.publish(&c, p);
        // One node learns them in id order, another in the opposite order
        // (a snapshot sorted by origin: "a" after "b" here).
        let (x, y) = (node("x"), node("y"));
        replicate(&a, &x);
        replicate(&b, &x);
        replicate(&b, &y);
        replicate(&a, &y);
        for n in [&x, &y, &a, &b] {
            if !Arc::ptr_eq(n, &a) {
                replicate(&a, n);
            }
            if !Arc::ptr_eq(n, &b) {
                replicate(&b, n);
            }
            let out = n.outbox();
            let _s = n
                .subscribe(&c, &ClientId::generate(), &out, &Resume::Fresh)
                .unwrap();
            let got: Vec<String> = drain(&out).iter().map(data).collect();
            assert_eq!(got, ["new"], "a fresh subscriber's retained value");
        }
    }

    #[test]
    fn ids_are_positions_and_resume_on_another_node_exactly() {
        let (a, b) = (node("a"), node("b"));
        let c = ch("c");
        let sub_a = a.outbox();
        let _s = a
            .subscribe(&c, &ClientId::generate(), &sub_a, &Resume::Fresh)
            .unwrap();
        a.publish(&c, text("a1"));
        b.publish(&c, text("b1"));
        replicate(&b, &a);
        a.publish(&c, text("a2"));
        let got = drain(&sub_a);
        let ids: Vec<String> = got
            .iter()
            .map(|i| match i {
                Item::Event(e) => e.wire_id(),
                Item::Reset(_) => String::new(),
            })
            .collect();
        assert!(
            ids[0].starts_with("a=") && !ids[0].contains("b="),
            "{ids:?}"
        );
        assert!(ids[1].contains("a=") && ids[1].contains("b="), "{ids:?}");
        // The client saw a1 and b1 on node a, then moves to node b, which
        // has not received a2 yet.
        replicate(&a, &b);
        let seen = Resume::parse(Some(&ids[1]));
        assert!(matches!(seen, Resume::Position(_)));
        let sub_b = b.outbox();
        let _s2 = b
            .subscribe(&c, &ClientId::generate(), &sub_b, &seen)
            .unwrap();
        let got: Vec<String> = drain(&sub_b).iter().map(data).collect();
        assert_eq!(got, ["a2"]);
        // A re-delivery of what the client already has is skipped.
        b.apply_remote(&c, &Origin::from("a"), EventId::from_u64(1), text("stale"));
        b.publish(&c, text("b2"));
        let got: Vec<String> = drain(&sub_b).iter().map(data).collect();
        assert_eq!(got, ["b2"]);
    }

    #[test]
    fn an_event_already_applied_is_applied_once() {
        let (a, b) = (node("a"), node("b"));
        let c = ch("c");
        a.publish(&c, text("x"));
        replicate(&a, &b);
        replicate(&a, &b);
        assert_eq!(b.snapshot().len(), 1);
        assert_eq!(b.position().get("a"), a.position().get("a"));
    }

    #[test]
    fn a_position_older_than_history_gets_a_reset() {
        let a = Hub::new(Config {
            origin: Some(Origin::from("a")),
            ..cfg(2)
        });
        let c = ch("c");
        let sub = a.outbox();
        let _s = a
            .subscribe(&c, &ClientId::generate(), &sub, &Resume::Fresh)
            .unwrap();
        a.publish(&c, text("1"));
        let first = match &drain(&sub)[0] {
            Item::Event(e) => e.wire_id(),
            Item::Reset(_) => unreachable!(),
        };
        for d in ["2", "3", "4"] {
            a.publish(&c, text(d));
        }
        let late = a.outbox();
        let _s2 = a
            .subscribe(
                &c,
                &ClientId::generate(),
                &late,
                &Resume::parse(Some(&first)),
            )
            .unwrap();
        let got: Vec<String> = drain(&late).iter().map(data).collect();
        assert_eq!(got, ["RESET", "3", "4"]);
        // A plain single-node id means nothing to a cluster node.
        let plain = a.outbox();
        let _s3 = a
            .subscribe(
                &c,
                &ClientId::generate(),
                &plain,
                &Resume::parse(Some("1795000000000000")),
            )
            .unwrap();
        assert_eq!(data(&drain(&plain)[0]), "RESET");
    }
}

mod replay {
    use super::*;

    fn big(n: usize, size: usize) -> Publish {
        text(&format!("{n:06}{}", "x".repeat(size - 6)))
    }

    /// A resume on a long history is read a bounded batch at a time, in
    /// order, after the reset; what is queued per connection stays small.
    #[test]
    fn is_read_from_history_in_bounded_batches() {
        let hub = Hub::new(cfg(1000));
        for n in 0..200 {
            hub.publish(&ch("a"), big(n, 10_000));
        }
        let (o, _s) = sub(&hub, "a", &Resume::Unknown("garbage".into()));
        let mut got = vec![];
        let mut batches = 0;
        while let Some(Batch::Items(items)) = o.try_batch() {
            batches += 1;
            let bytes: usize = items.iter().map(Item::cost).sum();
            assert!(
                bytes <= super::super::replay::BATCH_BYTES + 10_100,
                "{bytes}"
            );
            got.extend(items);
        }
        assert!(batches >= 20, "{batches}");
        assert!(matches!(got[0], Item::Reset(_)));
        let data: Vec<_> = got[1..]
            .iter()
            .map(|i| match i {
                Item::Event(e) => e.data.as_text()[..6].to_owned(),
                Item::Reset(_) => "reset".into(),
            })
            .collect();
        let want: Vec<_> = (0..200).map(|n| format!("{n:06}")).collect();
        assert_eq!(data, want);
    }

    /// Live events published during a replay come after it, each once.
    #[test]
    fn live_events_follow_the_replay() {
        let hub = Hub::new(cfg(1000));
        for n in 0..50 {
            hub.publish(&ch("a"), big(n, 4_000));
        }
        let first = hub.seq.ids().boot();
        let (o, _s) = sub(&hub, "a", &Resume::After(first));
        let Some(Batch::Items(first_batch)) = o.try_batch() else {
            panic!()
        };
        let sent = first_batch.len();
        assert!(sent < 50, "{sent}");
        for n in 50..60 {
            hub.publish(&ch("a"), big(n, 4_000));
        }
        let rest = drain(&o);
        let want: Vec<_> = (sent..60).map(|n| format!("{n:06}")).collect();
        let got: Vec<_> = rest.iter().map(|d| d[..6].to_owned()).collect();
        assert_eq!(got, want);
    }

    /// History evicted before a slow reader's replay reached it: a reset,
    /// then what is left. Nothing is skipped silently.
    #[test]
    fn eviction_during_a_replay_is_a_reset() {
        let hub = Hub::new(cfg(100));
        for n in 0..100 {
            hub.publish(&ch("a"), big(n, 4_000));
        }
        let (o, _s) = sub(&hub, "a", &Resume::After(hub.seq.ids().boot()));
        let Some(Batch::Items(first)) = o.try_batch() else {
            panic!()
        };
        let sent = first.len();
        assert!(sent < 50, "{sent}");
        // 60 more: the first 60 of history go, most of them unsent.
        for n in 100..160 {
            hub.publish(&ch("a"), big(n, 100));
        }
        let rest = drain(&o);
        assert_eq!(rest[0], "reset:a");
        let got: Vec<_> = rest[1..].iter().map(|d| d[..6].to_owned()).collect();
        let want: Vec<_> = (60..160).map(|n| format!("{n:06}")).collect();
        assert_eq!(got, want);
    }

    /// Subscribing again and again without reading queues no replays: an
    /// ended subscription takes its cursor with it.
    #[test]
    fn an_ended_subscription_drops_its_replay() {
        let hub = Hub::new(Config {
            max_queued_bytes: 4096,
            ..cfg(1000)
        });
        for n in 0..100 {
            hub.publish(&ch("a"), big(n, 10_000));
        }
        let o = hub.outbox();
        let client = ClientId::generate();
        for _ in 0..1000 {
            let s = hub
                .subscribe(&ch("a"), &client, &o, &Resume::Unknown("x".into()))
                .unwrap();
            drop(s);
        }
        assert!(!o.is_closed());
        assert!(drain(&o).is_empty());
    }

    /// Replays still queued count a small constant each, so a client that
    /// keeps subscribing without reading is cut off like a slow one.
    #[test]
    fn queued_replays_count_against_the_limit() {
        let hub = Hub::new(Config {
            max_queued_bytes: 10 * super::super::replay::CURSOR_COST,
            ..cfg(1000)
        });
        let o = hub.outbox();
        let client = ClientId::generate();
        let mut subs = vec![];
        for c in 0..20 {
            let name = ch(&format!("c{c}"));
            hub.publish(&name, text("x"));
            subs.push(hub.subscribe(&name, &client, &o, &Resume::Unknown("x".into())));
        }
        assert!(o.is_closed());
    }
}

mod limits {
    use super::*;

    /// `max_channels`: a new channel beyond it is refused, an existing one
    /// is still served, and one freed makes room again.
    #[test]
    fn channels_are_bounded() {
        let hub = Hub::new(Config {
            max_channels: 2,
            ..cfg(10)
        });
        let (_a, sa) = sub(&hub, "a", &Resume::Fresh);
        let (_b, _sb) = sub(&hub, "b", &Resume::Fresh);
        let o = hub.outbox();
        let e = hub
            .subscribe(&ch("c"), &ClientId::generate(), &o, &Resume::Fresh)
            .unwrap_err();
        assert_eq!(e, Error::TooManyChannels { max: 2 });
        assert!(hub.admit(&ch("c")).is_err());
        assert!(hub.admit(&ch("a")).is_ok());
        let sa2 = hub
            .subscribe(&ch("a"), &ClientId::generate(), &o, &Resume::Fresh)
            .unwrap();
        drop(sa);
        let o2 = hub.outbox();
        // "a" still has the second subscriber: still full.
        assert!(
            hub.subscribe(&ch("c"), &ClientId::generate(), &o2, &Resume::Fresh)
                .is_err()
        );
        // Freed (no subscriber, no history): room for "c".
        drop(sa2);
        assert!(
            hub.subscribe(&ch("c"), &ClientId::generate(), &o2, &Resume::Fresh)
                .is_ok()
        );
    }

    /// `/status` lists the most subscribed matching channels, at most the
    /// limit, and counts the rest.
    #[test]
    fn status_lists_the_top_channels() {
        let hub = Hub::new(cfg(10));
        let mut keep = vec![];
        for (name, n) in [("x.a", 3), ("x.b", 1), ("x.c", 2), ("y.d", 5), ("x.e", 2)] {
            for _ in 0..n {
                keep.push(sub(&hub, name, &Resume::Fresh));
            }
        }
        let st = hub.status(&StatusQuery {
            prefix: "x.".into(),
            limit: 2,
        });
        assert_eq!(st.channel_count, 5);
        assert_eq!(st.channels_matching, 4);
        let names: Vec<_> = st.channels.keys().cloned().collect();
        // x.a (3), then x.c and x.e (2 each): the earlier name wins the tie.
        assert_eq!(names, ["x.a", "x.c"]);
        assert_eq!(st.channels["x.a"].subscribers, 3);
        let none = hub.status(&StatusQuery {
            prefix: String::new(),
            limit: 0,
        });
        assert!(none.channels.is_empty());
        assert_eq!(none.channels_matching, 5);
    }
}

/// One connection of several channels: replays merged in delivery order,
/// live events in id order under concurrent publishers.
mod order {
    use super::*;

    /// Subscribes one outbox to every channel of `chans`, as an SSE
    /// `/events?stream=..` or a WebSocket `?channel=..` registration does.
    fn sub_all(hub: &Arc<Hub>, chans: &[&str], from: &Resume) -> (Arc<Outbox>, Vec<Subscription>) {
        let o = hub.outbox();
        let id = ClientId::generate();
        let subs = chans
            .iter()
            .map(|c| hub.subscribe(&ch(c), &id, &o, from).unwrap())
            .collect();
        (o, subs)
    }

    fn events(items: Vec<Item>) -> Vec<SharedEvent> {
        items
            .into_iter()
            .map(|i| match i {
                Item::Event(e) => e,
                Item::Reset(r) => panic!("unexpected reset {r:?}"),
            })
            .collect()
    }

    /// Published a0 b0 a1 b1 ..., a resume from any id replays exactly what
    /// followed it, in that order; so a client cut anywhere in the replay
    /// that resumes from its last id ends with every event once.
    #[test]
    fn a_multi_channel_replay_is_merged_in_id_order_and_resumes_at_any_cut() {
        let hub = Hub::new(cfg(100));
        let mut published = vec![];
        for i in 0..10 {
            for c in ["a", "b", "c"] {
                let name = format!("{c}{i}");
                published.push((hub.publish(&ch(c), text(&name)).id, name));
            }
        }
        let all: Vec<String> = published.iter().map(|(_, n)| n.clone()).collect();
        // Small batches would not change the order; the whole replay here
        // fits in one.
        for cut in 0..published.len() {
            let (first_id, _) = &published[0];
            // From "before everything" (the id before the first) too.
            let from = if cut == 0 {
                Resume::After(EventId::from_u64(first_id.as_u64() - 1))
            } else {
                Resume::After(published[cut - 1].0)
            };
            let (o, _s) = sub_all(&hub, &["a", "b", "c"], &from);
            let got: Vec<String> = events(take_all(&o).unwrap())
                .iter()
                .map(|e| e.data.as_text().to_owned())
                .collect();
            assert_eq!(got, all[cut..], "resumed after event {cut}");
        }
        // A client that reads the replay one event at a time, is cut after
        // each, and resumes from its last id, gets every event once.
        let mut got = vec![];
        let mut from = Resume::After(EventId::from_u64(published[0].0.as_u64() - 1));
        loop {
            let (o, _s) = sub_all(&hub, &["c", "a", "b"], &from);
            let Some(ev) = events(take_all(&o).unwrap()).into_iter().next() else {
                break;
            };
            from = Resume::After(ev.id);
            got.push(ev.data.as_text().to_owned());
        }
        assert_eq!(got, all);
    }

    /// Live events published while the replay is read, on every channel,
    /// come after it and in id order.
    #[test]
    fn live_events_queued_between_two_registrations_are_merged_too() {
        let hub = Hub::new(cfg(100));
        let before = hub.publish(&ch("a"), text("a0")).id;
        hub.publish(&ch("b"), text("b0"));
        let o = hub.outbox();
        let id = ClientId::generate();
        let from = Resume::After(EventId::from_u64(before.as_u64() - 1));
        let _sa = hub.subscribe(&ch("a"), &id, &o, &from).unwrap();
        // Published between the two registrations: live on a, and in b's
        // history, which is replayed.
        hub.publish(&ch("a"), text("a1"));
        hub.publish(&ch("b"), text("b1"));
        hub.publish(&ch("a"), text("a2"));
        let _sb = hub.subscribe(&ch("b"), &id, &o, &from).unwrap();
        hub.publish(&ch("b"), text("b2"));
        let got: Vec<String> = events(take_all(&o).unwrap())
            .iter()
            .map(|e| e.data.as_text().to_owned())
            .collect();
        assert_eq!(got, ["a0", "b0", "a1", "b1", "a2", "b2"]);
    }

    /// Four threads publish to four channels at once; one connection of all
    /// four, drained while they publish, receives every id in order.
    #[test]
    fn live_delivery_is_in_id_order_under_concurrent_publishers() {
        let hub = Hub::new(cfg(10));
        let chans = ["a", "b", "c", "d"];
        let (o, _s) = sub_all(&hub, &chans, &Resume::Fresh);
        let per = 20_000;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let got = std::thread::scope(|s| {
            for c in chans {
                let hub = &hub;
                s.spawn(move || {
                    for i in 0..per {
                        hub.publish(&ch(c), text(&i.to_string()));
                    }
                });
            }
            rt.block_on(async {
                let mut got = Vec::with_capacity(4 * per);
                while got.len() < 4 * per {
                    match o.next_batch().await {
                        Batch::Items(items) => got.extend(events(items.into())),
                        Batch::Closed(c) => panic!("closed: {c:?}"),
                    }
                }
                got
            })
        });
        let inversions = got.windows(2).filter(|w| w[0].id >= w[1].id).count();
        assert_eq!(inversions, 0, "of {} events", got.len());
    }

    /// In a cluster, origin ids are not comparable: a multi-channel replay
    /// follows apply order, which is what positions follow.
    #[test]
    fn a_cluster_replay_follows_the_order_events_were_applied() {
        let node = |name: &str| {
            Hub::new(Config {
                origin: Some(Origin::from(name)),
                ..cfg(100)
            })
        };
        let (x, y) = (node("x"), node("y"));
        let mut wires = vec![];
        for i in 0..5 {
            for (c, n) in [("a", &x), ("b", &y)] {
                let p = n.publish(&ch(c), text(&format!("{c}{i}")));
                // y learns x's events as they happen (a peer stream).
                if Arc::ptr_eq(n, &x) {
                    let ev = x.own_events_after(EventId::from_u64(p.id.as_u64() - 1));
                    let ev = &ev[0];
                    y.apply_remote(
                        &ev.channel,
                        ev.origin.as_ref().unwrap(),
                        ev.id,
                        text(ev.data.as_text()),
                    );
                }
                let _ = p;
            }
        }
        // What a subscriber of y saw, in order, with its ids.
        let (o, _s) = sub_all(&y, &["a", "b"], &Resume::Unknown("x".into()));
        let items = take_all(&o).unwrap();
        for i in &items[..2] {
            assert!(matches!(i, Item::Reset(_)));
        }
        let evs = events(items[2..].to_vec());
        let names: Vec<&str> = evs.iter().map(|e| e.data.as_text()).collect();
        assert_eq!(
            names,
            ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "b3", "a4", "b4"]
        );
        wires.extend(evs.iter().map(|e| e.wire_id()));
        // Resuming from any of those positions replays exactly the rest.
        for (k, w) in wires.iter().enumerate() {
            let (o, _s) = sub_all(&y, &["b", "a"], &Resume::parse(Some(w)));
            let rest: Vec<String> = events(take_all(&o).unwrap())
                .iter()
                .map(|e| e.data.as_text().to_owned())
                .collect();
            assert_eq!(rest, names[k + 1..], "after {w}");
        }
    }
}
