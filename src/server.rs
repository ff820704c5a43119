//! The chat server: authenticated client connections, store-and-forward, the peer mesh.
//!
//! Threads of one server:
//!
//! ```text
//!  accept loop (caller of run) ──spawns──▶ per connection: reader thread ──▶ writer thread
//!                                              │   (requests)        Outbound   (socket writes)
//!                                              ▼                        ▲
//!                                         db-writer thread ── after commit: Stored reply,
//!                                          (group commit)     route to local Router or Peers
//!  balancer link thread: register, heartbeat every 500 ms, peer list ──▶ Peers (one thread
//!                                                                         per outbound link)
//! ```
//!
//! Delivery is "store, then route; register, then sync". A message is committed together with
//! a read of where its recipient is connected (the presence table); a login commits its presence
//! row before reading its queue. Whichever of the two commits second sees the other, so a
//! message is never missed by both the live path and the sync. A message seen by both is sent
//! once: live messages that reach a connection before its sync are dropped (the sync reads them
//! from the database), and those the sync already sent are skipped by id.

use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::crypto;
use crate::db::{self, Readers, Writer};
use crate::error::{Error, Result};
use crate::names;
use crate::net::{
    BalancerReply, BalancerRequest, Envelope, ErrorCode, FrameReader, FrameWriter, ServerEvent,
    ServerInfo, ServerRequest, MAX_BODY,
};
use crate::peers::{Peers, Relayed};
use crate::router::{Handle, Outbound, Router};

/// Chat server settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The shared SQLite file.
    pub db: PathBuf,
    /// The balancer to register with.
    pub balancer: String,
    /// The address to register (default: the listener's address, with 127.0.0.1 for 0.0.0.0).
    pub advertise: Option<String>,
    /// Most client connections at once; more are refused with an `Unavailable` error.
    pub max_clients: usize,
    /// Per-connection outbound queue length; a client that lets it fill is disconnected.
    pub queue_len: usize,
    /// A connection must send `Hello` within this time.
    pub hello_timeout: Duration,
    /// How long to keep trying the balancer at start before giving up.
    pub startup_timeout: Duration,
}

impl Config {
    /// Defaults for everything but the database and balancer.
    pub fn new(db: PathBuf, balancer: String) -> Config {
        Config {
            db,
            balancer,
            advertise: None,
            max_clients: 10_000,
            queue_len: 4096,
            hello_timeout: Duration::from_secs(10),
            startup_timeout: Duration::from_secs(10),
        }
    }
}

/// How often the load is reported to the balancer.
pub const HEARTBEAT: Duration = Duration::from_millis(500);

/// Messages read from the database per page during a sync.
const SYNC_PAGE: usize = 256;

struct Shared {
    config: Config,
    server_id: u64,
    writer: Writer,
    readers: Readers,
    router: Router,
    peers: Peers,
    next_conn: AtomicU64,
    clients: AtomicU32,
    stopping: Arc<AtomicBool>,
    /// Disconnects (its sender is dropped) when the server stops: wakes timed waits at once.
    stop_signal: Receiver<()>,
    /// Sockets of inbound peer links, so shutdown can close them (clients are in the router).
    peer_sockets: parking_lot::Mutex<Vec<(u64, TcpStream)>>,
}

