//! The client's files: private keys and pinned peer keys, under `FASTCHAT_HOME/USER/`.
//!
//! ```text
//! FASTCHAT_HOME/            (default ~/.fastchat)
//! └── alice/                mode 0700
//!     ├── identity.key      both private keys, AES-256-GCM under scrypt(password), mode 0600
//!     ├── known_keys        pinned peer keys: "name x25519-hex ed25519-hex" per line
//!     ├── session           a kept session (`fastchat login`): JSON, token and agent, 0600
//!     ├── agent.sock        the session agent's socket (see `agent`), 0600
//!     ├── prekeys           private halves of the published prekeys, sealed (see `prekeys`)
//!     ├── sessions/PEER     the double ratchet with PEER, sealed (see `sessions`)
//!     ├── state.lock        held while prekeys or sessions change
//!     └── downloads/        files received
//! ```
//!
//! The key file costs an attacker who stole it as much per password guess as the balancer's
//! password hash does (scrypt, N = 2^15 by default). Key files of earlier versions
//! (`x25519.pem`, `ed25519.pem`: PKCS#8 under PBKDF2 with 2,048 iterations, far cheaper to
//! attack) are rewritten in this format the first time they are opened, and then removed.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::crypto::{from_hex, hkdf_sha256, to_hex, Identity, PairKey, ScryptCost};
use crate::error::{Error, Result};
use crate::net::PublicKeys;

/// The user's state lock, held while it lives (see [`Keystore::lock_state`]).
pub struct StateLock {
    _file: fs::File,
}

/// A folder of one user's state files, one per name (a peer, a group): each sealed under a
/// key derived from the identity ([`Keystore::state_key`]) and bound to its kind, its owner and
/// its name, so that a file copied to another name, kind or user does not open.
pub struct SealedFolder {
    /// `sessions`, `senderkeys`: the folder's name, the key's label, the files' binding.
    kind: &'static str,
    dir: PathBuf,
    user: String,
    key: PairKey,
}

impl SealedFolder {
    /// `store`'s folder of `kind`, sealed with a key derived from `identity`.
    pub fn new(store: &Keystore, identity: &Identity, kind: &'static str) -> Result<SealedFolder> {
        Ok(SealedFolder {
            kind,
            dir: store.dir().join(kind),
            user: store.user().to_string(),
            key: Keystore::state_key(identity, kind.as_bytes())?,
        })
    }

    /// The file of `name` (a group's `/` becomes `+`).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name.replace('/', "+"))
    }

    /// What the file of `name` is bound to: its kind, its owner and the name.
    fn aad(&self, name: &str) -> Vec<u8> {
        let mut a = format!("fastchat/{}/v1", self.kind).into_bytes();
        for part in [self.user.as_str(), name] {
            a.push(part.len() as u8);
            a.extend_from_slice(part.as_bytes());
        }
        a
    }

    /// What the file of `name` holds, or `None` if there is none (take the state lock first).
    pub fn read<T: serde::de::DeserializeOwned>(
        &self,
        store: &Keystore,
        name: &str,
    ) -> Result<Option<T>> {
        store.read_sealed(&self.path(name), &self.key, &self.aad(name))
    }

    /// Seals `value` and writes it as the file of `name`, atomically (under the state lock).
    pub fn write<T: serde::Serialize>(
        &self,
        store: &Keystore,
        name: &str,
        value: &T,
    ) -> Result<()> {
        store.write_sealed(&self.path(name), &self.key, &self.aad(name), value)
    }

    /// Removes the file of `name`, if there is one (under the state lock).
    pub fn remove(&self, name: &str) -> Result<()> {
        let file = self.path(name);
        match fs::remove_file(&file) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::Local(format!(
                "cannot remove {}: {e}",
                file.display()
            ))),
        }
    }
}

/// One user's folder of key files.
pub struct Keystore {
    dir: PathBuf,
    user: String,
}

impl Keystore {
    /// The folder for `user` under `home` (not created until needed).
    pub fn new(home: &Path, user: &str) -> Keystore {
        Keystore {
            dir: home.join(user),
            user: user.to_string(),
        }
    }

