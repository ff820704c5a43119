//! The balancer: the front door of a fastchat cluster.
//!
//! Clients sign up, log in (password checked against a salted scrypt hash), fetch public keys,
//! and are given a session token plus the chat server to use. Chat servers register here, report
//! their load every 500 ms, and learn their peers from the reply. A server that has not reported
//! for [`Config::server_timeout`] is out of rotation.
//!
//! Threads: the caller's thread accepts ([`crate::listen`]); each connection gets its own
//! thread. The registry of live servers is the only shared mutable state (a short lock).
//!
//! # Layout
//!
//! * `accounts`: signup and the password check.
//! * [`registry`]: the live servers and the algorithms that choose one per login.
//! * `lockout`: failed logins, per name and per address.

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;
use parking_lot::Mutex;

use crate::crypto::{self, ScryptCost};
use crate::db::{now_ms, Store};
use crate::error::{Error, ErrorCode, Result};
use crate::listen::{self, Threads};
use crate::names;
use crate::net::{
    BalancerReply, BalancerRequest, FrameReader, FrameWriter, Request, Response, ServerInfo,
};

mod accounts;
mod lockout;
pub mod registry;

pub use accounts::MAX_PASSWORD;
use lockout::Logins;
pub use registry::Algo;
use registry::{Registry, FORGET_AFTER};

/// Balancer settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The shared SQLite file.
    pub db: PathBuf,
    /// Server selection.
    pub algo: Algo,
    /// Cost of new password hashes.
    pub scrypt: ScryptCost,
    /// How long a session token is valid.
    pub token_ttl: Duration,
    /// A server silent for this long is out of rotation.
    pub server_timeout: Duration,
}

impl Config {
    /// Defaults for everything but the database path.
    pub fn new(db: PathBuf) -> Config {
        Config {
            db,
            algo: Algo::RoundRobin,
            scrypt: ScryptCost::default(),
            token_ttl: Duration::from_secs(24 * 3600),
            server_timeout: Duration::from_secs(2),
        }
    }
}

/// What every connection thread of the balancer shares.
struct Shared {
    config: Config,
    store: Store,
    registry: Mutex<Registry>,
    /// A password hash for names that do not exist, so a wrong name costs as much as a wrong
    /// password and timing does not reveal which names are registered.
    dummy_hash: String,
    /// Failed logins per name and address. A lock, not a thread: each use is a map lookup.
    logins: Mutex<Logins>,
    /// What a chat server must show to register (from the shared database).
    cluster_key: Vec<u8>,
}

/// Idle connections are closed after this long without a request.
const IDLE: Duration = Duration::from_secs(60);

/// How long a stopping balancer waits for its connection threads to end.
const JOIN_LIMIT: Duration = Duration::from_secs(5);

/// Serves the balancer on `listener` until a message arrives on `shutdown` (or it is dropped).
pub fn run(listener: TcpListener, config: Config, shutdown: Receiver<()>) -> Result<()> {
    let store = Store::open(&config.db)?;
    let cluster_key = store.call(|tx| tx.cluster_key())?;
    let shared = Arc::new(Shared {
        store,
        registry: Mutex::new(Registry::new(crypto::random_u64()?)),
        dummy_hash: crypto::hash_password("not a password", config.scrypt)?,
        logins: Mutex::new(Logins::default()),
        cluster_key,
        config,
    });
    let addr = listener.local_addr()?;
    log::info!(
        "balancer on {addr}, algorithm {}, database {}",
        shared.config.algo,
        shared.config.db.display()
    );
    let threads = Threads {
        name: "balancer-conn",
        stack_size: 256 * 1024,
        closable: true,
    };
    let handlers = {
        let shared = Arc::clone(&shared);
        listen::accept(&listener, shutdown, &threads, move |stream| {
            serve(stream, &shared)
        })?
    };
    handlers.close();
    handlers.join(JOIN_LIMIT);
    log::info!("balancer stopped");
    Ok(())
}

