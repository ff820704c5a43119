//! The local history: what this user sent and was shown, by conversation, kept on this
//! machine (`FASTCHAT_HOME/USER/history`, 0600), encrypted at rest under a key derived from
//! the user's private identity keys, so the file is as safe as the key file (a stolen laptop
//! learns nothing from it without the password).
//!
//! ```text
//! file   = one record per line: hex(nonce || AES-256-GCM(record) || tag)
//! key    = HKDF-SHA256(identity's private keys, salt "fastchat/history/v1", info user)
//! aad    = "fastchat/history/v1" || user
//! record = MessagePack Entry
//! ```
//!
//! Appending a line is one `write` of a whole line after a newline: a crash can leave at most
//! the last line torn, which is skipped on reading (as is any line that does not open), and
//! never spoils the records after it.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::crypto::{self, Identity, PairKey};
use crate::error::{Error, Result};

const CONTEXT: &[u8] = b"fastchat/history/v1";

/// One line of history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// When (milliseconds since the epoch).
    pub at: i64,
    /// The conversation: the other user, or the group (`OWNER/NAME`).
    pub conversation: String,
    /// Who wrote it.
    pub from: String,
    /// What it said (`sent NAME (SIZE)` for a file, the notice for a membership change).
    pub text: String,
}

/// The history file of one user.
pub struct History {
    path: PathBuf,
    key: PairKey,
    aad: Vec<u8>,
}

impl History {
    /// The history of `user`, whose keys are `identity`, in the user's folder `dir`.
    pub fn new(dir: PathBuf, user: &str, identity: &Identity) -> Result<History> {
        let mut raw = identity.to_raw()?;
        let key = crypto::hkdf_sha256(&raw, CONTEXT, user.as_bytes());
        raw.fill(0);
        let mut aad = CONTEXT.to_vec();
        aad.extend_from_slice(user.as_bytes());
        Ok(History {
            path: dir.join("history"),
            key: PairKey(key?),
            aad,
        })
    }

    /// Appends one entry.
    pub fn append(&self, entry: &Entry) -> Result<()> {
        let record = rmp_serde::to_vec(entry).map_err(|e| Error::Invalid(e.to_string()))?;
        let sealed = self.key.seal(&self.aad, &record)?;
        let line = format!("\n{}\n", crypto::to_hex(&sealed));
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(|e| Error::Local(format!("cannot write {}: {e}", self.path.display())))?;
        file.write_all(line.as_bytes())
            .map_err(|e| Error::Local(format!("cannot write {}: {e}", self.path.display())))
    }

    /// The last `limit` entries of `conversation` (or of all, for `None`), oldest first.
    pub fn last(&self, conversation: Option<&str>, limit: usize) -> Result<Vec<Entry>> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(Error::Local(format!(
                    "cannot read {}: {e}",
                    self.path.display()
                )))
            }
        };
        let mut skipped = 0;
        let mut entries: Vec<Entry> = Vec::new();
        for line in text.lines().filter(|l| !l.is_empty()) {
            let entry = crypto::from_hex(line)
                .and_then(|sealed| self.key.open(&self.aad, &sealed).ok())
                .and_then(|record| rmp_serde::from_slice::<Entry>(&record).ok());
            match entry {
                Some(e) if conversation.is_none_or(|c| c.eq_ignore_ascii_case(&e.conversation)) => {
                    entries.push(e)
                }
                Some(_) => {}
                None => skipped += 1,
            }
        }
        if skipped > 0 {
            log::warn!(
                "{skipped} lines of {} could not be read (torn by a crash, or not ours)",
                self.path.display()
            );
        }
        let from = entries.len().saturating_sub(limit);
        Ok(entries.split_off(from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(conversation: &str, text: &str) -> Entry {
        Entry {
            at: 1,
            conversation: conversation.into(),
            from: "alice".into(),
            text: text.into(),
        }
    }

    #[test]
    fn entries_come_back_by_conversation_and_the_file_holds_no_plaintext() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let id = Identity::generate()?;
        let h = History::new(dir.path().to_path_buf(), "alice", &id)?;
        for i in 0..5 {
            h.append(&entry("bob", &format!("secret {i}")))?;
        }
        h.append(&entry("alice/team", "to the team"))?;
        let last = h.last(Some("bob"), 2)?;
        assert_eq!(
            last,
            vec![entry("bob", "secret 3"), entry("bob", "secret 4")]
        );
        assert_eq!(h.last(None, 10)?.len(), 6);
        let raw = fs::read(dir.path().join("history"))?;
        assert!(!raw.windows(6).any(|w| w == b"secret"));
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.path().join("history"))?
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Another identity reads nothing.
        let other = History::new(dir.path().to_path_buf(), "alice", &Identity::generate()?)?;
        assert!(other.last(None, 10)?.is_empty());
        Ok(())
    }

    #[test]
    fn a_torn_line_costs_only_itself() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let id = Identity::generate()?;
        let h = History::new(dir.path().to_path_buf(), "alice", &id)?;
        h.append(&entry("bob", "one"))?;
        let path = dir.path().join("history");
        let mut torn = fs::read(&path)?;
        torn.truncate(torn.len() - 9);
        fs::write(&path, &torn)?;
        h.append(&entry("bob", "two"))?;
        assert_eq!(h.last(Some("bob"), 10)?, vec![entry("bob", "two")]);
        Ok(())
    }
}
