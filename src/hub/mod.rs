//! The transport-free core: channels, history, retained values, fan-out.
//!
//! `hub` does no I/O and never awaits while holding a lock. Transports
//! (`http::sse`, `http::ws`) give each connection an [`Outbox`] and
//! register it on channels; publishers call [`Hub::publish`], which pushes
//! the shared event into each subscriber's outbox without waiting.
//!
//! Locking: the channel map is sharded (`DashMap`); each channel has its own
//! mutex, held while an id is assigned, history is appended and the event
//! is pushed to that channel's subscribers, so a channel's subscribers see
//! its events in id order. There is no global lock on the publish path.
//! Lock order is always map shard, then channel, then outbox.

mod event;
mod id;
mod name;
mod outbox;
mod position;
mod replay;
mod sequencer;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use parking_lot::Mutex;
use slab::Slab;
use tokio::time::Instant;

pub use event::{
    Data, Event, Reset, SharedEvent, compact_json, opcode, sse_frame, ws_server_frame,
    ws_text_frame,
};
pub use id::{EventId, IdGen, InvalidEventId};
pub use name::{ChannelName, ClientId, EventName, InvalidName};
pub use outbox::{Batch, Closed, Item, Outbox, Pushed};
pub use position::{MAX_ORIGINS, Origin, Position, valid_origin};
pub use replay::Replay;
pub use sequencer::{InFlight, Sequencer};

/// Errors from hub operations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A subscriber asked for a client id that is already connected.
    #[error("client id {client} is already connected to channel {channel}")]
    ClientIdTaken {
        /// The channel.
        channel: ChannelName,
        /// The id.
        client: ClientId,
    },
    /// The node keeps `--max-channels` channels already.
    #[error(
        "herald keeps {max} channels, its limit (--max-channels); no new channel can be made now"
    )]
    TooManyChannels {
        /// The limit.
        max: usize,
    },
    /// A targeted publish named a client that is not connected.
    #[error("client {client} is not connected to channel {channel}")]
    NoSuchClient {
        /// The channel.
        channel: ChannelName,
        /// The id.
        client: ClientId,
    },
}

/// True if `a` supersedes `b` as a channel's retained value: a larger id
/// (ids are hybrid clocks, comparable across origins), ties broken by
/// origin name.
fn newer(a: &SharedEvent, b: &SharedEvent) -> bool {
    (a.id, &a.origin) > (b.id, &b.origin)
}

/// Result alias for hub operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Limits of the hub.
#[derive(Debug, Clone)]
pub struct Config {
    /// Events kept per channel for resume.
    pub history_size: usize,
    /// How long an event stays in history.
    pub history_ttl: Duration,
    /// Bytes a connection may have queued before it is cut off as slow.
    pub max_queued_bytes: usize,
    /// Channels kept at most: a subscribe or local publish that would
    /// create one more is refused ([`Error::TooManyChannels`]).
    pub max_channels: usize,
    /// In a cluster: this node's origin name. Events then carry their
    /// origin and subscribers see positions as ids (see [`position`]).
    pub origin: Option<Origin>,
}

/// How far another node's clock may be ahead of this one's: a position
/// entry further ahead than that cannot have been issued yet.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(60);

/// What to publish.
#[derive(Debug, Clone)]
pub struct Publish {
    /// The payload.
    pub data: Data,
    /// The event name (`None` = `message`).
    pub event: Option<EventName>,
    /// The publisher's idempotency key.
    pub key: Option<String>,
    /// Reconnection delay for clients, in milliseconds.
    pub retry: Option<u64>,
    /// Keep as the channel's current value.
    pub retain: bool,
}

/// The outcome of a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The event's id (the first event's, for a duplicate).
    pub id: EventId,
    /// True if the idempotency key had been seen: nothing was delivered.
    pub duplicate: bool,
    /// In a cluster: the id subscribers see (the node's position after the
    /// event), which resumes on any node.
    pub wire: Option<Arc<str>>,
}

impl Published {
    /// The id to tell the publisher: what subscribers see.
    pub fn text(&self) -> String {
        self.wire
            .as_deref()
            .map_or_else(|| self.id.to_string(), str::to_owned)
    }
}

