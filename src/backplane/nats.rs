//! The NATS backplane: JetStream streams.
//!
//! - Stream `P_events`, subjects `P.e.ORIGIN` (names hex-encoded, so any
//!   origin makes one valid subject token): every origin's events in id
//!   order, kept for the history TTL (`max_age`, at least
//!   [`super::MIN_RETENTION`]), each with a
//!   `Nats-Msg-Id` of `ORIGIN:ID` so a rewrite after a lost acknowledgement
//!   is dropped by JetStream's duplicate window;
//! - stream `P_retained`, subjects `P.r.ORIGIN.CHANNEL`, one message per
//!   subject: each origin's newest retained value per channel, kept past
//!   the TTL.
//!
//! A node reads `P.e.>` with one ordered consumer, not one per channel or
//! client. JetStream is required: core NATS forgets what a disconnected
//! node missed, so herald refuses to start on a server without it rather
//! than give a weaker guarantee silently.

use std::fmt::Write as _;

use async_nats::jetstream::{self, consumer, stream};
use futures_util::{FutureExt, StreamExt};

use super::{Error, Options, READ_BLOCK, Store};
use crate::cluster::Line;
use crate::hub::{EventId, Position, SharedEvent};

/// Messages taken from the consumer per read.
const PAGE: usize = 1000;

/// A connection to NATS.
pub struct Nats {
    client: async_nats::Client,
    js: jetstream::Context,
    prefix: String,
    me: String,
    consumer: Option<consumer::pull::Ordered>,
    /// The longest wait for one message while reading the snapshot.
    timeout: std::time::Duration,
}

/// Where a NATS reader is: the events stream's creation time (a stream
/// created again lost its data: read it from the start) and the next
/// sequence.
#[derive(Debug, Default)]
pub struct Cursor {
    created: Option<i128>,
    next: u64,
}

fn hex(s: &str) -> String {
    s.bytes()
        .fold(String::with_capacity(s.len() * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

impl Nats {
    fn events(&self) -> String {
        format!("{}_events", self.prefix)
    }

    fn subject(&self, origin: &str) -> String {
        format!("{}.e.{}", self.prefix, hex(origin))
    }

    fn retained_subject(&self, origin: &str, channel: &str) -> String {
        format!("{}.r.{}.{}", self.prefix, hex(origin), hex(channel))
    }

    fn check(&self) -> Result<(), Error> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            other => Err(Error::Backend(format!("connection {other}"))),
        }
    }
}

async fn info(js: &jetstream::Context, stream: &str) -> Result<stream::Info, Error> {
    let mut s = js.get_stream(stream).await.map_err(Error::backend)?;
    s.info().await.cloned().map_err(Error::backend)
}

/// An ordered consumer of `stream`, filtered to `filter`.
async fn consume(
    js: &jetstream::Context,
    stream: &str,
    filter: String,
    deliver_policy: consumer::DeliverPolicy,
) -> Result<consumer::pull::Ordered, Error> {
    let s = js.get_stream(stream).await.map_err(Error::backend)?;
    let c = s
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: filter,
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(Error::backend)?;
    c.messages().await.map_err(Error::backend)
}

/// For the fuzz target: the line a payload carries, as JSON text.
pub(super) fn fuzz_line(payload: &[u8]) -> Option<String> {
    line(payload).and_then(|l| serde_json::to_string(&l).ok())
}

/// The line a message carries; `None`, logged, if herald did not write it
/// (it is skipped, never retried forever).
fn line(payload: &[u8]) -> Option<Line> {
    match serde_json::from_slice::<Line>(payload) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(error = %Error::Data(e.to_string()), "skipping a message herald did not write");
            None
        }
    }
}

/// Reads `consumer` until the stream sequence reaches `last`.
async fn read_upto(
    consumer: &mut consumer::pull::Ordered,
    last: u64,
    silence: std::time::Duration,
    out: &mut Vec<Line>,
) -> Result<(), Error> {
    loop {
        let m = match tokio::time::timeout(silence, consumer.next()).await {
            Err(_) => return Err(Error::Backend(format!("no message for {silence:?}"))),
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => return Err(Error::backend(e)),
            Ok(None) => return Err(Error::Backend("the consumer ended".into())),
        };
        let seq = m.info().map_err(Error::backend)?.stream_sequence;
        out.extend(line(&m.payload));
        if seq >= last {
            return Ok(());
        }
    }
}

