//! A replay still to be sent: a cursor into a channel's shared history.
//!
//! Resuming a subscriber used to copy every event it missed into its
//! outbox, and the writer then joined them all into one buffer: a client
//! that resumed on a long history and never read made herald hold that
//! history again, once per connection (1.2 GiB for 20 such clients on a
//! 57 MiB history). A replay is now a few words: the channel, the range
//! of history positions it still has to send, and what came before it (a
//! reset, the retained value). The writer pulls from it a bounded batch at
//! a time, under the channel's lock, so what a replay costs a connection is
//! one batch, whatever the history holds; a client that does not read
//! blocks its writer, and the write timeout ends it as it ends any slow
//! client.
//!
//! History positions (`seq`) count every event a channel has ever kept:
//! `front_seq` is the position of the oldest event still in history. An
//! event the cursor has not reached yet may be evicted (by size or TTL)
//! while the client reads slowly; the cursor then sends `herald.reset`
//! before what is left, so nothing is skipped silently.

use std::collections::VecDeque;
use std::sync::Arc;

use super::event::{Reset, SharedEvent};
use super::outbox::Item;
use super::position::Position;
use super::{Channel, ChannelState};

/// Most bytes one refill takes from history (at least one event is taken).
pub(super) const BATCH_BYTES: usize = 64 * 1024;

/// What a replay costs against a connection's queue limit while queued: a
/// flood of subscribes must not queue cursors without bound.
pub(super) const CURSOR_COST: usize = 128;

/// A cursor over what one subscription still has to replay.
#[derive(Debug)]
pub struct Replay {
    channel: Arc<Channel>,
    /// Sent first: the reset telling the client its position was not honoured.
    reset: Option<Arc<Reset>>,
    /// Sent after the reset: the retained value, when history lacks it.
    retained: Option<SharedEvent>,
    /// Taken from history, not sent yet (at most one refill, ~64 KiB).
    buf: VecDeque<Item>,
    /// The next history position to take.
    next: u64,
    /// One past the last history position that belongs to the replay (what
    /// history held at subscribe time; later events are queued live).
    end: u64,
    /// Cluster mode: events this position covers are left out.
    skip: Option<Arc<Position>>,
}

/// What a replay has next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Head {
    /// An item of this delivery order is ready ([`Replay::pop`]).
    Ready(u64),
    /// History must be read first ([`Replay::refill`]).
    Refill,
    /// Nothing is left.
    Done,
}

impl Replay {
    /// A cursor over history positions `next..end` of `channel`, after
    /// `reset` and `retained`.
    pub(super) fn new(
        channel: Arc<Channel>,
        reset: Option<Arc<Reset>>,
        retained: Option<SharedEvent>,
        next: u64,
        end: u64,
        skip: Option<Arc<Position>>,
    ) -> Self {
        Self {
            channel,
            reset,
            retained,
            buf: VecDeque::new(),
            next,
            end,
            skip,
        }
    }

    /// True when nothing is left to send.
    pub(super) fn is_done(&self) -> bool {
        self.head() == Head::Done
    }

    /// The channel this replay belongs to.
    pub(super) fn channel(&self) -> &Arc<Channel> {
        &self.channel
    }

    /// What comes next. A reset and the retained value come before
    /// anything else queued (order 0): they describe where the client
    /// starts, and an old retained id sent after newer events would make
    /// the client resume from before them.
    pub(super) fn head(&self) -> Head {
        if self.reset.is_some() || self.retained.is_some() {
            return Head::Ready(0);
        }
        match self.buf.front() {
            Some(item) => Head::Ready(item.order()),
            None if self.next < self.end => Head::Refill,
            None => Head::Done,
        }
    }

    /// Takes the next item, if one is ready.
    pub(super) fn pop(&mut self) -> Option<Item> {
        if let Some(r) = self.reset.take() {
            return Some(Item::Reset(r));
        }
        if let Some(r) = self.retained.take() {
            return Some(Item::Event(r));
        }
        self.buf.pop_front()
    }

    /// Reads the next events from the channel's history (`st`, locked by
    /// the caller: lock order is channel, then outbox), about
    /// [`BATCH_BYTES`] of them and at least one.
    pub(super) fn refill(&mut self, st: &ChannelState) {
        if self.next >= self.end {
            return;
        }
        if self.next < st.front_seq {
            // Evicted before this slow reader got to it: say so.
            self.buf.push_back(Item::Reset(Arc::new(Reset {
                channel: self.channel.name.clone(),
                reason: "events were dropped from history before this replay reached them"
                    .to_owned(),
            })));
            self.next = st.front_seq;
        }
        let kept_end = st.front_seq + st.history.len() as u64;
        let end = self.end.min(kept_end);
        let mut bytes = 0;
        while self.next < end && (bytes < BATCH_BYTES || self.buf.is_empty()) {
            // In range: front_seq <= next < front_seq + len.
            let Some(ev) = st.history.get((self.next - st.front_seq) as usize) else {
                break;
            };
            self.next += 1;
            if super::unseen(self.skip.as_deref(), ev) {
                bytes += ev.cost();
                self.buf.push_back(Item::Event(ev.clone()));
            }
        }
        if self.next >= end {
            // History only shrinks from the front, so `end` is `self.end`
            // unless the channel was emptied: either way nothing is left.
            self.next = self.end;
        }
    }
}
