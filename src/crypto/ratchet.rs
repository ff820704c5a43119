//! The double ratchet (after Signal's specification): forward secrecy and recovery after a
//! compromise for a conversation between two users.
//!
//! ```text
//! root key ──KDF(root, DH(our ratchet key, their ratchet key))──▶ root key', chain key
//! chain key ──HMAC(ck, 2)──▶ next chain key      HMAC(ck, 1)──▶ message key (used once)
//! ```
//!
//! * Every message is sealed under its own message key, taken from a chain that only moves
//!   forward and whose old links are forgotten: a copy of today's state does not open
//!   yesterday's messages (forward secrecy).
//! * Each side makes a new ratchet key pair when it sends after receiving a new ratchet key
//!   from the other, and the other's next messages mix in a secret made with it: once the
//!   victim of a stolen state has made a fresh key after the theft and the peer has used it (a
//!   round trip that starts with a message to the victim), new messages are closed to the
//!   thief again (recovery after compromise).
//! * A side makes a new key pair at most once per [`KEY_MIN_AGE_MS`]: a conversation that
//!   turns faster (machines, a burst of quick replies) goes on in the sending chain it has
//!   until its key is that old, instead of paying three X25519 operations per turn (one new key
//!   and two agreements, about 90 us, the bulk of a message's cost). Recovery after a compromise
//!   waits that much longer; forward secrecy does not change (every message still has its own
//!   key from a chain that only moves forward). Signal's rule is the same with an age of zero.
//! * Messages that arrive out of order, or after their successors (offline delivery), are
//!   opened with message keys kept for them when the chain was moved past them: at most
//!   [`MAX_SKIP`] per chain step and [`MAX_KEPT`] in all, each at most [`KEPT_FOR_MS`] old.
//!   A message key is deleted once used, so a replay does not open.
//!
//! The state is plain data ([`Ratchet`] is `Serialize`): its owner keeps it encrypted at rest
//! and writes it atomically, before sending what it sealed and after showing what it opened.

use std::collections::VecDeque;

use openssl::derive::Deriver;
use openssl::pkey::{Id, PKey, Private};
use serde::{Deserialize, Serialize};

use super::{hkdf_sha256, hmac_sha256, PairKey};
use crate::error::{Error, Result};

/// The most message keys one ratchet step may skip (messages of one chain not yet received).
pub const MAX_SKIP: u32 = 2000;

/// The most skipped message keys kept in all; past it, the oldest go first.
pub const MAX_KEPT: usize = 5000;

/// How long a skipped message key is kept (milliseconds): a message later than this is lost.
pub const KEPT_FOR_MS: i64 = 30 * 24 * 3600 * 1000;

/// The least age of a side's ratchet key before it makes a new one (milliseconds): at most one
/// new key per side and second in a conversation, however fast it turns.
pub const KEY_MIN_AGE_MS: i64 = 1000;

/// What travels in clear with each message, authenticated: the sender's ratchet public key,
/// how long its previous sending chain was, and this message's number in its chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// The sender's current ratchet public key (X25519, 32 bytes).
    #[serde(with = "serde_bytes")]
    pub dh: Vec<u8>,
    /// Messages in the sender's previous sending chain.
    pub pn: u32,
    /// This message's number in its sending chain.
    pub n: u32,
}

impl Header {
    /// The header as bytes, for the message's associated data.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.dh.len() + 8);
        out.extend_from_slice(&self.dh);
        out.extend_from_slice(&self.pn.to_be_bytes());
        out.extend_from_slice(&self.n.to_be_bytes());
        out
    }
}

/// A message key kept for a message not yet received.
#[derive(Clone, Serialize, Deserialize)]
struct Skipped {
    #[serde(with = "serde_bytes")]
    dh: Vec<u8>,
    n: u32,
    key: [u8; 32],
    /// When it was kept (milliseconds since the epoch).
    at: i64,
}

/// The key of one received message, handed out by [`Ratchet::open_keeping`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageKey([u8; 32]);

impl std::fmt::Debug for MessageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MessageKey(..)")
    }
}

impl MessageKey {
    /// Opens the message it is the key of (`ad` and `header` as given to the ratchet).
    pub fn open(&self, ad: &[u8], header: &Header, sealed: &[u8]) -> Result<Vec<u8>> {
        PairKey(self.0).open(&aad(ad, header), sealed)
    }
}

