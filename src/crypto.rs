//! Cryptography: password hashing, session tokens, and the end-to-end message scheme.
//!
//! Everything here uses OpenSSL through the `openssl` crate.
//!
//! Password hashes are stored as one string:
//!
//! ```text
//! scrypt$<log2 N>$<r>$<p>$<salt, hex>$<32-byte hash, hex>
//! ```
//!
//! so the cost can change without invalidating existing accounts.
//!
//! Forward secrecy (not yet what messages use; issue 22): [`x3dh`], the asynchronous key
//! agreement over a published bundle of prekeys, and [`ratchet`], the double ratchet it
//! starts.
//!
//! End-to-end: each user has an X25519 key pair (agreement) and an Ed25519 key pair
//! (signatures), together an [`Identity`]. Two users share a [`PairKey`]:
//!
//! ```text
//! pair key = HKDF-SHA256(ikm  = X25519(my private, their public),
//!                        salt = "fastchat/pair/v1",
//!                        info = smaller name || 0x00 || larger name)
//! ```
//!
//! and seal with AES-256-GCM under a fresh random 96-bit nonce:
//!
//! ```text
//! sealed = nonce (12) || ciphertext || tag (16)
//! ```

use std::cell::RefCell;
use std::collections::HashMap;

use openssl::cipher_ctx::CipherCtx;
use openssl::derive::Deriver;
use openssl::error::ErrorStack;
use openssl::hash::{hash, MessageDigest};
use openssl::memcmp;
use openssl::pkey::{Id, PKey, Private, Public};
use openssl::rand::rand_bytes;
use openssl::sign::{Signer, Verifier};
use openssl::symm::Cipher;

use crate::error::{Error, Result};
use crate::net::PublicKeys;

pub mod ratchet;
pub mod x3dh;

/// Default scrypt cost: N = 2^15, r = 8, p = 1 (32 MiB and some tens of milliseconds a hash).
pub const DEFAULT_SCRYPT_LOG_N: u8 = 15;

/// Fills a fresh buffer with `n` bytes from OpenSSL's CSPRNG.
pub fn random_bytes(n: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    rand_bytes(&mut buf)?;
    Ok(buf)
}

/// A random u64, for request and message ids.
pub fn random_u64() -> Result<u64> {
    let mut buf = [0u8; 8];
    rand_bytes(&mut buf)?;
    Ok(u64::from_le_bytes(buf))
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> Result<[u8; 32]> {
    let digest = hash(MessageDigest::sha256(), data)?;
    let mut out = [0u8; 32];
    out.copy_from_slice(&digest);
    Ok(out)
}

/// Lower-case hex.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Parses lower- or upper-case hex; `None` if it is not hex.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.as_bytes()
        .chunks(2)
        .map(|pair| {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            Some((hi * 16 + lo) as u8)
        })
        .collect()
}

/// The scrypt cost used for new password hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScryptCost {
    /// log2 of N, the CPU/memory cost (1..=20).
    pub log_n: u8,
    /// Block size.
    pub r: u32,
    /// Parallelism.
    pub p: u32,
}

impl ScryptCost {
    /// The cost with the given log2 N and the standard r = 8, p = 1.
    pub fn with_log_n(log_n: u8) -> Result<ScryptCost> {
        if !(1..=20).contains(&log_n) {
            return Err(Error::Invalid(format!(
                "scrypt log2 N must be between 1 and 20, not {log_n}"
            )));
        }
        Ok(ScryptCost { log_n, r: 8, p: 1 })
    }
}

impl Default for ScryptCost {
    fn default() -> ScryptCost {
        ScryptCost {
            log_n: DEFAULT_SCRYPT_LOG_N,
            r: 8,
            p: 1,
        }
    }
}

fn scrypt(password: &str, salt: &[u8], cost: ScryptCost) -> Result<[u8; 32]> {
    let n = 1u64 << cost.log_n;
    let maxmem = 256 * u64::from(cost.r) * n * u64::from(cost.p) + (1 << 20);
    let mut out = [0u8; 32];
    openssl::pkcs5::scrypt(
        password.as_bytes(),
        salt,
        n,
        u64::from(cost.r),
        u64::from(cost.p),
        maxmem,
        &mut out,
    )?;
    Ok(out)
}

