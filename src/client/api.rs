//! [`Client`]: a logged-in user's connection that survives the loss of its server, with one
//! typed method per request.
//!
//! On a lost connection it goes back to the balancer with its session token, gets another
//! server, and re-sends what was not confirmed (same client id, so nothing is stored twice).
//! Messages come at least once: telling a message seen before from a new one is the end-to-end
//! layer's work ([`super::replay`]), on authenticated content, never on the server's ids,
//! which a forged message could use up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, TryRecvError};
use parking_lot::Mutex;

use super::balancer::{unexpected, BalancerClient, Session};
use super::connection::{closed, Connection, Incoming, Reply, SERVER_TIMEOUT};
use crate::error::{Error, ErrorCode, Result};
use crate::net::{
    Envelope, GroupInfo, NewMessage, ServerInfo, ServerReply, ServerRequest, SignedChange,
    WrappedKey,
};
use crate::transport::Transport;

/// How long a client keeps trying to reach another server after losing one.
pub const FAILOVER_LIMIT: Duration = Duration::from_secs(30);

/// A connection silent this long is asked whether its server still answers
/// ([`ServerRequest::Ping`]), and left for another server if it does not within
/// [`SERVER_TIMEOUT`]: a stopped server (SIGSTOP, a hung machine) keeps its sockets open and
/// says nothing, and what is sent to the user meanwhile waits in its queue.
pub const QUIET: Duration = Duration::from_secs(10);

/// How many other servers a login tries when the one it was given is full.
const FULL_RETRIES: usize = 3;

/// What [`Client::next`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A message (acknowledge it with [`Client::ack`] once shown; it may be one delivered
    /// before: see [`super::replay`]).
    Message(Envelope),
    /// The queue held at (re)connection has been delivered.
    Synced,
    /// The server was lost; the client is now on this one (what was watched must be watched
    /// again there).
    Failover(ServerInfo),
    /// A watched user ([`Client::watch`]) came online or went offline.
    Presence {
        /// Who.
        user: String,
        /// Online now, or not.
        online: bool,
    },
}

/// A group key as the server hands it to a member: sealed for them by another member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedGroupKey {
    /// Who wrapped it (unwrap with the pair key shared with them).
    pub wrapped_by: String,
    /// The wrapped key.
    pub key: Vec<u8>,
}

struct Current {
    generation: u64,
    conn: Arc<Connection>,
    server: ServerInfo,
    /// When its server was last heard from (an event, or the reply to a request).
    heard: Instant,
    /// Where its liveness check stands.
    probe: Probe,
}

/// A connection's liveness check (see [`Client::liveness`]).
enum Probe {
    /// Nothing asked.
    Idle,
    /// A `Ping` sent at this moment, its answer awaited.
    Sent(Reply, Instant),
    /// It did not answer: the connection is being closed.
    GivenUp,
}

/// A chat client that survives the loss of its server.
///
/// Safe to share between threads (for example one reading input and sending, one printing).
pub struct Client {
    balancer: String,
    /// How to reach the balancer and the servers (TLS and the cluster CA).
    transport: Transport,
    /// The token and the key that proves it (the server in it is the first one).
    session: Session,
    current: Mutex<Current>,
    /// Held while failing over, so two threads noticing the same failure reconnect once.
    failing_over: Mutex<()>,
    /// Set by [`Client::logout`]: a closed connection is then the end, not a failure.
    logged_out: AtomicBool,
}

impl Client {
    /// Logs in and connects to the assigned server. Also returns the balancer connection, which
    /// the caller may keep for directory lookups.
    pub fn login(
        balancer: &str,
        transport: &Transport,
        user: &str,
        password: &str,
    ) -> Result<(Client, BalancerClient)> {
        let mut b = BalancerClient::connect(balancer, transport)?;
        let session = b.login(user, password)?;
        let client = Client::connect(&mut b, transport, session)?;
        Ok((client, b))
    }

