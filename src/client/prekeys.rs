//! The user's prekeys for the asynchronous key agreement (forward secrecy, issue 22): the
//! private halves of what the key directory hands out, kept in `FASTCHAT_HOME/USER/prekeys`.
//!
//! * The file is sealed (AES-256-GCM) under a key derived from the identity's private key, so
//!   it opens exactly where the identity does (the password), and it is written atomically
//!   (a temporary file, synced, renamed): a crash leaves the old file or the new one.
//! * It is saved *before* new prekeys are published: whatever the directory hands out has its
//!   private half here.
//! * [`refresh`] makes a signed prekey when there is none or it is older than
//!   [`SIGNED_LIFETIME_MS`] (the one before is kept, for key agreements already under way), and
//!   tops up the one-time prekeys when the directory holds fewer than [`LOW_WATER`].
//!   `fastchat login` runs it. The first prekeys go with the signup itself ([`for_signup`]),
//!   so that others can write to a user who has not logged in yet.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use super::balancer::{BalancerClient, Session};
use super::keystore::Keystore;
use crate::crypto::{ratchet, x3dh, Identity, PairKey};
use crate::error::{Error, Result};
use crate::net::{NewPrekeys, SignedPrekey, MAX_ONE_TIME_PREKEYS, PREKEYS_PER_REQUEST};

/// Below this many one-time prekeys in the directory, [`refresh`] publishes more.
pub const LOW_WATER: u32 = 32;

/// How long a signed prekey is used before a new one replaces it (7 days).
pub const SIGNED_LIFETIME_MS: i64 = 7 * 24 * 3600 * 1000;

/// One-time private keys kept at most: the directory holds up to
/// [`MAX_ONE_TIME_PREKEYS`], and those it handed out wait here for their first message.
const KEPT_ONE_TIME: usize = 4 * MAX_ONE_TIME_PREKEYS;

/// A signed prekey's private half.
#[derive(Clone, Serialize, Deserialize)]
struct Signed {
    id: u32,
    private: ByteBuf,
    made_at: i64,
}

/// The private halves of a user's prekeys.
#[derive(Default, Serialize, Deserialize)]
pub struct Prekeys {
    signed: Option<Signed>,
    /// The signed prekey before the current one.
    previous: Option<Signed>,
    /// One-time prekeys by id.
    one_time: BTreeMap<u32, ByteBuf>,
    /// The next id to give (signed and one-time prekeys share the count; never reused).
    next_id: u32,
}

fn path(store: &Keystore) -> PathBuf {
    store.dir().join("prekeys")
}

/// What the file is bound to: its kind and its owner.
fn aad(store: &Keystore) -> Vec<u8> {
    let mut a = b"fastchat/prekeys/v1".to_vec();
    a.extend_from_slice(store.user().as_bytes());
    a
}

/// The key the file is sealed under.
fn file_key(identity: &Identity) -> Result<PairKey> {
    Keystore::state_key(identity, b"prekeys")
}

impl Prekeys {
    /// The user's prekeys (none yet if the file does not exist).
    pub fn load(store: &Keystore, identity: &Identity) -> Result<Prekeys> {
        let key = file_key(identity)?;
        Ok(store
            .read_sealed(&path(store), &key, &aad(store))?
            .unwrap_or_default())
    }

    /// Seals and writes the prekeys atomically.
    pub fn save(&self, store: &Keystore, identity: &Identity) -> Result<()> {
        store.write_sealed(&path(store), &file_key(identity)?, &aad(store), self)
    }

    /// The private half of signed prekey `id` (the current one or the one before).
    pub fn signed_private(&self, id: u32) -> Option<&[u8]> {
        [&self.signed, &self.previous]
            .into_iter()
            .flatten()
            .find(|s| s.id == id)
            .map(|s| s.private.as_slice())
    }

    /// The private half of one-time prekey `id`, if it is still here.
    pub fn one_time_private(&self, id: u32) -> Option<&[u8]> {
        self.one_time.get(&id).map(|k| k.as_slice())
    }

    /// Deletes one-time prekey `id`'s private half (its key agreement is done).
    pub fn remove_one_time(&mut self, id: u32) -> bool {
        self.one_time.remove(&id).is_some()
    }

