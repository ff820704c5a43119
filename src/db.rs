//! Storage: one SQLite file shared by the balancer and every chat server.
//!
//! * [`open`] sets WAL mode, `synchronous=NORMAL`, a busy timeout and foreign keys, then brings
//!   the schema up to date ([`migrate`], versioned with `PRAGMA user_version`).
//! * Reads go through a small [`Readers`] pool of connections.
//! * Writes go through one [`Writer`] thread per process, which batches every queued job into one
//!   `BEGIN IMMEDIATE` transaction (group commit) and runs each job's completion only after the
//!   commit, in submission order. "Stored" is therefore only ever said about committed rows.
//!
//! Every statement is parameterised; no SQL is assembled from strings.
//!
//! This module is the storage interface: the rest of the crate calls the functions here and never
//! writes SQL of its own, so another backend can take its place.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{bounded, Receiver, Sender};
use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension};

use crate::error::{Error, Result};
use crate::mailbox;
use crate::net::{Envelope, ErrorCode, GroupInfo, PublicKeys, WrappedKey};

/// How long a statement waits for another process's write lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest single sleep while waiting for the write lock.
const BUSY_SLEEP_MAX: Duration = Duration::from_micros(500);

/// SQLite's busy handler: called with the number of earlier calls for this wait; `true` to try
/// again. Sleeps grow from 25 µs to [`BUSY_SLEEP_MAX`] and stop after about [`BUSY_TIMEOUT`].
/// (SQLite's own handler sleeps up to 100 ms at a time: with several servers taking turns at
/// the lock, that leaves a writer asleep long after the lock is free.)
fn busy_wait(attempt: i32) -> bool {
    let attempt = attempt.max(0) as u32;
    let sleep = Duration::from_micros(25u64 << attempt.min(6)).min(BUSY_SLEEP_MAX);
    let attempts = (BUSY_TIMEOUT.as_micros() / BUSY_SLEEP_MAX.as_micros()) as u32;
    if attempt > attempts {
        return false;
    }
    std::thread::sleep(sleep);
    true
}

/// Opens a connection with the busy handler set.
fn connect(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_handler(Some(busy_wait))?;
    Ok(conn)
}

/// Most jobs committed in one transaction.
const MAX_BATCH: usize = 2048;

/// How long a small batch waits for more jobs before it commits (group commit). A commit costs
/// far more than a job (WAL frames, locks, a wake-up of every thread it answers), so at a
/// moderate load a short wait saves most of that work for a small delay.
const COMMIT_WINDOW: Duration = Duration::from_micros(300);

/// How often a writer removes delivery records that are too old to matter: those of messages
/// stored more than two periods ago (a client re-sends within `client::FAILOVER_LIMIT`).
const PURGE_EVERY: Duration = Duration::from_secs(30);

/// A batch this large commits without waiting: the load is high enough to fill batches.
const WINDOW_SKIP: usize = 32;

