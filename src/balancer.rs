//! The balancer: the front door of a fastchat cluster.
//!
//! Clients sign up, log in (password checked against a salted scrypt hash), fetch public keys,
//! and are given a session token plus the chat server to use. Chat servers register here, report
//! their load every 500 ms, and learn their peers from the reply. A server that has not reported
//! for [`Config::server_timeout`] is out of rotation.
//!
//! Threads: the caller's thread accepts ([`crate::listen`]); each connection gets its own
//! thread, and a `db-writer` commits what they write. The registry of live servers and the
//! counts of failed logins are the shared mutable state, each behind a short lock.
//!
//! # Layout
//!
//! * `accounts`: signup and the password check.
//! * [`registry`]: the live servers and the algorithms that choose one per login.
//! * `lockout`: failed logins, per name and per address; logins waiting their turn.
//! * [`dashboard`]: the live dashboard, its JSON and /metrics (`--http ADDR`).

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use parking_lot::Mutex;

use crate::crypto::{self, ScryptCost};
use crate::db::{now_ms, SessionRow, Store};
use crate::error::{Error, ErrorCode, Result};
use crate::listen::{self, Threads};
use crate::names;
use crate::net::{
    BalancerReply, BalancerRequest, Request, Response, ServerInfo, MAX_ONE_TIME_PREKEYS,
    PREKEYS_PER_REQUEST,
};
use crate::transport::pki::{Member, Role};
use crate::transport::{Channel, Transport};

mod accounts;
pub mod dashboard;
mod lockout;
pub mod registry;

use crate::capacity::Limits;
use accounts::HashSlots;
use lockout::{wait_secs, Gate, Outcome, Table, Wait};
pub use registry::Algo;
use registry::{Registry, FORGET_AFTER};

/// Balancer settings.
#[derive(Clone)]
pub struct Config {
    /// The shared SQLite file.
    pub db: crate::db::Location,
    /// TLS with the balancer's certificate (or plaintext, for teaching).
    pub transport: Transport,
    /// Server selection.
    pub algo: Algo,
    /// Cost of new password hashes.
    pub scrypt: ScryptCost,
    /// How long a session token is valid.
    pub token_ttl: Duration,
    /// A server silent for this long is out of rotation.
    pub server_timeout: Duration,
    /// Signups allowed from one address before each next one waits (1 s, 2 s, ... up to five
    /// minutes; strikes are forgotten after ten quiet minutes); 0 for no limit.
    pub signups_per_address: u32,
    /// Most connections at once (lowered to what the descriptor limit allows).
    pub max_connections: usize,
    /// Most connections at once from one address.
    pub max_per_address: usize,
    /// A request, once its first byte has come, must be whole within this time (and the TLS
    /// handshake too): a client that trickles bytes cannot hold a connection.
    pub request_timeout: Duration,
    /// How long work waits for the database, and how large its log may grow.
    pub db_options: crate::db::Options,
    /// Serve the dashboard and `/metrics` on this address (`--http`).
    pub http: Option<String>,
    /// The token the dashboard asks for (made at start, off loopback, if not given).
    pub http_token: Option<String>,
}

