//! Storage: the interface the rest of the crate sees, and the one a backend implements.
//!
//! * [`Store`] is a process's handle on the database: [`Store::read`] runs read-only work on a
//!   pooled connection of the calling thread; [`Store::submit`] and [`Store::call`] queue work
//!   for the process's single writer thread, which commits many jobs in one transaction (group
//!   commit) and runs each job's completion only after the commit. "Stored" is therefore only
//!   ever said about committed rows.
//! * [`Tx`] is every statement the crate runs, as typed methods. Work handed to a `Store` gets a
//!   `&mut dyn Tx` and never sees a backend's connection type; a second backend (PostgreSQL)
//!   implements `Tx` and the writer's [`writer::Batch`].
//!
//! Two backends, chosen by [`Location`]: SQLite ([`sqlite`], the embedded default: one file
//! shared by the balancer and every chat server, in WAL mode) and PostgreSQL ([`postgres`], for
//! a cluster across machines).
//!
//! # What a backend must guarantee
//!
//! The server's delivery logic (docs/ARCHITECTURE.md, Delivery) relies on these:
//!
//! 1. **Message ids follow commit order.** A message id is unique, never reused, and a message
//!    committed after another has a larger id. A login's sync reads the queue once and then
//!    drops live messages with ids up to the last one it read; a group member's position means
//!    "everything up to this id is acknowledged". Both would skip a message whose id is lower
//!    than one already seen but which committed later. SQLite gives commit order for free: an
//!    `AUTOINCREMENT` id is assigned under the single database-wide write lock. A PostgreSQL
//!    sequence does not (two transactions may commit in the other order of their ids), so a
//!    PostgreSQL backend must assign ids under a lock held until commit, or order deliveries
//!    by a per-recipient sequence assigned in the same transaction.
//! 2. **[`Tx::newest_message_id`] covers every committed id**, including those of messages
//!    already delivered and deleted (SQLite reads `sqlite_sequence`, not `max(id)`).
//! 3. **A message and the presence it was routed by are read in one transaction**
//!    ([`Tx::store_message`] returns both), and a login commits its presence row before it
//!    reads its queue: one of the two sees the other.
//! 4. **A job's writes commit with its batch or not at all**, and a job that fails undoes only
//!    its own writes ([`Store::submit`]); a batch whose transaction cannot begin runs no job.
//! 5. **Re-sends are idempotent**: `(sender, client_id)` is unique among stored messages, and a
//!    delivered message is remembered (by id) for at least two purge periods.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::Result;
use crate::net::{Envelope, GroupInfo, PublicKeys, WrappedKey};

pub mod postgres;
pub mod sqlite;
pub mod writer;

#[cfg(test)]
pub(crate) mod merged_tests;

pub use writer::Urgency;
use writer::Writer;

/// Where messages stored before `before_ms` end: the smallest id whose message was stored at
/// `before_ms` or later (one past `newest` if none was), by a binary search over ids, each
/// probe `first_at_or_after(id)` (the first message at or after `id`: its id and `sent_at`),
/// an index lookup. `None` when there are no messages or the oldest is not that old, the
/// usual case, in one probe. Ids follow commit order and `sent_at` is the storing server's
/// clock at commit: with servers on several machines a message may expire late by as much as
/// their clocks disagree, never early (the caller also filters by `sent_at`).
pub fn expiry_bound(
    before_ms: i64,
    newest: i64,
    mut first_at_or_after: impl FnMut(i64) -> Result<Option<(i64, i64)>>,
) -> Result<Option<i64>> {
    let Some((oldest, sent)) = first_at_or_after(i64::MIN)? else {
        return Ok(None);
    };
    if sent >= before_ms {
        return Ok(None);
    }
    let (mut lo, mut hi) = (oldest, newest.max(oldest) + 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match first_at_or_after(mid)? {
            Some((_, sent)) if sent >= before_ms => hi = mid,
            Some((id, _)) => lo = id + 1,
            None => hi = mid,
        }
    }
    Ok(Some(lo))
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// How long a statement waits for another process's write lock before it fails, by default.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// How a store is opened.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long work waits for another process's write lock before it fails with an error.
    pub busy_timeout: Duration,
    /// Bytes of the write-ahead log not yet copied into the database (a reader elsewhere is
    /// holding back checkpoints) past which writes slow down; past twice this, they are
    /// refused until the reader lets go.
    pub wal_limit: u64,
    /// How long the writer lets a small batch gather more jobs before it commits (see
    /// [`writer::COMMIT_WINDOW`], the default).
    pub commit_window: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
            wal_limit: DEFAULT_WAL_LIMIT,
            commit_window: writer::COMMIT_WINDOW,
        }
    }
}