fn serve(stream: TcpStream, shared: &Shared) -> Result<()> {
    let from = stream.peer_addr()?.ip();
    stream.set_read_timeout(Some(IDLE))?;
    stream.set_nodelay(true)?;
    let mut reader = FrameReader::new(stream.try_clone()?);
    let mut writer = FrameWriter::new(stream);
    // Set once this connection registers as a chat server's link.
    let mut server_id: Option<u64> = None;
    loop {
        let Request { id, body } = match reader.read::<Request<BalancerRequest>>() {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(e @ (Error::Malformed(_) | Error::FrameTooLarge { .. })) => {
                let refusal =
                    Response::<BalancerReply>::refused(None, ErrorCode::BadFrame, e.to_string());
                let _ = writer.send(&refusal);
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let result = match handle(body, shared, from, &mut server_id) {
            Ok(reply) => Ok(reply),
            Err(Error::Refused { code, message }) => Err((code, message)),
            Err(Error::InvalidName(message)) => Err((ErrorCode::InvalidName, message)),
            Err(e) => {
                log::error!("request {id} failed: {e}");
                Err((
                    ErrorCode::Internal,
                    "internal error; nothing was changed".to_string(),
                ))
            }
        };
        let response = match result {
            Ok(reply) => Response {
                id: Some(id),
                result: Ok(reply),
            },
            Err((code, message)) => Response::refused(Some(id), code, message),
        };
        writer.send(&response)?;
    }
}

/// Answers one request from the client at `from`.
fn handle(
    request: BalancerRequest,
    shared: &Shared,
    from: IpAddr,
    server_id: &mut Option<u64>,
) -> Result<BalancerReply> {
    match request {
        BalancerRequest::Signup {
            name,
            password,
            keys,
        } => {
            accounts::signup(&shared.store, shared.config.scrypt, &name, &password, keys)?;
            log::info!("signed up {name}");
            Ok(BalancerReply::Ok)
        }
        BalancerRequest::Login { name, password } => {
            // Locked-out names and addresses are refused before any hashing.
            shared
                .logins
                .lock()
                .check(&name, from)
                .map_err(|why| Error::refused(ErrorCode::RateLimited, why))?;
            match accounts::check_password(&shared.store, &shared.dummy_hash, &name, &password) {
                Ok(()) => shared.logins.lock().succeeded(&name),
                Err(e) => {
                    // Only valid names are remembered: a hostile client must not fill the
                    // table with megabyte-long ones (its address is counted all the same).
                    let named = names::validate("user", &name)
                        .is_ok()
                        .then_some(name.as_str());
                    shared.logins.lock().failed(named, from);
                    return Err(e);
                }
            }
            login(shared, name)
        }
        BalancerRequest::Logout { token } => {
            let hash = crypto::token_hash(token.as_bytes())?;
            shared.store.call(move |tx| tx.end_session(&hash))?;
            Ok(BalancerReply::Ok)
        }
        BalancerRequest::Resume { token, avoid } => {
            let hash = crypto::token_hash(token.as_bytes())?;
            let user = shared
                .store
                .read(|tx| tx.session_user(&hash))?
                .ok_or_else(|| {
                    Error::refused(ErrorCode::InvalidToken, "session expired; log in again")
                })?;
            let server = assign(shared, avoid)?;
            log::info!("{user} resumed, assigned server {}", server.id);
            Ok(BalancerReply::LoggedIn {
                user,
                token,
                server,
            })
        }
        BalancerRequest::Servers => Ok(BalancerReply::Servers {
            servers: shared.registry.lock().infos(shared.config.server_timeout),
        }),
        BalancerRequest::Keys { name } => {
            names::validate("user", &name)?;
            let keys = shared
                .store
                .read(|tx| tx.user_keys(&name))?
                .ok_or_else(|| {
                    Error::refused(ErrorCode::UnknownUser, format!("no such user: {name}"))
                })?;
            Ok(BalancerReply::Keys { name, keys })
        }
        BalancerRequest::Register {
            addr,
            server_id: known,
            secret,
            cluster_key,
        } => {
            let matches = cluster_key.len() == shared.cluster_key.len()
                && openssl::memcmp::eq(&cluster_key, &shared.cluster_key);
            if !matches {
                return Err(Error::refused(
                    ErrorCode::NotAllowed,
                    "not a server of this cluster (wrong cluster key)",
                ));
            }
            let sid = register(shared, addr, known, &secret)?;
            *server_id = Some(sid);
            Ok(BalancerReply::Registered { server_id: sid })
        }
        BalancerRequest::Heartbeat { load } => {
            let sid = server_id.ok_or_else(|| {
                Error::refused(ErrorCode::BadRequest, "heartbeat before register")
            })?;
            let peers = heartbeat(shared, sid, load)?;
            Ok(BalancerReply::Peers { peers })
        }
    }
}

fn login(shared: &Shared, user: String) -> Result<BalancerReply> {
    let server = assign(shared, None)?;
    let token = crypto::new_token()?;
    let hash = crypto::token_hash(token.as_bytes())?;
    let expires = now_ms() + shared.config.token_ttl.as_millis() as i64;
    let owned = user.clone();
    shared
        .store
        .call(move |tx| tx.create_session(&hash, &owned, expires))?;
    log::info!("{user} logged in, assigned server {}", server.id);
    Ok(BalancerReply::LoggedIn {
        user,
        token,
        server,
    })
}

fn assign(shared: &Shared, avoid: Option<u64>) -> Result<ServerInfo> {
    shared
        .registry
        .lock()
        .assign(shared.config.algo, shared.config.server_timeout, avoid)
        .ok_or_else(|| {
            Error::refused(
                ErrorCode::NoServers,
                "no chat server is available; start one with fastchat-server",
            )
        })
}

fn register(shared: &Shared, addr: String, known: Option<u64>, secret: &[u8]) -> Result<u64> {
    if secret.len() != 32 {
        return Err(Error::refused(
            ErrorCode::BadRequest,
            "secret must be 32 bytes",
        ));
    }
    if addr.parse::<SocketAddr>().is_err() {
        return Err(Error::refused(
            ErrorCode::BadRequest,
            format!("{addr:?} is not a socket address"),
        ));
    }
    let hash = crypto::token_hash(secret)?;
    let owned = addr.clone();
    let sid = shared
        .store
        .call(move |tx| tx.register_server(&owned, known, &hash))?
        .ok_or_else(|| {
            Error::refused(ErrorCode::InvalidToken, "unknown server id or wrong secret")
        })?;
    shared.registry.lock().register(sid, &addr);
    log::info!("server {sid} registered at {addr}");
    Ok(sid)
}

fn heartbeat(shared: &Shared, sid: u64, load: u32) -> Result<Vec<ServerInfo>> {
    let (peers, dead) = {
        let mut reg = shared.registry.lock();
        if !reg.report(sid, load) {
            return Err(Error::refused(
                ErrorCode::BadRequest,
                "unknown server; register again",
            ));
        }
        let dead = reg.forget_silent(FORGET_AFTER);
        let mut peers = reg.infos(shared.config.server_timeout);
        peers.retain(|p| p.id != sid);
        (peers, dead)
    };
    for id in dead {
        log::warn!("server {id} silent for {FORGET_AFTER:?}: forgotten");
        shared.store.call(move |tx| tx.forget_server(id))?;
    }
    Ok(peers)
}
