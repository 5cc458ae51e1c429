//! Backplanes: Redis or NATS carry a cluster's events, for clusters that
//! outgrow the peer mesh.
//!
//! The design is the mesh's, with the backend in the middle: every node
//! writes its own events (its origin's stream) to the backend, in id order,
//! and reads every other origin's stream from its position (see
//! [`crate::hub::Position`]). The hub's backplane contract is all it uses
//! (ARCHITECTURE.md, "The backplane contract"). So:
//!
//! - the backend keeps history and retained values: a node that starts,
//!   or restarts, loads them (a snapshot) before `/readyz` turns 200;
//! - each node reads the backend once per origin, never per channel or
//!   per client, and writes in pipelined batches;
//! - local delivery never waits for the backend: an event is applied (and
//!   delivered here) first, then written; the publisher's 202 waits for
//!   the backend's acknowledgement, so a 202 means "stored in the
//!   backend", and a node that dies after a 202 loses nothing;
//! - while the backend is unreachable, publishes are refused with 503
//!   (nothing is applied), the node keeps its subscribers, reconnects with
//!   backoff, rewrites whatever the backend lacks of its own events (from
//!   its history), and reads what it missed from the stored streams.
//!
//! [`Store`] is what a backend has to do; [`Redis`] and [`Nats`] do it.
//! The rest (reconnecting, batching, confirmations, the snapshot, status)
//! is here, once.

mod nats;
mod redis;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::Line;

/// The Redis and NATS record decoders, for the fuzz target (`fuzz/`).
#[doc(hidden)]
pub mod fuzz {
    /// A record as Redis or NATS hands it over: never a panic; a line is
    /// decoded the same way by both; a stream entry id that parses prints
    /// back to one that parses to the same event id.
    pub fn record(data: &[u8]) {
        let r = super::redis::fuzz_line(data);
        let n = super::nats::fuzz_line(data);
        assert_eq!(r, n, "Redis and NATS read the same line differently");
        if let Ok(s) = std::str::from_utf8(data) {
            super::redis::fuzz_entry_id(s);
        }
    }
}
use crate::config::Secret;
use crate::hub::{EventId, Hub, Position, SharedEvent};

pub use self::nats::Nats;
pub use self::redis::Redis;

/// Most events written in one pipelined batch.
const MAX_BATCH: usize = 512;

/// The backend is history and transport at once: however short
/// `--history-ttl`, it keeps an event this long, so a reader that falls a
/// few seconds behind (a busy node) still finds it.
pub const MIN_RETENTION: Duration = Duration::from_secs(30);

impl Options {
    /// How long the backend keeps an event.
    pub fn retention(&self) -> Duration {
        self.history_ttl.max(MIN_RETENTION)
    }
}

/// How long a reader waits on the backend before it looks again.
const READ_BLOCK: Duration = Duration::from_secs(1);

/// Why the backend could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The backend is unreachable or failed a request.
    #[error("{0}")]
    Backend(String),
    /// The backend answered something herald did not write.
    #[error("unexpected data in the backend: {0}")]
    Data(String),
}

impl Error {
    fn backend(e: impl std::fmt::Display) -> Self {
        Self::Backend(e.to_string())
    }
}

/// Why a publish was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The backend is unreachable: nothing was published.
    #[error("the {kind} backplane is unavailable ({why}); nothing was published, retry later")]
    Unavailable {
        /// `redis` or `nats`.
        kind: &'static str,
        /// The last error.
        why: String,
    },
    /// The event was delivered on this node but the backend did not confirm
    /// it in time; it is written when the backend is back, unless this node
    /// stops first.
    #[error(
        "the {kind} backplane did not confirm the event ({why}); it was delivered on this node and will be forwarded when {kind} is back; to be sure, retry with the same idempotency id"
    )]
    Unconfirmed {
        /// `redis` or `nats`.
        kind: &'static str,
        /// The last error, or the timeout.
        why: String,
    },
}

/// Which backend, and how to reach it.
#[derive(Debug, Clone)]
pub struct Options {
    /// The backend's URL (it may hold a password: kept as a secret).
    pub url: Secret,
    /// Key (Redis) or subject and stream (NATS) prefix, so several herald
    /// clusters can share one backend.
    pub prefix: String,
    /// Timeout of one backend request, and of a publish's confirmation.
    pub timeout: Duration,
    /// How long history lasts (the backend keeps events at least
    /// [`MIN_RETENTION`] beyond their publication whatever it is).
    pub history_ttl: Duration,
    /// A PEM CA for the backend's TLS certificate (default: system roots).
    pub ca: Option<std::path::PathBuf>,
}