/// The schema, one entry per version. Never edit an entry that has shipped: add a new one.
const MIGRATIONS: &[&str] = &[
    // Version 1: accounts, sessions, servers, presence, groups, the store-and-forward queue
    // (a group message is stored once, with `grp` set; each member has a delivery position).
    "CREATE TABLE users (
        name          TEXT PRIMARY KEY,
        password_hash TEXT NOT NULL,
        x25519        BLOB NOT NULL,
        ed25519       BLOB NOT NULL,
        created_at    INTEGER NOT NULL
    );
    CREATE TABLE sessions (
        token_hash BLOB PRIMARY KEY,
        user       TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        expires_at INTEGER NOT NULL
    );
    CREATE INDEX sessions_expiry ON sessions(expires_at);
    CREATE TABLE servers (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        addr          TEXT NOT NULL,
        secret_hash   BLOB NOT NULL,
        registered_at INTEGER NOT NULL
    );
    CREATE TABLE presence (
        server_id INTEGER NOT NULL,
        conn_id   INTEGER NOT NULL,
        user      TEXT NOT NULL,
        PRIMARY KEY (server_id, conn_id)
    );
    CREATE INDEX presence_user ON presence(user, server_id);
    CREATE TABLE groups (
        name       TEXT PRIMARY KEY,
        admin      TEXT NOT NULL REFERENCES users(name),
        epoch      INTEGER NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE members (
        grp      TEXT NOT NULL REFERENCES groups(name) ON DELETE CASCADE,
        user     TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        seq      INTEGER NOT NULL,
        position INTEGER NOT NULL,
        PRIMARY KEY (grp, user)
    );
    CREATE INDEX members_user ON members(user);
    CREATE TABLE group_keys (
        grp        TEXT NOT NULL REFERENCES groups(name) ON DELETE CASCADE,
        epoch      INTEGER NOT NULL,
        member     TEXT NOT NULL,
        wrapped    BLOB NOT NULL,
        wrapped_by TEXT NOT NULL,
        PRIMARY KEY (grp, epoch, member)
    );
    CREATE TABLE group_acks (
        grp    TEXT NOT NULL,
        user   TEXT NOT NULL,
        msg_id INTEGER NOT NULL,
        PRIMARY KEY (grp, user, msg_id),
        FOREIGN KEY (grp, user) REFERENCES members(grp, user) ON DELETE CASCADE
    ) WITHOUT ROWID;
    CREATE TABLE files (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        owner      TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        server_id  INTEGER NOT NULL,
        conn_id    INTEGER NOT NULL,
        size       INTEGER NOT NULL,
        chunks     INTEGER NOT NULL,
        complete   INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX files_uploading ON files(server_id, conn_id) WHERE complete = 0;
    CREATE TABLE file_chunks (
        file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
        idx     INTEGER NOT NULL,
        data    BLOB NOT NULL,
        PRIMARY KEY (file_id, idx)
    );
    CREATE TABLE messages (
        id        INTEGER PRIMARY KEY AUTOINCREMENT,
        sender    TEXT NOT NULL,
        recipient TEXT REFERENCES users(name) ON DELETE CASCADE,
        grp       TEXT REFERENCES groups(name) ON DELETE CASCADE,
        client_id INTEGER NOT NULL,
        body      BLOB NOT NULL,
        sent_at   INTEGER NOT NULL,
        file_id   INTEGER REFERENCES files(id),
        UNIQUE (sender, client_id),
        CHECK ((recipient IS NULL) <> (grp IS NULL))
    );
    -- Partial indexes: a message is in the one that applies to it, so storing and removing a
    -- message touches three b-trees (table, sender/client_id, one of these) instead of five.
    CREATE INDEX messages_recipient ON messages(recipient, id) WHERE recipient IS NOT NULL;
    CREATE INDEX messages_group ON messages(grp, id) WHERE grp IS NOT NULL;
    CREATE UNIQUE INDEX messages_file ON messages(file_id) WHERE file_id IS NOT NULL;
    -- Messages delivered and removed in about the last minute: a sender that lost its server
    -- re-sends what it never saw confirmed, and a message already delivered must not be stored
    -- twice. Keyed by message id, so new rows are appended (ids grow) and old ones are cut off
    -- as a range; a re-send names the id range to search (see `earlier`).
    -- The key a chat server shows the balancer to register: whoever can read this file is
    -- part of the cluster; a stranger on the network is not.
    CREATE TABLE cluster (
        id  INTEGER PRIMARY KEY CHECK (id = 1),
        key BLOB NOT NULL
    );
    CREATE TABLE delivered (
        msg_id    INTEGER PRIMARY KEY,
        sender    TEXT NOT NULL,
        client_id INTEGER NOT NULL
    );",
];

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Opens (creating if needed) the database file and brings its schema up to date.
pub fn open(path: &Path) -> Result<Connection> {
    let conn = connect(path)?;
    // journal_mode returns a row, so it is queried rather than executed.
    let mode: String =
        retry_busy(|| Ok(conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::Invalid(format!(
            "database {} cannot use WAL mode (got {mode})",
            path.display()
        )));
    }
    // A WAL file that grew under load is cut back to 64 MiB once it has been checkpointed.
    retry_busy(|| {
        Ok(conn.execute_batch(
            "PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON; PRAGMA temp_store=MEMORY;
             PRAGMA journal_size_limit=67108864;",
        )?)
    })?;
    retry_busy(|| migrate(&conn))?;
    Ok(conn)
}

/// Runs `f` again while the database answers "busy" in the ways SQLite's busy handler does not
/// wait for (a brand-new file switching to WAL while other processes open it too), for up to
/// [`BUSY_TIMEOUT`].
fn retry_busy<T>(mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + BUSY_TIMEOUT;
    loop {
        match f() {
            Err(Error::Db(e))
                if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// Applies every migration newer than the file's `user_version`, each in its own transaction.
/// Safe to race with other processes doing the same: the version is re-read under the lock.
pub fn migrate(conn: &Connection) -> Result<()> {
    loop {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let version: usize = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version >= MIGRATIONS.len() {
            conn.execute_batch("COMMIT")?;
            if version > MIGRATIONS.len() {
                return Err(Error::Invalid(format!(
                    "database schema version {version} is newer than this program ({}); upgrade fastchat",
                    MIGRATIONS.len()
                )));
            }
            return Ok(());
        }
        let step = conn
            .execute_batch(MIGRATIONS[version])
            .and_then(|()| conn.pragma_update(None, "user_version", version + 1));
        match step {
            Ok(()) => conn.execute_batch("COMMIT")?,
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e.into());
            }
        }
    }
}

/// A small pool of read connections, shared by the connection threads of one process.
///
/// A lock and not a channel: taking a connection is a pop from a vector, held for nanoseconds,
/// and a thread that finds the pool empty simply opens another connection.
pub struct Readers {
    path: PathBuf,
    pool: Mutex<Vec<Connection>>,
}

impl Readers {
    /// A pool over the database at `path` (which [`open`] has already migrated).
    pub fn new(path: &Path) -> Readers {
        Readers {
            path: path.to_path_buf(),
            pool: Mutex::new(Vec::new()),
        }
    }

    /// Runs `f` with a read connection.
    pub fn with<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let conn = self.pool.lock().pop();
        let conn = match conn {
            Some(c) => c,
            None => connect(&self.path)?,
        };
        let out = f(&conn);
        let mut pool = self.pool.lock();
        if pool.len() < 16 {
            pool.push(conn);
        }
        out
    }
}

/// A unit of work for the writer thread: `run` inside the batch transaction, then `complete`
/// after the commit (with the commit's error, if it failed). One allocation per job.
trait Job: Send {
    fn run(&mut self, conn: &Connection);
    fn complete(self: Box<Self>, commit_error: Option<&str>);
}

/// A job made of closures: `work` produces a result, `done` receives it.
struct ClosureJob<T, W, D> {
    work: Option<W>,
    done: D,
    result: Option<Result<T>>,
    /// Run inside a savepoint, so a failure undoes the job's own writes only.
    guarded: bool,
}

impl<T, W, D> Job for ClosureJob<T, W, D>
where
    T: Send,
    W: FnOnce(&Connection) -> Result<T> + Send,
    D: FnOnce(Result<T>) + Send,
{
    fn run(&mut self, conn: &Connection) {
        if let Some(work) = self.work.take() {
            self.result = Some(if self.guarded {
                in_savepoint(conn, work)
            } else {
                work(conn)
            });
        }
    }

    fn complete(self: Box<Self>, commit_error: Option<&str>) {
        let result = self
            .result
            .unwrap_or_else(|| Err(Error::Commit("the job never ran".into())));
        (self.done)(match (result, commit_error) {
            (Ok(_), Some(e)) => Err(Error::Commit(e.to_string())),
            (result, _) => result,
        })
    }
}

/// The process's single database writer: a thread that commits queued jobs in batches.
///
/// Jobs run in submission order inside one transaction, each in its own savepoint so that a job
/// that fails (a constraint, say) does not undo its neighbours. Completions run on the writer
/// thread after the commit, in order; they must not block (they send on channels).
pub struct Writer {
    jobs: Option<mailbox::Sender<Box<dyn Job>>>,
    thread: Option<JoinHandle<()>>,
    /// Dropped to stop the checkpoint thread.
    stop_checkpoints: Option<Sender<()>>,
    checkpointer: Option<JoinHandle<()>>,
}

impl Writer {
    /// Opens its own connection to `path` and starts the writer thread.
    ///
    /// Checkpoints (copying the WAL into the database file, with an fsync) run on a thread of
    /// their own, not inside a commit: a commit that crossed the automatic checkpoint threshold
    /// would otherwise hold back every reply of its batch for the length of an fsync.
    pub fn start(path: &Path) -> Result<Writer> {
        let conn = open(path)?;
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        let (tx, rx) = mailbox::bounded::<Box<dyn Job>>(8192);
        let thread = std::thread::Builder::new()
            .name("db-writer".into())
            .spawn(move || writer_loop(conn, rx))?;
        let checkpoints = connect(path)?;
        let (stop, stopped) = bounded::<()>(0);
        let checkpointer = std::thread::Builder::new()
            .name("db-checkpoint".into())
            .spawn(move || checkpoint_loop(&checkpoints, &stopped))?;
        Ok(Writer {
            jobs: Some(tx),
            thread: Some(thread),
            stop_checkpoints: Some(stop),
            checkpointer: Some(checkpointer),
        })
    }

    /// Queues `work`; `done` gets its result once the batch is committed. Blocks only while the
    /// writer's queue is full (backpressure). A failing `work` undoes its own writes.
    pub fn submit<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
        done: impl FnOnce(Result<T>) + Send + 'static,
    ) {
        self.queue(work, done, true);
    }

    /// Like [`Writer::submit`], without a savepoint: for work whose writes are one statement
    /// (atomic by itself) or whose partial effect is harmless if it fails half-way (removing
    /// acknowledged messages). Saves a statement journal on the hot path.
    pub fn submit_unguarded<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
        done: impl FnOnce(Result<T>) + Send + 'static,
    ) {
        self.queue(work, done, false);
    }

    fn queue<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
        done: impl FnOnce(Result<T>) + Send + 'static,
        guarded: bool,
    ) {
        let job = Box::new(ClosureJob {
            work: Some(work),
            done,
            result: None,
            guarded,
        });
        // The thread only ends when `jobs` is dropped, so a failed send means it panicked; the
        // dropped completion then closes its caller's reply channel, which reports the failure.
        if let Some(jobs) = &self.jobs {
            if jobs.send(job).is_err() {
                log::error!("database writer thread has died; write dropped");
            }
        }
    }

    /// Runs `work` and waits for its commit.
    pub fn call<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = bounded(1);
        self.submit(work, move |res| {
            let _ = tx.send(res);
        });
        rx.recv()
            .unwrap_or_else(|_| Err(Error::Commit("the database writer has stopped".into())))
    }
}

impl Drop for Writer {
    /// Commits everything queued, then stops the threads.
    fn drop(&mut self) {
        self.stop_checkpoints.take();
        if let Some(t) = self.checkpointer.take() {
            let _ = t.join();
        }
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            // A completion may hold the last reference to the owner of this writer; then the
            // drop runs on the writer thread itself, which ends on its own once the queue closes.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

fn in_savepoint<T>(conn: &Connection, work: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
    // Prepared once and reused: these run for every job.
    conn.prepare_cached("SAVEPOINT job")?.execute([])?;
    match work(conn) {
        Ok(v) => {
            conn.prepare_cached("RELEASE job")?.execute([])?;
            Ok(v)
        }
        Err(e) => {
            conn.prepare_cached("ROLLBACK TO job")?.execute([])?;
            conn.prepare_cached("RELEASE job")?.execute([])?;
            Err(e)
        }
    }
}

fn writer_loop(conn: Connection, jobs: mailbox::Receiver<Box<dyn Job>>) {
    let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(MAX_BATCH);
    let mut last_purge = Instant::now();
    // The newest message id at the previous two purges: the older one is at least
    // 2 x PURGE_EVERY old.
    let mut watermarks = (0i64, 0i64);
    while let Ok(first) = jobs.recv() {
        let window = Instant::now() + COMMIT_WINDOW;
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) if batch.len() >= WINDOW_SKIP => break,
                Err(_) => match jobs.recv_deadline(window) {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                },
            }
        }
        let begun = begin_immediate(&conn);
        if let Err(e) = &begun {
            log::error!("database: cannot begin a transaction: {e}");
        }
        for job in batch.iter_mut() {
            job.run(&conn);
        }
        if last_purge.elapsed() > PURGE_EVERY {
            last_purge = Instant::now();
            // Forget what was delivered before the previous mark (a minute or more ago).
            let upto = watermarks.0;
            let purged = in_savepoint(&conn, |c| {
                forget_deliveries(c, upto)?;
                newest_message_id(c)
            });
            match purged {
                Ok(newest) => watermarks = (watermarks.1, newest),
                Err(e) => log::warn!("database: cannot forget old deliveries: {e}"),
            }
        }
        let outcome = begun.and_then(|()| {
            conn.prepare_cached("COMMIT")?.execute([])?;
            Ok(())
        });
        let message = match &outcome {
            Ok(()) => None,
            Err(e) => {
                log::error!("database: commit of {} jobs failed: {e}", batch.len());
                let _ = conn.execute_batch("ROLLBACK");
                Some(e.to_string())
            }
        };
        for job in batch.drain(..) {
            job.complete(message.as_deref());
        }
    }
}