impl Options {
    /// Options from a binary's `--db-timeout SECS` and `--wal-limit BYTES`, or why not.
    pub fn from_args(timeout_secs: f64, wal_limit: u64) -> std::result::Result<Options, String> {
        let busy_timeout = match Duration::try_from_secs_f64(timeout_secs) {
            Ok(d) if d >= Duration::from_millis(10) => d,
            _ => return Err("--db-timeout must be at least 0.01 seconds".into()),
        };
        if wal_limit < 1 << 20 {
            return Err("--wal-limit must be at least 1M".into());
        }
        Ok(Options {
            busy_timeout,
            wal_limit,
            ..Options::default()
        })
    }
}

/// The default [`Options::wal_limit`].
pub const DEFAULT_WAL_LIMIT: u64 = 256 << 20;

/// Where the database is: `--db PATH` (SQLite) or `--db postgres://USER@HOST/DB`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A SQLite file, created if needed.
    Sqlite(PathBuf),
    /// A PostgreSQL database, by URL (`postgres://` or `postgresql://`).
    Postgres(String),
}

impl Location {
    /// `s` as a location: a PostgreSQL URL, or else a file path.
    pub fn parse(s: &str) -> Location {
        if postgres::is_url(s) {
            Location::Postgres(s.to_string())
        } else {
            Location::Sqlite(PathBuf::from(s))
        }
    }

    /// The SQLite file, if this is one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Location::Sqlite(p) => Some(p),
            Location::Postgres(_) => None,
        }
    }
}

impl std::str::FromStr for Location {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Location, String> {
        if s.is_empty() {
            return Err("give a file path or a postgres:// URL".into());
        }
        Ok(Location::parse(s))
    }
}

/// A path or a URL, with a URL's password hidden.
impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Sqlite(p) => write!(f, "{}", p.display()),
            Location::Postgres(url) => write!(f, "{}", postgres::redacted(url)),
        }
    }
}

impl From<&Path> for Location {
    fn from(p: &Path) -> Location {
        Location::Sqlite(p.to_path_buf())
    }
}

impl From<&PathBuf> for Location {
    fn from(p: &PathBuf) -> Location {
        Location::Sqlite(p.clone())
    }
}

impl From<PathBuf> for Location {
    fn from(p: PathBuf) -> Location {
        Location::Sqlite(p)
    }
}

/// A process's handle on the database: a pool of read connections and the writer thread.
/// Dropping it commits everything queued, then stops the writer's threads.
pub struct Store {
    readers: Readers,
    writer: Writer,
}

/// The read pool of either backend.
enum Readers {
    Sqlite(sqlite::Readers),
    Postgres(postgres::Readers),
}

impl Store {
    /// Opens (creating if needed) the database, brings its schema up to date, and starts the
    /// writer.
    pub fn open(location: impl Into<Location>) -> Result<Store> {
        Store::open_with(&location.into(), &Options::default())
    }

    /// Like [`Store::open`], with options.
    pub fn open_with(location: &Location, options: &Options) -> Result<Store> {
        match location {
            Location::Sqlite(path) => {
                let (batch, checkpoints) = sqlite::writer_conn(path, options)?;
                Ok(Store {
                    readers: Readers::Sqlite(sqlite::Readers::new(path, options)),
                    writer: Writer::start_with(batch, checkpoints, options.commit_window)?,
                })
            }
            Location::Postgres(url) => {
                let (batch, background) = postgres::writer_conn(url, options)?;
                Ok(Store {
                    readers: Readers::Postgres(postgres::Readers::new(url, options)),
                    writer: Writer::start_with(batch, background, options.commit_window)?,
                })
            }
        }
    }

