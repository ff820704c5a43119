//! What a user has already been shown, so that a message shown once is never shown again as
//! new, whatever id the server gives it.
//!
//! Every message carries its sender's sequence (the sender's clock in microseconds, strictly
//! increasing, authenticated with the content: see [`super::e2e`]). For each conversation (a
//! sender, or a sender in a group) the client remembers the sequences it accepted, and under
//! which message id, within a window of [`WINDOW`] below the newest:
//!
//! * a sequence not seen before, inside the window: new;
//! * a sequence seen under the same message id: the same message delivered again (delivery is
//!   at least once), acknowledged and not shown;
//! * a sequence seen under another id: a replay, refused with a warning;
//! * a sequence older than the window: refused with a warning (it cannot be told from a
//!   replay of something forgotten).
//!
//! Only authenticated messages reach this record: a forged message cannot make a later
//! genuine one look seen.
//!
//! ```text
//! FASTCHAT_HOME/USER/accepted     one line per accepted message: "CONVERSATION SEQ MSG_ID"
//! ```
//!
//! Lines are appended (one `write` each, so processes of the same user can share the file),
//! each process reads what others appended before it decides, and the file is rewritten
//! without the lines that fell out of the window when it opens it and they are most of it.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// How far below the newest sequence of a conversation a message is still accepted: a week,
/// in microseconds. Messages of one sender arrive in about the order they were sent; a week
/// covers a sender whose devices' clocks disagree.
pub const WINDOW: u64 = 7 * 24 * 3600 * 1_000_000;

/// What [`Accepted::check`] says of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not seen before: show it, then [`Accepted::record`] it.
    New,
    /// Already shown under this same id: acknowledge it, do not show it.
    Again,
    /// Already shown under another id: a replay.
    Replay {
        /// The id it was first shown under.
        first: i64,
    },
    /// Older than the window below the newest sequence of its conversation.
    TooOld,
}

#[derive(Debug, Default)]
struct Conversation {
    newest: u64,
    /// Accepted sequences inside the window, and their message ids.
    seen: HashMap<u64, i64>,
}

impl Conversation {
    fn add(&mut self, seq: u64, msg_id: i64) {
        self.seen.insert(seq, msg_id);
        if seq > self.newest {
            self.newest = seq;
            let floor = self.floor();
            self.seen.retain(|s, _| *s >= floor);
        }
    }

    fn floor(&self) -> u64 {
        self.newest.saturating_sub(WINDOW)
    }
}

/// The record of accepted messages of one user.
pub struct Accepted {
    path: PathBuf,
    file: File,
    /// The file's inode, to notice it being rewritten by another process.
    inode: u64,
    /// How far the file has been read.
    read_to: u64,
    /// Bytes of a line another process is still writing.
    partial: Vec<u8>,
    /// Lines read.
    lines: usize,
    conversations: HashMap<String, Conversation>,
}

impl Accepted {
    /// Opens (creating) the record in the user's folder `dir`.
    pub fn open(dir: &Path) -> Result<Accepted> {
        let path = dir.join("accepted");
        let mut record = Accepted::load(&path)?;
        let live: usize = record.conversations.values().map(|c| c.seen.len()).sum();
        if record.lines > 1000 && record.lines > 2 * live {
            record.compact()?;
        }
        Ok(record)
    }

    fn load(path: &Path) -> Result<Accepted> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| Error::Local(format!("cannot open {}: {e}", path.display())))?;
        let inode = file.metadata()?.ino();
        let mut record = Accepted {
            path: path.to_path_buf(),
            file,
            inode,
            read_to: 0,
            partial: Vec::new(),
            lines: 0,
            conversations: HashMap::new(),
        };
        record.catch_up()?;
        Ok(record)
    }

    /// Reads what was appended since the last read (by this process or another); starts
    /// again from the new file if another process rewrote it.
    fn catch_up(&mut self) -> Result<()> {
        if let Ok(meta) = fs::metadata(&self.path) {
            if meta.ino() != self.inode {
                *self = Accepted::load(&self.path)?;
                return Ok(());
            }
        }
        self.file.seek(SeekFrom::Start(self.read_to))?;
        let mut fresh = Vec::new();
        self.read_to += self.file.read_to_end(&mut fresh)? as u64;
        self.partial.extend_from_slice(&fresh);
        let complete = match self.partial.iter().rposition(|b| *b == b'\n') {
            Some(end) => self.partial.drain(..=end).collect::<Vec<u8>>(),
            None => return Ok(()),
        };
        for line in complete.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            self.lines += 1;
            // A damaged line is skipped: the record can only forget, never invent.
            if let Some((conversation, seq, msg_id)) = parse(line) {
                self.conversations
                    .entry(conversation.to_string())
                    .or_default()
                    .add(seq, msg_id);
            }
        }
        Ok(())
    }

    /// What to do with message `msg_id`, sequence `seq` of `conversation`.
    pub fn check(&mut self, conversation: &str, seq: u64, msg_id: i64) -> Result<Verdict> {
        self.catch_up()?;
        let Some(c) = self.conversations.get(conversation) else {
            return Ok(Verdict::New);
        };
        Ok(match c.seen.get(&seq) {
            Some(&first) if first == msg_id => Verdict::Again,
            Some(&first) => Verdict::Replay { first },
            None if seq < c.floor() => Verdict::TooOld,
            None => Verdict::New,
        })
    }

    /// Whether a message of `conversation` was shown under id `msg_id` (within the window).
    pub fn shown_id(&mut self, conversation: &str, msg_id: i64) -> Result<bool> {
        self.catch_up()?;
        Ok(self
            .conversations
            .get(conversation)
            .is_some_and(|c| c.seen.values().any(|&id| id == msg_id)))
    }

    /// Records that message `msg_id`, sequence `seq` of `conversation` was shown.
    pub fn record(&mut self, conversation: &str, seq: u64, msg_id: i64) -> Result<()> {
        let line = format!("{conversation} {seq} {msg_id}\n");
        // One write of a whole line on a file opened for appending: lines of several
        // processes never interleave.
        self.file.write_all(line.as_bytes())?;
        self.catch_up()
    }

    /// Rewrites the file with only the lines inside each conversation's window.
    fn compact(&mut self) -> Result<()> {
        let mut text = String::new();
        for (name, c) in &self.conversations {
            let mut seqs: Vec<(&u64, &i64)> = c.seen.iter().collect();
            seqs.sort();
            for (seq, id) in seqs {
                text.push_str(&format!("{name} {seq} {id}\n"));
            }
        }
        let tmp = self.path.with_extension("tmp");
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, &self.path)?;
        *self = Accepted::load(&self.path)?;
        Ok(())
    }
}

