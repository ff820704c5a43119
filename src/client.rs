//! The client library: a balancer session and a chat-server connection.
//!
//! [`BalancerClient`] is strictly request/reply. [`Connection`] has a reader thread that hands
//! replies to the request waiting for them (matched by request id) and pushes delivered messages
//! onto an event channel, so a program can send while messages arrive.

use std::collections::{HashMap, HashSet};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::net::{
    BalancerReply, BalancerRequest, Envelope, FrameReader, FrameWriter, PublicKeys, ServerEvent,
    ServerInfo, ServerRequest,
};

/// How long to wait for a TCP connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long to wait for the reply to a request.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Connects to `addr` (host:port); `what` names the other side in the error.
pub fn dial(addr: &str, what: &str) -> Result<TcpStream> {
    let unreachable = |source| Error::Unreachable {
        what: format!("{what} at {addr}"),
        source,
    };
    let addrs = addr.to_socket_addrs().map_err(unreachable)?;
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "address resolves to nothing");
    for a in addrs {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(unreachable(last))
}

/// A logged-in session: who, the token, and the server assigned.
#[derive(Debug, Clone)]
pub struct Session {
    /// The user name.
    pub user: String,
    /// Session token for `Hello`.
    pub token: String,
    /// The chat server to use.
    pub server: ServerInfo,
}

/// A connection to the balancer.
pub struct BalancerClient {
    addr: String,
    reader: FrameReader<TcpStream>,
    writer: FrameWriter<TcpStream>,
    next_id: u64,
}

impl BalancerClient {
    /// Connects to the balancer at `addr`.
    pub fn connect(addr: &str) -> Result<BalancerClient> {
        let stream = dial(addr, "balancer")?;
        stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
        Ok(BalancerClient {
            addr: addr.to_string(),
            reader: FrameReader::new(stream.try_clone()?),
            writer: FrameWriter::new(stream),
            next_id: 1,
        })
    }

    /// The balancer's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends one request (built from a fresh id) and returns the reply; an error reply becomes
    /// [`Error::Refused`].
    pub fn request(&mut self, build: impl FnOnce(u64) -> BalancerRequest) -> Result<BalancerReply> {
        let id = self.next_id;
        self.next_id += 1;
        self.writer.send(&build(id))?;
        let reply = self.reader.read::<BalancerReply>()?.ok_or_else(|| {
            Error::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "balancer closed the connection",
            ))
        })?;
        match reply {
            BalancerReply::Error { code, message, .. } => Err(Error::Refused { code, message }),
            r => Ok(r),
        }
    }

    /// Creates an account.
    pub fn signup(&mut self, name: &str, password: &str, keys: PublicKeys) -> Result<()> {
        match self.request(|id| BalancerRequest::Signup {
            id,
            name: name.into(),
            password: password.into(),
            keys,
        })? {
            BalancerReply::Ok { .. } => Ok(()),
            other => Err(unexpected("Signup", &other)),
        }
    }

    /// Logs in and gets a server.
    pub fn login(&mut self, name: &str, password: &str) -> Result<Session> {
        let reply = self.request(|id| BalancerRequest::Login {
            id,
            name: name.into(),
            password: password.into(),
        })?;
        session(reply)
    }

    /// Gets a (possibly different) server for an existing session, other than `avoid` if
    /// another is live.
    pub fn resume(&mut self, token: &str, avoid: Option<u64>) -> Result<Session> {
        let reply = self.request(|id| BalancerRequest::Resume {
            id,
            token: token.into(),
            avoid,
        })?;
        session(reply)
    }

    /// Ends a session: its token is refused from now on.
    pub fn logout(&mut self, token: &str) -> Result<()> {
        match self.request(|id| BalancerRequest::Logout {
            id,
            token: token.into(),
        })? {
            BalancerReply::Ok { .. } => Ok(()),
            other => Err(unexpected("Logout", &other)),
        }
    }

    /// The live servers.
    pub fn servers(&mut self) -> Result<Vec<ServerInfo>> {
        match self.request(|id| BalancerRequest::Servers { id })? {
            BalancerReply::Servers { servers, .. } => Ok(servers),
            other => Err(unexpected("Servers", &other)),
        }
    }

    /// A user's public keys from the directory.
    pub fn keys(&mut self, name: &str) -> Result<PublicKeys> {
        match self.request(|id| BalancerRequest::Keys {
            id,
            name: name.into(),
        })? {
            BalancerReply::Keys { keys, .. } => Ok(keys),
            other => Err(unexpected("Keys", &other)),
        }
    }
}