impl Store for Nats {
    const KIND: &'static str = "nats";
    type Cursor = Cursor;

    async fn connect(options: &Options, me: &str) -> Result<Self, Error> {
        let mut connect = async_nats::ConnectOptions::new();
        if let Some(ca) = &options.ca {
            connect = connect.add_root_certificates(ca.clone()).require_tls(true);
        }
        let client = connect
            .connection_timeout(options.timeout)
            .request_timeout(Some(options.timeout))
            .name(format!("herald {me}"))
            .connect(
                options
                    .url
                    .expose()
                    .split(',')
                    .map(str::trim)
                    .collect::<Vec<_>>(),
            )
            .await
            .map_err(Error::backend)?;
        let js = jetstream::new(client.clone());
        let prefix = options.prefix.clone();
        for (name, subjects, max_age, per_subject) in [
            (
                format!("{prefix}_events"),
                format!("{prefix}.e.*"),
                options.retention(),
                -1,
            ),
            (
                format!("{prefix}_retained"),
                format!("{prefix}.r.*.*"),
                std::time::Duration::ZERO,
                1,
            ),
        ] {
            js.get_or_create_stream(stream::Config {
                name,
                subjects: vec![subjects],
                max_age,
                max_messages_per_subject: per_subject,
                storage: stream::StorageType::File,
                duplicate_window: std::time::Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .map_err(|e| {
                Error::Backend(format!(
                    "{e} (herald needs JetStream: start nats-server with -js)"
                ))
            })?;
        }
        Ok(Self {
            client,
            js,
            prefix,
            me: me.to_owned(),
            consumer: None,
            timeout: options.timeout,
        })
    }

    async fn last_own(&mut self) -> Result<EventId, Error> {
        let s = self
            .js
            .get_stream(self.events())
            .await
            .map_err(Error::backend)?;
        match s
            .get_last_raw_message_by_subject(&self.subject(&self.me))
            .await
        {
            Ok(m) => line(&m.payload)
                .and_then(|l| l.id.parse::<EventId>().ok())
                .ok_or_else(|| Error::Data("the newest own event is not herald's".into())),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                Ok(EventId::from_u64(0))
            }
            Err(e) => Err(Error::backend(e)),
        }
    }

    async fn write(&mut self, events: &[SharedEvent]) -> Result<(), Error> {
        self.check()?;
        let mut acks = Vec::with_capacity(events.len());
        for ev in events {
            let Some(l) = Line::of(ev) else { continue };
            let json =
                bytes::Bytes::from(serde_json::to_vec(&l).map_err(|e| Error::Data(e.to_string()))?);
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("{}:{}", l.origin, l.id).as_str());
            acks.push(
                self.js
                    .publish_with_headers(self.subject(&l.origin), headers, json.clone())
                    .await
                    .map_err(Error::backend)?,
            );
            if ev.retain {
                acks.push(
                    self.js
                        .publish(self.retained_subject(&l.origin, &l.channel), json)
                        .await
                        .map_err(Error::backend)?,
                );
            }
        }
        // Sent back to back; now every acknowledgement.
        for ack in acks {
            ack.await.map_err(Error::backend)?;
        }
        Ok(())
    }

    async fn ping(&mut self) -> Result<(), Error> {
        self.check()?;
        self.client.flush().await.map_err(Error::backend)
    }

    async fn serve_asks(&mut self, answer: &(dyn Fn(&[u8]) -> Vec<u8> + Sync)) -> Error {
        // The client resubscribes by itself after a reconnection.
        let mut questions = match self.client.subscribe(format!("{}.ask", self.prefix)).await {
            Ok(s) => s,
            Err(e) => return Error::backend(e),
        };
        while let Some(m) = questions.next().await {
            let Some(reply) = m.reply else { continue };
            let a = answer(&m.payload);
            if let Err(e) = self.client.publish(reply, a.into()).await {
                return Error::backend(e);
            }
        }
        Error::Backend("the question subscription ended".into())
    }

