//! The SQLite backend: one file shared by the balancer and every chat server.
//!
//! * [`schema`]: the migrations and [`open`] (WAL mode, `synchronous=NORMAL`, foreign keys, a
//!   busy handler, then the schema brought up to date).
//! * The statements, one file per concern, layered so that each uses only those above it:
//!   [`accounts`], [`registry`], then [`files`] ← [`queue`] ← [`groups`] ← [`inbox`].
//! * [`Readers`], the pool of read connections; [`WriterConn`], the writer thread's connection
//!   (the [`Batch`] of the group-commit writer); the checkpoint loop that runs beside it.
//!
//! Several processes share the file, so writers take turns at SQLite's write lock. A waiting
//! statement sleeps 25 µs, doubling up to 500 µs, until the busy timeout (SQLite's own busy
//! handler sleeps up to 100 ms at a time: with several servers taking turns at the lock, that
//! leaves a writer asleep long after the lock is free). Every statement is parameterised; no
//! SQL is assembled from input.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use parking_lot::Mutex;
use rusqlite::Connection;

use super::writer::{Background, Batch};
use super::{
    Deleted, Exported, OnlineRow, Options, Outgoing, SessionRow, StoredMessage, Tx, Usage,
    UserSummary,
};
use crate::error::{Error, Result};
use crate::net::{Envelope, GroupInfo, PublicKeys, WrappedKey};
use crate::throttle::Quiet;

pub mod accounts;
pub mod files;
pub mod groups;
pub mod inbox;
pub mod operators;
pub mod prekeys;
pub mod queue;
pub mod registry;
pub mod schema;

pub use schema::open;

/// Longest single sleep while waiting for the write lock.
const BUSY_SLEEP_MAX: Duration = Duration::from_micros(500);

thread_local! {
    /// How long a statement on this thread waits for another process's write lock. SQLite's
    /// busy handler is a plain function called on the thread running the statement, so the
    /// bound travels with the thread: set by whoever hands this thread a connection.
    static BUSY_TIMEOUT: Cell<Duration> = const { Cell::new(super::DEFAULT_BUSY_TIMEOUT) };
}

/// Sets the busy timeout of statements run by this thread from now on.
fn set_busy_timeout(d: Duration) {
    BUSY_TIMEOUT.with(|t| t.set(d));
}