/// Serves on `listener` until a message arrives on `shutdown` (or it is dropped). Registers
/// with the balancer first; returns an error if the balancer cannot be reached in time.
///
/// `on_ready` is called once registration succeeded, with the server id and the address it
/// listens on (clients are given the advertised address, which is the same unless configured).
pub fn run(
    listener: TcpListener,
    config: Config,
    shutdown: Receiver<()>,
    on_ready: impl FnOnce(u64, SocketAddr),
) -> Result<()> {
    db::open(&config.db)?;
    let local = listener.local_addr()?;
    let advertise = config.advertise.clone().unwrap_or_else(|| {
        let ip = if local.ip().is_unspecified() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            local.ip()
        };
        SocketAddr::new(ip, local.port()).to_string()
    });
    let secret = crypto::random_bytes(32)?;
    let writer = Writer::start(&config.db)?;
    let link = BalancerLink::connect(&config, &advertise, &secret)?;
    let server_id = link.server_id;
    writer.call(move |c| db::clear_presence(c, server_id))?;
    let stopping = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_signal) = bounded::<()>(0);
    let shared = Arc::new(Shared {
        stop_signal,
        peer_sockets: parking_lot::Mutex::new(Vec::new()),
        readers: Readers::new(&config.db),
        router: Router::default(),
        peers: Peers::new(server_id, secret, Arc::clone(&stopping)),
        next_conn: AtomicU64::new(1),
        clients: AtomicU32::new(0),
        stopping: Arc::clone(&stopping),
        writer,
        server_id,
        config,
    });
    log::info!("server {server_id} listening on {local}, advertised as {advertise}");
    on_ready(server_id, local);

    let heartbeat = {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("balancer-link".into())
            .spawn(move || link.run(&shared))?
    };
    let waker = crate::balancer::stop_on_signal(shutdown, Arc::clone(&stopping), local)?;
    // Every connection thread holds a clone; when all are gone, the receiver disconnects.
    let (alive_tx, alive_rx) = bounded::<()>(0);
    for stream in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            break;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                log::warn!("accept failed: {e}");
                continue;
            }
        };
        let shared = Arc::clone(&shared);
        let alive = alive_tx.clone();
        let spawned = std::thread::Builder::new()
            .name("conn-reader".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                let peer = stream.peer_addr().ok();
                if let Err(e) = serve(stream, &shared) {
                    log::debug!("connection {peer:?} ended: {e}");
                }
                drop(alive);
            });
        if let Err(e) = spawned {
            log::error!("cannot start a connection thread: {e}");
        }
    }

    // Graceful stop: no new connections; close the clients; let their threads finish; commit.
    log::info!("server {server_id} stopping");
    drop(alive_tx);
    drop(stop_tx);
    shared.router.close_all();
    for (_, socket) in shared.peer_sockets.lock().drain(..) {
        let _ = socket.shutdown(Shutdown::Both);
    }
    let _ = alive_rx.recv_timeout(Duration::from_millis(1500));
    shared.peers.close();
    let _ = heartbeat.join();
    let _ = waker.join();
    shared
        .writer
        .call(move |c| db::clear_presence(c, server_id))?;
    log::info!("server {server_id} stopped");
    Ok(())
}

/// One accepted connection: a client (after `Hello`) or a peer server (after `PeerHello`).
fn serve(stream: TcpStream, shared: &Arc<Shared>) -> Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(shared.config.hello_timeout))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = FrameReader::new(stream.try_clone()?);
    let first = match reader.read::<ServerRequest>() {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(()),
        Err(e) => {
            refuse_frame(&stream, &e);
            return Err(e);
        }
    };
    match first {
        ServerRequest::Hello { id, token } => {
            let hash = crypto::token_hash(token.as_bytes())?;
            match shared.readers.with(|c| db::session_user(c, &hash))? {
                Some(user) => serve_client(stream, reader, shared, id, user),
                None => {
                    reply_once(
                        &stream,
                        Some(id),
                        ErrorCode::InvalidToken,
                        "invalid or expired session; log in again",
                    );
                    Ok(())
                }
            }
        }
        ServerRequest::PeerHello { server_id, secret } => {
            let expected = shared
                .readers
                .with(|c| db::server_secret_hash(c, server_id))?;
            let given = crypto::token_hash(&secret)?;
            match expected {
                Some(h) if openssl::memcmp::eq(&h, &given) => {
                    let id = shared.next_conn.fetch_add(1, Ordering::SeqCst);
                    shared.peer_sockets.lock().push((id, stream.try_clone()?));
                    let result = serve_peer(reader, shared, server_id);
                    shared.peer_sockets.lock().retain(|(i, _)| *i != id);
                    result
                }
                _ => {
                    reply_once(&stream, None, ErrorCode::InvalidToken, "unknown peer");
                    Ok(())
                }
            }
        }
        _ => {
            reply_once(
                &stream,
                None,
                ErrorCode::BadRequest,
                "the first frame must be Hello",
            );
            Ok(())
        }
    }
}

/// Writes one error frame and closes the socket (for connections refused before they start).
fn reply_once(stream: &TcpStream, id: Option<u64>, code: ErrorCode, message: &str) {
    if let Ok(s) = stream.try_clone() {
        let _ = FrameWriter::new(s).send(&ServerEvent::Error {
            id,
            code,
            message: message.to_string(),
        });
    }
    let _ = stream.shutdown(Shutdown::Both);
}

