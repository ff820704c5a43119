//! Sender keys: forward secrecy for group messages (issue 22).
//!
//! In each key epoch of a group, each member who sends has a chain of its own: a random
//! 256-bit chain key, moved forward with every message by the double ratchet's symmetric step
//! ([`ratchet::chain_step`]: the next chain key, and this message's key). Before its first
//! message of an epoch, a sender hands its chain key to every other verified member of that
//! epoch in a direct message (kind `SenderKey`), sealed in their pairwise ratchet. A member
//! keeps each sender's chain at the next message it expects, and the keys of messages it
//! skipped (at most [`MAX_SKIP`] ahead, [`MAX_KEPT`] per chain, none older than
//! [`ratchet::KEPT_FOR_MS`]); a key used is deleted, and the key of a message opened but not
//! yet shown is held until it is, as for direct messages. Every membership change starts a
//! new epoch, so new chains.
//!
//! ```text
//! FASTCHAT_HOME/USER/senderkeys/OWNER+NAME   the chains of group OWNER/NAME, sealed
//! ```
//!
//! The file is sealed under a key derived from the identity, bound to the user and the group,
//! written atomically, and changed only under the user's state lock. A sender saves its
//! chain before its message leaves.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::keystore::{Keystore, SealedFolder, StateLock};
use crate::crypto::ratchet;
use crate::crypto::{Identity, PairKey};
use crate::error::{Error, Result};

/// A chain key or a message key.
pub type Key = [u8; 32];

/// The most messages of one chain a message may be ahead of the next one expected.
pub const MAX_SKIP: u32 = 2000;

/// The most skipped (or held) message keys kept per chain; past it, the oldest go first.
pub const MAX_KEPT: usize = 2000;

/// Chains kept per group: the newest epochs' (older ones go first).
pub const MAX_CHAINS: usize = 256;

/// A message key kept for a message skipped, or opened and not yet shown.
#[derive(Clone, Serialize, Deserialize)]
struct Kept {
    n: u32,
    key: Key,
    /// When it was kept (ms since the epoch).
    at: i64,
    /// Opened once already (held until shown), rather than skipped.
    opened: bool,
}

/// One sender's chain in one epoch.
#[derive(Clone, Serialize, Deserialize)]
struct Chain {
    epoch: u64,
    sender: String,
    /// The chain key of message `next`.
    key: Key,
    next: u32,
    kept: VecDeque<Kept>,
    /// The key the sender's tags for us are made with.
    mac: Key,
}

/// Our own chain in one epoch, and who has it.
#[derive(Clone, Serialize, Deserialize)]
struct Own {
    epoch: u64,
    key: Key,
    next: u32,
    /// Members we handed the chain key to.
    given: Vec<String>,
    /// Each member's authentication key (made before it is handed out).
    macs: Vec<(String, Key)>,
}

/// The chains of one group.
#[derive(Default, Serialize, Deserialize)]
pub struct GroupChains {
    own: Vec<Own>,
    theirs: Vec<Chain>,
}

impl GroupChains {
    /// Our chain of `epoch` (made now if there is none): its key at the next message, that
    /// message's number, and the members who have it.
    pub fn sending(&mut self, epoch: u64) -> Result<(Key, u32, Vec<String>)> {
        if let Some(own) = self.own.iter().find(|o| o.epoch == epoch) {
            return Ok((own.key, own.next, own.given.clone()));
        }
        let key = PairKey::random()?.0;
        self.own.push(Own {
            epoch,
            key,
            next: 0,
            given: Vec::new(),
            macs: Vec::new(),
        });
        while self.own.len() > MAX_CHAINS {
            self.own.remove(0);
        }
        Ok((key, 0, Vec::new()))
    }

    /// `member`'s authentication key in our chain of `epoch` (made now if there is none; the
    /// chain must exist: [`GroupChains::sending`]).
    pub fn mac_for(&mut self, epoch: u64, member: &str) -> Result<Key> {
        let own = self
            .own
            .iter_mut()
            .find(|o| o.epoch == epoch)
            .ok_or_else(|| Error::Local(format!("no sending chain for epoch {epoch}")))?;
        if let Some((_, k)) = own.macs.iter().find(|(m, _)| m == member) {
            return Ok(*k);
        }
        let key = PairKey::random()?.0;
        own.macs.push((member.to_string(), key));
        Ok(key)
    }

    /// The authentication keys of `members` (in that order) in our chain of `epoch`; `None`
    /// if one of them has none.
    pub fn macs(&self, epoch: u64, members: &[String]) -> Option<Vec<Key>> {
        let own = self.own.iter().find(|o| o.epoch == epoch)?;
        members
            .iter()
            .map(|m| own.macs.iter().find(|(n, _)| n == m).map(|(_, k)| *k))
            .collect()
    }