/// Hashes a password with a fresh 16-byte salt.
pub fn hash_password(password: &str, cost: ScryptCost) -> Result<String> {
    let salt = random_bytes(16)?;
    let out = scrypt(password, &salt, cost)?;
    Ok(format!(
        "scrypt${}${}${}${}${}",
        cost.log_n,
        cost.r,
        cost.p,
        to_hex(&salt),
        to_hex(&out)
    ))
}

/// Checks a password against a stored hash in constant time. A stored value that does not
/// parse is an error, not a mismatch, so corruption is noticed.
pub fn verify_password(password: &str, stored: &str) -> Result<bool> {
    let bad = || Error::Invalid("stored password hash is not in scrypt format".to_string());
    let parts: Vec<&str> = stored.split('$').collect();
    let [tag, log_n, r, p, salt, expected] = parts[..] else {
        return Err(bad());
    };
    if tag != "scrypt" {
        return Err(bad());
    }
    let cost = ScryptCost {
        log_n: log_n.parse().map_err(|_| bad())?,
        r: r.parse().map_err(|_| bad())?,
        p: p.parse().map_err(|_| bad())?,
    };
    let salt = from_hex(salt).ok_or_else(bad)?;
    let expected = from_hex(expected).ok_or_else(bad)?;
    if expected.len() != 32 || !(1..=20).contains(&cost.log_n) {
        return Err(bad());
    }
    let got = scrypt(password, &salt, cost)?;
    Ok(memcmp::eq(&got, &expected))
}

/// A new session token: 32 random bytes, hex. Only [`token_hash`] of it is stored.
pub fn new_token() -> Result<String> {
    Ok(to_hex(&random_bytes(32)?))
}

/// What the database keeps of a token or server secret: its SHA-256.
pub fn token_hash(token: &[u8]) -> Result<Vec<u8>> {
    Ok(sha256(token)?.to_vec())
}

/// The first line of a key file.
const KEY_FILE_TAG: &str = "fastchat-identity v2";

/// The associated data of a key file: whose keys they are.
fn key_file_aad(user: &str) -> Vec<u8> {
    let mut a = b"fastchat/identity/v2".to_vec();
    a.extend_from_slice(user.as_bytes());
    a
}

/// A user's private keys: X25519 for key agreement, Ed25519 for signatures.
pub struct Identity {
    x25519: PKey<Private>,
    ed25519: PKey<Private>,
}

impl Identity {
    /// Fresh key pairs.
    pub fn generate() -> Result<Identity> {
        Ok(Identity {
            x25519: PKey::generate_x25519()?,
            ed25519: PKey::generate_ed25519()?,
        })
    }

    /// Both private keys, raw (X25519 || Ed25519, 64 bytes), for the session agent; the
    /// caller wipes them after use.
    pub fn to_raw(&self) -> Result<Vec<u8>> {
        let mut both = self.x25519.raw_private_key()?;
        both.extend_from_slice(&self.ed25519.raw_private_key()?);
        Ok(both)
    }

    /// The raw private X25519 key (for the key agreement and the keys of the state files);
    /// the caller wipes it after use.
    pub fn x25519_private(&self) -> Result<Vec<u8>> {
        Ok(self.x25519.raw_private_key()?)
    }

    /// The identity from [`Identity::to_raw`]'s bytes.
    pub fn from_raw(both: &[u8]) -> Result<Identity> {
        if both.len() != 64 {
            return Err(Error::Invalid("an identity is 64 bytes of keys".into()));
        }
        Ok(Identity {
            x25519: PKey::private_key_from_raw_bytes(&both[..32], Id::X25519)?,
            ed25519: PKey::private_key_from_raw_bytes(&both[32..], Id::ED25519)?,
        })
    }

