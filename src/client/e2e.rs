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

use std::borrow::Cow;
use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::chains::Chains;
use super::history::{Entry, History};
use super::keystore::Keystore;
use super::prekeys::Prekeys;
use super::replay::{self, Accepted, Verdict};
use super::sender_keys::{self, SenderKeys};
use super::sessions::{self, HeldId, Session, Sessions};
use super::{BalancerClient, Client};
use crate::crypto::ratchet::{Header, Ratchet};
use crate::crypto::x3dh::{self, Init};
use crate::crypto::{self, to_hex, verify_signature, Identity, PairKey};
use crate::error::{Error, ErrorCode, Result};
use crate::membership::{self, After, Roster};
use crate::net::{
    Action, Change, Envelope, GroupInfo, PublicKeys, SignedChange, WrappedKey, MAX_CHANGES,
};
use crate::transport::Transport;

/// Body format version of group membership announcements (built by the server).
const VERSION: u8 = 2;

/// Body format version of sealed group messages (sender keys, a tag per member).
const GROUP_VERSION: u8 = 4;

/// Body format version of direct messages (the double ratchet).
const DIRECT_VERSION: u8 = 3;

/// The longest frame a direct message carries (its session, key agreement and header).
const MAX_FRAME: usize = 512;

/// The most new changes of one group fetched at once (a few hundred bytes each): all are
/// fetched before any is checked, and a hostile server must not make that list endless.
const MAX_CHAIN: usize = 65_536;

/// Length of a group message's tag for one member (HMAC-SHA256, truncated).
const TAG: usize = 16;

/// What a message body holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// UTF-8 text.
    Text = 1,
    /// A file: a MessagePack [`FileOffer`].
    File = 3,
    /// A group membership change, announced to the members by the server: a MessagePack
    /// [`SignedChange`], not encrypted (servers know who is in a group), checked against the
    /// group's verified chain.
    Change = 4,
    /// A receipt: a MessagePack [`Receipt`] (direct messages only).
    Receipt = 5,
    /// A sender's chain key for a group epoch: a MessagePack [`SenderKey`] (direct messages
    /// only; see [`super::sender_keys`]).
    SenderKey = 6,
}

impl Kind {
    /// The kind a body's second byte names, if it names one.
    pub fn from_byte(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Text),
            3 => Some(Kind::File),
            4 => Some(Kind::Change),
            5 => Some(Kind::Receipt),
            6 => Some(Kind::SenderKey),
            _ => None,
        }
    }
}

/// How far a message got on its recipient's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Reached {
    /// The recipient's client received and decrypted it.
    Delivered,
    /// It was shown to the recipient (printed by `recv`, or in the chat's conversation).
    Read,
}

/// A receipt, sent back by a message's recipient to its sender, end-to-end encrypted and
/// authenticated like any direct message (so a server can neither forge nor read it), and
/// only if the recipient has not turned receipts off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// How far the messages got.
    pub reached: Reached,
    /// The messages: the id the server gave each, and the sender's own id for it.
    pub of: Vec<(i64, u64)>,
}

/// Most messages one receipt speaks for.
pub const MAX_RECEIPT: usize = 1024;

/// A sender's chain key for one epoch of a group, handed to each other member of the epoch in
/// a direct message (so sealed in their pairwise ratchet) before the sender's first group
/// message of the epoch.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SenderKey {
    /// The group.
    pub group: String,
    /// The key epoch.
    pub epoch: u64,
    /// The chain key of message `n`.
    pub key: [u8; 32],
    /// The number of the sender's next message in the chain.
    pub n: u32,
    /// The key the sender's tags for this member are made with (this member's alone, so
    /// no other member can make a message pass as the sender's).
    pub mac: [u8; 32],
}

impl std::fmt::Debug for SenderKey {
    /// Everything but the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SenderKey")
            .field("group", &self.group)
            .field("epoch", &self.epoch)
            .field("n", &self.n)
            .finish_non_exhaustive()
    }
}

/// What a file message carries, encrypted: where the file's chunks are and how to open and
/// check them. The chunks themselves are sealed under `key` (see [`crate::client::files`]).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileOffer {
    /// The sender's name for the file (the receiver makes it safe before using it).
    pub name: String,
    /// Plaintext size in bytes.
    pub size: u64,
    /// SHA-256 of the whole plaintext.
    #[serde(with = "serde_bytes")]
    pub sha256: Vec<u8>,
    /// The random 256-bit file key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
}

impl std::fmt::Debug for FileOffer {
    /// Everything but the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileOffer")
            .field("name", &self.name)
            .field("size", &self.size)
            .field("sha256", &to_hex(&self.sha256))
            .finish_non_exhaustive()
    }
}

/// A decrypted, authenticated message (a group message's signature is checked too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plain {
    /// A text message.
    Text(String),
    /// A file offer (the file is fetched separately).
    File(FileOffer),
    /// A change of a group's membership, verified against the group's chain: what it says
    /// (`alice added carol`).
    Membership(String),
    /// A receipt for messages this user sent.
    Receipt(Receipt),
    /// The signed change that removed the recipient from a group, sent to them by whoever
    /// removed them (they are no longer a member, so the group's announcement does not reach
    /// them). Shown as the [`Plain::Membership`] it describes once checked.
    Removal(SignedChange),
    /// A member's chain key for a group epoch (installed when opened; not shown).
    SenderKey(SenderKey),
}

