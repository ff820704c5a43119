//! The chains of membership changes a client has verified, one per group, kept on disk so
//! that a server cannot later show it a different history.
//!
//! ```text
//! FASTCHAT_HOME/USER/groups/OWNER+NAME     the verified changes of group OWNER/NAME, as frames
//! ```
//!
//! A chain here has passed every check of [`super::e2e::E2e::sync_group`]: each change is
//! signed by its maker (with the maker's pinned key) and allowed by the rules
//! ([`crate::membership`]) applied to the changes before it. The rosters after each change are
//! derived again from the changes when a chain is read.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::membership::{self, After, Roster};
use crate::net::{encode_into, FrameReader, SignedChange};

/// One group's verified chain and the roster after each of its changes.
#[derive(Debug, Clone, Default)]
pub struct Chain {
    changes: Vec<SignedChange>,
    rosters: Vec<Roster>,
}

impl Chain {
    /// The group as of the last verified change.
    pub fn head(&self) -> Option<&Roster> {
        self.rosters.last()
    }

    /// The group after change `seq` (the members of key epoch `seq`).
    pub fn at(&self, seq: u64) -> Option<&Roster> {
        self.rosters.get(seq.checked_sub(1)? as usize)
    }

    /// Change `seq`.
    pub fn change(&self, seq: u64) -> Option<&SignedChange> {
        self.changes.get(seq.checked_sub(1)? as usize)
    }

    /// Appends a change already verified, with the roster it leads to.
    fn push(&mut self, change: SignedChange, roster: Roster) {
        self.changes.push(change);
        self.rosters.push(roster);
    }

    /// Applies `change` (its signature already checked) after the head; the roster it leads
    /// to, or why the rules refuse it. A change that deletes the group leaves no roster: it
    /// is never part of a chain a member fetches.
    pub fn extend(&mut self, change: SignedChange) -> Result<&Roster> {
        match membership::apply(self.head(), &change)? {
            After::Roster(roster) => {
                self.push(change, roster);
                Ok(self.head().expect("just pushed"))
            }
            After::Deleted => Err(Error::Integrity(format!(
                "change {} of {} ends the group",
                change.change.seq, change.change.group
            ))),
        }
    }
}

/// The verified chains of one user.
pub struct Chains {
    dir: PathBuf,
    cache: HashMap<String, Chain>,
}

impl Chains {
    /// The chains kept under the user's folder `user_dir`.
    pub fn new(user_dir: &Path) -> Chains {
        Chains {
            dir: user_dir.join("groups"),
            cache: HashMap::new(),
        }
    }

    fn path(&self, group: &str) -> PathBuf {
        // Names have no '+' (see `names`), so this is one file per group.
        self.dir.join(group.replace('/', "+"))
    }

    /// The verified chain of `group` (empty if none was verified yet).
    pub fn get(&mut self, group: &str) -> Result<&Chain> {
        if !self.cache.contains_key(group) {
            let chain = self.read(group)?;
            self.cache.insert(group.to_string(), chain);
        }
        Ok(&self.cache[group])
    }

    fn read(&self, group: &str) -> Result<Chain> {
        let path = self.path(group);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Chain::default()),
            Err(e) => {
                return Err(Error::Invalid(format!(
                    "cannot read {}: {e}",
                    path.display()
                )))
            }
        };
        let damaged = |why: String| {
            Error::Invalid(format!(
                "{} is damaged ({why}); delete it to fetch and verify the group again",
                path.display()
            ))
        };
        let mut chain = Chain::default();
        let mut frames = FrameReader::new(&bytes[..]);
        while let Some(change) = frames
            .read::<SignedChange>()
            .map_err(|e| damaged(e.to_string()))?
        {
            chain.extend(change).map_err(|e| damaged(e.to_string()))?;
        }
        Ok(chain)
    }

    /// Adds verified changes to `group`'s chain, on disk first.
    pub fn append(&mut self, group: &str, changes: &[SignedChange]) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut chain = self.get(group)?.clone();
        let mut frames = Vec::new();
        for change in changes {
            chain.extend(change.clone())?;
            encode_into(&mut frames, change)?;
        }
        fs::create_dir_all(&self.dir)?;
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(self.path(group))?;
        f.write_all(&frames)?;
        f.sync_all()?;
        self.cache.insert(group.to_string(), chain);
        Ok(())
    }

    /// Forgets `group` (after leaving it).
    pub fn forget(&mut self, group: &str) -> Result<()> {
        self.cache.remove(group);
        match fs::remove_file(self.path(group)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::unsigned_next;
    use crate::net::Action;

    fn change(chain: &Chain, by: &str, action: Action) -> SignedChange {
        unsigned_next(chain.head(), by, action)
    }

    #[test]
    fn chains_persist_and_answer_for_every_epoch() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let mut chains = Chains::new(dir.path());
        assert!(chains.get("alice/team")?.head().is_none());
        let mut c = Chain::default();
        let mut all = Vec::new();
        for (by, action) in [
            ("alice", Action::Create),
            ("alice", Action::Add("bob".into())),
            ("alice", Action::Add("carol".into())),
            ("alice", Action::Remove("bob".into())),
        ] {
            let ch = change(&c, by, action);
            c.extend(ch.clone())?;
            all.push(ch);
        }
        chains.append("alice/team", &all[..2])?;
        chains.append("alice/team", &all[2..])?;
        let mut again = Chains::new(dir.path());
        let chain = again.get("alice/team")?;
        assert_eq!(chain.head().unwrap().members, ["alice", "carol"]);
        assert_eq!(chain.at(2).unwrap().members, ["alice", "bob"]);
        assert_eq!(chain.at(3).unwrap().members, ["alice", "bob", "carol"]);
        assert!(chain.at(0).is_none() && chain.at(5).is_none());
        assert_eq!(chain.change(4), Some(&all[3]));
        // A change that does not follow is refused, and nothing is written.
        let stray = all[1].clone();
        assert!(again.append("alice/team", &[stray]).is_err());
        assert_eq!(
            Chains::new(dir.path())
                .get("alice/team")?
                .head()
                .unwrap()
                .seq,
            4
        );
        again.forget("alice/team")?;
        assert!(Chains::new(dir.path()).get("alice/team")?.head().is_none());
        Ok(())
    }
}
