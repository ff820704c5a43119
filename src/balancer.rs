//! The balancer: the front door of a fastchat cluster.
//!
//! Clients sign up, log in (password checked against a salted scrypt hash), fetch public keys,
//! and are given a session token plus the chat server to use. Chat servers register here, report
//! their load every 500 ms, and learn their peers from the reply. A server that has not reported
//! for [`Config::server_timeout`] is out of rotation.
//!
//! Threads: the caller's thread accepts; each connection gets its own thread. The registry of
//! live servers is the only shared mutable state (a short lock; see [`Registry`]).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use parking_lot::Mutex;

use crate::crypto::{self, ScryptCost};
use crate::db::{self, Readers, Writer};
use crate::error::{Error, Result};
use crate::names;
use crate::net::{
    BalancerReply, BalancerRequest, ErrorCode, FrameReader, FrameWriter, PublicKeys, ServerInfo,
};
use crate::throttle::Logins;

/// Longest password accepted, in bytes.
pub const MAX_PASSWORD: usize = 1024;

/// How a chat server is chosen for each login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algo {
    /// Each live server in turn, by id.
    RoundRobin,
    /// A uniformly random live server.
    Random,
    /// The live server with the fewest clients (reported plus assigned since the report).
    LeastLoaded,
    /// Power of two choices: the less loaded of two random live servers.
    P2c,
}

impl Algo {
    /// Every algorithm with its command-line name.
    pub const ALL: [(&'static str, Algo); 4] = [
        ("round-robin", Algo::RoundRobin),
        ("random", Algo::Random),
        ("least-loaded", Algo::LeastLoaded),
        ("p2c", Algo::P2c),
    ];
}

impl FromStr for Algo {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Algo, String> {
        Algo::ALL
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, a)| *a)
            .ok_or_else(|| {
                let names: Vec<&str> = Algo::ALL.iter().map(|(n, _)| *n).collect();
                format!(
                    "unknown algorithm {s:?}; choose one of {}",
                    names.join(", ")
                )
            })
    }
}

impl fmt::Display for Algo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = Algo::ALL.iter().find(|(_, a)| a == self).map(|(n, _)| *n);
        f.write_str(name.unwrap_or("?"))
    }
}

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

/// A registered chat server, as the registry sees it.
struct Live {
    addr: String,
    /// Clients at the last report.
    load: u32,
    /// Logins assigned since the last report (so a burst of logins is spread, not piled up).
    assigned: u32,
    last_seen: Instant,
}

/// The live chat servers. Locked briefly by connection threads: a lookup or an update of a few
/// fields, far cheaper than a round trip to a registry thread.
struct Registry {
    servers: BTreeMap<u64, Live>,
    next: usize,
    rng: u64,
}

impl Registry {
    fn live(&self, timeout: Duration) -> impl Iterator<Item = (&u64, &Live)> {
        self.servers
            .iter()
            .filter(move |(_, s)| s.last_seen.elapsed() <= timeout)
    }

    fn random(&mut self, below: usize) -> usize {
        // xorshift64*: plenty for spreading load; seeded from OpenSSL at start.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) % below as u64) as usize
    }

    /// Chooses a server for one login and counts the assignment. `avoid` is skipped unless it
    /// is the only live server.
    fn assign(&mut self, algo: Algo, timeout: Duration, avoid: Option<u64>) -> Option<ServerInfo> {
        let mut live: Vec<(u64, u32)> = self
            .live(timeout)
            .map(|(id, s)| (*id, s.load + s.assigned))
            .collect();
        if live.len() > 1 {
            live.retain(|(id, _)| Some(*id) != avoid);
        }
        if live.is_empty() {
            return None;
        }
        let pick = match algo {
            Algo::RoundRobin => {
                self.next = self.next.wrapping_add(1);
                live[self.next % live.len()].0
            }
            Algo::Random => live[self.random(live.len())].0,
            Algo::LeastLoaded => live.iter().min_by_key(|(_, load)| *load)?.0,
            Algo::P2c => {
                // Two distinct choices (when there are two servers or more).
                let a = self.random(live.len());
                let b = (a + 1 + self.random(live.len().max(2) - 1)) % live.len();
                if live[a].1 <= live[b].1 {
                    live[a].0
                } else {
                    live[b].0
                }
            }
        };
        let s = self.servers.get_mut(&pick)?;
        s.assigned += 1;
        Some(ServerInfo {
            id: pick,
            addr: s.addr.clone(),
            load: s.load + s.assigned,
        })
    }

