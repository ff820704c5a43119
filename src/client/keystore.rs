//! The client's files: private keys and pinned peer keys, under `FASTCHAT_HOME/USER/`.
//!
//! ```text
//! FASTCHAT_HOME/            (default ~/.fastchat)
//! └── alice/                mode 0700
//!     ├── x25519.pem        encrypted PKCS#8 (password), mode 0600
//!     ├── ed25519.pem       encrypted PKCS#8 (password), mode 0600
//!     └── known_keys        pinned peer keys: "name x25519-hex ed25519-hex" per line
//! ```

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::crypto::{from_hex, to_hex, Identity};
use crate::error::{Error, Result};
use crate::net::PublicKeys;

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

    fn x_path(&self) -> PathBuf {
        self.dir.join("x25519.pem")
    }

    fn e_path(&self) -> PathBuf {
        self.dir.join("ed25519.pem")
    }

    /// Whether key files exist for this user.
    pub fn has_identity(&self) -> bool {
        self.x_path().exists() || self.e_path().exists()
    }

    /// Creates the folder (0700) if needed.
    pub fn ensure_dir(&self) -> Result<()> {
        fs::create_dir_all(&self.dir)
            .map_err(|e| Error::Invalid(format!("cannot create {}: {e}", self.dir.display())))?;
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
        let (x, e) = id.to_pem(password)?;
        write_private(&self.x_path(), &x)?;
        write_private(&self.e_path(), &e)?;
        Ok(())
    }

    /// Reads and decrypts the identity. A missing file is a clear error saying what to do.
    pub fn load_identity(&self, password: &str) -> Result<Identity> {
        let read = |p: PathBuf| {
            fs::read(&p).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Error::Invalid(format!(
                    "no private keys for {} in {}: keys are made at signup and stay on that \
                     machine; copy that folder here (or set FASTCHAT_HOME to it)",
                    self.user,
                    self.dir.display()
                )),
                _ => Error::Invalid(format!("cannot read {}: {e}", p.display())),
            })
        };
        let (x, e) = (read(self.x_path())?, read(self.e_path())?);
        Identity::from_pem(&x, &e, password)
    }

    fn pins_path(&self) -> PathBuf {
        self.dir.join("known_keys")
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

/// Writes a file readable only by its owner, replacing any earlier one, synced to disk.
fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::Invalid(format!("cannot write {}: {e}", path.display())))?;
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    f.write_all(data)?;
    f.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_files_are_private_and_not_overwritten() -> Result<()> {
        let home = tempfile::tempdir()?;
        let ks = Keystore::new(home.path(), "alice");
        let id = Identity::generate()?;
        ks.save_identity(&id, "pw")?;
        for f in ["x25519.pem", "ed25519.pem"] {
            let mode = fs::metadata(ks.dir().join(f))?.permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        assert_eq!(fs::metadata(ks.dir())?.permissions().mode() & 0o777, 0o700);
        assert!(ks.save_identity(&Identity::generate()?, "pw").is_err());
        assert_eq!(ks.load_identity("pw")?.public()?, id.public()?);
        assert!(ks.load_identity("nope").is_err());
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