    /// The public halves, as uploaded to the directory.
    pub fn public(&self) -> Result<PublicKeys> {
        Ok(PublicKeys {
            x25519: self.x25519.raw_public_key()?,
            ed25519: self.ed25519.raw_public_key()?,
        })
    }

    /// Both private keys, sealed for a key file: AES-256-GCM under a key that scrypt derives
    /// from the password (cost `cost`, a fresh salt), the user's name bound in as associated
    /// data. See [`Identity::from_key_file`] for the format.
    pub fn to_key_file(&self, user: &str, password: &str, cost: ScryptCost) -> Result<Vec<u8>> {
        let salt = random_bytes(16)?;
        let key = PairKey(scrypt(password, &salt, cost)?);
        let mut both = self.to_raw()?;
        let sealed = key.seal(&key_file_aad(user), &both)?;
        both.fill(0);
        Ok(format!(
            "{KEY_FILE_TAG}\nscrypt {} {} {} {}\n{}\n",
            cost.log_n,
            cost.r,
            cost.p,
            to_hex(&salt),
            to_hex(&sealed)
        )
        .into_bytes())
    }

    /// Reads a key file written by [`Identity::to_key_file`]:
    ///
    /// ```text
    /// fastchat-identity v2
    /// scrypt LOG_N R P SALT-HEX
    /// NONCE || CIPHERTEXT || TAG, hex      plaintext: X25519 private (32) || Ed25519 private (32)
    /// ```
    ///
    /// Returns the identity and the file's scrypt cost. A wrong password (or a file of another
    /// user) is an [`Error::Integrity`].
    pub fn from_key_file(
        data: &[u8],
        user: &str,
        password: &str,
    ) -> Result<(Identity, ScryptCost)> {
        let bad =
            || Error::Invalid("the key file is damaged (not a fastchat-identity v2 file)".into());
        let text = std::str::from_utf8(data).map_err(|_| bad())?;
        let mut lines = text.lines();
        if lines.next() != Some(KEY_FILE_TAG) {
            return Err(bad());
        }
        let params: Vec<&str> = lines.next().ok_or_else(bad)?.split(' ').collect();
        let ["scrypt", log_n, r, p, salt] = params[..] else {
            return Err(bad());
        };
        let cost = ScryptCost {
            log_n: log_n.parse().map_err(|_| bad())?,
            r: r.parse().map_err(|_| bad())?,
            p: p.parse().map_err(|_| bad())?,
        };
        if !(1..=20).contains(&cost.log_n)
            || !(1..=32).contains(&cost.r)
            || !(1..=16).contains(&cost.p)
        {
            return Err(bad());
        }
        let salt = from_hex(salt).ok_or_else(bad)?;
        let sealed = from_hex(lines.next().ok_or_else(bad)?).ok_or_else(bad)?;
        let key = PairKey(scrypt(password, &salt, cost)?);
        let mut both = key.open(&key_file_aad(user), &sealed).map_err(|_| {
            Error::Integrity("cannot decrypt the key file: wrong password or damaged file".into())
        })?;
        if both.len() != 64 {
            both.fill(0);
            return Err(bad());
        }
        let identity = Identity::from_raw(&both);
        both.fill(0);
        Ok((identity?, cost))
    }

    /// Both private keys as encrypted PKCS#8 PEM (AES-256-CBC, PBKDF2 under the password), in
    /// that order: the key files before version 2, kept for tests of their migration.
    pub fn to_pem(&self, password: &str) -> Result<(Vec<u8>, Vec<u8>)> {
        let cipher = Cipher::aes_256_cbc();
        Ok((
            self.x25519
                .private_key_to_pem_pkcs8_passphrase(cipher, password.as_bytes())?,
            self.ed25519
                .private_key_to_pem_pkcs8_passphrase(cipher, password.as_bytes())?,
        ))
    }