/// Where a subscriber starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// A new subscriber: the retained value (if any), then live events.
    Fresh,
    /// Everything retained after this id, then live events.
    After(EventId),
    /// A cluster position: what is newer per origin, then live.
    Position(Position),
    /// An id the hub cannot read: reset, replay all, then live.
    Unknown(String),
}

impl Resume {
    /// Reads a `Last-Event-ID` value (`None` or empty = fresh).
    pub fn parse(last_event_id: Option<&str>) -> Self {
        match last_event_id.map(str::trim) {
            None | Some("") => Self::Fresh,
            Some(s) if s.contains('=') => {
                Position::parse(s).map_or_else(|| Self::Unknown(s.to_owned()), Self::Position)
            }
            Some(s) => s
                .parse()
                .map_or_else(|_| Self::Unknown(s.to_owned()), Self::After),
        }
    }
}

/// The hub. Share it as `Arc<Hub>`.
#[derive(Debug)]
pub struct Hub {
    channels: DashMap<ChannelName, Arc<Channel>>,
    /// Ids, and (single node) which of them are queued everywhere.
    seq: Arc<Sequencer>,
    config: Config,
    /// The newest id that may have been lost with a freed channel; a channel
    /// created later starts from it, so resume never skips a gap silently.
    freed_watermark: AtomicU64,
    connections: AtomicU64,
    slow_disconnects: AtomicU64,
    published: AtomicU64,
    /// Cluster mode: the node's position, held while an event is applied
    /// (so positions and queue order agree across channels).
    cluster: Mutex<ClusterState>,
    /// Cluster mode: per origin, the newest id lost with freed channels.
    freed: Mutex<Position>,
    /// Cluster mode: this node's own events, as they are applied.
    applied: tokio::sync::broadcast::Sender<SharedEvent>,
}

#[derive(Debug, Default)]
struct ClusterState {
    position: Position,
    /// Events applied so far: the next one's delivery order.
    applied: u64,
    last_seen: HashMap<Origin, Instant>,
}

#[derive(Debug)]
struct Channel {
    name: ChannelName,
    state: Mutex<ChannelState>,
}

#[derive(Debug)]
struct ChannelState {
    history: VecDeque<SharedEvent>,
    /// The history position of `history[0]`: how many events were ever
    /// dropped from its front (replay cursors count in positions).
    front_seq: u64,
    /// The newest event id dropped from history (0 = none): a subscriber
    /// resuming from before it has a gap.
    lost_upto: EventId,
    retained: Option<SharedEvent>,
    subscribers: Slab<Sub>,
    clients: HashMap<ClientId, usize>,
    keys: HashMap<String, EventId>,
    /// Cluster mode: per origin, the newest id dropped from history.
    lost_by_origin: Position,
    removed: bool,
}

#[derive(Debug)]
struct Sub {
    outbox: Arc<Outbox>,
    client: ClientId,
    /// Cluster mode: what this subscriber had seen when it resumed, so
    /// events this node applies later but the client already has are not
    /// sent again.
    skip: Option<Arc<Position>>,
}

impl Sub {
    fn wants(&self, ev: &Event) -> bool {
        unseen(self.skip.as_deref(), ev)
    }
}

/// True unless the client at position `seen` (cluster mode) already had
/// `ev`: the one rule live delivery and replays share.
fn unseen(seen: Option<&Position>, ev: &Event) -> bool {
    match (seen, &ev.origin) {
        (Some(p), Some(o)) => !p.covers(o, ev.id),
        _ => true,
    }
}

impl ChannelState {
    fn is_idle(&self) -> bool {
        self.subscribers.is_empty() && self.history.is_empty() && self.retained.is_none()
    }

    fn evict_front(&mut self) {
        if let Some(ev) = self.history.pop_front() {
            self.front_seq += 1;
            match &ev.origin {
                Some(o) => self.lost_by_origin.advance(o, ev.id),
                None => self.lost_upto = self.lost_upto.max(ev.id),
            }
            if let Some(k) = &ev.key
                && self.keys.get(k) == Some(&ev.id)
            {
                self.keys.remove(k);
            }
        }
    }

