//! The PostgreSQL backend: for a cluster that outgrows one machine (`--db postgres://...`).
//!
//! * [`schema`]: the migrations, applied under an advisory lock so that processes starting
//!   together take turns.
//! * The statements, one file per concern as in the SQLite backend: [`accounts`],
//!   [`registry`], then [`files`] ← [`queue`] ← [`groups`] ← [`inbox`], and [`operators`].
//! * [`Conn`]: one connection with its prepared statements; it implements [`Tx`].
//! * [`Readers`], a bounded pool of read connections; [`WriterConn`], the writer thread's
//!   connection (the [`Batch`] of the group-commit writer).
//!
//! # Commit order
//!
//! The delivery logic needs message ids in commit order (`db` module, invariant 1) and a login's
//! presence row committed either before or after a message's transaction, never beside it
//! (invariant 3). SQLite gives both through its single write lock. PostgreSQL runs writers side
//! by side, and a sequence hands out ids in the order transactions ask, not the order they
//! commit. So every writer batch begins by taking one transaction-scoped advisory lock
//! ([`WRITE_LOCK`]), held until its commit: batches from every process commit one after
//! another, ids come out in commit order, and a login's presence insert waits for the message
//! batch in flight. Group commit keeps this cheap: one lock and one commit per batch of up to
//! thousands of jobs, and reads (most of a server's database work) never take it.
//!
//! # Round trips
//!
//! The writer merges a batch's plain sends and acknowledgements (`writer::run_merged`), and
//! this backend stores them in one statement per kind ([`queue::store_messages`],
//! [`groups::store_group_messages`], [`inbox::ack_many`]) over arrays of parameters, so the
//! hot path's round trips do not grow with the batch.
//!
//! # Connections
//!
//! The `postgres` crate: a blocking client over `tokio-postgres`, which drives a current-thread
//! runtime inside each call on the calling thread (no thread of its own; docs/ARCHITECTURE.md
//! says why this crate). TLS is used when the server offers it (`sslmode=prefer`, the default;
//! `sslmode=require` in the URL insists). The server's certificate is checked against the CA
//! file in `PGSSLROOTCERT` when that is set, as libpq does; without it the link is encrypted
//! but not authenticated (docs/SECURITY.md).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use postgres::types::ToSql;
use postgres::{Client, Row, Statement};

use super::writer::{Background, Batch};
use super::{
    Deleted, Exported, OnlineRow, Options, Outgoing, SessionRow, StoredMessage, Tx, Usage,
    UserSummary,
};
use crate::error::{Error, Result};
use crate::net::{Envelope, GroupInfo, PublicKeys, WrappedKey};

pub mod accounts;
pub mod files;
pub mod groups;
pub mod inbox;
pub mod operators;
pub mod prekeys;
pub mod queue;
pub mod registry;
pub mod schema;

/// The advisory lock every writer batch holds until it commits ("fastchat" in ASCII).
pub const WRITE_LOCK: i64 = 0x6661_7374_6368_6174;

/// The most read connections one process keeps open; a reader past them waits for one.
const MAX_READERS: usize = 8;

/// Most bytes of message bodies in one merged insert: a batch of large messages goes in
/// several statements, not one of a hundred MiB.
const MERGED_BYTES: usize = 4 << 20;

/// Most acknowledged ids in one merged statement.
const MERGED_IDS: usize = 32 * 1024;

/// Consecutive ranges of items (of the given weights) that merged statements take: as many
/// as fit in `max` each, and at least one.
fn chunks(weights: &[usize], max: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut load) = (0, 0);
    for (i, &w) in weights.iter().enumerate() {
        if i > start && load + w > max {
            out.push(start..i);
            (start, load) = (i, 0);
        }
        load += w;
    }
    if start < weights.len() {
        out.push(start..weights.len());
    }
    out
}