    /// Reads keys written by [`Identity::to_pem`]; a wrong password is an [`Error::Integrity`].
    pub fn from_pem(x25519: &[u8], ed25519: &[u8], password: &str) -> Result<Identity> {
        let load = |pem: &[u8], id: Id| -> Result<PKey<Private>> {
            let key =
                PKey::private_key_from_pem_passphrase(pem, password.as_bytes()).map_err(|_| {
                    Error::Integrity(
                        "cannot decrypt the key file: wrong password or damaged file".into(),
                    )
                })?;
            if key.id() != id {
                return Err(Error::Integrity(
                    "key file holds the wrong kind of key".into(),
                ));
            }
            Ok(key)
        };
        Ok(Identity {
            x25519: load(x25519, Id::X25519)?,
            ed25519: load(ed25519, Id::ED25519)?,
        })
    }

    /// Signs `data` with the Ed25519 key (64-byte signature).
    pub fn sign(&self, data: &[u8]) -> Result<Vec<u8>> {
        let mut signer = Signer::new_without_digest(&self.ed25519)?;
        Ok(signer.sign_oneshot_to_vec(data)?)
    }

    /// The key this identity shares with a peer (see the module documentation).
    pub fn pair_key(&self, me: &str, peer: &str, peer_x25519: &[u8]) -> Result<PairKey> {
        let theirs = PKey::public_key_from_raw_bytes(peer_x25519, Id::X25519)
            .map_err(|_| Error::Integrity(format!("{peer}'s public key is not an X25519 key")))?;
        let mut deriver = Deriver::new(&self.x25519)?;
        deriver.set_peer(&theirs)?;
        let shared = deriver.derive_to_vec()?;
        if shared.iter().all(|b| *b == 0) {
            return Err(Error::Integrity(format!(
                "{peer}'s public key is degenerate"
            )));
        }
        let (a, b) = if me <= peer { (me, peer) } else { (peer, me) };
        let mut info = Vec::with_capacity(a.len() + b.len() + 1);
        info.extend_from_slice(a.as_bytes());
        info.push(0);
        info.extend_from_slice(b.as_bytes());
        Ok(PairKey(hkdf_sha256(&shared, b"fastchat/pair/v1", &info)?))
    }
}

/// The context every session proof signs, before the connection's binding.
const SESSION_PROOF: &[u8] = b"fastchat/session-proof/v1";

/// A key pair made for one login (Ed25519). Its public half is stored with the session; a
/// client proves that a session token is its own by signing the binding of the TLS connection
/// it presents the token on ([`SessionKey::prove`]), so a token seen elsewhere (a log, a
/// proxy, a replay on another connection) is worth nothing.
pub struct SessionKey(PKey<Private>);

impl SessionKey {
    /// A fresh key pair.
    pub fn generate() -> Result<SessionKey> {
        Ok(SessionKey(PKey::generate_ed25519()?))
    }

    /// The raw 32-byte public key, sent at login.
    pub fn public(&self) -> Result<Vec<u8>> {
        Ok(self.0.raw_public_key()?)
    }

    /// The raw 32-byte private key, for the session agent; the caller wipes it after use.
    pub fn to_raw(&self) -> Result<Vec<u8>> {
        Ok(self.0.raw_private_key()?)
    }

    /// The key from [`SessionKey::to_raw`]'s bytes.
    pub fn from_raw(raw: &[u8]) -> Result<SessionKey> {
        Ok(SessionKey(PKey::private_key_from_raw_bytes(
            raw,
            Id::ED25519,
        )?))
    }

    /// The proof for a connection whose binding is `binding` (empty without TLS).
    pub fn prove(&self, binding: Option<&[u8; 32]>) -> Result<Vec<u8>> {
        let Some(binding) = binding else {
            return Ok(Vec::new());
        };
        let mut data = SESSION_PROOF.to_vec();
        data.extend_from_slice(binding);
        let mut signer = Signer::new_without_digest(&self.0)?;
        Ok(signer.sign_oneshot_to_vec(&data)?)
    }
}

/// Checks a session proof made by [`SessionKey::prove`] for the connection whose binding is
/// `binding`, against the session's stored public key.
pub fn check_session_proof(public: &[u8], binding: &[u8; 32], proof: &[u8]) -> Result<bool> {
    let mut data = SESSION_PROOF.to_vec();
    data.extend_from_slice(binding);
    verify_signature(public, &data, proof)
}