    /// What the writer thread has committed since the store was opened.
    pub fn writer_stats(&self) -> &writer::Stats {
        &self.writer.stats
    }

    /// Runs read-only `work` on a connection of the pool, on the calling thread.
    pub fn read<T>(&self, work: impl FnOnce(&mut dyn Tx) -> Result<T>) -> Result<T> {
        match &self.readers {
            Readers::Sqlite(r) => r.with(work),
            Readers::Postgres(r) => r.with(work),
        }
    }

    /// Queues `work` for the writer; `done` gets its result once the batch is committed (or
    /// the error that kept it from committing). Blocks only while the writer's queue is full
    /// (backpressure). A failing `work` undoes its own writes and nobody else's.
    pub fn submit<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut dyn Tx) -> Result<T> + Send + 'static,
        done: impl FnOnce(Result<T>) + Send + 'static,
    ) {
        self.writer.submit(work, done, true, None);
    }

    /// Like [`Store::submit`], for work that a request read in `fence`'s freeze epoch asked
    /// for: refused with [`crate::error::Error::Frozen`] if the process has been frozen
    /// since (see [`crate::freeze`]).
    pub fn submit_fenced<T: Send + 'static>(
        &self,
        fence: Fence,
        work: impl FnOnce(&mut dyn Tx) -> Result<T> + Send + 'static,
        done: impl FnOnce(Result<T>) + Send + 'static,
    ) {
        self.writer.submit(work, done, true, Some(fence));
    }

    /// Like [`Store::submit`], without a savepoint: for work whose writes are one statement
    /// (atomic by itself) or whose partial effect is harmless if it fails half-way (removing
    /// acknowledged messages). Saves a statement journal on the hot path.
    pub fn submit_unguarded<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut dyn Tx) -> Result<T> + Send + 'static,
        done: impl FnOnce(Result<T>) + Send + 'static,
    ) {
        self.writer.submit(work, done, false, None);
    }

    /// Queues a first attempt of a direct message without a file, as `submit_unguarded` of
    /// [`Tx::store_message`] would; the writer stores the messages of consecutive such jobs in
    /// one call of [`Tx::store_messages`] (on PostgreSQL, one statement). Fenced like
    /// [`Store::submit_fenced`].
    pub fn submit_message(
        &self,
        msg: DirectMessage,
        urgency: Urgency,
        fence: Fence,
        done: impl FnOnce(Result<StoredMessage>) + Send + 'static,
    ) {
        self.writer.submit_message(msg, urgency, fence, done);
    }

    /// Queues `msg`: stored with its neighbours' where the common case holds
    /// ([`Tx::store_group_messages`]), else by `fallback` in a savepoint of its own (which must
    /// check everything itself).
    pub fn submit_group_message(
        &self,
        msg: GroupMessage,
        fallback: impl FnOnce(&mut dyn Tx, &Outgoing<'_>) -> Result<StoredMessage> + Send + 'static,
        urgency: Urgency,
        fence: Fence,
        done: impl FnOnce(Result<StoredMessage>) + Send + 'static,
    ) {
        self.writer
            .submit_group_message(msg, fallback, urgency, fence, done);
    }

    /// Queues an acknowledgement, as `submit_unguarded` of [`Tx::ack`] would; merged with its
    /// neighbours like [`Store::submit_message`] ([`Tx::ack_many`]).
    pub fn submit_ack(
        &self,
        user: String,
        ids: Vec<i64>,
        done: impl FnOnce(Result<usize>) + Send + 'static,
    ) {
        self.writer.submit_ack(user, ids, done);
    }

    /// Runs `work` on the writer and waits for its commit.
    pub fn call<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut dyn Tx) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.writer.call(work)
    }
}