/// Runs `each` over consecutive slices of `items` (weighed by `weight`, at most `max` a
/// slice, see [`chunks`]) and joins their answers in order: a merged statement per slice.
fn in_chunks<T, R>(
    conn: &mut Conn,
    items: &[T],
    weight: impl Fn(&T) -> usize,
    max: usize,
    mut each: impl FnMut(&mut Conn, &[T]) -> Result<Vec<R>>,
) -> Result<Vec<R>> {
    let weights: Vec<usize> = items.iter().map(weight).collect();
    let mut out = Vec::with_capacity(items.len());
    for part in chunks(&weights, max) {
        out.extend(each(conn, &items[part])?);
    }
    Ok(out)
}

/// Whether `s` names a PostgreSQL database rather than a file.
pub fn is_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// `url` with its password (if any) replaced by `***`, for messages and logs.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// One connection and the statements prepared on it.
pub struct Conn {
    client: Client,
    statements: HashMap<&'static str, Statement>,
    /// Set when a statement fails: inside a transaction, PostgreSQL then refuses everything
    /// until a rollback (to a savepoint).
    failed: bool,
    /// Requests sent and answered so far (statements, preparations, transaction control).
    round_trips: u64,
    /// When the last request was answered (see [`Conn::usable`]).
    last_used: Instant,
}

/// How long PostgreSQL lets one of our transactions wait for its next statement before it
/// ends it (and its session). A writer never pauses inside a transaction for more than its
/// commit window (milliseconds); a process stopped mid-transaction (SIGSTOP, a hung machine)
/// would otherwise hold the cluster's write lock, and every other process's writes, until it
/// resumes.
const IDLE_IN_TRANSACTION_MS: u64 = 5_000;

/// A connection unused for longer than this is asked whether it is still there before it is
/// used again (see [`Conn::usable`]).
const IDLE_CHECK: Duration = Duration::from_millis(250);

/// How long that question may take before the connection is given up for a new one.
const VALID_WAIT: Duration = Duration::from_secs(2);

/// Parameters of a statement.
pub type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

impl Conn {
    /// Connects to `url` with TLS if the server offers it; statements wait at most
    /// `busy_timeout` for a lock.
    pub fn connect(url: &str, busy_timeout: Duration) -> Result<Conn> {
        let mut config: postgres::Config = url
            .parse()
            .map_err(|e| Error::Invalid(format!("bad PostgreSQL URL {}: {e}", redacted(url))))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        config.application_name("fastchat");
        let mut client = config.connect(tls()?).map_err(|e| Error::Unreachable {
            what: format!("database {}", redacted(url)),
            source: std::io::Error::other(e.to_string()),
        })?;
        let ms = busy_timeout.as_millis().max(1);
        // Every statement fastchat runs finds its rows through an index. A connection lives as
        // long as its process and keeps the plans it made: planned while a table was small
        // (a new cluster, statistics taken when it was empty), a statement would scan the whole
        // table on every call once it has grown (a member's position walk over all
        // acknowledgements stalled group traffic for seconds). So scans of whole tables are
        // priced out, and plans stay right at any size. Just-in-time compilation, which such
        // prices would set off (a quarter second for a query of milliseconds), is off.
        client.batch_execute(&format!(
            "SET lock_timeout = {ms};
             SET idle_in_transaction_session_timeout = {IDLE_IN_TRANSACTION_MS};
             SET enable_seqscan = off; SET jit = off"
        ))?;
        Ok(Conn {
            client,
            statements: HashMap::new(),
            failed: false,
            round_trips: 0,
            last_used: Instant::now(),
        })
    }

    /// Whether the connection can take a request. One that broke while unused (the database
    /// restarted, or an operator ended its backend) is found out only by the next request,
    /// which fails: so one unused for 250 ms is asked first (an empty query, one
    /// round trip), and a busy one costs nothing.
    pub fn usable(&mut self) -> bool {
        if self.client.is_closed() {
            return false;
        }
        if self.last_used.elapsed() < IDLE_CHECK {
            return true;
        }
        let alive = self.client.is_valid(VALID_WAIT).is_ok();
        self.last_used = Instant::now();
        alive
    }