    /// The key `sender`'s tags for us in `epoch` are made with, if we have their chain.
    pub fn mac_of(&self, epoch: u64, sender: &str) -> Option<Key> {
        self.theirs
            .iter()
            .find(|c| c.epoch == epoch && c.sender == sender)
            .map(|c| c.mac)
    }

    /// Records that `member` has our chain key of `epoch`.
    pub fn given(&mut self, epoch: u64, member: &str) {
        if let Some(own) = self.own.iter_mut().find(|o| o.epoch == epoch) {
            if !own.given.iter().any(|m| m == member) {
                own.given.push(member.to_string());
            }
        }
    }

    /// The key of our next message in `epoch`, and its number; the chain moves on (save before
    /// the message leaves).
    pub fn next_key(&mut self, epoch: u64) -> Result<(u32, Key)> {
        let own = self
            .own
            .iter_mut()
            .find(|o| o.epoch == epoch)
            .ok_or_else(|| Error::Local(format!("no sending chain for epoch {epoch}")))?;
        let (next, key) = ratchet::chain_step(&own.key)?;
        let n = own.next;
        own.key = next;
        own.next = n
            .checked_add(1)
            .ok_or_else(|| Error::Local("sending chain exhausted".into()))?;
        Ok((n, key))
    }

    /// Installs `sender`'s chain of `epoch` at message `n`, with the key of their tags for
    /// us, unless we have it already (a chain key arriving twice must not move a chain back).
    /// Says whether it was new.
    pub fn install(&mut self, epoch: u64, sender: &str, key: Key, n: u32, mac: Key) -> bool {
        if self
            .theirs
            .iter()
            .any(|c| c.epoch == epoch && c.sender == sender)
        {
            return false;
        }
        self.theirs.push(Chain {
            epoch,
            sender: sender.to_string(),
            key,
            next: n,
            kept: VecDeque::new(),
            mac,
        });
        while self.theirs.len() > MAX_CHAINS {
            let oldest = self
                .theirs
                .iter()
                .enumerate()
                .min_by_key(|(_, c)| c.epoch)
                .map(|(i, _)| i)
                .expect("not empty");
            self.theirs.remove(oldest);
        }
        true
    }

    /// The key of `sender`'s message `n` of `epoch`, at `now_ms`: held if it was opened
    /// before, kept if it was skipped, or the chain's next (skipping ahead). The key is held
    /// until [`GroupChains::release`]; the chain moves on past it. On failure nothing moves.
    pub fn receive(&mut self, epoch: u64, sender: &str, n: u32, now_ms: i64) -> Result<Key> {
        let chain = self
            .theirs
            .iter_mut()
            .find(|c| c.epoch == epoch && c.sender == sender)
            .ok_or_else(|| {
                Error::Integrity(format!(
                    "no sender key from {sender} for key epoch {epoch} (it comes as a direct \
                     message before their first group message of the epoch)"
                ))
            })?;
        chain.kept.retain(|k| now_ms - k.at <= ratchet::KEPT_FOR_MS);
        if let Some(k) = chain.kept.iter_mut().find(|k| k.n == n) {
            k.opened = true;
            k.at = now_ms;
            return Ok(k.key);
        }
        if n < chain.next {
            return Err(Error::Integrity(format!(
                "message {n} of {sender}'s chain was received before, or is too old to open"
            )));
        }
        if n - chain.next > MAX_SKIP {
            return Err(Error::Integrity(format!(
                "a message {} ahead of the last one received from {sender} (at most {MAX_SKIP})",
                n - chain.next
            )));
        }
        let after = n
            .checked_add(1)
            .ok_or_else(|| Error::Integrity(format!("{sender}'s chain is exhausted")))?;
        let mut key = chain.key;
        let mut at = chain.next;
        let mut kept = Vec::new();
        loop {
            let (next, message) = ratchet::chain_step(&key)?;
            key = next;
            kept.push(Kept {
                n: at,
                key: message,
                at: now_ms,
                opened: at == n,
            });
            if at == n {
                break;
            }
            at += 1;
        }
        let found = kept.last().map(|k| k.key).expect("at least one step");
        chain.key = key;
        chain.next = after;
        chain.kept.extend(kept);
        while chain.kept.len() > MAX_KEPT {
            chain.kept.pop_front();
        }
        Ok(found)
    }