impl Plain {
    fn kind(&self) -> Kind {
        match self {
            Plain::Text(_) => Kind::Text,
            Plain::File(_) => Kind::File,
            Plain::Membership(_) => Kind::Change,
            Plain::Receipt(_) => Kind::Receipt,
            Plain::Removal(_) => Kind::Change,
            Plain::SenderKey(_) => Kind::SenderKey,
        }
    }

    fn bytes(&self) -> Result<Cow<'_, [u8]>> {
        Ok(match self {
            Plain::Text(t) => Cow::Borrowed(t.as_bytes()),
            Plain::File(offer) => {
                Cow::Owned(rmp_serde::to_vec(offer).map_err(|e| Error::Invalid(e.to_string()))?)
            }
            Plain::Receipt(r) => {
                Cow::Owned(rmp_serde::to_vec(r).map_err(|e| Error::Invalid(e.to_string()))?)
            }
            Plain::Removal(signed) => Cow::Owned(crate::net::encode(signed)?),
            Plain::SenderKey(k) => {
                Cow::Owned(rmp_serde::to_vec(k).map_err(|e| Error::Invalid(e.to_string()))?)
            }
            Plain::Membership(_) => {
                return Err(Error::Invalid(
                    "membership changes are signed changes, not messages".into(),
                ))
            }
        })
    }

    fn decode(kind: Kind, plain: Vec<u8>, msg_id: i64) -> Result<Plain> {
        let bad = |why: &str| Error::Integrity(format!("message {msg_id} {why}"));
        if kind == Kind::File {
            let offer: FileOffer =
                rmp_serde::from_slice(&plain).map_err(|_| bad("holds a malformed file offer"))?;
            if offer.key.len() != 32 || offer.sha256.len() != 32 {
                return Err(bad("holds a malformed file offer"));
            }
            return Ok(Plain::File(offer));
        }
        if kind == Kind::Change {
            let signed: SignedChange =
                crate::net::decode(&plain).map_err(|_| bad("holds a malformed group change"))?;
            return Ok(Plain::Removal(signed));
        }
        if kind == Kind::SenderKey {
            let key: SenderKey =
                rmp_serde::from_slice(&plain).map_err(|_| bad("holds a malformed sender key"))?;
            return Ok(Plain::SenderKey(key));
        }
        if kind == Kind::Receipt {
            let receipt: Receipt =
                rmp_serde::from_slice(&plain).map_err(|_| bad("holds a malformed receipt"))?;
            if receipt.of.is_empty() || receipt.of.len() > MAX_RECEIPT {
                return Err(bad("holds a receipt for no messages, or too many"));
            }
            return Ok(Plain::Receipt(receipt));
        }
        if kind != Kind::Text {
            return Err(bad("is not a sealed message"));
        }
        let text = String::from_utf8(plain).map_err(|_| bad("is not UTF-8"))?;
        Ok(Plain::Text(text))
    }
}

/// Appends a length-prefixed name (names are at most 32 bytes).
fn push_name(a: &mut Vec<u8>, name: &str) {
    a.push(name.len() as u8);
    a.extend_from_slice(name.as_bytes());
}

/// The associated data for a direct message in `session`.
fn direct_aad(from: &str, to: &str, client_id: u64, seq: u64, kind: Kind, session: u64) -> Vec<u8> {
    let mut a = Vec::with_capacity(48 + from.len() + to.len());
    a.extend_from_slice(b"fastchat/dm/v3");
    push_name(&mut a, from);
    push_name(&mut a, to);
    a.extend_from_slice(&client_id.to_be_bytes());
    a.extend_from_slice(&seq.to_be_bytes());
    a.push(kind as u8);
    a.extend_from_slice(&session.to_be_bytes());
    a
}

/// What a direct message carries in clear between its sequence and its ciphertext.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame {
    /// The session it is sealed in.
    pub session: u64,
    /// The key agreement that started the session, while its initiator has not heard back.
    pub init: Option<Init>,
    /// The ratchet header.
    pub header: Header,
}

/// A direct message taken apart, not yet opened.
pub struct Direct<'a> {
    /// What it holds.
    pub kind: Kind,
    /// The sender's sequence.
    pub seq: u64,
    /// Its session, key agreement and ratchet header.
    pub frame: Frame,
    /// The ciphertext.
    pub sealed: &'a [u8],
    /// The associated data it was sealed with.
    pub ad: Vec<u8>,
}

/// Takes a direct message's body apart.
pub fn parse_direct(msg: &Envelope) -> Result<Direct<'_>> {
    let bad = |why: &str| Error::Integrity(format!("message {} {why}", msg.id));
    let (kind, rest) = split_body(msg, DIRECT_VERSION)?;
    let (seq, rest) = take_u64(rest).ok_or_else(|| bad("is truncated"))?;
    let (len, rest) = rest
        .split_first_chunk::<2>()
        .ok_or_else(|| bad("is truncated"))?;
    let len = u16::from_be_bytes(*len) as usize;
    if len > MAX_FRAME || rest.len() < len {
        return Err(bad("is truncated"));
    }
    let (frame, sealed) = rest.split_at(len);
    let frame: Frame = rmp_serde::from_slice(frame).map_err(|_| bad("has a malformed frame"))?;
    let ad = direct_aad(&msg.from, &msg.to, msg.client_id, seq, kind, frame.session);
    Ok(Direct {
        kind,
        seq,
        frame,
        sealed,
        ad,
    })
}