/// How often the checkpoint thread copies the WAL into the database file. Often, so each
/// checkpoint is small: its fsyncs hold up the disk for others, and at 10,000 messages/s a
/// checkpoint every second (a megabyte or more) put 10-25 ms stalls into the latency tail
/// where one every 50 ms keeps p99 near 3 ms (BENCHMARKS.md).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(50);

/// Passive checkpoints (never waiting for, or blocking, readers and writers) until stopped.
/// Every process with a writer runs one; whichever gets there first does the work.
fn checkpoint_loop(conn: &Connection, stop: &Receiver<()>) {
    while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
        stop.recv_timeout(CHECKPOINT_EVERY)
    {
        let done = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        });
        match done {
            Ok((0, wal, copied)) if wal > 0 => log::trace!("checkpoint: {copied} of {wal} pages"),
            Ok(_) => {}
            Err(e) => log::debug!("checkpoint skipped: {e}"),
        }
    }
}

/// `BEGIN IMMEDIATE`, retried while other processes hold the write lock past the busy timeout.
fn begin_immediate(conn: &Connection) -> Result<()> {
    let mut tries = 0;
    loop {
        match conn.prepare_cached("BEGIN IMMEDIATE")?.execute([]) {
            Ok(_) => return Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy && tries < 5 =>
            {
                tries += 1;
                log::warn!("database busy, retrying BEGIN ({tries})");
            }
            Err(e) => return Err(e.into()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Accounts and sessions (balancer).

/// Inserts a new user. `Ok(false)` if the name is taken.
pub fn create_user(
    conn: &Connection,
    name: &str,
    password_hash: &str,
    keys: &PublicKeys,
) -> Result<bool> {
    let n = conn.execute(
        "INSERT INTO users (name, password_hash, x25519, ed25519, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (name) DO NOTHING",
        params![name, password_hash, keys.x25519, keys.ed25519, now_ms()],
    )?;
    Ok(n == 1)
}

/// The stored password hash of a user, if the user exists.
pub fn password_hash(conn: &Connection, name: &str) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT password_hash FROM users WHERE name = ?1")?
        .query_row(params![name], |r| r.get(0))
        .optional()?)
}

/// Whether a user exists.
pub fn user_exists(conn: &Connection, name: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM users WHERE name = ?1")?
        .query_row(params![name], |_| Ok(()))
        .optional()?
        .is_some())
}

/// A user's public keys.
pub fn user_keys(conn: &Connection, name: &str) -> Result<Option<PublicKeys>> {
    Ok(conn
        .prepare_cached("SELECT x25519, ed25519 FROM users WHERE name = ?1")?
        .query_row(params![name], |r| {
            Ok(PublicKeys {
                x25519: r.get(0)?,
                ed25519: r.get(1)?,
            })
        })
        .optional()?)
}

/// Stores a session (by the token's hash) and drops expired ones.
pub fn create_session(
    conn: &Connection,
    token_hash: &[u8],
    user: &str,
    expires_at: i64,
) -> Result<()> {
    conn.prepare_cached("DELETE FROM sessions WHERE expires_at < ?1")?
        .execute(params![now_ms()])?;
    conn.prepare_cached("INSERT INTO sessions (token_hash, user, expires_at) VALUES (?1, ?2, ?3)")?
        .execute(params![token_hash, user, expires_at])?;
    Ok(())
}

/// Ends a session (logout); unknown tokens are ignored.
pub fn end_session(conn: &Connection, token_hash: &[u8]) -> Result<()> {
    conn.prepare_cached("DELETE FROM sessions WHERE token_hash = ?1")?
        .execute(params![token_hash])?;
    Ok(())
}

/// The user a token belongs to, if the session exists and has not expired.
pub fn session_user(conn: &Connection, token_hash: &[u8]) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT user FROM sessions WHERE token_hash = ?1 AND expires_at > ?2")?
        .query_row(params![token_hash, now_ms()], |r| r.get(0))
        .optional()?)
}

// ---------------------------------------------------------------------------------------------
// Servers and presence.

/// The cluster key, made (32 random bytes) by the first process that asks.
pub fn cluster_key(conn: &Connection) -> Result<Vec<u8>> {
    retry_busy(|| {
        conn.execute(
            "INSERT OR IGNORE INTO cluster (id, key) VALUES (1, randomblob(32))",
            [],
        )?;
        Ok(conn.query_row("SELECT key FROM cluster WHERE id = 1", [], |r| r.get(0))?)
    })
}

/// Registers a server (or re-registers a known id whose secret matches). Returns its id, or
/// `None` when the id is unknown or the secret does not match.
pub fn register_server(
    conn: &Connection,
    addr: &str,
    server_id: Option<u64>,
    secret_hash: &[u8],
) -> Result<Option<u64>> {
    if let Some(id) = server_id {
        let n = conn.execute(
            "UPDATE servers SET addr = ?1 WHERE id = ?2 AND secret_hash = ?3",
            params![addr, id as i64, secret_hash],
        )?;
        return Ok((n == 1).then_some(id));
    }
    conn.execute(
        "INSERT INTO servers (addr, secret_hash, registered_at) VALUES (?1, ?2, ?3)",
        params![addr, secret_hash, now_ms()],
    )?;
    Ok(Some(conn.last_insert_rowid() as u64))
}

/// Forgets a server that has died: its row, its presence rows and its unfinished uploads.
pub fn forget_server(conn: &Connection, server_id: u64) -> Result<()> {
    conn.execute(
        "DELETE FROM presence WHERE server_id = ?1",
        params![server_id as i64],
    )?;
    drop_uploads(conn, server_id, None)?;
    conn.execute(
        "DELETE FROM servers WHERE id = ?1",
        params![server_id as i64],
    )?;
    Ok(())
}

/// The stored hash of a server's secret.
pub fn server_secret_hash(conn: &Connection, server_id: u64) -> Result<Option<Vec<u8>>> {
    Ok(conn
        .prepare_cached("SELECT secret_hash FROM servers WHERE id = ?1")?
        .query_row(params![server_id as i64], |r| r.get(0))
        .optional()?)
}

/// The address a server registered with, if it is still registered.
pub fn server_addr(conn: &Connection, server_id: u64) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT addr FROM servers WHERE id = ?1")?
        .query_row(params![server_id as i64], |r| r.get(0))
        .optional()?)
}

/// Records that `user` is connected to `server_id` on connection `conn_id`.
pub fn add_presence(conn: &Connection, server_id: u64, conn_id: u64, user: &str) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO presence (server_id, conn_id, user) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![server_id as i64, conn_id as i64, user])?;
    Ok(())
}

/// Users connected to any server now, by name (at most `limit`).
pub fn online_users(conn: &Connection, limit: usize) -> Result<Vec<String>> {
    Ok(conn
        .prepare_cached("SELECT DISTINCT user FROM presence ORDER BY user LIMIT ?1")?
        .query_map(params![limit as i64], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?)
}

/// Removes one connection's presence row.
pub fn remove_presence(conn: &Connection, server_id: u64, conn_id: u64) -> Result<()> {
    conn.prepare_cached("DELETE FROM presence WHERE server_id = ?1 AND conn_id = ?2")?
        .execute(params![server_id as i64, conn_id as i64])?;
    Ok(())
}

/// Removes every presence row of a server (at its start, after a crash of an earlier run).
pub fn clear_presence(conn: &Connection, server_id: u64) -> Result<()> {
    conn.prepare_cached("DELETE FROM presence WHERE server_id = ?1")?
        .execute(params![server_id as i64])?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The message queue.

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

/// The columns [`envelope_row`] reads, from `messages m`.
const ENVELOPE_COLUMNS: &str =
    "m.id, m.sender, coalesce(m.recipient, ''), m.grp, m.client_id, m.body, m.sent_at";

fn envelope_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Envelope> {
    Ok(Envelope {
        id: r.get(0)?,
        from: r.get(1)?,
        to: r.get(2)?,
        group: r.get(3)?,
        client_id: r.get::<_, i64>(4)? as u64,
        body: r.get(5)?,
        sent_at: r.get(6)?,
    })
}

/// What a re-send of `client_id` by `from` refers to: the stored message, or one already
/// delivered and removed (its id, with the request's own fields: it is not routed again).
/// `after` bounds the search of delivered messages: the original, if stored at all, has an id
/// above it.
fn earlier(
    conn: &Connection,
    from: &str,
    to: &str,
    group: Option<&str>,
    client_id: u64,
    body: &[u8],
    after: i64,
) -> Result<Option<Envelope>> {
    if let Some(copy) = stored_copy(conn, from, client_id)? {
        return Ok(Some(copy));
    }
    let delivered: Option<i64> = conn
        .prepare_cached(
            "SELECT msg_id FROM delivered WHERE msg_id > ?3 AND sender = ?1 AND client_id = ?2",
        )?
        .query_row(params![from, client_id as i64, after], |r| r.get(0))
        .optional()?;
    Ok(delivered.map(|id| Envelope {
        id,
        from: from.to_string(),
        to: to.to_string(),
        group: group.map(str::to_string),
        client_id,
        body: body.to_vec(),
        sent_at: now_ms(),
    }))
}

/// Remembers that a message was delivered and removed (see the `delivered` table).
fn remember_delivered(conn: &Connection, msg_id: i64, sender: &str, client_id: i64) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR IGNORE INTO delivered (msg_id, sender, client_id) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![msg_id, sender, client_id])?;
    Ok(())
}

