//! The chat server: authenticated client connections, store-and-forward, the peer mesh.
//!
//! Threads of one server (docs/ARCHITECTURE.md has the whole picture):
//!
//! ```text
//!  accept loop (caller of run) ──spawns──▶ connection thread (one per connection; it alone
//!                                          reads and writes its socket and TLS session):
//!                                          poll(socket, waker, stop) ─▶ requests, replies
//!                                              │ writes            ▲ mailbox + waker
//!                                              ▼                   │
//!                                         db-writer thread ── after commit: Stored reply,
//!                                          (group commit)     route to local Router or Peers
//!  balancer link thread: register, heartbeat every 500 ms, peer list ──▶ Peers (one thread
//!                                                                         per outbound link)
//!  an inbound peer link is served on its connection thread (relays ──▶ Router)
//! ```
//!
//! # Layout
//!
//! * [`config`]: the settings.
//! * `shared`: what every thread shares (the store, the router, the peer links, counters).
//! * `session`: one client connection: its lifecycle and the loop of its thread; its
//!   requests by concern (`session/messages`, `session/groups`, `session/files`).
//! * `outbound`: what other threads hand a connection (its mailbox and waker), and the sync
//!   of its queue.
//! * `router`: local users to their connections' mailboxes.
//! * `peers`: links to the other servers, outbound and inbound.
//! * `balancer_link`: registration and heartbeats.
//! * `presence`: who is online, for the connections that watch someone.
//! * [`quota`]: what a queue, a sender and files may hold.
//! * [`metrics`]: `/metrics` in the Prometheus text format.
//!
//! Delivery is "store, then route; register, then sync". A message is committed together with
//! a read of where its recipient is connected (the presence table); a login commits its presence
//! row before reading its queue. Whichever of the two commits second sees the other, so a
//! message is never missed by both the live path and the sync. A message seen by both is sent
//! once: live messages that reach a connection before its sync are dropped (the sync reads them
//! from the database), and those the sync already sent are skipped by id.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver};

use crate::capacity::Limits;
use crate::crypto;
use crate::db::{Fence, Store};
use crate::error::{Error, Result};
use crate::listen::{self, Rest, Threads};
use crate::net::{decode, ErrorCode, Greeting, Request, ServerEvent, ServerRequest};
use crate::transport::pki::Role;
use crate::transport::{Channel, Waker};

mod balancer_link;
pub mod config;
pub mod metrics;
mod outbound;
mod peers;
mod presence;
pub mod quota;
mod router;
mod session;
mod shared;
#[cfg(test)]
mod testing;

use balancer_link::BalancerLink;
pub use balancer_link::HEARTBEAT;
pub use config::Config;
use peers::Peers;
use quota::Watch;
use router::Router;
use shared::Shared;

/// Largest first frame (`Hello` or a peer's greeting): a token or a secret and a few numbers.
const MAX_GREETING: usize = 1024;

/// Descriptors and threads kept for everything but client connections: the database, the
/// listener, links to the balancer and the peers.
const RESERVE: u64 = 128;

/// The stack a connection's thread reserves (address space: an idle one keeps three pages of
/// it in memory; BENCHMARKS.md).
pub const CONNECTION_STACK: usize = 256 * 1024;

/// Connections beyond the clients: peer links, and connections still shaking hands or being
/// told the server is full.
const SLACK: u64 = 64;

/// How long a stopping server waits for its connection threads to end.
const JOIN_LIMIT: Duration = Duration::from_secs(5);