impl Direct<'_> {
    /// The content, from the plaintext the ratchet gave.
    pub fn authentic(&self, plain: Vec<u8>, msg_id: i64) -> Result<Authentic> {
        Ok(Authentic {
            plain: Plain::decode(self.kind, plain, msg_id)?,
            seq: self.seq,
        })
    }
}

/// A direct message body from `from` to `to` in `session`, as the sender's message `seq`,
/// sealed at `now_ms`. The session's ratchet moves on: save it before the body leaves.
pub fn seal_direct_in(
    session: &mut Session,
    from: &str,
    to: &str,
    client_id: u64,
    seq: u64,
    plain: &Plain,
    now_ms: i64,
) -> Result<Vec<u8>> {
    let kind = plain.kind();
    let ad = direct_aad(from, to, client_id, seq, kind, session.id);
    let (header, sealed) = session.ratchet.seal(&ad, &plain.bytes()?, now_ms)?;
    let frame = Frame {
        session: session.id,
        init: session.init.clone(),
        header,
    };
    let frame = rmp_serde::to_vec(&frame).map_err(|e| Error::Invalid(e.to_string()))?;
    let mut body = Vec::with_capacity(12 + frame.len() + sealed.len());
    body.push(DIRECT_VERSION);
    body.push(kind as u8);
    body.extend_from_slice(&seq.to_be_bytes());
    body.extend_from_slice(&(frame.len() as u16).to_be_bytes());
    body.extend_from_slice(&frame);
    body.extend_from_slice(&sealed);
    Ok(body)
}

/// Opens a direct message in `session` (the caller found the session the frame names).
pub fn open_direct_in(session: &mut Session, msg: &Envelope, now_ms: i64) -> Result<Authentic> {
    let direct = parse_direct(msg)?;
    let plain = session
        .ratchet
        .open(&direct.ad, &direct.frame.header, direct.sealed, now_ms)?;
    direct.authentic(plain, msg.id)
}

/// Where a group message sits in its group: the epoch whose key seals it and the sender's
/// sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupSeq {
    /// The key epoch.
    pub epoch: u64,
    /// The sender's sequence (see the module documentation).
    pub seq: u64,
    /// The message's number in the sender's chain of the epoch (its sender key).
    pub n: u32,
}

/// The associated data (and, with the ciphertext, the signed bytes) of a group message.
pub fn group_aad(
    group: &str,
    from: &str,
    client_id: u64,
    at: GroupSeq,
    kind: Kind,
    tags: u16,
) -> Vec<u8> {
    let mut a = Vec::with_capacity(60 + group.len() + from.len());
    a.extend_from_slice(b"fastchat/grp/v4");
    push_name(&mut a, group);
    push_name(&mut a, from);
    a.extend_from_slice(&client_id.to_be_bytes());
    a.extend_from_slice(&at.epoch.to_be_bytes());
    a.extend_from_slice(&at.seq.to_be_bytes());
    a.extend_from_slice(&at.n.to_be_bytes());
    a.push(kind as u8);
    a.extend_from_slice(&tags.to_be_bytes());
    a
}

/// The key a group message is sealed under: its key from the sender's chain, bound to the
/// epoch's key (HKDF). The chain brings forward secrecy; the epoch key, wrapped only for the
/// epoch's verified members, keeps anyone else out even if they were handed a chain key.
pub fn group_message_key(epoch_key: &PairKey, chain_key: &[u8; 32]) -> Result<PairKey> {
    Ok(PairKey(crypto::hkdf_sha256(
        chain_key,
        &epoch_key.0,
        b"fastchat/grp/v3",
    )?))
}

/// Reads a big-endian u64 off the front of `bytes`.
fn take_u64(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let (head, rest) = bytes.split_first_chunk::<8>()?;
    Some((u64::from_be_bytes(*head), rest))
}

/// A message that opened: what it says and its sender's sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authentic {
    /// The content.
    pub plain: Plain,
    /// The sender's sequence, authenticated with the content.
    pub seq: u64,
}

/// The associated data of a group key wrapped by `wrapper` for `member`.
pub fn wrap_aad(group: &str, epoch: u64, member: &str, wrapper: &str) -> Vec<u8> {
    let mut a = Vec::with_capacity(64);
    a.extend_from_slice(b"fastchat/gk/v1");
    push_name(&mut a, group);
    a.extend_from_slice(&epoch.to_be_bytes());
    push_name(&mut a, member);
    push_name(&mut a, wrapper);
    a
}