fn session(reply: BalancerReply) -> Result<Session> {
    match reply {
        BalancerReply::LoggedIn {
            user,
            token,
            server,
            ..
        } => Ok(Session {
            user,
            token,
            server,
        }),
        other => Err(unexpected("Login", &other)),
    }
}

fn unexpected(what: &str, reply: &impl std::fmt::Debug) -> Error {
    Error::Protocol(format!("unexpected reply to {what}: {reply:?}"))
}

/// What a connection's reader thread hands to the program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A message for us (not yet acknowledged).
    Message(Envelope),
    /// Everything queued at login has been delivered.
    Synced,
    /// The connection ended; the text says why when the server said so.
    Closed(Option<String>),
}

/// Requests waiting for their reply, by id; `None` once the reader thread has ended, so a request
/// on a closed connection fails at once instead of waiting for a reply that cannot come.
type Pending = Arc<Mutex<Option<HashMap<u64, Sender<ServerEvent>>>>>;

/// A connection to a chat server, authenticated by a session token.
pub struct Connection {
    /// Who the server says we are.
    pub user: String,
    /// The server's id.
    pub server_id: u64,
    /// The largest file the server accepts.
    pub max_file: u64,
    /// See [`Connection::newest`]; raised by the reader thread.
    newest: Arc<AtomicI64>,
    writer: Mutex<FrameWriter<TcpStream>>,
    stream: TcpStream,
    pending: Pending,
    events: Receiver<Incoming>,
    next_id: AtomicU64,
    reader: Option<JoinHandle<()>>,
}

impl Connection {
    /// Connects to the session's server and says `Hello`.
    pub fn open(session: &Session) -> Result<Connection> {
        let stream = dial(&session.server.addr, "chat server")?;
        let mut reader = FrameReader::new(stream.try_clone()?);
        let mut writer = FrameWriter::new(stream.try_clone()?);
        stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
        writer.send(&ServerRequest::Hello {
            id: 0,
            token: session.token.clone(),
        })?;
        let (user, server_id, max_file, newest) = match reader.read::<ServerEvent>()? {
            Some(ServerEvent::Welcome {
                user,
                server_id,
                max_file,
                newest,
                ..
            }) => (user, server_id, max_file, newest),
            Some(ServerEvent::Error { code, message, .. }) => {
                return Err(Error::Refused { code, message })
            }
            Some(other) => return Err(unexpected("Hello", &other)),
            None => {
                return Err(Error::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "server closed the connection during Hello",
                )))
            }
        };
        stream.set_read_timeout(None)?;
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let (events_tx, events) = unbounded();
        let newest = Arc::new(AtomicI64::new(newest));
        let thread = {
            let pending = Arc::clone(&pending);
            let newest = Arc::clone(&newest);
            std::thread::Builder::new()
                .name("client-reader".into())
                .spawn(move || read_loop(reader, &pending, &events_tx, &newest))?
        };
        Ok(Connection {
            user,
            server_id,
            max_file,
            newest,
            writer: Mutex::new(writer),
            stream,
            pending,
            events,
            next_id: AtomicU64::new(1),
            reader: Some(thread),
        })
    }

    /// Closes the connection; its reader thread then reports `Closed`.
    pub fn close(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Delivered messages and connection state changes.
    pub fn events(&self) -> &Receiver<Incoming> {
        &self.events
    }

    /// Sends a request and returns a channel that will carry its reply.
    pub fn request(
        &self,
        build: impl FnOnce(u64) -> ServerRequest,
    ) -> Result<Receiver<ServerEvent>> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = bounded(1);
        match self.pending.lock().as_mut() {
            Some(pending) => pending.insert(id, tx),
            None => return Err(closed()),
        };
        let sent = self.writer.lock().send(&build(id));
        if let Err(e) = sent {
            if let Some(pending) = self.pending.lock().as_mut() {
                pending.remove(&id);
            }
            return Err(e);
        }
        Ok(rx)
    }

    /// Sends a request and waits for its reply; an error reply becomes [`Error::Refused`].
    pub fn call(&self, build: impl FnOnce(u64) -> ServerRequest) -> Result<ServerEvent> {
        let rx = self.request(build)?;
        wait_reply(&rx)
    }

    /// Sends a message and waits until the server has stored it; returns the server's id.
    pub fn send(&self, to: &str, client_id: u64, body: Vec<u8>) -> Result<i64> {
        self.send_with(to, client_id, body, None, None)
    }

    /// The newest message id this connection knows was assigned: from `Welcome`, then every
    /// `Stored` and `Deliver`. A message sent now will get a larger one.
    pub fn newest(&self) -> i64 {
        self.newest.load(Ordering::SeqCst)
    }

    /// Sends a message that may offer a finished upload, and waits until it is stored.
    /// `resend_after`: see `ServerRequest::Send`.
    pub fn send_with(
        &self,
        to: &str,
        client_id: u64,
        body: Vec<u8>,
        file: Option<i64>,
        resend_after: Option<i64>,
    ) -> Result<i64> {
        match self.call(|id| ServerRequest::Send {
            id,
            to: to.into(),
            client_id,
            body,
            file,
            resend_after,
        })? {
            ServerEvent::Stored { msg_id, .. } => Ok(msg_id),
            other => Err(unexpected("Send", &other)),
        }
    }

    /// Acknowledges messages (they leave the queue) and waits for the server to confirm.
    pub fn ack(&self, msg_ids: &[i64]) -> Result<()> {
        if msg_ids.is_empty() {
            return Ok(());
        }
        match self.call(|id| ServerRequest::Ack {
            id,
            msg_ids: msg_ids.to_vec(),
        })? {
            ServerEvent::Acked { .. } => Ok(()),
            other => Err(unexpected("Ack", &other)),
        }
    }
}