/// Serves on `listener` until a message arrives on `shutdown` (or it is dropped). Registers
/// with the balancer first; returns an error if the balancer cannot be reached in time.
///
/// `on_ready` is called once registration succeeded, with the server id and the address it
/// listens on (clients are given the advertised address, which is the same unless configured).
pub fn run(
    listener: TcpListener,
    mut config: Config,
    shutdown: Receiver<()>,
    on_ready: impl FnOnce(u64, SocketAddr, Option<SocketAddr>),
) -> Result<()> {
    // Every thread the server starts (connections, the writer, peer links) inherits it.
    crate::startup::batch_scheduling();
    let limits = Limits::of_this_process();
    let room = limits.connections(2, RESERVE + SLACK) as usize;
    if room < config.max_clients {
        log::warn!(
            "room for {room} clients, not --max-clients {}: each needs 2 descriptors and a \
             thread, and this process may open {} descriptors and start {} threads",
            config.max_clients,
            limits.descriptors,
            limits.threads
        );
        config.max_clients = room;
    }
    log::info!(
        "room for {} clients ({} descriptors and {} threads allowed)",
        config.max_clients,
        limits.descriptors,
        limits.threads
    );
    crate::freeze::watch();
    let store = Store::open_with(&config.db, &config.db_options)?;
    let local = listener.local_addr()?;
    let advertise = config.advertise.clone().unwrap_or_else(|| {
        let ip = if local.ip().is_unspecified() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            local.ip()
        };
        SocketAddr::new(ip, local.port()).to_string()
    });
    let name = server_name(&config, local)?;
    let (link, more_links) = BalancerLink::connect(&config, &advertise, &name)?;
    let server_id = link.server_id;
    store.call(move |tx| {
        tx.clear_presence(server_id)?;
        tx.drop_uploads(server_id, None)
    })?;
    let stopping = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_signal) = bounded::<()>(0);
    let shared = Arc::new(Shared {
        stop_signal,
        stop: Waker::new()?,
        router: Router::default(),
        peers: Peers::new(server_id, config.transport.clone(), Arc::clone(&stopping)),
        next_conn: AtomicU64::new(1),
        clients: AtomicU32::new(0),
        arrived: AtomicU64::new(0),
        watches: presence::Watches::default(),
        counts: shared::Counters::default(),
        live_peers: parking_lot::Mutex::default(),
        stopping: Arc::clone(&stopping),
        store,
        server_id,
        quota_watch: Watch::default(),
        peers_seen: Default::default(),
        detached: AtomicBool::new(false),
        config,
    });
    refresh_quota_watch(&shared);
    log::info!("server {server_id} ({name}) listening on {local}, advertised as {advertise}");
    let metrics = match &shared.config.metrics {
        Some(addr) => Some(metrics::start(addr, Arc::clone(&shared))?),
        None => None,
    };
    if let Some(m) = metrics {
        log::info!("metrics on http://{m}/metrics");
    }
    on_ready(server_id, local, metrics);

    let heartbeat = {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("balancer-link".into())
            .spawn(move || link.run(&shared, true))?
    };
    // Further balancers (a cluster on PostgreSQL may have several): a beat of their own each.
    // They end with the server; nothing waits for them.
    for more in more_links {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("balancer-link".into())
            .spawn(move || more.run(&shared, false))?;
    }
    let threads = Threads {
        name: "conn",
        stack_size: CONNECTION_STACK,
        // Every connection thread also waits on `shared.stop`, which ends them all.
        closable: false,
        // Clients past the maximum still get their "server is full" (and peers their links).
        max: shared.config.max_clients + SLACK as usize,
        per_address: 0,
    };
    let handlers = {
        let shared = Arc::clone(&shared);
        listen::accept(&listener, shutdown, &threads, move |stream| {
            serve(stream, &shared)
        })?
    };

    // Graceful stop: no new connections; every connection thread (clients, peer links, those
    // still saying hello) sees the stop waker and ends; close our links; commit.
    log::info!("server {server_id} stopping");
    stopping.store(true, Ordering::SeqCst);
    shared.stop.wake();
    drop(stop_tx);
    handlers.join(JOIN_LIMIT);
    shared.peers.close();
    let _ = heartbeat.join();
    shared.store.call(move |tx| {
        tx.clear_presence(server_id)?;
        tx.drop_uploads(server_id, None)
    })?;
    log::info!("server {server_id} stopped");
    Ok(())
}

/// Looks over the queues again for those near their quotas (see [`quota::Watch`]).
pub(crate) fn refresh_quota_watch(shared: &Shared) {
    let quotas = shared.config.quotas;
    if let Err(e) = shared
        .store
        .read(|tx| shared.quota_watch.refresh(tx, &quotas))
    {
        log::warn!("cannot look over the queues for quotas: {e}");
    }
}