/// One side of a conversation's double ratchet.
#[derive(Clone, Serialize, Deserialize)]
pub struct Ratchet {
    /// Our ratchet key pair: the raw X25519 private key, and its public half (sent with
    /// every message; kept, not derived again each time).
    #[serde(with = "serde_bytes")]
    dh_private: Vec<u8>,
    #[serde(with = "serde_bytes")]
    dh_public: Vec<u8>,
    /// The private key loaded, once per process (loading a raw X25519 key computes its
    /// public half again: a scalar multiplication).
    #[serde(skip)]
    dh_loaded: Option<PKey<Private>>,
    /// Their current ratchet public key, once known.
    #[serde(with = "serde_bytes")]
    their_dh: Vec<u8>,
    root: [u8; 32],
    sending: Option<[u8; 32]>,
    receiving: Option<[u8; 32]>,
    /// Messages sent in the current sending chain, received in the current receiving chain,
    /// and sent in the previous sending chain.
    ns: u32,
    nr: u32,
    pn: u32,
    skipped: VecDeque<Skipped>,
    /// Their key changed since ours did: our next message starts a new sending chain with a
    /// new key of ours, once ours is [`KEY_MIN_AGE_MS`] old. (Last, and defaulted, so a state
    /// saved before they existed still loads: it never owes a turn.)
    #[serde(default)]
    owed: bool,
    /// When our key was made (milliseconds since the epoch; 0 for the responder's signed
    /// prekey and the initiator's first key, which may be replaced at once).
    #[serde(default)]
    key_made_ms: i64,
}

impl std::fmt::Debug for Ratchet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ratchet")
            .field("ns", &self.ns)
            .field("nr", &self.nr)
            .field("skipped", &self.skipped.len())
            .finish_non_exhaustive()
    }
}

fn x25519_private(raw: &[u8]) -> Result<PKey<Private>> {
    Ok(PKey::private_key_from_raw_bytes(raw, Id::X25519)?)
}

/// A fresh X25519 key pair: (raw private, raw public).
pub fn x25519_pair() -> Result<(Vec<u8>, Vec<u8>)> {
    let key = PKey::generate_x25519()?;
    Ok((key.raw_private_key()?, key.raw_public_key()?))
}

/// The public half of a raw X25519 private key.
pub fn x25519_public(private: &[u8]) -> Result<Vec<u8>> {
    Ok(x25519_private(private)?.raw_public_key()?)
}

/// X25519 between a raw private and a raw public key; an all-zero result (a degenerate public
/// key) is refused.
pub fn dh(private: &[u8], public: &[u8]) -> Result<[u8; 32]> {
    dh_with(&x25519_private(private)?, public)
}

/// X25519 between a loaded private key and a raw public key (see [`dh`]).
fn dh_with(ours: &PKey<Private>, public: &[u8]) -> Result<[u8; 32]> {
    let theirs = PKey::public_key_from_raw_bytes(public, Id::X25519)
        .map_err(|_| Error::Integrity("not an X25519 public key".into()))?;
    let mut deriver = Deriver::new(ours)?;
    deriver.set_peer(&theirs)?;
    let mut out = [0u8; 32];
    let n = deriver.derive(&mut out)?;
    if n != 32 || out.iter().all(|b| *b == 0) {
        return Err(Error::Integrity("a degenerate X25519 public key".into()));
    }
    Ok(out)
}

/// The root step: a new root key and chain key from the old root key and a DH output.
fn kdf_root(root: &[u8; 32], dh_out: &[u8; 32]) -> Result<([u8; 32], [u8; 32])> {
    Ok((
        hkdf_sha256(dh_out, root, b"fastchat/ratchet/root/v1")?,
        hkdf_sha256(dh_out, root, b"fastchat/ratchet/chain/v1")?,
    ))
}

fn hmac(key: &[u8; 32], byte: u8) -> Result<[u8; 32]> {
    Ok(hmac_sha256(key, &[&[byte]]))
}

/// The chain step: the next chain key, and this link's message key.
fn kdf_chain(chain: &[u8; 32]) -> Result<([u8; 32], [u8; 32])> {
    Ok((hmac(chain, 2)?, hmac(chain, 1)?))
}

/// The symmetric chain step on its own (a group's sender keys use it): the next chain key,
/// and this link's message key.
pub fn chain_step(chain: &[u8; 32]) -> Result<([u8; 32], [u8; 32])> {
    kdf_chain(chain)
}