/// Short printable fingerprint of a user's keys (first 16 bytes of SHA-256, hex, grouped).
pub fn fingerprint(keys: &PublicKeys) -> Result<String> {
    let mut both = keys.x25519.clone();
    both.extend_from_slice(&keys.ed25519);
    let digest = crate::crypto::sha256(&both)?;
    let hex = to_hex(&digest[..16]);
    Ok(hex
        .as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).unwrap_or(""))
        .collect::<Vec<_>>()
        .join(" "))
}

/// The key directory (the balancer), asked as a logged-in user and reconnected on demand: a
/// long chat session outlives the balancer's idle timeout.
pub struct Directory {
    addr: String,
    transport: Transport,
    session: super::Session,
    conn: Option<BalancerClient>,
}

impl Directory {
    /// A directory at the balancer `addr`, reached with `transport` and asked as `session`'s
    /// user; `conn` may be an already open connection.
    pub fn new(
        addr: &str,
        transport: &Transport,
        session: &super::Session,
        conn: Option<BalancerClient>,
    ) -> Directory {
        Directory {
            addr: addr.to_string(),
            transport: transport.clone(),
            session: session.clone(),
            conn,
        }
    }

    /// Runs `f` on a connection, reconnecting once if the old one has gone.
    pub fn with<T>(&mut self, mut f: impl FnMut(&mut BalancerClient) -> Result<T>) -> Result<T> {
        if let Some(conn) = self.conn.as_mut() {
            match f(conn) {
                Err(e) if e.is_disconnect() => self.conn = None,
                other => return other,
            }
        }
        let conn = self
            .conn
            .insert(BalancerClient::connect(&self.addr, &self.transport)?);
        f(conn)
    }

    /// A user's keys as the directory has them now.
    pub fn keys(&mut self, name: &str) -> Result<PublicKeys> {
        let session = self.session.clone();
        self.with(|c| c.keys(&session, name))
    }

    /// A user's prekey bundle (taking one of their one-time prekeys), if they published one.
    pub fn bundle(&mut self, name: &str) -> Result<Option<x3dh::Bundle>> {
        let session = self.session.clone();
        self.with(|c| c.bundle(&session, name))
    }
}

/// The kind of a message body (format `version`) and what follows the kind byte.
fn split_body(msg: &Envelope, version: u8) -> Result<(Kind, &[u8])> {
    let bad = |why: String| Error::Integrity(format!("message {} {why}", msg.id));
    let [found, kind, rest @ ..] = msg.body.as_slice() else {
        return Err(bad("is truncated".into()));
    };
    if *found != version {
        return Err(bad(format!(
            "uses format version {found}, not {version} (direct messages from before forward \
             secrecy, and any from before replay protection, are not accepted)"
        )));
    }
    let kind = Kind::from_byte(*kind).ok_or_else(|| bad(format!("has unknown kind {kind}")))?;
    Ok((kind, rest))
}

/// The order of a group message's tags: the epoch's members but its sender, by name.
pub fn tag_order(members: &[String], sender: &str) -> Vec<String> {
    let mut others: Vec<String> = members.iter().filter(|m| *m != sender).cloned().collect();
    others.sort();
    others
}

/// A group message's tag for the member whose authentication key is `mac`.
fn group_tag(mac: &[u8; 32], aad: &[u8], sealed: &[u8]) -> [u8; TAG] {
    let full = crypto::hmac_sha256(mac, &[aad, sealed]);
    let mut tag = [0u8; TAG];
    tag.copy_from_slice(&full[..TAG]);
    tag
}

/// A group message body from `from`, sealed under `key` (its key from the sender's chain,
/// bound to the epoch's: [`group_message_key`]), with a tag for each other member of the
/// epoch made with the authentication key the sender handed that member (`macs`, in
/// [`tag_order`]).
pub fn seal_group_with(
    key: &PairKey,
    macs: &[[u8; 32]],
    group: &str,
    from: &str,
    client_id: u64,
    at: GroupSeq,
    plain: &Plain,
) -> Result<Vec<u8>> {
    let kind = plain.kind();
    let count = u16::try_from(macs.len())
        .map_err(|_| Error::Invalid("too many members for one message".into()))?;
    let aad = group_aad(group, from, client_id, at, kind, count);
    let sealed = key.seal(&aad, &plain.bytes()?)?;
    let mut body = Vec::with_capacity(24 + TAG * macs.len() + sealed.len());
    body.push(GROUP_VERSION);
    body.push(kind as u8);
    body.extend_from_slice(&at.epoch.to_be_bytes());
    body.extend_from_slice(&at.seq.to_be_bytes());
    body.extend_from_slice(&at.n.to_be_bytes());
    body.extend_from_slice(&count.to_be_bytes());
    for mac in macs {
        body.extend_from_slice(&group_tag(mac, &aad, &sealed));
    }
    body.extend_from_slice(&sealed);
    Ok(body)
}

/// A group message taken apart, neither authenticated nor decrypted yet.
pub struct GroupBody<'a> {
    /// The epoch whose key opens it, the sender's sequence and its number in its chain.
    pub at: GroupSeq,
    kind: Kind,
    aad: Vec<u8>,
    tags: &'a [u8],
    sealed: &'a [u8],
    msg_id: i64,
}