/// What a queue or a user holds: messages (or files) and their bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// How many messages (or files).
    pub messages: u64,
    /// Their size in bytes (message bodies, or file plaintext sizes).
    pub bytes: u64,
}

/// The freeze epoch ([`crate::freeze::epoch`]) in which the request behind a store was read:
/// the writer refuses the store if the process has been frozen since, for its client may have
/// sent it again through another server (see [`crate::freeze`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence(pub u64);

impl Fence {
    /// The epoch now: for a request read just now.
    pub fn now() -> Fence {
        Fence(crate::freeze::epoch())
    }
}

/// A first attempt of a direct message without a file, as [`Store::submit_message`] queues
/// it.
#[derive(Debug, Clone)]
pub struct DirectMessage {
    /// The sender (from its session).
    pub from: String,
    /// The recipient.
    pub to: String,
    /// The sender's id for it.
    pub client_id: u64,
    /// Ciphertext.
    pub body: Vec<u8>,
}

/// A first attempt of a group message without a file, as [`Store::submit_group_message`]
/// queues it.
#[derive(Debug, Clone)]
pub struct GroupMessage {
    /// The sender (from its session).
    pub from: String,
    /// The group.
    pub group: String,
    /// The key epoch the sender says it sent under.
    pub epoch: u64,
    /// The sender's id for it.
    pub client_id: u64,
    /// Ciphertext.
    pub body: Vec<u8>,
}

impl GroupMessage {
    /// The message, as storing functions take it.
    pub fn outgoing(&self) -> Outgoing<'_> {
        Outgoing::new(&self.from, self.client_id, &self.body)
    }
}

/// A message as its sender hands it over.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    /// The sender (from its session, never from the request).
    pub from: &'a str,
    /// The sender's id for it: a re-send with the same id is not stored twice.
    pub client_id: u64,
    /// Ciphertext.
    pub body: &'a [u8],
    /// A finished upload of the sender's that the message offers.
    pub file: Option<i64>,
    /// Set on a re-send: a message id the original, if stored, is newer than (see
    /// `ServerRequest::Send`).
    pub resend_after: Option<i64>,
}

impl<'a> Outgoing<'a> {
    /// `message`, as `from` sent it.
    pub fn of(from: &'a str, message: &'a crate::net::NewMessage) -> Outgoing<'a> {
        Outgoing {
            from,
            client_id: message.client_id,
            body: &message.body,
            file: message.file,
            resend_after: message.resend_after,
        }
    }

    /// A first attempt without a file.
    pub fn new(from: &'a str, client_id: u64, body: &'a [u8]) -> Outgoing<'a> {
        Outgoing {
            from,
            client_id,
            body,
            file: None,
            resend_after: None,
        }
    }

    /// This message as stored under `id`: to `to` (empty for a group message) or `group`.
    pub fn envelope(&self, id: i64, to: &str, group: Option<&str>, sent_at: i64) -> Envelope {
        Envelope {
            id,
            from: self.from.to_string(),
            to: to.to_string(),
            group: group.map(str::to_string),
            client_id: self.client_id,
            body: self.body.to_vec(),
            sent_at,
        }
    }

    /// `first`, the message stored under this one's client id, if this is a re-send of it; a
    /// refusal if the sender used the id for another message (another recipient, another
    /// body), which would otherwise be dropped as a duplicate without a word.
    pub fn resend_of(&self, first: Envelope, to: &str, group: Option<&str>) -> Result<Envelope> {
        if first.to == to && first.group.as_deref() == group && first.body == self.body {
            Ok(first)
        } else {
            Err(crate::Error::refused(
                crate::error::ErrorCode::Conflict,
                format!(
                    "client id {} was already used for another message; give each message its \
                     own",
                    self.client_id
                ),
            ))
        }
    }
}

/// A session as a chat server checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    /// Whose session.
    pub user: String,
    /// The public key (32-byte Ed25519) its token is proven with.
    pub session_key: Vec<u8>,
    /// When it expires unless renewed (milliseconds since the epoch).
    pub expires_at: i64,
}