/// SQLite's busy handler: called with the number of earlier calls for this wait; `true` to try
/// again. Sleeps grow from 25 µs to [`BUSY_SLEEP_MAX`] and stop after about the thread's busy
/// timeout.
fn busy_wait(attempt: i32) -> bool {
    let attempt = attempt.max(0) as u32;
    let sleep = Duration::from_micros(25u64 << attempt.min(6)).min(BUSY_SLEEP_MAX);
    let limit = BUSY_TIMEOUT.with(Cell::get);
    let attempts = (limit.as_micros() / BUSY_SLEEP_MAX.as_micros()) as u32;
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

/// Runs `f` again while the database answers "busy" in the ways SQLite's busy handler does not
/// wait for (a brand-new file switching to WAL while other processes open it too), for up to
/// `limit`.
fn retry_busy<T>(limit: Duration, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + limit;
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

/// The SQLite implementation of [`Tx`]: statements on a borrowed connection, inside whatever
/// transaction the connection is in.
pub struct SqliteTx<'a> {
    conn: &'a Connection,
}

impl<'a> SqliteTx<'a> {
    /// Statements on `conn`.
    pub fn new(conn: &'a Connection) -> SqliteTx<'a> {
        SqliteTx { conn }
    }
}

/// A small pool of read connections, shared by the threads of one process.
///
/// A lock and not a channel: taking a connection is a pop from a vector, held for nanoseconds,
/// and a thread that finds the pool empty simply opens another connection.
pub struct Readers {
    path: PathBuf,
    busy_timeout: Duration,
    pool: Mutex<Vec<Connection>>,
}

impl Readers {
    /// A pool over the database at `path` (which [`open`] has already migrated).
    pub fn new(path: &Path, options: &Options) -> Readers {
        Readers {
            path: path.to_path_buf(),
            busy_timeout: options.busy_timeout,
            pool: Mutex::new(Vec::new()),
        }
    }

    /// Runs `work` with a read connection.
    pub fn with<T>(&self, work: impl FnOnce(&mut dyn Tx) -> Result<T>) -> Result<T> {
        let conn = self.pool.lock().pop();
        let conn = match conn {
            Some(c) => c,
            None => connect(&self.path)?,
        };
        set_busy_timeout(self.busy_timeout);
        let out = work(&mut SqliteTx::new(&conn));
        let mut pool = self.pool.lock();
        if pool.len() < 16 {
            pool.push(conn);
        }
        out
    }
}

/// The writer thread's connection: one `BEGIN IMMEDIATE` ... `COMMIT` per batch, a savepoint
/// per guarded job.
pub struct WriterConn {
    conn: Connection,
    busy_timeout: Duration,
    /// See [`Options::wal_limit`].
    wal_limit: u64,
    /// What the last checkpoint found (see [`Backlog`]).
    backlog: Arc<Backlog>,
    /// The log file (`-wal`), whose growth since the last checkpoint counts too.
    wal: WalFile,
    /// No restart of the log is tried before this (see [`WriterConn::restart_log`]).
    next_restart: Instant,
    /// SQLite's `PRAGMA data_version` as of the last batch: it changes when another
    /// connection has committed.
    data_version: i64,
    /// When a batch last found that another process had committed since the one before.
    others_seen: Option<Instant>,
}

/// How long after a batch last found another process's commit the writer counts the
/// database as shared ([`Batch::shared`]): several batches of one server at a moderate rate,
/// while a balancer's occasional write (a login, a registration) shares it only briefly.
const SHARED_FOR: Duration = Duration::from_millis(100);

/// How much of the log is not yet copied into the database: what the last checkpoint could
/// not copy, plus what the log file grew since (a checkpoint thread starved of CPU must not
/// let the log outgrow its limit unseen).
#[derive(Default)]
struct Backlog {
    /// Bytes the last checkpoint could not copy.
    uncopied: AtomicU64,
    /// The log file's length at that checkpoint.
    file_len: AtomicU64,
    /// Set by the checkpoint thread when the log should start over (see [`checkpoint_loop`]).
    restart: AtomicBool,
}

impl Backlog {
    fn now(&self, wal: &mut WalFile) -> u64 {
        let grown = wal
            .len()
            .saturating_sub(self.file_len.load(Ordering::Relaxed));
        self.uncopied.load(Ordering::Relaxed) + grown
    }
}

/// The log file's length, read from a descriptor kept open: the writer asks before every
/// batch, and a `stat` of the path (a lookup of every folder in it) was 6% of the writer
/// thread's time at 10,000 messages/s. SQLite cuts the file shorter but keeps it while this
/// process has the database open; should it go anyway (its last link removed), the path is
/// opened again.
struct WalFile {
    path: PathBuf,
    file: Option<std::fs::File>,
}

impl WalFile {
    fn new(path: PathBuf) -> WalFile {
        WalFile { path, file: None }
    }

    /// Its length in bytes; 0 while there is no log.
    fn len(&mut self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        if let Some(m) = self.file.as_ref().and_then(|f| f.metadata().ok()) {
            if m.nlink() > 0 {
                return m.len();
            }
        }
        self.file = std::fs::File::open(&self.path).ok();
        self.file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len())
    }
}

/// Said at most once a second: the log is over its limit.
static HELD_BACK: Quiet = Quiet::new(Duration::from_secs(1));

/// How long a batch waits, at most, while the log is over its limit.
const HELD_BACK_PAUSE: Duration = Duration::from_millis(200);

/// The log is cut back to this size (or the limit, if smaller) once it has been copied.
const SMALL_WAL: u64 = 8 << 20;

/// The writer's connection to `path` (opened and migrated) and the checkpoint loop to run
/// beside it.
pub fn writer_conn(path: &Path, options: &Options) -> Result<(WriterConn, Option<Background>)> {
    let conn = schema::open_with(path, options.busy_timeout)?;
    // Checkpoints run on their own thread (below), never inside a commit: a commit that
    // crossed the automatic checkpoint threshold would hold back every reply of its batch for
    // the length of an fsync.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    // Once a checkpoint has copied everything and a writer starts the log over, the file is
    // cut back to this: a log that grew while a reader held back checkpoints does not stay
    // large.
    conn.pragma_update(
        None,
        "journal_size_limit",
        SMALL_WAL.min(options.wal_limit) as i64,
    )?;
    let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    let checkpoints = connect(path)?;
    let busy_timeout = options.busy_timeout;
    let backlog = Arc::new(Backlog::default());
    let published = Arc::clone(&backlog);
    let mut wal_path = path.as_os_str().to_owned();
    wal_path.push("-wal");
    let wal_path = PathBuf::from(wal_path);
    let mut checked = WalFile::new(wal_path.clone());
    let restart_at = RESTART_AT.min(options.wal_limit / 2);
    let background: Background = Box::new(move |stop| {
        set_busy_timeout(busy_timeout);
        checkpoint_loop(
            &checkpoints,
            &stop,
            page_size.max(512) as u64,
            &published,
            &mut checked,
            restart_at,
        )
    });
    let writer = WriterConn {
        conn,
        busy_timeout,
        wal_limit: options.wal_limit,
        backlog,
        wal: WalFile::new(wal_path),
        next_restart: Instant::now(),
        data_version: 0,
        others_seen: None,
    };
    Ok((writer, Some(background)))
}

impl WriterConn {
    /// Starts the log over when the checkpoint thread asks (see [`checkpoint_loop`]), between
    /// batches: a `RESTART` checkpoint takes the write lock (waiting for other processes'
    /// writers), copies the frames committed since the checkpoint thread's last round, waits
    /// briefly for readers to leave the log, and starts it over. On this thread, because a
    /// thread that only waits for the write lock would not get it from a writer that commits
    /// batch after batch.
    fn restart_log(&mut self) {
        if !self.backlog.restart.swap(false, Ordering::Relaxed)
            || Instant::now() < self.next_restart
        {
            return;
        }
        set_busy_timeout(RESTART_WAIT);
        let done = checkpoint(&self.conn, "RESTART");
        set_busy_timeout(self.busy_timeout);
        match done {
            Ok((0, _, _)) => log::trace!("checkpoint: the log starts over"),
            other => {
                log::debug!("checkpoint: the log could not start over: {other:?}");
                self.next_restart = Instant::now() + RESTART_BACKOFF;
            }
        }
    }

    /// Holds back a batch while the log is over its limit (a reader elsewhere keeps
    /// checkpoints from copying it): up to a moment past the limit, refused past twice it.
    fn mind_the_log(&mut self) -> Result<()> {
        let limit = self.wal_limit;
        let mut over = || self.backlog.now(&mut self.wal) > limit;
        if !over() {
            return Ok(());
        }
        let deadline = Instant::now() + HELD_BACK_PAUSE;
        while over() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let backlog = self.backlog.now(&mut self.wal);
        let size = crate::units::human_size;
        let why = format!(
            "the database's log holds {} not yet copied into it, over the limit of {}: a \
             reader in another process is holding back checkpoints (an open transaction?)",
            size(backlog),
            size(self.wal_limit)
        );
        if backlog > 2 * self.wal_limit {
            HELD_BACK.warn(&format!("{why}; refusing writes until it lets go"));
            return Err(Error::refused(
                crate::error::ErrorCode::Unavailable,
                "the database cannot take more writes now (a reader is holding back its log); \
                 nothing was stored, try again later",
            ));
        }
        if backlog > self.wal_limit {
            HELD_BACK.warn(&format!("{why}; slowing writes"));
        }
        Ok(())
    }
}

impl Batch for WriterConn {
    fn begin(&mut self) -> Result<()> {
        self.restart_log();
        self.mind_the_log()?;
        // The writer thread runs only this connection's statements.
        set_busy_timeout(self.busy_timeout);
        // The busy handler waits up to the busy timeout; a "busy" it does not wait for (a
        // checkpoint in another process finishing) is retried within the same bound.
        retry_busy(self.busy_timeout, || {
            self.conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
            Ok(())
        })?;
        // Inside the transaction, so it counts every commit before it. Only a hint: a failure
        // leaves it as it was.
        let version = self
            .conn
            .prepare_cached("PRAGMA data_version")
            .and_then(|mut s| s.query_row([], |r| r.get::<_, i64>(0)))
            .unwrap_or(self.data_version);
        if version != self.data_version {
            // The first batch sees the count start (the schema's migration, say).
            if self.data_version != 0 {
                self.others_seen = Some(Instant::now());
            }
            self.data_version = version;
        }
        Ok(())
    }

    fn shared(&self) -> bool {
        self.others_seen.is_some_and(|t| t.elapsed() < SHARED_FOR)
    }

    fn commit(&mut self) -> Result<()> {
        self.conn.prepare_cached("COMMIT")?.execute([])?;
        Ok(())
    }

    fn rollback(&mut self) {
        let _ = self.conn.execute_batch("ROLLBACK");
    }

    fn run(&mut self, guarded: bool, work: &mut dyn FnMut(&mut dyn Tx) -> bool) -> Result<()> {
        let mut tx = SqliteTx::new(&self.conn);
        if !guarded {
            work(&mut tx);
            return Ok(());
        }
        // Prepared once and reused: these run for every job.
        self.conn.prepare_cached("SAVEPOINT job")?.execute([])?;
        if !work(&mut tx) {
            self.conn.prepare_cached("ROLLBACK TO job")?.execute([])?;
        }
        self.conn.prepare_cached("RELEASE job")?.execute([])?;
        Ok(())
    }
}

/// How often the checkpoint thread copies the WAL into the database file. Often, so each
/// checkpoint is small: its fsyncs hold up the disk for others, and at 10,000 messages/s a
/// checkpoint every second (a megabyte or more) put 10-25 ms stalls into the latency tail
/// where one every 50 ms keeps p99 near 3 ms (BENCHMARKS.md).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(50);

/// Once the log holds this much (or half the `--wal-limit`, if smaller) and a checkpoint has
/// copied all of it, the writer starts it over from its beginning (see [`checkpoint_loop`]).
/// Half the size the file is cut back to, so that the file neither grows nor is cut under a
/// steady load.
const RESTART_AT: u64 = SMALL_WAL / 2;

/// How long a restart may wait for another process's write lock and for readers to leave the
/// log: this process's writer waits meanwhile, and every other one while it holds the lock.
const RESTART_WAIT: Duration = Duration::from_millis(20);

/// After a restart that could not finish (a reader kept using the log), the next try waits
/// at least this long.
const RESTART_BACKOFF: Duration = Duration::from_millis(250);

/// Checkpoints until stopped. Every process with a writer runs one; whichever gets there
/// first does the work. Each publishes in `backlog` how many bytes of the log it could not
/// copy.
///
/// Each round is a passive checkpoint, which never waits for or blocks readers and writers.
/// Passive checkpoints alone never start the log over under a steady load: SQLite does so
/// only when a write begins while every frame is copied, and commits land while a checkpoint
/// copies and syncs (2-5 ms here), so at 10,000 messages/s the log file grew by 50 MB a
/// second without end (and with three servers on one file, 90 MB a second). So once it holds
/// [`RESTART_AT`] and a passive round copied all of it, the writer is asked to start it over
/// before its next batch ([`WriterConn::restart_log`]): about 1 ms here, once every 4 MiB of
/// log. The file keeps its length, so later writes reuse its blocks instead of growing it.
fn checkpoint_loop(
    conn: &Connection,
    stop: &Receiver<()>,
    page_size: u64,
    backlog: &Backlog,
    log_file: &mut WalFile,
    restart_at: u64,
) {
    while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
        stop.recv_timeout(CHECKPOINT_EVERY)
    {
        checkpoint_round(conn, page_size, backlog, log_file, restart_at);
    }
}

/// One round of [`checkpoint_loop`].
fn checkpoint_round(
    conn: &Connection,
    page_size: u64,
    backlog: &Backlog,
    log_file: &mut WalFile,
    restart_at: u64,
) {
    match checkpoint(conn, "PASSIVE") {
        Ok((0, wal, copied)) => {
            // The file's length first: growth after it counts as not copied.
            backlog.file_len.store(log_file.len(), Ordering::Relaxed);
            backlog
                .uncopied
                .store((wal - copied).max(0) as u64 * page_size, Ordering::Relaxed);
            if wal > 0 {
                log::trace!("checkpoint: {copied} of {wal} pages");
            }
            if copied == wal && wal as u64 * page_size >= restart_at {
                backlog.restart.store(true, Ordering::Relaxed);
            }
        }
        Ok(_) => {}
        Err(e) => log::debug!("checkpoint skipped: {e}"),
    }
}

/// A checkpoint in `mode`: (1 if it could not finish, frames in the log, frames copied).
fn checkpoint(conn: &Connection, mode: &str) -> Result<(i64, i64, i64)> {
    Ok(
        conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?,
    )
}

impl Tx for SqliteTx<'_> {
    fn create_user(&mut self, name: &str, password_hash: &str, keys: &PublicKeys) -> Result<bool> {
        accounts::create_user(self.conn, name, password_hash, keys)
    }
    fn password_hash(&mut self, name: &str) -> Result<Option<String>> {
        accounts::password_hash(self.conn, name)
    }
    fn user_exists(&mut self, name: &str) -> Result<bool> {
        accounts::user_exists(self.conn, name)
    }
    fn user_keys(&mut self, name: &str) -> Result<Option<PublicKeys>> {
        accounts::user_keys(self.conn, name)
    }
    fn create_session(
        &mut self,
        token_hash: &[u8],
        user: &str,
        expires_at: i64,
        session_key: &[u8],
    ) -> Result<()> {
        accounts::create_session(self.conn, token_hash, user, expires_at, session_key)
    }
    fn end_session(&mut self, token_hash: &[u8]) -> Result<()> {
        accounts::end_session(self.conn, token_hash)
    }
    fn session(&mut self, token_hash: &[u8]) -> Result<Option<SessionRow>> {
        accounts::session(self.conn, token_hash)
    }
    fn renew_session(&mut self, token_hash: &[u8], expires_at: i64) -> Result<()> {
        accounts::renew_session(self.conn, token_hash, expires_at)
    }

    fn put_prekeys(
        &mut self,
        user: &str,
        signed: Option<&crate::net::SignedPrekey>,
        one_time: &[(u32, Vec<u8>)],
        max: usize,
    ) -> Result<u64> {
        prekeys::put_prekeys(self.conn, user, signed, one_time, max)
    }
    fn take_bundle(&mut self, user: &str) -> Result<Option<crate::crypto::x3dh::Bundle>> {
        prekeys::take_bundle(self.conn, user)
    }

    fn users(&mut self) -> Result<Vec<UserSummary>> {
        operators::users(self.conn)
    }
    fn create_account(&mut self, name: &str, password_hash: &str) -> Result<bool> {
        operators::create_account(self.conn, name, password_hash)
    }
    fn reset_password(&mut self, name: &str, password_hash: &str) -> Result<bool> {
        operators::reset_password(self.conn, name, password_hash)
    }
    fn set_keys(&mut self, name: &str, keys: &PublicKeys) -> Result<bool> {
        operators::set_keys(self.conn, name, keys)
    }
    fn end_sessions(&mut self, name: &str) -> Result<usize> {
        operators::end_sessions(self.conn, name)
    }
    fn delete_user(&mut self, name: &str) -> Result<Option<Deleted>> {
        operators::delete_user(self.conn, name)
    }
    fn online(&mut self) -> Result<Vec<OnlineRow>> {
        operators::online(self.conn)
    }
    fn queued_total(&mut self) -> Result<u64> {
        operators::queued_total(self.conn)
    }
    fn purge_queue(&mut self, name: &str) -> Result<u64> {
        operators::purge_queue(self.conn, name)
    }
    fn export(&mut self, user: Option<&str>) -> Result<Vec<Exported>> {
        operators::export(self.conn, user)
    }

    fn register_server(&mut self, name: &str, addr: &str) -> Result<u64> {
        registry::register_server(self.conn, name, addr)
    }
    fn forget_server(&mut self, server_id: u64) -> Result<()> {
        registry::forget_server(self.conn, server_id)?;
        files::drop_uploads(self.conn, server_id, None)?;
        Ok(())
    }
    fn server_name(&mut self, server_id: u64) -> Result<Option<String>> {
        Ok(registry::server_addr(self.conn, server_id)?.map(|(_, name)| name))
    }
    fn server_addr(&mut self, server_id: u64) -> Result<Option<(String, String)>> {
        registry::server_addr(self.conn, server_id)
    }
    fn add_presence(
        &mut self,
        server_id: u64,
        conn_id: u64,
        user: &str,
        token_hash: &[u8],
    ) -> Result<()> {
        registry::add_presence(self.conn, server_id, conn_id, user, token_hash)
    }
    fn ended_sessions(&mut self, server_id: u64) -> Result<Vec<u64>> {
        registry::ended_sessions(self.conn, server_id)
    }
    fn present_connections(&mut self, server_id: u64) -> Result<Vec<u64>> {
        registry::present_connections(self.conn, server_id)
    }
    fn remove_presence(&mut self, server_id: u64, conn_id: u64) -> Result<()> {
        registry::remove_presence(self.conn, server_id, conn_id)
    }
    fn clear_presence(&mut self, server_id: u64) -> Result<()> {
        registry::clear_presence(self.conn, server_id)
    }
    fn online_users(&mut self, limit: usize, servers: &[u64]) -> Result<Vec<String>> {
        registry::online_users(self.conn, limit, servers)
    }
    fn online_among(&mut self, users: &[String], servers: &[u64]) -> Result<Vec<String>> {
        registry::online_among(self.conn, users, servers)
    }
    fn presence_servers(&mut self) -> Result<Vec<u64>> {
        registry::presence_servers(self.conn)
    }

    fn newest_message_id(&mut self) -> Result<i64> {
        queue::newest_message_id(self.conn)
    }
    fn store_message(&mut self, msg: &Outgoing<'_>, to: &str) -> Result<StoredMessage> {
        queue::store_message(self.conn, msg, to)
    }
    fn stored_group_copy(
        &mut self,
        msg: &Outgoing<'_>,
        group: &str,
    ) -> Result<Option<StoredMessage>> {
        groups::stored_group_copy(self.conn, msg, group)
    }
    fn store_group_message(&mut self, msg: &Outgoing<'_>, group: &str) -> Result<StoredMessage> {
        groups::store_group_message(self.conn, msg, group)
    }
    fn store_group_messages(
        &mut self,
        msgs: &[(Outgoing<'_>, &str, u64)],
    ) -> Result<Vec<Option<StoredMessage>>> {
        groups::store_group_messages(self.conn, msgs)
    }
    fn queued(&mut self, user: &str, after: i64, limit: usize) -> Result<Vec<Envelope>> {
        inbox::queued(self.conn, user, after, limit)
    }
    fn ack(&mut self, user: &str, ids: &[i64]) -> Result<usize> {
        inbox::ack(self.conn, user, ids)
    }
    fn forget_deliveries(&mut self, upto: i64, limit: usize) -> Result<usize> {
        queue::forget_deliveries(self.conn, upto, limit)
    }
    fn queue_usage(&mut self, owner: &str) -> Result<Usage> {
        queue::queue_usage(self.conn, owner)
    }
    fn pair_usage(&mut self, sender: &str, recipient: &str) -> Result<Usage> {
        queue::pair_usage(self.conn, sender, recipient)
    }
    fn heavy_queues(&mut self, messages: u64, bytes: u64) -> Result<Vec<(String, Usage)>> {
        queue::heavy_queues(self.conn, messages, bytes)
    }
    fn heavy_senders(&mut self, messages: u64, bytes: u64) -> Result<Vec<(String, Usage)>> {
        queue::heavy_senders(self.conn, messages, bytes)
    }
    fn expire_messages(&mut self, before_ms: i64, limit: usize) -> Result<usize> {
        queue::expire_messages(self.conn, before_ms, limit)
    }
    fn file_usage(&mut self, owner: Option<&str>) -> Result<Usage> {
        files::file_usage(self.conn, owner)
    }

    fn group(&mut self, group: &str) -> Result<Option<GroupInfo>> {
        groups::group(self.conn, group)
    }
    fn user_groups(&mut self, user: &str) -> Result<Vec<String>> {
        groups::user_groups(self.conn, user)
    }
    fn create_group(&mut self, group: &str, admin: &str) -> Result<bool> {
        groups::create_group(self.conn, group, admin)
    }
    fn add_member(&mut self, group: &str, user: &str) -> Result<()> {
        groups::add_member(self.conn, group, user)
    }
    fn remove_member(&mut self, group: &str, user: &str) -> Result<()> {
        groups::remove_member(self.conn, group, user)
    }
    fn set_group(&mut self, group: &str, admin: &str, epoch: u64) -> Result<()> {
        groups::set_group(self.conn, group, admin, epoch)
    }
    fn delete_group(&mut self, group: &str) -> Result<()> {
        groups::delete_group(self.conn, group)
    }
    fn add_change(&mut self, group: &str, seq: u64, change: &[u8]) -> Result<()> {
        groups::add_change(self.conn, group, seq, change)
    }
    fn changes(&mut self, group: &str, after: u64, limit: usize) -> Result<Vec<Vec<u8>>> {
        groups::changes(self.conn, group, after, limit)
    }
    fn last_change(&mut self, group: &str) -> Result<Option<Vec<u8>>> {
        groups::last_change(self.conn, group)
    }
    fn put_keys(&mut self, group: &str, epoch: u64, keys: &[WrappedKey], by: &str) -> Result<()> {
        groups::put_keys(self.conn, group, epoch, keys, by)
    }
    fn group_key(
        &mut self,
        group: &str,
        epoch: u64,
        member: &str,
    ) -> Result<Option<(Vec<u8>, String)>> {
        groups::group_key(self.conn, group, epoch, member)
    }

    fn begin_upload(
        &mut self,
        owner: &str,
        server_id: u64,
        conn_id: u64,
        size: u64,
        chunks: u64,
        limit: usize,
    ) -> Result<i64> {
        files::begin_upload(self.conn, owner, server_id, conn_id, size, chunks, limit)
    }
    fn store_chunk(&mut self, owner: &str, upload: i64, index: u64, data: &[u8]) -> Result<()> {
        files::store_chunk(self.conn, owner, upload, index, data)
    }
    fn file_chunk(&mut self, user: &str, msg_id: i64, index: u64) -> Result<Vec<u8>> {
        inbox::file_chunk(self.conn, user, msg_id, index)
    }
    fn drop_uploads(&mut self, server_id: u64, conn_id: Option<u64>) -> Result<usize> {
        files::drop_uploads(self.conn, server_id, conn_id)
    }
}

#[cfg(test)]
mod tests;
