//! End-to-end encryption of messages, as the client does it.
//!
//! The servers only ever see the `body` of an [`Envelope`]. A direct message is sealed in the
//! conversation's double ratchet ([`super::sessions`]), under a key of its own that is
//! deleted once used (forward secrecy):
//!
//! ```text
//! body  = version (1 byte, = 3) || kind (1 byte) || seq (8, BE) || len(frame) (2, BE)
//!         || frame || sealed
//! frame = MessagePack { session (u64), init (the key agreement's, until the peer answered),
//!                       header (the sender's ratchet key, pn, n) }
//! ad    = "fastchat/dm/v3" || len(from) || from || len(to) || to || client_id (8, BE)
//!         || seq || kind || session (8, BE)
//! sealed = AES-256-GCM(message key, aad = len(ad) || ad || header, plaintext)
//! ```
//!
//! so the header (sender, recipient, message id, sequence, kind, session, ratchet header) is
//! authenticated: a message re-addressed or relabelled fails to open. The first message to a
//! peer with no session fetches their prekey bundle from the directory (one-time prekeys are
//! handed out once) and starts one ([`crate::crypto::x3dh`]). `seq` is the sender's clock in
//! microseconds when it sealed the message (strictly increasing per process): the recipient
//! remembers which sequences of each conversation it accepted ([`super::replay`]) and refuses
//! a message it has already shown, whatever id the server gives it.
//!
//! A group has a random 256-bit key per epoch, made by a member (the admin, or whoever sends
//! first after someone left) and wrapped for each member under the pair key of the wrapping
//! member and that member; and in each epoch every sender has a chain of its own (sender
//! keys, [`super::sender_keys`]), handed to the other members in direct messages. A group
//! message is sealed under its key from the sender's chain, bound to the epoch's key, and
//! carries a tag for each other member, made with a key the sender handed that member alone
//! (with its chain key, over their pairwise ratchet): every member knows the chain key, none
//! can make another member's tag, so members cannot forge each other:
//!
//! ```text
//! body = version (4) || kind || epoch (8, BE) || seq (8, BE) || n (4, BE) || count (2, BE)
//!        || tag (16) x count || sealed
//! aad  = "fastchat/grp/v4" || len(group) || group || len(from) || from || client_id || epoch
//!        || seq || n || kind || count
//! key  = HKDF(message key n of the sender's chain, salt = epoch key, "fastchat/grp/v3")
//! tag  = HMAC-SHA256(the sender's key for that member, aad || sealed), first 16 bytes, one
//!        per other member of the epoch by name; checked before anything is decrypted
//! wrapped key = seal(pair key(wrapper, member),
//!                    aad = "fastchat/gk/v1" || group || epoch || member || wrapper, key)
//! ```
//!
//! Who is in a group is what the group's chain of signed changes says ([`crate::membership`]),
//! as this client verified it ([`super::chains`]), never what the server lists: keys are
//! wrapped only for verified members, a message is accepted only from a member of its epoch,
//! and a key only from whoever may key that epoch. Every change starts a new epoch, so an added
//! member cannot read what was sent before, and one who left or was removed nothing after.
//! Peer public keys come from the balancer's directory and are pinned on first use; a key that
//! later differs from the pin is refused until the user runs `fastchat trust NAME`.

mod directory;
mod groups;
mod wire;

pub use directory::Directory;
pub use groups::Left;
pub use wire::{
    fingerprint, group_aad, group_message_key, open_direct_in, parse_direct, parse_group,
    seal_direct_in, seal_group_with, sign_change, tag_order, wrap_aad, Authentic, Direct,
    FileOffer, Frame, GroupBody, GroupSeq, Kind, Plain, Reached, Receipt, SenderKey, MAX_RECEIPT,
};

use std::collections::HashMap;