    /// `r`, counted and noting a failure (see [`Conn::failed`]).
    fn noted<T>(&mut self, r: std::result::Result<T, postgres::Error>) -> Result<T> {
        self.round_trips += 1;
        self.last_used = Instant::now();
        if r.is_err() {
            self.failed = true;
        }
        Ok(r?)
    }

    fn statement(&mut self, sql: &'static str) -> Result<Statement> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql);
        let s = self.noted(s)?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }

    /// Every row `sql` returns.
    pub fn rows(&mut self, sql: &'static str, params: Params<'_>) -> Result<Vec<Row>> {
        let s = self.statement(sql)?;
        let r = self.client.query(&s, params);
        self.noted(r)
    }

    /// The row `sql` returns, if any.
    pub fn opt(&mut self, sql: &'static str, params: Params<'_>) -> Result<Option<Row>> {
        let s = self.statement(sql)?;
        let r = self.client.query_opt(&s, params);
        self.noted(r)
    }

    /// The one row `sql` returns.
    pub fn one(&mut self, sql: &'static str, params: Params<'_>) -> Result<Row> {
        let s = self.statement(sql)?;
        let r = self.client.query_one(&s, params);
        self.noted(r)
    }

    /// Runs `sql`; how many rows it changed.
    pub fn exec(&mut self, sql: &'static str, params: Params<'_>) -> Result<u64> {
        let s = self.statement(sql)?;
        let r = self.client.execute(&s, params);
        self.noted(r)
    }

    /// Runs statements without parameters (transaction control, migrations).
    pub fn batch(&mut self, sql: &str) -> Result<()> {
        let r = self.client.batch_execute(sql);
        self.noted(r)
    }

    /// Whether the connection is gone (the server restarted, the network broke).
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}

/// The TLS connector: encryption whenever the server offers it; the server's certificate
/// checked (with its host name) only against `PGSSLROOTCERT`, as libpq does.
fn tls() -> Result<postgres_openssl::MakeTlsConnector> {
    use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
    let mut builder = SslConnector::builder(SslMethod::tls_client())?;
    let ca = std::env::var_os("PGSSLROOTCERT").filter(|v| !v.is_empty());
    match &ca {
        Some(file) => builder.set_ca_file(file).map_err(|e| {
            Error::Invalid(format!(
                "PGSSLROOTCERT {}: {e}",
                std::path::Path::new(file).display()
            ))
        })?,
        None => builder.set_verify(SslVerifyMode::NONE),
    }
    let mut connector = postgres_openssl::MakeTlsConnector::new(builder.build());
    if ca.is_none() {
        connector.set_callback(|config, _| {
            config.set_verify_hostname(false);
            Ok(())
        });
    }
    Ok(connector)
}

/// A bounded pool of read connections, shared by the threads of one process: a thread that
/// finds none free opens one while fewer than `MAX_READERS` are open, and waits otherwise
/// (a server has a thread per client; PostgreSQL, a process per connection).
pub struct Readers {
    url: String,
    busy_timeout: Duration,
    pool: Mutex<Pool>,
    freed: Condvar,
}

#[derive(Default)]
struct Pool {
    idle: Vec<Conn>,
    open: usize,
}

impl Readers {
    /// A pool over the database at `url` (which [`schema::migrate`] has brought up to date).
    pub fn new(url: &str, options: &Options) -> Readers {
        Readers {
            url: url.to_string(),
            busy_timeout: options.busy_timeout,
            pool: Mutex::new(Pool::default()),
            freed: Condvar::new(),
        }
    }

    /// Runs `work` with a read connection (each statement sees what was committed when it
    /// began, as in SQLite's autocommit reads).
    pub fn with<T>(&self, work: impl FnOnce(&mut dyn Tx) -> Result<T>) -> Result<T> {
        let mut lease = Lease {
            readers: self,
            conn: Some(self.take()?),
        };
        work(lease.conn.as_mut().expect("leased until dropped"))
    }