fn parse(line: &[u8]) -> Option<(&str, u64, i64)> {
    let text = std::str::from_utf8(line).ok()?;
    let mut parts = text.split(' ');
    let conversation = parts.next().filter(|c| !c.is_empty())?;
    let seq = parts.next()?.parse().ok()?;
    let msg_id = parts.next()?.parse().ok()?;
    parts
        .next()
        .is_none()
        .then_some((conversation, seq, msg_id))
}

/// The conversation a message belongs to: its sender, or its sender in a group.
pub fn conversation(group: Option<&str>, from: &str) -> String {
    match group {
        Some(g) => format!("g:{g}:{from}"),
        None => format!("d:{from}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 24 * 3600 * 1_000_000;

    #[test]
    fn new_again_replay_and_too_old() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let mut a = Accepted::open(dir.path())?;
        let t = 100 * DAY;
        assert_eq!(a.check("d:alice", t, 7)?, Verdict::New);
        a.record("d:alice", t, 7)?;
        assert_eq!(a.check("d:alice", t, 7)?, Verdict::Again);
        assert_eq!(a.check("d:alice", t, 9)?, Verdict::Replay { first: 7 });
        // Another conversation is separate; a later message moves the window.
        assert_eq!(a.check("d:bob", t, 9)?, Verdict::New);
        a.record("d:alice", t + 8 * DAY, 20)?;
        assert_eq!(
            a.check("d:alice", t + DAY, 21)?,
            Verdict::New,
            "inside the window"
        );
        assert_eq!(a.check("d:alice", t, 22)?, Verdict::TooOld);
        Ok(())
    }

    #[test]
    fn the_record_survives_the_process_and_is_shared_with_others() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let mut one = Accepted::open(dir.path())?;
        let mut two = Accepted::open(dir.path())?;
        one.record("g:team:bob", 5, 1)?;
        assert_eq!(two.check("g:team:bob", 5, 2)?, Verdict::Replay { first: 1 });
        two.record("g:team:bob", 6, 2)?;
        drop((one, two));
        let mut again = Accepted::open(dir.path())?;
        assert_eq!(again.check("g:team:bob", 6, 2)?, Verdict::Again);
        assert_eq!(
            again.check("g:team:bob", 5, 3)?,
            Verdict::Replay { first: 1 }
        );
        Ok(())
    }

    #[test]
    fn a_damaged_line_is_forgotten_not_believed() -> Result<()> {
        let dir = tempfile::tempdir()?;
        fs::write(
            dir.path().join("accepted"),
            "d:alice 5 1\ngarbage\nd:alice x 2\nd:bob 9 3\n",
        )?;
        let mut a = Accepted::open(dir.path())?;
        assert_eq!(a.check("d:alice", 5, 1)?, Verdict::Again);
        assert_eq!(a.check("d:bob", 9, 3)?, Verdict::Again);
        Ok(())
    }

    #[test]
    fn an_old_record_is_compacted_when_opened() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let mut a = Accepted::open(dir.path())?;
        for i in 0..2000u64 {
            a.record("d:alice", i * DAY / 10, i as i64)?;
        }
        let before = fs::metadata(dir.path().join("accepted"))?.len();
        let mut b = Accepted::open(dir.path())?;
        let after = fs::metadata(dir.path().join("accepted"))?.len();
        assert!(after < before / 2, "{before} -> {after}");
        let newest = 1999 * DAY / 10;
        assert_eq!(b.check("d:alice", newest, 1999)?, Verdict::Again);
        assert_eq!(b.check("d:alice", 0, 5)?, Verdict::TooOld);
        Ok(())
    }
}
