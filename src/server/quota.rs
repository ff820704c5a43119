//! Quotas: what one recipient's queue, one sender in it, one user's files and all files may
//! hold, and how long a message is kept. Checks over what the database says is held
//! ([`Usage`]), which the session runs in the transaction that stores.
//!
//! Counting a queue for every message would cost the writer more than the message itself.
//! Instead a [`Watch`] looks over the whole queue every heartbeat (on a reader connection),
//! adds what this server was handed since, and a send counts exactly only for a queue (or a
//! sender's share of one) that may be past half its quota; a send to any other costs nothing
//! more. Through one server the quotas hold exactly; messages sent through the other servers
//! in the half second between two looks can overshoot them by what arrives in that time.

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use crate::db::{Tx, Usage};
use crate::error::{Error, ErrorCode, Result};
use crate::units::human_size as size;

/// What may be held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// Messages waiting in one queue: a user's, or a group's (not yet read by every member).
    pub queue_messages: u64,
    /// Their bytes.
    pub queue_bytes: u64,
    /// Messages one sender may have waiting in one recipient's queue.
    pub sender_messages: u64,
    /// Their bytes.
    pub sender_bytes: u64,
    /// Files one user may have stored (uploading, or offered and not yet taken).
    pub user_files: u64,
    /// Their bytes.
    pub user_file_bytes: u64,
    /// Bytes of all files stored.
    pub total_file_bytes: u64,
    /// Messages (and the files they offer) are deleted this long after they were stored.
    pub lifetime: Duration,
}