/// Waits for a reply from [`Connection::request`].
pub fn wait_reply(rx: &Receiver<ServerEvent>) -> Result<ServerEvent> {
    match rx.recv_timeout(REPLY_TIMEOUT) {
        Ok(ServerEvent::Error { code, message, .. }) => Err(Error::Refused { code, message }),
        Ok(event) => Ok(event),
        Err(crossbeam_channel::RecvTimeoutError::Timeout) => Err(Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the server did not answer",
        ))),
        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => Err(closed()),
    }
}

fn closed() -> Error {
    Error::Io(std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "connection closed",
    ))
}

impl Drop for Connection {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
    }
}

fn read_loop(
    mut reader: FrameReader<TcpStream>,
    pending: &Pending,
    events: &Sender<Incoming>,
    newest: &AtomicI64,
) {
    let why = loop {
        let event = match reader.read::<ServerEvent>() {
            Ok(Some(e)) => e,
            Ok(None) => break None,
            Err(e) => break Some(e.to_string()),
        };
        match &event {
            ServerEvent::Stored { msg_id, .. } => {
                newest.fetch_max(*msg_id, Ordering::SeqCst);
            }
            ServerEvent::Deliver { msg } => {
                newest.fetch_max(msg.id, Ordering::SeqCst);
            }
            _ => {}
        }
        let id = match &event {
            ServerEvent::Welcome { id, .. }
            | ServerEvent::Stored { id, .. }
            | ServerEvent::Acked { id }
            | ServerEvent::Done { id }
            | ServerEvent::Groups { id, .. }
            | ServerEvent::Group { id, .. }
            | ServerEvent::GroupKey { id, .. }
            | ServerEvent::Upload { id, .. }
            | ServerEvent::Online { id, .. }
            | ServerEvent::FileData { id, .. } => Some(*id),
            ServerEvent::Error { id, .. } => *id,
            ServerEvent::Deliver { .. } | ServerEvent::Synced => None,
        };
        match (id, event) {
            (Some(id), event) => {
                let waiter = pending.lock().as_mut().and_then(|p| p.remove(&id));
                if let Some(waiter) = waiter {
                    let _ = waiter.send(event);
                }
            }
            (None, ServerEvent::Deliver { msg }) => {
                let _ = events.send(Incoming::Message(Arc::unwrap_or_clone(msg)));
            }
            (None, ServerEvent::Synced) => {
                let _ = events.send(Incoming::Synced);
            }
            (None, ServerEvent::Error { message, .. }) => {
                // An error about no request: the server is closing the connection.
                break Some(message);
            }
            (None, _) => {}
        }
    };
    // Wake every waiter (their requests get no reply on this connection) and refuse new ones.
    pending.lock().take();
    let _ = events.send(Incoming::Closed(why));
}