/// The newest message id ever assigned.
pub fn newest_message_id(conn: &Connection) -> Result<i64> {
    Ok(conn
        .prepare_cached(
            "SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = 'messages'",
        )?
        .query_row([], |r| r.get(0))?)
}

/// Forgets the deliveries of messages with ids up to `upto`.
pub fn forget_deliveries(conn: &Connection, upto: i64) -> Result<usize> {
    Ok(conn
        .prepare_cached("DELETE FROM delivered WHERE msg_id <= ?1")?
        .execute(params![upto])?)
}

/// The message `from` already stored under `client_id`, if any (a re-send).
fn stored_copy(conn: &Connection, from: &str, client_id: u64) -> Result<Option<Envelope>> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {ENVELOPE_COLUMNS} FROM messages m WHERE m.sender = ?1 AND m.client_id = ?2"
        ))?
        .query_row(params![from, client_id as i64], envelope_row)
        .optional()?)
}

/// Stores a direct message, idempotently per `(sender, client_id)`: a re-send returns the first
/// copy, even one already delivered (`resend_after`: see [`earlier`]; `None` for a first
/// attempt, which needs no look-up). `file` is a finished upload of the sender's that the
/// message offers. An unknown recipient is refused (the foreign key says so).
pub fn store_message(conn: &Connection, msg: &Outgoing<'_>, to: &str) -> Result<StoredMessage> {
    let Outgoing {
        from,
        client_id,
        body,
        file,
        resend_after,
    } = *msg;
    let insert = |conn: &Connection, now: i64| -> Result<usize> {
        conn.prepare_cached(
            "INSERT INTO messages (sender, recipient, client_id, body, sent_at, file_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (sender, client_id) DO NOTHING",
        )?
        .execute(params![from, to, client_id as i64, body, now, file])
        .map_err(|e| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::ConstraintViolation) => {
                refuse(ErrorCode::UnknownUser, format!("no such user: {to}"))
            }
            _ => e.into(),
        })
    };
    let now = now_ms();
    let envelope = match (file, resend_after) {
        // The common case: one statement (a conflict means a duplicate on the wire).
        (None, None) => match insert(conn, now)? {
            0 => stored_copy(conn, from, client_id)?
                .ok_or_else(|| Error::Commit("a re-sent message vanished".into()))?,
            _ => new_envelope(conn, from, to, None, client_id, body, now),
        },
        // A re-send, or an offer that must not finish (and so orphan) a second upload.
        (file, after) => {
            match earlier(conn, from, to, None, client_id, body, after.unwrap_or(0))? {
                Some(first) => first,
                None => {
                    if let Some(upload) = file {
                        finish_upload(conn, from, upload)?;
                    }
                    insert(conn, now)?;
                    new_envelope(conn, from, to, None, client_id, body, now)
                }
            }
        }
    };
    let online_at = conn
        .prepare_cached(
            "SELECT DISTINCT server_id, user FROM presence WHERE user = ?1 ORDER BY server_id",
        )?
        .query_map(params![envelope.to], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get(1)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(StoredMessage {
        envelope,
        online_at,
    })
}

/// The envelope of the row just inserted.
fn new_envelope(
    conn: &Connection,
    from: &str,
    to: &str,
    group: Option<&str>,
    client_id: u64,
    body: &[u8],
    sent_at: i64,
) -> Envelope {
    Envelope {
        id: conn.last_insert_rowid(),
        from: from.to_string(),
        to: to.to_string(),
        group: group.map(str::to_string),
        client_id,
        body: body.to_vec(),
        sent_at,
    }
}

/// Up to `limit` queued messages for `user` with ids above `after`, oldest first: direct
/// messages to them, and group messages of their groups past their position that they have not
/// acknowledged out of order.
pub fn queued(conn: &Connection, user: &str, after: i64, limit: usize) -> Result<Vec<Envelope>> {
    let rows = conn
        .prepare_cached(&format!(
            "SELECT {ENVELOPE_COLUMNS} FROM messages m WHERE m.recipient = ?1 AND m.id > ?2
             UNION ALL
             SELECT {ENVELOPE_COLUMNS} FROM messages m
               JOIN members mb ON mb.grp = m.grp AND mb.user = ?1
              WHERE m.id > ?2 AND m.id > mb.position AND m.sender <> ?1
                AND NOT EXISTS (SELECT 1 FROM group_acks a
                                 WHERE a.grp = m.grp AND a.user = ?1 AND a.msg_id = m.id)
             ORDER BY id LIMIT ?3"
        ))?
        .query_map(params![user, after, limit as i64], envelope_row)?
        .collect::<rusqlite::Result<Vec<Envelope>>>()?;
    Ok(rows)
}

/// Acknowledges messages for `user`. A direct message is removed. A group message moves the
/// user's position in that group: a position means "everything up to here is acknowledged", so
/// an id acknowledged ahead of an older unacknowledged one waits in `group_acks` until the gap
/// closes (acknowledgements may arrive out of order when messages come through several
/// servers). Group messages every recipient has passed are removed. Ids that are not the user's
/// to acknowledge are ignored; returns how many were.
pub fn ack(conn: &Connection, user: &str, ids: &[i64]) -> Result<usize> {
    let mut n = 0;
    let mut touched: Vec<String> = Vec::new();
    // Prepared once per batch of ids: this runs for every message delivered.
    let mut remember = conn.prepare_cached(
        "INSERT INTO delivered (msg_id, sender, client_id)
         SELECT id, sender, client_id FROM messages WHERE id = ?1 AND recipient = ?2",
    )?;
    let mut remove = conn.prepare_cached("DELETE FROM messages WHERE id = ?1 RETURNING file_id")?;
    for id in ids {
        // A direct message to this user: remembered as delivered, then removed (with the
        // file it offers).
        if remember.execute(params![id, user])? == 1 {
            let file: Option<i64> = remove.query_row(params![id], |r| r.get(0))?;
            if let Some(file) = file {
                drop_file(conn, file)?;
            }
            n += 1;
            continue;
        }
        let pending: Option<String> = conn
            .prepare_cached(
                "INSERT OR IGNORE INTO group_acks (grp, user, msg_id)
                 SELECT m.grp, mb.user, m.id FROM messages m
                   JOIN members mb ON mb.grp = m.grp AND mb.user = ?2
                  WHERE m.id = ?1 AND m.sender <> ?2 AND m.id > mb.position
                 RETURNING grp",
            )?
            .query_row(params![id, user], |r| r.get(0))
            .optional()?;
        if let Some(g) = pending {
            n += 1;
            if !touched.contains(&g) {
                touched.push(g);
            }
        }
    }
    for g in touched {
        advance_position(conn, &g, user)?;
    }
    Ok(n)
}