    fn take(&self) -> Result<Conn> {
        let deadline = Instant::now() + self.busy_timeout;
        let mut pool = self.pool.lock();
        loop {
            while let Some(mut conn) = pool.idle.pop() {
                if conn.is_closed() {
                    pool.open -= 1;
                    continue;
                }
                // Asked without the pool's lock (a round trip, if it sat unused).
                drop(pool);
                if conn.usable() {
                    return Ok(conn);
                }
                log::warn!("a database connection was lost; connecting again");
                pool = self.pool.lock();
                pool.open -= 1;
            }
            if pool.open < MAX_READERS {
                pool.open += 1;
                drop(pool);
                return Conn::connect(&self.url, self.busy_timeout).map_err(|e| {
                    self.pool.lock().open -= 1;
                    self.freed.notify_one();
                    log::warn!("{e}");
                    Error::refused(
                        crate::error::ErrorCode::Unavailable,
                        "the database cannot be reached now; try again",
                    )
                });
            }
            if self.freed.wait_until(&mut pool, deadline).timed_out() {
                return Err(Error::refused(
                    crate::error::ErrorCode::Unavailable,
                    "every database connection of this process is busy; try again",
                ));
            }
        }
    }
}

/// A read connection taken from the pool, given back when dropped: to the idle ones if it is
/// still open, else (closed, or the work using it panicked midway) counted out, so the pool
/// never loses a slot.
struct Lease<'a> {
    readers: &'a Readers,
    conn: Option<Conn>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let mut pool = self.readers.pool.lock();
        match self.conn.take() {
            Some(conn) if !conn.is_closed() && !std::thread::panicking() => pool.idle.push(conn),
            _ => pool.open -= 1,
        }
        drop(pool);
        self.readers.freed.notify_one();
    }
}

/// The writer thread's connection: `BEGIN`, the write lock, a savepoint per job, `COMMIT`.
/// A connection that broke is opened again at the next batch.
pub struct WriterConn {
    url: String,
    busy_timeout: Duration,
    conn: Conn,
    /// Whether the savepoint of the previous job is still there: the next job releases it
    /// and takes its own in one round trip.
    savepoint: bool,
}

/// The writer's connection to `url`, with the schema brought up to date.
pub fn writer_conn(url: &str, options: &Options) -> Result<(WriterConn, Option<Background>)> {
    let mut conn = Conn::connect(url, options.busy_timeout)?;
    schema::migrate(&mut conn)?;
    Ok((
        WriterConn {
            url: url.to_string(),
            busy_timeout: options.busy_timeout,
            conn,
            savepoint: false,
        },
        None,
    ))
}