impl Config {
    /// Defaults for everything but the database path and the transport.
    pub fn new(db: impl Into<crate::db::Location>, transport: Transport) -> Config {
        Config {
            db: db.into(),
            transport,
            algo: Algo::RoundRobin,
            scrypt: ScryptCost::default(),
            token_ttl: Duration::from_secs(24 * 3600),
            server_timeout: Duration::from_secs(2),
            signups_per_address: 30,
            max_connections: 4096,
            max_per_address: 256,
            request_timeout: Duration::from_secs(10),
            db_options: crate::db::Options::default(),
            http: None,
            http_token: None,
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
    /// Logins per name and address. A lock, not a thread: each use is a map lookup.
    logins: Gate,
    /// Signups per address.
    signups: Mutex<Table<IpAddr>>,
    /// Passwords being hashed at once.
    hashing: HashSlots,
    /// Numbers the connections, so a server's registration knows the link it lives on.
    next_link: AtomicU64,
    /// What `/metrics` counts.
    counters: dashboard::Counters,
    /// When presence rows of servers this balancer never heard from were last looked for
    /// (servers that died before it started: nobody else would ever forget them).
    orphans_swept: Mutex<std::time::Instant>,
    /// When this balancer started: the servers that outlived its predecessor register again
    /// within [`Config::server_timeout`] of it (see [`assign`]).
    started: Instant,
}

/// What the balancer knows about one connection.
struct Peer {
    /// The client's address (failed logins are counted per address).
    from: IpAddr,
    /// The cluster member at the other end, from its certificate (servers only).
    member: Option<Member>,
    /// The connection's TLS binding, which session proofs sign.
    binding: Option<[u8; 32]>,
    /// This connection's number.
    link: u64,
    /// Set once this connection registers as a chat server's link.
    server_id: Option<u64>,
}

/// Idle connections are closed after this long without a request.
const IDLE: Duration = Duration::from_secs(60);

/// Largest request: every balancer request is small (a signup is a name, a password of at most
/// 1 KiB and two keys), so a larger announced length is refused before anything is read.
const MAX_REQUEST: usize = 4096;

/// How long a signup or login waits for its turn to hash a password before it is told the
/// balancer is busy; a login may wait as long again before that, for its turn among the
/// attempts of its name and address. Both together stay under the client's reply timeout.
const HASH_PATIENCE: Duration = Duration::from_secs(10);

/// How long a stopping balancer waits for its connection threads to end.
const JOIN_LIMIT: Duration = Duration::from_secs(5);

/// Serves the balancer on `listener` until a message arrives on `shutdown` (or it is dropped).
/// `on_ready` is called with the listening address once the database is open and migrated,
/// before the first connection is accepted.
pub fn run(
    listener: TcpListener,
    config: Config,
    shutdown: Receiver<()>,
    on_ready: impl FnOnce(SocketAddr, Option<&dashboard::Dashboard>),
) -> Result<()> {
    let store = Store::open_with(&config.db, &config.db_options)?;
    let shared = Arc::new(Shared {
        store,
        registry: Mutex::new(Registry::new(crypto::random_u64()?)),
        dummy_hash: crypto::hash_password("not a password", config.scrypt)?,
        logins: Gate::default(),
        signups: Mutex::new(Table::new(config.signups_per_address)),
        hashing: HashSlots::new(std::thread::available_parallelism().map_or(2, |n| n.get().max(2))),
        next_link: AtomicU64::new(1),
        orphans_swept: Mutex::new(std::time::Instant::now()),
        started: Instant::now(),
        counters: dashboard::Counters::default(),
        config,
    });
    let addr = listener.local_addr()?;
    log::info!(
        "balancer on {addr}, algorithm {}, database {}",
        shared.config.algo,
        shared.config.db
    );
    // Each connection holds its socket and a handle to close it with: two descriptors.
    let limits = Limits::of_this_process();
    let room = limits.connections(2, 128) as usize;
    let max = shared.config.max_connections.min(room);
    log::info!(
        "room for {max} connections ({} from one address)",
        shared.config.max_per_address
    );
    let threads = Threads {
        name: "balancer-conn",
        stack_size: 256 * 1024,
        closable: true,
        max,
        per_address: shared.config.max_per_address,
    };
    let board = match &shared.config.http {
        Some(http) => Some(dashboard::start(
            http,
            shared.config.http_token.clone(),
            Arc::clone(&shared),
            shutdown.clone(),
        )?),
        None => None,
    };
    on_ready(addr, board.as_ref());
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

fn serve(tcp: TcpStream, shared: &Shared) -> Result<()> {
    let from = tcp.peer_addr()?.ip();
    tcp.set_nodelay(true)?;
    let deadline = Instant::now() + shared.config.request_timeout;
    let stream = shared.config.transport.accept(tcp, deadline, None)?;
    let mut peer = Peer {
        from,
        member: stream.peer(),
        binding: stream.binding(),
        link: shared.next_link.fetch_add(1, Ordering::Relaxed),
        server_id: None,
    };
    let mut chan = Channel::new(stream)?;
    chan.set_nonblocking(true)?;
    let result = requests(&mut chan, shared, &mut peer);
    if let Some(sid) = peer.server_id {
        shared.registry.lock().unlink(sid, peer.link);
        log::info!("server {sid}'s link ended; out of rotation until it registers again");
    }
    result
}

/// Answers requests on one connection until it ends.
fn requests(chan: &mut Channel, shared: &Shared, peer: &mut Peer) -> Result<()> {
    loop {
        if !chan.wait_for_data(Instant::now() + IDLE)? {
            log::debug!("closing a connection idle for {IDLE:?}");
            return Ok(());
        }
        let limit = shared.config.request_timeout;
        let deadline = Some(Instant::now() + limit);
        let Request { id, body } = match chan.recv_until(MAX_REQUEST, deadline, None) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(e @ (Error::Malformed(_) | Error::FrameTooLarge { .. })) => {
                let refusal =
                    Response::<BalancerReply>::refused(None, ErrorCode::BadFrame, e.to_string());
                let _ = chan.send_before(&refusal, Instant::now() + limit);
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let result = handle(body, shared, peer).map_err(|e| e.into_refusal(id));
        let response = match result {
            Ok(reply) => Response {
                id: Some(id),
                result: Ok(reply),
            },
            Err((code, message)) => {
                *shared.counters.refusals.lock().entry(code).or_default() += 1;
                Response::refused(Some(id), code, message)
            }
        };
        chan.send_before(&response, Instant::now() + limit)?;
    }
}

/// Stores a user's prekeys (`Prekeys`): a signed prekey must carry the user's own signature
/// (so that a client's mistake cannot publish a key its peers will refuse), every key is an
/// X25519 public key, and no more than [`MAX_ONE_TIME_PREKEYS`] are kept. Returns how many
/// one-time prekeys the user has.
fn publish_prekeys(
    shared: &Shared,
    user: String,
    signed: Option<crate::net::SignedPrekey>,
    one_time: Vec<(u32, serde_bytes::ByteBuf)>,
) -> Result<u32> {
    if signed.is_some() {
        let keys = shared
            .store
            .read(|tx| tx.user_keys(&user))?
            .ok_or_else(|| Error::refused(ErrorCode::BadRequest, "no such user"))?;
        check_prekeys(&keys.ed25519, signed.as_ref(), &one_time)?;
    } else {
        check_prekeys(&[], None, &one_time)?;
    }
    let one_time = raw_prekeys(one_time);
    let n = shared
        .store
        .call(move |tx| tx.put_prekeys(&user, signed.as_ref(), &one_time, MAX_ONE_TIME_PREKEYS))?;
    Ok(n.min(u32::MAX as u64) as u32)
}

/// Refuses prekeys that are malformed, too many, or (the signed one) not signed by the
/// identity key `ed25519`.
fn check_prekeys(
    ed25519: &[u8],
    signed: Option<&crate::net::SignedPrekey>,
    one_time: &[(u32, serde_bytes::ByteBuf)],
) -> Result<()> {
    let bad = |why: String| Error::refused(ErrorCode::BadRequest, why);
    if let Some(s) = signed {
        let message = crypto::x3dh::signed_prekey_message(s.id, &s.public);
        if s.public.len() != 32 || !crypto::verify_signature(ed25519, &message, &s.signature)? {
            return Err(bad(format!(
                "signed prekey {} does not carry your identity key's signature",
                s.id
            )));
        }
    }
    if one_time.len() > PREKEYS_PER_REQUEST {
        return Err(bad(format!(
            "at most {PREKEYS_PER_REQUEST} one-time prekeys at once"
        )));
    }
    if let Some((id, _)) = one_time.iter().find(|(_, k)| k.len() != 32) {
        return Err(bad(format!(
            "one-time prekey {id} is not an X25519 public key"
        )));
    }
    Ok(())
}

fn raw_prekeys(one_time: Vec<(u32, serde_bytes::ByteBuf)>) -> Vec<(u32, Vec<u8>)> {
    one_time
        .into_iter()
        .map(|(id, k)| (id, k.into_vec()))
        .collect()
}

/// The user of the session whose token is `token`, if `proof` shows that the sender holds the
/// session's key and made the proof for this connection (with TLS).
fn proven_session(shared: &Shared, peer: &Peer, token: &str, proof: &[u8]) -> Result<String> {
    Ok(proven_row(shared, peer, token, proof)?.0.user)
}

/// Like [`proven_session`]; also returns the session row and the token's hash.
fn proven_row(
    shared: &Shared,
    peer: &Peer,
    token: &str,
    proof: &[u8],
) -> Result<(SessionRow, Vec<u8>)> {
    let expired = || Error::refused(ErrorCode::InvalidToken, "session expired; log in again");
    let hash = crypto::token_hash(token.as_bytes())?;
    let row = shared
        .store
        .read(|tx| tx.session(&hash))?
        .ok_or_else(expired)?;
    if let Some(binding) = &peer.binding {
        if !crypto::check_session_proof(&row.session_key, binding, proof)? {
            return Err(Error::refused(
                ErrorCode::InvalidToken,
                "the session proof does not match this connection; log in again",
            ));
        }
    }
    Ok((row, hash))
}

/// Answers one request from `peer`.
fn handle(request: BalancerRequest, shared: &Shared, peer: &mut Peer) -> Result<BalancerReply> {
    let from = peer.from;
    match request {
        BalancerRequest::Signup {
            name,
            password,
            keys,
            prekeys,
        } => {
            if shared.config.signups_per_address > 0 {
                shared.signups.lock().count(&from).map_err(|wait| {
                    let d = match wait {
                        Wait::Locked(d) => d,
                        Wait::Busy => Duration::from_secs(1),
                    };
                    let why = format!(
                        "too many signups from {from}; try again in {} s",
                        wait_secs(d)
                    );
                    Error::refused(ErrorCode::RateLimited, why)
                })?;
            }
            let _slot = hash_slot(shared)?;
            let prekeys = match prekeys {
                Some(p) => {
                    accounts::check_keys(&keys)?;
                    check_prekeys(&keys.ed25519, Some(&p.signed), &p.one_time)?;
                    Some((p.signed, raw_prekeys(p.one_time)))
                }
                None => None,
            };
            accounts::signup(
                &shared.store,
                shared.config.scrypt,
                &name,
                &password,
                keys,
                prekeys,
            )?;
            shared.counters.signups.fetch_add(1, Ordering::Relaxed);
            log::info!("signed up {name}");
            Ok(BalancerReply::Ok)
        }
        BalancerRequest::Login {
            name,
            password,
            session_key,
        } => {
            if session_key.len() != 32 {
                return Err(Error::refused(
                    ErrorCode::BadRequest,
                    "the session key must be a 32-byte Ed25519 public key",
                ));
            }
            // The attempt is counted before any hashing, and locked-out pairs and addresses
            // are refused. Only valid names are remembered: a hostile client must not fill the
            // table with megabyte-long ones (its address is counted all the same).
            let named = names::validate("user", &name)
                .is_ok()
                .then_some(name.as_str());
            shared
                .logins
                .begin(named, from, HASH_PATIENCE)
                .map_err(|why| Error::refused(ErrorCode::RateLimited, why))?;
            let checked = hash_slot(shared).and_then(|_slot| {
                accounts::check_password(&shared.store, &shared.dummy_hash, &name, &password)
            });
            let outcome = match &checked {
                Ok(()) => Outcome::Right,
                Err(Error::Refused {
                    code: ErrorCode::InvalidCredentials,
                    ..
                }) => Outcome::Wrong,
                Err(_) => Outcome::Untried,
            };
            shared.logins.end(named, from, outcome);
            match outcome {
                Outcome::Right => shared.counters.logins.fetch_add(1, Ordering::Relaxed),
                Outcome::Wrong => shared
                    .counters
                    .failed_logins
                    .fetch_add(1, Ordering::Relaxed),
                Outcome::Untried => 0,
            };
            checked?;
            login(shared, name, session_key)
        }
        BalancerRequest::Logout { token, proof } => {
            let user = proven_session(shared, peer, &token, &proof)?;
            let hash = crypto::token_hash(token.as_bytes())?;
            shared.store.call(move |tx| tx.end_session(&hash))?;
            log::info!("{user} logged out");
            Ok(BalancerReply::Ok)
        }
        BalancerRequest::Resume {
            token,
            proof,
            avoid,
        } => {
            let (row, hash) = proven_row(shared, peer, &token, &proof)?;
            let server = assign(shared, avoid)?;
            // A session in use is renewed: once less than half its lifetime is left, it gets
            // a whole one again (one write per half lifetime, not per resume).
            let ttl = shared.config.token_ttl.as_millis() as i64;
            if row.expires_at - now_ms() < ttl / 2 {
                let expires = now_ms() + ttl;
                shared
                    .store
                    .call(move |tx| tx.renew_session(&hash, expires))?;
            }
            let user = row.user;
            log::info!("{user} resumed, assigned server {}", server.id);
            Ok(BalancerReply::LoggedIn {
                user,
                token,
                server,
            })
        }
        BalancerRequest::SetKeys { token, proof, keys } => {
            let user = proven_session(shared, peer, &token, &proof)?;
            accounts::check_keys(&keys)?;
            let owned = user.clone();
            if !shared.store.call(move |tx| tx.set_keys(&owned, &keys))? {
                return Err(Error::refused(
                    ErrorCode::NotAllowed,
                    format!(
                        "{user} already has keys; new ones are taken only after an operator \
                         resets the password (fastchat-admin users reset-password)"
                    ),
                ));
            }
            log::info!("{user} set new keys");
            Ok(BalancerReply::Ok)
        }
        BalancerRequest::Servers => Ok(BalancerReply::Servers {
            servers: shared.registry.lock().infos(shared.config.server_timeout),
        }),
        BalancerRequest::Keys { name, token, proof } => {
            proven_session(shared, peer, &token, &proof)?;
            names::validate("user", &name)?;
            let keys = shared
                .store
                .read(|tx| tx.user_keys(&name))?
                .ok_or_else(|| {
                    Error::refused(ErrorCode::UnknownUser, format!("no such user: {name}"))
                })?;
            if keys.x25519.is_empty() {
                return Err(Error::refused(
                    ErrorCode::NotAllowed,
                    format!(
                        "{name} has not finished signing up (an operator made the account; \
                         `fastchat signup {name}` with its password sets its keys)"
                    ),
                ));
            }
            Ok(BalancerReply::Keys { name, keys })
        }
        BalancerRequest::Prekeys {
            token,
            proof,
            signed,
            one_time,
        } => {
            let user = proven_session(shared, peer, &token, &proof)?;
            let n = publish_prekeys(shared, user, signed, one_time)?;
            Ok(BalancerReply::Prekeys { one_time: n })
        }
        BalancerRequest::Bundle { name, token, proof } => {
            proven_session(shared, peer, &token, &proof)?;
            names::validate("user", &name)?;
            let whose = name.clone();
            // On the writer: the one-time prekey handed out is deleted in the same commit, so
            // no two askers ever get the same one.
            let bundle = shared.store.call(move |tx| tx.take_bundle(&whose))?;
            if bundle.is_none() && !shared.store.read(|tx| tx.user_exists(&name))? {
                return Err(Error::refused(
                    ErrorCode::UnknownUser,
                    format!("no such user: {name}"),
                ));
            }
            Ok(BalancerReply::Bundle { name, bundle })
        }
        BalancerRequest::Register { addr, name } => {
            let sid = register(shared, peer, addr, name)?;
            peer.server_id = Some(sid);
            Ok(BalancerReply::Registered { server_id: sid })
        }
        BalancerRequest::Heartbeat {
            load,
            arrived,
            counts,
        } => {
            let sid = peer.server_id.ok_or_else(|| {
                Error::refused(ErrorCode::BadRequest, "heartbeat before register")
            })?;
            let peers = heartbeat(shared, sid, peer.link, load, arrived, counts)?;
            Ok(BalancerReply::Peers { peers })
        }
    }
}

/// Forgets the presence rows of servers that have not registered since this balancer started
/// [`FORGET_AFTER`] ago (they died before it started, or while it was down), once per
/// [`FORGET_AFTER`]: a user who was on one of them is not shown online for ever.
fn sweep_orphans(shared: &Shared) -> Result<()> {
    {
        let mut swept = shared.orphans_swept.lock();
        if swept.elapsed() < FORGET_AFTER {
            return Ok(());
        }
        *swept = std::time::Instant::now();
    }
    let with_rows = shared.store.read(|tx| tx.presence_servers())?;
    let orphans: Vec<u64> = {
        let registry = shared.registry.lock();
        with_rows
            .into_iter()
            .filter(|id| !registry.knows(*id))
            .collect()
    };
    for id in orphans {
        log::warn!(
            "server {id} has not registered for {FORGET_AFTER:?}: its clients are forgotten"
        );
        shared.store.call(move |tx| tx.forget_server(id))?;
    }
    Ok(())
}

/// A turn to hash a password, or `RateLimited` if none comes soon.
fn hash_slot(shared: &Shared) -> Result<accounts::HashSlot<'_>> {
    shared.hashing.take(HASH_PATIENCE).ok_or_else(|| {
        Error::refused(
            ErrorCode::RateLimited,
            "the balancer is busy checking passwords; try again in a moment",
        )
    })
}

fn login(shared: &Shared, user: String, session_key: Vec<u8>) -> Result<BalancerReply> {
    let server = assign(shared, None)?;
    let token = crypto::new_token()?;
    let hash = crypto::token_hash(token.as_bytes())?;
    let expires = now_ms() + shared.config.token_ttl.as_millis() as i64;
    let owned = user.clone();
    shared
        .store
        .call(move |tx| tx.create_session(&hash, &owned, expires, &session_key))?;
    log::info!("{user} logged in, assigned server {}", server.id);
    Ok(BalancerReply::LoggedIn {
        user,
        token,
        server,
    })
}

/// A live server for a client (not `avoid`, which it just lost). A balancer that has just
/// started (after a crash or `scripts/cluster.sh restart`) knows no server yet: the ones still
/// running register again at their next heartbeat, so for [`Config::server_timeout`] after
/// its start it waits for one rather than send a client away.
fn assign(shared: &Shared, avoid: Option<u64>) -> Result<ServerInfo> {
    let timeout = shared.config.server_timeout;
    let patience = shared.started + timeout;
    loop {
        if let Some(server) = shared
            .registry
            .lock()
            .assign(shared.config.algo, timeout, avoid)
        {
            return Ok(server);
        }
        let now = Instant::now();
        if now >= patience {
            return Err(Error::refused(
                ErrorCode::NoServers,
                "no chat server is available; start one with fastchat-server",
            ));
        }
        std::thread::sleep((patience - now).min(Duration::from_millis(20)));
    }
}

/// Registers a chat server: with TLS, only a connection that presented a `server`
/// certificate of the cluster, under the name in it.
fn register(shared: &Shared, peer: &Peer, addr: String, claimed: String) -> Result<u64> {
    let name = if shared.config.transport.is_tls() {
        match &peer.member {
            Some(m) if m.role == Role::Server && m.name == claimed => m.name.clone(),
            Some(m) if m.role == Role::Server => {
                return Err(Error::refused(
                    ErrorCode::NotAllowed,
                    format!("your certificate is server {}'s, not {claimed}'s", m.name),
                ))
            }
            _ => {
                return Err(Error::refused(
                    ErrorCode::NotAllowed,
                    "only a chat server with a certificate of this cluster may register",
                ))
            }
        }
    } else {
        names::validate("server", &claimed)?;
        claimed
    };
    if addr.parse::<SocketAddr>().is_err() {
        return Err(Error::refused(
            ErrorCode::BadRequest,
            format!("{addr:?} is not a socket address"),
        ));
    }
    let (owned_name, owned_addr) = (name.clone(), addr.clone());
    let sid = shared
        .store
        .call(move |tx| tx.register_server(&owned_name, &owned_addr))?;
    shared
        .registry
        .lock()
        .register(sid, &name, &addr, peer.link, shared.config.server_timeout)
        .map_err(|why| Error::refused(ErrorCode::NotAllowed, why))?;
    log::info!("server {sid} ({name}) registered at {addr}");
    Ok(sid)
}

fn heartbeat(
    shared: &Shared,
    sid: u64,
    link: u64,
    load: u32,
    arrived: u64,
    counts: crate::net::Counts,
) -> Result<Vec<ServerInfo>> {
    let (peers, dead) = {
        let mut reg = shared.registry.lock();
        if !reg.report(sid, link, load, arrived, counts) {
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
    sweep_orphans(shared)?;
    Ok(peers)
}