/// The name this server registers under: its certificate's (with TLS), else the one
/// configured, else `server-PORT`.
fn server_name(config: &Config, local: SocketAddr) -> Result<String> {
    match (config.transport.me(), &config.name) {
        (Some(me), Some(given)) if &me.name != given => Err(Error::Invalid(format!(
            "--name {given} differs from the name in this server's certificate ({})",
            me.name
        ))),
        (Some(me), _) if me.role != Role::Server => Err(Error::Invalid(format!(
            "{} holds a {} certificate, not a server's",
            me.name, me.role
        ))),
        (Some(me), _) => Ok(me.name.clone()),
        (None, Some(given)) => {
            crate::names::validate("server", given)?;
            Ok(given.clone())
        }
        (None, None) => Ok(format!("server-{}", local.port())),
    }
}

/// Refuses a connection before it starts, with one frame (the peer has a moment to read it).
fn refuse(chan: &mut Channel, code: ErrorCode, message: &str) {
    let refusal = ServerEvent::refused(None, code, message);
    let _ = chan.send_before(&refusal, Instant::now() + Duration::from_secs(1));
}

/// One accepted connection: a client (after `Hello`) or a peer server (after its greeting).
fn serve(tcp: TcpStream, shared: &Arc<Shared>) -> Result<Rest> {
    // Whatever the client sends on this connection comes after its TLS handshake with this
    // thread: if the process is frozen from now on, that may have been given up on.
    let fence = Fence::now();
    tcp.set_nodelay(true)?;
    // The handshake and the first frame must come whole within the hello timeout; the first
    // frame must be small; the server's stop ends the wait.
    let deadline = Instant::now() + shared.config.hello_timeout;
    let stream = shared
        .config
        .transport
        .accept(tcp, deadline, Some(&shared.stop))?;
    let mut chan = Channel::new(stream)?;
    chan.set_nonblocking(true)?;
    let body = match chan.recv_raw_until(MAX_GREETING, Some(deadline), Some(&shared.stop)) {
        Ok(Some(body)) => body,
        Ok(None) => return Ok(Rest::Done),
        Err(e @ Error::FrameTooLarge { .. }) => {
            refuse(&mut chan, ErrorCode::BadFrame, &e.to_string());
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let greeting = match decode::<Greeting>(&body) {
        Ok(g) => g,
        Err(e) => {
            // A request where the greeting should be is a client that skipped `Hello`.
            if decode::<Request<ServerRequest>>(&body).is_ok() {
                refuse(
                    &mut chan,
                    ErrorCode::BadRequest,
                    "the first frame must be Hello",
                );
            } else {
                refuse(&mut chan, ErrorCode::BadFrame, &e.to_string());
            }
            return Err(e);
        }
    };
    match greeting {
        Greeting::Hello { token, proof } => {
            let hash = crypto::token_hash(token.as_bytes())?;
            let Some(session) = shared.store.read(|tx| tx.session(&hash))? else {
                refuse(
                    &mut chan,
                    ErrorCode::InvalidToken,
                    "invalid or expired session; log in again",
                );
                return Ok(Rest::Done);
            };
            if let Some(binding) = chan.stream().binding() {
                if !crypto::check_session_proof(&session.session_key, &binding, &proof)? {
                    refuse(
                        &mut chan,
                        ErrorCode::InvalidToken,
                        "the session proof does not match this connection; log in again",
                    );
                    return Ok(Rest::Done);
                }
            }
            // The session goes on on a fresh thread: this one's handshake left state behind
            // that a session does not need (see `listen::Rest`).
            let shared = Arc::clone(shared);
            let login = Box::new(session::Login {
                chan,
                user: session.user,
                token_hash: hash,
                fence,
            });
            Ok(Rest::Then(Box::new(move || {
                session::serve_client(login, &shared)
            })))
        }
        Greeting::Peer { server_id } => {
            if shared.config.transport.is_tls() {
                let registered = shared.store.read(|tx| tx.server_name(server_id))?;
                let proven = match (chan.stream().peer(), registered) {
                    (Some(m), Some(name)) => m.role == Role::Server && m.name == name,
                    _ => false,
                };
                if !proven {
                    refuse(&mut chan, ErrorCode::NotAllowed, "not that peer server");
                    return Ok(Rest::Done);
                }
            }
            let again = !shared.peers_seen.lock().insert(server_id);
            peers::serve_inbound(&mut chan, &shared.router, &shared.stop, server_id, again)?;
            Ok(Rest::Done)
        }
    }
}