impl Batch for WriterConn {
    fn begin(&mut self) -> Result<()> {
        if !self.conn.usable() {
            log::warn!("database connection lost; connecting again");
            self.conn = Conn::connect(&self.url, self.busy_timeout).map_err(|e| {
                log::warn!("{e}");
                // What the batch's requesters are told: try again (not where the database is).
                Error::refused(
                    crate::error::ErrorCode::Unavailable,
                    "the database cannot be reached now; nothing was stored, try again",
                )
            })?;
        }
        // One round trip: the lock waits at most `lock_timeout` (the busy timeout). A lock
        // not had leaves the transaction begun and aborted: it is rolled back here, or the
        // next batch would find it.
        self.savepoint = false;
        self.conn.failed = false;
        let began = self.conn.batch(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK})"
        ));
        if began.is_err() {
            self.rollback();
        }
        began
    }

    fn commit(&mut self) -> Result<()> {
        // PostgreSQL answers COMMIT of a failed transaction by rolling it back, without an
        // error: a batch with a failed statement that no savepoint undid must not say it
        // committed.
        if self.conn.failed {
            return Err(Error::Commit(
                "a statement of the batch failed; nothing of it was stored".into(),
            ));
        }
        self.conn.batch("COMMIT")
    }

    fn rollback(&mut self) {
        let _ = self.conn.batch("ROLLBACK");
    }

    /// A guarded job runs in a savepoint: after a failed statement PostgreSQL refuses
    /// everything else in the transaction until it is rolled back to one. Its savepoint is
    /// released when the next one is taken, in the same round trip (or by the commit).
    ///
    /// An unguarded job (one statement, or writes true even half-way: the hot path of sends
    /// and acknowledgements) runs without, saving a round trip. If one of its statements fails
    /// (a lost connection, a full disk; refusals are not failed statements), the transaction
    /// is lost: the jobs after it are not run and the whole batch is reported failed, as when
    /// a commit fails.
    fn run(&mut self, guarded: bool, work: &mut dyn FnMut(&mut dyn Tx) -> bool) -> Result<()> {
        if self.conn.failed {
            return Err(Error::Commit(
                "an earlier statement of the batch failed; nothing of it was stored".into(),
            ));
        }
        if !guarded {
            work(&mut self.conn);
            return Ok(());
        }
        if self.savepoint {
            self.conn.batch("RELEASE SAVEPOINT job; SAVEPOINT job")?;
        } else {
            self.conn.batch("SAVEPOINT job")?;
            self.savepoint = true;
        }
        if !work(&mut self.conn) {
            // Undoes the job's writes (and a failed statement's hold on the transaction); the
            // savepoint stays, for the next job to release.
            self.conn.batch("ROLLBACK TO SAVEPOINT job")?;
            self.conn.failed = false;
        }
        Ok(())
    }
}

/// A column as `i64` turned into `u64` (counts and ids are never negative).
fn unsigned(row: &Row, i: usize) -> Result<u64> {
    Ok(row.try_get::<_, i64>(i)?.max(0) as u64)
}

impl Tx for Conn {
    fn create_user(&mut self, name: &str, password_hash: &str, keys: &PublicKeys) -> Result<bool> {
        accounts::create_user(self, name, password_hash, keys)
    }
    fn password_hash(&mut self, name: &str) -> Result<Option<String>> {
        accounts::password_hash(self, name)
    }
    fn user_exists(&mut self, name: &str) -> Result<bool> {
        accounts::user_exists(self, name)
    }
    fn user_keys(&mut self, name: &str) -> Result<Option<PublicKeys>> {
        accounts::user_keys(self, name)
    }
    fn create_session(
        &mut self,
        token_hash: &[u8],
        user: &str,
        expires_at: i64,
        session_key: &[u8],
    ) -> Result<()> {
        accounts::create_session(self, token_hash, user, expires_at, session_key)
    }
    fn end_session(&mut self, token_hash: &[u8]) -> Result<()> {
        accounts::end_session(self, token_hash)
    }
    fn session(&mut self, token_hash: &[u8]) -> Result<Option<SessionRow>> {
        accounts::session(self, token_hash)
    }
    fn renew_session(&mut self, token_hash: &[u8], expires_at: i64) -> Result<()> {
        accounts::renew_session(self, token_hash, expires_at)
    }

    fn put_prekeys(
        &mut self,
        user: &str,
        signed: Option<&crate::net::SignedPrekey>,
        one_time: &[(u32, Vec<u8>)],
        max: usize,
    ) -> Result<u64> {
        prekeys::put_prekeys(self, user, signed, one_time, max)
    }
    fn take_bundle(&mut self, user: &str) -> Result<Option<crate::crypto::x3dh::Bundle>> {
        prekeys::take_bundle(self, user)
    }