impl GroupBody<'_> {
    /// How many tags it carries (one per other member of its epoch).
    pub fn tags(&self) -> usize {
        self.tags.len() / TAG
    }

    /// Checks the tag at `index` (our place in [`tag_order`]) with the authentication key
    /// the sender handed us.
    pub fn check(&self, index: usize, mac: &[u8; 32], from: &str) -> Result<()> {
        let tag = self.tags.get(index * TAG..(index + 1) * TAG);
        let want = group_tag(mac, &self.aad, self.sealed);
        match tag {
            Some(tag) if openssl::memcmp::eq(tag, &want) => Ok(()),
            _ => Err(Error::Integrity(format!(
                "group message {} does not carry a valid tag of {from}",
                self.msg_id
            ))),
        }
    }

    /// Decrypts with the message's key ([`group_message_key`]); check its tag first.
    pub fn open(self, key: &PairKey) -> Result<Authentic> {
        let plain = Plain::decode(self.kind, key.open(&self.aad, self.sealed)?, self.msg_id)?;
        Ok(Authentic {
            plain,
            seq: self.at.seq,
        })
    }
}

/// Takes a group message's body apart.
pub fn parse_group(msg: &Envelope) -> Result<GroupBody<'_>> {
    let bad = |why: &str| Error::Integrity(format!("group message {} {why}", msg.id));
    let group = msg.group.as_deref().ok_or_else(|| bad("names no group"))?;
    let (kind, rest) = split_body(msg, GROUP_VERSION)?;
    let (epoch, rest) = take_u64(rest).ok_or_else(|| bad("is truncated"))?;
    let (seq, rest) = take_u64(rest).ok_or_else(|| bad("is truncated"))?;
    let (n, rest) = rest
        .split_first_chunk::<4>()
        .ok_or_else(|| bad("is truncated"))?;
    let (count, rest) = rest
        .split_first_chunk::<2>()
        .ok_or_else(|| bad("is truncated"))?;
    let count = u16::from_be_bytes(*count);
    if rest.len() < TAG * count as usize {
        return Err(bad("is truncated"));
    }
    let (tags, sealed) = rest.split_at(TAG * count as usize);
    let at = GroupSeq {
        epoch,
        seq,
        n: u32::from_be_bytes(*n),
    };
    Ok(GroupBody {
        at,
        kind,
        aad: group_aad(group, &msg.from, msg.client_id, at, kind, count),
        tags,
        sealed,
        msg_id: msg.id,
    })
}

