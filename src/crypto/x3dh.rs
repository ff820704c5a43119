//! The asynchronous key agreement that starts a conversation's double ratchet (after Signal's
//! X3DH): the initiator needs only what the responder published to the key directory, so the
//! first message can go while the responder is offline.
//!
//! The responder publishes a **bundle**: its identity keys, a signed prekey (X25519, signed
//! with its Ed25519 identity key, replaced now and then) and, while it has some, one-time
//! prekeys (each handed out once by the directory). The initiator checks the signature, makes
//! an ephemeral key, and computes
//!
//! ```text
//! DH1 = DH(IK_a, SPK_b)  DH2 = DH(EK_a, IK_b)  DH3 = DH(EK_a, SPK_b)  [DH4 = DH(EK_a, OPK_b)]
//! SK  = HKDF(DH1 || DH2 || DH3 [|| DH4], info = "fastchat/x3dh/v1" || names)
//! ```
//!
//! DH1 and DH2 authenticate both sides; DH3 and DH4 bring keys that are deleted after use, so
//! a later theft of the identity keys does not recompute SK. Without a one-time prekey (the
//! directory ran out) SK still rests on the signed prekey, which is deleted when replaced: the
//! window of exposure is the prekey's lifetime (docs/SECURITY.md).

use serde::{Deserialize, Serialize};

use super::ratchet::{dh, x25519_pair};
use super::{hkdf_sha256, verify_signature};
use crate::error::{Error, Result};

/// What a signed prekey's signature covers, before its public key.
const SIGNED_PREKEY: &[u8] = b"fastchat/signed-prekey/v1";

/// What the directory hands an initiator: the responder's keys for one key agreement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    /// The responder's identity X25519 key.
    #[serde(with = "serde_bytes")]
    pub identity: Vec<u8>,
    /// Its signed prekey's id.
    pub signed_prekey_id: u32,
    /// Its signed prekey's public key (X25519).
    #[serde(with = "serde_bytes")]
    pub signed_prekey: Vec<u8>,
    /// The Ed25519 signature of the signed prekey by the responder's identity.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
    /// A one-time prekey, while the directory has any: its id and public key.
    pub one_time: Option<(u32, serde_bytes::ByteBuf)>,
}

/// What the initiator sends with its first messages, so the responder can compute the same
/// secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Init {
    /// The initiator's ephemeral public key.
    #[serde(with = "serde_bytes")]
    pub ephemeral: Vec<u8>,
    /// Which signed prekey it used.
    pub signed_prekey_id: u32,
    /// Which one-time prekey it used, if the bundle had one.
    pub one_time_id: Option<u32>,
}

/// The bytes a signed prekey's signature covers.
pub fn signed_prekey_message(id: u32, public: &[u8]) -> Vec<u8> {
    let mut m = SIGNED_PREKEY.to_vec();
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(public);
    m
}

/// The context both sides bind the secret to: both names, in the initiator-responder order.
fn info(initiator: &str, responder: &str) -> Vec<u8> {
    let mut out = b"fastchat/x3dh/v1".to_vec();
    for name in [initiator, responder] {
        out.extend_from_slice(&(name.len() as u32).to_be_bytes());
        out.extend_from_slice(name.as_bytes());
    }
    out
}

fn derive(parts: &[[u8; 32]], initiator: &str, responder: &str) -> Result<[u8; 32]> {
    let ikm: Vec<u8> = parts.iter().flatten().copied().collect();
    hkdf_sha256(&ikm, &[0u8; 32], &info(initiator, responder))
}

/// The initiator's side: checks the bundle's signature against the responder's Ed25519
/// identity key (from the directory, checked as every key is), and returns the shared secret
/// and what to send.
pub fn initiate(
    me: &str,
    my_identity_private: &[u8],
    peer: &str,
    peer_ed25519: &[u8],
    bundle: &Bundle,
) -> Result<([u8; 32], Init)> {
    let signed = signed_prekey_message(bundle.signed_prekey_id, &bundle.signed_prekey);
    if !verify_signature(peer_ed25519, &signed, &bundle.signature)? {
        return Err(Error::Integrity(format!(
            "{peer}'s signed prekey does not carry {peer}'s signature"
        )));
    }
    let (ephemeral, ephemeral_public) = x25519_pair()?;
    let mut parts = vec![
        dh(my_identity_private, &bundle.signed_prekey)?,
        dh(&ephemeral, &bundle.identity)?,
        dh(&ephemeral, &bundle.signed_prekey)?,
    ];
    if let Some((_, one_time)) = &bundle.one_time {
        parts.push(dh(&ephemeral, one_time)?);
    }
    let secret = derive(&parts, me, peer)?;
    Ok((
        secret,
        Init {
            ephemeral: ephemeral_public,
            signed_prekey_id: bundle.signed_prekey_id,
            one_time_id: bundle.one_time.as_ref().map(|(id, _)| *id),
        },
    ))
}

/// The responder's side: the same secret, from its identity key, the private halves of the
/// prekeys the initiator named (the caller deletes the one-time prekey's once the first
/// message opened), and the initiator's identity X25519 key.
pub fn respond(
    me: &str,
    my_identity_private: &[u8],
    signed_prekey_private: &[u8],
    one_time_private: Option<&[u8]>,
    peer: &str,
    peer_identity: &[u8],
    init: &Init,
) -> Result<[u8; 32]> {
    let mut parts = vec![
        dh(signed_prekey_private, peer_identity)?,
        dh(my_identity_private, &init.ephemeral)?,
        dh(signed_prekey_private, &init.ephemeral)?,
    ];
    match (init.one_time_id, one_time_private) {
        (Some(_), Some(private)) => parts.push(dh(private, &init.ephemeral)?),
        (None, None) => {}
        (Some(id), None) => {
            return Err(Error::Integrity(format!(
                "one-time prekey {id} is used up or unknown"
            )))
        }
        (None, Some(_)) => {
            return Err(Error::Integrity(
                "a one-time prekey given for a key agreement that used none".into(),
            ))
        }
    }
    derive(&parts, peer, me)
}

/// A new signed prekey: (raw private, public, signature by `sign`).
pub fn signed_prekey(
    id: u32,
    sign: impl FnOnce(&[u8]) -> Result<Vec<u8>>,
) -> Result<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    let (private, public) = x25519_pair()?;
    let signature = sign(&signed_prekey_message(id, &public))?;
    Ok((private, public, signature))
}