/// Moves `user`'s position in `group` over every acknowledged message that directly follows
/// it, then removes the group messages that no recipient still needs.
fn advance_position(conn: &Connection, group: &str, user: &str) -> Result<()> {
    let start: i64 = conn
        .prepare_cached("SELECT position FROM members WHERE grp = ?1 AND user = ?2")?
        .query_row(params![group, user], |r| r.get(0))?;
    let mut position = start;
    loop {
        // The next message this user should receive in the group, if any.
        let next: Option<i64> = conn
            .prepare_cached(
                "SELECT min(id) FROM messages WHERE grp = ?1 AND id > ?2 AND sender <> ?3",
            )?
            .query_row(params![group, position, user], |r| r.get(0))?;
        let Some(next) = next else { break };
        let acked = conn
            .prepare_cached("DELETE FROM group_acks WHERE grp = ?1 AND user = ?2 AND msg_id = ?3")?
            .execute(params![group, user, next])?;
        if acked == 0 {
            break;
        }
        position = next;
    }
    if position != start {
        conn.prepare_cached("UPDATE members SET position = ?3 WHERE grp = ?1 AND user = ?2")?
            .execute(params![group, user, position])?;
        collect_group_garbage(conn, group, start, position)?;
    }
    Ok(())
}

/// Removes the group messages with ids in `(after, upto]` that every current member other than
/// their sender has passed.
fn collect_group_garbage(conn: &Connection, group: &str, after: i64, upto: i64) -> Result<()> {
    let done = conn
        .prepare_cached(
            "SELECT id, sender, client_id, file_id FROM messages
              WHERE grp = ?1 AND id > ?2 AND id <= ?3
                AND NOT EXISTS (SELECT 1 FROM members mb
                                 WHERE mb.grp = messages.grp AND mb.user <> messages.sender
                                   AND mb.position < messages.id)",
        )?
        .query_map(params![group, after, upto], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get(2)?,
                r.get(3)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    for (id, sender, client_id, file) in done {
        remove_message(conn, id, &sender, client_id, file)?;
    }
    Ok(())
}

/// Deletes an offered file (once its message is gone; its chunks go with it).
fn drop_file(conn: &Connection, file: i64) -> Result<()> {
    conn.prepare_cached("DELETE FROM files WHERE id = ?1")?
        .execute(params![file])?;
    Ok(())
}

/// Removes a delivered message, and the file it offers; remembers it as delivered.
fn remove_message(
    conn: &Connection,
    id: i64,
    sender: &str,
    client_id: i64,
    file: Option<i64>,
) -> Result<()> {
    conn.prepare_cached("DELETE FROM messages WHERE id = ?1")?
        .execute(params![id])?;
    if let Some(file) = file {
        drop_file(conn, file)?;
    }
    remember_delivered(conn, id, sender, client_id)
}

/// After a member leaves or is removed: the messages only they still needed are removed.
fn collect_all_group_garbage(conn: &Connection, group: &str) -> Result<()> {
    collect_group_garbage(conn, group, 0, i64::MAX)
}

// ---------------------------------------------------------------------------------------------
// Groups. Every function checks the caller's rights itself and refuses with a reason.

fn refuse(code: ErrorCode, message: impl Into<String>) -> Error {
    Error::refused(code, message)
}

/// The group's admin and epoch, if the group exists.
fn group_row(conn: &Connection, group: &str) -> Result<Option<(String, u64)>> {
    Ok(conn
        .prepare_cached("SELECT admin, epoch FROM groups WHERE name = ?1")?
        .query_row(params![group], |r| {
            Ok((r.get(0)?, r.get::<_, i64>(1)? as u64))
        })
        .optional()?)
}

/// Members in join order.
fn member_names(conn: &Connection, group: &str) -> Result<Vec<String>> {
    Ok(conn
        .prepare_cached("SELECT user FROM members WHERE grp = ?1 ORDER BY seq")?
        .query_map(params![group], |r| r.get(0))?
        .collect::<rusqlite::Result<Vec<String>>>()?)
}

/// The group, if it exists and `user` is a member; otherwise the same refusal either way, so
/// non-members learn nothing about which groups exist.
fn member_view(conn: &Connection, group: &str, user: &str) -> Result<(String, u64, Vec<String>)> {
    let not_member = || {
        refuse(
            ErrorCode::UnknownGroup,
            format!("no group {group} with you as a member"),
        )
    };
    let (admin, epoch) = group_row(conn, group)?.ok_or_else(not_member)?;
    let members = member_names(conn, group)?;
    if !members.iter().any(|m| m == user) {
        return Err(not_member());
    }
    Ok((admin, epoch, members))
}

fn insert_key(
    conn: &Connection,
    group: &str,
    epoch: u64,
    member: &str,
    wrapped: &[u8],
    by: &str,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO group_keys (grp, epoch, member, wrapped, wrapped_by)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![group, epoch as i64, member, wrapped, by])?;
    Ok(())
}

fn add_member_row(conn: &Connection, group: &str, user: &str) -> Result<()> {
    let position = newest_message_id(conn)?;
    conn.prepare_cached(
        "INSERT INTO members (grp, user, seq, position)
         VALUES (?1, ?2, (SELECT coalesce(max(seq), 0) + 1 FROM members WHERE grp = ?1), ?3)",
    )?
    .execute(params![group, user, position])?;
    Ok(())
}

/// Creates a group with `admin` as its only member and epoch 1 keyed by `key`.
pub fn create_group(conn: &Connection, group: &str, admin: &str, key: &[u8]) -> Result<()> {
    let created = conn
        .prepare_cached(
            "INSERT INTO groups (name, admin, epoch, created_at) VALUES (?1, ?2, 1, ?3)
             ON CONFLICT (name) DO NOTHING",
        )?
        .execute(params![group, admin, now_ms()])?;
    if created == 0 {
        return Err(refuse(
            ErrorCode::NameTaken,
            format!("a group named {group} already exists"),
        ));
    }
    add_member_row(conn, group, admin)?;
    insert_key(conn, group, 1, admin, key, admin)
}

/// Checks that `keys` name exactly `members`, once each.
fn check_keys_cover(keys: &[WrappedKey], members: &[String]) -> Result<()> {
    let mut named: Vec<&str> = keys.iter().map(|k| k.member.as_str()).collect();
    named.sort_unstable();
    let mut expected: Vec<&str> = members.iter().map(String::as_str).collect();
    expected.sort_unstable();
    if named != expected {
        return Err(refuse(
            ErrorCode::Conflict,
            "the new keys do not match the members; fetch the group and try again",
        ));
    }
    Ok(())
}

/// The group's epoch and members, if `by` is its admin; otherwise a refusal saying who may
/// `what`.
fn admin_view(conn: &Connection, group: &str, by: &str, what: &str) -> Result<(u64, Vec<String>)> {
    let (admin, current, members) = member_view(conn, group, by)?;
    if admin != by {
        return Err(refuse(
            ErrorCode::NotAllowed,
            format!("only the admin of {group} ({admin}) can {what}"),
        ));
    }
    Ok((current, members))
}

/// The admin adds `user`, giving them the current key.
pub fn add_member(
    conn: &Connection,
    group: &str,
    by: &str,
    user: &str,
    epoch: u64,
    key: &[u8],
) -> Result<()> {
    let (current, members) = admin_view(conn, group, by, "add members")?;
    if !user_exists(conn, user)? {
        return Err(refuse(
            ErrorCode::UnknownUser,
            format!("no such user: {user}"),
        ));
    }
    if members.iter().any(|m| m == user) {
        return Err(refuse(
            ErrorCode::BadRequest,
            format!("{user} is already a member of {group}"),
        ));
    }
    if epoch != current {
        return Err(refuse(
            ErrorCode::Conflict,
            format!("{group} has moved to key epoch {current}; try again"),
        ));
    }
    add_member_row(conn, group, user)?;
    insert_key(conn, group, epoch, user, key, by)
}

/// The admin removes `user` and starts `epoch` with `keys` for the remaining members.
pub fn remove_member(
    conn: &Connection,
    group: &str,
    by: &str,
    user: &str,
    epoch: u64,
    keys: &[WrappedKey],
) -> Result<()> {
    let (current, members) = admin_view(conn, group, by, "remove members")?;
    if user == by {
        return Err(refuse(
            ErrorCode::BadRequest,
            format!("to leave {group}, use group leave"),
        ));
    }
    if !members.iter().any(|m| m == user) {
        return Err(refuse(
            ErrorCode::BadRequest,
            format!("{user} is not a member of {group}"),
        ));
    }
    if epoch != current + 1 {
        return Err(refuse(
            ErrorCode::Conflict,
            format!("{group} is at key epoch {current}; try again"),
        ));
    }
    let remaining: Vec<String> = members.into_iter().filter(|m| m != user).collect();
    check_keys_cover(keys, &remaining)?;
    conn.prepare_cached("DELETE FROM members WHERE grp = ?1 AND user = ?2")?
        .execute(params![group, user])?;
    conn.prepare_cached("UPDATE groups SET epoch = ?2 WHERE name = ?1")?
        .execute(params![group, epoch as i64])?;
    for k in keys {
        insert_key(conn, group, epoch, &k.member, &k.wrapped, by)?;
    }
    collect_all_group_garbage(conn, group)
}

