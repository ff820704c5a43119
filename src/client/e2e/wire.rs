//! The bytes of a message body: each kind of plaintext, the formats of direct and group
//! messages (laid out in [`super`]), their associated data, sealing and parsing. No state:
//! what a message is checked against (sessions, chains, pins) lives in [`super::E2e`].

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::client::sessions::Session;
use crate::crypto::ratchet::Header;
use crate::crypto::x3dh::Init;
use crate::crypto::{self, to_hex, Identity, PairKey};
use crate::error::{Error, Result};
use crate::membership;
use crate::net::{Change, Envelope, PublicKeys, SignedChange};

/// Body format version of group membership announcements (built by the server).
pub(super) const CHANGE_VERSION: u8 = 2;

/// Body format version of sealed group messages (sender keys, a tag per member).
const GROUP_VERSION: u8 = 4;

/// Body format version of direct messages (the double ratchet).
const DIRECT_VERSION: u8 = 3;

/// The longest frame a direct message carries (its session, key agreement and header).
const MAX_FRAME: usize = 512;

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
    /// only; see [`crate::client::sender_keys`]).
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

/// The kind of a message body (format `version`) and what follows the kind byte.
pub(super) fn split_body(msg: &Envelope, version: u8) -> Result<(Kind, &[u8])> {
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