/// An account as an operator sees it (`fastchat-admin users list`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UserSummary {
    /// The name, as typed at signup.
    pub name: String,
    /// When it signed up (milliseconds since the epoch).
    pub created_at: i64,
    /// Whether it has public keys (an account an operator made has none until claimed).
    pub has_keys: bool,
    /// Whether it may upload new keys once (after a password reset, or until claimed).
    pub may_rekey: bool,
    /// Direct messages waiting for it.
    pub queued: u64,
    /// Their size in bytes (ciphertext).
    pub queued_bytes: u64,
    /// Connections open now, on any server.
    pub connections: u64,
    /// Groups it is a member of.
    pub groups: u64,
}

/// A user connected to a server (`fastchat-admin online`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OnlineRow {
    /// Who.
    pub user: String,
    /// The server's id.
    pub server_id: u64,
    /// The server's name.
    pub server: String,
    /// How many connections they have there.
    pub connections: u64,
}

/// What deleting a user took with it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Deleted {
    /// Groups they owned, deleted with their messages.
    pub groups_deleted: Vec<String>,
    /// Other people's groups they were in: their signed member lists still name them until
    /// those groups' admins remove them.
    pub groups_left: Vec<String>,
    /// Direct messages that were waiting for them.
    pub messages_deleted: u64,
}

/// A stored message as an export shows it: ciphertext and metadata, nothing decrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    /// Its id.
    pub id: i64,
    /// Who sent it.
    pub sender: String,
    /// The recipient of a direct message.
    pub recipient: Option<String>,
    /// The group of a group message.
    pub group: Option<String>,
    /// The sender's id for it.
    pub client_id: u64,
    /// When it was stored (milliseconds since the epoch).
    pub sent_at: i64,
    /// The body, end-to-end encrypted.
    pub body: Vec<u8>,
    /// The file it offers, if any.
    pub file_id: Option<i64>,
}

/// What storing a message produced: the envelope and where its recipients are connected (read
/// in the same transaction, so a login racing with this message either sees the message in its
/// queue or is in this list).
#[derive(Debug)]
pub struct StoredMessage {
    /// The stored message.
    pub envelope: Envelope,
    /// `(server id, user)` for every connection of a recipient, sorted by server.
    pub online_at: Vec<(u64, String)>,
}

/// Every statement the crate runs, grouped by concern. Refusals that only the database can
/// see (an unknown recipient, an unfinished upload) are [`crate::Error::Refused`]; rules that
/// need no database (who may add a member) are decided by the caller
/// ([`crate::membership`]).
pub trait Tx {
    // -- Accounts and sessions -----------------------------------------------------------

    /// Inserts a new user. `Ok(false)` if the name is taken.
    fn create_user(&mut self, name: &str, password_hash: &str, keys: &PublicKeys) -> Result<bool>;
    /// The stored password hash of a user, if the user exists.
    fn password_hash(&mut self, name: &str) -> Result<Option<String>>;
    /// Whether a user exists.
    fn user_exists(&mut self, name: &str) -> Result<bool>;
    /// A user's public keys.
    fn user_keys(&mut self, name: &str) -> Result<Option<PublicKeys>>;
    /// Stores a session (by the token's hash, with the public key its token is proven with)
    /// and drops expired ones.
    fn create_session(
        &mut self,
        token_hash: &[u8],
        user: &str,
        expires_at: i64,
        session_key: &[u8],
    ) -> Result<()>;
    /// Ends a session (logout); unknown tokens are ignored.
    fn end_session(&mut self, token_hash: &[u8]) -> Result<()>;
    /// The session a token belongs to, if it exists and has not expired.
    fn session(&mut self, token_hash: &[u8]) -> Result<Option<SessionRow>>;
    /// Moves a live session's expiry to `expires_at`.
    fn renew_session(&mut self, token_hash: &[u8], expires_at: i64) -> Result<()>;

    // -- The cluster registry: servers and presence --------------------------------------