/// One connection to a backend, as a writer or a reader uses it.
pub trait Store: Sized + Send + 'static {
    /// `redis` or `nats`.
    const KIND: &'static str;
    /// What a reader remembers across reconnections.
    type Cursor: Default + Send + 'static;

    /// Connects, and creates what the backend needs (streams, keys).
    fn connect(options: &Options, me: &str) -> impl Future<Output = Result<Self, Error>> + Send;

    /// The newest of this node's own events the backend holds (0: none).
    fn last_own(&mut self) -> impl Future<Output = Result<EventId, Error>> + Send;

    /// Writes this node's own events, in id order, as one pipelined batch;
    /// returns once the backend has acknowledged all of them.
    fn write(&mut self, events: &[SharedEvent]) -> impl Future<Output = Result<(), Error>> + Send;

    /// Checks the connection while there is nothing to write.
    fn ping(&mut self) -> impl Future<Output = Result<(), Error>> + Send;

    /// Every stored event and retained value of every origin, in any
    /// order, and the cursor where reading goes on after them.
    fn snapshot(
        &mut self,
        cursor: &mut Self::Cursor,
    ) -> impl Future<Output = Result<Vec<Line>, Error>> + Send;

    /// Answers other nodes' questions with `answer` until the connection
    /// fails.
    fn serve_asks(
        &mut self,
        answer: &(dyn Fn(&[u8]) -> Vec<u8> + Sync),
    ) -> impl Future<Output = Error> + Send;

    /// Asks every node (this one too); the answers that come within
    /// `window`, or fewer as soon as one satisfies `enough`.
    fn ask(
        &mut self,
        question: &[u8],
        window: Duration,
        enough: &(dyn Fn(&[u8]) -> bool + Sync),
    ) -> impl Future<Output = Result<Vec<Vec<u8>>, Error>> + Send;

    /// Waits up to about [`READ_BLOCK`] for events of other origins after
    /// `position` (and the cursor); each origin's in id order. May return
    /// none.
    fn read(
        &mut self,
        position: &Position,
        cursor: &mut Self::Cursor,
    ) -> impl Future<Output = Result<Vec<Line>, Error>> + Send;
}

/// What the writer says: the newest own id the backend confirmed, and
/// whether it is connected (false: publishes are refused).
#[derive(Debug, Clone, Copy, Default)]
struct Written {
    confirmed: u64,
    up: bool,
}

/// The state `/status` shows.
#[derive(Debug, Default)]
struct Health {
    writer: &'static str,
    reader: &'static str,
    error: Option<String>,
    reconnects: u64,
}

/// A running backplane node.
pub struct Backplane {
    kind: &'static str,
    url: String,
    name: Arc<str>,
    hub: Arc<Hub>,
    timeout: Duration,
    written: tokio::sync::watch::Sender<Written>,
    health: Mutex<Health>,
    /// The first snapshot has been loaded.
    loaded: AtomicBool,
    /// The writer has connected at least once.
    writer_joined: AtomicBool,
    applied: AtomicU64,
    written_count: AtomicU64,
    batches: AtomicU64,
    asker: Asker,
}

/// Sends a question to every node over a fresh connection of the backend.
type Asker = Box<
    dyn Fn(Vec<u8>, bool) -> futures_util::future::BoxFuture<'static, Result<Vec<Vec<u8>>, Error>>
        + Send
        + Sync,
>;

/// What one node asks the others (`POST /channel`, targeted publishes).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum Question {
    /// The channels with subscribers there.
    Channels,
    /// Deliver this targeted publish if the client is there.
    Client(serde_json::Value),
}

/// A node's answer.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Answer {
    #[serde(default)]
    channels: Vec<String>,
    #[serde(default)]
    delivered: bool,
}

/// How long an asking node collects answers.
const ASK_WINDOW: Duration = Duration::from_millis(300);