    fn users(&mut self) -> Result<Vec<UserSummary>> {
        operators::users(self)
    }
    fn create_account(&mut self, name: &str, password_hash: &str) -> Result<bool> {
        operators::create_account(self, name, password_hash)
    }
    fn reset_password(&mut self, name: &str, password_hash: &str) -> Result<bool> {
        operators::reset_password(self, name, password_hash)
    }
    fn set_keys(&mut self, name: &str, keys: &PublicKeys) -> Result<bool> {
        operators::set_keys(self, name, keys)
    }
    fn end_sessions(&mut self, name: &str) -> Result<usize> {
        operators::end_sessions(self, name)
    }
    fn delete_user(&mut self, name: &str) -> Result<Option<Deleted>> {
        operators::delete_user(self, name)
    }
    fn online(&mut self) -> Result<Vec<OnlineRow>> {
        operators::online(self)
    }
    fn queued_total(&mut self) -> Result<u64> {
        operators::queued_total(self)
    }
    fn purge_queue(&mut self, name: &str) -> Result<u64> {
        operators::purge_queue(self, name)
    }
    fn export(&mut self, user: Option<&str>) -> Result<Vec<Exported>> {
        operators::export(self, user)
    }

    fn register_server(&mut self, name: &str, addr: &str) -> Result<u64> {
        registry::register_server(self, name, addr)
    }
    fn forget_server(&mut self, server_id: u64) -> Result<()> {
        registry::forget_server(self, server_id)?;
        files::drop_uploads(self, server_id, None)?;
        Ok(())
    }
    fn server_name(&mut self, server_id: u64) -> Result<Option<String>> {
        Ok(registry::server_addr(self, server_id)?.map(|(_, name)| name))
    }
    fn server_addr(&mut self, server_id: u64) -> Result<Option<(String, String)>> {
        registry::server_addr(self, server_id)
    }
    fn add_presence(
        &mut self,
        server_id: u64,
        conn_id: u64,
        user: &str,
        token_hash: &[u8],
    ) -> Result<()> {
        registry::add_presence(self, server_id, conn_id, user, token_hash)
    }
    fn ended_sessions(&mut self, server_id: u64) -> Result<Vec<u64>> {
        registry::ended_sessions(self, server_id)
    }
    fn present_connections(&mut self, server_id: u64) -> Result<Vec<u64>> {
        registry::present_connections(self, server_id)
    }
    fn remove_presence(&mut self, server_id: u64, conn_id: u64) -> Result<()> {
        registry::remove_presence(self, server_id, conn_id)
    }
    fn clear_presence(&mut self, server_id: u64) -> Result<()> {
        registry::clear_presence(self, server_id)
    }
    fn online_users(&mut self, limit: usize, servers: &[u64]) -> Result<Vec<String>> {
        registry::online_users(self, limit, servers)
    }
    fn online_among(&mut self, users: &[String], servers: &[u64]) -> Result<Vec<String>> {
        registry::online_among(self, users, servers)
    }
    fn presence_servers(&mut self) -> Result<Vec<u64>> {
        registry::presence_servers(self)
    }