/// Checks an Ed25519 signature against a raw public key.
pub fn verify_signature(ed25519: &[u8], data: &[u8], signature: &[u8]) -> Result<bool> {
    let key: PKey<Public> = PKey::public_key_from_raw_bytes(ed25519, Id::ED25519)
        .map_err(|_| Error::Integrity("not an Ed25519 public key".into()))?;
    let mut verifier = Verifier::new_without_digest(&key)?;
    Ok(verifier.verify_oneshot(signature, data).unwrap_or(false))
}

/// HMAC-SHA256 (RFC 2104) of the concatenation of `parts`, on OpenSSL's SHA-256 alone: a
/// ratchet takes two or three per message, and OpenSSL's generic MAC interface costs a key
/// object and a context per call, several times the hashing itself.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&openssl::sha::sha256(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut pad = [0u8; 64];
    let mut inner = openssl::sha::Sha256::new();
    for (p, b) in pad.iter_mut().zip(block) {
        *p = b ^ 0x36;
    }
    inner.update(&pad);
    for part in parts {
        inner.update(part);
    }
    let inner = inner.finish();
    let mut outer = openssl::sha::Sha256::new();
    for (p, b) in pad.iter_mut().zip(block) {
        *p = b ^ 0x5c;
    }
    outer.update(&pad);
    outer.update(&inner);
    block.fill(0);
    pad.fill(0);
    outer.finish()
}

/// HKDF-SHA256 (RFC 5869, extract and expand) to 32 bytes.
pub fn hkdf_sha256(ikm: &[u8], salt: &[u8], info: &[u8]) -> Result<[u8; 32]> {
    let mut prk = hmac_sha256(salt, &[ikm]);
    let out = hmac_sha256(&prk, &[info, &[1]]);
    prk.fill(0);
    Ok(out)
}

/// HKDF-SHA256 as OpenSSL computes it, to check ours against.
#[cfg(test)]
fn hkdf_sha256_openssl(ikm: &[u8], salt: &[u8], info: &[u8]) -> Result<[u8; 32]> {
    use openssl::md::Md;
    use openssl::pkey_ctx::PkeyCtx;
    let mut ctx = PkeyCtx::new_id(Id::HKDF)?;
    ctx.derive_init()?;
    ctx.set_hkdf_md(Md::sha256())?;
    ctx.set_hkdf_key(ikm)?;
    ctx.set_hkdf_salt(salt)?;
    ctx.add_hkdf_info(info)?;
    let mut out = [0u8; 32];
    ctx.derive(Some(&mut out))?;
    Ok(out)
}

/// A 256-bit symmetric key (pair key, group key or file key).
#[derive(Clone, PartialEq, Eq)]
pub struct PairKey(pub [u8; 32]);

impl std::fmt::Debug for PairKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PairKey(..)")
    }
}

const NONCE: usize = 12;
const TAG: usize = 16;

impl PairKey {
    /// A random key.
    pub fn random() -> Result<PairKey> {
        let mut k = [0u8; 32];
        rand_bytes(&mut k)?;
        Ok(PairKey(k))
    }