    /// The user's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whose folder.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// Replaces `path` (in this folder or a folder of it, made 0700 if missing) with `data`
    /// so that a crash leaves the old file or the new one, never a mix: a private temporary
    /// file, synced, renamed over it, the folder synced.
    pub fn write_atomically(&self, path: &Path, data: &[u8]) -> Result<()> {
        self.ensure_dir()?;
        let folder = path.parent().unwrap_or(&self.dir);
        if !folder.exists() {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(folder)
                .map_err(|e| Error::Local(format!("cannot create {}: {e}", folder.display())))?;
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        write_private(&tmp, data)?;
        fs::rename(&tmp, path)
            .map_err(|e| Error::Local(format!("cannot write {}: {e}", path.display())))?;
        if let Ok(d) = fs::File::open(folder) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// A state file of this user sealed under `key` with `aad` (prekeys, sessions, sender
    /// keys): what it holds, or `None` if there is no such file.
    pub fn read_sealed<T: serde::de::DeserializeOwned>(
        &self,
        path: &Path,
        key: &PairKey,
        aad: &[u8],
    ) -> Result<Option<T>> {
        let sealed = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::Local(format!("cannot read {}: {e}", path.display()))),
        };
        let plain = key.open(aad, &sealed).map_err(|_| {
            Error::Local(format!(
                "{} does not open with this identity (damaged, or another user's)",
                path.display()
            ))
        })?;
        rmp_serde::from_slice(&plain)
            .map(Some)
            .map_err(|e| Error::Local(format!("{} is damaged: {e}", path.display())))
    }

    /// Seals `value` under `key` with `aad` and writes it to `path` atomically.
    pub fn write_sealed<T: serde::Serialize>(
        &self,
        path: &Path,
        key: &PairKey,
        aad: &[u8],
        value: &T,
    ) -> Result<()> {
        let plain = rmp_serde::to_vec(value).map_err(|e| Error::Local(e.to_string()))?;
        let sealed = key.seal(aad, &plain)?;
        self.write_atomically(path, &sealed)
    }

    /// The key a state file of this user (prekeys, sessions) is sealed under: derived from
    /// the identity's private X25519 key, so the file opens exactly where the identity does.
    pub fn state_key(identity: &Identity, what: &[u8]) -> Result<PairKey> {
        let mut raw = identity.x25519_private()?;
        let key = hkdf_sha256(&raw, b"fastchat/state/v1", what);
        raw.fill(0);
        Ok(PairKey(key?))
    }