use super::chains::Chains;
use super::history::{Entry, History};
use super::keystore::Keystore;
use super::prekeys::Prekeys;
use super::replay::{self, Accepted, Verdict};
use super::sender_keys::{self, SenderKeys};
use super::sessions::{self, HeldId, Session, Sessions};
use super::Client;
use crate::crypto::ratchet::Ratchet;
use crate::crypto::x3dh::{self, Init};
use crate::crypto::{self, Identity, PairKey};
use crate::error::{Error, ErrorCode, Result};
use crate::net::{Envelope, PublicKeys};

/// Starts a session with `peer` (whose pinned keys are `keys`) from their prekey bundle.
fn start_session(
    directory: &mut Directory,
    identity: &Identity,
    me: &str,
    peer: &str,
    keys: &PublicKeys,
) -> Result<Session> {
    let bundle = directory.bundle(peer)?.ok_or_else(|| Error::Refused {
        code: ErrorCode::UnknownUser,
        message: format!(
            "{peer} has published no prekeys yet (they signed up with an older client \
                 and have not logged in since); ask them to log in once"
        ),
    })?;
    if bundle.identity != keys.x25519 {
        return Err(Error::Integrity(format!(
            "WARNING: the directory's prekey bundle for {peer} names another identity key \
             than the one pinned for {peer}; refusing it"
        )));
    }
    let mut private = identity.x25519_private()?;
    let started = x3dh::initiate(me, &private, peer, &keys.ed25519, &bundle);
    private.fill(0);
    let (secret, init) = started?;
    if bundle.one_time.is_none() {
        log::warn!(
            "{peer} has no one-time prekeys left: this conversation starts on their signed \
             prekey alone (see docs/SECURITY.md)"
        );
    }
    Ok(Session {
        id: sessions::session_id(&init)?,
        ratchet: Ratchet::initiator(&secret, &bundle.signed_prekey)?,
        init: Some(init),
    })
}

/// Our side of a session `peer` started with `init` (under the state lock).
fn respond(
    store: &Keystore,
    identity: &Identity,
    me: &str,
    peer: &str,
    keys: &PublicKeys,
    id: u64,
    init: &Init,
) -> Result<Session> {
    if sessions::session_id(init)? != id {
        return Err(Error::Integrity(format!(
            "a message from {peer} names a session its key agreement does not start"
        )));
    }
    let prekeys = Prekeys::load(store, identity)?;
    let signed = prekeys
        .signed_private(init.signed_prekey_id)
        .ok_or_else(|| {
            Error::Integrity(format!(
                "{peer} started a session with signed prekey {}, which this client no \
                 longer has (replaced twice since); ask {peer} to send again",
                init.signed_prekey_id
            ))
        })?;
    let one_time = match init.one_time_id {
        Some(n) => Some(prekeys.one_time_private(n).ok_or_else(|| {
            Error::Integrity(format!(
                "{peer} started a session with one-time prekey {n}, which is used up or \
                 unknown (a replayed first message?)"
            ))
        })?),
        None => None,
    };
    let mut private = identity.x25519_private()?;
    let secret = x3dh::respond(me, &private, signed, one_time, peer, &keys.x25519, init);
    private.fill(0);
    Ok(Session {
        id,
        ratchet: Ratchet::responder(&secret?, signed)?,
        init: None,
    })
}

/// Takes the keys shown of `peer`'s messages out of `releases` and of `conversation` (about
/// to be saved).
fn release_direct(releases: &mut Vec<Held>, peer: &str, conversation: &mut sessions::Conversation) {
    releases.retain(|h| match h {
        Held::Direct(p, id) if p == peer => {
            conversation.release(id);
            false
        }
        _ => true,
    });
}

/// Takes the keys shown of `group`'s messages out of `releases` and of `chains` (about to be
/// saved).
fn release_group(releases: &mut Vec<Held>, group: &str, chains: &mut sender_keys::GroupChains) {
    releases.retain(|h| match h {
        Held::Group(g, epoch, sender, n) if g == group => {
            chains.release(*epoch, sender, *n);
            false
        }
        _ => true,
    });
}