    /// AES-256-GCM with a fresh random nonce; `aad` is authenticated, not encrypted.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
        let mut out = vec![0u8; NONCE + plaintext.len() + TAG];
        fill_nonce(&mut out[..NONCE])?;
        with_context(&self.0, Way::Seal, |enc| {
            let (nonce, rest) = out.split_at_mut(NONCE);
            let (ct, tag) = rest.split_at_mut(plaintext.len());
            enc.encrypt_init(None, None, Some(nonce))?;
            enc.cipher_update(aad, None)?;
            let n = enc.cipher_update(plaintext, Some(ct))?;
            enc.cipher_final(&mut ct[n..])?;
            enc.tag(tag)
        })?;
        Ok(out)
    }

    /// Opens what [`PairKey::seal`] made; any change to the bytes, the key or `aad` is an
    /// [`Error::Integrity`].
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>> {
        if sealed.len() < NONCE + TAG {
            return Err(Error::Integrity("ciphertext too short".into()));
        }
        let (nonce, rest) = sealed.split_at(NONCE);
        let (ct, tag) = rest.split_at(rest.len() - TAG);
        let mut plain = vec![0u8; ct.len()];
        with_context(&self.0, Way::Open, |dec| {
            dec.decrypt_init(None, None, Some(nonce))?;
            dec.set_tag(tag)?;
            dec.cipher_update(aad, None)?;
            let n = dec.cipher_update(ct, Some(&mut plain))?;
            dec.cipher_final(&mut plain[n..])
        })
        .map_err(|_| {
            Error::Integrity("message failed authentication (tampered or not for us)".into())
        })?;
        Ok(plain)
    }
}

/// Random bytes fetched per call to OpenSSL's generator, then handed out as nonces.
const NONCE_POOL: usize = 4096;