/// Answers a frame that was too large or did not decode, then closes.
fn refuse_frame(stream: &TcpStream, e: &Error) {
    if matches!(e, Error::Malformed(_) | Error::FrameTooLarge(_)) {
        reply_once(stream, None, ErrorCode::BadFrame, &e.to_string());
    }
}

/// A peer's link: relayed messages for users connected here.
fn serve_peer(mut reader: FrameReader<TcpStream>, shared: &Arc<Shared>, peer: u64) -> Result<()> {
    reader.get_ref().set_read_timeout(None)?;
    log::debug!("peer {peer} linked in");
    // However the link ends, messages the peer committed but had not yet relayed may exist:
    // every local connection re-reads its queue.
    struct ResyncOnEnd<'a>(&'a Router, u64);
    impl Drop for ResyncOnEnd<'_> {
        fn drop(&mut self) {
            log::info!("link from peer {} ended; re-syncing local clients", self.1);
            self.0.resync_all();
        }
    }
    let _resync = ResyncOnEnd(&shared.router, peer);
    loop {
        match reader.read::<ServerRequest>() {
            Ok(Some(ServerRequest::Relay { msg, users })) => {
                shared.router.deliver(&users, &Arc::new(msg));
            }
            Ok(Some(_)) => {
                reply_once(
                    reader.get_ref(),
                    None,
                    ErrorCode::BadRequest,
                    "peer links carry Relay frames only",
                );
                return Ok(());
            }
            Ok(None) => return Ok(()),
            Err(e) => {
                refuse_frame(reader.get_ref(), &e);
                return Err(e);
            }
        }
    }
}

/// Releases what a client connection holds, however its thread ends.
struct ClientGuard<'a> {
    shared: &'a Arc<Shared>,
    user: String,
    conn_id: u64,
    stream: Arc<TcpStream>,
}

impl Drop for ClientGuard<'_> {
    fn drop(&mut self) {
        self.shared.router.remove(&self.user, self.conn_id);
        self.shared.clients.fetch_sub(1, Ordering::SeqCst);
        let _ = self.stream.shutdown(Shutdown::Both);
        let (sid, cid) = (self.shared.server_id, self.conn_id);
        self.shared
            .writer
            .submit(move |c| db::remove_presence(c, sid, cid), |_| {});
        log::debug!("{} disconnected (connection {cid})", self.user);
    }
}

fn serve_client(
    stream: TcpStream,
    mut reader: FrameReader<TcpStream>,
    shared: &Arc<Shared>,
    hello_id: u64,
    user: String,
) -> Result<()> {
    let count = shared.clients.fetch_add(1, Ordering::SeqCst) as usize + 1;
    if count > shared.config.max_clients {
        shared.clients.fetch_sub(1, Ordering::SeqCst);
        reply_once(
            &stream,
            Some(hello_id),
            ErrorCode::Unavailable,
            "server is full; ask the balancer for another",
        );
        return Ok(());
    }
    stream.set_read_timeout(None)?;
    let stream = Arc::new(stream);
    let conn_id = shared.next_conn.fetch_add(1, Ordering::SeqCst);
    let (tx, rx) = bounded::<Outbound>(shared.config.queue_len);
    let handle = Handle {
        conn_id,
        tx: tx.clone(),
        stream: Arc::clone(&stream),
    };
    let writer_thread = {
        let out = stream.try_clone()?;
        let socket = Arc::clone(&stream);
        let shared = Arc::clone(shared);
        let user = user.clone();
        std::thread::Builder::new()
            .name("conn-writer".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                if let Err(e) = write_loop(out, &rx, &shared, &user) {
                    log::debug!("writer for {user} ended: {e}");
                    // A writer that cannot write ends the connection, so the reader stops too.
                    let _ = socket.shutdown(Shutdown::Both);
                }
            })?
    };
    let guard = ClientGuard {
        shared,
        user: user.clone(),
        conn_id,
        stream: Arc::clone(&stream),
    };
    // Register, then sync: see the module documentation.
    shared.router.add(&user, handle);
    let (sid, u) = (shared.server_id, user.clone());
    shared
        .writer
        .call(move |c| db::add_presence(c, sid, conn_id, &u))?;
    let _ = tx.send(Outbound::Event(ServerEvent::Welcome {
        id: hello_id,
        user: user.clone(),
        server_id: shared.server_id,
    }));
    let _ = tx.send(Outbound::Sync);
    log::debug!("{user} connected (connection {conn_id})");

    let result = read_loop(&mut reader, shared, &user, &tx);
    drop(guard);
    drop(tx);
    let _ = writer_thread.join();
    result
}

