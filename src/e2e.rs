//! End-to-end encryption of messages, as the client does it.
//!
//! The servers only ever see the `body` of an [`Envelope`], which is:
//!
//! ```text
//! body = version (1 byte, = 1) || kind (1 byte) || sealed
//! aad  = "fastchat/dm/v1" || len(from) || from || len(to) || to || client_id (8, BE) || kind
//! sealed = AES-256-GCM under the sender/recipient pair key (see crate::crypto)
//! ```
//!
//! so the header (sender, recipient, message id, kind) is authenticated: a message re-addressed
//! or replayed under another id fails to open. Peer public keys come from the balancer's
//! directory and are pinned on first use; a key that later differs from the pin is refused until
//! the user runs `fastchat trust NAME`.

use std::collections::HashMap;

use crate::client::BalancerClient;
use crate::crypto::{to_hex, Identity, PairKey};
use crate::error::{Error, Result};
use crate::keystore::Keystore;
use crate::net::{Envelope, PublicKeys};

/// Body format version.
const VERSION: u8 = 1;

/// What a message body holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// UTF-8 text.
    Text = 1,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Text),
            _ => None,
        }
    }
}

/// A decrypted message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plain {
    /// A text message.
    Text(String),
}

/// The associated data for a direct message.
fn aad(from: &str, to: &str, client_id: u64, kind: Kind) -> Vec<u8> {
    let mut a = Vec::with_capacity(32 + from.len() + to.len());
    a.extend_from_slice(b"fastchat/dm/v1");
    for name in [from, to] {
        a.push(name.len() as u8);
        a.extend_from_slice(name.as_bytes());
    }
    a.extend_from_slice(&client_id.to_be_bytes());
    a.push(kind as u8);
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

/// The key directory (the balancer), reconnected on demand: a long chat session outlives the
/// balancer's idle timeout.
pub struct Directory {
    addr: String,
    conn: Option<BalancerClient>,
}

impl Directory {
    /// A directory at the balancer `addr`; `conn` may be an already open connection.
    pub fn new(addr: &str, conn: Option<BalancerClient>) -> Directory {
        Directory {
            addr: addr.to_string(),
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
        let conn = self.conn.insert(BalancerClient::connect(&self.addr)?);
        f(conn)
    }

    /// A user's keys as the directory has them now.
    pub fn keys(&mut self, name: &str) -> Result<PublicKeys> {
        self.with(|c| c.keys(name))
    }
}

/// One user's end-to-end state: private keys, pinned peers, cached pair keys.
pub struct E2e {
    me: String,
    identity: Identity,
    store: Keystore,
    /// The key directory.
    pub directory: Directory,
    peers: HashMap<String, PairKey>,
}

impl E2e {
    /// State for `me`, whose keys are `identity`.
    pub fn new(me: &str, identity: Identity, store: Keystore, directory: Directory) -> E2e {
        E2e {
            me: me.to_string(),
            identity,
            store,
            directory,
            peers: HashMap::new(),
        }
    }

    /// Our own name.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// The pair key with `peer`, fetching and checking (or pinning) their keys the first time.
    fn pair_key(&mut self, peer: &str) -> Result<&PairKey> {
        if !self.peers.contains_key(peer) {
            let keys = self.checked_keys(peer)?;
            let key = self.identity.pair_key(&self.me, peer, &keys.x25519)?;
            self.peers.insert(peer.to_string(), key);
        }
        Ok(&self.peers[peer])
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

    /// Pins `peer`'s current directory keys, replacing an earlier pin; returns them.
    pub fn trust(&mut self, peer: &str) -> Result<PublicKeys> {
        let keys = self.directory.keys(peer)?;
        self.store.pin(peer, &keys)?;
        self.peers.remove(peer);
        Ok(keys)
    }

    /// Encrypts a text message for `to`.
    pub fn seal_text(&mut self, to: &str, client_id: u64, text: &str) -> Result<Vec<u8>> {
        let aad = aad(&self.me, to, client_id, Kind::Text);
        let sealed = self.pair_key(to)?.seal(&aad, text.as_bytes())?;
        let mut body = Vec::with_capacity(2 + sealed.len());
        body.push(VERSION);
        body.push(Kind::Text as u8);
        body.extend_from_slice(&sealed);
        Ok(body)
    }

    /// Decrypts and authenticates a message addressed to us.
    pub fn open(&mut self, msg: &Envelope) -> Result<Plain> {
        if msg.to != self.me {
            return Err(Error::Integrity(format!(
                "message {} is addressed to {}, not to us",
                msg.id, msg.to
            )));
        }
        let [version, kind, sealed @ ..] = msg.body.as_slice() else {
            return Err(Error::Integrity(format!("message {} is truncated", msg.id)));
        };
        if *version != VERSION {
            return Err(Error::Integrity(format!(
                "message {} uses unknown format version {version}",
                msg.id
            )));
        }
        let kind = Kind::from_byte(*kind).ok_or_else(|| {
            Error::Integrity(format!("message {} has unknown kind {kind}", msg.id))
        })?;
        let aad = aad(&msg.from, &msg.to, msg.client_id, kind);
        let plain = self.pair_key(&msg.from)?.open(&aad, sealed)?;
        match kind {
            Kind::Text => String::from_utf8(plain)
                .map(Plain::Text)
                .map_err(|_| Error::Integrity(format!("message {} is not UTF-8", msg.id))),
        }
    }
}