    /// Takes up a session made earlier (a kept session: token and key), through the balancer,
    /// which assigns a live server and renews the session; like [`Client::login`] otherwise.
    pub fn resume(
        balancer: &str,
        transport: &Transport,
        session: &Session,
    ) -> Result<(Client, BalancerClient)> {
        let mut b = BalancerClient::connect(balancer, transport)?;
        let session = b.resume(session, None)?;
        let client = Client::connect(&mut b, transport, session)?;
        Ok((client, b))
    }

    /// Connects to the server `session` was given, asking `b` for another while it is
    /// unreachable or full.
    fn connect(b: &mut BalancerClient, transport: &Transport, session: Session) -> Result<Client> {
        let (conn, session) = open_with_failover(b, session, |s| Connection::open(s, transport))?;
        Ok(Client {
            balancer: b.addr().to_string(),
            transport: transport.clone(),
            current: Mutex::new(Current {
                generation: 0,
                conn: Arc::new(conn),
                server: session.server.clone(),
                heard: Instant::now(),
                probe: Probe::Idle,
            }),
            session,
            failing_over: Mutex::new(()),
            logged_out: AtomicBool::new(false),
        })
    }

    /// The session: token, key and first server.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The user, as the balancer knows it.
    pub fn user(&self) -> &str {
        &self.session.user
    }

    /// How this client reaches the cluster.
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// Ends the session: tells the balancer to refuse the token (and servers to close its
    /// connections), then closes the connection (without failing over).
    pub fn logout(&self) -> Result<()> {
        self.logged_out.store(true, Ordering::SeqCst);
        let told = BalancerClient::connect(&self.balancer, &self.transport)
            .and_then(|mut b| b.logout(&self.session));
        self.conn().1.close();
        told
    }

    /// Closes the connection without ending the session (a kept session outlives the command
    /// that used it) and without failing over.
    pub fn close(&self) {
        self.logged_out.store(true, Ordering::SeqCst);
        self.conn().1.close();
    }

    /// The server in use now.
    pub fn server(&self) -> ServerInfo {
        self.current.lock().server.clone()
    }

    /// The largest file the current server accepts.
    pub fn max_file(&self) -> u64 {
        self.current.lock().conn.max_file
    }

    fn conn(&self) -> (u64, Arc<Connection>) {
        let c = self.current.lock();
        (c.generation, Arc::clone(&c.conn))
    }

    /// Notes that the server of connection `generation` was just heard from.
    fn heard_from(&self, generation: u64) {
        let mut c = self.current.lock();
        if c.generation == generation {
            c.heard = Instant::now();
        }
    }

