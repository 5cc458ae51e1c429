//! Gossip membership (SWIM, by foca) over UDP: nodes announce themselves
//! to seeds, probe each other, and agree on who is alive. Each member's
//! identity carries its internal (peer) address, which is what the mesh
//! follows.
//!
//! With a secret, every datagram is sealed with ChaCha20-Poly1305 (key =
//! SHA-256 of the secret, a random nonce per datagram): gossip from
//! outside the cluster is neither readable nor accepted.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use foca::{
    AccumulatingRuntime, Config, Foca, Identity, NoCustomBroadcast, OwnedNotification,
    PostcardCodec, Timer,
};

type Swim = Foca<Member, PostcardCodec, rand_gossip::rngs::StdRng, NoCustomBroadcast>;
use rand_gossip::SeedableRng;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::SecureRandom;
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A member: where it gossips, where its peers reach it, and a counter
/// that lets a restarted node win over its old self.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Member {
    gossip: SocketAddr,
    internal: SocketAddr,
    bump: u16,
}

impl Identity for Member {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(Self {
            bump: self.bump.wrapping_add(1),
            ..*self
        })
    }

    fn addr(&self) -> SocketAddr {
        self.gossip
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        // Wrapping comparison: the newer incarnation wins.
        self.bump.wrapping_sub(adversary.bump) < u16::MAX / 2
    }
}

/// Seals and opens datagrams with the cluster's secret (or passes them
/// through without one).
pub(super) struct Seal(Option<LessSafeKey>);

const NONCE: usize = 12;

impl Seal {
    pub(super) fn new(secret: Option<&str>) -> Self {
        Self(secret.and_then(|s| {
            let key = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
            UnboundKey::new(&aead::CHACHA20_POLY1305, key.as_ref())
                .ok()
                .map(LessSafeKey::new)
        }))
    }

    fn seal(&self, data: &[u8]) -> Option<Vec<u8>> {
        let Some(key) = &self.0 else {
            return Some(data.to_vec());
        };
        let mut nonce = [0u8; NONCE];
        ring::rand::SystemRandom::new().fill(&mut nonce).ok()?;
        let mut out = data.to_vec();
        key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut out)
            .ok()?;
        let mut packet = nonce.to_vec();
        packet.extend_from_slice(&out);
        Some(packet)
    }

    fn open(&self, packet: &mut [u8]) -> Option<Vec<u8>> {
        let Some(key) = &self.0 else {
            return Some(packet.to_vec());
        };
        if packet.len() < NONCE {
            return None;
        }
        let (nonce, body) = packet.split_at_mut(NONCE);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        key.open_in_place(nonce, Aad::empty(), body)
            .ok()
            .map(|plain| plain.to_vec())
    }
}

/// Runs membership until `stop`; sends the internal addresses of every
/// alive member (this node included) whenever they change.
pub(super) async fn run(
    socket: UdpSocket,
    advertise: SocketAddr,
    internal: SocketAddr,
    seeds: Vec<SocketAddr>,
    seal: Seal,
    tx: watch::Sender<Option<Vec<String>>>,
    stop: CancellationToken,
) {
    let me = Member {
        gossip: advertise,
        internal,
        bump: u16::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() % 60_000),
        )
        .unwrap_or(0),
    };
    let mut config = Config::new_lan(NonZeroU32::MIN.saturating_add(15));
    // A restarted node comes back under a new identity at once.
    config.probe_period = Duration::from_millis(500);
    config.probe_rtt = Duration::from_millis(200);
    let mut foca = Foca::new(
        me,
        config,
        rand_gossip::rngs::StdRng::from_rng(&mut rand_gossip::rng()),
        PostcardCodec,
    );
    let mut rt = AccumulatingRuntime::new();
    // Timers live in this set: they end with the loop.
    let mut timers: tokio::task::JoinSet<Timer<Member>> = tokio::task::JoinSet::new();
    let seeds: Vec<SocketAddr> = seeds.into_iter().filter(|s| *s != advertise).collect();
    let knock = |foca: &mut Swim, rt: &mut AccumulatingRuntime<Member>| {
        for seed in &seeds {
            let target = Member {
                gossip: *seed,
                internal: *seed,
                bump: 0,
            };
            let _ = foca.announce(target, &mut *rt);
        }
    };
    knock(&mut foca, &mut rt);
    let mut buf = vec![0u8; 65_536];
    let mut announce = tokio::time::interval(Duration::from_secs(2));
    let publish = |foca: &Swim| {
        let mut list: Vec<String> = foca
            .iter_members()
            .map(|m| m.id().internal.to_string())
            .collect();
        list.push(internal.to_string());
        list.sort();
        list.dedup();
        tx.send_if_modified(|cur| {
            let changed = cur.as_ref() != Some(&list);
            if changed {
                *cur = Some(list);
            }
            changed
        });
    };
    publish(&foca);
    loop {
        // Carry out what foca asked for.
        while let Some((to, data)) = rt.to_send() {
            if let Some(p) = seal.seal(&data) {
                let _ = socket.send_to(&p, to.gossip).await;
            }
        }
        while let Some((after, timer)) = rt.to_schedule() {
            timers.spawn(async move {
                tokio::time::sleep(after).await;
                timer
            });
        }
        let mut changed = false;
        while let Some(n) = rt.to_notify() {
            changed |= matches!(
                n,
                OwnedNotification::MemberUp(_)
                    | OwnedNotification::MemberDown(_)
                    | OwnedNotification::Rename(..)
            );
        }
        if changed {
            publish(&foca);
        }
        tokio::select! {
            () = stop.cancelled() => {
                let _ = foca.leave_cluster(&mut rt);
                while let Some((to, data)) = rt.to_send() {
                    if let Some(p) = seal.seal(&data) {
                        let _ = socket.send_to(&p, to.gossip).await;
                    }
                }
                return;
            }
            r = socket.recv_from(&mut buf) => {
                if let Ok((n, _)) = r
                    && let Some(data) = seal.open(&mut buf[..n])
                    && let Err(e) = foca.handle_data(&data, &mut rt)
                {
                    tracing::debug!(error = %e, "ignoring a gossip datagram");
                }
            }
            Some(Ok(t)) = timers.join_next(), if !timers.is_empty() => {
                let _ = foca.handle_timer(t, &mut rt);
            }
            _ = announce.tick() => {
                // Until someone answers, keep knocking on the seeds.
                if foca.num_members() == 0 {
                    knock(&mut foca, &mut rt);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sealed_datagrams_open_only_with_the_same_secret() {
        let a = Seal::new(Some("a-long-enough-secret"));
        let b = Seal::new(Some("another-long-secret"));
        let mut p = a.seal(b"hello").unwrap();
        assert_ne!(&p[NONCE..NONCE + 5], b"hello", "not in clear");
        assert!(b.open(&mut p.clone()).is_none());
        assert_eq!(a.open(&mut p).unwrap(), b"hello");
        let mut tampered = a.seal(b"hello").unwrap();
        tampered[NONCE] ^= 1;
        assert!(a.open(&mut tampered).is_none());
        assert!(a.open(&mut [1, 2, 3]).is_none());
        let plain = Seal::new(None);
        assert_eq!(plain.open(&mut plain.seal(b"x").unwrap()).unwrap(), b"x");
    }
}