    /// Takes the user's state lock (`state.lock`, an advisory `flock`), waiting for another
    /// process of the same user to let go of it: prekeys and sessions change only under it,
    /// so two processes never lose each other's steps. Released when the guard is dropped.
    pub fn lock_state(&self) -> Result<StateLock> {
        self.ensure_dir()?;
        let path = self.dir.join("state.lock");
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::Local(format!("cannot open {}: {e}", path.display())))?;
        file.lock()
            .map_err(|e| Error::Local(format!("cannot lock {}: {e}", path.display())))?;
        Ok(StateLock { _file: file })
    }

    fn key_path(&self) -> PathBuf {
        self.dir.join("identity.key")
    }

    /// The key files before version 2.
    fn pem_paths(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("x25519.pem"), self.dir.join("ed25519.pem"))
    }

    /// Whether key files exist for this user.
    pub fn has_identity(&self) -> bool {
        let (x, e) = self.pem_paths();
        self.key_path().exists() || x.exists() || e.exists()
    }

    /// Creates the folder (0700) if needed.
    pub fn ensure_dir(&self) -> Result<()> {
        fs::create_dir_all(&self.dir)
            .map_err(|e| Error::Local(format!("cannot create {}: {e}", self.dir.display())))?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))?;
        Ok(())
    }

    /// Writes the identity's key files (0600), refusing to overwrite existing ones.
    pub fn save_identity(&self, id: &Identity, password: &str) -> Result<()> {
        if self.has_identity() {
            return Err(Error::Invalid(format!(
                "keys for {} already exist in {}; refusing to overwrite them",
                self.user,
                self.dir.display()
            )));
        }
        self.ensure_dir()?;
        self.write_key_file(id, password)
    }

    /// Replaces the identity with a new one (after an operator reset the password and the old
    /// key file cannot be opened any more): the old file is kept as `identity.key.old`, never
    /// deleted, in case the old password turns up.
    pub fn replace_identity(&self, id: &Identity, password: &str) -> Result<()> {
        self.ensure_dir()?;
        if self.key_path().exists() {
            fs::rename(self.key_path(), self.dir.join("identity.key.old"))?;
        }
        for old in <[PathBuf; 2]>::from(self.pem_paths()) {
            if old.exists() {
                let mut kept = old.clone().into_os_string();
                kept.push(".old");
                fs::rename(&old, kept)?;
            }
        }
        self.write_key_file(id, password)
    }

    fn write_key_file(&self, id: &Identity, password: &str) -> Result<()> {
        let data = id.to_key_file(&self.user, password, ScryptCost::default())?;
        let tmp = self.dir.join(".identity.key.tmp");
        write_private(&tmp, &data)?;
        fs::rename(&tmp, self.key_path()).map_err(|e| {
            Error::Local(format!("cannot write {}: {e}", self.key_path().display()))
        })?;
        Ok(())
    }

    /// Reads and decrypts the identity. A missing file is a clear error saying what to do.
    /// Key files of an earlier version, or of a lower cost than today's default, are written
    /// again in the current format once the password has opened them.
    pub fn load_identity(&self, password: &str) -> Result<Identity> {
        let read = |p: PathBuf| {
            fs::read(&p).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Error::Local(format!(
                    "no private keys for {} in {}: keys are made at signup and stay on that \
                     machine; copy that folder here (or set FASTCHAT_HOME to it)",
                    self.user,
                    self.dir.display()
                )),
                _ => Error::Local(format!("cannot read {}: {e}", p.display())),
            })
        };
        if self.key_path().exists() {
            let (id, cost) =
                Identity::from_key_file(&read(self.key_path())?, &self.user, password)?;
            if cost.log_n < ScryptCost::default().log_n {
                self.write_key_file(&id, password)?;
            }
            return Ok(id);
        }
        let (x_path, e_path) = self.pem_paths();
        let id = Identity::from_pem(&read(x_path.clone())?, &read(e_path.clone())?, password)?;
        self.write_key_file(&id, password)?;
        fs::remove_file(&x_path)?;
        fs::remove_file(&e_path)?;
        log::info!(
            "re-encrypted the private keys of {} under scrypt ({})",
            self.user,
            self.key_path().display()
        );
        Ok(id)
    }

    fn pins_path(&self) -> PathBuf {
        self.dir.join("known_keys")
    }

    /// The names with pinned keys: the people this user has written to or heard from.
    pub fn pinned_names(&self) -> Vec<String> {
        fs::read_to_string(self.pins_path())
            .map(|text| {
                text.lines()
                    .filter_map(|l| l.split_whitespace().next())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    }

    fn replaced_path(&self) -> PathBuf {
        self.dir.join("identity.pub.old")
    }

    /// Keeps the Ed25519 public key that `fastchat rekey` replaced (in hex): the key change it
    /// adds to each group names it, and `fastchat group key-change` needs it again for a
    /// group where that failed.
    pub fn save_replaced_key(&self, ed25519: &[u8]) -> Result<()> {
        self.write_atomically(&self.replaced_path(), to_hex(ed25519).as_bytes())
    }

    /// The Ed25519 key `fastchat rekey` last replaced, if it ever did.
    pub fn replaced_key(&self) -> Result<Option<Vec<u8>>> {
        let path = self.replaced_path();
        match fs::read_to_string(&path) {
            Ok(t) => from_hex(t.trim())
                .map(Some)
                .ok_or_else(|| Error::Invalid(format!("{} is damaged", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The pinned keys of `name`, if any.
    pub fn pinned(&self, name: &str) -> Result<Option<PublicKeys>> {
        let text = match fs::read_to_string(self.pins_path()) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        for line in text.lines() {
            let mut parts = line.split_whitespace();
            if parts.next() != Some(name) {
                continue;
            }
            let bad = || Error::Invalid(format!("{} is damaged", self.pins_path().display()));
            let x = parts.next().and_then(from_hex).ok_or_else(bad)?;
            let e = parts.next().and_then(from_hex).ok_or_else(bad)?;
            return Ok(Some(PublicKeys {
                x25519: x,
                ed25519: e,
            }));
        }
        Ok(None)
    }

    /// Pins `name`'s keys, replacing an earlier pin.
    pub fn pin(&self, name: &str, keys: &PublicKeys) -> Result<()> {
        self.ensure_dir()?;
        let old = fs::read_to_string(self.pins_path()).unwrap_or_default();
        let mut text: String = old
            .lines()
            .filter(|l| l.split_whitespace().next() != Some(name))
            .map(|l| format!("{l}\n"))
            .collect();
        text.push_str(&format!(
            "{name} {} {}\n",
            to_hex(&keys.x25519),
            to_hex(&keys.ed25519)
        ));
        let tmp = self.dir.join("known_keys.tmp");
        write_private(&tmp, text.as_bytes())?;
        fs::rename(&tmp, self.pins_path())?;
        Ok(())
    }
}

/// A session kept by `fastchat login` for later commands: its token (useless without the
/// session key, which only the agent holds) and the agent holding its keys.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeptSession {
    /// Whose session.
    pub user: String,
    /// The balancer it was made with (another balancer's commands log in afresh).
    pub balancer: String,
    /// The session token.
    pub token: String,
    /// The agent's process id.
    pub agent_pid: u32,
    /// When it was made, in milliseconds since the epoch.
    pub since_ms: i64,
}

impl Keystore {
    fn session_path(&self) -> PathBuf {
        self.dir.join("session")
    }

    /// Saves the kept session (0600).
    pub fn save_session(&self, kept: &KeptSession) -> Result<()> {
        self.ensure_dir()?;
        let json = serde_json::to_vec(kept).map_err(|e| Error::Invalid(e.to_string()))?;
        let tmp = self.dir.join(".session.tmp");
        write_private(&tmp, &json)?;
        fs::rename(&tmp, self.session_path())?;
        Ok(())
    }

    /// The kept session, if there is one.
    pub fn kept_session(&self) -> Result<Option<KeptSession>> {
        match fs::read(self.session_path()) {
            Ok(data) => Ok(serde_json::from_slice(&data).ok()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::Invalid(format!(
                "cannot read {}: {e}",
                self.session_path().display()
            ))),
        }
    }

    /// Forgets the kept session (its agent is stopped separately).
    pub fn remove_session(&self) -> Result<()> {
        match fs::remove_file(self.session_path()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}

/// The users with a kept session in `home`.
pub fn kept_users(home: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(home) else {
        return Vec::new();
    };
    let mut users: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().join("session").is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    users.sort();
    users
}

/// Writes a file readable only by its owner, replacing any earlier one, synced to disk.
fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::Local(format!("cannot write {}: {e}", path.display())))?;
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    f.write_all(data)?;
    f.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sealed file opens only as what it was written as: its kind, its owner, its name.
    #[test]
    fn a_sealed_file_opens_only_under_its_own_kind_owner_and_name() -> Result<()> {
        let home = tempfile::tempdir()?;
        let alice = Keystore::new(home.path(), "alice");
        let identity = Identity::generate()?;
        let sessions = SealedFolder::new(&alice, &identity, "sessions")?;
        let senderkeys = SealedFolder::new(&alice, &identity, "senderkeys")?;
        senderkeys.write(&alice, "bob/class", &vec![1u8, 2, 3])?;
        assert!(senderkeys
            .path("bob/class")
            .ends_with("senderkeys/bob+class"));
        assert_eq!(
            senderkeys.read::<Vec<u8>>(&alice, "bob/class")?,
            Some(vec![1, 2, 3])
        );
        assert_eq!(senderkeys.read::<Vec<u8>>(&alice, "carol")?, None);
        let copy = |to: &Path| -> Result<()> {
            fs::create_dir_all(to.parent().expect("a folder"))?;
            fs::copy(senderkeys.path("bob/class"), to)?;
            Ok(())
        };
        // Another name, another kind, another owner (same identity): none opens it.
        copy(&senderkeys.path("bob/other"))?;
        assert!(senderkeys.read::<Vec<u8>>(&alice, "bob/other").is_err());
        copy(&sessions.path("bob/class"))?;
        assert!(sessions.read::<Vec<u8>>(&alice, "bob/class").is_err());
        let mallory = Keystore::new(home.path(), "mallory");
        let theirs = SealedFolder::new(&mallory, &identity, "senderkeys")?;
        copy(&theirs.path("bob/class"))?;
        assert!(theirs.read::<Vec<u8>>(&mallory, "bob/class").is_err());
        senderkeys.remove("bob/class")?;
        senderkeys.remove("bob/class")?;
        assert_eq!(senderkeys.read::<Vec<u8>>(&alice, "bob/class")?, None);
        Ok(())
    }

    #[test]
    fn identity_files_are_private_and_not_overwritten() -> Result<()> {
        let home = tempfile::tempdir()?;
        let ks = Keystore::new(home.path(), "alice");
        let id = Identity::generate()?;
        ks.save_identity(&id, "pw")?;
        let mode = fs::metadata(ks.key_path())?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fs::metadata(ks.dir())?.permissions().mode() & 0o777, 0o700);
        assert!(ks.save_identity(&Identity::generate()?, "pw").is_err());
        assert_eq!(ks.load_identity("pw")?.public()?, id.public()?);
        assert!(matches!(ks.load_identity("nope"), Err(Error::Integrity(_))));
        Ok(())
    }

    /// The cost of one password guess against the key file, as the file states it.
    fn file_cost(ks: &Keystore) -> String {
        let text = fs::read_to_string(ks.key_path()).unwrap();
        text.lines().nth(1).unwrap().to_string()
    }

    #[test]
    fn a_key_file_costs_a_guess_as_much_as_the_password_hash() -> Result<()> {
        let home = tempfile::tempdir()?;
        let ks = Keystore::new(home.path(), "alice");
        ks.save_identity(&Identity::generate()?, "pw")?;
        let want = format!("scrypt {} 8 1 ", crate::crypto::DEFAULT_SCRYPT_LOG_N);
        assert!(file_cost(&ks).starts_with(&want), "{}", file_cost(&ks));
        // Bound to its user: alice's file copied as bob's does not open as bob's.
        let bob = Keystore::new(home.path(), "bob");
        bob.ensure_dir()?;
        fs::copy(ks.key_path(), bob.key_path())?;
        assert!(matches!(bob.load_identity("pw"), Err(Error::Integrity(_))));
        Ok(())
    }

    #[test]
    fn old_key_files_are_migrated_on_first_use() -> Result<()> {
        let home = tempfile::tempdir()?;
        let ks = Keystore::new(home.path(), "alice");
        ks.ensure_dir()?;
        let id = Identity::generate()?;
        let (x, e) = id.to_pem("pw")?;
        let (x_path, e_path) = ks.pem_paths();
        write_private(&x_path, &x)?;
        write_private(&e_path, &e)?;
        assert!(ks.has_identity());
        // A wrong password changes nothing.
        assert!(ks.load_identity("nope").is_err());
        assert!(x_path.exists() && !ks.key_path().exists());
        assert_eq!(ks.load_identity("pw")?.public()?, id.public()?);
        assert!(
            !x_path.exists() && !e_path.exists(),
            "the weak files are gone"
        );
        assert!(file_cost(&ks).starts_with("scrypt 15 "));
        assert_eq!(ks.load_identity("pw")?.public()?, id.public()?);
        // A file written at a lower cost is written again at today's.
        fs::write(
            ks.key_path(),
            id.to_key_file("alice", "pw", ScryptCost::with_log_n(4)?)?,
        )?;
        assert!(file_cost(&ks).starts_with("scrypt 4 "));
        assert_eq!(ks.load_identity("pw")?.public()?, id.public()?);
        assert!(file_cost(&ks).starts_with("scrypt 15 "));
        Ok(())
    }

    #[test]
    fn missing_keys_say_what_to_do() -> Result<()> {
        let home = tempfile::tempdir()?;
        let err = Keystore::new(home.path(), "bob")
            .load_identity("pw")
            .err()
            .expect("no keys");
        assert!(err.to_string().contains("made at signup"), "{err}");
        Ok(())
    }

    #[test]
    fn pins_replace_and_persist() -> Result<()> {
        let home = tempfile::tempdir()?;
        let ks = Keystore::new(home.path(), "alice");
        let k1 = Identity::generate()?.public()?;
        let k2 = Identity::generate()?.public()?;
        assert_eq!(ks.pinned("bob")?, None);
        ks.pin("bob", &k1)?;
        ks.pin("carol", &k2)?;
        assert_eq!(ks.pinned("bob")?, Some(k1));
        ks.pin("bob", &k2)?;
        assert_eq!(ks.pinned("bob")?, Some(k2.clone()));
        assert_eq!(ks.pinned("carol")?, Some(k2));
        assert_eq!(ks.pinned("bo")?, None);
        Ok(())
    }
}
