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
//! # Layout
//!
//! * [`config`]: the settings.
//! * `shared`: what every thread shares (the store, the router, the peer links, counters).
//! * `session`: one client connection: its requests by concern (messages, groups, files).
//! * `outbound`: a connection's outbound queue, its writer thread, the sync of its queue.
//! * `router`: local users to their connections' outbound queues.
//! * `peers`: links to the other servers, outbound and inbound.
//! * `balancer_link`: registration and heartbeats.
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

use crate::crypto;
use crate::db::Store;
use crate::error::{Error, Result};
use crate::listen::{self, Threads};
use crate::net::{decode, ErrorCode, FrameReader, Greeting, Request, ServerRequest};

mod balancer_link;
pub mod config;
mod outbound;
mod peers;
mod router;
mod session;
mod shared;
#[cfg(test)]
mod testing;

use balancer_link::BalancerLink;
pub use balancer_link::HEARTBEAT;
pub use config::Config;
use outbound::refuse_once;
use peers::Peers;
use router::Router;
use shared::Shared;

/// Largest first frame (`Hello` or a peer's greeting): a token or a secret and a few numbers.
const MAX_GREETING: usize = 1024;

/// How long a stopping server waits for its connection threads to end.
const JOIN_LIMIT: Duration = Duration::from_secs(5);

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
    let store = Store::open(&config.db)?;
    let cluster_key = store.call(|tx| tx.cluster_key())?;
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
    let link = BalancerLink::connect(&config, &advertise, &secret, cluster_key)?;
    let server_id = link.server_id;
    store.call(move |tx| {
        tx.clear_presence(server_id)?;
        tx.drop_uploads(server_id, None)
    })?;
    let stopping = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_signal) = bounded::<()>(0);
    let shared = Arc::new(Shared {
        stop_signal,
        unrouted: parking_lot::Mutex::default(),
        router: Router::default(),
        peers: Peers::new(server_id, secret, Arc::clone(&stopping)),
        next_conn: AtomicU64::new(1),
        clients: AtomicU32::new(0),
        stopping: Arc::clone(&stopping),
        store,
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
    let threads = Threads {
        name: "conn-reader",
        stack_size: 256 * 1024,
        // Client connections are closed through the router, peer links through their list.
        closable: false,
    };
    let handlers = {
        let shared = Arc::clone(&shared);
        listen::accept(&listener, shutdown, &threads, move |stream| {
            serve(stream, &shared)
        })?
    };

    // Graceful stop: no new connections; close the clients and peer links; wait for their
    // threads; close our links; commit.
    log::info!("server {server_id} stopping");
    stopping.store(true, Ordering::SeqCst);
    drop(stop_tx);
    shared.router.close_all();
    shared.close_unrouted();
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

/// One accepted connection: a client (after `Hello`) or a peer server (after its greeting).
fn serve(stream: TcpStream, shared: &Arc<Shared>) -> Result<()> {
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    // The first frame must come whole within the hello timeout, and be small. Until the
    // router knows the connection, a stopping server finds it through `unrouted`.
    let tracked = shared.track(&stream)?;
    let mut reader = FrameReader::new(stream.try_clone()?);
    let deadline = Instant::now() + shared.config.hello_timeout;
    let greeting = match reader.read_before::<Greeting>(MAX_GREETING, deadline) {
        Ok(Some(g)) => g,
        Ok(None) => return Ok(()),
        Err(e @ Error::Malformed(_)) => {
            // A request where the greeting should be is a client that skipped `Hello`.
            if decode::<Request<ServerRequest>>(reader.body()).is_ok() {
                refuse_once(
                    &stream,
                    ErrorCode::BadRequest,
                    "the first frame must be Hello",
                );
            } else {
                refuse_once(&stream, ErrorCode::BadFrame, &e.to_string());
            }
            return Err(e);
        }
        Err(e @ Error::FrameTooLarge { .. }) => {
            refuse_once(&stream, ErrorCode::BadFrame, &e.to_string());
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    match greeting {
        Greeting::Hello { token } => {
            let hash = crypto::token_hash(token.as_bytes())?;
            match shared.store.read(|tx| tx.session_user(&hash))? {
                Some(user) => {
                    drop(tracked);
                    session::serve_client(stream, reader, shared, user)
                }
                None => {
                    refuse_once(
                        &stream,
                        ErrorCode::InvalidToken,
                        "invalid or expired session; log in again",
                    );
                    Ok(())
                }
            }
        }
        Greeting::Peer { server_id, secret } => {
            let expected = shared.store.read(|tx| tx.server_secret_hash(server_id))?;
            let given = crypto::token_hash(&secret)?;
            match expected {
                Some(h) if openssl::memcmp::eq(&h, &given) => {
                    peers::serve_inbound(&mut reader, &shared.router, server_id)
                }
                _ => {
                    refuse_once(&stream, ErrorCode::InvalidToken, "unknown peer");
                    Ok(())
                }
            }
        }
    }
}