/// `change`, signed by `identity` (its maker's).
pub fn sign_change(identity: &Identity, change: Change) -> Result<SignedChange> {
    let signature = identity.sign(&membership::signed_bytes(&change))?;
    Ok(SignedChange { change, signature })
}

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
                        Error::Integrity(format!(
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

    // -----------------------------------------------------------------------------------------
    // Groups.

    /// An announced membership change: shown once it is found in the group's verified chain.
    fn open_change(&mut self, client: &Client, group: &str, msg: &Envelope) -> Result<Opened> {
        let (_, rest) = split_body(msg, VERSION)?;
        let announced: SignedChange = crate::net::decode(rest).map_err(|_| {
            Error::Integrity(format!("message {} holds a malformed group change", msg.id))
        })?;
        let c = &announced.change;
        if c.group != group || c.by != msg.from {
            return Err(Error::Integrity(format!(
                "message {} announces a change of {} by {} as one of {group} by {}",
                msg.id, c.group, c.by, msg.from
            )));
        }
        if self.chains.get(group)?.change(c.seq).is_none() {
            self.sync_group(client, group)?;
        }
        if self.chains.get(group)?.change(c.seq) != Some(&announced) {
            return Err(Error::Integrity(format!(
                "message {} announces a change of {group} that its verified chain does not have",
                msg.id
            )));
        }
        let conversation = format!("c:{group}");
        let verdict = self.accepted()?.check(&conversation, c.seq, msg.id)?;
        Ok(Opened {
            plain: Plain::Membership(membership::describe(c)),
            verdict,
            conversation,
            seq: c.seq,
            msg_id: msg.id,
            held: None,
        })
    }

    /// Signs a change as us.
    fn sign_change(&self, change: Change) -> Result<SignedChange> {
        sign_change(&self.identity, change)
    }

    /// The Ed25519 key of a change's maker: ours, or their pinned one.
    fn signer_key(&mut self, user: &str) -> Result<Vec<u8>> {
        if user == self.me {
            return Ok(self.identity.public()?.ed25519);
        }
        Ok(self.peer_keys(user)?.ed25519.clone())
    }

    /// Brings our verified copy of `group`'s chain up to date with what the server has: each
    /// new change must carry its maker's signature and follow the rules from the change
    /// before it, or the whole answer is refused with a warning. Every new change is fetched
    /// before any is checked: a maker's key change vouches for the changes they signed
    /// before it with their earlier key ([`membership::signers`]).
    pub fn sync_group(&mut self, client: &Client, group: &str) -> Result<()> {
        let mut chain = self.chains.get(group)?.clone();
        let after = chain.head().map_or(0, |r| r.seq);
        let mut new: Vec<SignedChange> = Vec::new();
        loop {
            let batch = client.group_log(group, after + new.len() as u64)?;
            let more = batch.len() >= MAX_CHANGES;
            new.extend(batch);
            if !more {
                break;
            }
            if new.len() > MAX_CHAIN {
                return Err(Error::Integrity(format!(
                    "WARNING: the server sends {group} with more than {MAX_CHAIN} changes; \
                     refusing it"
                )));
            }
        }
        // A long-running client may hold a maker's keys from before a key change (or a
        // `trust` in another process): with something new to check, ask the directory again.
        for signed in &new {
            let by = &signed.change.by;
            if *by != self.me {
                self.keys.remove(by);
                self.peers.remove(by);
            }
        }
        let signers = membership::signers(&new, |by| self.signer_key(by))?;
        for (signed, key) in new.iter().zip(signers) {
            let c = &signed.change;
            let forged = |why: String| {
                Error::Integrity(format!(
                    "WARNING: change {} of {group} ({}) {why}. The server may be forging \
                     the group's membership; refusing it",
                    c.seq,
                    membership::describe(c)
                ))
            };
            if c.group != group {
                return Err(forged(format!("belongs to {}", c.group)));
            }
            if !verify_signature(&key, &membership::signed_bytes(c), &signed.signature)? {
                return Err(forged(format!(
                    "does not carry a valid signature of {}",
                    c.by
                )));
            }
            chain.extend(signed.clone()).map_err(|e| match e {
                Error::Refused {
                    code: ErrorCode::UnknownGroup,
                    ..
                } => forged(format!("was made by {}, who is not a member", c.by)),
                e => forged(format!("breaks the group's rules ({e})")),
            })?;
        }
        self.chains.append(group, &new)
    }

    /// The verified members of `group` in key epoch `epoch` (fetching newer changes first if
    /// our chain stops before it).
    fn roster_at(&mut self, client: &Client, group: &str, epoch: u64) -> Result<Roster> {
        if self.chains.get(group)?.at(epoch).is_none() {
            self.sync_group(client, group)?;
        }
        self.chains.get(group)?.at(epoch).cloned().ok_or_else(|| {
            Error::Integrity(format!(
                "key epoch {epoch} of {group} is not in its verified chain of changes"
            ))
        })
    }

    /// The group as its verified chain says now (after fetching what is new).
    pub fn group_roster(&mut self, client: &Client, group: &str) -> Result<Roster> {
        self.sync_group(client, group)?;
        self.chains
            .get(group)?
            .head()
            .cloned()
            .ok_or_else(|| Error::Integrity(format!("{group} has no verified chain of changes")))
    }

    /// Wraps a group key for `member`.
    fn wrap(&mut self, group: &str, epoch: u64, member: &str, key: &PairKey) -> Result<WrappedKey> {
        let aad = wrap_aad(group, epoch, member, &self.me);
        let wrapped = self.pair_key(member)?.seal(&aad, &key.0)?;
        Ok(WrappedKey {
            member: member.to_string(),
            wrapped,
        })
    }

    /// Wraps `key` for each of `members`.
    fn wrap_all(
        &mut self,
        group: &str,
        epoch: u64,
        members: &[String],
        key: &PairKey,
    ) -> Result<Vec<WrappedKey>> {
        members
            .iter()
            .map(|m| self.wrap(group, epoch, m, key))
            .collect()
    }

    /// The key of `epoch` of `group`: cached, or fetched from the server and unwrapped. It
    /// must have been wrapped by whoever may key that epoch: the maker of the change that
    /// started it, or, after a leave, a member of the epoch.
    pub fn group_key(&mut self, client: &Client, group: &str, epoch: u64) -> Result<PairKey> {
        let slot = (group.to_string(), epoch);
        if let Some(k) = self.group_keys.get(&slot) {
            return Ok(k.clone());
        }
        let sealed = client.group_key(group, epoch)?;
        let by = sealed.wrapped_by;
        let roster = self.roster_at(client, group, epoch)?;
        let starter = self.chains.get(group)?.change(epoch).cloned();
        let allowed = match starter.map(|c| c.change) {
            Some(Change {
                action: Action::Leave,
                ..
            }) => roster.has(&by),
            Some(c) => c.by == by,
            None => false,
        };
        if !allowed {
            return Err(Error::Integrity(format!(
                "WARNING: the key of {group} epoch {epoch} was wrapped by {by}, who may not key \
                 that epoch; refusing it"
            )));
        }
        let aad = wrap_aad(group, epoch, &self.me, &by);
        let raw = self.pair_key(&by)?.open(&aad, &sealed.key)?;
        let key = PairKey(raw.try_into().map_err(|_| {
            Error::Integrity(format!(
                "the key of {group} epoch {epoch} has the wrong size"
            ))
        })?);
        self.group_keys.insert(slot, key.clone());
        Ok(key)
    }

    /// Checks a removal sent to us by `from`: their own signed change, removing us, that
    /// follows from the group's chain as we verified it (when we have it up to there). Says
    /// what happened; forgets the group's chain, which is no longer ours to follow.
    fn removal(&mut self, from: &str, signed: &SignedChange) -> Result<String> {
        let c = &signed.change;
        let forged = |why: &str| {
            Error::Integrity(format!(
                "a removal from {} sent by {from} {why}; refusing it",
                c.group
            ))
        };
        if c.by != from || c.action != Action::Remove(self.me.clone()) {
            return Err(forged("is not theirs, or does not remove us"));
        }
        let key = self.signer_key(from)?;
        if !verify_signature(&key, &membership::signed_bytes(c), &signed.signature)? {
            return Err(forged("does not carry their valid signature"));
        }
        let chain = self.chains.get(&c.group)?;
        let checked = match (chain.change(c.seq), chain.head()) {
            (Some(known), _) => known == signed,
            (None, Some(head)) if head.seq + 1 == c.seq => {
                membership::apply(Some(head), signed).is_ok()
            }
            // We never saw the group up to there: the signature is all we can check.
            _ => {
                return Ok(format!(
                    "{from} removed you from {} (their signature checked; this client had not                      followed the group up to then)",
                    c.group
                ))
            }
        };
        if !checked {
            return Err(forged("does not follow from the group's chain"));
        }
        self.chains.forget(&c.group)?;
        self.forget_sender_keys(&c.group)?;
        self.group_keys.retain(|(g, _), _| *g != c.group);
        Ok(format!("{from} removed you from {}", c.group))
    }

    /// Makes, signs and submits a change of `group` (with the new epoch's key for exactly the
    /// members after it), and adds it to our verified chain. Tries again if the group changed
    /// meanwhile; a change that went through although its reply was lost is found in the
    /// chain. Returns the group after the change (`None`: it is gone).
    fn change_group(&mut self, client: &Client, group: &str, action: Action) -> Result<After> {
        let mut tries = 0;
        loop {
            tries += 1;
            if action != Action::Create {
                self.sync_group(client, group)?;
            }
            let before = self.chains.get(group)?.head().cloned();
            let (seq, prev) = before
                .as_ref()
                .map_or((1, Vec::new()), |r| (r.seq + 1, r.head.clone()));
            let signed = self.sign_change(Change {
                group: group.to_string(),
                seq,
                prev,
                by: self.me.clone(),
                action: action.clone(),
            })?;
            let after = membership::apply(before.as_ref(), &signed)?;
            let key = PairKey::random()?;
            let keys = self.wrap_all(group, seq, &membership::keyed_for(&after, &action), &key)?;
            let client_id = crypto::random_u64()?;
            match client.group_change(&signed, keys, client_id) {
                Ok(_) => {}
                Err(Error::Refused {
                    code: ErrorCode::Conflict,
                    ..
                }) if action != Action::Create && tries < 4 => {
                    self.sync_group(client, group)?;
                    if self.chains.get(group)?.change(seq) != Some(&signed) {
                        continue;
                    }
                }
                Err(e) => return Err(e),
            }
            match &after {
                After::Roster(_) if action == Action::Leave => {
                    self.chains.forget(group)?;
                    self.forget_sender_keys(group)?;
                }
                After::Roster(_) => {
                    if self.chains.get(group)?.change(seq).is_none() {
                        self.chains.append(group, std::slice::from_ref(&signed))?;
                    }
                    if action != Action::Leave {
                        self.group_keys.insert((group.to_string(), seq), key);
                        self.epochs.insert(group.to_string(), seq);
                    }
                }
                After::Deleted => {
                    self.chains.forget(group)?;
                    self.forget_sender_keys(group)?;
                }
            }
            if action == Action::Leave {
                self.epochs.remove(group);
            }
            return Ok(after);
        }
    }

    /// Creates `group` (named `OUR-NAME/...`) with us as admin, keyed with a fresh key.
    pub fn group_create(&mut self, client: &Client, group: &str) -> Result<()> {
        self.change_group(client, group, Action::Create).map(|_| ())
    }

    /// Adds `user` (admin only); the group moves to a new epoch keyed for everyone.
    pub fn group_add(&mut self, client: &Client, group: &str, user: &str) -> Result<()> {
        self.change_group(client, group, Action::Add(user.to_string()))
            .map(|_| ())
    }

    /// Removes `user` (admin only) and starts a new epoch whose key `user` never gets.
    /// Returns the new epoch.
    pub fn group_remove(&mut self, client: &Client, group: &str, user: &str) -> Result<u64> {
        let seq = match self.change_group(client, group, Action::Remove(user.to_string()))? {
            After::Roster(r) => r.seq,
            After::Deleted => return Err(Error::Protocol(format!("{group} is gone"))),
        };
        // The removed member no longer gets the group's messages: tell them directly, with
        // the signed change (best effort: the removal stands either way).
        if let Some(signed) = self.chains.get(group)?.change(seq).cloned() {
            let told = crypto::random_u64().and_then(|client_id| {
                let body = self.seal_direct(user, client_id, &Plain::Removal(signed))?;
                client.send(user, client_id, &body, None)
            });
            if let Err(e) = told {
                log::warn!("could not tell {user} they were removed from {group}: {e}");
            }
        }
        Ok(seq)
    }

    /// Adds our key change to `group` (after `fastchat rekey`), naming `old`, the Ed25519 key
    /// we signed our earlier changes with; the new epoch is keyed with our new keys.
    pub fn group_key_change(&mut self, client: &Client, group: &str, old: Vec<u8>) -> Result<()> {
        self.change_group(client, group, Action::KeyChange(old))
            .map(|_| ())
    }

    /// Adds our key change to `group` again (where `fastchat rekey` could not), naming the key
    /// it replaced.
    pub fn group_key_change_again(&mut self, client: &Client, group: &str) -> Result<()> {
        let old = self.store.replaced_key()?.ok_or_else(|| {
            Error::Invalid(
                "no key change to add: this user's keys were never made again (fastchat rekey)"
                    .into(),
            )
        })?;
        self.group_key_change(client, group, old)
    }

    /// Leaves `group`. The next member to send starts a new epoch.
    pub fn group_leave(&mut self, client: &Client, group: &str) -> Result<()> {
        self.change_group(client, group, Action::Leave).map(|_| ())
    }

    /// The current epoch and its key, making the key first if the epoch has none yet (after a
    /// member left): for the members of the verified chain, which must be the server's too.
    fn current_key(&mut self, client: &Client, info: &GroupInfo) -> Result<(u64, PairKey)> {
        let (group, epoch) = (info.name.as_str(), info.epoch);
        let roster = self.group_roster(client, group)?;
        if roster.seq != epoch {
            return Err(Error::Integrity(format!(
                "WARNING: the server says {group} is at change {epoch}, but its verified chain is \
                 at change {}; refusing to send",
                roster.seq
            )));
        }
        let mut listed = info.members.clone();
        let mut verified = roster.members.clone();
        listed.sort();
        verified.sort();
        if listed != verified {
            let ghosts: Vec<&String> = listed.iter().filter(|m| !roster.has(m)).collect();
            let missing: Vec<&String> = verified.iter().filter(|m| !listed.contains(m)).collect();
            return Err(Error::Integrity(format!(
                "WARNING: the server lists members of {group} that no signed change made \
                 ({ghosts:?}) or leaves out members ({missing:?}). The server may be forging \
                 the group's membership; refusing to key or send"
            )));
        }
        self.epochs.insert(group.to_string(), epoch);
        if info.keyed {
            return Ok((epoch, self.group_key(client, group, epoch)?));
        }
        let key = PairKey::random()?;
        let keys = self.wrap_all(group, epoch, &roster.members, &key)?;
        match client.group_rekey(group, epoch, keys) {
            Ok(()) => {
                self.group_keys
                    .insert((group.to_string(), epoch), key.clone());
                Ok((epoch, key))
            }
            // Another member keyed it first: use theirs.
            Err(Error::Refused {
                code: ErrorCode::Conflict,
                ..
            }) => Ok((epoch, self.group_key(client, group, epoch)?)),
            Err(e) => Err(e),
        }
    }

    /// The epoch to send in and its key: the cached ones, or the group's current state.
    fn send_key(&mut self, client: &Client, group: &str, fresh: bool) -> Result<(u64, PairKey)> {
        if !fresh {
            if let Some(&epoch) = self.epochs.get(group) {
                if let Some(key) = self.group_keys.get(&(group.to_string(), epoch)) {
                    return Ok((epoch, key.clone()));
                }
            }
        }
        let info = client.group_info(group)?;
        self.current_key(client, &info)
    }

    /// Encrypts and sends `plain` to `group` (with a tag for each member); returns the stored
    /// message id. If the
    /// group moved to a new epoch meanwhile, fetches it and sends again (same client id).
    pub fn group_send(&mut self, client: &Client, group: &str, plain: &Plain) -> Result<i64> {
        self.group_send_with(client, group, plain, None)
    }

    /// Like [`E2e::group_send`], offering a finished upload.
    pub fn group_send_with(
        &mut self,
        client: &Client,
        group: &str,
        plain: &Plain,
        file: Option<i64>,
    ) -> Result<i64> {
        let client_id = crypto::random_u64()?;
        let seq = self.next_seq();
        let mut fresh = false;
        loop {
            let (epoch, key) = self.send_key(client, group, fresh)?;
            // Our chain of the epoch goes to its members first, then the message takes the
            // chain's next key (saved before the message leaves).
            let members = self.roster_at(client, group, epoch)?.members;
            self.hand_out(client, group, epoch, &members)?;
            let others = tag_order(&members, &self.me);
            let (n, chain_key, macs) = {
                let locked = self.sender_keys.lock(&self.store)?;
                let mut chains = locked.load(group)?;
                let macs = chains.macs(epoch, &others).ok_or_else(|| {
                    Error::Local(format!("a member of {group} has no key of ours yet"))
                })?;
                let (n, chain_key) = chains.next_key(epoch)?;
                locked.save(group, &chains)?;
                (n, chain_key, macs)
            };
            let at = GroupSeq { epoch, seq, n };
            let message_key = group_message_key(&key, &chain_key)?;
            let body = seal_group_with(&message_key, &macs, group, &self.me, client_id, at, plain)?;
            match client.group_send(group, client_id, epoch, &body, file) {
                Ok(msg_id) => return Ok(msg_id),
                Err(Error::Refused {
                    code: ErrorCode::Conflict,
                    ..
                }) if !fresh => fresh = true,
                Err(e) => return Err(e),
            }
        }
    }
}