thread_local! {
    /// Unused random bytes (from the back) for nonces: one call to the generator serves hundreds
    /// of messages, where a call per nonce cost more than the encryption itself.
    static NONCES: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Fills `nonce` with fresh random bytes (each byte is used once, never twice).
fn fill_nonce(nonce: &mut [u8]) -> Result<()> {
    NONCES.with(|cell| {
        let mut pool = cell.borrow_mut();
        if pool.len() < nonce.len() {
            pool.resize(NONCE_POOL, 0);
            rand_bytes(&mut pool)?;
        }
        let at = pool.len() - nonce.len();
        nonce.copy_from_slice(&pool[at..]);
        pool.truncate(at);
        Ok(())
    })
}

/// AES-256-GCM contexts for one key, for encrypting and for decrypting; each is keyed when it
/// is first used for that key.
struct Contexts {
    enc: CipherCtx,
    dec: CipherCtx,
    enc_keyed: bool,
    dec_keyed: bool,
}

impl Contexts {
    fn new() -> std::result::Result<Contexts, ErrorStack> {
        let cipher = openssl::cipher::Cipher::aes_256_gcm();
        let mut enc = CipherCtx::new()?;
        enc.encrypt_init(Some(cipher), None, None)?;
        enc.set_iv_length(NONCE)?;
        let mut dec = CipherCtx::new()?;
        dec.decrypt_init(Some(cipher), None, None)?;
        dec.set_iv_length(NONCE)?;
        Ok(Contexts {
            enc,
            dec,
            enc_keyed: false,
            dec_keyed: false,
        })
    }
}

/// Keys whose contexts each thread keeps, at most.
const CONTEXTS_PER_THREAD: usize = 64;

thread_local! {
    /// Expanding an AES key costs more than sealing a short message with it, and some keys
    /// seal many messages (a file's chunks, the local history): each thread keeps the contexts
    /// of its recent keys, and only the nonce changes per message. Most keys are used once (a
    /// ratchet's or a sender chain's message keys): a new key takes over the contexts of an
    /// old one, so it costs a key schedule, not a context (an allocation and OpenSSL's lookup
    /// of the cipher, which cost more than the key schedule).
    static CONTEXTS: RefCell<HashMap<[u8; 32], Contexts>> = RefCell::new(HashMap::new());
}

/// Which way a message goes through AES-GCM.
#[derive(Clone, Copy)]
enum Way {
    Seal,
    Open,
}

/// Runs `f` with this thread's context for `key` and `way`, keyed.
fn with_context<T>(
    key: &[u8; 32],
    way: Way,
    f: impl FnOnce(&mut CipherCtx) -> std::result::Result<T, ErrorStack>,
) -> std::result::Result<T, ErrorStack> {
    CONTEXTS.with(|cell| {
        let mut map = cell.borrow_mut();
        if !map.contains_key(key) {
            let old = (map.len() >= CONTEXTS_PER_THREAD)
                .then(|| map.keys().next().copied())
                .flatten();
            let mut contexts = match old.and_then(|k| map.remove(&k)) {
                Some(c) => c,
                None => Contexts::new()?,
            };
            contexts.enc_keyed = false;
            contexts.dec_keyed = false;
            map.insert(*key, contexts);
        }
        let c = map.get_mut(key).expect("inserted above");
        match way {
            Way::Seal => {
                if !c.enc_keyed {
                    c.enc.encrypt_init(None, Some(key), None)?;
                    c.enc_keyed = true;
                }
                f(&mut c.enc)
            }
            Way::Open => {
                if !c.dec_keyed {
                    c.dec.decrypt_init(None, Some(key), None)?;
                    c.dec_keyed = true;
                }
                f(&mut c.dec)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_and_hkdf_match_rfc_4231_and_openssl() -> Result<()> {
        // RFC 4231, test cases 1 and 6 (a key longer than a block).
        let tag = hmac_sha256(&[0x0b; 20], &[b"Hi There"]);
        assert_eq!(
            to_hex(&tag),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        let tag = hmac_sha256(
            &[0xaa; 131],
            &[
                b"Test Using Larger Than Block-Size Key - ",
                b"Hash Key First",
            ],
        );
        assert_eq!(
            to_hex(&tag),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
        // HKDF against OpenSSL's, over lengths around the block size, and an empty salt.
        for len in [0usize, 1, 31, 32, 33, 63, 64, 65, 200] {
            let ikm = vec![len as u8; len];
            let salt = vec![0x5a; len / 2];
            let info = vec![0xc3; len % 40];
            assert_eq!(
                hkdf_sha256(&ikm, &salt, &info)?,
                hkdf_sha256_openssl(&ikm, &salt, &info)?,
                "length {len}"
            );
        }
        Ok(())
    }

    #[test]
    fn password_hash_verifies_and_rejects() -> Result<()> {
        let cost = ScryptCost::with_log_n(4)?;
        let stored = hash_password("correct horse", cost)?;
        assert!(stored.starts_with("scrypt$4$8$1$"));
        assert!(!stored.contains("correct horse"));
        assert!(verify_password("correct horse", &stored)?);
        assert!(!verify_password("correct horsf", &stored)?);
        assert!(!verify_password("", &stored)?);
        Ok(())
    }

    #[test]
    fn same_password_gets_different_salts() -> Result<()> {
        let cost = ScryptCost::with_log_n(4)?;
        assert_ne!(hash_password("pw", cost)?, hash_password("pw", cost)?);
        Ok(())
    }

    #[test]
    fn corrupt_hash_is_an_error() {
        for bad in [
            "",
            "plain",
            "scrypt$4$8$1$zz$00",
            "scrypt$99$8$1$00$00",
            "md5$1$1$1$00$00",
        ] {
            assert!(verify_password("pw", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cost_bounds() {
        assert!(ScryptCost::with_log_n(0).is_err());
        assert!(ScryptCost::with_log_n(21).is_err());
        assert!(ScryptCost::with_log_n(14).is_ok());
    }

    #[test]
    fn hex_roundtrip() {
        let bytes = [0u8, 1, 0xab, 0xff];
        assert_eq!(to_hex(&bytes), "0001abff");
        assert_eq!(from_hex("0001ABff").unwrap(), bytes);
        assert!(from_hex("0g").is_none());
        assert!(from_hex("abc").is_none());
    }

    #[test]
    fn tokens_are_random_and_hash_to_32_bytes() -> Result<()> {
        let (a, b) = (new_token()?, new_token()?);
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert_eq!(token_hash(a.as_bytes())?.len(), 32);
        Ok(())
    }

    #[test]
    fn both_sides_derive_the_same_pair_key() -> Result<()> {
        let (a, b, c) = (
            Identity::generate()?,
            Identity::generate()?,
            Identity::generate()?,
        );
        let ab = a.pair_key("alice", "bob", &b.public()?.x25519)?;
        let ba = b.pair_key("bob", "alice", &a.public()?.x25519)?;
        assert_eq!(ab, ba);
        let ac = a.pair_key("alice", "carol", &c.public()?.x25519)?;
        assert_ne!(ab, ac);
        // The names are bound in: same keys, other names, other key.
        let ab_renamed = a.pair_key("alice", "bobby", &b.public()?.x25519)?;
        assert_ne!(ab, ab_renamed);
        Ok(())
    }

    #[test]
    fn contexts_taken_over_by_new_keys_seal_and_open_under_the_new_key() -> Result<()> {
        // More keys than a thread keeps contexts for, each sealed once: every one past the
        // limit takes over the contexts of another.
        let keys: Vec<PairKey> = (0..3 * CONTEXTS_PER_THREAD)
            .map(|_| PairKey::random())
            .collect::<Result<_>>()?;
        let sealed: Vec<Vec<u8>> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| k.seal(b"aad", format!("message {i}").as_bytes()))
            .collect::<Result<_>>()?;
        for (i, (k, s)) in keys.iter().zip(&sealed).enumerate().rev() {
            assert_eq!(k.open(b"aad", s)?, format!("message {i}").as_bytes());
            let other = &keys[(i + 1) % keys.len()];
            assert!(other.open(b"aad", s).is_err(), "not under another key");
        }
        Ok(())
    }

    #[test]
    fn seal_open_and_tamper() -> Result<()> {
        let k = PairKey::random()?;
        let sealed = k.seal(b"hdr", b"hello")?;
        assert_eq!(k.open(b"hdr", &sealed)?, b"hello");
        assert_ne!(k.seal(b"hdr", b"hello")?, sealed, "fresh nonce each time");
        assert!(k.open(b"other", &sealed).is_err(), "aad is bound");
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(
                matches!(k.open(b"hdr", &bad), Err(Error::Integrity(_))),
                "byte {i}"
            );
        }
        assert!(
            PairKey::random()?.open(b"hdr", &sealed).is_err(),
            "wrong key"
        );
        assert!(k.open(b"hdr", &sealed[..20]).is_err());
        Ok(())
    }

    #[test]
    fn identity_survives_pem_and_needs_the_password() -> Result<()> {
        let id = Identity::generate()?;
        let (x, e) = id.to_pem("pw")?;
        assert!(std::str::from_utf8(&x)
            .unwrap()
            .contains("ENCRYPTED PRIVATE KEY"));
        let back = Identity::from_pem(&x, &e, "pw")?;
        assert_eq!(back.public()?, id.public()?);
        assert!(matches!(
            Identity::from_pem(&x, &e, "wrong"),
            Err(Error::Integrity(_))
        ));
        assert!(
            Identity::from_pem(&e, &x, "pw").is_err(),
            "swapped files are refused"
        );
        Ok(())
    }

    #[test]
    fn signatures_verify_only_for_the_signer_and_the_data() -> Result<()> {
        let (a, b) = (Identity::generate()?, Identity::generate()?);
        let sig = a.sign(b"data")?;
        assert!(verify_signature(&a.public()?.ed25519, b"data", &sig)?);
        assert!(!verify_signature(&a.public()?.ed25519, b"datA", &sig)?);
        assert!(!verify_signature(&b.public()?.ed25519, b"data", &sig)?);
        assert!(!verify_signature(
            &a.public()?.ed25519,
            b"data",
            &sig[..10]
        )?);
        Ok(())
    }

    #[test]
    fn a_session_proof_holds_only_for_its_connection_and_key() -> Result<()> {
        let key = SessionKey::generate()?;
        let public = key.public()?;
        let (here, there) = ([1u8; 32], [2u8; 32]);
        let proof = key.prove(Some(&here))?;
        assert!(check_session_proof(&public, &here, &proof)?);
        assert!(
            !check_session_proof(&public, &there, &proof)?,
            "another connection"
        );
        let other = SessionKey::generate()?.public()?;
        assert!(
            !check_session_proof(&other, &here, &proof)?,
            "another session"
        );
        assert!(
            key.prove(None)?.is_empty(),
            "nothing to bind to without TLS"
        );
        Ok(())
    }
}