/// This node's answer to a question.
fn answer(hub: &Hub, question: &[u8]) -> Vec<u8> {
    let a = match serde_json::from_slice::<Question>(question) {
        Ok(Question::Channels) => Answer {
            channels: crate::cluster::with_local_channels(hub, vec![]),
            delivered: false,
        },
        Ok(Question::Client(body)) => Answer {
            channels: vec![],
            delivered: serde_json::to_vec(&body)
                .is_ok_and(|b| crate::cluster::deliver_to_client(hub, &b).is_ok()),
        },
        Err(e) => {
            tracing::warn!(error = %e, "ignoring a question herald did not ask");
            Answer::default()
        }
    };
    serde_json::to_vec(&a).unwrap_or_default()
}

impl std::fmt::Debug for Backplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backplane")
            .field("kind", &self.kind)
            .field("url", &self.url)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Backplane {
    /// Starts the writer and the reader of backend `S` on `tasks`.
    pub fn start<S: Store>(
        name: &str,
        hub: &Arc<Hub>,
        options: &Options,
        tasks: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> Arc<Self> {
        // TLS to the backend uses rustls with ring, like the rest of herald.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let bp = Arc::new(Self {
            kind: S::KIND,
            url: redact(options.url.expose()),
            name: Arc::from(name),
            hub: hub.clone(),
            timeout: options.timeout,
            written: tokio::sync::watch::Sender::new(Written::default()),
            health: Mutex::new(Health {
                writer: "connecting",
                reader: "connecting",
                ..Health::default()
            }),
            loaded: AtomicBool::new(false),
            writer_joined: AtomicBool::new(false),
            applied: AtomicU64::new(0),
            written_count: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            asker: {
                let (options, me) = (options.clone(), name.to_owned());
                Box::new(move |question, first| {
                    let (options, me) = (options.clone(), me.clone());
                    Box::pin(async move {
                        let window = ASK_WINDOW.min(options.timeout);
                        let mut store = S::connect(&options, &me).await?;
                        let enough = |a: &[u8]| {
                            first && serde_json::from_slice::<Answer>(a).is_ok_and(|a| a.delivered)
                        };
                        store.ask(&question, window, &enough).await
                    })
                })
            },
        });
        tasks.spawn(
            bp.clone()
                .write_loop::<S>(options.clone(), shutdown.clone()),
        );
        tasks.spawn(bp.clone().read_loop::<S>(options.clone(), shutdown.clone()));
        tasks.spawn(
            bp.clone()
                .answer_loop::<S>(options.clone(), shutdown.clone()),
        );
        bp
    }

    /// Asks every node; their answers.
    async fn ask(&self, q: &Question, first_delivery: bool) -> Result<Vec<Answer>, Refused> {
        let unavailable = |e: Error| Refused::Unavailable {
            kind: self.kind,
            why: format!("{}: {e}", self.kind),
        };
        let question =
            serde_json::to_vec(q).map_err(|e| unavailable(Error::Data(e.to_string())))?;
        let answers = self
            .call((self.asker)(question, first_delivery))
            .await
            .map_err(unavailable)?;
        Ok(answers
            .iter()
            .filter_map(|a| serde_json::from_slice(a).ok())
            .collect())
    }

    /// Channels with subscribers on any node (for `POST /channel`).
    pub async fn channels_with_subscribers(&self) -> Result<Vec<String>, Refused> {
        let answers = self.ask(&Question::Channels, false).await?;
        let remote = answers.into_iter().flat_map(|a| a.channels).collect();
        Ok(crate::cluster::with_local_channels(&self.hub, remote))
    }

    /// Offers a targeted publish to every node; true if one delivered it.
    pub async fn publish_to_client(&self, body: serde_json::Value) -> Result<bool, Refused> {
        Ok(self
            .ask(&Question::Client(body), true)
            .await?
            .iter()
            .any(|a| a.delivered))
    }

    /// Answers other nodes' questions, reconnecting with backoff.
    async fn answer_loop<S: Store>(self: Arc<Self>, options: Options, stop: CancellationToken) {
        let hub = self.hub.clone();
        let answer = move |q: &[u8]| answer(&hub, q);
        let mut failures = 0u32;
        while let Some(mut store) = self
            .connect::<S>(&options, &mut failures, &stop, Role::Listener)
            .await
        {
            failures = 0;
            let e = tokio::select! {
                () = stop.cancelled() => return,
                e = store.serve_asks(&answer) => e,
            };
            self.failed(Role::Listener, &mut failures, &e.to_string());
        }
    }

    /// The backend's URL, without its password.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// True once the first snapshot has been loaded and the writer has
    /// connected (it can then serve and accept publishes). A later outage
    /// does not make it false (see [`Backplane::up`]).
    pub fn ready(&self) -> bool {
        self.loaded.load(Ordering::Acquire) && self.writer_joined.load(Ordering::Acquire)
    }

    /// True while the writer is connected (publishes are accepted).
    pub fn up(&self) -> bool {
        self.written.borrow().up
    }

    /// Refuses a publish up front while the backend is unreachable.
    pub fn admit(&self) -> Result<(), Refused> {
        if self.up() {
            Ok(())
        } else {
            Err(Refused::Unavailable {
                kind: self.kind,
                why: self.last_error(),
            })
        }
    }

    /// Waits until the backend has acknowledged this node's event `id`.
    pub async fn confirm(&self, id: EventId) -> Result<(), Refused> {
        let mut rx = self.written.subscribe();
        let wait = rx.wait_for(|w| w.confirmed >= id.as_u64() || !w.up);
        let why = match tokio::time::timeout(self.timeout, wait).await {
            Ok(Ok(w)) if w.confirmed >= id.as_u64() => return Ok(()),
            Ok(_) => self.last_error(),
            Err(_) => format!("no confirmation within {:?}", self.timeout),
        };
        Err(Refused::Unconfirmed {
            kind: self.kind,
            why,
        })
    }

    fn last_error(&self) -> String {
        self.health
            .lock()
            .error
            .clone()
            .unwrap_or_else(|| "not connected yet".to_owned())
    }

    /// The cluster as `/status` shows it.
    pub fn status(&self) -> serde_json::Value {
        let h = self.health.lock();
        let w = *self.written.borrow();
        serde_json::json!({
            "mode": self.kind,
            "self": &*self.name,
            "ready": self.ready(),
            "position": self.hub.position().to_string(),
            "backplane": {
                "url": self.url,
                "writer": h.writer,
                "reader": h.reader,
                "publishing": if w.up { "accepted" } else { "refused" },
                "confirmed": EventId::from_u64(w.confirmed).to_string(),
                "written": self.written_count.load(Ordering::Relaxed),
                "write_batches": self.batches.load(Ordering::Relaxed),
                "applied": self.applied.load(Ordering::Relaxed),
                "reconnects": h.reconnects,
                "last_error": h.error,
            },
        })
    }

    fn set(
        &self,
        writer: Option<&'static str>,
        reader: Option<&'static str>,
        error: Option<String>,
    ) {
        let mut h = self.health.lock();
        if let Some(w) = writer {
            h.writer = w;
        }
        if let Some(r) = reader {
            h.reader = r;
        }
        if let Some(e) = error {
            h.reconnects += 1;
            h.error = Some(e);
        }
    }

    fn set_up(&self, up: bool) {
        self.written.send_modify(|w| w.up = up);
    }

    /// Raises the confirmed id, waking waiting publishes only if it moved.
    fn confirmed(&self, id: EventId) {
        self.written.send_if_modified(|w| {
            let moved = id.as_u64() > w.confirmed;
            w.confirmed = w.confirmed.max(id.as_u64());
            moved
        });
    }

    /// Connects `S`, retrying with backoff until it works or `stop`.
    async fn connect<S: Store>(
        &self,
        options: &Options,
        failures: &mut u32,
        stop: &CancellationToken,
        role: Role,
    ) -> Option<S> {
        loop {
            if *failures > 0 {
                let wait = crate::retry::delay(*failures);
                tokio::select! {
                    () = stop.cancelled() => return None,
                    () = tokio::time::sleep(wait) => {}
                }
            }
            let attempt = tokio::time::timeout(options.timeout, S::connect(options, &self.name));
            let r = tokio::select! {
                () = stop.cancelled() => return None,
                r = attempt => r,
            };
            match r {
                Ok(Ok(s)) => return Some(s),
                Ok(Err(e)) => self.failed(role, failures, &e.to_string()),
                Err(_) => self.failed(role, failures, "connect: timed out"),
            }
        }
    }

    fn failed(&self, role: Role, failures: &mut u32, e: &str) {
        *failures = failures.saturating_add(1);
        let e = format!("{}: {e}", self.kind);
        // The writer and the reader say it once; the question listener's
        // failures are the same outage.
        if *failures == 1 && !matches!(role, Role::Listener) {
            tracing::warn!(backplane = self.kind, role = role.name(), error = %e, "backplane unavailable; retrying with backoff");
        } else {
            tracing::debug!(backplane = self.kind, role = role.name(), error = %e, "backplane still unavailable");
        }
        match role {
            Role::Writer => {
                self.set_up(false);
                self.set(Some("retrying"), None, Some(e));
            }
            Role::Reader => self.set(None, Some("retrying"), Some(e)),
            Role::Listener => {}
        }
    }

    /// Writes this node's own events: whatever the backend lacks after
    /// (re)connecting, then live, in batches.
    async fn write_loop<S: Store>(self: Arc<Self>, options: Options, stop: CancellationToken) {
        // Subscribed before anything is read, so nothing falls between.
        let mut live = self.hub.applied();
        let mut failures = 0u32;
        while let Some(mut store) = self
            .connect::<S>(&options, &mut failures, &stop, Role::Writer)
            .await
        {
            let r = self
                .write_connected(&mut store, &mut live, &mut failures, &stop)
                .await;
            match r {
                Ok(()) => {
                    // Nothing is written any more: a publish still waiting
                    // is answered now, not at its timeout.
                    self.health.lock().error = Some("herald is shutting down".into());
                    self.set_up(false);
                    return;
                }
                Err(e) => self.failed(Role::Writer, &mut failures, &e.to_string()),
            }
        }
    }

    async fn write_connected<S: Store>(
        &self,
        store: &mut S,
        live: &mut tokio::sync::broadcast::Receiver<SharedEvent>,
        failures: &mut u32,
        stop: &CancellationToken,
    ) -> Result<(), Error> {
        let mut last = self.call(store.last_own()).await?;
        *failures = 0;
        self.hub.observe_own(last);
        // What the backend lacks (all of it, if it lost its data).
        let mut batch = self.hub.own_events_after(last);
        let mut idle = tokio::time::interval(READ_BLOCK);
        idle.reset();
        loop {
            batch.retain(|e| e.id > last);
            for chunk in batch.chunks(MAX_BATCH) {
                self.call(store.write(chunk)).await?;
                self.batches.fetch_add(1, Ordering::Relaxed);
                if let Some(e) = chunk.last() {
                    last = e.id;
                    self.written_count
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
            }
            batch.clear();
            self.confirmed(last);
            if !self.up() {
                self.writer_joined.store(true, Ordering::Release);
                self.set_up(true);
                self.set(Some("connected"), None, None);
                tracing::info!(backplane = self.kind, "backplane writer connected");
            }
            if stop.is_cancelled() {
                // Shutting down: what was accepted last was written above.
                return Ok(());
            }
            tokio::select! {
                // Once more around the loop: writes what is still queued.
                () = stop.cancelled() => {}
                r = live.recv() => match r {
                    Ok(ev) => batch.push(ev),
                    Err(RecvError::Lagged(_)) => batch = self.hub.own_events_after(last),
                    Err(RecvError::Closed) => return Ok(()),
                },
                _ = idle.tick() => {
                    self.call(store.ping()).await?;
                    continue;
                }
            }
            // Everything already waiting goes in the same batch.
            while batch.len() < MAX_BATCH {
                match live.try_recv() {
                    Ok(ev) => batch.push(ev),
                    Err(TryRecvError::Lagged(_)) => {
                        batch = self.hub.own_events_after(last);
                        break;
                    }
                    Err(_) => break,
                }
            }
            idle.reset();
        }
    }

    /// A backend call bounded by the timeout.
    async fn call<T>(&self, f: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
        tokio::time::timeout(self.timeout, f)
            .await
            .unwrap_or_else(|_| {
                Err(Error::Backend(format!(
                    "no answer within {:?}",
                    self.timeout
                )))
            })
    }

    /// Loads the snapshot once, then reads every other origin's events.
    async fn read_loop<S: Store>(self: Arc<Self>, options: Options, stop: CancellationToken) {
        let mut cursor = S::Cursor::default();
        let mut failures = 0u32;
        while let Some(mut store) = self
            .connect::<S>(&options, &mut failures, &stop, Role::Reader)
            .await
        {
            let r = tokio::select! {
                () = stop.cancelled() => return,
                r = self.read_connected(&mut store, &mut cursor, &mut failures) => r,
            };
            if let Err(e) = r {
                self.failed(Role::Reader, &mut failures, &e.to_string());
            }
        }
    }

    async fn read_connected<S: Store>(
        &self,
        store: &mut S,
        cursor: &mut S::Cursor,
        failures: &mut u32,
    ) -> Result<(), Error> {
        if !self.loaded.load(Ordering::Acquire) {
            // Not bounded as a whole (a large history takes a while);
            // each backend request is.
            let lines = store.snapshot(cursor).await?;
            let n = crate::cluster::apply_all(&self.hub, &self.name, lines);
            tracing::info!(
                backplane = self.kind,
                events = n,
                "loaded the snapshot from the backplane"
            );
            self.loaded.store(true, Ordering::Release);
        }
        self.set(None, Some("connected"), None);
        *failures = 0;
        loop {
            let position = self.hub.position();
            let lines = self.call(store.read(&position, cursor)).await?;
            for l in lines {
                if crate::cluster::apply(&self.hub, &self.name, l) {
                    self.applied.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Role {
    Writer,
    Reader,
    /// The question listener.
    Listener,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Self::Writer => "writer",
            Self::Reader => "reader",
            Self::Listener => "question listener",
        }
    }
}

/// A URL (or a comma-separated list, as `--nats-url` takes) without its
/// password, for logs, errors and `/status`: parsed by a real URL parser,
/// so a password holding `@`, `:` or `/` never leaks in part. A user with
/// a password keeps the user (`redis://app:***@host`); a token alone
/// (`nats://TOKEN@host`) becomes `***`; what does not parse as a URL
/// shows its scheme only.
pub fn redact(urls: &str) -> String {
    urls.split(',')
        .map(|u| redact_one(u.trim()))
        .collect::<Vec<_>>()
        .join(",")
}

fn redact_one(u: &str) -> String {
    const HIDDEN: &str = "***";
    match url::Url::parse(u) {
        Ok(mut parsed) => {
            let hidden = if parsed.password().is_some() {
                parsed.set_password(Some(HIDDEN))
            } else if !parsed.username().is_empty() {
                parsed.set_username(HIDDEN)
            } else {
                Ok(())
            };
            match hidden {
                Ok(()) => parsed.to_string(),
                Err(()) => unparseable(u),
            }
        }
        Err(_) => unparseable(u),
    }
}

fn unparseable(u: &str) -> String {
    match u.split_once("://") {
        Some((scheme, _))
            if scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) =>
        {
            format!("{scheme}://(not a URL; hidden)")
        }
        _ => "(not a URL; hidden)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            redact("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
        assert_eq!(
            redact("redis://:hunter2@127.0.0.1:6379"),
            "redis://:***@127.0.0.1:6379"
        );
        assert_eq!(
            redact("nats://app:hunter2@nats:4222"),
            "nats://app:***@nats:4222"
        );
        assert_eq!(redact("nats://s3cret@nats:4222"), "nats://***@nats:4222");
        assert!(!redact("rediss://u:p%40ss@h/").contains("p%40ss"));
        // An unencoded @ in the password: the last @ ends the user info.
        assert_eq!(redact("redis://user:p@ss@host"), "redis://user:***@host");
        assert_eq!(
            redact("redis://:p@ss@host:6379/0"),
            "redis://:***@host:6379/0"
        );
        // A / in the password ends the authority for a URL parser: what
        // cannot be read is hidden whole, never printed in part.
        for u in ["redis://:pa/ss@host", "redis://user:se/cr:et@host"] {
            let r = redact(u);
            assert!(
                !r.contains("pa/ss") && !r.contains("ss@") && !r.contains("se/cr"),
                "{u} -> {r}"
            );
            assert!(r.starts_with("redis://"), "{r}");
        }
        // Every URL of a NATS list.
        assert_eq!(
            redact("nats://a:one@n1:4222, nats://b:two@n2:4222"),
            "nats://a:***@n1:4222,nats://b:***@n2:4222"
        );
        assert_eq!(redact("not a url at all"), "(not a URL; hidden)");
    }
}