    /// Replaces the connection of generation `failed` (unless another thread already did).
    fn failover(&self, failed: u64) -> Result<Option<ServerInfo>> {
        if self.logged_out.load(Ordering::SeqCst) {
            return Err(closed());
        }
        let _one_at_a_time = self.failing_over.lock();
        let avoid = {
            let c = self.current.lock();
            if c.generation != failed {
                return Ok(None);
            }
            c.server.id
        };
        let deadline = Instant::now() + FAILOVER_LIMIT;
        let mut last: Error;
        loop {
            let attempt = BalancerClient::connect(&self.balancer, &self.transport)
                .and_then(|mut b| b.resume(&self.session, Some(avoid)))
                .and_then(|session| Ok((Connection::open(&session, &self.transport)?, session)));
            match attempt {
                Ok((conn, session)) => {
                    log::info!(
                        "{}: server {avoid} lost; now on server {}",
                        self.session.user,
                        conn.server_id
                    );
                    let mut c = self.current.lock();
                    c.generation += 1;
                    // Closing the old connection wakes any thread still reading its events.
                    c.conn.close();
                    c.conn = Arc::new(conn);
                    c.server = session.server.clone();
                    c.heard = Instant::now();
                    c.probe = Probe::Idle;
                    return Ok(Some(session.server));
                }
                Err(
                    e @ Error::Refused {
                        code: ErrorCode::InvalidToken,
                        ..
                    },
                ) => return Err(e),
                Err(e) => last = e,
            }
            // Closed meanwhile (Ctrl-C, logout): stop looking.
            if Instant::now() >= deadline || self.logged_out.load(Ordering::SeqCst) {
                return Err(last);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `f` on the current connection; on a lost connection, fails over and runs it again.
    fn with_failover<T>(&self, mut f: impl FnMut(&Connection) -> Result<T>) -> Result<T> {
        let deadline = Instant::now() + FAILOVER_LIMIT;
        loop {
            let (generation, conn) = self.conn();
            match f(&conn) {
                Err(e) if e.is_disconnect() && Instant::now() < deadline => {
                    self.failover(generation)?;
                }
                other => {
                    if other.is_ok() {
                        self.heard_from(generation);
                    }
                    return other;
                }
            }
        }
    }

    /// Sends any request and waits for its reply, failing over if the server is lost.
    pub fn call(&self, request: &ServerRequest) -> Result<ServerReply> {
        self.with_failover(|conn| conn.call(request))
    }

    /// Sends a request that stores a message (`build` gets `resend_after`) and returns the
    /// stored id, failing over like [`Client::call`]. The first attempt says it is one; an
    /// attempt after a lost connection names the newest id known before the first, so the
    /// server finds the original if it was stored, even if it was delivered since.
    fn store(&self, build: impl Fn(Option<i64>) -> ServerRequest) -> Result<i64> {
        let mut first: Option<i64> = None;
        let reply = self.with_failover(|conn| match first {
            None => {
                first = Some(conn.newest());
                conn.call(&build(None))
            }
            Some(after) => conn.call(&build(Some(after))),
        })?;
        match reply {
            ServerReply::Stored { msg_id } => Ok(msg_id),
            other => Err(unexpected("a message", &other)),
        }
    }

    /// Sends a message to `to` (offering a finished upload, if `file`) and waits until it is
    /// stored; re-sent on another server if this one is lost meanwhile. Returns its id.
    pub fn send(&self, to: &str, client_id: u64, body: &[u8], file: Option<i64>) -> Result<i64> {
        self.store(|resend_after| ServerRequest::Send {
            to: to.into(),
            message: NewMessage {
                client_id,
                body: body.to_vec(),
                file,
                resend_after,
                patient: false,
            },
        })
    }

    /// Sends a group message sealed under `epoch`, like [`Client::send`].
    pub fn group_send(
        &self,
        group: &str,
        client_id: u64,
        epoch: u64,
        body: &[u8],
        file: Option<i64>,
    ) -> Result<i64> {
        self.store(|resend_after| ServerRequest::GroupSend {
            group: group.into(),
            epoch,
            message: NewMessage {
                client_id,
                body: body.to_vec(),
                file,
                resend_after,
                patient: false,
            },
        })
    }

    /// Acknowledges and waits for the confirmation. If the server is lost first, the messages
    /// come again from the next server and are acknowledged then (see [`Client::next`]).
    pub fn ack(&self, msg_ids: &[i64]) -> Result<()> {
        let (_, conn) = self.conn();
        match conn.ack(msg_ids) {
            Err(e) if e.is_disconnect() => Ok(()),
            other => other,
        }
    }

    /// Be told when any of `users` comes online or goes offline ([`Event::Presence`]);
    /// replaces the set watched before. Those online now are told at once.
    pub fn watch(&self, users: Vec<String>) -> Result<()> {
        self.done("Watch", &ServerRequest::Watch { users })
    }

    /// Who is online, on any live server.
    pub fn who(&self) -> Result<Vec<String>> {
        match self.call(&ServerRequest::Who)? {
            ServerReply::Online { users } => Ok(users),
            other => Err(unexpected("Who", &other)),
        }
    }

    fn done(&self, what: &str, request: &ServerRequest) -> Result<()> {
        match self.call(request)? {
            ServerReply::Done => Ok(()),
            other => Err(unexpected(what, &other)),
        }
    }

    /// Submits a signed change of a group's membership with the new epoch's `keys`; the
    /// id of the message that announces it to the members (`None`: the group is gone).
    pub fn group_change(
        &self,
        change: &SignedChange,
        keys: Vec<WrappedKey>,
        client_id: u64,
    ) -> Result<Option<i64>> {
        let request = ServerRequest::GroupChange {
            change: change.clone(),
            keys,
            client_id,
        };
        match self.call(&request)? {
            ServerReply::Stored { msg_id } => Ok(Some(msg_id)),
            ServerReply::Done => Ok(None),
            other => Err(unexpected("GroupChange", &other)),
        }
    }

    /// The changes of `group`'s chain after `after` (a batch of at most
    /// [`crate::net::MAX_CHANGES`]).
    pub fn group_log(&self, group: &str, after: u64) -> Result<Vec<SignedChange>> {
        let group = group.to_string();
        match self.call(&ServerRequest::GroupLog { group, after })? {
            ServerReply::Changes { changes } => Ok(changes),
            other => Err(unexpected("GroupLog", &other)),
        }
    }

    /// Keys the current, unkeyed `epoch` of `group` with `keys` for every member.
    pub fn group_rekey(&self, group: &str, epoch: u64, keys: Vec<WrappedKey>) -> Result<()> {
        let request = ServerRequest::GroupRekey {
            group: group.into(),
            epoch,
            keys,
        };
        self.done("GroupRekey", &request)
    }

    /// Our groups.
    pub fn group_list(&self) -> Result<Vec<GroupInfo>> {
        match self.call(&ServerRequest::GroupList)? {
            ServerReply::Groups { groups } => Ok(groups),
            other => Err(unexpected("GroupList", &other)),
        }
    }

    /// A group's admin, members and epoch (members only).
    pub fn group_info(&self, group: &str) -> Result<GroupInfo> {
        let group = group.to_string();
        match self.call(&ServerRequest::GroupInfo { group })? {
            ServerReply::Group { group } => Ok(group),
            other => Err(unexpected("GroupInfo", &other)),
        }
    }

    /// Our wrapped key of `epoch` of `group`.
    pub fn group_key(&self, group: &str, epoch: u64) -> Result<SealedGroupKey> {
        let group = group.to_string();
        match self.call(&ServerRequest::GroupKey { group, epoch })? {
            ServerReply::GroupKey { wrapped_by, key } => Ok(SealedGroupKey { wrapped_by, key }),
            other => Err(unexpected("GroupKey", &other)),
        }
    }

    /// Starts an upload of `size` bytes in `chunks` chunks; returns its id.
    pub fn file_begin(&self, size: u64, chunks: u64) -> Result<i64> {
        match self.call(&ServerRequest::FileBegin { size, chunks })? {
            ServerReply::Upload { upload } => Ok(upload),
            other => Err(unexpected("FileBegin", &other)),
        }
    }

    /// Uploads chunk `index` (encrypted) of `upload`.
    pub fn file_chunk(&self, upload: i64, index: u64, data: Vec<u8>) -> Result<()> {
        let request = ServerRequest::FileChunk {
            upload,
            index,
            data,
        };
        self.done("FileChunk", &request)
    }

    /// Chunk `index` (encrypted) of the file offered by message `msg_id`.
    pub fn file_get(&self, msg_id: i64, index: u64) -> Result<Vec<u8>> {
        match self.call(&ServerRequest::FileGet { msg_id, index })? {
            ServerReply::FileData { data } => Ok(data),
            other => Err(unexpected("FileGet", &other)),
        }
    }

    /// The next event, waiting at most until `deadline`; `None` when it passes. A server
    /// silent for [`QUIET`] is asked whether it still answers ([`ServerRequest::Ping`]), and
    /// left for another if it does not within [`SERVER_TIMEOUT`]; callers may call this in
    /// short slices, the check spans them.
    pub fn next(&self, deadline: Instant) -> Result<Option<Event>> {
        loop {
            let (generation, conn) = self.conn();
            let check_at = self.liveness(generation, &conn);
            let got = conn.events().recv_deadline(deadline.min(check_at));
            if got.is_ok() {
                self.heard_from(generation);
            }
            match got {
                Ok(Incoming::Message(msg)) => return Ok(Some(Event::Message(msg))),
                Ok(Incoming::Synced) => return Ok(Some(Event::Synced)),
                Ok(Incoming::Presence(user, online)) => {
                    return Ok(Some(Event::Presence { user, online }))
                }
                Ok(Incoming::Closed(why)) => {
                    log::debug!("connection closed: {why:?}");
                    if let Some(server) = self.failover(generation)? {
                        return Ok(Some(Event::Failover(server)));
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    // Closed, and its `Closed` taken by another thread: fail over here too
                    // (once per generation, whoever comes first).
                    if let Some(server) = self.failover(generation)? {
                        return Ok(Some(Event::Failover(server)));
                    }
                }
                // Time to look at the server again.
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(RecvTimeoutError::Timeout) => return Ok(None),
            }
        }
    }

    /// The liveness check of connection `generation`, one step: after [`QUIET`] without a
    /// word from its server, a [`ServerRequest::Ping`]; without its answer within
    /// [`SERVER_TIMEOUT`], the connection is closed (its thread then reports it closed, and
    /// [`Client::next`] fails over). Returns when to look again.
    fn liveness(&self, generation: u64, conn: &Connection) -> Instant {
        let mut c = self.current.lock();
        let now = Instant::now();
        if c.generation != generation || matches!(c.probe, Probe::GivenUp) {
            return now + QUIET;
        }
        if let Probe::Sent(reply, sent) = &c.probe {
            let sent = *sent;
            match reply.try_recv() {
                Ok(_) => {
                    c.heard = now;
                    c.probe = Probe::Idle;
                }
                Err(TryRecvError::Empty) if now < sent + SERVER_TIMEOUT => {
                    return sent + SERVER_TIMEOUT;
                }
                // Unanswered, but messages came meanwhile: it lives.
                Err(TryRecvError::Empty) if c.heard > sent => c.probe = Probe::Idle,
                Err(_) => {
                    log::info!(
                        "{}: server {} did not answer for {} s; leaving it",
                        self.session.user,
                        conn.server_id,
                        (now - c.heard).as_secs()
                    );
                    c.probe = Probe::GivenUp;
                    conn.close();
                    return now + QUIET;
                }
            }
        }
        let quiet_until = c.heard + QUIET;
        if now < quiet_until {
            return quiet_until;
        }
        match conn.request(&ServerRequest::Ping) {
            Ok(reply) => {
                c.probe = Probe::Sent(reply, now);
                now + SERVER_TIMEOUT
            }
            // Closed already: its `Closed` is on the way.
            Err(_) => {
                c.probe = Probe::GivenUp;
                now + QUIET
            }
        }
    }
}

/// Opens a connection (with `open`) to the server `session` was given, asking `b` for another
/// while it is unreachable or full; the connection and the session it was opened with.
///
/// A server that died or stopped moments ago may still be assigned (it leaves the rotation
/// within two seconds): ask again, avoiding it, until one answers, for up to
/// [`FAILOVER_LIMIT`]. A full server refuses politely: a few others are tried before giving up.
pub fn open_with_failover<T>(
    b: &mut BalancerClient,
    session: Session,
    mut open: impl FnMut(&Session) -> Result<T>,
) -> Result<(T, Session)> {
    let mut session = session;
    let deadline = Instant::now() + FAILOVER_LIMIT;
    let mut full = 0;
    loop {
        match open(&session) {
            Ok(conn) => return Ok((conn, session)),
            Err(e) if e.is_disconnect() && Instant::now() < deadline => {
                log::info!(
                    "server {} unreachable ({e}); asking for another",
                    session.server.id
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(Error::Refused {
                code: ErrorCode::Unavailable,
                message,
            }) if full < FULL_RETRIES => {
                log::info!(
                    "server {}: {message}; asking for another",
                    session.server.id
                );
                full += 1;
            }
            Err(e) => return Err(e),
        }
        session = b.resume(&session, Some(session.server.id))?;
    }
}