    fn next(&mut self) -> Result<u32> {
        let id = self.next_id;
        self.next_id = id.checked_add(1).ok_or_else(|| {
            Error::Local("prekey ids ran out; make new keys (`fastchat rekey`)".into())
        })?;
        Ok(id)
    }
}

/// What [`Prekeys::top_up`] made for the directory.
type Published = (Option<SignedPrekey>, Vec<(u32, Vec<u8>)>);

impl Prekeys {
    /// Adds what the directory lacks: a signed prekey if there is none (or the directory has
    /// none: `signed_published` false) or it is older than [`SIGNED_LIFETIME_MS`], and
    /// one-time prekeys if the directory holds fewer than [`LOW_WATER`] (`held`). Returns
    /// what to publish, once these prekeys are saved.
    fn top_up(
        &mut self,
        identity: &Identity,
        signed_published: bool,
        held: u32,
        now_ms: i64,
    ) -> Result<Published> {
        let mut signed = None;
        let stale = self
            .signed
            .as_ref()
            .is_none_or(|s| now_ms - s.made_at > SIGNED_LIFETIME_MS);
        if let (false, false, Some(current)) = (stale, signed_published, &self.signed) {
            // The directory lacks it (a signup): the current one again, not a new one, so
            // that a signup run again and again does not push out a key the directory holds.
            let public = ratchet::x25519_public(&current.private)?;
            let signature = identity.sign(&x3dh::signed_prekey_message(current.id, &public))?;
            signed = Some(SignedPrekey {
                id: current.id,
                public,
                signature,
            });
        } else if stale || !signed_published {
            let id = self.next()?;
            let (private, public, signature) = x3dh::signed_prekey(id, |m| identity.sign(m))?;
            self.previous = self.signed.take();
            self.signed = Some(Signed {
                id,
                private: ByteBuf::from(private),
                made_at: now_ms,
            });
            signed = Some(SignedPrekey {
                id,
                public,
                signature,
            });
        }
        let mut one_time = Vec::new();
        if held < LOW_WATER {
            let room = MAX_ONE_TIME_PREKEYS.saturating_sub(held as usize);
            for _ in 0..PREKEYS_PER_REQUEST.min(room) {
                let (private, public) = ratchet::x25519_pair()?;
                let id = self.next()?;
                self.one_time.insert(id, ByteBuf::from(private));
                one_time.push((id, public));
            }
            while self.one_time.len() > KEPT_ONE_TIME {
                self.one_time.pop_first();
            }
        }
        Ok((signed, one_time))
    }
}

/// Makes and publishes what the directory lacks for this user (see the module documentation);
/// returns how many one-time prekeys it holds now.
pub fn refresh(
    store: &Keystore,
    identity: &Identity,
    balancer: &mut BalancerClient,
    session: &Session,
    now_ms: i64,
) -> Result<u32> {
    // Under the state lock: a message opened meanwhile deletes the one-time prekey it used.
    let _lock = store.lock_state()?;
    let mut keys = Prekeys::load(store, identity)?;
    let held = balancer.publish_prekeys(session, None, Vec::new())?;
    let (signed, one_time) = keys.top_up(identity, true, held, now_ms)?;
    if signed.is_none() && one_time.is_empty() {
        return Ok(held);
    }
    // Before publishing: every key the directory may hand out has its private half here.
    keys.save(store, identity)?;
    balancer.publish_prekeys(session, signed, one_time)
}

/// The first prekeys of a new account, to go with its signup: made on top of `keys` (the
/// user's, if their identity is older than the account, else none), which the caller saves
/// before the signup if the identity is saved already, else with it.
pub fn for_signup(keys: &mut Prekeys, identity: &Identity, now_ms: i64) -> Result<NewPrekeys> {
    let (signed, one_time) = keys.top_up(identity, false, 0, now_ms)?;
    Ok(NewPrekeys {
        signed: signed.ok_or_else(|| Error::Local("no signed prekey was made".into()))?,
        one_time: one_time
            .into_iter()
            .map(|(id, k)| (id, ByteBuf::from(k)))
            .collect(),
    })
}