impl Default for Quotas {
    fn default() -> Quotas {
        Quotas {
            queue_messages: 10_000,
            queue_bytes: 256 << 20,
            sender_messages: 1_000,
            sender_bytes: 64 << 20,
            user_files: 100,
            user_file_bytes: 1 << 30,
            total_file_bytes: 8 << 30,
            lifetime: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

fn full(message: String) -> Error {
    Error::refused(ErrorCode::QuotaExceeded, message)
}

impl Quotas {
    /// Whether one more message of `len` bytes fits in `queue` (`whose`: "bob's queue", "group
    /// alice/team") and, for a direct message, in what its sender already has there (`mine`).
    pub fn check_message(
        &self,
        whose: &str,
        queue: Usage,
        mine: Option<Usage>,
        len: u64,
    ) -> Result<()> {
        if queue.messages >= self.queue_messages || queue.bytes + len > self.queue_bytes {
            return Err(full(format!(
                "{whose} is full ({} messages, {} waiting; at most {} messages, {}); try again \
                 once some are read",
                queue.messages,
                size(queue.bytes),
                self.queue_messages,
                size(self.queue_bytes)
            )));
        }
        if let Some(mine) = mine {
            if mine.messages >= self.sender_messages || mine.bytes + len > self.sender_bytes {
                return Err(full(format!(
                    "you have {} messages ({}) waiting in {whose}, the most one sender may \
                     ({} messages, {}); try again once some are read",
                    mine.messages,
                    size(mine.bytes),
                    self.sender_messages,
                    size(self.sender_bytes)
                )));
            }
        }
        Ok(())
    }

    /// Whether a file of `len` bytes fits in what its owner (`mine`) and everyone (`all`)
    /// have stored.
    pub fn check_file(&self, mine: Usage, all: Usage, len: u64) -> Result<()> {
        if mine.messages >= self.user_files || mine.bytes + len > self.user_file_bytes {
            return Err(full(format!(
                "you have {} files ({}) stored, the most one user may ({} files, {}); they go \
                 once their recipients take them",
                mine.messages,
                size(mine.bytes),
                self.user_files,
                size(self.user_file_bytes)
            )));
        }
        if all.bytes + len > self.total_file_bytes {
            return Err(full(format!(
                "the server's file space is full ({} of {}); try again later",
                size(all.bytes),
                size(self.total_file_bytes)
            )));
        }
        Ok(())
    }
}

/// The queues and senders near their quotas: as the last look over the whole queue found
/// them, plus what was sent through this server since.
#[derive(Debug, Default)]
pub struct Watch {
    /// Queues and senders at a quarter of their quota or more at the last look.
    seen: RwLock<Seen>,
    /// What this server was handed since then, per queue and per sender in a queue.
    since: Mutex<Seen>,
}

/// Usage by queue, and by sender within a queue: looked up by name, so that a send makes no
/// key (it is on every message's path).
#[derive(Debug, Default)]
struct Seen {
    queues: HashMap<String, Usage>,
    /// Queue, then sender.
    senders: HashMap<String, HashMap<String, Usage>>,
}

impl Seen {
    fn sender(&self, queue: &str, sender: &str) -> Option<Usage> {
        self.senders.get(queue)?.get(sender).copied()
    }
}

/// `*usage += one`, adding the entry for `key` if there is none.
fn count_in(map: &mut HashMap<String, Usage>, key: &str, one: Usage) {
    match map.get_mut(key) {
        Some(u) => *u = add(*u, one),
        None => {
            map.insert(key.to_string(), one);
        }
    }
}

fn add(a: Usage, b: Usage) -> Usage {
    Usage {
        messages: a.messages + b.messages,
        bytes: a.bytes + b.bytes,
    }
}

fn past_half(u: Usage, max_messages: u64, max_bytes: u64) -> bool {
    u.messages >= max_messages / 2 || u.bytes >= max_bytes / 2
}

impl Watch {
    /// Looks over the whole queue again.
    pub fn refresh(&self, tx: &mut dyn Tx, quotas: &Quotas) -> Result<()> {
        let queues = tx.heavy_queues(quotas.queue_messages / 4, quotas.queue_bytes / 4)?;
        let pairs = tx.heavy_senders(quotas.sender_messages / 4, quotas.sender_bytes / 4)?;
        let mut senders: HashMap<String, HashMap<String, Usage>> = HashMap::new();
        for (pair, usage) in pairs {
            // `SENDER RECIPIENT`: names have no spaces.
            if let Some((sender, queue)) = pair.split_once(' ') {
                senders
                    .entry(queue.to_string())
                    .or_default()
                    .insert(sender.to_string(), usage);
            }
        }
        // The same order as `count`: `seen`, then `since`.
        let mut seen = self.seen.write();
        let mut since = self.since.lock();
        *seen = Seen {
            queues: queues.into_iter().collect(),
            senders,
        };
        *since = Seen::default();
        Ok(())
    }

    /// Notes a message of `len` bytes handed to this server for `queue` (a user, or
    /// `g:GROUP`), from `sender` when it is a direct one; returns whether, before it, the
    /// queue or the sender's share of it may have been past half its quota: then the send
    /// counts exactly. A queue not seen at the last look is taken to be just under a quarter
    /// full.
    pub fn count(&self, quotas: &Quotas, queue: &str, sender: Option<&str>, len: u64) -> bool {
        let (seen, mut since) = (self.seen.read(), self.since.lock());
        let estimate = |seen: Option<Usage>, since: Option<Usage>, m: u64, b: u64| {
            let base = seen.unwrap_or(Usage {
                messages: m / 4,
                bytes: b / 4,
            });
            past_half(add(base, since.unwrap_or_default()), m, b)
        };
        let near = estimate(
            seen.queues.get(queue).copied(),
            since.queues.get(queue).copied(),
            quotas.queue_messages,
            quotas.queue_bytes,
        ) || sender.is_some_and(|s| {
            estimate(
                seen.sender(queue, s),
                since.sender(queue, s),
                quotas.sender_messages,
                quotas.sender_bytes,
            )
        });
        let one = Usage {
            messages: 1,
            bytes: len,
        };
        count_in(&mut since.queues, queue, one);
        if let Some(s) = sender {
            let shares = match since.senders.get_mut(queue) {
                Some(shares) => shares,
                None => since.senders.entry(queue.to_string()).or_default(),
            };
            count_in(shares, s, one);
        }
        near
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn used(messages: u64, bytes: u64) -> Usage {
        Usage { messages, bytes }
    }

    fn code(r: Result<()>) -> Option<ErrorCode> {
        match r {
            Ok(()) => None,
            Err(Error::Refused { code, .. }) => Some(code),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn messages_fit_until_a_queue_or_a_senders_share_is_full() {
        let q = Quotas {
            queue_messages: 10,
            queue_bytes: 1000,
            sender_messages: 3,
            sender_bytes: 500,
            ..Quotas::default()
        };
        let full = Some(ErrorCode::QuotaExceeded);
        assert_eq!(
            code(q.check_message("bob's queue", used(9, 900), Some(used(2, 400)), 100)),
            None
        );
        assert_eq!(
            code(q.check_message("bob's queue", used(10, 0), None, 1)),
            full
        );
        assert_eq!(
            code(q.check_message("bob's queue", used(0, 950), None, 51)),
            full
        );
        assert_eq!(
            code(q.check_message("bob's queue", used(5, 0), Some(used(3, 0)), 1)),
            full
        );
        assert_eq!(
            code(q.check_message("bob's queue", used(5, 0), Some(used(1, 450)), 51)),
            full
        );
        let err = q
            .check_message("bob's queue", used(10, 0), None, 1)
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("bob's queue is full (10 messages"),
            "{err}"
        );
    }

    #[test]
    fn a_queue_is_counted_once_what_was_sent_may_have_filled_half_of_it() {
        let q = Quotas {
            queue_messages: 8,
            sender_messages: 100,
            ..Quotas::default()
        };
        let w = Watch::default();
        // Unseen at the last look: taken as a quarter full (2 of 8); each count says what
        // was before it.
        assert!(!w.count(&q, "bob", Some("alice"), 10), "2 + 0 of 8");
        assert!(!w.count(&q, "bob", Some("alice"), 10), "2 + 1 of 8");
        assert!(w.count(&q, "bob", Some("alice"), 10), "2 + 2 of 8");
        assert!(!w.count(&q, "carol", Some("alice"), 10), "another queue");
        // A sender's share is watched on its own.
        let share = Quotas {
            queue_messages: 100,
            sender_messages: 4,
            ..q
        };
        let w = Watch::default();
        assert!(!w.count(&share, "dave", Some("alice"), 1), "1 + 0 of 4");
        assert!(w.count(&share, "dave", Some("alice"), 1), "1 + 1 of 4");
        assert!(!w.count(&share, "dave", Some("carol"), 1), "carol's share");
        assert!(
            !w.count(&share, "erin", Some("alice"), 1),
            "alice's share of another"
        );
    }

    #[test]
    fn a_look_over_the_queue_finds_who_is_heavy_and_forgets_what_was_counted_since() -> Result<()> {
        use crate::db::sqlite::{open, SqliteTx};
        use crate::db::Outgoing;
        use crate::net::PublicKeys;
        // Queues large enough that only senders' shares come near.
        let q = Quotas {
            queue_messages: 100,
            sender_messages: 4,
            ..Quotas::default()
        };
        let dir = tempfile::tempdir()?;
        let conn = open(&dir.path().join("chat.db"))?;
        let tx = &mut SqliteTx::new(&conn);
        let keys = PublicKeys {
            x25519: vec![1; 32],
            ed25519: vec![2; 32],
        };
        for u in ["alice", "bob", "carol"] {
            assert!(tx.create_user(u, "h", &keys)?);
        }
        let w = Watch::default();
        assert!(!w.count(&q, "bob", Some("alice"), 1));
        assert!(
            w.count(&q, "bob", Some("alice"), 1),
            "alice's share: 1 + 1 of 4"
        );
        // The queue holds nothing: at the next look nobody is heavy, and what was counted
        // since the last one is forgotten.
        w.refresh(tx, &q)?;
        assert!(!w.count(&q, "bob", Some("alice"), 1));
        // Carol has three messages waiting in bob's queue: her share is seen past half.
        for i in 0..3 {
            tx.store_message(&Outgoing::new("carol", i, b"x"), "bob")?;
        }
        w.refresh(tx, &q)?;
        assert!(
            w.count(&q, "bob", Some("carol"), 1),
            "carol's share: 3 of 4"
        );
        assert!(
            !w.count(&q, "bob", Some("alice"), 1),
            "alice's share: 1 + 0 of 4"
        );
        assert!(!w.count(&q, "carol", Some("bob"), 1), "another queue");
        Ok(())
    }

    #[test]
    fn files_fit_until_a_users_or_the_servers_space_is_full() {
        let q = Quotas {
            user_files: 2,
            user_file_bytes: 100,
            total_file_bytes: 1000,
            ..Quotas::default()
        };
        assert_eq!(code(q.check_file(used(1, 50), used(5, 500), 50)), None);
        assert!(code(q.check_file(used(2, 0), used(5, 500), 1)).is_some());
        assert!(code(q.check_file(used(0, 60), used(5, 500), 41)).is_some());
        assert!(code(q.check_file(used(0, 0), used(5, 990), 11)).is_some());
    }
}
