//! A connection's bounded outbound queue.
//!
//! Publishers push into it without ever waiting; the connection's writer
//! takes everything queued at once and writes it together. When what is
//! queued passes the byte limit the outbox closes itself: the subscriber is
//! too slow, its writer ends the connection, and the client resumes from
//! history when it reconnects. Nobody else waits for it.
//!
//! An idle outbox holds an empty `VecDeque` (no allocation) and a `Notify`.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

use super::event::{Reset, SharedEvent};
use super::name::ChannelName;
use super::replay::{BATCH_BYTES, CURSOR_COST, Replay};

/// Something to send to one connection.
#[derive(Debug, Clone)]
pub enum Item {
    /// A published event.
    Event(SharedEvent),
    /// The subscriber's position could not be honoured on this channel.
    Reset(Arc<Reset>),
}

impl Item {
    /// What the item costs a subscriber queue, in bytes.
    pub fn cost(&self) -> usize {
        match self {
            Self::Event(e) => e.cost(),
            Self::Reset(r) => r.channel.as_str().len() + r.reason.len() + 64,
        }
    }
}

/// Why an outbox stopped accepting items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The subscriber fell more than the byte limit behind.
    Slow,
}

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued.
    Queued,
    /// This push went over the limit and closed the outbox.
    Overflowed,
    /// The outbox was already closed; nothing was queued.
    Closed,
}

/// A per-connection queue. Shared between the hub (producers) and the
/// connection's writer (the one consumer).
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    notify: Notify,
    limit: usize,
}

#[derive(Debug, Default)]
struct State {
    /// Live items, in order.
    items: VecDeque<Item>,
    /// Replay cursors, in order, each with how many of `items` are ahead of
    /// it. `None` (the usual case), the writer takes `items` whole; boxed so
    /// that every outbox does not pay for it (fan-out touches them all).
    #[allow(clippy::box_collection)] // 8 bytes per outbox instead of 32
    replays: Option<Box<VecDeque<(usize, Replay)>>>,
    /// What `items` and `replays` cost against the limit.
    bytes: usize,
    closed: Option<Closed>,
}

impl State {
    fn close(&mut self, reason: Closed) {
        self.closed = Some(reason);
        self.items = VecDeque::new();
        self.replays = None;
        self.bytes = 0;
    }

    fn is_empty(&self) -> bool {
        self.items.is_empty() && self.replays.is_none()
    }
}

/// What the writer gets.
#[derive(Debug)]
pub enum Batch {
    /// Items to write, in order.
    Items(VecDeque<Item>),
    /// The outbox was closed; end the connection.
    Closed(Closed),
}