    fn newest_message_id(&mut self) -> Result<i64> {
        queue::newest_message_id(self)
    }
    fn store_message(&mut self, msg: &Outgoing<'_>, to: &str) -> Result<StoredMessage> {
        queue::store_message(self, msg, to)
    }
    fn store_messages(
        &mut self,
        msgs: &[(Outgoing<'_>, &str)],
    ) -> Result<Vec<Result<StoredMessage>>> {
        queue::store_messages(self, msgs)
    }
    fn stored_group_copy(
        &mut self,
        msg: &Outgoing<'_>,
        group: &str,
    ) -> Result<Option<StoredMessage>> {
        groups::stored_group_copy(self, msg, group)
    }
    fn store_group_messages(
        &mut self,
        msgs: &[(Outgoing<'_>, &str, u64)],
    ) -> Result<Vec<Option<StoredMessage>>> {
        groups::store_group_messages(self, msgs)
    }
    fn store_group_message(&mut self, msg: &Outgoing<'_>, group: &str) -> Result<StoredMessage> {
        groups::store_group_message(self, msg, group)
    }
    fn queued(&mut self, user: &str, after: i64, limit: usize) -> Result<Vec<Envelope>> {
        inbox::queued(self, user, after, limit)
    }
    fn ack(&mut self, user: &str, ids: &[i64]) -> Result<usize> {
        inbox::ack(self, user, ids)
    }
    fn ack_many(&mut self, acks: &[(&str, &[i64])]) -> Result<Vec<Result<usize>>> {
        inbox::ack_many(self, acks)
    }
    fn forget_deliveries(&mut self, upto: i64, limit: usize) -> Result<usize> {
        queue::forget_deliveries(self, upto, limit)
    }
    fn queue_usage(&mut self, owner: &str) -> Result<Usage> {
        queue::queue_usage(self, owner)
    }
    fn pair_usage(&mut self, sender: &str, recipient: &str) -> Result<Usage> {
        queue::pair_usage(self, sender, recipient)
    }
    fn heavy_queues(&mut self, messages: u64, bytes: u64) -> Result<Vec<(String, Usage)>> {
        queue::heavy_queues(self, messages, bytes)
    }
    fn heavy_senders(&mut self, messages: u64, bytes: u64) -> Result<Vec<(String, Usage)>> {
        queue::heavy_senders(self, messages, bytes)
    }
    fn expire_messages(&mut self, before_ms: i64, limit: usize) -> Result<usize> {
        queue::expire_messages(self, before_ms, limit)
    }
    fn file_usage(&mut self, owner: Option<&str>) -> Result<Usage> {
        files::file_usage(self, owner)
    }

    fn group(&mut self, group: &str) -> Result<Option<GroupInfo>> {
        groups::group(self, group)
    }
    fn user_groups(&mut self, user: &str) -> Result<Vec<String>> {
        groups::user_groups(self, user)
    }
    fn create_group(&mut self, group: &str, admin: &str) -> Result<bool> {
        groups::create_group(self, group, admin)
    }
    fn add_member(&mut self, group: &str, user: &str) -> Result<()> {
        groups::add_member(self, group, user)
    }
    fn remove_member(&mut self, group: &str, user: &str) -> Result<()> {
        groups::remove_member(self, group, user)
    }
    fn set_group(&mut self, group: &str, admin: &str, epoch: u64) -> Result<()> {
        groups::set_group(self, group, admin, epoch)
    }
    fn delete_group(&mut self, group: &str) -> Result<()> {
        groups::delete_group(self, group)
    }
    fn add_change(&mut self, group: &str, seq: u64, change: &[u8]) -> Result<()> {
        groups::add_change(self, group, seq, change)
    }
    fn changes(&mut self, group: &str, after: u64, limit: usize) -> Result<Vec<Vec<u8>>> {
        groups::changes(self, group, after, limit)
    }
    fn last_change(&mut self, group: &str) -> Result<Option<Vec<u8>>> {
        groups::last_change(self, group)
    }
    fn put_keys(&mut self, group: &str, epoch: u64, keys: &[WrappedKey], by: &str) -> Result<()> {
        groups::put_keys(self, group, epoch, keys, by)
    }
    fn group_key(
        &mut self,
        group: &str,
        epoch: u64,
        member: &str,
    ) -> Result<Option<(Vec<u8>, String)>> {
        groups::group_key(self, group, epoch, member)
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
        files::begin_upload(self, owner, server_id, conn_id, size, chunks, limit)
    }
    fn store_chunk(&mut self, owner: &str, upload: i64, index: u64, data: &[u8]) -> Result<()> {
        files::store_chunk(self, owner, upload, index, data)
    }
    fn file_chunk(&mut self, user: &str, msg_id: i64, index: u64) -> Result<Vec<u8>> {
        inbox::file_chunk(self, user, msg_id, index)
    }
    fn drop_uploads(&mut self, server_id: u64, conn_id: Option<u64>) -> Result<usize> {
        files::drop_uploads(self, server_id, conn_id)
    }
}

#[cfg(test)]
mod tests;