/// The associated data of a message: the conversation's (from the key agreement) and the
/// header.
fn aad(ad: &[u8], header: &Header) -> Vec<u8> {
    let mut out = Vec::with_capacity(ad.len() + 48);
    out.extend_from_slice(&(ad.len() as u32).to_be_bytes());
    out.extend_from_slice(ad);
    out.extend_from_slice(&header.encode());
    out
}

impl Ratchet {
    /// The initiator's side, from the shared secret of the key agreement and the responder's
    /// ratchet public key (its signed prekey): it can send at once.
    pub fn initiator(shared: &[u8; 32], their_dh: &[u8]) -> Result<Ratchet> {
        let key = PKey::generate_x25519()?;
        let (root, sending) = kdf_root(shared, &dh_with(&key, their_dh)?)?;
        Ok(Ratchet {
            dh_private: key.raw_private_key()?,
            dh_public: key.raw_public_key()?,
            dh_loaded: Some(key),
            their_dh: their_dh.to_vec(),
            root,
            sending: Some(sending),
            receiving: None,
            ns: 0,
            nr: 0,
            pn: 0,
            skipped: VecDeque::new(),
            owed: false,
            key_made_ms: 0,
        })
    }

    /// The responder's side, from the shared secret and the private half of the key the
    /// initiator ratcheted against (the signed prekey): it can receive, and sends after.
    pub fn responder(shared: &[u8; 32], our_dh_private: &[u8]) -> Result<Ratchet> {
        let key = x25519_private(our_dh_private)?;
        Ok(Ratchet {
            dh_private: our_dh_private.to_vec(),
            dh_public: key.raw_public_key()?,
            dh_loaded: Some(key),
            their_dh: Vec::new(),
            root: *shared,
            sending: None,
            receiving: None,
            ns: 0,
            nr: 0,
            pn: 0,
            skipped: VecDeque::new(),
            owed: false,
            key_made_ms: 0,
        })
    }

    /// Whether this side can send yet (a responder cannot before its first message arrives).
    pub fn can_send(&self) -> bool {
        self.sending.is_some() || self.owed
    }

    /// Seals `plaintext` at `now_ms` under the next message key of the sending chain (a new
    /// one, with a new key of ours, if a turn is owed and our key is old enough); `ad` is the
    /// conversation's associated data. The state moves on: save it before the message leaves.
    pub fn seal(&mut self, ad: &[u8], plaintext: &[u8], now_ms: i64) -> Result<(Header, Vec<u8>)> {
        let old_enough =
            now_ms.saturating_sub(self.key_made_ms) >= KEY_MIN_AGE_MS || now_ms < self.key_made_ms;
        if self.owed && (old_enough || self.sending.is_none()) {
            self.turn(now_ms)?;
        }
        let chain = self
            .sending
            .ok_or_else(|| Error::Integrity("no sending chain yet: wait for a message".into()))?;
        let (next, key) = kdf_chain(&chain)?;
        self.sending = Some(next);
        let header = Header {
            dh: self.dh_public.clone(),
            pn: self.pn,
            n: self.ns,
        };
        self.ns = self
            .ns
            .checked_add(1)
            .ok_or_else(|| Error::Integrity("sending chain exhausted".into()))?;
        let sealed = PairKey(key).seal(&aad(ad, &header), plaintext)?;
        Ok((header, sealed))
    }

    /// Opens a message, at `now_ms`. On any failure the state is unchanged (a forged message
    /// cannot move the ratchet); on success the message key is gone.
    pub fn open(
        &mut self,
        ad: &[u8],
        header: &Header,
        sealed: &[u8],
        now_ms: i64,
    ) -> Result<Vec<u8>> {
        self.open_keeping(ad, header, sealed, now_ms)
            .map(|(plain, _)| plain)
    }