impl Outbox {
    /// An outbox that closes once more than `limit` bytes are queued.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            limit,
        })
    }

    /// Queues a live item that costs `cost` bytes against the limit
    /// (`cost` must be [`Item::cost`]).
    pub fn push(&self, item: Item, cost: usize) -> Pushed {
        self.enqueue(cost, |st| st.items.push_back(item))
    }

    /// Queues a replay. The events it will read are shared with history
    /// and are not counted; the cursor itself costs a small constant, so a
    /// client that subscribes again and again without reading is cut off
    /// like any slow one.
    pub(super) fn push_replay(&self, replay: Replay) -> Pushed {
        self.enqueue(CURSOR_COST, |st| {
            let ahead = st.items.len();
            st.replays
                .get_or_insert_default()
                .push_back((ahead, replay));
        })
    }

    fn enqueue(&self, cost: usize, put: impl FnOnce(&mut State)) -> Pushed {
        let mut st = self.state.lock();
        if st.closed.is_some() {
            return Pushed::Closed;
        }
        if st.bytes + cost > self.limit {
            st.close(Closed::Slow);
            drop(st);
            self.notify.notify_one();
            return Pushed::Overflowed;
        }
        let was_empty = st.is_empty();
        put(&mut st);
        st.bytes += cost;
        drop(st);
        if was_empty {
            self.notify.notify_one();
        }
        Pushed::Queued
    }

    /// Forgets the replays still queued for `channel` (its subscription
    /// ended). Live items of that channel stay; writers skip them.
    pub(super) fn drop_replays(&self, channel: &ChannelName) {
        let mut st = self.state.lock();
        let Some(replays) = st.replays.as_mut() else {
            return;
        };
        let before = replays.len();
        replays.retain(|(_, r)| r.channel() != channel);
        let dropped = before - replays.len();
        if replays.is_empty() {
            st.replays = None;
        }
        st.bytes = st.bytes.saturating_sub(dropped * CURSOR_COST);
    }

    /// Waits until there is something to write or the outbox is closed,
    /// then takes it. Cancel-safe.
    pub async fn next_batch(&self) -> Batch {
        loop {
            if let Some(batch) = self.try_batch() {
                return batch;
            }
            self.notify.notified().await;
        }
    }

    /// Takes what is ready without waiting: every live item queued up to
    /// the next replay, or the next bounded batch of a replay (about
    /// 64 KiB; the rest stays queued for the next call).
    #[inline]
    pub fn try_batch(&self) -> Option<Batch> {
        {
            // The usual case, as cheap as a queue with no replays: every
            // delivery of a fan-out passes here.
            let mut st = self.state.lock();
            if st.replays.is_none() {
                if let Some(reason) = st.closed {
                    return Some(Batch::Closed(reason));
                }
                if st.items.is_empty() {
                    return None;
                }
                st.bytes = 0;
                return Some(Batch::Items(std::mem::take(&mut st.items)));
            }
        }
        self.try_batch_replaying()
    }

    /// [`Outbox::try_batch`] with replays queued.
    #[inline(never)]
    fn try_batch_replaying(&self) -> Option<Batch> {
        loop {
            let mut st = self.state.lock();
            if let Some(reason) = st.closed {
                return Some(Batch::Closed(reason));
            }
            let ahead = match st.replays.as_ref().and_then(|r| r.front()) {
                None if st.items.is_empty() => return None,
                None => {
                    st.bytes = 0;
                    return Some(Batch::Items(std::mem::take(&mut st.items)));
                }
                Some((ahead, _)) => *ahead,
            };
            if ahead > 0 {
                let taken: VecDeque<Item> = st.items.drain(..ahead).collect();
                let cost: usize = taken.iter().map(Item::cost).sum();
                st.bytes = st.bytes.saturating_sub(cost);
                for (a, _) in st.replays.iter_mut().flat_map(|r| r.iter_mut()) {
                    *a -= ahead;
                }
                return Some(Batch::Items(taken));
            }
            let Some((_, mut replay)) = st.replays.as_mut().and_then(|r| r.pop_front()) else {
                return None; // unreachable: the front was just seen
            };
            if st.replays.as_ref().is_some_and(|r| r.is_empty()) {
                st.replays = None;
            }
            // Lock order is channel, then outbox: pull without ours.
            drop(st);
            let mut out = Vec::new();
            replay.pull(BATCH_BYTES, &mut out);
            let mut st = self.state.lock();
            if let Some(reason) = st.closed {
                return Some(Batch::Closed(reason));
            }
            if replay.is_done() {
                st.bytes = st.bytes.saturating_sub(CURSOR_COST);
            } else {
                st.replays.get_or_insert_default().push_front((0, replay));
            }
            if !out.is_empty() {
                return Some(Batch::Items(out.into()));
            }
        }
    }

    /// True once the outbox has been closed.
    pub fn is_closed(&self) -> bool {
        self.state.lock().closed.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::event::{Data, Event};
    use crate::hub::{ChannelName, EventId};

    fn ev(n: u64) -> Item {
        Item::Event(Arc::new(Event::new(
            EventId::from_u64(n),
            ChannelName::parse("c").unwrap(),
            None,
            Data::Text("x".into()),
            None,
            None,
        )))
    }

    fn ids(b: Batch) -> Vec<u64> {
        match b {
            Batch::Items(items) => items
                .into_iter()
                .map(|i| match i {
                    Item::Event(e) => e.id.as_u64(),
                    Item::Reset(_) => 0,
                })
                .collect(),
            Batch::Closed(c) => panic!("closed: {c:?}"),
        }
    }

    #[tokio::test]
    async fn writer_takes_everything_queued_in_order() {
        let o = Outbox::new(1000);
        for n in 1..=3 {
            assert_eq!(o.push(ev(n), 10), Pushed::Queued);
        }
        assert_eq!(ids(o.next_batch().await), vec![1, 2, 3]);
        assert!(o.try_batch().is_none());
    }

    #[tokio::test]
    async fn overflow_closes_and_frees_the_queue() {
        let o = Outbox::new(25);
        assert_eq!(o.push(ev(1), 10), Pushed::Queued);
        assert_eq!(o.push(ev(2), 10), Pushed::Queued);
        assert_eq!(o.push(ev(3), 10), Pushed::Overflowed);
        assert_eq!(o.push(ev(4), 10), Pushed::Closed);
        assert!(matches!(o.next_batch().await, Batch::Closed(Closed::Slow)));
        assert!(o.is_closed());
    }

    #[tokio::test]
    async fn draining_resets_the_byte_count() {
        let o = Outbox::new(25);
        for round in 0..10 {
            assert_eq!(o.push(ev(round), 20), Pushed::Queued);
            ids(o.next_batch().await);
        }
    }

    #[tokio::test]
    async fn a_waiting_writer_is_woken_by_a_push() {
        let o = Outbox::new(100);
        let o2 = o.clone();
        let writer = tokio::spawn(async move { ids(o2.next_batch().await) });
        tokio::task::yield_now().await;
        o.push(ev(7), 1);
        assert_eq!(writer.await.unwrap(), vec![7]);
    }
}