/// What happened when someone left.
#[derive(Debug, PartialEq, Eq)]
pub enum Left {
    /// The group still exists; a new epoch awaits its key.
    Stayed {
        /// The admin now (changed if the admin left).
        admin: String,
    },
    /// The last member left; the group is gone.
    Deleted,
}

/// `user` leaves `group`. The longest-standing member becomes admin if the admin left; the
/// group is deleted when empty; otherwise a new epoch starts, without keys yet.
pub fn leave_group(conn: &Connection, group: &str, user: &str) -> Result<Left> {
    let (admin, epoch, members) = member_view(conn, group, user)?;
    conn.prepare_cached("DELETE FROM members WHERE grp = ?1 AND user = ?2")?
        .execute(params![group, user])?;
    let Some(oldest) = members.into_iter().find(|m| m != user) else {
        // Its messages go with it, and so do the files they offer.
        let files: Vec<i64> = conn
            .prepare_cached(
                "DELETE FROM messages WHERE grp = ?1 AND file_id IS NOT NULL RETURNING file_id",
            )?
            .query_map(params![group], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        for file in files {
            drop_file(conn, file)?;
        }
        conn.prepare_cached("DELETE FROM groups WHERE name = ?1")?
            .execute(params![group])?;
        return Ok(Left::Deleted);
    };
    let admin = if admin == user { oldest } else { admin };
    conn.prepare_cached("UPDATE groups SET admin = ?2, epoch = ?3 WHERE name = ?1")?
        .execute(params![group, admin, epoch as i64 + 1])?;
    collect_all_group_garbage(conn, group)?;
    Ok(Left::Stayed { admin })
}

/// A member provides the keys of the current epoch, if it has none yet.
pub fn rekey_group(
    conn: &Connection,
    group: &str,
    by: &str,
    epoch: u64,
    keys: &[WrappedKey],
) -> Result<()> {
    let (_, current, members) = member_view(conn, group, by)?;
    if epoch != current || epoch_keyed(conn, group, epoch)? {
        return Err(refuse(
            ErrorCode::Conflict,
            format!("{group} already has keys for its current epoch"),
        ));
    }
    check_keys_cover(keys, &members)?;
    for k in keys {
        insert_key(conn, group, epoch, &k.member, &k.wrapped, by)?;
    }
    Ok(())
}

fn epoch_keyed(conn: &Connection, group: &str, epoch: u64) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM group_keys WHERE grp = ?1 AND epoch = ?2 LIMIT 1")?
        .query_row(params![group, epoch as i64], |_| Ok(()))
        .optional()?
        .is_some())
}

/// A group as `user` (a member) sees it.
pub fn group_info(conn: &Connection, group: &str, user: &str) -> Result<GroupInfo> {
    let (admin, epoch, members) = member_view(conn, group, user)?;
    Ok(GroupInfo {
        name: group.to_string(),
        admin,
        members,
        keyed: epoch_keyed(conn, group, epoch)?,
        epoch,
    })
}

/// The groups `user` belongs to, by name.
pub fn user_groups(conn: &Connection, user: &str) -> Result<Vec<GroupInfo>> {
    let names: Vec<String> = conn
        .prepare_cached("SELECT grp FROM members WHERE user = ?1 ORDER BY grp")?
        .query_map(params![user], |r| r.get(0))?
        .collect::<rusqlite::Result<Vec<String>>>()?;
    names.iter().map(|g| group_info(conn, g, user)).collect()
}

