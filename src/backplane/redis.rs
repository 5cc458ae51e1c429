//! The Redis backplane: one Redis Stream per origin.
//!
//! Keys (under `--backplane-prefix`, default `herald`):
//!
//! - `P:stream:ORIGIN`: the origin's events, entry id `ID-0` where ID is
//!   the event's id, so a reader resumes from its position with `XREAD`
//!   and a rewrite after a reconnection can never reorder or duplicate
//!   (Redis refuses ids at or below the top). Trimmed by time to the
//!   history TTL, at least [`super::MIN_RETENTION`] (`MINID ~`: ids are
//!   microsecond clocks), and expiring twice that after its last write,
//!   so the stream of a node gone for good disappears;
//! - `P:retained:ORIGIN`: a hash channel → the origin's newest retained
//!   event, kept past the stream's trimming (one writer per origin, so a
//!   plain `HSET` in id order is enough);
//! - `P:origins`: the set of origins, and `P:joins`, a short stream a
//!   node adds to when it starts, so readers blocked in `XREAD` wake up
//!   and read the new origin at once.
//!
//! Streams, not pub/sub: pub/sub forgets what a disconnected node missed,
//! and history would need a second structure anyway.

use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::streams::{StreamRangeReply, StreamReadReply};
use redis::{AsyncConnectionConfig, Value};
use serde_json::value::RawValue;

use super::{Error, Options, READ_BLOCK, Store};
use crate::cluster::Line;
use crate::hub::{EventId, Position, SharedEvent};

/// Entries read per `XRANGE`/`XREAD` call.
const PAGE: usize = 1000;

/// How often a reader looks for origins that left nothing behind (at most;
/// more often with a shorter history TTL).
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// A connection to Redis.
pub struct Redis {
    client: redis::Client,
    conn: MultiplexedConnection,
    prefix: String,
    me: String,
    ttl_micros: u64,
    /// How long the stream keeps an event (at least the TTL).
    retention_micros: u64,
    /// When the reader last dropped origins that left nothing behind.
    pruned: Option<tokio::time::Instant>,
}

/// Where a Redis reader is: in the joins stream, and the last entry read
/// of each origin (ahead of the position when an entry was skipped).
#[derive(Debug, Default)]
pub struct Cursor {
    joins: Option<String>,
    read: std::collections::HashMap<String, u64>,
    /// Origins seen with nothing left in Redis, and since when.
    empty_since: std::collections::HashMap<String, tokio::time::Instant>,
    /// The other origins, and when they were listed.
    origins: Vec<String>,
    origins_at: Option<tokio::time::Instant>,
}

impl Redis {
    fn stream(&self, origin: &str) -> String {
        format!("{}:stream:{origin}", self.prefix)
    }

    fn retained(&self, origin: &str) -> String {
        format!("{}:retained:{origin}", self.prefix)
    }

    fn origins_key(&self) -> String {
        format!("{}:origins", self.prefix)
    }

    fn joins(&self) -> String {
        format!("{}:joins", self.prefix)
    }

    /// The pub/sub channel of questions between nodes.
    fn asks(&self) -> String {
        format!("{}:ask", self.prefix)
    }

    /// Where answers to one question go (a list, short-lived).
    fn reply_prefix(&self) -> String {
        format!("{}:reply:", self.prefix)
    }