/// One user's end-to-end state: private keys, pinned peers, cached pair and group keys.
pub struct E2e {
    me: String,
    identity: Identity,
    store: Keystore,
    /// The key directory.
    pub directory: Directory,
    /// Peer keys checked against the pins in this process.
    keys: HashMap<String, PublicKeys>,
    /// Pair keys, by peer.
    peers: HashMap<String, PairKey>,
    /// Group keys, by group and epoch.
    group_keys: HashMap<(String, u64), PairKey>,
    /// The epoch each group was at when we last sent to it (a stale one is refused by the
    /// server with `Conflict`, and then fetched again).
    epochs: HashMap<String, u64>,
    /// What was already shown (opened on first use).
    accepted: Option<Accepted>,
    /// The groups' verified chains of changes.
    chains: Chains,
    /// The last sequence sealed by this process.
    last_seq: u64,
    /// The local history (opened on first use).
    history: Option<History>,
    /// The double ratchets with peers.
    sessions: Sessions,
    /// The groups' sender chains.
    sender_keys: SenderKeys,
    /// Keys of messages shown, to delete at the next save of their file or at
    /// [`E2e::settle`], which comes before the messages are acknowledged.
    releases: Vec<Held>,
}

/// The key of a message opened and not yet shown, deleted once it is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Held {
    /// A direct message from this peer.
    Direct(String, HeldId),
    /// A group message: its group, epoch, sender and number in the sender's chain.
    Group(String, u64, String, u32),
}

impl Drop for E2e {
    /// Deletes the keys of the messages shown (a caller that acknowledges settles first).
    fn drop(&mut self) {
        if let Err(e) = self.settle() {
            log::warn!("keys of messages shown were not deleted: {e}");
        }
    }
}

/// A message that authenticated, and whether it was shown before.
#[derive(Debug)]
pub struct Opened {
    /// What it says.
    pub plain: Plain,
    /// New, the same message again, a replay, or too old (see [`replay`]).
    pub verdict: Verdict,
    conversation: String,
    seq: u64,
    msg_id: i64,
    /// Its held key (released once shown).
    held: Option<Held>,
}

impl E2e {
    /// State for `me`, whose keys are `identity`.
    pub fn new(me: &str, identity: Identity, store: Keystore, directory: Directory) -> Result<E2e> {
        let chains = Chains::new(store.dir());
        let sessions = Sessions::new(&store, &identity)?;
        let sender_keys = SenderKeys::new(&store, &identity)?;
        Ok(E2e {
            me: me.to_string(),
            identity,
            store,
            directory,
            keys: HashMap::new(),
            peers: HashMap::new(),
            group_keys: HashMap::new(),
            epochs: HashMap::new(),
            accepted: None,
            chains,
            last_seq: 0,
            history: None,
            sessions,
            sender_keys,
            releases: Vec::new(),
        })
    }