    fn expire(&mut self, now: Instant, ttl: Duration) {
        while self
            .history
            .front()
            .is_some_and(|e| now.saturating_duration_since(e.published_at) >= ttl)
        {
            self.evict_front();
        }
        if self.history.is_empty() && self.history.capacity() > 0 {
            self.history = VecDeque::new();
            self.keys = HashMap::new();
        }
    }
}

impl ChannelState {
    /// Every event kept: the retained value (unless history holds it),
    /// then history.
    fn kept(&self) -> impl Iterator<Item = &SharedEvent> {
        let retained = self
            .retained
            .as_ref()
            .filter(|r| !self.history.iter().any(|h| Arc::ptr_eq(h, r)));
        retained.into_iter().chain(self.history.iter())
    }
}

/// A live registration of an outbox on a channel. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    hub: Arc<Hub>,
    channel: Arc<Channel>,
    key: usize,
}

impl Subscription {
    /// The channel subscribed to.
    pub fn channel(&self) -> &ChannelName {
        &self.channel.name
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let idle = {
            let mut st = self.channel.state.lock();
            if let Some(sub) = st.subscribers.try_remove(self.key) {
                if st.clients.get(&sub.client) == Some(&self.key) {
                    st.clients.remove(&sub.client);
                }
                // What it had still to replay goes with it.
                sub.outbox.detach(&self.channel);
            }
            if st.subscribers.is_empty() && st.subscribers.capacity() > 16 {
                st.subscribers.shrink_to_fit();
                st.clients.shrink_to_fit();
            }
            st.is_idle()
        };
        if idle {
            self.hub.maybe_free(&self.channel);
        }
    }
}

