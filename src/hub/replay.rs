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

use std::sync::Arc;

use super::Channel;
use super::event::{Reset, SharedEvent};
use super::outbox::Item;
use super::position::Position;

/// Most bytes one pull takes from history (at least one event is taken).
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
    /// The next history position to send.
    next: u64,
    /// One past the last history position that belongs to the replay (what
    /// history held at subscribe time; later events are queued live).
    end: u64,
    /// Cluster mode: events this position covers are left out.
    skip: Option<Arc<Position>>,
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
            next,
            end,
            skip,
        }
    }

    /// True when nothing is left to send.
    pub(super) fn is_done(&self) -> bool {
        self.reset.is_none() && self.retained.is_none() && self.next >= self.end
    }

    /// The channel this replay belongs to.
    pub(super) fn channel(&self) -> &super::ChannelName {
        &self.channel.name
    }

    /// Takes the next items, up to about `budget` bytes (at least one
    /// event), and advances. Locks the channel: call it with no outbox
    /// lock held (lock order is channel, then outbox).
    pub(super) fn pull(&mut self, budget: usize, out: &mut Vec<Item>) {
        if let Some(r) = self.reset.take() {
            out.push(Item::Reset(r));
        }
        let mut bytes = 0;
        if let Some(r) = self.retained.take() {
            bytes += r.cost();
            out.push(Item::Event(r));
        }
        if self.next >= self.end {
            return;
        }
        let st = self.channel.state.lock();
        if self.next < st.front_seq {
            // Evicted before this slow reader got to it: say so.
            out.push(Item::Reset(Arc::new(Reset {
                channel: self.channel.name.clone(),
                reason: "events were dropped from history before this replay reached them"
                    .to_owned(),
            })));
            self.next = st.front_seq;
        }
        let kept_end = st.front_seq + st.history.len() as u64;
        let end = self.end.min(kept_end);
        while self.next < end && (bytes < budget || out.is_empty()) {
            // In range: front_seq <= next < front_seq + len.
            let Some(ev) = st.history.get((self.next - st.front_seq) as usize) else {
                break;
            };
            self.next += 1;
            if super::unseen(self.skip.as_deref(), ev) {
                bytes += ev.cost();
                out.push(Item::Event(ev.clone()));
            }
        }
        if self.next >= end {
            // History only shrinks from the front, so `end` is `self.end`
            // unless the channel was emptied: either way nothing is left.
            self.next = self.end;
        }
    }
}