    /// The sequence of the next message sealed: the clock in microseconds, strictly
    /// increasing in this process.
    fn next_seq(&mut self) -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        self.last_seq = now.max(self.last_seq + 1);
        self.last_seq
    }

    fn accepted(&mut self) -> Result<&mut Accepted> {
        if self.accepted.is_none() {
            self.store.ensure_dir()?;
            self.accepted = Some(Accepted::open(self.store.dir())?);
        }
        Ok(self.accepted.as_mut().expect("just opened"))
    }

    /// Records that `opened` was shown: it will not be shown again, and its key is deleted
    /// with the next save of its file, and at the latest by [`E2e::settle`].
    pub fn shown(&mut self, opened: &Opened) -> Result<()> {
        let (c, seq, id) = (opened.conversation.clone(), opened.seq, opened.msg_id);
        self.accepted()?.record(&c, seq, id)?;
        if let Some(held) = &opened.held {
            self.releases.push(held.clone());
        }
        Ok(())
    }

    /// Deletes the keys of the messages shown so far. Call it before acknowledging them: a
    /// crash before it leaves them queued, and shown again they are found shown and their
    /// keys deleted then.
    pub fn settle(&mut self) -> Result<()> {
        while let Some(first) = self.releases.first().cloned() {
            match first {
                Held::Direct(peer, _) => {
                    let locked = self.sessions.lock(&self.store)?;
                    let mut conversation = locked.load(&peer, crate::db::now_ms())?;
                    release_direct(&mut self.releases, &peer, &mut conversation);
                    locked.save(&peer, &conversation)?;
                }
                Held::Group(group, ..) => {
                    let locked = self.sender_keys.lock(&self.store)?;
                    let mut chains = locked.load(&group)?;
                    release_group(&mut self.releases, &group, &mut chains);
                    locked.save(&group, &chains)?;
                }
            }
        }
        Ok(())
    }

    /// Deletes the held key of a message that will not be shown, now.
    fn release(&mut self, opened: &Opened) -> Result<()> {
        if let Some(held) = &opened.held {
            self.releases.push(held.clone());
            self.settle()?;
        }
        Ok(())
    }

    /// Forgets the sender chains of `group` (we left it or were removed).
    fn forget_sender_keys(&mut self, group: &str) -> Result<()> {
        let locked = self.sender_keys.lock(&self.store)?;
        let mut chains = locked.load(group)?;
        chains.clear();
        locked.save(group, &chains)
    }

    /// Installs a sender key `from` handed us, if `from` and we were both members of its
    /// epoch in the group's verified chain.
    fn install(&mut self, client: &Client, from: &str, key: &SenderKey) -> Result<()> {
        let roster = self.roster_at(client, &key.group, key.epoch)?;
        if !roster.has(from) || !roster.has(&self.me) {
            return Err(Error::Integrity(format!(
                "{from} handed a key for epoch {} of {}, of which they or we were not a member",
                key.epoch, key.group
            )));
        }
        let locked = self.sender_keys.lock(&self.store)?;
        let mut chains = locked.load(&key.group)?;
        if chains.install(key.epoch, from, key.key, key.n, key.mac) {
            locked.save(&key.group, &chains)?;
        }
        Ok(())
    }

    /// Hands our chain key of `epoch` to every member of `members` who does not have it yet,
    /// each in a direct message (sealed in their ratchet).
    fn hand_out(
        &mut self,
        client: &Client,
        group: &str,
        epoch: u64,
        members: &[String],
    ) -> Result<()> {
        // The chain, and the authentication key of each member who still needs it, are saved
        // before anything is handed out.
        let (key, n, missing) = {
            let locked = self.sender_keys.lock(&self.store)?;
            let mut chains = locked.load(group)?;
            let (key, n, given) = chains.sending(epoch)?;
            let mut missing = Vec::new();
            for member in members {
                if *member != self.me && !given.contains(member) {
                    missing.push((member.clone(), chains.mac_for(epoch, member)?));
                }
            }
            locked.save(group, &chains)?;
            (key, n, missing)
        };
        if missing.is_empty() {
            return Ok(());
        }
        let mut handed = Vec::new();
        let mut failed = None;
        for (member, mac) in &missing {
            let plain = Plain::SenderKey(SenderKey {
                group: group.to_string(),
                epoch,
                key,
                n,
                mac: *mac,
            });
            let sent = crypto::random_u64().and_then(|client_id| {
                let body = self.seal_direct(member, client_id, &plain)?;
                client.send(member, client_id, &body, None)
            });
            match sent {
                Ok(_) => handed.push(member.clone()),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let locked = self.sender_keys.lock(&self.store)?;
        let mut chains = locked.load(group)?;
        for member in &handed {
            chains.given(epoch, member);
        }
        locked.save(group, &chains)?;
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The local history, opened on first use.
    pub fn history(&mut self) -> Result<&History> {
        if self.history.is_none() {
            self.store.ensure_dir()?;
            self.history = Some(History::new(
                self.store.dir().to_path_buf(),
                &self.me,
                &self.identity,
            )?);
        }
        Ok(self.history.as_ref().expect("made above"))
    }

    /// Adds a line written now to the local history (a failure is logged: the message
    /// itself went).
    pub fn remember(&mut self, conversation: &str, from: &str, text: &str) {
        self.remember_at(crate::db::now_ms(), conversation, from, text);
    }

    /// Adds a line written at `at` (ms since the epoch) to the local history.
    pub fn remember_at(&mut self, at: i64, conversation: &str, from: &str, text: &str) {
        let entry = Entry {
            at,
            conversation: conversation.to_string(),
            from: from.to_string(),
            text: text.to_string(),
        };
        if let Err(e) = self.history().and_then(|h| h.append(&entry)) {
            log::warn!("not kept in the history: {e}");
        }
    }

    /// Adds a line this user sent to `conversation` to the local history.
    pub fn remember_sent(&mut self, conversation: &str, text: &str) {
        let me = self.me.clone();
        self.remember(conversation, &me, text);
    }

    /// The key store (key files, pins) of this user.
    pub fn keystore(&self) -> &Keystore {
        &self.store
    }

    /// Our name.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// The pair key with `peer`, fetching and checking (or pinning) their keys the first time.
    fn pair_key(&mut self, peer: &str) -> Result<&PairKey> {
        if !self.peers.contains_key(peer) {
            let x25519 = self.peer_keys(peer)?.x25519.clone();
            let key = self.identity.pair_key(&self.me, peer, &x25519)?;
            self.peers.insert(peer.to_string(), key);
        }
        Ok(&self.peers[peer])
    }

    /// `peer`'s public keys, checked against the pin once per process.
    pub(super) fn peer_keys(&mut self, peer: &str) -> Result<&PublicKeys> {
        if !self.keys.contains_key(peer) {
            let keys = self.checked_keys(peer)?;
            self.keys.insert(peer.to_string(), keys);
        }
        Ok(&self.keys[peer])
    }

    /// `peer`'s keys from the directory, compared with the pin (pinned now if new).
    pub fn checked_keys(&mut self, peer: &str) -> Result<PublicKeys> {
        let keys = self.directory.keys(peer)?;
        match self.store.pinned(peer)? {
            Some(pinned) if pinned == keys => Ok(keys),
            Some(pinned) => Err(Error::Integrity(format!(
                "WARNING: the keys of {peer} have CHANGED since you first saw them \
                 (pinned {}, now {}). Someone may be impersonating {peer}. Refusing to \
                 continue; if {peer} really has new keys, run: fastchat trust {peer}",
                fingerprint(&pinned)?,
                fingerprint(&keys)?
            ))),
            None => {
                self.store.pin(peer, &keys)?;
                Ok(keys)
            }
        }
    }

    /// Pins `peer`'s current directory keys, replacing an earlier pin; returns them. The
    /// sessions with their old keys are forgotten: the next message starts a new one.
    pub fn trust(&mut self, peer: &str) -> Result<PublicKeys> {
        let keys = self.directory.keys(peer)?;
        self.store.pin(peer, &keys)?;
        self.sessions.lock(&self.store)?.forget(peer)?;
        self.peers.remove(peer);
        self.keys.remove(peer);
        Ok(keys)
    }

    /// Encrypts a text message for `to`.
    pub fn seal_text(&mut self, to: &str, client_id: u64, text: &str) -> Result<Vec<u8>> {
        self.seal_direct(to, client_id, &Plain::Text(text.to_string()))
    }

    /// Encrypts a message for `to` in our session with them (starting one if there is none),
    /// and saves the session before returning: the body may leave once this returns.
    pub fn seal_direct(&mut self, to: &str, client_id: u64, plain: &Plain) -> Result<Vec<u8>> {
        if to == self.me {
            return Err(Error::Invalid(crate::net::TO_YOURSELF.into()));
        }
        let keys = self.peer_keys(to)?.clone();
        let seq = self.next_seq();
        let locked = self.sessions.lock(&self.store)?;
        let mut conversation = locked.load(to, crate::db::now_ms())?;
        if conversation.sender().is_none() {
            let session = start_session(&mut self.directory, &self.identity, &self.me, to, &keys)?;
            conversation.add(session);
        }
        let session = conversation.sender().expect("a session that can send");
        let body = seal_direct_in(
            session,
            &self.me,
            to,
            client_id,
            seq,
            plain,
            crate::db::now_ms(),
        )?;
        locked.save(to, &conversation)?;
        Ok(body)
    }

    /// Opens a direct message from `msg.from` (whose pinned keys are `keys`) in its session:
    /// with the key held for it if it was opened before, in a session we have, or in a new
    /// one its key agreement starts. Returns it and the id of its now held key.
    fn open_direct(&mut self, msg: &Envelope, keys: &PublicKeys) -> Result<(Authentic, HeldId)> {
        let direct = parse_direct(msg)?;
        let (peer, frame) = (msg.from.as_str(), &direct.frame);
        let held = HeldId::of(frame.session, &frame.header);
        let now = crate::db::now_ms();
        let locked = self.sessions.lock(&self.store)?;
        let mut conversation = locked.load(peer, now)?;
        if let Some(key) = conversation.held(&held, now) {
            if let Ok(plain) = key.open(&direct.ad, &frame.header, direct.sealed) {
                return Ok((direct.authentic(plain, msg.id)?, held));
            }
        }
        let mut used_one_time = None;
        let (plain, key) = match conversation.session(frame.session) {
            Some(session) => {
                let opened =
                    session
                        .ratchet
                        .open_keeping(&direct.ad, &frame.header, direct.sealed, now)?;
                // They answered in a session we started: no need to repeat its start.
                session.init = None;
                opened
            }
            None => {
                let init = frame.init.as_ref().ok_or_else(|| {
                    Error::Integrity(format!(
                        "message {} is in a session with {peer} this client does not have (its \
                         state was lost, or it is too old); ask {peer} to send it again",
                        msg.id
                    ))
                })?;
                let mut session = respond(
                    &self.store,
                    &self.identity,
                    &self.me,
                    peer,
                    keys,
                    frame.session,
                    init,
                )?;
                let opened =
                    session
                        .ratchet
                        .open_keeping(&direct.ad, &frame.header, direct.sealed, now)?;
                used_one_time = init.one_time_id;
                conversation.add(session);
                opened
            }
        };
        conversation.touch(frame.session);
        conversation.hold(held.clone(), key, now);
        release_direct(&mut self.releases, peer, &mut conversation);
        locked.save(peer, &conversation)?;
        // The session is saved: the one-time prekey that started it is no longer needed.
        if let Some(id) = used_one_time {
            let mut prekeys = Prekeys::load(&self.store, &self.identity)?;
            if prekeys.remove_one_time(id) {
                prekeys.save(&self.store, &self.identity)?;
            }
        }
        drop(locked);
        Ok((direct.authentic(plain, msg.id)?, held))
    }

    /// Whether a message of `msg`'s sender (in its group, if any) was shown under `msg`'s id:
    /// then a copy of `msg` that does not open is that message delivered again (delivery is
    /// at least once) after its key was deleted, not an attack to warn about. (The id is the
    /// server's: a server that sends anything under a shown id gets it acknowledged and
    /// dropped, never shown; a new message under an old id opens, and is judged by its
    /// authenticated sequence as ever.)
    pub fn shown_before(&mut self, msg: &Envelope) -> Result<bool> {
        let conversation = replay::conversation(msg.group.as_deref(), &msg.from);
        self.accepted()?.shown_id(&conversation, msg.id)
    }

    /// Decrypts and authenticates a message for us (group keys are fetched through `client`),
    /// and says whether it was shown before. Show it only if it is [`Verdict::New`], then call
    /// [`E2e::shown`].
    pub fn open(&mut self, client: &Client, msg: &Envelope) -> Result<Opened> {
        if let Some(group) = &msg.group {
            if msg.body.get(1) == Some(&(Kind::Change as u8)) {
                return self.open_change(client, group, msg);
            }
        }
        let held;
        let authentic = match &msg.group {
            Some(group) => {
                let body = parse_group(msg)?;
                let epoch = body.at.epoch;
                let roster = self.roster_at(client, group, epoch)?;
                if !roster.has(&msg.from) {
                    return Err(Error::Integrity(format!(
                        "{} was not a member of {group} in key epoch {epoch}",
                        msg.from
                    )));
                }
                let others = tag_order(&roster.members, &msg.from);
                let index = others.iter().position(|m| *m == self.me).ok_or_else(|| {
                    Error::Integrity(format!(
                        "we were not a member of {group} in key epoch {epoch}"
                    ))
                })?;
                if body.tags() != others.len() {
                    return Err(Error::Integrity(format!(
                        "group message {} carries {} tags for the {} other members of its epoch",
                        msg.id,
                        body.tags(),
                        others.len()
                    )));
                }
                let key = self.group_key(client, group, epoch)?;
                let n = body.at.n;
                let chain_key = {
                    let locked = self.sender_keys.lock(&self.store)?;
                    let mut chains = locked.load(group)?;
                    // The sender's tag for us, checked before the chain moves.
                    let mac = chains.mac_of(epoch, &msg.from).ok_or_else(|| {
                        Error::Early(format!(
                            "no sender key from {} for key epoch {epoch} (it comes as a direct \
                             message before their first group message of the epoch)",
                            msg.from
                        ))
                    })?;
                    body.check(index, &mac, &msg.from)?;
                    let k = chains.receive(epoch, &msg.from, n, crate::db::now_ms())?;
                    release_group(&mut self.releases, group, &mut chains);
                    locked.save(group, &chains)?;
                    k
                };
                let opened = body.open(&group_message_key(&key, &chain_key)?);
                held = Some(Held::Group(group.clone(), epoch, msg.from.clone(), n));
                match opened {
                    Ok(authentic) => authentic,
                    Err(e) => {
                        // It does not open: its key is of no further use.
                        if let Some(held) = held {
                            self.releases.push(held);
                            self.settle()?;
                        }
                        return Err(e);
                    }
                }
            }
            None => {
                if msg.to != self.me {
                    return Err(Error::Integrity(format!(
                        "message {} is addressed to {}, not to us",
                        msg.id, msg.to
                    )));
                }
                let keys = self.peer_keys(&msg.from)?.clone();
                let (authentic, id) = self.open_direct(msg, &keys)?;
                held = Some(Held::Direct(msg.from.clone(), id));
                authentic
            }
        };
        let checked = match (&msg.group, authentic.plain) {
            (Some(_), Plain::Receipt(_) | Plain::Removal(_) | Plain::SenderKey(_)) => {
                Err(Error::Integrity(format!(
                    "message {} is a receipt, a removal or a sender key sent to a group",
                    msg.id
                )))
            }
            (None, Plain::SenderKey(key)) => self
                .install(client, &msg.from, &key)
                .map(|()| Plain::SenderKey(key)),
            (None, Plain::Removal(signed)) => {
                self.removal(&msg.from, &signed).map(Plain::Membership)
            }
            (_, plain) => Ok(plain),
        };
        let plain = match checked {
            Ok(plain) => plain,
            Err(e) => {
                // Refused: its key is of no further use.
                if let Some(held) = held {
                    self.releases.push(held);
                    self.settle()?;
                }
                return Err(e);
            }
        };
        let authentic = Authentic {
            plain,
            seq: authentic.seq,
        };
        let conversation = replay::conversation(msg.group.as_deref(), &msg.from);
        let verdict = self
            .accepted()?
            .check(&conversation, authentic.seq, msg.id)?;
        let opened = Opened {
            plain: authentic.plain,
            verdict,
            conversation,
            seq: authentic.seq,
            msg_id: msg.id,
            held,
        };
        if verdict != Verdict::New {
            // It will not be shown: its key is of no further use.
            self.release(&opened)?;
        }
        Ok(opened)
    }
}