/// Counts a connection for `/status` while it lives.
#[derive(Debug)]
pub struct ConnectionGuard(Arc<Hub>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A snapshot for `/status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// Open subscriber connections (SSE and WebSocket).
    pub connections: u64,
    /// Connections closed because they fell too far behind.
    pub slow_consumers_disconnected: u64,
    /// Events accepted since start.
    pub events_published: u64,
    /// Channels kept.
    pub channel_count: usize,
    /// Channels that match the query's prefix.
    pub channels_matching: usize,
    /// The matching channels with the most subscribers (then by name), at
    /// most the query's limit: the answer stays small however many
    /// channels clients made.
    pub channels: BTreeMap<String, ChannelStatus>,
}

/// Which channels [`Hub::status`] lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusQuery {
    /// Only channels whose name starts with this.
    pub prefix: String,
    /// At most this many.
    pub limit: usize,
}

impl Default for StatusQuery {
    fn default() -> Self {
        Self {
            prefix: String::new(),
            limit: 100,
        }
    }
}

/// One channel in [`Status`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChannelStatus {
    /// Subscribers connected.
    pub subscribers: usize,
    /// Events in history.
    pub history: usize,
    /// Whether a retained value is kept.
    pub retained: bool,
}

impl Hub {
    /// A hub with these limits.
    pub fn new(config: Config) -> Arc<Self> {
        Self::with_ids(config, IdGen::new())
    }

    /// A hub with a given id generator (for tests).
    pub fn with_ids(config: Config, ids: IdGen) -> Arc<Self> {
        Arc::new(Self {
            channels: DashMap::new(),
            seq: Arc::new(Sequencer::new(ids)),
            config,
            freed_watermark: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            slow_disconnects: AtomicU64::new(0),
            published: AtomicU64::new(0),
            cluster: Mutex::new(ClusterState::default()),
            freed: Mutex::new(Position::new()),
            applied: tokio::sync::broadcast::channel(4096).0,
        })
    }

    /// The hub's limits.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// A new outbox with the configured limit.
    pub fn outbox(&self) -> Arc<Outbox> {
        // A cluster node applies one event at a time (its apply lock), so
        // queues are in order without the sequencer.
        let seq = self.config.origin.is_none().then(|| self.seq.clone());
        Outbox::sequenced(self.config.max_queued_bytes, seq)
    }

    /// Counts a connection until the guard is dropped.
    pub fn connection(self: &Arc<Self>) -> ConnectionGuard {
        self.connections.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard(self.clone())
    }

    /// Refuses a channel that does not exist yet when the node already
    /// keeps `max_channels` (clients must not make the map grow without
    /// bound). Checked before a subscribe or a local publish; events from
    /// other nodes and Kubernetes sources are not limited (they were
    /// accepted already, or are the node's own).
    pub fn admit(&self, channel: &ChannelName) -> Result<()> {
        let max = self.config.max_channels;
        // An existing channel (the usual publish) costs one shard lookup;
        // only a new one counts the map.
        if !self.channels.contains_key(channel) && self.channels.len() >= max {
            return Err(Error::TooManyChannels { max });
        }
        Ok(())
    }

    /// Runs `f` on the channel's locked state, creating the channel if
    /// needed and retrying if it was freed meanwhile.
    fn with_channel<R>(
        &self,
        name: &ChannelName,
        f: impl FnOnce(&Arc<Channel>, &mut ChannelState) -> R,
    ) -> (R, Arc<Channel>, bool) {
        loop {
            let existing = self.channels.get(name).map(|c| c.value().clone());
            let ch = existing.unwrap_or_else(|| {
                self.channels
                    .entry(name.clone())
                    .or_insert_with(|| {
                        Arc::new(Channel {
                            name: name.clone(),
                            state: Mutex::new(ChannelState {
                                history: VecDeque::new(),
                                front_seq: 0,
                                lost_upto: EventId::from_u64(
                                    self.freed_watermark.load(Ordering::Acquire),
                                ),
                                retained: None,
                                subscribers: Slab::new(),
                                clients: HashMap::new(),
                                keys: HashMap::new(),
                                lost_by_origin: if self.config.origin.is_some() {
                                    self.freed.lock().clone()
                                } else {
                                    Position::new()
                                },
                                removed: false,
                            }),
                        })
                    })
                    .clone()
            });
            let mut st = ch.state.lock();
            if st.removed {
                continue;
            }
            let r = f(&ch, &mut st);
            let idle = st.is_idle();
            drop(st);
            return (r, ch, idle);
        }
    }

    /// Removes the channel from the map if it is still idle.
    fn maybe_free(&self, ch: &Arc<Channel>) {
        self.channels.remove_if(&ch.name, |_, cur| {
            if !Arc::ptr_eq(cur, ch) {
                return false;
            }
            let mut st = cur.state.lock();
            if !st.is_idle() {
                return false;
            }
            st.removed = true;
            self.freed_watermark
                .fetch_max(st.lost_upto.as_u64(), Ordering::AcqRel);
            if !st.lost_by_origin.is_empty() {
                let mut freed = self.freed.lock();
                for (o, id) in st.lost_by_origin.iter() {
                    freed.advance(o, id);
                }
            }
            true
        });
    }

    /// Publishes to one channel: assigns an id, keeps it in history (and as
    /// the retained value if asked), and queues it for every subscriber.
    pub fn publish(&self, channel: &ChannelName, p: Publish) -> Published {
        if let Some(origin) = &self.config.origin {
            let origin = origin.clone();
            return self.apply_cluster(channel, origin, None, p, true);
        }
        let key = p.key.clone();
        let retain = p.retain;
        self.insert(channel, key, retain, || self.event(channel, p))
    }

    /// Applies an event another node accepted (cluster mode), unless this
    /// node has applied it already. Events of one origin must be applied
    /// in id order. Returns false for one already applied.
    pub fn apply_remote(
        &self,
        channel: &ChannelName,
        origin: &Origin,
        id: EventId,
        p: Publish,
    ) -> bool {
        if self.config.origin.is_none() {
            return false;
        }
        // Already applied (at or below the position) comes back a duplicate.
        !self
            .apply_cluster(channel, origin.clone(), Some(id), p, false)
            .duplicate
    }

    /// Cluster mode: assigns the position under the node's apply lock,
    /// then inserts as a single node does.
    fn apply_cluster(
        &self,
        channel: &ChannelName,
        origin: Origin,
        id: Option<EventId>,
        p: Publish,
        local: bool,
    ) -> Published {
        let mut cs = self.cluster.lock();
        let id = match id {
            Some(id) if cs.position.covers(&origin, id) => {
                return Published {
                    id,
                    duplicate: true,
                    wire: None,
                };
            }
            Some(id) => id,
            None => self.seq.next(),
        };
        cs.applied += 1;
        let order = cs.applied;
        // A remote event moves the position even when its key makes it a
        // duplicate here (it is in its origin's stream either way). A local
        // publish moves it only if it is not a duplicate: otherwise this
        // node's position would name an event that exists nowhere, and no
        // peer could ever catch up to it.
        let (wire, next) = if local {
            let mut next = cs.position.clone();
            next.advance(&origin, id);
            (Arc::<str>::from(next.to_string()), Some(next))
        } else {
            cs.position.advance(&origin, id);
            (Arc::<str>::from(cs.position.to_string()), None)
        };
        cs.last_seen.insert(origin.clone(), Instant::now());
        let key = p.key.clone();
        let retain = p.retain;
        let mut made = None;
        let published = self.insert(channel, key, retain, || {
            let mut ev = Event::new(id, channel.clone(), p.event, p.data, p.retry, p.key);
            ev.origin = Some(origin);
            ev.wire_id = Some(wire);
            ev.retain = retain;
            ev.order = order;
            let ev = Arc::new(ev);
            made = Some(ev.clone());
            ev
        });
        if let Some(next) = next
            && !published.duplicate
        {
            cs.position = next;
        }
        if local && let Some(ev) = made {
            // Nobody listening (no peers yet) is fine.
            let _ = self.applied.send(ev);
        }
        drop(cs);
        published
    }

    /// Cluster mode: this node's own events, as they are applied.
    pub fn applied(&self) -> tokio::sync::broadcast::Receiver<SharedEvent> {
        self.applied.subscribe()
    }

    /// Cluster mode: the node's position now.
    pub fn position(&self) -> Position {
        self.cluster.lock().position.clone()
    }

    /// Cluster mode: makes sure this node's own ids stay above `id` (an
    /// event of its own it learnt back from a peer after a restart).
    pub fn observe_own(&self, id: EventId) {
        self.seq.ids().observe(id);
    }

    /// Every event kept (history and retained values), sorted by origin
    /// and id: what a starting node backfills from a peer.
    pub fn snapshot(&self) -> Vec<SharedEvent> {
        let mut out = self.kept_where(|e| e.origin.is_some());
        out.sort_by(|a, b| (&a.origin, a.id).cmp(&(&b.origin, b.id)));
        out
    }

    /// This node's own events after `after`, in id order, from what is kept.
    pub fn own_events_after(&self, after: EventId) -> Vec<SharedEvent> {
        let Some(me) = &self.config.origin else {
            return vec![];
        };
        let mut out = self.kept_where(|e| e.id > after && e.origin.as_ref() == Some(me));
        out.sort_by_key(|e| e.id);
        out
    }

    /// The kept events of every channel that `keep` accepts.
    fn kept_where(&self, keep: impl Fn(&SharedEvent) -> bool) -> Vec<SharedEvent> {
        let mut out = vec![];
        for e in &self.channels {
            let st = e.value().state.lock();
            out.extend(st.kept().filter(|e| keep(e)).cloned());
        }
        out
    }

    /// Inserts an event made (under the channel's lock) by `make`: history,
    /// retained value, idempotency key, fan-out.
    fn insert(
        &self,
        channel: &ChannelName,
        key: Option<String>,
        retain: bool,
        make: impl FnOnce() -> SharedEvent,
    ) -> Published {
        let now = Instant::now();
        let (published, ch, idle) = self.with_channel(channel, |_, st| {
            if let Some(id) = key.as_ref().and_then(|k| st.keys.get(k)) {
                return Published {
                    id: *id,
                    duplicate: true,
                    wire: None,
                };
            }
            st.expire(now, self.config.history_ttl);
            // Single node: held until the event is queued everywhere, so
            // writers of several channels wait for it (see `sequencer`).
            let _in_flight = self.in_flight();
            let ev = make();
            let id = ev.id;
            let wire = ev.wire_id.clone();
            self.fan_out(
                st.subscribers
                    .iter()
                    .filter(|(_, s)| s.wants(&ev))
                    .map(|(_, s)| &s.outbox),
                &ev,
            );
            // The newest value wins, by id (then origin), whatever order
            // a cluster node learns them in: every node converges.
            if retain && st.retained.as_ref().is_none_or(|r| newer(&ev, r)) {
                st.retained = Some(ev.clone());
            }
            if self.config.history_size == 0 {
                match &ev.origin {
                    Some(o) => st.lost_by_origin.advance(o, id),
                    None => st.lost_upto = id,
                }
            } else {
                if let Some(k) = &ev.key {
                    st.keys.insert(k.clone(), id);
                }
                st.history.push_back(ev);
                while st.history.len() > self.config.history_size {
                    st.evict_front();
                }
            }
            Published {
                id,
                duplicate: false,
                wire,
            }
        });
        if !published.duplicate {
            self.published.fetch_add(1, Ordering::Relaxed);
        }
        if idle {
            self.maybe_free(&ch);
        }
        published
    }

    /// Single node: a reservation to hold from before an event takes its id
    /// until it is queued for every subscriber (`None` in a cluster).
    fn in_flight(&self) -> Option<InFlight<'_>> {
        self.config.origin.is_none().then(|| self.seq.enter())
    }

    /// Makes the event for a publish, with the next id. Call it under the
    /// channel's lock so ids and queue order agree.
    fn event(&self, channel: &ChannelName, p: Publish) -> SharedEvent {
        Arc::new(Event::new(
            self.seq.next(),
            channel.clone(),
            p.event,
            p.data,
            p.retry,
            p.key,
        ))
    }

    fn fan_out<'a>(&self, outboxes: impl Iterator<Item = &'a Arc<Outbox>>, ev: &SharedEvent) {
        let cost = ev.cost();
        let mut slow = 0;
        for outbox in outboxes {
            if outbox.push(Item::Event(ev.clone()), cost) == Pushed::Overflowed {
                slow += 1;
            }
        }
        if slow > 0 {
            self.slow_disconnects.fetch_add(slow, Ordering::Relaxed);
        }
    }

    /// The channels that have subscribers, in name order.
    pub fn channels_with_subscribers(&self) -> Vec<ChannelName> {
        let mut names: Vec<ChannelName> = self
            .channels
            .iter()
            .filter(|e| !e.value().state.lock().subscribers.is_empty())
            .map(|e| e.key().clone())
            .collect();
        names.sort();
        names
    }

    /// Publishes to every channel that has subscribers; one event (and id)
    /// per channel. Returns the channels and ids, in name order.
    pub fn publish_all(&self, p: &Publish) -> Vec<(ChannelName, Published)> {
        self.channels_with_subscribers()
            .into_iter()
            .map(|name| {
                let published = self.publish(&name, p.clone());
                (name, published)
            })
            .collect()
    }

    /// Publishes to one connected client of a channel only. The event gets
    /// an id but is neither kept in history nor retained.
    pub fn publish_to_client(
        &self,
        channel: &ChannelName,
        client: &ClientId,
        p: Publish,
    ) -> Result<Published> {
        let not_found = || Error::NoSuchClient {
            channel: channel.clone(),
            client: client.clone(),
        };
        let ch = self
            .channels
            .get(channel)
            .map(|c| c.value().clone())
            .ok_or_else(not_found)?;
        // Lock order in a cluster: the node's apply lock, then the channel.
        let cluster = self.config.origin.is_some().then(|| self.cluster.lock());
        let st = ch.state.lock();
        let sub = st
            .clients
            .get(client)
            .and_then(|k| st.subscribers.get(*k))
            .ok_or_else(not_found)?;
        let _in_flight = self.in_flight();
        let mut ev = self.event(channel, Publish { key: None, ..p });
        if let Some(cs) = &cluster {
            // Not part of any origin's stream: its id is the node's current
            // position, so a client that resumes from it misses nothing.
            if let Some(e) = Arc::get_mut(&mut ev) {
                e.wire_id = Some(Arc::from(cs.position.to_string()));
                // After every event applied so far, like the position.
                e.order = cs.applied;
            }
        }
        self.fan_out(std::iter::once(&sub.outbox), &ev);
        self.published.fetch_add(1, Ordering::Relaxed);
        Ok(Published {
            id: ev.id,
            duplicate: false,
            wire: ev.wire_id.clone(),
        })
    }

    /// Registers `outbox` on `channel` as `client`, queueing first what
    /// `from` asks for. Registration and replay happen under the channel
    /// lock, so no event falls between replay and live delivery.
    pub fn subscribe(
        self: &Arc<Self>,
        channel: &ChannelName,
        client: &ClientId,
        outbox: &Arc<Outbox>,
        from: &Resume,
    ) -> Result<Subscription> {
        self.admit(channel)?;
        let vetted = self.vet(from);
        let from: &Resume = &vetted;
        let now = Instant::now();
        let (key, ch, _) = self.with_channel(channel, |ch, st| {
            if st.clients.contains_key(client) {
                return Err(Error::ClientIdTaken {
                    channel: channel.clone(),
                    client: client.clone(),
                });
            }
            st.expire(now, self.config.history_ttl);
            let skip = match from {
                Resume::Position(p) if self.config.origin.is_some() => Some(Arc::new(p.clone())),
                _ => None,
            };
            let replay = self.replay(ch, st, from, skip.clone());
            if !replay.is_done() && outbox.push_replay(replay) == Pushed::Overflowed {
                self.slow_disconnects.fetch_add(1, Ordering::Relaxed);
            }
            outbox.attach();
            let key = st.subscribers.insert(Sub {
                outbox: outbox.clone(),
                client: client.clone(),
                skip,
            });
            st.clients.insert(client.clone(), key);
            Ok(key)
        });
        let key = key?;
        Ok(Subscription {
            hub: self.clone(),
            channel: ch,
            key,
        })
    }

    /// A cluster position no node can have reached yet is unknown: it
    /// gets a reset and everything kept, as a future id does on a single
    /// node, instead of hiding every live event behind it (a position is
    /// also what live delivery skips). An entry is from the future if it is
    /// above this node's own last id for its own origin, or more than
    /// [`MAX_CLOCK_SKEW`] ahead of this node's clock for another.
    fn vet<'a>(&self, from: &'a Resume) -> std::borrow::Cow<'a, Resume> {
        use std::borrow::Cow;
        let (Resume::Position(p), Some(me)) = (from, &self.config.origin) else {
            return Cow::Borrowed(from);
        };
        let ids = self.seq.ids();
        let future = p.iter().any(|(o, id)| {
            if o == me {
                id > ids.last()
            } else {
                ids.from_the_future(id, MAX_CLOCK_SKEW)
            }
        });
        if future {
            Cow::Owned(Resume::Unknown(p.to_string()))
        } else {
            Cow::Borrowed(from)
        }
    }

    /// The cursor over what a subscriber starting at `from` must be sent
    /// before live events. Call it under the channel's lock.
    fn replay(
        &self,
        ch: &Arc<Channel>,
        st: &ChannelState,
        from: &Resume,
        skip: Option<Arc<Position>>,
    ) -> Replay {
        let end = st.front_seq + st.history.len() as u64;
        let reset = |reason: &str| {
            Some(Arc::new(Reset {
                channel: ch.name.clone(),
                reason: reason.to_owned(),
            }))
        };
        // The retained value, when history does not hold it.
        let retained_alone = || {
            st.retained
                .clone()
                .filter(|r| !st.history.iter().any(|h| Arc::ptr_eq(h, r)))
        };
        // A reset, then everything kept (the retained value only if the
        // client may not have had it: newer than `seen`).
        let everything = |seen: Option<EventId>, reason: &str| {
            let retained = retained_alone().filter(|r| seen.is_none_or(|s| r.id > s));
            Replay::new(ch.clone(), reset(reason), retained, st.front_seq, end, None)
        };
        match from {
            Resume::Fresh => Replay::new(ch.clone(), None, st.retained.clone(), end, end, None),
            Resume::After(_) if self.config.origin.is_some() => {
                everything(None, "the event id is not a cluster position")
            }
            Resume::After(after)
                if *after < self.seq.ids().boot() || *after > self.seq.ids().last() =>
            {
                everything(None, "the event id is unknown to this hub")
            }
            Resume::After(after) if st.lost_upto > *after => {
                everything(Some(*after), "events after this id are no longer retained")
            }
            Resume::After(after) => {
                let start = st.history.partition_point(|e| e.id <= *after) as u64;
                Replay::new(ch.clone(), None, None, st.front_seq + start, end, None)
            }
            Resume::Position(p) if self.config.origin.is_some() => {
                let gap = st.lost_by_origin.iter().any(|(o, lost)| lost > p.get(o));
                let reason = "events after this id are no longer retained";
                let retained = retained_alone().filter(|r| unseen(Some(p), r));
                let reset = if gap { reset(reason) } else { None };
                Replay::new(ch.clone(), reset, retained, st.front_seq, end, skip)
            }
            Resume::Position(_) | Resume::Unknown(_) => {
                everything(None, "the event id is not one herald issued")
            }
        }
    }

    /// Expires old history and frees idle channels. Run it periodically.
    /// Returns how many channels remain.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let ttl = self.config.history_ttl;
        if let Some(me) = &self.config.origin {
            // Origins silent for longer than history lasts have nothing
            // left to resume: drop them from positions (ids stay short as
            // pods come and go).
            let mut cs = self.cluster.lock();
            let stale: Vec<Origin> = cs
                .last_seen
                .iter()
                .filter(|(o, t)| *o != me && now.saturating_duration_since(**t) > 2 * ttl)
                .map(|(o, _)| o.clone())
                .collect();
            for o in stale {
                cs.last_seen.remove(&o);
                cs.position.remove(&o);
                self.freed.lock().remove(&o);
            }
        }
        let idle: Vec<Arc<Channel>> = self
            .channels
            .iter()
            .filter_map(|e| {
                let mut st = e.value().state.lock();
                st.expire(now, ttl);
                st.is_idle().then(|| e.value().clone())
            })
            .collect();
        for ch in &idle {
            self.maybe_free(ch);
        }
        let len = self.channels.len();
        if self.channels.capacity() > 4 * len + 1024 {
            self.channels.shrink_to_fit();
        }
        len
    }

    /// How many channels exist.
    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    /// Open connections.
    pub fn connection_count(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// A snapshot of the hub for `/status`: counts, and the `q.limit`
    /// matching channels with the most subscribers. Memory is bounded by
    /// the limit, not by the number of channels.
    pub fn status(&self, q: &StatusQuery) -> Status {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        // A min-heap of the best `limit` so far: (subscribers, name
        // reversed so that, among equals, the later name goes first).
        /// Subscribers, name (reversed: among equals the earlier name
        /// ranks higher), history length, retained.
        type Ranked = (usize, Reverse<ChannelName>, usize, bool);
        let mut top: BinaryHeap<Reverse<Ranked>> =
            BinaryHeap::with_capacity(q.limit.saturating_add(1).min(1024));
        let mut matching = 0;
        for e in &self.channels {
            if !e.key().as_str().starts_with(&q.prefix) {
                continue;
            }
            matching += 1;
            if q.limit == 0 {
                continue;
            }
            let st = e.value().state.lock();
            let entry = (
                st.subscribers.len(),
                Reverse(e.key().clone()),
                st.history.len(),
                st.retained.is_some(),
            );
            drop(st);
            if top.len() < q.limit {
                top.push(Reverse(entry));
            } else if top
                .peek()
                .is_some_and(|Reverse(min)| (entry.0, &entry.1) > (min.0, &min.1))
            {
                top.pop();
                top.push(Reverse(entry));
            }
        }
        let channels = top
            .into_iter()
            .map(|Reverse((subscribers, Reverse(name), history, retained))| {
                (
                    name.to_string(),
                    ChannelStatus {
                        subscribers,
                        history,
                        retained,
                    },
                )
            })
            .collect();
        Status {
            connections: self.connections.load(Ordering::Relaxed),
            slow_consumers_disconnected: self.slow_disconnects.load(Ordering::Relaxed),
            events_published: self.published.load(Ordering::Relaxed),
            channel_count: self.channels.len(),
            channels_matching: matching,
            channels,
        }
    }
}

#[cfg(test)]
mod tests;