    /// Registers the server named `name` at `addr` and returns its id: the same id every
    /// time the same name registers.
    fn register_server(&mut self, name: &str, addr: &str) -> Result<u64>;
    /// Forgets the connections of a server gone silent: its presence rows and its unfinished
    /// uploads (its row and id stay with its name).
    fn forget_server(&mut self, server_id: u64) -> Result<()>;
    /// The name a server registered with, if it is still registered.
    fn server_name(&mut self, server_id: u64) -> Result<Option<String>>;
    /// The address and name a server registered with, if it is still registered.
    fn server_addr(&mut self, server_id: u64) -> Result<Option<(String, String)>>;
    /// Records that `user` is connected to `server_id` on connection `conn_id`, with the
    /// session whose token hashes to `token_hash`.
    fn add_presence(
        &mut self,
        server_id: u64,
        conn_id: u64,
        user: &str,
        token_hash: &[u8],
    ) -> Result<()>;
    /// The connections on `server_id` whose session has ended (logged out or expired).
    fn ended_sessions(&mut self, server_id: u64) -> Result<Vec<u64>>;
    /// The connections on `server_id` that have a presence row.
    fn present_connections(&mut self, server_id: u64) -> Result<Vec<u64>>;
    /// Removes one connection's presence row.
    fn remove_presence(&mut self, server_id: u64, conn_id: u64) -> Result<()>;
    /// Removes every presence row of a server (at its start, after a crash of an earlier run).
    fn clear_presence(&mut self, server_id: u64) -> Result<()>;
    /// Users connected now to one of `servers` (the live ones), by name (at most `limit`).
    fn online_users(&mut self, limit: usize, servers: &[u64]) -> Result<Vec<String>>;
    /// Which of `users` are connected now to one of `servers`.
    fn online_among(&mut self, users: &[String], servers: &[u64]) -> Result<Vec<String>>;
    /// The servers that have presence rows.
    fn presence_servers(&mut self) -> Result<Vec<u64>>;

    // -- The message queue ---------------------------------------------------------------