/// `user`'s wrapped key for `epoch` and who wrapped it (current members only).
pub fn group_key(
    conn: &Connection,
    group: &str,
    user: &str,
    epoch: u64,
) -> Result<(Vec<u8>, String)> {
    member_view(conn, group, user)?;
    conn.prepare_cached(
        "SELECT wrapped, wrapped_by FROM group_keys WHERE grp = ?1 AND epoch = ?2 AND member = ?3",
    )?
    .query_row(params![group, epoch as i64, user], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
    .optional()?
    .ok_or_else(|| {
        refuse(
            ErrorCode::NotAllowed,
            format!("no key of {group} epoch {epoch} for you"),
        )
    })
}

/// Stores a group message once, if `from` is a member and `epoch` is current and keyed.
pub fn store_group_message(
    conn: &Connection,
    msg: &Outgoing<'_>,
    group: &str,
    epoch: u64,
) -> Result<StoredMessage> {
    let Outgoing {
        from,
        client_id,
        body,
        file,
        resend_after,
    } = *msg;
    let (_, current, _) = member_view(conn, group, from)?;
    let after = resend_after.unwrap_or(i64::MAX);
    let envelope = match earlier(conn, from, "", Some(group), client_id, body, after)? {
        Some(first) => first,
        None => {
            if epoch != current || !epoch_keyed(conn, group, epoch)? {
                return Err(refuse(
                    ErrorCode::Conflict,
                    format!("{group} has a new key epoch; fetch it and send again"),
                ));
            }
            if let Some(upload) = file {
                finish_upload(conn, from, upload)?;
            }
            let now = now_ms();
            conn.prepare_cached(
                "INSERT INTO messages (sender, grp, client_id, body, sent_at, file_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![from, group, client_id as i64, body, now, file])?;
            let envelope = new_envelope(conn, from, "", Some(group), client_id, body, now);
            // A sender alone in the group: nobody will ever acknowledge it.
            collect_group_garbage(conn, group, envelope.id - 1, envelope.id)?;
            envelope
        }
    };
    let online_at = conn
        .prepare_cached(
            "SELECT DISTINCT p.server_id, p.user FROM presence p
               JOIN members mb ON mb.user = p.user
              WHERE mb.grp = ?1 AND p.user <> ?2 ORDER BY p.server_id",
        )?
        .query_map(params![group, from], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get(1)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(StoredMessage {
        envelope,
        online_at,
    })
}

// ---------------------------------------------------------------------------------------------
// Files: encrypted chunks uploaded first, then offered by a message. A file is deleted with the
// message that offers it (`ack`, `remove_message`, `leave_group`); an upload never offered is
// deleted when its connection ends.

/// Starts an upload of `chunks` chunks for `owner` on connection `conn_id` of `server_id`,
/// unless that connection already has `limit` unfinished uploads.
pub fn begin_upload(
    conn: &Connection,
    owner: &str,
    server_id: u64,
    conn_id: u64,
    size: u64,
    chunks: u64,
    limit: usize,
) -> Result<i64> {
    let open: i64 = conn
        .prepare_cached(
            "SELECT count(*) FROM files WHERE server_id = ?1 AND conn_id = ?2 AND complete = 0",
        )?
        .query_row(params![server_id as i64, conn_id as i64], |r| r.get(0))?;
    if open as usize >= limit {
        return Err(refuse(
            ErrorCode::BadRequest,
            format!("at most {limit} unfinished uploads per connection"),
        ));
    }
    conn.prepare_cached(
        "INSERT INTO files (owner, server_id, conn_id, size, chunks, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        owner,
        server_id as i64,
        conn_id as i64,
        size as i64,
        chunks as i64,
        now_ms()
    ])?;
    Ok(conn.last_insert_rowid())
}

/// An unfinished upload of `owner`'s: its chunk count.
fn open_upload(conn: &Connection, owner: &str, upload: i64) -> Result<u64> {
    conn.prepare_cached("SELECT chunks FROM files WHERE id = ?1 AND owner = ?2 AND complete = 0")?
        .query_row(params![upload, owner], |r| r.get::<_, i64>(0))
        .optional()?
        .map(|n| n as u64)
        .ok_or_else(|| {
            refuse(
                ErrorCode::BadRequest,
                format!("no unfinished upload {upload} of yours"),
            )
        })
}

/// Stores chunk `index` of an upload of `owner`'s.
pub fn store_chunk(
    conn: &Connection,
    owner: &str,
    upload: i64,
    index: u64,
    data: &[u8],
) -> Result<()> {
    let chunks = open_upload(conn, owner, upload)?;
    if index >= chunks {
        return Err(refuse(
            ErrorCode::BadRequest,
            format!("chunk {index} is past the end of upload {upload} ({chunks} chunks)"),
        ));
    }
    // A chunk sent again (after a lost reply) replaces the first copy: both are valid.
    conn.prepare_cached(
        "INSERT OR REPLACE INTO file_chunks (file_id, idx, data) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![upload, index as i64, data])?;
    Ok(())
}

/// Marks an upload complete, if every chunk is there.
fn finish_upload(conn: &Connection, owner: &str, upload: i64) -> Result<()> {
    let chunks = open_upload(conn, owner, upload)?;
    let have: i64 = conn
        .prepare_cached("SELECT count(*) FROM file_chunks WHERE file_id = ?1")?
        .query_row(params![upload], |r| r.get(0))?;
    if have as u64 != chunks {
        return Err(refuse(
            ErrorCode::BadRequest,
            format!("upload {upload} has {have} of its {chunks} chunks"),
        ));
    }
    conn.prepare_cached("UPDATE files SET complete = 1 WHERE id = ?1")?
        .execute(params![upload])?;
    Ok(())
}

/// Chunk `index` of the file offered by message `msg_id`, if that message is queued for `user`
/// (a direct message to them, or a group message they have not yet acknowledged).
pub fn file_chunk(conn: &Connection, user: &str, msg_id: i64, index: u64) -> Result<Vec<u8>> {
    conn.prepare_cached(
        "SELECT c.data FROM messages m
           JOIN file_chunks c ON c.file_id = m.file_id AND c.idx = ?3
          WHERE m.id = ?1
            AND (m.recipient = ?2
                 OR (m.sender <> ?2 AND EXISTS (
                       SELECT 1 FROM members mb
                        WHERE mb.grp = m.grp AND mb.user = ?2 AND mb.position < m.id)))",
    )?
    .query_row(params![msg_id, user, index as i64], |r| r.get(0))
    .optional()?
    .ok_or_else(|| {
        refuse(
            ErrorCode::BadRequest,
            format!("message {msg_id} offers you no file chunk {index}"),
        )
    })
}

/// Deletes the unfinished uploads of one connection (it ended), or of a whole server when
/// `conn_id` is `None` (it restarted or died).
pub fn drop_uploads(conn: &Connection, server_id: u64, conn_id: Option<u64>) -> Result<usize> {
    Ok(conn
        .prepare_cached(
            "DELETE FROM files WHERE complete = 0 AND server_id = ?1
               AND (?2 IS NULL OR conn_id = ?2)",
        )?
        .execute(params![server_id as i64, conn_id.map(|c| c as i64)])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> PublicKeys {
        PublicKeys {
            x25519: vec![1; 32],
            ed25519: vec![2; 32],
        }
    }

    fn fresh() -> Result<(tempfile::TempDir, PathBuf)> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("chat.db");
        open(&path)?;
        Ok((dir, path))
    }

    #[test]
    fn migrations_are_idempotent_and_versioned() -> Result<()> {
        let (_dir, path) = fresh()?;
        let conn = open(&path)?;
        let v: usize = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        assert_eq!(v, MIGRATIONS.len());
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
        assert_eq!(mode, "wal");
        Ok(())
    }

    #[test]
    fn newer_schema_is_refused() -> Result<()> {
        let (_dir, path) = fresh()?;
        Connection::open(&path)?.pragma_update(None, "user_version", 999)?;
        assert!(open(&path).is_err());
        Ok(())
    }

    #[test]
    fn users_are_unique() -> Result<()> {
        let (_dir, path) = fresh()?;
        let conn = open(&path)?;
        assert!(create_user(&conn, "alice", "h", &keys())?);
        assert!(!create_user(&conn, "alice", "h2", &keys())?);
        assert_eq!(password_hash(&conn, "alice")?.as_deref(), Some("h"));
        assert_eq!(password_hash(&conn, "bob")?, None);
        Ok(())
    }

    #[test]
    fn sessions_expire() -> Result<()> {
        let (_dir, path) = fresh()?;
        let conn = open(&path)?;
        create_user(&conn, "alice", "h", &keys())?;
        create_session(&conn, b"live", "alice", now_ms() + 60_000)?;
        create_session(&conn, b"dead", "alice", now_ms() - 1)?;
        assert_eq!(session_user(&conn, b"live")?.as_deref(), Some("alice"));
        assert_eq!(session_user(&conn, b"dead")?, None);
        assert_eq!(session_user(&conn, b"none")?, None);
        Ok(())
    }

    #[test]
    fn queue_is_ordered_idempotent_and_acked_by_recipient_only() -> Result<()> {
        let (_dir, path) = fresh()?;
        let conn = open(&path)?;
        for u in ["alice", "bob"] {
            create_user(&conn, u, "h", &keys())?;
        }
        let a = store_message(&conn, &Outgoing::new("alice", 1, b"one"), "bob")?;
        let b = store_message(&conn, &Outgoing::new("alice", 2, b"two"), "bob")?;
        let again = store_message(&conn, &Outgoing::new("alice", 1, b"one"), "bob")?;
        assert_eq!(
            a.envelope.id, again.envelope.id,
            "re-send is not stored twice"
        );
        assert!(a.envelope.id < b.envelope.id);
        let q = queued(&conn, "bob", 0, 10)?;
        assert_eq!(
            q.iter().map(|m| m.body.as_slice()).collect::<Vec<_>>(),
            [b"one", b"two"]
        );
        assert_eq!(
            ack(&conn, "alice", &[a.envelope.id])?,
            0,
            "not alice's to ack"
        );
        assert_eq!(ack(&conn, "bob", &[a.envelope.id])?, 1);
        assert_eq!(queued(&conn, "bob", 0, 10)?.len(), 1);
        // Ids are never reused, even after the newest row is deleted.
        ack(&conn, "bob", &[b.envelope.id])?;
        let c = store_message(&conn, &Outgoing::new("alice", 3, b"three"), "bob")?;
        assert!(c.envelope.id > b.envelope.id);
        Ok(())
    }

    #[test]
    fn unknown_recipient_violates_the_foreign_key() -> Result<()> {
        let (_dir, path) = fresh()?;
        let conn = open(&path)?;
        create_user(&conn, "alice", "h", &keys())?;
        assert!(store_message(&conn, &Outgoing::new("alice", 1, b"x"), "nobody").is_err());
        Ok(())
    }

    #[test]
    fn store_reports_presence() -> Result<()> {
        let (_dir, path) = fresh()?;
        let conn = open(&path)?;
        for u in ["alice", "bob"] {
            create_user(&conn, u, "h", &keys())?;
        }
        add_presence(&conn, 7, 1, "bob")?;
        add_presence(&conn, 7, 2, "bob")?;
        add_presence(&conn, 9, 3, "bob")?;
        let bob = || "bob".to_string();
        let at = store_message(&conn, &Outgoing::new("alice", 1, b"x"), "bob")?.online_at;
        assert_eq!(at, [(7, bob()), (9, bob())], "one entry per server, sorted");
        remove_presence(&conn, 9, 3)?;
        assert_eq!(
            store_message(&conn, &Outgoing::new("alice", 2, b"x"), "bob")?.online_at,
            [(7, bob())]
        );
        Ok(())
    }

    #[test]
    fn writer_commits_in_order_and_isolates_failures() -> Result<()> {
        let (_dir, path) = fresh()?;
        let writer = Writer::start(&path)?;
        writer.call(|c| create_user(c, "alice", "h", &keys()))?;
        writer.call(|c| create_user(c, "bob", "h", &keys()))?;
        let (tx, rx) = crossbeam_channel::unbounded();
        for i in 0..100u64 {
            let tx = tx.clone();
            let to = if i == 50 { "nobody" } else { "bob" };
            writer.submit(
                move |c| store_message(c, &Outgoing::new("alice", i, b"m"), to),
                move |res| {
                    let _ = tx.send((i, res.map(|s| s.envelope.id)));
                },
            );
        }
        drop(tx);
        let results: Vec<_> = rx.iter().collect();
        assert_eq!(results.len(), 100);
        let order: Vec<u64> = results.iter().map(|(i, _)| *i).collect();
        assert_eq!(order, (0..100).collect::<Vec<_>>(), "completions in order");
        assert!(results[50].1.is_err(), "the bad job fails alone");
        let conn = open(&path)?;
        assert_eq!(queued(&conn, "bob", 0, 1000)?.len(), 99);
        Ok(())
    }

    fn group_of(conn: &Connection, admin: &str, members: &[&str]) -> Result<()> {
        create_group(conn, "team", admin, b"k1")?;
        for m in members {
            add_member(conn, "team", admin, m, 1, b"k1")?;
        }
        Ok(())
    }

    fn ids_for(conn: &Connection, user: &str) -> Result<Vec<i64>> {
        Ok(queued(conn, user, 0, 100)?.iter().map(|m| m.id).collect())
    }

    #[test]
    fn a_group_message_is_stored_once_and_removed_when_every_member_passed_it() -> Result<()> {
        let (_dir, path) = fresh()?;
        let conn = open(&path)?;
        for u in ["alice", "bob", "carol"] {
            create_user(&conn, u, "h", &keys())?;
        }
        group_of(&conn, "alice", &["bob", "carol"])?;
        add_presence(&conn, 7, 1, "bob")?;
        add_presence(&conn, 7, 2, "alice")?;
        let m = store_group_message(&conn, &Outgoing::new("alice", 1, b"hi"), "team", 1)?;
        assert_eq!(m.online_at, [(7, "bob".to_string())], "not the sender");
        let count = |sql: &str| -> Result<i64> { Ok(conn.query_row(sql, [], |r| r.get(0))?) };
        assert_eq!(count("SELECT count(*) FROM messages")?, 1);
        assert_eq!(
            ids_for(&conn, "alice")?,
            Vec::<i64>::new(),
            "not to its sender"
        );
        assert_eq!(ids_for(&conn, "bob")?, [m.envelope.id]);
        assert_eq!(
            ack(&conn, "alice", &[m.envelope.id])?,
            0,
            "not alice's to ack"
        );
        assert_eq!(ack(&conn, "bob", &[m.envelope.id])?, 1);
        assert_eq!(ids_for(&conn, "bob")?, Vec::<i64>::new());
        assert_eq!(
            count("SELECT count(*) FROM messages")?,
            1,
            "carol still needs it"
        );
        assert_eq!(ack(&conn, "carol", &[m.envelope.id])?, 1);
        assert_eq!(count("SELECT count(*) FROM messages")?, 0);
        Ok(())
    }

    #[test]
    fn out_of_order_group_acks_never_skip_a_message() -> Result<()> {
        let (_dir, path) = fresh()?;
        let conn = open(&path)?;
        for u in ["alice", "bob", "carol"] {
            create_user(&conn, u, "h", &keys())?;
        }
        group_of(&conn, "alice", &["bob", "carol"])?;
        let ids: Vec<i64> = (1..=4)
            .map(|i| {
                Ok(
                    store_group_message(&conn, &Outgoing::new("alice", i, b"m"), "team", 1)?
                        .envelope
                        .id,
                )
            })
            .collect::<Result<_>>()?;
        // Bob acknowledges the 3rd and 4th before the 1st and 2nd arrive.
        assert_eq!(ack(&conn, "bob", &[ids[2], ids[3]])?, 2);
        assert_eq!(
            ids_for(&conn, "bob")?,
            [ids[0], ids[1]],
            "the gap is still queued"
        );
        assert_eq!(ack(&conn, "bob", &[ids[0]])?, 1);
        assert_eq!(ids_for(&conn, "bob")?, [ids[1]]);
        assert_eq!(ack(&conn, "bob", &[ids[1]])?, 1);
        assert_eq!(ids_for(&conn, "bob")?, Vec::<i64>::new());
        let position: i64 =
            conn.query_row("SELECT position FROM members WHERE user = 'bob'", [], |r| {
                r.get(0)
            })?;
        assert_eq!(position, ids[3], "the position closed over the gap");
        let pending: i64 = conn.query_row("SELECT count(*) FROM group_acks", [], |r| r.get(0))?;
        assert_eq!(pending, 0);
        // A repeated acknowledgement is harmless.
        assert_eq!(ack(&conn, "bob", &[ids[2]])?, 0);
        Ok(())
    }

    #[test]
    fn group_rules_are_enforced_in_the_database_layer() -> Result<()> {
        let (_dir, path) = fresh()?;
        let conn = open(&path)?;
        for u in ["alice", "bob", "carol"] {
            create_user(&conn, u, "h", &keys())?;
        }
        group_of(&conn, "alice", &["bob"])?;
        let code = |r: Result<()>| match r {
            Err(Error::Refused { code, .. }) => Some(code),
            _ => None,
        };
        assert_eq!(
            code(add_member(&conn, "team", "bob", "carol", 1, b"k")),
            Some(ErrorCode::NotAllowed)
        );
        assert_eq!(
            code(add_member(&conn, "team", "carol", "carol", 1, b"k")),
            Some(ErrorCode::UnknownGroup)
        );
        assert_eq!(
            code(add_member(&conn, "team", "alice", "carol", 7, b"k")),
            Some(ErrorCode::Conflict),
            "a key of another epoch"
        );
        let keys_for = |names: &[&str]| -> Vec<WrappedKey> {
            names
                .iter()
                .map(|m| WrappedKey {
                    member: m.to_string(),
                    wrapped: b"k2".to_vec(),
                })
                .collect()
        };
        assert_eq!(
            code(remove_member(
                &conn,
                "team",
                "alice",
                "bob",
                2,
                &keys_for(&["alice", "bob"])
            )),
            Some(ErrorCode::Conflict),
            "the new key must not go to the removed member"
        );
        remove_member(&conn, "team", "alice", "bob", 2, &keys_for(&["alice"]))?;
        assert_eq!(
            code(store_group_message(&conn, &Outgoing::new("bob", 9, b"m"), "team", 2).map(|_| ())),
            Some(ErrorCode::UnknownGroup)
        );
        assert_eq!(
            code(
                store_group_message(&conn, &Outgoing::new("alice", 9, b"m"), "team", 1).map(|_| ())
            ),
            Some(ErrorCode::Conflict),
            "sealed under the old epoch"
        );
        assert_eq!(
            leave_group(&conn, "team", "alice")?,
            Left::Deleted,
            "the last member leaving deletes the group"
        );
        Ok(())
    }

    #[test]
    fn sqlite_is_built_with_the_project_options() -> Result<()> {
        let conn = Connection::open_in_memory()?;
        let options: Vec<String> = conn
            .prepare("PRAGMA compile_options")?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        for wanted in ["DEFAULT_MEMSTATUS=0", "THREADSAFE=2", "TEMP_STORE=3"] {
            assert!(
                options.iter().any(|o| o == wanted),
                "{wanted} missing from {options:?} (see .cargo/config.toml)"
            );
        }
        Ok(())
    }

    #[test]
    fn a_message_delivered_and_removed_is_not_stored_again_by_a_resend() -> Result<()> {
        let (_dir, path) = fresh()?;
        let conn = open(&path)?;
        for u in ["alice", "bob"] {
            create_user(&conn, u, "h", &keys())?;
        }
        let before = newest_message_id(&conn)?;
        let first = store_message(&conn, &Outgoing::new("alice", 7, b"hi"), "bob")?;
        assert_eq!(ack(&conn, "bob", &[first.envelope.id])?, 1);
        // The sender never saw `Stored` (its server died) and sends again.
        let resend = |client_id, body| Outgoing {
            resend_after: Some(before),
            ..Outgoing::new("alice", client_id, body)
        };
        let again = store_message(&conn, &resend(7, b"hi"), "bob")?;
        assert_eq!(again.envelope.id, first.envelope.id, "the same message");
        assert!(again.online_at.is_empty(), "not routed again");
        assert!(queued(&conn, "bob", 0, 10)?.is_empty(), "not queued again");
        // A re-send whose original was never stored is stored now.
        let new = store_message(&conn, &resend(8, b"ho"), "bob")?;
        assert!(new.envelope.id > first.envelope.id);
        // Delivery records are cut off by id.
        assert_eq!(forget_deliveries(&conn, first.envelope.id)?, 1);
        let kept: i64 = conn.query_row("SELECT count(*) FROM delivered", [], |r| r.get(0))?;
        assert_eq!(kept, 0);
        Ok(())
    }

    #[test]
    fn many_openers_of_a_new_file_all_succeed() -> Result<()> {
        // A balancer and servers start together on a file that does not exist yet.
        for _ in 0..20 {
            let dir = tempfile::tempdir()?;
            let path = dir.path().join("chat.db");
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(6));
            let openers: Vec<_> = (0..6)
                .map(|_| {
                    let (path, barrier) = (path.clone(), std::sync::Arc::clone(&barrier));
                    std::thread::spawn(move || {
                        barrier.wait();
                        open(&path).and_then(|c| cluster_key(&c))
                    })
                })
                .collect();
            let keys: Vec<Vec<u8>> = openers
                .into_iter()
                .map(|t| t.join().expect("no panic"))
                .collect::<Result<_>>()?;
            assert!(keys.windows(2).all(|w| w[0] == w[1]), "one cluster key");
        }
        Ok(())
    }
}