    async fn origins(&mut self) -> Result<Vec<String>, Error> {
        let mut v: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.origins_key())
            .query_async(&mut self.conn)
            .await
            .map_err(Error::backend)?;
        v.retain(|o| crate::hub::valid_origin(o));
        v.sort();
        Ok(v)
    }

    /// Lists this origin and wakes the readers (the joins stream).
    async fn announce(&mut self) -> Result<(), Error> {
        let me = self.me.clone();
        redis::pipe()
            .cmd("SADD")
            .arg(self.origins_key())
            .arg(&me)
            .ignore()
            .cmd("XADD")
            .arg(self.joins())
            .arg("MAXLEN")
            .arg("~")
            .arg(100)
            .arg("*")
            .arg("node")
            .arg(&me)
            .ignore()
            .query_async::<()>(&mut self.conn)
            .await
            .map_err(Error::backend)
    }

    /// Drops origins that have left nothing for twice the history TTL
    /// (nodes gone for good: their streams expired and they retain
    /// nothing), so readers stop asking. An origin that writes again is
    /// listed again by its writer.
    async fn prune(&mut self, cursor: &mut Cursor) -> Result<(), Error> {
        let now = tokio::time::Instant::now();
        let grace = Duration::from_micros(self.ttl_micros.saturating_mul(2));
        for origin in self.origins().await? {
            let (stream, retained) = (self.stream(&origin), self.retained(&origin));
            let left: u64 = redis::cmd("EXISTS")
                .arg(&stream)
                .arg(&retained)
                .query_async(&mut self.conn)
                .await
                .map_err(Error::backend)?;
            if left > 0 {
                cursor.empty_since.remove(&origin);
                continue;
            }
            let since = *cursor.empty_since.entry(origin.clone()).or_insert(now);
            if now.saturating_duration_since(since) > grace {
                cursor.empty_since.remove(&origin);
                let _: u64 = redis::cmd("SREM")
                    .arg(self.origins_key())
                    .arg(&origin)
                    .query_async(&mut self.conn)
                    .await
                    .map_err(Error::backend)?;
                tracing::info!(%origin, "forgot a node whose events have all expired");
            }
        }
        Ok(())
    }

    async fn last_entry(&mut self, key: &str) -> Result<Option<String>, Error> {
        let r: StreamRangeReply = redis::cmd("XREVRANGE")
            .arg(key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut self.conn)
            .await
            .map_err(Error::backend)?;
        Ok(r.ids.into_iter().next().map(|e| e.id))
    }
}

/// A question on the wire: where to answer, and what.
#[derive(serde::Serialize, serde::Deserialize)]
struct Envelope {
    reply: String,
    q: Box<RawValue>,
}

/// For the fuzz target: the line in a bulk-string value, as JSON text.
pub(super) fn fuzz_line(data: &[u8]) -> Option<String> {
    line(Value::BulkString(data.to_vec())).and_then(|l| serde_json::to_string(&l).ok())
}

/// For the fuzz target: an entry id that parses prints back (as `ID-0`) to
/// the same event id.
pub(super) fn fuzz_entry_id(s: &str) {
    if let Ok(id) = entry_id(s) {
        let again = format!("{}-0", id.as_u64());
        assert_eq!(entry_id(&again).ok(), Some(id));
    }
}

/// The event id of a stream entry id `ID-0`.
fn entry_id(id: &str) -> Result<EventId, Error> {
    id.split_once('-')
        .and_then(|(ms, _)| ms.parse::<u64>().ok())
        .map(EventId::from_u64)
        .ok_or_else(|| Error::Data(format!("stream entry id {id:?}")))
}

/// The line in an entry's `l` field (or a hash value); `None`, logged, if
/// it is not one herald wrote (it is skipped, never retried forever).
fn line(v: Value) -> Option<Line> {
    let parsed = redis::from_redis_value::<Vec<u8>>(v)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice::<Line>(&b).map_err(|e| e.to_string()));
    match parsed {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(error = %Error::Data(e), "skipping an entry herald did not write");
            None
        }
    }
}

fn lines_of(entries: Vec<redis::streams::StreamId>) -> impl Iterator<Item = Line> {
    entries
        .into_iter()
        .filter_map(|mut e| e.map.remove("l"))
        .filter_map(line)
}

impl Store for Redis {
    const KIND: &'static str = "redis";
    type Cursor = Cursor;