    fn infos(&self, timeout: Duration) -> Vec<ServerInfo> {
        self.live(timeout)
            .map(|(id, s)| ServerInfo {
                id: *id,
                addr: s.addr.clone(),
                load: s.load,
            })
            .collect()
    }
}

struct Shared {
    config: Config,
    writer: Writer,
    readers: Readers,
    registry: Mutex<Registry>,
    /// A password hash for names that do not exist, so a wrong name costs as much as a wrong
    /// password and timing does not reveal which names are registered.
    dummy_hash: String,
    /// Failed logins per name and address. A lock, not a thread: each use is a map lookup.
    logins: Mutex<Logins>,
    /// What a chat server must show to register (from the shared database).
    cluster_key: Vec<u8>,
}

/// Serves the balancer on `listener` until a message arrives on `shutdown` (or it is dropped).
pub fn run(listener: TcpListener, config: Config, shutdown: Receiver<()>) -> Result<()> {
    let cluster_key = db::cluster_key(&db::open(&config.db)?)?;
    let shared = Arc::new(Shared {
        writer: Writer::start(&config.db)?,
        readers: Readers::new(&config.db),
        registry: Mutex::new(Registry {
            servers: BTreeMap::new(),
            next: usize::MAX,
            rng: crypto::random_u64()? | 1,
        }),
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
    let stopping = Arc::new(AtomicBool::new(false));
    let waker = stop_on_signal(shutdown, Arc::clone(&stopping), addr)?;
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
        let spawned = std::thread::Builder::new()
            .name("balancer-conn".into())
            .spawn(move || {
                let peer = stream.peer_addr().ok();
                if let Err(e) = serve(stream, &shared) {
                    log::debug!("connection {peer:?} ended: {e}");
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot start a connection thread: {e}");
        }
    }
    let _ = waker.join();
    log::info!("balancer stopped");
    Ok(())
}

/// Starts a thread that waits for `shutdown`, then sets `stopping` and connects to `addr` so a
/// blocking `accept` returns.
pub(crate) fn stop_on_signal(
    shutdown: Receiver<()>,
    stopping: Arc<AtomicBool>,
    addr: SocketAddr,
) -> Result<std::thread::JoinHandle<()>> {
    Ok(std::thread::Builder::new()
        .name("shutdown".into())
        .spawn(move || {
            let _ = shutdown.recv();
            stopping.store(true, Ordering::SeqCst);
            let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
        })?)
}

/// Idle connections are closed after this long without a request.
const IDLE: Duration = Duration::from_secs(60);

fn serve(stream: TcpStream, shared: &Shared) -> Result<()> {
    let from = stream.peer_addr()?.ip();
    stream.set_read_timeout(Some(IDLE))?;
    stream.set_nodelay(true)?;
    let mut reader = FrameReader::new(stream.try_clone()?);
    let mut writer = FrameWriter::new(stream);
    // Set once this connection registers as a chat server's link.
    let mut server_id: Option<u64> = None;
    loop {
        let request = match reader.read::<BalancerRequest>() {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(e @ (Error::Malformed(_) | Error::FrameTooLarge(_))) => {
                let _ = writer.send(&BalancerReply::Error {
                    id: None,
                    code: ErrorCode::BadFrame,
                    message: e.to_string(),
                });
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let id = request_id(&request);
        let reply = match handle(request, shared, from, &mut server_id) {
            Ok(reply) => reply,
            Err(Error::Refused { code, message }) => BalancerReply::Error {
                id: Some(id),
                code,
                message,
            },
            Err(Error::InvalidName(message)) => BalancerReply::Error {
                id: Some(id),
                code: ErrorCode::InvalidName,
                message,
            },
            Err(e) => {
                log::error!("request {id} failed: {e}");
                BalancerReply::Error {
                    id: Some(id),
                    code: ErrorCode::Internal,
                    message: "internal error; nothing was changed".into(),
                }
            }
        };
        writer.send(&reply)?;
    }
}

fn request_id(r: &BalancerRequest) -> u64 {
    match r {
        BalancerRequest::Signup { id, .. }
        | BalancerRequest::Login { id, .. }
        | BalancerRequest::Resume { id, .. }
        | BalancerRequest::Logout { id, .. }
        | BalancerRequest::Servers { id }
        | BalancerRequest::Keys { id, .. }
        | BalancerRequest::Register { id, .. }
        | BalancerRequest::Heartbeat { id, .. } => *id,
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
            id,
            name,
            password,
            keys,
        } => {
            signup(shared, &name, &password, keys)?;
            log::info!("signed up {name}");
            Ok(BalancerReply::Ok { id })
        }
        BalancerRequest::Login { id, name, password } => {
            // Locked-out names and addresses are refused before any hashing.
            shared
                .logins
                .lock()
                .check(&name, from)
                .map_err(|why| Error::refused(ErrorCode::RateLimited, why))?;
            match check_password(shared, &name, &password) {
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
            login(shared, id, name)
        }
        BalancerRequest::Logout { id, token } => {
            let hash = crypto::token_hash(token.as_bytes())?;
            shared.writer.call(move |c| db::end_session(c, &hash))?;
            Ok(BalancerReply::Ok { id })
        }
        BalancerRequest::Resume { id, token, avoid } => {
            let hash = crypto::token_hash(token.as_bytes())?;
            let user = shared
                .readers
                .with(|c| db::session_user(c, &hash))?
                .ok_or_else(|| {
                    Error::refused(ErrorCode::InvalidToken, "session expired; log in again")
                })?;
            let server = assign(shared, avoid)?;
            log::info!("{user} resumed, assigned server {}", server.id);
            Ok(BalancerReply::LoggedIn {
                id,
                user,
                token,
                server,
            })
        }
        BalancerRequest::Servers { id } => Ok(BalancerReply::Servers {
            id,
            servers: shared.registry.lock().infos(shared.config.server_timeout),
        }),
        BalancerRequest::Keys { id, name } => {
            names::validate("user", &name)?;
            let keys = shared
                .readers
                .with(|c| db::user_keys(c, &name))?
                .ok_or_else(|| {
                    Error::refused(ErrorCode::UnknownUser, format!("no such user: {name}"))
                })?;
            Ok(BalancerReply::Keys { id, name, keys })
        }
        BalancerRequest::Register {
            id,
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
            Ok(BalancerReply::Registered { id, server_id: sid })
        }
        BalancerRequest::Heartbeat { id, load } => {
            let sid = server_id.ok_or_else(|| {
                Error::refused(ErrorCode::BadRequest, "heartbeat before register")
            })?;
            let peers = heartbeat(shared, sid, load)?;
            Ok(BalancerReply::Peers { id, peers })
        }
    }
}

fn signup(shared: &Shared, name: &str, password: &str, keys: PublicKeys) -> Result<()> {
    names::validate("user", name)?;
    if password.is_empty() {
        return Err(Error::refused(
            ErrorCode::BadRequest,
            "password must not be empty",
        ));
    }
    if password.len() > MAX_PASSWORD {
        return Err(Error::refused(
            ErrorCode::BadRequest,
            format!("password is longer than {MAX_PASSWORD} bytes"),
        ));
    }
    if keys.x25519.len() != 32 || keys.ed25519.len() != 32 {
        return Err(Error::refused(
            ErrorCode::BadRequest,
            "public keys must be 32-byte X25519 and Ed25519 keys",
        ));
    }
    let hash = crypto::hash_password(password, shared.config.scrypt)?;
    let owned = name.to_string();
    let created = shared
        .writer
        .call(move |c| db::create_user(c, &owned, &hash, &keys))?;
    if !created {
        return Err(Error::refused(
            ErrorCode::NameTaken,
            format!("the name {name} is taken"),
        ));
    }
    Ok(())
}

fn check_password(shared: &Shared, name: &str, password: &str) -> Result<()> {
    let invalid = || {
        Error::refused(
            ErrorCode::InvalidCredentials,
            "invalid username or password",
        )
    };
    let stored = if names::validate("user", name).is_ok() && password.len() <= MAX_PASSWORD {
        shared.readers.with(|c| db::password_hash(c, name))?
    } else {
        None
    };
    match stored {
        Some(hash) if crypto::verify_password(password, &hash)? => Ok(()),
        Some(_) => Err(invalid()),
        None => {
            // Same work as a real check, so the answer time does not reveal unknown names.
            let _ = crypto::verify_password(password, &shared.dummy_hash);
            Err(invalid())
        }
    }
}

fn login(shared: &Shared, id: u64, user: String) -> Result<BalancerReply> {
    let server = assign(shared, None)?;
    let token = crypto::new_token()?;
    let hash = crypto::token_hash(token.as_bytes())?;
    let expires = db::now_ms() + shared.config.token_ttl.as_millis() as i64;
    let owned = user.clone();
    shared
        .writer
        .call(move |c| db::create_session(c, &hash, &owned, expires))?;
    log::info!("{user} logged in, assigned server {}", server.id);
    Ok(BalancerReply::LoggedIn {
        id,
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
        .writer
        .call(move |c| db::register_server(c, &owned, known, &hash))?
        .ok_or_else(|| {
            Error::refused(ErrorCode::InvalidToken, "unknown server id or wrong secret")
        })?;
    shared.registry.lock().servers.insert(
        sid,
        Live {
            addr: addr.clone(),
            load: 0,
            assigned: 0,
            last_seen: Instant::now(),
        },
    );
    log::info!("server {sid} registered at {addr}");
    Ok(sid)
}

/// Servers silent for this long are forgotten: their presence rows are removed.
const FORGET_AFTER: Duration = Duration::from_secs(10);

fn heartbeat(shared: &Shared, sid: u64, load: u32) -> Result<Vec<ServerInfo>> {
    let (peers, dead) = {
        let mut reg = shared.registry.lock();
        if let Some(s) = reg.servers.get_mut(&sid) {
            s.load = load;
            s.assigned = 0;
            s.last_seen = Instant::now();
        } else {
            return Err(Error::refused(
                ErrorCode::BadRequest,
                "unknown server; register again",
            ));
        }
        let dead: Vec<u64> = reg
            .servers
            .iter()
            .filter(|(_, s)| s.last_seen.elapsed() > FORGET_AFTER)
            .map(|(id, _)| *id)
            .collect();
        for id in &dead {
            reg.servers.remove(id);
        }
        let mut peers = reg.infos(shared.config.server_timeout);
        peers.retain(|p| p.id != sid);
        (peers, dead)
    };
    for id in dead {
        log::warn!("server {id} silent for {FORGET_AFTER:?}: forgotten");
        shared.writer.call(move |c| db::forget_server(c, id))?;
    }
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(loads: &[u32]) -> Registry {
        let mut servers = BTreeMap::new();
        for (i, load) in loads.iter().enumerate() {
            servers.insert(
                i as u64 + 1,
                Live {
                    addr: format!("127.0.0.1:{}", 1000 + i),
                    load: *load,
                    assigned: 0,
                    last_seen: Instant::now(),
                },
            );
        }
        Registry {
            servers,
            next: usize::MAX,
            rng: 0x1234_5678_9abc_def1,
        }
    }

    const T: Duration = Duration::from_secs(2);

    fn counts(reg: &mut Registry, algo: Algo, n: usize) -> Vec<usize> {
        let mut c = vec![0; reg.servers.len()];
        for _ in 0..n {
            let s = reg.assign(algo, T, None).unwrap();
            c[s.id as usize - 1] += 1;
        }
        c
    }

    #[test]
    fn round_robin_is_exact() {
        assert_eq!(
            counts(&mut registry(&[0, 0, 0]), Algo::RoundRobin, 30),
            [10, 10, 10]
        );
    }

    #[test]
    fn least_loaded_fills_the_gaps_first() {
        let mut reg = registry(&[5, 0, 2]);
        assert_eq!(counts(&mut reg, Algo::LeastLoaded, 8), [0, 5, 3]);
    }

    #[test]
    fn random_and_p2c_use_every_server() {
        for algo in [Algo::Random, Algo::P2c] {
            let c = counts(&mut registry(&[0, 0, 0]), algo, 300);
            assert!(c.iter().all(|&n| n > 50), "{algo}: {c:?}");
        }
    }

    #[test]
    fn p2c_avoids_the_heavy_server() {
        let c = counts(&mut registry(&[1000, 0, 0]), Algo::P2c, 100);
        assert_eq!(c[0], 0, "{c:?}");
    }

    #[test]
    fn silent_servers_are_out_of_rotation() {
        let mut reg = registry(&[0, 0]);
        reg.servers.get_mut(&1).unwrap().last_seen = Instant::now() - Duration::from_secs(3);
        assert_eq!(counts(&mut reg, Algo::RoundRobin, 4), [0, 4]);
        reg.servers.get_mut(&2).unwrap().last_seen = Instant::now() - Duration::from_secs(3);
        assert!(reg.assign(Algo::LeastLoaded, T, None).is_none());
    }

    #[test]
    fn avoided_server_is_skipped_unless_alone() {
        let mut reg = registry(&[0, 0]);
        for _ in 0..4 {
            assert_eq!(reg.assign(Algo::RoundRobin, T, Some(1)).unwrap().id, 2);
        }
        let mut alone = registry(&[0]);
        assert_eq!(alone.assign(Algo::RoundRobin, T, Some(1)).unwrap().id, 1);
    }

    #[test]
    fn algo_names_parse_and_print() {
        for (name, algo) in Algo::ALL {
            assert_eq!(name.parse::<Algo>().unwrap(), algo);
            assert_eq!(algo.to_string(), name);
        }
        assert!("fastest"
            .parse::<Algo>()
            .unwrap_err()
            .contains("round-robin"));
    }
}
