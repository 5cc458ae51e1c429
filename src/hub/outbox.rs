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

/// Something to send to one connection.
#[derive(Debug, Clone)]
pub enum Item {
    /// A published event.
    Event(SharedEvent),
    /// The subscriber's position could not be honoured on this channel.
    Reset(Arc<Reset>),
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
    items: VecDeque<Item>,
    bytes: usize,
    closed: Option<Closed>,
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

    /// Queues a live item that costs `cost` bytes against the limit.
    pub fn push(&self, item: Item, cost: usize) -> Pushed {
        let mut st = self.state.lock();
        if st.closed.is_some() {
            return Pushed::Closed;
        }
        if st.bytes + cost > self.limit {
            st.closed = Some(Closed::Slow);
            st.items = VecDeque::new();
            st.bytes = 0;
            drop(st);
            self.notify.notify_one();
            return Pushed::Overflowed;
        }
        let was_empty = st.items.is_empty();
        st.items.push_back(item);
        st.bytes += cost;
        drop(st);
        if was_empty {
            self.notify.notify_one();
        }
        Pushed::Queued
    }

    /// Queues replayed items. They do not count against the limit: they are
    /// shared with history already, and a resuming client is behind by
    /// design, not because it is slow.
    pub fn push_replay(&self, items: impl IntoIterator<Item = Item>) {
        let mut st = self.state.lock();
        if st.closed.is_some() {
            return;
        }
        let was_empty = st.items.is_empty();
        st.items.extend(items);
        let now_empty = st.items.is_empty();
        drop(st);
        if was_empty && !now_empty {
            self.notify.notify_one();
        }
    }

    /// Waits until there is something to write or the outbox is closed,
    /// then takes all of it. Cancel-safe.
    pub async fn next_batch(&self) -> Batch {
        loop {
            if let Some(batch) = self.try_batch() {
                return batch;
            }
            self.notify.notified().await;
        }
    }

    /// Takes whatever is queued without waiting.
    pub fn try_batch(&self) -> Option<Batch> {
        let mut st = self.state.lock();
        if let Some(reason) = st.closed {
            return Some(Batch::Closed(reason));
        }
        if st.items.is_empty() {
            return None;
        }
        st.bytes = 0;
        Some(Batch::Items(std::mem::take(&mut st.items)))
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
    async fn replay_does_not_count_against_the_limit() {
        let o = Outbox::new(15);
        o.push_replay((1..=100).map(ev));
        assert_eq!(o.push(ev(101), 10), Pushed::Queued);
        assert_eq!(ids(o.next_batch().await).len(), 101);
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