    async fn connect(options: &Options, me: &str) -> Result<Self, Error> {
        let url = options.url.expose();
        let client = if url.starts_with("rediss://") {
            let root_cert = match &options.ca {
                Some(path) => Some(
                    std::fs::read(path)
                        .map_err(|e| Error::Backend(format!("{}: {e}", path.display())))?,
                ),
                None => None,
            };
            redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert,
                },
            )
        } else {
            redis::Client::open(url)
        }
        .map_err(Error::backend)?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(options.timeout))
            // A blocked XREAD answers within READ_BLOCK.
            .set_response_timeout(Some(options.timeout + READ_BLOCK));
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(Error::backend)?;
        Ok(Self {
            client,
            conn,
            prefix: options.prefix.clone(),
            me: me.to_owned(),
            ttl_micros: u64::try_from(options.history_ttl.as_micros()).unwrap_or(u64::MAX),
            retention_micros: u64::try_from(options.retention().as_micros()).unwrap_or(u64::MAX),
            pruned: None,
        })
    }

    async fn last_own(&mut self) -> Result<EventId, Error> {
        // Announce this origin (readers pick it up), then find its top.
        self.announce().await?;
        let key = self.stream(&self.me);
        match self.last_entry(&key).await? {
            Some(id) => entry_id(&id),
            None => Ok(EventId::from_u64(0)),
        }
    }

    async fn write(&mut self, events: &[SharedEvent]) -> Result<(), Error> {
        let mut pipe = redis::pipe();
        // Still listed (a reader may have pruned an origin that was away),
        // and the stream lives as long as its newest event is in history:
        // the stream of a node that is gone for good expires.
        let me = self.me.clone();
        pipe.cmd("SADD").arg(self.origins_key()).arg(&me);
        for ev in events {
            let Some(l) = Line::of(ev) else { continue };
            let json = serde_json::to_vec(&l).map_err(|e| Error::Data(e.to_string()))?;
            let cutoff = ev.id.as_u64().saturating_sub(self.retention_micros);
            pipe.cmd("XADD")
                .arg(self.stream(&l.origin))
                .arg("MINID")
                .arg("~")
                .arg(format!("{cutoff}-0"))
                .arg(format!("{}-0", ev.id.as_u64()))
                .arg("l")
                .arg(&json)
                .ignore();
            if ev.retain {
                pipe.cmd("HSET")
                    .arg(self.retained(&l.origin))
                    .arg(&l.channel)
                    .arg(&json)
                    .ignore();
            }
        }
        pipe.cmd("PEXPIRE")
            .arg(self.stream(&me))
            .arg((self.retention_micros.saturating_mul(2) / 1000).max(1000))
            .ignore();
        let (added,): (u64,) = pipe
            .query_async(&mut self.conn)
            .await
            .map_err(Error::backend)?;
        if added > 0 {
            // Listed again: wake the readers blocked without this origin.
            self.announce().await?;
        }
        Ok(())
    }

    async fn ping(&mut self) -> Result<(), Error> {
        redis::cmd("PING")
            .query_async::<()>(&mut self.conn)
            .await
            .map_err(Error::backend)
    }

    async fn serve_asks(&mut self, answer: &(dyn Fn(&[u8]) -> Vec<u8> + Sync)) -> Error {
        let mut pubsub = match self.client.get_async_pubsub().await {
            Ok(p) => p,
            Err(e) => return Error::backend(e),
        };
        if let Err(e) = pubsub.subscribe(self.asks()).await {
            return Error::backend(e);
        }
        let replies = self.reply_prefix();
        let mut questions = pubsub.into_on_message();
        while let Some(msg) = questions.next().await {
            let Ok(env) = serde_json::from_slice::<Envelope>(msg.get_payload_bytes()) else {
                continue;
            };
            // Answers only go where questions expect them.
            if !env.reply.starts_with(&replies) {
                continue;
            }
            let a = answer(env.q.get().as_bytes());
            let sent = redis::pipe()
                .cmd("RPUSH")
                .arg(&env.reply)
                .arg(a)
                .ignore()
                .cmd("EXPIRE")
                .arg(&env.reply)
                .arg(30)
                .ignore()
                .query_async::<()>(&mut self.conn)
                .await;
            if let Err(e) = sent {
                return Error::backend(e);
            }
        }
        Error::Backend("the question subscription ended".into())
    }

    async fn ask(
        &mut self,
        question: &[u8],
        window: Duration,
        enough: &(dyn Fn(&[u8]) -> bool + Sync),
    ) -> Result<Vec<Vec<u8>>, Error> {
        let reply = format!(
            "{}{:016x}{:016x}",
            self.reply_prefix(),
            rand::random::<u64>(),
            rand::random::<u64>()
        );
        let q = RawValue::from_string(String::from_utf8_lossy(question).into_owned())
            .map_err(|e| Error::Data(e.to_string()))?;
        let env = serde_json::to_vec(&Envelope {
            reply: reply.clone(),
            q,
        })
        .map_err(|e| Error::Data(e.to_string()))?;
        // PUBLISH says how many nodes heard the question.
        let listeners: usize = redis::cmd("PUBLISH")
            .arg(self.asks())
            .arg(env)
            .query_async(&mut self.conn)
            .await
            .map_err(Error::backend)?;
        let deadline = tokio::time::Instant::now() + window;
        let mut out = vec![];
        while out.len() < listeners {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            let got: Option<(String, Vec<u8>)> = redis::cmd("BLPOP")
                .arg(&reply)
                .arg(left.as_secs_f64().max(0.01))
                .query_async(&mut self.conn)
                .await
                .map_err(Error::backend)?;
            let Some((_, a)) = got else { break };
            let done = enough(&a);
            out.push(a);
            if done {
                break;
            }
        }
        let _: Result<(), _> = redis::cmd("DEL")
            .arg(&reply)
            .query_async(&mut self.conn)
            .await;
        Ok(out)
    }

    async fn snapshot(&mut self, cursor: &mut Cursor) -> Result<Vec<Line>, Error> {
        // Where the joins stream is now: reading goes on from there.
        let joins = self.joins();
        cursor.joins = Some(
            self.last_entry(&joins)
                .await?
                .unwrap_or_else(|| "0-0".into()),
        );
        let mut out = vec![];
        for origin in self.origins().await? {
            let retained: Vec<Value> = redis::cmd("HVALS")
                .arg(self.retained(&origin))
                .query_async(&mut self.conn)
                .await
                .map_err(Error::backend)?;
            out.extend(retained.into_iter().filter_map(line));
            let key = self.stream(&origin);
            let mut start = "-".to_owned();
            loop {
                let page: StreamRangeReply = redis::cmd("XRANGE")
                    .arg(&key)
                    .arg(&start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(PAGE)
                    .query_async(&mut self.conn)
                    .await
                    .map_err(Error::backend)?;
                let n = page.ids.len();
                if let Some(last) = page.ids.last() {
                    start = format!("({}", last.id);
                }
                out.extend(lines_of(page.ids));
                if n < PAGE {
                    break;
                }
            }
        }
        Ok(out)
    }

    async fn read(&mut self, position: &Position, cursor: &mut Cursor) -> Result<Vec<Line>, Error> {
        let every = PRUNE_EVERY.min(Duration::from_micros(self.ttl_micros));
        if self.pruned.is_none_or(|t| t.elapsed() > every) {
            self.pruned = Some(tokio::time::Instant::now());
            self.prune(cursor).await?;
        }
        // The origin list is read again after a join (the joins stream
        // woke this reader) and at least every READ_BLOCK, not per batch.
        if cursor.origins_at.is_none_or(|t| t.elapsed() >= READ_BLOCK) {
            cursor.origins = self
                .origins()
                .await?
                .into_iter()
                .filter(|o| *o != self.me)
                .collect();
            cursor.origins_at = Some(tokio::time::Instant::now());
        }
        let origins = cursor.origins.clone();
        let joins = self.joins();
        let joins_from = match &cursor.joins {
            Some(j) => j.clone(),
            None => self
                .last_entry(&joins)
                .await?
                .unwrap_or_else(|| "0-0".into()),
        };
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(PAGE)
            .arg("BLOCK")
            .arg(READ_BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(&joins);
        for o in &origins {
            cmd.arg(self.stream(o));
        }
        cmd.arg(&joins_from);
        for o in &origins {
            let read = cursor.read.get(o).copied().unwrap_or(0);
            cmd.arg(format!("{}-0", position.get(o).as_u64().max(read)));
        }
        let reply: Option<StreamReadReply> = cmd
            .query_async(&mut self.conn)
            .await
            .map_err(Error::backend)?;
        cursor.joins = Some(joins_from);
        let mut out = vec![];
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            if key.key == joins {
                if let Some(last) = key.ids.last() {
                    cursor.joins = Some(last.id.clone());
                    cursor.origins_at = None;
                }
            } else {
                let origin = key.key.rsplit(':').next().unwrap_or_default().to_owned();
                if let Some(Ok(last)) = key.ids.last().map(|e| entry_id(&e.id)) {
                    cursor.read.insert(origin, last.as_u64());
                }
                out.extend(lines_of(key.ids));
            }
        }
        Ok(out)
    }
}