fn read_loop(
    reader: &mut FrameReader<TcpStream>,
    shared: &Arc<Shared>,
    user: &str,
    tx: &Sender<Outbound>,
) -> Result<()> {
    loop {
        let request = match reader.read::<ServerRequest>() {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(e @ (Error::Malformed(_) | Error::FrameTooLarge(_))) => {
                let _ = tx.send(Outbound::Event(ServerEvent::Error {
                    id: None,
                    code: ErrorCode::BadFrame,
                    message: e.to_string(),
                }));
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        match request {
            ServerRequest::Send {
                id,
                to,
                client_id,
                body,
            } => send(shared, user, tx, id, to, client_id, body),
            ServerRequest::Ack { id, msg_ids } => ack(shared, user, tx, id, msg_ids),
            ServerRequest::GroupCreate { id, group, key } => {
                let me = user.to_string();
                if names_ok(tx, id, &[&group]) {
                    write(shared, tx, id, move |c| {
                        db::create_group(c, &group, &me, &key).map(|()| ServerEvent::Done { id })
                    });
                }
            }
            ServerRequest::GroupAdd {
                id,
                group,
                user: who,
                epoch,
                key,
            } => {
                let me = user.to_string();
                if names_ok(tx, id, &[&group, &who]) {
                    write(shared, tx, id, move |c| {
                        db::add_member(c, &group, &me, &who, epoch, &key)
                            .map(|()| ServerEvent::Done { id })
                    });
                }
            }
            ServerRequest::GroupRemove {
                id,
                group,
                user: who,
                epoch,
                keys,
            } => {
                let me = user.to_string();
                if names_ok(tx, id, &[&group, &who]) {
                    write(shared, tx, id, move |c| {
                        db::remove_member(c, &group, &me, &who, epoch, &keys)
                            .map(|()| ServerEvent::Done { id })
                    });
                }
            }
            ServerRequest::GroupLeave { id, group } => {
                let me = user.to_string();
                if names_ok(tx, id, &[&group]) {
                    write(shared, tx, id, move |c| {
                        db::leave_group(c, &group, &me).map(|_| ServerEvent::Done { id })
                    });
                }
            }
            ServerRequest::GroupRekey {
                id,
                group,
                epoch,
                keys,
            } => {
                let me = user.to_string();
                if names_ok(tx, id, &[&group]) {
                    write(shared, tx, id, move |c| {
                        db::rekey_group(c, &group, &me, epoch, &keys)
                            .map(|()| ServerEvent::Done { id })
                    });
                }
            }
            ServerRequest::GroupSend {
                id,
                group,
                client_id,
                epoch,
                body,
            } => group_send(shared, user, tx, id, group, client_id, epoch, body),
            ServerRequest::GroupList { id } => read(shared, tx, id, |c| {
                Ok(ServerEvent::Groups {
                    id,
                    groups: db::user_groups(c, user)?,
                })
            }),
            ServerRequest::GroupInfo { id, group } => read(shared, tx, id, |c| {
                names::validate("group", &group)?;
                Ok(ServerEvent::Group {
                    id,
                    group: db::group_info(c, &group, user)?,
                })
            }),
            ServerRequest::GroupKey { id, group, epoch } => read(shared, tx, id, |c| {
                names::validate("group", &group)?;
                let (key, wrapped_by) = db::group_key(c, &group, user, epoch)?;
                Ok(ServerEvent::GroupKey {
                    id,
                    wrapped_by,
                    key,
                })
            }),
            ServerRequest::Hello { id, .. } => {
                refuse(tx, id, ErrorCode::BadRequest, "already said hello");
            }
            ServerRequest::PeerHello { .. } | ServerRequest::Relay { .. } => {
                let _ = tx.send(Outbound::Event(ServerEvent::Error {
                    id: None,
                    code: ErrorCode::BadRequest,
                    message: "peer frames are not accepted on a client connection".into(),
                }));
                return Err(Error::Protocol("peer frame from a client".into()));
            }
        }
    }
}

fn refuse(tx: &Sender<Outbound>, id: u64, code: ErrorCode, message: impl Into<String>) {
    let _ = tx.send(Outbound::Event(ServerEvent::Error {
        id: Some(id),
        code,
        message: message.into(),
    }));
}

/// Answers a read-only request from the connection's own thread.
fn read(
    shared: &Shared,
    tx: &Sender<Outbound>,
    id: u64,
    work: impl FnOnce(&rusqlite::Connection) -> Result<ServerEvent>,
) {
    let event = shared
        .readers
        .with(work)
        .unwrap_or_else(|e| error_event(id, e));
    let _ = tx.send(Outbound::Event(event));
}

/// Checks `names` (a group, then users); refuses the request and returns `false` if one is bad.
fn names_ok(tx: &Sender<Outbound>, id: u64, names: &[&str]) -> bool {
    for (i, name) in names.iter().enumerate() {
        let kind = if i == 0 { "group" } else { "user" };
        if let Err(e) = names::validate(kind, name) {
            refuse(tx, id, ErrorCode::InvalidName, e.to_string());
            return false;
        }
    }
    true
}

/// Runs `work` on the writer thread and sends its reply after the commit.
fn write(
    shared: &Shared,
    tx: &Sender<Outbound>,
    id: u64,
    work: impl FnOnce(&rusqlite::Connection) -> Result<ServerEvent> + Send + 'static,
) {
    let reply = tx.clone();
    shared.writer.submit(work, move |res| {
        let event = res.unwrap_or_else(|e| error_event(id, e));
        let _ = reply.try_send(Outbound::Event(event));
    });
}

/// Most message ids in one `Ack`.
const MAX_ACK: usize = 4096;

fn send(
    shared: &Arc<Shared>,
    user: &str,
    tx: &Sender<Outbound>,
    id: u64,
    to: String,
    client_id: u64,
    body: Vec<u8>,
) {
    if let Err(e) = names::validate("recipient", &to) {
        return refuse(tx, id, ErrorCode::InvalidName, e.to_string());
    }
    if let Err(why) = check_body(&body) {
        return refuse(tx, id, ErrorCode::BadMessage, why);
    }
    let from = user.to_string();
    let reply = tx.clone();
    let routes = Arc::clone(shared);
    shared.writer.submit(
        move |c| {
            if !db::user_exists(c, &to)? {
                return Err(Error::refused(
                    ErrorCode::UnknownUser,
                    format!("no such user: {to}"),
                ));
            }
            db::store_message(c, &from, &to, client_id, &body)
        },
        move |res| stored_reply(&routes, &reply, id, res),
    );
}

#[allow(clippy::too_many_arguments)]
fn group_send(
    shared: &Arc<Shared>,
    user: &str,
    tx: &Sender<Outbound>,
    id: u64,
    group: String,
    client_id: u64,
    epoch: u64,
    body: Vec<u8>,
) {
    if let Err(e) = names::validate("group", &group) {
        return refuse(tx, id, ErrorCode::InvalidName, e.to_string());
    }
    if let Err(why) = check_body(&body) {
        return refuse(tx, id, ErrorCode::BadMessage, why);
    }
    let from = user.to_string();
    let reply = tx.clone();
    let routes = Arc::clone(shared);
    shared.writer.submit(
        move |c| db::store_group_message(c, &group, &from, client_id, epoch, &body),
        move |res| stored_reply(&routes, &reply, id, res),
    );
}

/// After a message's commit: route it, and tell the sender (or tell why it failed). Runs on the
/// writer thread, so it never blocks on a client.
fn stored_reply(
    shared: &Shared,
    reply: &Sender<Outbound>,
    id: u64,
    res: Result<db::StoredMessage>,
) {
    let event = match res {
        Ok(stored) => {
            let msg_id = stored.envelope.id;
            route(shared, stored);
            ServerEvent::Stored { id, msg_id }
        }
        Err(e) => error_event(id, e),
    };
    if let Err(crossbeam_channel::TrySendError::Full(_)) = reply.try_send(Outbound::Event(event)) {
        log::warn!("reply queue full; the client will retry on reconnect");
    }
}

/// Why a message body is unacceptable, if it is.
fn check_body(body: &[u8]) -> std::result::Result<(), String> {
    if body.is_empty() {
        return Err("empty message".into());
    }
    if body.len() > MAX_BODY {
        return Err(format!(
            "message of {} bytes is over the limit of {MAX_BODY}",
            body.len()
        ));
    }
    Ok(())
}

/// Hands a committed message to every server where a recipient is connected: local users
/// through the router, others through one relay per server.
fn route(shared: &Shared, stored: db::StoredMessage) {
    let msg = Arc::new(stored.envelope);
    let mut online = stored.online_at.into_iter().peekable();
    while let Some((server, first)) = online.next() {
        let mut users = vec![first];
        while let Some((_, user)) = online.next_if(|(s, _)| *s == server) {
            users.push(user);
        }
        if server == shared.server_id {
            shared.router.deliver(&users, &msg);
            continue;
        }
        let item = Arc::new(Relayed {
            msg: Arc::clone(&msg),
            users,
        });
        if !shared.peers.relay(server, &item) && !shared.peers.has_link(server) {
            // A server that registered since our last heartbeat: link to it now rather than
            // leave the message until its recipients' next login.
            match shared.readers.with(|c| db::server_addr(c, server)) {
                Ok(Some(addr)) => {
                    shared.peers.ensure(server, &addr);
                    shared.peers.relay(server, &item);
                }
                Ok(None) => log::debug!("server {server} is gone; message {} waits", msg.id),
                Err(e) => log::warn!("cannot look up server {server}: {e}"),
            }
        }
    }
}

fn error_event(id: u64, e: Error) -> ServerEvent {
    let (code, message) = match e {
        Error::Refused { code, message } => (code, message),
        Error::InvalidName(message) => (ErrorCode::InvalidName, message),
        e => {
            log::error!("request {id} failed: {e}");
            (
                ErrorCode::Internal,
                "internal error; the request had no effect".to_string(),
            )
        }
    };
    ServerEvent::Error {
        id: Some(id),
        code,
        message,
    }
}

fn ack(shared: &Arc<Shared>, user: &str, tx: &Sender<Outbound>, id: u64, msg_ids: Vec<i64>) {
    if msg_ids.len() > MAX_ACK {
        return refuse(
            tx,
            id,
            ErrorCode::BadRequest,
            format!("at most {MAX_ACK} ids per acknowledgement"),
        );
    }
    let user = user.to_string();
    let reply = tx.clone();
    shared.writer.submit(
        move |c| db::ack(c, &user, &msg_ids),
        move |res| {
            let event = match res {
                Ok(_) => ServerEvent::Acked { id },
                Err(e) => error_event(id, e),
            };
            let _ = reply.try_send(Outbound::Event(event));
        },
    );
}

/// The connection's writer thread: drains its outbound queue onto the socket, flushing when the
/// queue runs dry so bursts go out in few system calls.
fn write_loop(
    stream: TcpStream,
    rx: &Receiver<Outbound>,
    shared: &Shared,
    user: &str,
) -> Result<()> {
    let mut w = FrameWriter::new(stream);
    // Highest message id sent by the sync; `None` until the sync has run.
    let mut synced_to: Option<i64> = None;
    while let Ok(first) = rx.recv() {
        let mut item = Some(first);
        while let Some(next) = item.take() {
            match next {
                Outbound::Event(e) => w.write(&e)?,
                Outbound::Message(msg) => match synced_to {
                    Some(upto) if msg.id > upto => w.write(&ServerEvent::Deliver {
                        msg: Envelope::clone(&msg),
                    })?,
                    _ => {}
                },
                Outbound::Sync => synced_to = Some(sync(&mut w, shared, user, 0)?),
                Outbound::Resync => {
                    if let Some(upto) = synced_to {
                        synced_to = Some(upto.max(sync(&mut w, shared, user, 0)?));
                    }
                }
            }
            item = rx.try_recv().ok();
        }
        w.flush()?;
    }
    Ok(())
}

/// Sends every queued message for `user` with an id above `after`, oldest first, then
/// `Synced`. Returns the highest id sent (`after` when there was none).
fn sync(
    w: &mut FrameWriter<TcpStream>,
    shared: &Shared,
    user: &str,
    mut after: i64,
) -> Result<i64> {
    loop {
        let page = shared
            .readers
            .with(|c| db::queued(c, user, after, SYNC_PAGE))?;
        let last_page = page.len() < SYNC_PAGE;
        for msg in page {
            after = msg.id;
            w.write(&ServerEvent::Deliver { msg })?;
        }
        if last_page {
            break;
        }
        w.flush()?;
    }
    w.write(&ServerEvent::Synced)?;
    // Ids follow commit order, so every message for this user with an id up to `after` was in
    // the pages read above; live messages with higher ids are new.
    Ok(after)
}

/// The server's link to the balancer: registration, then a heartbeat every [`HEARTBEAT`] whose
/// reply is the peer list. Reconnects and re-registers (same id) if the balancer restarts.
struct BalancerLink {
    addr: String,
    advertise: String,
    secret: Vec<u8>,
    server_id: u64,
    conn: Option<(FrameReader<TcpStream>, FrameWriter<TcpStream>)>,
}

impl BalancerLink {
    /// Registers, retrying until `startup_timeout`.
    fn connect(config: &Config, advertise: &str, secret: &[u8]) -> Result<BalancerLink> {
        let mut link = BalancerLink {
            addr: config.balancer.clone(),
            advertise: advertise.to_string(),
            secret: secret.to_vec(),
            server_id: 0,
            conn: None,
        };
        let deadline = std::time::Instant::now() + config.startup_timeout;
        loop {
            match link.register(None) {
                Ok(()) => return Ok(link),
                Err(e @ Error::Refused { .. }) => return Err(e),
                Err(e) if std::time::Instant::now() >= deadline => return Err(e),
                Err(e) => {
                    log::warn!("balancer {} not reachable yet: {e}", link.addr);
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    fn register(&mut self, known: Option<u64>) -> Result<()> {
        self.conn = None;
        let stream = crate::client::dial(&self.addr, "balancer")?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut r = FrameReader::new(stream.try_clone()?);
        let mut w = FrameWriter::new(stream);
        w.send(&BalancerRequest::Register {
            id: 1,
            addr: self.advertise.clone(),
            server_id: known,
            secret: self.secret.clone(),
        })?;
        match r.read::<BalancerReply>()? {
            Some(BalancerReply::Registered { server_id, .. }) => {
                self.server_id = server_id;
                self.conn = Some((r, w));
                Ok(())
            }
            Some(BalancerReply::Error { code, message, .. }) => {
                Err(Error::Refused { code, message })
            }
            other => Err(Error::Protocol(format!(
                "unexpected reply to Register: {other:?}"
            ))),
        }
    }

    fn heartbeat(&mut self, load: u32) -> Result<Vec<ServerInfo>> {
        let (r, w) = self
            .conn
            .as_mut()
            .ok_or_else(|| Error::Protocol("not registered".into()))?;
        w.send(&BalancerRequest::Heartbeat { id: 2, load })?;
        match r.read::<BalancerReply>()? {
            Some(BalancerReply::Peers { peers, .. }) => Ok(peers),
            Some(BalancerReply::Error { code, message, .. }) => {
                Err(Error::Refused { code, message })
            }
            other => Err(Error::Protocol(format!(
                "unexpected reply to Heartbeat: {other:?}"
            ))),
        }
    }

    /// Heartbeats until the server stops.
    fn run(mut self, shared: &Shared) {
        let mut lost = false;
        while !shared.stopping.load(Ordering::SeqCst) {
            if self.conn.is_none() {
                match self.register(Some(shared.server_id)) {
                    Ok(()) if self.server_id == shared.server_id => {
                        log::info!(
                            "re-registered with the balancer as server {}",
                            self.server_id
                        );
                        lost = false;
                    }
                    Ok(()) => {
                        log::error!("balancer gave a new id; this server keeps its old one");
                        self.server_id = shared.server_id;
                    }
                    Err(e) => {
                        if !lost {
                            log::warn!("balancer {} unreachable: {e}; retrying", self.addr);
                            lost = true;
                        }
                        self.conn = None;
                    }
                }
            }
            if self.conn.is_some() {
                let load = shared.clients.load(Ordering::SeqCst);
                match self.heartbeat(load) {
                    Ok(peers) => shared.peers.update(&peers),
                    Err(e) => {
                        log::warn!("heartbeat failed: {e}");
                        self.conn = None;
                        continue;
                    }
                }
            }
            // Sleep one period, or less if the server stops meanwhile.
            let _ = shared.stop_signal.recv_timeout(HEARTBEAT);
        }
    }
}
