//! A connection's bounded outbound queue.
//!
//! Publishers push into it without ever waiting; the connection's writer
//! takes everything queued at once and writes it together. When what is
//! queued passes the byte limit the outbox closes itself: the subscriber is
//! too slow, its writer ends the connection, and the client resumes from
//! history when it reconnects. Nobody else waits for it.
//!
//! Order: a connection receives events in delivery order (`Event::order`:
//! the id on a single node, apply order in a cluster), whatever channels
//! they come from, because one `Last-Event-ID` resumes them all. Live
//! events of one channel arrive in order (they are pushed under the
//! channel's lock); replays are cursors over history, merged with each
//! other and with live events by order; and on a single node an outbox of
//! several channels sends nothing above the sequencer's horizon (a publish
//! with a smaller id may still be on its way from another channel) and
//! sorts what arrives out of order.
//!
//! An idle outbox holds an empty `VecDeque` (no allocation) and a `Notify`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

use super::event::{Reset, SharedEvent};
use super::replay::{BATCH_BYTES, CURSOR_COST, Head, Replay};
use super::sequencer::Sequencer;

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

    /// Where it goes in delivery order (a reset goes first).
    pub fn order(&self) -> u64 {
        match self {
            Self::Event(e) => e.order,
            Self::Reset(_) => 0,
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
    /// Single node: where every publish is queued (see `sequencer`).
    sequencer: Option<Arc<Sequencer>>,
}

#[derive(Debug, Default)]
struct State {
    /// Live items, in delivery order.
    items: VecDeque<Item>,
    /// Replay cursors. `None` (the usual case), the writer takes `items`
    /// whole; boxed so that every outbox does not pay for it (fan-out
    /// touches them all).
    #[allow(clippy::box_collection)] // 8 bytes per outbox instead of 32
    replays: Option<Box<VecDeque<Cursor>>>,
    /// What `items` and `replays` cost against the limit.
    bytes: usize,
    closed: Option<Closed>,
    /// Channels registered on this outbox now.
    channels: u32,
    /// It has had several channels: what it sends waits for the horizon.
    mixed: bool,
    /// Names the next cursor (the writer finds it again after a refill).
    next_cursor: u32,
}

#[derive(Debug)]
struct Cursor {
    key: u32,
    replay: Replay,
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

    fn take_live(&mut self, n: usize) -> VecDeque<Item> {
        if n == self.items.len() {
            self.bytes = self
                .bytes
                .saturating_sub(self.items.iter().map(Item::cost).sum());
            return std::mem::take(&mut self.items);
        }
        let taken: VecDeque<Item> = self.items.drain(..n).collect();
        self.bytes = self
            .bytes
            .saturating_sub(taken.iter().map(Item::cost).sum());
        taken
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

/// What is ready for the writer now.
enum Poll {
    Ready(Batch),
    /// Nothing queued.
    Empty,
    /// Something is queued, but a publish with a smaller id is still in
    /// flight: wait for it (it takes microseconds), then look again.
    Held,
}

impl Outbox {
    /// An outbox that closes once more than `limit` bytes are queued.
    pub fn new(limit: usize) -> Arc<Self> {
        Self::sequenced(limit, None)
    }

    /// An outbox that, once it has several channels, sends nothing above
    /// `sequencer`'s horizon (single node; `None` in a cluster, where the
    /// apply lock orders every queue).
    pub(super) fn sequenced(limit: usize, sequencer: Option<Arc<Sequencer>>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            limit,
            sequencer,
        })
    }

    /// Counts a channel registered on this outbox.
    pub(super) fn attach(&self) {
        let mut st = self.state.lock();
        st.channels += 1;
        if st.channels > 1 {
            st.mixed = true;
        }
    }

    /// A channel's subscription ended: forgets the replays still queued
    /// for it. Live items of that channel stay; writers skip them.
    pub(super) fn detach(&self, channel: &Arc<super::Channel>) {
        let mut st = self.state.lock();
        st.channels = st.channels.saturating_sub(1);
        let Some(replays) = st.replays.as_mut() else {
            return;
        };
        let before = replays.len();
        replays.retain(|c| !Arc::ptr_eq(c.replay.channel(), channel));
        let dropped = before - replays.len();
        if replays.is_empty() {
            st.replays = None;
        }
        st.bytes = st.bytes.saturating_sub(dropped * CURSOR_COST);
    }

    /// Queues a live item that costs `cost` bytes against the limit
    /// (`cost` must be [`Item::cost`]).
    pub fn push(&self, item: Item, cost: usize) -> Pushed {
        self.enqueue(cost, |st| {
            let order = item.order();
            // One channel's events arrive in order (pushed under its lock);
            // only an outbox of several channels can see two publishes
            // cross on their way (single node), so only it looks.
            if st.mixed && st.items.back().is_some_and(|b| b.order() > order) {
                let at = st.items.partition_point(|i| i.order() <= order);
                st.items.insert(at, item);
            } else {
                st.items.push_back(item);
            }
        })
    }

    /// Queues a replay. The events it will read are shared with history
    /// and are not counted; the cursor itself costs a small constant, so a
    /// client that subscribes again and again without reading is cut off
    /// like any slow one.
    pub(super) fn push_replay(&self, replay: Replay) -> Pushed {
        self.enqueue(CURSOR_COST, |st| {
            let key = st.next_cursor;
            st.next_cursor = st.next_cursor.wrapping_add(1);
            st.replays
                .get_or_insert_default()
                .push_back(Cursor { key, replay });
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

    /// Waits until there is something to write or the outbox is closed,
    /// then takes it. Cancel-safe.
    pub async fn next_batch(&self) -> Batch {
        let mut held = 0u32;
        loop {
            match self.poll() {
                Poll::Ready(batch) => return batch,
                Poll::Empty => {
                    held = 0;
                    self.notify.notified().await;
                }
                // The publish in flight runs without awaiting on another
                // thread; give it the CPU, then poll at a short interval.
                Poll::Held if held < 64 => {
                    held += 1;
                    tokio::task::yield_now().await;
                }
                Poll::Held => tokio::time::sleep(Duration::from_micros(200)).await,
            }
        }
    }

    /// Takes what is ready without waiting: every live item queued (up to
    /// the horizon, for an outbox of several channels), or, with replays
    /// queued, about 64 KiB of replayed and live items merged in order
    /// (the rest stays queued for the next call).
    #[inline]
    pub fn try_batch(&self) -> Option<Batch> {
        match self.poll() {
            Poll::Ready(batch) => Some(batch),
            Poll::Empty | Poll::Held => None,
        }
    }

    /// The order up to which items may be sent now.
    fn horizon(&self, st: &State) -> u64 {
        match &self.sequencer {
            Some(s) if st.mixed => s.horizon(),
            _ => u64::MAX,
        }
    }

    #[inline]
    fn poll(&self) -> Poll {
        {
            // The usual case, as cheap as a queue with no replays: every
            // delivery of a fan-out passes here.
            let mut st = self.state.lock();
            if st.replays.is_none() {
                if let Some(reason) = st.closed {
                    return Poll::Ready(Batch::Closed(reason));
                }
                if st.items.is_empty() {
                    return Poll::Empty;
                }
                if !st.mixed {
                    st.bytes = 0;
                    return Poll::Ready(Batch::Items(std::mem::take(&mut st.items)));
                }
                let horizon = self.horizon(&st);
                let n = st.items.partition_point(|i| i.order() <= horizon);
                if n == 0 {
                    return Poll::Held;
                }
                return Poll::Ready(Batch::Items(st.take_live(n)));
            }
        }
        self.poll_replaying()
    }

    /// [`Outbox::poll`] with replays queued: a merge, by delivery order, of
    /// live items and every cursor, refilling a cursor from its channel's
    /// history when it runs dry.
    #[inline(never)]
    fn poll_replaying(&self) -> Poll {
        let mut out = VecDeque::new();
        let mut bytes = 0;
        let mut held = false;
        loop {
            let mut st = self.state.lock();
            if let Some(reason) = st.closed {
                return Poll::Ready(Batch::Closed(reason));
            }
            let horizon = self.horizon(&st);
            let refill = merge(&mut st, horizon, &mut out, &mut bytes, &mut held);
            let Some((channel, key)) = refill else {
                drop(st);
                return match out.is_empty() {
                    false => Poll::Ready(Batch::Items(out)),
                    true if held => Poll::Held,
                    true => Poll::Empty,
                };
            };
            // Lock order is channel, then outbox.
            drop(st);
            let cs = channel.state.lock();
            let mut st = self.state.lock();
            if let Some(c) = st
                .replays
                .as_mut()
                .and_then(|r| r.iter_mut().find(|c| c.key == key))
            {
                c.replay.refill(&cs);
            }
        }
    }

    /// True once the outbox has been closed.
    pub fn is_closed(&self) -> bool {
        self.state.lock().closed.is_some()
    }
}

/// Moves items from `st` to `out` in delivery order, up to the horizon and
/// about [`BATCH_BYTES`]. Returns the cursor to refill first, if one ran
/// dry (its next item is unknown, so nothing can be sent past it).
fn merge(
    st: &mut State,
    horizon: u64,
    out: &mut VecDeque<Item>,
    bytes: &mut usize,
    held: &mut bool,
) -> Option<(Arc<super::Channel>, u32)> {
    loop {
        if *bytes >= BATCH_BYTES {
            return None;
        }
        let State {
            items,
            replays,
            bytes: queued,
            ..
        } = st;
        let Some(cursors) = replays.as_mut() else {
            // Every replay is done: what is live follows.
            let n = items.partition_point(|i| i.order() <= horizon);
            *held |= n < items.len();
            let taken = st.take_live(n);
            out.extend(taken);
            return None;
        };
        // The smallest head: `None` is the live queue.
        let mut best: Option<(u64, Option<usize>)> = items.front().map(|i| (i.order(), None));
        let mut k = 0;
        while k < cursors.len() {
            match cursors[k].replay.head() {
                Head::Ready(order) => {
                    if best.is_none_or(|(b, _)| order < b) {
                        best = Some((order, Some(k)));
                    }
                    k += 1;
                }
                Head::Refill => {
                    let c = &cursors[k];
                    return Some((c.replay.channel().clone(), c.key));
                }
                Head::Done => {
                    cursors.remove(k);
                    *queued = queued.saturating_sub(CURSOR_COST);
                }
            }
        }
        if cursors.is_empty() {
            *replays = None;
        }
        let item = match best {
            None => return None,
            Some((order, _)) if order > horizon => {
                *held = true;
                return None;
            }
            Some((_, None)) => {
                let item = items.pop_front()?;
                *queued = queued.saturating_sub(item.cost());
                item
            }
            Some((_, Some(k))) => replays.as_mut()?.get_mut(k)?.replay.pop()?,
        };
        *bytes += item.cost();
        out.push_back(item);
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