    async fn ask(
        &mut self,
        question: &[u8],
        window: std::time::Duration,
        enough: &(dyn Fn(&[u8]) -> bool + Sync),
    ) -> Result<Vec<Vec<u8>>, Error> {
        // NATS does not say how many heard it: collect for the window.
        let inbox = self.client.new_inbox();
        let mut answers = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(Error::backend)?;
        self.client
            .publish_with_reply(
                format!("{}.ask", self.prefix),
                inbox,
                bytes::Bytes::copy_from_slice(question),
            )
            .await
            .map_err(Error::backend)?;
        self.client.flush().await.map_err(Error::backend)?;
        let deadline = tokio::time::Instant::now() + window;
        let mut out = vec![];
        while let Ok(Some(m)) = tokio::time::timeout_at(deadline, answers.next()).await {
            let done = enough(&m.payload);
            out.push(m.payload.to_vec());
            if done {
                break;
            }
        }
        Ok(out)
    }

    async fn snapshot(&mut self, cursor: &mut Cursor) -> Result<Vec<Line>, Error> {
        let mut out = vec![];
        let js = self.js.clone();
        let retained = format!("{}_retained", self.prefix);
        let r = info(&js, &retained).await?;
        if r.state.messages > 0 {
            let filter = format!("{}.r.>", self.prefix);
            let mut c = consume(&js, &retained, filter, consumer::DeliverPolicy::All).await?;
            read_upto(&mut c, r.state.last_sequence, self.timeout, &mut out).await?;
        }
        let events = self.events();
        let info = info(&js, &events).await?;
        cursor.created = Some(info.created.unix_timestamp_nanos());
        cursor.next = info.state.last_sequence + 1;
        let filter = format!("{}.e.>", self.prefix);
        let mut c = consume(&js, &events, filter, consumer::DeliverPolicy::All).await?;
        if info.state.messages > 0 {
            read_upto(&mut c, info.state.last_sequence, self.timeout, &mut out).await?;
        }
        // The same consumer goes on live.
        self.consumer = Some(c);
        Ok(out)
    }

    async fn read(
        &mut self,
        _position: &Position,
        cursor: &mut Cursor,
    ) -> Result<Vec<Line>, Error> {
        if self.consumer.is_none() {
            let js = self.js.clone();
            let events = self.events();
            let info = info(&js, &events).await?;
            let created = info.created.unix_timestamp_nanos();
            if cursor.created != Some(created) {
                if cursor.created.is_some() {
                    tracing::warn!(
                        "the NATS events stream was created again (its data was lost); reading it from the start"
                    );
                }
                cursor.created = Some(created);
                cursor.next = 1;
            }
            if cursor.next < info.state.first_sequence {
                tracing::warn!(
                    missed = info.state.first_sequence - cursor.next,
                    "events expired from the NATS stream before this node read them"
                );
            }
            let c = consume(
                &js,
                &events,
                format!("{}.e.>", self.prefix),
                consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: cursor.next.max(1),
                },
            )
            .await?;
            self.consumer = Some(c);
        }
        let Some(c) = self.consumer.as_mut() else {
            return Ok(vec![]);
        };
        let mut out = vec![];
        let first = match tokio::time::timeout(READ_BLOCK, c.next()).await {
            Err(_) => {
                // Nothing new; a silent consumer on a dead connection is
                // caught here.
                self.check()?;
                return Ok(out);
            }
            Ok(m) => m,
        };
        let mut next = Some(first);
        while let Some(m) = next {
            let m = match m {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    self.consumer = None;
                    return Err(Error::backend(e));
                }
                None => {
                    self.consumer = None;
                    return Err(Error::Backend("the consumer ended".into()));
                }
            };
            if let Ok(info) = m.info() {
                cursor.next = info.stream_sequence + 1;
            }
            out.extend(line(&m.payload));
            if out.len() >= PAGE {
                break;
            }
            next = c.next().now_or_never();
        }
        Ok(out)
    }
}