/// Drops messages already seen, by server id (delivery is at-least-once on the wire).
#[derive(Debug, Default)]
pub struct Dedup {
    seen: HashSet<i64>,
}

impl Dedup {
    /// True the first time an id is offered.
    pub fn first_time(&mut self, id: i64) -> bool {
        self.seen.insert(id)
    }
}

/// How long a client keeps trying to reach another server after losing one.
pub const FAILOVER_LIMIT: Duration = Duration::from_secs(30);

/// How many other servers a login tries when the one it was given is full.
const FULL_RETRIES: usize = 3;

/// What [`Client::next`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A message seen for the first time (acknowledge it with [`Client::ack`] once shown).
    Message(Envelope),
    /// The queue held at (re)connection has been delivered.
    Synced,
    /// The server was lost; the client is now on this one.
    Failover(ServerInfo),
}

struct Current {
    generation: u64,
    conn: Arc<Connection>,
    server: ServerInfo,
}

/// A chat client that survives the loss of its server: it goes back to the balancer with its
/// session token, gets another server, re-sends what was not confirmed (same client id, so
/// nothing is stored twice) and drops messages it has already seen.
///
/// Safe to share between threads (for example one reading input and sending, one printing).
pub struct Client {
    balancer: String,
    user: String,
    token: String,
    current: Mutex<Current>,
    /// Held while failing over, so two threads noticing the same failure reconnect once.
    failing_over: Mutex<()>,
    dedup: Mutex<Dedup>,
    /// Set by [`Client::logout`]: a closed connection is then the end, not a failure.
    logged_out: AtomicBool,
}

