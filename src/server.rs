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
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver};

use crate::crypto;
use crate::db::{self, Readers, Writer};
use crate::error::{Error, Result};
use crate::net::{
    BalancerReply, BalancerRequest, ErrorCode, FrameReader, FrameWriter, ServerEvent, ServerInfo,
    ServerRequest, DEFAULT_MAX_FILE,
};
use crate::peers::Peers;
use crate::router::Router;
use crate::session;

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
    /// The largest file accepted, in bytes.
    pub max_file: u64,
    /// Requests per second one connection may make (in bursts of as many); a faster client is
    /// slowed down, not refused. 0: no limit.
    pub max_rate: u32,
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
            max_file: DEFAULT_MAX_FILE,
            max_rate: 10_000,
            startup_timeout: Duration::from_secs(10),
        }
    }
}

/// How often the load is reported to the balancer.
pub const HEARTBEAT: Duration = Duration::from_millis(500);

/// What every thread of one server shares.
pub(crate) struct Shared {
    /// The settings it was started with.
    pub(crate) config: Config,
    /// The id the balancer gave it.
    pub(crate) server_id: u64,
    /// The database writer thread (group commit).
    pub(crate) writer: Writer,
    /// Read connections.
    pub(crate) readers: Readers,
    /// Local users to their connections' outbound queues.
    pub(crate) router: Router,
    /// Outbound links to the other servers.
    pub(crate) peers: Peers,
    /// Next connection id (clients and inbound peer links).
    pub(crate) next_conn: AtomicU64,
    /// Connected clients (the load reported to the balancer).
    pub(crate) clients: AtomicU32,
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
    let cluster_key = db::cluster_key(&db::open(&config.db)?)?;
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
    let link = BalancerLink::connect(&config, &advertise, &secret, cluster_key)?;
    let server_id = link.server_id;
    writer.call(move |c| {
        db::clear_presence(c, server_id)?;
        db::drop_uploads(c, server_id, None)
    })?;
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
    shared.writer.call(move |c| {
        db::clear_presence(c, server_id)?;
        db::drop_uploads(c, server_id, None)
    })?;
    log::info!("server {server_id} stopped");
    Ok(())
}

/// One accepted connection: a client (after `Hello`) or a peer server (after `PeerHello`).
fn serve(stream: TcpStream, shared: &Arc<Shared>) -> Result<()> {
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    // The first frame must come whole within the hello timeout, and be small.
    let mut reader = FrameReader::new(stream.try_clone()?);
    let deadline = Instant::now() + shared.config.hello_timeout;
    let first = match reader.read_before::<ServerRequest>(MAX_HELLO, deadline) {
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
                Some(user) => session::serve_client(stream, reader, shared, id, user),
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

/// Largest first frame (`Hello` or `PeerHello`): a token or a secret and a few numbers.
const MAX_HELLO: usize = 1024;

/// Writes one error frame and closes the socket (for connections refused before they start).
pub(crate) fn reply_once(stream: &TcpStream, id: Option<u64>, code: ErrorCode, message: &str) {
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
                shared.router.deliver(&users, &msg);
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

/// The server's link to the balancer: registration, then a heartbeat every [`HEARTBEAT`] whose
/// reply is the peer list. Reconnects and re-registers (same id) if the balancer restarts.
struct BalancerLink {
    addr: String,
    advertise: String,
    secret: Vec<u8>,
    /// Proves to the balancer that this server can read the cluster's database.
    cluster_key: Vec<u8>,
    server_id: u64,
    conn: Option<(FrameReader<TcpStream>, FrameWriter<TcpStream>)>,
}

impl BalancerLink {
    /// Registers, retrying until `startup_timeout`.
    fn connect(
        config: &Config,
        advertise: &str,
        secret: &[u8],
        cluster_key: Vec<u8>,
    ) -> Result<BalancerLink> {
        let mut link = BalancerLink {
            addr: config.balancer.clone(),
            advertise: advertise.to_string(),
            secret: secret.to_vec(),
            cluster_key,
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
            cluster_key: self.cluster_key.clone(),
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
