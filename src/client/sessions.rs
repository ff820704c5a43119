//! The user's conversations with forward secrecy (issue 22): a double ratchet per peer
//! ([`crate::crypto::ratchet`]), started by the key agreement ([`crate::crypto::x3dh`]), in
//! `FASTCHAT_HOME/USER/sessions/PEER`.
//!
//! * Each file is sealed (AES-256-GCM) under a key derived from the identity, bound to the
//!   user and the peer, and written atomically (a temporary file, synced, renamed).
//! * It changes only under the user's state lock ([`Keystore::lock_state`]), held from load to
//!   save: a `fastchat send` and a running chat of the same user never lose each other's
//!   ratchet steps. A sender saves *before* its message leaves: a crash after the save loses
//!   no conversation and the next message takes the next key (a key is never used twice); a
//!   crash before it sent nothing.
//! * A peer may have a few sessions at once: when both start one before either hears from the
//!   other, each side answers in the session it heard last, and both stay open for what is
//!   still under way. The most recently used sends; at most [`MAX_SESSIONS`] are kept.
//! * A received message's key is *held* until the client is done with the message (shown, or
//!   found shown before): a message that stays queued on the server (peeked at, a file offered
//!   for later) opens again with it. Held keys are the only message keys on disk besides the
//!   ratchet's own skipped ones: at most [`MAX_HELD`] per peer, none older than
//!   [`ratchet::KEPT_FOR_MS`].

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use super::keystore::{Keystore, SealedFolder, StateLock};
use crate::crypto::ratchet::{self, Header, MessageKey, Ratchet};
use crate::crypto::x3dh::Init;
use crate::crypto::{sha256, Identity};
use crate::error::Result;

/// Sessions kept per peer (the least recently used goes first).
pub const MAX_SESSIONS: usize = 4;

/// Message keys held per peer for messages not done with (the oldest go first).
pub const MAX_HELD: usize = 1000;

/// A session's id: the first 8 bytes of SHA-256 of its initiator's ephemeral key, which both
/// sides know from the key agreement.
pub fn session_id(init: &Init) -> Result<u64> {
    let mut m = b"fastchat/session/v1".to_vec();
    m.extend_from_slice(&init.ephemeral);
    let digest = sha256(&m)?;
    let mut id = [0u8; 8];
    id.copy_from_slice(&digest[..8]);
    Ok(u64::from_be_bytes(id))
}

/// One double ratchet with a peer.
#[derive(Debug, Serialize, Deserialize)]
pub struct Session {
    /// Its id (see [`session_id`]).
    pub id: u64,
    /// The ratchet.
    pub ratchet: Ratchet,
    /// The key agreement's message, while we started the session and have not heard back in
    /// it: sent with every message, so that the peer can start its side from whichever
    /// arrives first.
    pub init: Option<Init>,
}

/// Which received message a held key opens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldId {
    /// The session.
    pub session: u64,
    /// The sender's ratchet key in the message's header.
    pub dh: ByteBuf,
    /// The message's number in its chain.
    pub n: u32,
}

impl HeldId {
    /// The id of the message `header` heads in `session`.
    pub fn of(session: u64, header: &Header) -> HeldId {
        HeldId {
            session,
            dh: ByteBuf::from(header.dh.clone()),
            n: header.n,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Held {
    id: HeldId,
    key: MessageKey,
    /// When it was held (milliseconds since the epoch).
    at: i64,
}

/// Everything kept for one peer.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Conversation {
    /// The least recently used first; the last one that can send sends.
    sessions: Vec<Session>,
    held: VecDeque<Held>,
}

impl Conversation {
    /// The session our next message goes in: the most recently used that can send.
    pub fn sender(&mut self) -> Option<&mut Session> {
        self.sessions
            .iter_mut()
            .rev()
            .find(|s| s.ratchet.can_send())
    }

    /// Session `id`, if kept.
    pub fn session(&mut self, id: u64) -> Option<&mut Session> {
        self.sessions.iter_mut().find(|s| s.id == id)
    }

    /// Makes session `id` the most recently used (the one that sends).
    pub fn touch(&mut self, id: u64) {
        if let Some(i) = self.sessions.iter().position(|s| s.id == id) {
            let s = self.sessions.remove(i);
            self.sessions.push(s);
        }
    }

    /// Adds a session as the most recently used, dropping the least recently used beyond
    /// [`MAX_SESSIONS`].
    pub fn add(&mut self, session: Session) {
        self.sessions.retain(|s| s.id != session.id);
        self.sessions.push(session);
        while self.sessions.len() > MAX_SESSIONS {
            self.sessions.remove(0);
        }
    }

    /// How many sessions are kept.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Holds the key of a message just opened, until [`Conversation::release`].
    pub fn hold(&mut self, id: HeldId, key: MessageKey, now_ms: i64) {
        self.held.retain(|h| h.id != id);
        self.held.push_back(Held {
            id,
            key,
            at: now_ms,
        });
        while self.held.len() > MAX_HELD {
            self.held.pop_front();
        }
    }

    /// The held key of message `id`, if any (none older than the ratchet keeps skipped keys).
    pub fn held(&self, id: &HeldId, now_ms: i64) -> Option<&MessageKey> {
        self.held
            .iter()
            .find(|h| h.id == *id && now_ms - h.at <= ratchet::KEPT_FOR_MS)
            .map(|h| &h.key)
    }

    /// Deletes the held key of message `id`; says whether there was one.
    pub fn release(&mut self, id: &HeldId) -> bool {
        let before = self.held.len();
        self.held.retain(|h| h.id != *id);
        self.held.len() != before
    }

    /// Message keys held.
    pub fn held_count(&self) -> usize {
        self.held.len()
    }

    fn expire(&mut self, now_ms: i64) {
        self.held.retain(|h| now_ms - h.at <= ratchet::KEPT_FOR_MS);
    }
}

/// The user's sessions folder, a file per peer; every load and save happens under a
/// [`Locked`].
pub struct Sessions {
    folder: SealedFolder,
}

/// The sessions, with the user's state lock held.
pub struct Locked<'a> {
    sessions: &'a Sessions,
    store: &'a Keystore,
    _lock: StateLock,
}

impl Sessions {
    /// The sessions of `store`'s user, sealed under a key derived from `identity`.
    pub fn new(store: &Keystore, identity: &Identity) -> Result<Sessions> {
        Ok(Sessions {
            folder: SealedFolder::new(store, identity, "sessions")?,
        })
    }