    /// Like [`Ratchet::open`], and hands the message's key to the caller, who keeps it only
    /// until it is done with the message (one that stays queued on the server is opened again
    /// with it) and then drops it.
    pub fn open_keeping(
        &mut self,
        ad: &[u8],
        header: &Header,
        sealed: &[u8],
        now_ms: i64,
    ) -> Result<(Vec<u8>, MessageKey)> {
        // Keys past their time go whatever the message turns out to be.
        self.skipped.retain(|s| now_ms - s.at <= KEPT_FOR_MS);
        if let Some(i) = self
            .skipped
            .iter()
            .position(|s| s.dh == header.dh && s.n == header.n)
        {
            let key = MessageKey(self.skipped[i].key);
            let plain = key.open(ad, header, sealed)?;
            self.skipped.remove(i);
            return Ok((plain, key));
        }
        // The steps are tried on a copy without the kept keys (which may be thousands), then
        // taken with the keys they skipped once the message opened.
        let kept = std::mem::take(&mut self.skipped);
        let mut next = self.clone();
        self.skipped = kept;
        let key = next.message_key(header, now_ms)?;
        let plain = key.open(ad, header, sealed)?;
        let skipped = std::mem::replace(&mut next.skipped, std::mem::take(&mut self.skipped));
        next.skipped.extend(skipped);
        while next.skipped.len() > MAX_KEPT {
            next.skipped.pop_front();
        }
        *self = next;
        Ok((plain, key))
    }

    /// The key of the message `header` names: the next of the receiving chain (after a
    /// ratchet step if the sender's key is new), keeping the keys it skips.
    fn message_key(&mut self, header: &Header, now_ms: i64) -> Result<MessageKey> {
        if header.dh != self.their_dh {
            self.skip_to(header.pn, now_ms)?;
            self.step(&header.dh)?;
        }
        self.skip_to(header.n, now_ms)?;
        let chain = self
            .receiving
            .ok_or_else(|| Error::Integrity("no receiving chain".into()))?;
        let (next, key) = kdf_chain(&chain)?;
        self.receiving = Some(next);
        self.nr = self
            .nr
            .checked_add(1)
            .ok_or_else(|| Error::Integrity("receiving chain exhausted".into()))?;
        Ok(MessageKey(key))
    }

    /// Keeps the message keys of the receiving chain up to (not including) message `until`.
    fn skip_to(&mut self, until: u32, now_ms: i64) -> Result<()> {
        let Some(mut chain) = self.receiving else {
            return Ok(());
        };
        if until < self.nr {
            // Already past it: a replay, or a message whose key was used or dropped.
            return Err(Error::Integrity(
                "a message already received, or too old to open".into(),
            ));
        }
        if until - self.nr > MAX_SKIP {
            return Err(Error::Integrity(format!(
                "a message {} ahead of the last one received (at most {MAX_SKIP})",
                until - self.nr
            )));
        }
        while self.nr < until {
            let (next, key) = kdf_chain(&chain)?;
            self.skipped.push_back(Skipped {
                dh: self.their_dh.clone(),
                n: self.nr,
                key,
                at: now_ms,
            });
            chain = next;
            self.nr += 1;
        }
        self.receiving = Some(chain);
        Ok(())
    }

    /// The receiving half of a Diffie-Hellman ratchet step, on their new ratchet key: a new
    /// receiving chain, and a turn owed (see [`Ratchet::turn`]).
    fn step(&mut self, their_dh: &[u8]) -> Result<()> {
        let ours = match &self.dh_loaded {
            Some(key) => key.clone(),
            None => {
                let key = x25519_private(&self.dh_private)?;
                self.dh_loaded = Some(key.clone());
                key
            }
        };
        let (root, receiving) = kdf_root(&self.root, &dh_with(&ours, their_dh)?)?;
        self.root = root;
        self.receiving = Some(receiving);
        self.their_dh = their_dh.to_vec();
        self.nr = 0;
        self.owed = true;
        Ok(())
    }

    /// The sending half: a new key pair of ours and a new sending chain agreed with their
    /// current key; the old private key is gone.
    fn turn(&mut self, now_ms: i64) -> Result<()> {
        let fresh = PKey::generate_x25519()?;
        let (root, sending) = kdf_root(&self.root, &dh_with(&fresh, &self.their_dh)?)?;
        self.root = root;
        self.sending = Some(sending);
        self.pn = self.ns;
        self.ns = 0;
        self.dh_private = fresh.raw_private_key()?;
        self.dh_public = fresh.raw_public_key()?;
        self.dh_loaded = Some(fresh);
        self.owed = false;
        self.key_made_ms = now_ms;
        Ok(())
    }

    /// Message keys kept for messages not yet received.
    pub fn kept(&self) -> usize {
        self.skipped.len()
    }
}

#[cfg(test)]
mod tests;