    /// Deletes the held key of `sender`'s message `n` of `epoch` (shown, or not to be shown);
    /// says whether there was one.
    pub fn release(&mut self, epoch: u64, sender: &str, n: u32) -> bool {
        let Some(chain) = self
            .theirs
            .iter_mut()
            .find(|c| c.epoch == epoch && c.sender == sender)
        else {
            return false;
        };
        let before = chain.kept.len();
        chain.kept.retain(|k| !(k.n == n && k.opened));
        chain.kept.len() != before
    }

    /// Forgets the group's chains (we left it, or were removed).
    pub fn clear(&mut self) {
        self.own.clear();
        self.theirs.clear();
    }
}

/// The user's sender-key files, one per group.
pub struct SenderKeys {
    folder: SealedFolder,
}

/// The sender-key files, with the user's state lock held.
pub struct Locked<'a> {
    keys: &'a SenderKeys,
    store: &'a Keystore,
    _lock: StateLock,
}

impl SenderKeys {
    /// The sender keys of `store`'s user, sealed under a key derived from `identity`.
    pub fn new(store: &Keystore, identity: &Identity) -> Result<SenderKeys> {
        Ok(SenderKeys {
            folder: SealedFolder::new(store, identity, "senderkeys")?,
        })
    }

    /// Takes the user's state lock.
    pub fn lock<'a>(&'a self, store: &'a Keystore) -> Result<Locked<'a>> {
        Ok(Locked {
            keys: self,
            store,
            _lock: store.lock_state()?,
        })
    }
}

impl Locked<'_> {
    /// The chains of `group` (none yet if there is no file).
    pub fn load(&self, group: &str) -> Result<GroupChains> {
        Ok(self
            .keys
            .folder
            .read(self.store, group)?
            .unwrap_or_default())
    }

    /// Seals and writes the chains of `group`, atomically.
    pub fn save(&self, group: &str, chains: &GroupChains) -> Result<()> {
        self.keys.folder.write(self.store, group, chains)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_opens_each_message_once_in_any_order_and_never_moves_back() -> Result<()> {
        let mut alice = GroupChains::default();
        let (key, 0, given) = alice.sending(7)? else {
            panic!("a new chain starts at 0");
        };
        assert!(given.is_empty());
        alice.given(7, "bob");
        let sent: Vec<(u32, Key)> = (0..50).map(|_| alice.next_key(7)).collect::<Result<_>>()?;
        let (_, next, given) = alice.sending(7)?;
        assert_eq!((next, given), (50, vec!["bob".to_string()]));
        let mut bob = GroupChains::default();
        let mac = alice.mac_for(7, "bob")?;
        assert_eq!(alice.mac_for(7, "bob")?, mac, "one per member");
        assert_ne!(alice.mac_for(7, "carol")?, mac);
        assert_eq!(
            alice.macs(7, &["carol".into(), "bob".into()]),
            Some(vec![alice.mac_for(7, "carol")?, mac])
        );
        assert_eq!(alice.macs(7, &["dave".into()]), None);
        assert!(bob.install(7, "alice", key, 0, mac));
        assert_eq!(bob.mac_of(7, "alice"), Some(mac));
        // A chain key arriving again does not reset the chain.
        assert!(!bob.install(7, "alice", [0; 32], 0, [0; 32]));
        assert_eq!(bob.mac_of(7, "alice"), Some(mac));
        for &(n, k) in sent.iter().rev() {
            assert_eq!(bob.receive(7, "alice", n, 0)?, k, "message {n}");
            // Held until shown: it opens again, then is gone.
            assert_eq!(bob.receive(7, "alice", n, 0)?, k);
            assert!(bob.release(7, "alice", n));
            assert!(bob.receive(7, "alice", n, 0).is_err(), "message {n} again");
        }
        assert!(bob.receive(7, "alice", 50 + MAX_SKIP + 1, 0).is_err());
        assert!(bob.receive(7, "alice", u32::MAX, 0).is_err(), "no overflow");
        assert!(bob.receive(8, "alice", 0, 0).is_err(), "another epoch");
        assert!(bob.receive(7, "carol", 0, 0).is_err(), "another sender");
        Ok(())
    }

    #[test]
    fn skipped_keys_are_bounded_in_number_and_age() -> Result<()> {
        let mut bob = GroupChains::default();
        bob.install(1, "alice", [9; 32], 0, [8; 32]);
        bob.receive(1, "alice", MAX_SKIP, 0)?;
        assert!(bob.theirs[0].kept.len() <= MAX_KEPT);
        let late = ratchet::KEPT_FOR_MS + 1;
        assert!(bob.receive(1, "alice", MAX_SKIP - 1, late).is_err());
        Ok(())
    }
}