    /// Takes the user's state lock (waiting for another process of the user).
    pub fn lock<'a>(&'a self, store: &'a Keystore) -> Result<Locked<'a>> {
        Ok(Locked {
            sessions: self,
            store,
            _lock: store.lock_state()?,
        })
    }
}

impl Locked<'_> {
    /// What is kept for `peer` (nothing yet if there is no file).
    pub fn load(&self, peer: &str, now_ms: i64) -> Result<Conversation> {
        let mut conversation: Conversation = self
            .sessions
            .folder
            .read(self.store, peer)?
            .unwrap_or_default();
        conversation.expire(now_ms);
        Ok(conversation)
    }

    /// Seals and writes what is kept for `peer`, atomically.
    pub fn save(&self, peer: &str, conversation: &Conversation) -> Result<()> {
        self.sessions.folder.write(self.store, peer, conversation)
    }

    /// Forgets every session with `peer` (their identity changed: start again).
    pub fn forget(&self, peer: &str) -> Result<()> {
        self.sessions.folder.remove(peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::ratchet::x25519_pair;

    fn session(id: u64) -> Result<Session> {
        let (private, _) = x25519_pair()?;
        Ok(Session {
            id,
            ratchet: Ratchet::responder(&[7u8; 32], &private)?,
            init: None,
        })
    }

    #[test]
    fn files_are_sealed_bound_to_their_peer_and_replaced_whole() -> Result<()> {
        let home = tempfile::tempdir()?;
        let store = Keystore::new(home.path(), "alice");
        let identity = Identity::generate()?;
        let sessions = Sessions::new(&store, &identity)?;
        let locked = sessions.lock(&store)?;
        let mut c = locked.load("bob", 0)?;
        assert_eq!(c.sessions(), 0);
        c.add(session(1)?);
        locked.save("bob", &c)?;
        let raw = std::fs::read(home.path().join("alice/sessions/bob"))?;
        assert!(!raw.windows(4).any(|w| w == b"init"), "sealed, not plain");
        assert_eq!(locked.load("bob", 0)?.sessions(), 1);
        // Moved to another peer's name, it does not open.
        std::fs::copy(
            home.path().join("alice/sessions/bob"),
            home.path().join("alice/sessions/carol"),
        )?;
        assert!(locked.load("carol", 0).is_err());
        // Another identity does not open it.
        let other = Sessions::new(&store, &Identity::generate()?)?;
        drop(locked);
        assert!(other.lock(&store)?.load("bob", 0).is_err());
        Ok(())
    }

    #[test]
    fn sessions_and_held_keys_are_bounded() -> Result<()> {
        let mut c = Conversation::default();
        for id in 0..10 {
            c.add(session(id)?);
        }
        assert_eq!(c.sessions(), MAX_SESSIONS);
        assert!(c.session(0).is_none() && c.session(9).is_some());
        c.touch(6);
        assert_eq!(c.sender().map(|s| s.id), None, "responders cannot send yet");
        let header = |n| Header {
            dh: vec![1; 32],
            pn: 0,
            n,
        };
        let key = || -> Result<MessageKey> {
            let (spk, spk_public) = x25519_pair()?;
            let mut a = Ratchet::initiator(&[7; 32], &spk_public)?;
            let mut b = Ratchet::responder(&[7; 32], &spk)?;
            let (h, m) = a.seal(b"ad", b"x", 0)?;
            Ok(b.open_keeping(b"ad", &h, &m, 0)?.1)
        };
        for n in 0..(MAX_HELD as u32 + 5) {
            c.hold(HeldId::of(9, &header(n)), key()?, 1000);
        }
        assert_eq!(c.held_count(), MAX_HELD);
        assert!(c.held(&HeldId::of(9, &header(0)), 1000).is_none());
        let last = HeldId::of(9, &header(MAX_HELD as u32 + 4));
        assert!(c.held(&last, 1000).is_some());
        assert!(c.held(&last, 1000 + ratchet::KEPT_FOR_MS + 1).is_none());
        assert!(c.release(&last) && !c.release(&last));
        c.expire(1000 + ratchet::KEPT_FOR_MS + 1);
        assert_eq!(c.held_count(), 0);
        Ok(())
    }
}