impl Client {
    /// Logs in and connects to the assigned server. Also returns the balancer connection, which
    /// the caller may keep for directory lookups.
    pub fn login(balancer: &str, user: &str, password: &str) -> Result<(Client, BalancerClient)> {
        let mut b = BalancerClient::connect(balancer)?;
        let mut session = b.login(user, password)?;
        // A server that died moments ago may still be assigned (it leaves the rotation within
        // two seconds): ask again, avoiding it, until one answers.
        // A full server refuses politely: try a few others before giving up.
        let deadline = std::time::Instant::now() + FAILOVER_LIMIT;
        let mut full = 0;
        let conn = loop {
            match Connection::open(&session) {
                Ok(conn) => break conn,
                Err(e) if e.is_disconnect() && std::time::Instant::now() < deadline => {
                    log::info!(
                        "server {} unreachable ({e}); asking for another",
                        session.server.id
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(Error::Refused {
                    code: crate::net::ErrorCode::Unavailable,
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
            session = b.resume(&session.token, Some(session.server.id))?;
        };
        let client = Client {
            balancer: balancer.to_string(),
            user: conn.user.clone(),
            token: session.token,
            current: Mutex::new(Current {
                generation: 0,
                conn: Arc::new(conn),
                server: session.server,
            }),
            failing_over: Mutex::new(()),
            dedup: Mutex::new(Dedup::default()),
            logged_out: AtomicBool::new(false),
        };
        Ok((client, b))
    }

    /// The user, as the server knows it.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// Ends the session: tells the balancer to refuse the token, then closes the connection
    /// (without failing over).
    pub fn logout(&self) -> Result<()> {
        self.logged_out.store(true, Ordering::SeqCst);
        let told = BalancerClient::connect(&self.balancer).and_then(|mut b| b.logout(&self.token));
        self.conn().1.close();
        told
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
        let deadline = std::time::Instant::now() + FAILOVER_LIMIT;
        let mut last: Error;
        loop {
            let attempt = BalancerClient::connect(&self.balancer)
                .and_then(|mut b| b.resume(&self.token, Some(avoid)))
                .and_then(|session| Ok((Connection::open(&session)?, session)));
            match attempt {
                Ok((conn, session)) => {
                    log::info!(
                        "{}: server {avoid} lost; now on server {}",
                        self.user,
                        conn.server_id
                    );
                    let mut c = self.current.lock();
                    c.generation += 1;
                    // Closing the old connection wakes any thread still reading its events.
                    c.conn.close();
                    c.conn = Arc::new(conn);
                    c.server = session.server.clone();
                    return Ok(Some(session.server));
                }
                Err(
                    e @ Error::Refused {
                        code: crate::net::ErrorCode::InvalidToken,
                        ..
                    },
                ) => return Err(e),
                Err(e) => last = e,
            }
            if std::time::Instant::now() >= deadline {
                return Err(last);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `f` on the current connection; on a lost connection, fails over and runs it again.
    fn with_failover<T>(&self, mut f: impl FnMut(&Connection) -> Result<T>) -> Result<T> {
        let deadline = std::time::Instant::now() + FAILOVER_LIMIT;
        loop {
            let (generation, conn) = self.conn();
            match f(&conn) {
                Err(e) if e.is_disconnect() && std::time::Instant::now() < deadline => {
                    self.failover(generation)?;
                }
                other => return other,
            }
        }
    }

    /// Sends and waits until stored; re-sent on another server if this one is lost meanwhile.
    pub fn send(&self, to: &str, client_id: u64, body: &[u8]) -> Result<i64> {
        self.send_with(to, client_id, body, None)
    }

    /// Like [`Client::send`], offering a finished upload.
    pub fn send_with(
        &self,
        to: &str,
        client_id: u64,
        body: &[u8],
        file: Option<i64>,
    ) -> Result<i64> {
        let reply = self.store(|id, resend_after| ServerRequest::Send {
            id,
            to: to.into(),
            client_id,
            body: body.to_vec(),
            file,
            resend_after,
        })?;
        match reply {
            ServerEvent::Stored { msg_id, .. } => Ok(msg_id),
            other => Err(unexpected("Send", &other)),
        }
    }

    /// Sends a request that stores a message (`build` gets the request id and
    /// `resend_after`), failing over like [`Client::call`]. The first attempt says it is one;
    /// an attempt after a lost connection names the newest id known before the first, so the
    /// server finds the original if it was stored, even if it was delivered since.
    pub fn store(&self, build: impl Fn(u64, Option<i64>) -> ServerRequest) -> Result<ServerEvent> {
        let mut first: Option<i64> = None;
        self.with_failover(|conn| match first {
            None => {
                first = Some(conn.newest());
                conn.call(|id| build(id, None))
            }
            Some(after) => conn.call(|id| build(id, Some(after))),
        })
    }

    /// Sends any request and waits for its reply, failing over like [`Client::send`].
    pub fn call(&self, build: impl Fn(u64) -> ServerRequest) -> Result<ServerEvent> {
        self.with_failover(|conn| conn.call(&build))
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

    /// The next event, waiting at most until `deadline`; `None` when it passes. Messages
    /// already seen are acknowledged again and not returned.
    pub fn next(&self, deadline: std::time::Instant) -> Result<Option<Event>> {
        loop {
            let (generation, conn) = self.conn();
            match conn.events().recv_deadline(deadline) {
                Ok(Incoming::Message(msg)) => {
                    if self.dedup.lock().first_time(msg.id) {
                        return Ok(Some(Event::Message(msg)));
                    }
                    let _ = conn.request(|id| ServerRequest::Ack {
                        id,
                        msg_ids: vec![msg.id],
                    });
                }
                Ok(Incoming::Synced) => return Ok(Some(Event::Synced)),
                Ok(Incoming::Closed(why)) => {
                    log::debug!("connection closed: {why:?}");
                    if let Some(server) = self.failover(generation)? {
                        return Ok(Some(Event::Failover(server)));
                    }
                }
                Err(_) => return Ok(None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_passes_each_id_once() {
        let mut d = Dedup::default();
        assert!(d.first_time(1));
        assert!(d.first_time(2));
        assert!(!d.first_time(1));
    }

    #[test]
    fn unreachable_is_a_clear_error() {
        // Bind then drop, so the port is very likely closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = dial(&format!("127.0.0.1:{port}"), "balancer").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot reach balancer at 127.0.0.1:"),
            "{err}"
        );
        assert_eq!(err.exit_code(), 3);
    }
}