    /// The newest message id ever assigned (invariant 2).
    fn newest_message_id(&mut self) -> Result<i64>;
    /// Stores a direct message, idempotently per `(sender, client_id)`: a re-send returns the
    /// first copy, even one already delivered (see [`Outgoing::resend_after`]). `file` must be
    /// a finished upload of the sender's. An unknown recipient is refused.
    fn store_message(&mut self, msg: &Outgoing<'_>, to: &str) -> Result<StoredMessage>;
    /// Stores first attempts of direct messages without files, as [`Tx::store_message`]
    /// would one after another, in order: a result per message (a refusal is that message's).
    /// `Err` when a statement failed, after which the transaction holds nothing of the call
    /// (PostgreSQL: none of the batch). A backend with round trips stores them all at once.
    fn store_messages(
        &mut self,
        msgs: &[(Outgoing<'_>, &str)],
    ) -> Result<Vec<Result<StoredMessage>>> {
        Ok(msgs
            .iter()
            .map(|(m, to)| self.store_message(m, to))
            .collect())
    }
    /// The copy of an earlier attempt of this group message, if one was stored (or delivered
    /// and removed, with an id above `msg.resend_after`), with the members to route it to.
    fn stored_group_copy(
        &mut self,
        msg: &Outgoing<'_>,
        group: &str,
    ) -> Result<Option<StoredMessage>>;
    /// Stores first attempts of group messages without files, each `(message, group, epoch)`,
    /// where the common case holds: the sender is a member, `epoch` is the group's current
    /// epoch and has its keys, no copy is stored under the client id, and another member will
    /// receive it. `Some` (as [`Tx::store_group_message`] would answer) for those, in order;
    /// `None` for the others, which the caller then stores one by one with the checks that
    /// say why. `Err` as for [`Tx::store_messages`]. A backend without round trips may leave
    /// them all (SQLite stores them one by one, but reads each group once per call and needs no
    /// savepoint per message).
    fn store_group_messages(
        &mut self,
        msgs: &[(Outgoing<'_>, &str, u64)],
    ) -> Result<Vec<Option<StoredMessage>>> {
        Ok(msgs.iter().map(|_| None).collect())
    }
    /// Stores a group message once (membership and epoch are the caller's to check), offering
    /// `msg.file` if set; returns it with the other members' connections.
    fn store_group_message(&mut self, msg: &Outgoing<'_>, group: &str) -> Result<StoredMessage>;
    /// Up to `limit` queued messages for `user` with ids above `after`, oldest first.
    fn queued(&mut self, user: &str, after: i64, limit: usize) -> Result<Vec<Envelope>>;
    /// Acknowledges messages for `user`: direct ones are removed, group ones move the user's
    /// position (never past an unacknowledged one). Ids that are not the user's to
    /// acknowledge are ignored; returns how many were.
    fn ack(&mut self, user: &str, ids: &[i64]) -> Result<usize>;
    /// Several users' acknowledgements, as [`Tx::ack`] would apply them one after another: a
    /// count per `(user, ids)`. `Err` as for [`Tx::store_messages`].
    fn ack_many(&mut self, acks: &[(&str, &[i64])]) -> Result<Vec<Result<usize>>> {
        Ok(acks.iter().map(|(user, ids)| self.ack(user, ids)).collect())
    }
    /// Forgets the deliveries of messages with ids up to `upto`, the oldest `limit` of them at
    /// most; returns how many.
    fn forget_deliveries(&mut self, upto: i64, limit: usize) -> Result<usize>;
    /// What a queue holds: a user's direct messages, or (`g:GROUP`) a group's messages not yet
    /// read by every member.
    fn queue_usage(&mut self, owner: &str) -> Result<Usage>;
    /// What `sender` holds in `recipient`'s queue.
    fn pair_usage(&mut self, sender: &str, recipient: &str) -> Result<Usage>;
    /// The queues (as [`Tx::queue_usage`] names them) holding at least `messages` messages or
    /// `bytes` bytes: a look over the whole queue, for now and then.
    fn heavy_queues(&mut self, messages: u64, bytes: u64) -> Result<Vec<(String, Usage)>>;
    /// The senders with at least `messages` messages or `bytes` bytes waiting for one
    /// recipient, keyed `SENDER RECIPIENT`.
    fn heavy_senders(&mut self, messages: u64, bytes: u64) -> Result<Vec<(String, Usage)>>;
    /// Deletes up to `limit` messages stored before `before_ms`, with the files they offer;
    /// returns how many.
    fn expire_messages(&mut self, before_ms: i64, limit: usize) -> Result<usize>;

    // -- Groups --------------------------------------------------------------------------

    /// A group's admin, members (longest-standing first), epoch and whether it is keyed.
    fn group(&mut self, group: &str) -> Result<Option<GroupInfo>>;
    /// The names of the groups `user` belongs to, sorted.
    fn user_groups(&mut self, user: &str) -> Result<Vec<String>>;
    /// Creates a group with `admin` as its only member at epoch 1; `false` if the name is
    /// taken.
    fn create_group(&mut self, group: &str, admin: &str) -> Result<bool>;
    /// Adds a member, whose position starts at the newest message id (members read only what
    /// is sent after they join).
    fn add_member(&mut self, group: &str, user: &str) -> Result<()>;
    /// Removes a member, and the group messages that only they still needed.
    fn remove_member(&mut self, group: &str, user: &str) -> Result<()>;
    /// Sets a group's admin and epoch.
    fn set_group(&mut self, group: &str, admin: &str, epoch: u64) -> Result<()>;
    /// Deletes a group with its messages and the files they offer.
    fn delete_group(&mut self, group: &str) -> Result<()>;
    /// Appends change `seq` (a serialized signed change) to a group's chain.
    fn add_change(&mut self, group: &str, seq: u64, change: &[u8]) -> Result<()>;
    /// Up to `limit` changes of a group's chain after `after`, in order.
    fn changes(&mut self, group: &str, after: u64, limit: usize) -> Result<Vec<Vec<u8>>>;
    /// The last change of a group's chain.
    fn last_change(&mut self, group: &str) -> Result<Option<Vec<u8>>>;
    /// Stores wrapped keys of `epoch`, each for its member, wrapped by `by`.
    fn put_keys(&mut self, group: &str, epoch: u64, keys: &[WrappedKey], by: &str) -> Result<()>;
    /// `member`'s wrapped key of `epoch`, and who wrapped it.
    fn group_key(
        &mut self,
        group: &str,
        epoch: u64,
        member: &str,
    ) -> Result<Option<(Vec<u8>, String)>>;

    // -- Prekeys (the key directory of the asynchronous key agreement) --------------------

    /// Stores prekeys of `user`: `signed` replaces their signed prekey; `one_time` are added
    /// unless that would make more than `max` (refused). Returns how many one-time prekeys
    /// they now have.
    fn put_prekeys(
        &mut self,
        user: &str,
        signed: Option<&crate::net::SignedPrekey>,
        one_time: &[(u32, Vec<u8>)],
        max: usize,
    ) -> Result<u64>;
    /// A user's bundle: their identity X25519 key, signed prekey, and one one-time prekey,
    /// which is deleted (never handed out twice); `None` without a signed prekey.
    fn take_bundle(&mut self, user: &str) -> Result<Option<crate::crypto::x3dh::Bundle>>;

    // -- Operators (fastchat-admin) ------------------------------------------------------

    /// Every account, by name, with what it holds on the servers.
    fn users(&mut self) -> Result<Vec<UserSummary>>;
    /// Makes an account without keys that its owner claims at their first signup; `false`
    /// if the name is taken.
    fn create_account(&mut self, name: &str, password_hash: &str) -> Result<bool>;
    /// Sets a user's password, ends their sessions and lets them upload new keys once;
    /// `false` if there is no such user.
    fn reset_password(&mut self, name: &str, password_hash: &str) -> Result<bool>;
    /// Replaces a user's public keys if an operator allowed it; `false` if not.
    fn set_keys(&mut self, name: &str, keys: &PublicKeys) -> Result<bool>;
    /// Ends every session of a user; how many there were.
    fn end_sessions(&mut self, name: &str) -> Result<usize>;
    /// Deletes a user and what is theirs (see [`Deleted`]); `None` if there is no such user.
    fn delete_user(&mut self, name: &str) -> Result<Option<Deleted>>;
    /// Who is connected, where.
    fn online(&mut self) -> Result<Vec<OnlineRow>>;
    /// Messages stored and not yet acknowledged, in all.
    fn queued_total(&mut self) -> Result<u64>;
    /// Empties a user's queue (direct messages, and their place in each group); how many
    /// direct messages went.
    fn purge_queue(&mut self, name: &str) -> Result<u64>;
    /// The messages to or from `user` (or all), as stored, oldest first.
    fn export(&mut self, user: Option<&str>) -> Result<Vec<Exported>>;

    // -- Files ---------------------------------------------------------------------------

    /// The files `owner` has stored (unfinished uploads and offered files), or all files:
    /// how many, and their plaintext size.
    fn file_usage(&mut self, owner: Option<&str>) -> Result<Usage>;
    /// Starts an upload of `chunks` chunks for `owner` on connection `conn_id` of
    /// `server_id`, unless that connection already has `limit` unfinished uploads.
    fn begin_upload(
        &mut self,
        owner: &str,
        server_id: u64,
        conn_id: u64,
        size: u64,
        chunks: u64,
        limit: usize,
    ) -> Result<i64>;
    /// Stores chunk `index` of an unfinished upload of `owner`'s.
    fn store_chunk(&mut self, owner: &str, upload: i64, index: u64, data: &[u8]) -> Result<()>;
    /// Chunk `index` of the file offered by message `msg_id`, if that message is queued for
    /// `user`.
    fn file_chunk(&mut self, user: &str, msg_id: i64, index: u64) -> Result<Vec<u8>>;
    /// Deletes the unfinished uploads of one connection (it ended), or of a whole server when
    /// `conn_id` is `None` (it restarted or died).
    fn drop_uploads(&mut self, server_id: u64, conn_id: Option<u64>) -> Result<usize>;
}
