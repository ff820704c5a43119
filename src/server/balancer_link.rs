//! The server's link to the balancer: registration (mutual TLS: the balancer knows the server by
//! its certificate, the server knows the balancer by its own), then a heartbeat every
//! [`HEARTBEAT`] whose reply is the peer list. Reconnects and registers again (same name, so the
//! same id) if the balancer restarts. Each beat also closes the local connections whose
//! session ended (logout or expiry), wherever that happened.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::config::Config;
use super::shared::Shared;
use crate::balancer::registry::FORGET_AFTER;
use crate::db::now_ms;
use crate::error::{Error, Result};
use crate::net::{
    BalancerReply, BalancerRequest, Counts, Request, Response, ServerInfo, MAX_FRAME,
};
use crate::transport::tls::LINK_TIMEOUT;
use crate::transport::{Channel, Expect, Transport};

/// How often the load is reported to the balancer.
pub const HEARTBEAT: Duration = Duration::from_millis(500);

/// A connection to the balancer, registered.
pub struct BalancerLink {
    addr: String,
    advertise: String,
    /// The name this server registers under.
    pub name: String,
    transport: Transport,
    /// The id the balancer gave at the last registration.
    pub server_id: u64,
    conn: Option<Channel>,
    next_id: u64,
}

impl BalancerLink {
    /// A link to the balancer at `addr`, not yet connected.
    fn new(config: &Config, addr: &str, advertise: &str, name: &str) -> BalancerLink {
        BalancerLink {
            addr: addr.to_string(),
            advertise: advertise.to_string(),
            name: name.to_string(),
            transport: config.transport.clone(),
            server_id: 0,
            conn: None,
            next_id: 1,
        }
    }

    /// Registers as `name` with every balancer of `config`: the first that answers gives
    /// the id (retrying until `startup_timeout`; a refusal is final); the links to the others
    /// come back unconnected and register in their own threads ([`BalancerLink::run`]). Every
    /// balancer gives a name the same id: ids live in the database they share.
    pub fn connect(
        config: &Config,
        advertise: &str,
        name: &str,
    ) -> Result<(BalancerLink, Vec<BalancerLink>)> {
        let addrs = config.balancers();
        if addrs.is_empty() {
            return Err(Error::Invalid("no balancer address given".into()));
        }
        let mut links: Vec<BalancerLink> = addrs
            .iter()
            .map(|a| BalancerLink::new(config, a, advertise, name))
            .collect();
        let deadline = Instant::now() + config.startup_timeout;
        let mut said = false;
        loop {
            for i in 0..links.len() {
                match links[i].register() {
                    Ok(()) => {
                        let first = links.swap_remove(i);
                        for other in &mut links {
                            other.server_id = first.server_id;
                        }
                        return Ok((first, links));
                    }
                    Err(e @ (Error::Refused { .. } | Error::Integrity(_))) => return Err(e),
                    Err(e) if Instant::now() >= deadline && i + 1 == links.len() => return Err(e),
                    Err(e) => {
                        // Said once; the error at the deadline says the rest.
                        if !said {
                            log::warn!(
                                "balancer {} not reachable yet: {e}; retrying for up to {} s",
                                links[i].addr,
                                config.startup_timeout.as_secs()
                            );
                            said = true;
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Sends one request on the open connection and reads its response.
    fn request(&mut self, body: BalancerRequest) -> Result<BalancerReply> {
        let id = self.next_id;
        self.next_id += 1;
        let ch = self
            .conn
            .as_mut()
            .ok_or_else(|| Error::Protocol("not connected to the balancer".into()))?;
        ch.send(&Request { id, body })?;
        match ch.recv::<Response<BalancerReply>>(MAX_FRAME)? {
            Some(response) if response.id == Some(id) || response.id.is_none() => {
                response.into_result()
            }
            Some(other) => Err(Error::Protocol(format!(
                "the balancer answered request {:?}, not {id}",
                other.id
            ))),
            None => Err(Error::Io(std::io::ErrorKind::UnexpectedEof.into())),
        }
    }

    fn register(&mut self) -> Result<()> {
        self.conn = None;
        let stream = self
            .transport
            .connect(&self.addr, "balancer", &Expect::Balancer)?;
        let ch = Channel::new(stream)?;
        ch.stream().tcp().set_read_timeout(Some(LINK_TIMEOUT))?;
        ch.stream().tcp().set_write_timeout(Some(LINK_TIMEOUT))?;
        self.conn = Some(ch);
        let reply = self.request(BalancerRequest::Register {
            addr: self.advertise.clone(),
            name: self.name.clone(),
        });
        match reply {
            Ok(BalancerReply::Registered { server_id }) => {
                self.server_id = server_id;
                Ok(())
            }
            Ok(other) => {
                self.conn = None;
                Err(Error::Protocol(format!(
                    "unexpected reply to Register: {other:?}"
                )))
            }
            Err(e) => {
                self.conn = None;
                Err(e)
            }
        }
    }

    fn heartbeat(&mut self, load: u32, arrived: u64, counts: Counts) -> Result<Vec<ServerInfo>> {
        match self.request(BalancerRequest::Heartbeat {
            load,
            arrived,
            counts,
        })? {
            BalancerReply::Peers { peers } => Ok(peers),
            other => Err(Error::Protocol(format!(
                "unexpected reply to Heartbeat: {other:?}"
            ))),
        }
    }

    /// Heartbeats until the server stops. The `main` link also does the server's periodic
    /// housekeeping (expiry, presence, ended sessions, quotas), whether its balancer answers
    /// or not; the links to further balancers only register and beat.
    pub fn run(mut self, shared: &Shared, main: bool) {
        let mut lost = false;
        // Since when the balancer has refused to register this server.
        let mut refused_since: Option<Instant> = None;
        let mut expired_at: Option<Instant> = None;
        while !shared.stopping.load(Ordering::SeqCst) {
            let every = EXPIRE_EVERY.min(shared.config.quotas.lifetime / 2);
            if main && expired_at.is_none_or(|t| t.elapsed() >= every) {
                expired_at = Some(Instant::now());
                expire_old_messages(shared);
            }
            if self.conn.is_none() {
                match self.register() {
                    Ok(()) => {
                        if self.server_id == shared.server_id {
                            log::info!(
                                "registered with the balancer {} as server {}",
                                self.addr,
                                self.server_id
                            );
                        } else {
                            log::error!("balancer gave a new id; this server keeps its old one");
                            self.server_id = shared.server_id;
                        }
                        lost = false;
                        refused_since = None;
                        rejoin(shared);
                    }
                    Err(e) => {
                        let refused = matches!(e, Error::Refused { .. });
                        if !lost {
                            if refused {
                                log::warn!("balancer {} refuses this server: {e}", self.addr);
                            } else {
                                log::warn!("balancer {} unreachable: {e}; retrying", self.addr);
                            }
                            lost = true;
                        }
                        if refused {
                            let since = *refused_since.get_or_insert_with(Instant::now);
                            if since.elapsed() >= FORGET_AFTER {
                                detach(shared, &e);
                            }
                        }
                        self.conn = None;
                    }
                }
            }
            if self.conn.is_some() {
                let load = shared.clients.load(Ordering::SeqCst);
                let arrived = shared.arrived.load(Ordering::SeqCst);
                match self.heartbeat(load, arrived, shared.counts()) {
                    Ok(peers) => {
                        *shared.live_peers.lock() = peers.iter().map(|p| p.id).collect();
                        shared.peers.update(&peers);
                    }
                    Err(e) => {
                        log::warn!("heartbeat failed: {e}");
                        self.conn = None;
                        continue;
                    }
                }
            }
            if main {
                if let Err(e) = super::presence::tick(shared) {
                    log::debug!("presence: {e}");
                }
                close_ended_sessions(shared);
                close_forgotten_connections(shared);
                super::refresh_quota_watch(shared);
            }
            // Sleep one period, or less if the server stops meanwhile.
            let _ = shared.stop_signal.recv_timeout(HEARTBEAT);
        }
    }
}

/// How often a server deletes the messages past their lifetime (more often if the lifetime
/// is short).
const EXPIRE_EVERY: Duration = Duration::from_secs(60);

/// Most messages deleted by one expiry (the rest go next time): one job never holds the
/// database's write lock for long.
const EXPIRE_BATCH: usize = 10_000;

/// Deletes the messages stored longer ago than their lifetime, with the files they offer.
fn expire_old_messages(shared: &Shared) {
    let lifetime = shared.config.quotas.lifetime;
    let before = now_ms() - lifetime.as_millis() as i64;
    shared.store.submit(
        move |tx| tx.expire_messages(before, EXPIRE_BATCH),
        move |res| match res {
            Ok(0) => {}
            Ok(n) => log::info!(
                "deleted {n} messages stored more than {} days ago",
                lifetime.as_secs() / 86_400
            ),
            Err(e) => log::warn!("cannot delete old messages: {e}"),
        },
    );
}

/// The balancer has refused this server for as long as it takes to forget a silent one:
/// whoever it lets in under this name (or nobody), this server is out of the cluster. Its
/// clients are closed so that they fail over at once, and it takes no new ones (a client that
/// still comes is told to ask the balancer for another).
fn detach(shared: &Shared, why: &Error) {
    if shared.detached.swap(true, Ordering::SeqCst) {
        return;
    }
    let n = shared.router.cut(&shared.router.settled(Duration::ZERO));
    log::error!(
        "the balancer has refused this server for {} s ({why}); closed its {n} connections \
         and takes no clients until it is let back in",
        FORGET_AFTER.as_secs()
    );
}

/// The balancer registered this server again: it takes clients again (if it had stopped).
fn rejoin(shared: &Shared) {
    if shared.detached.swap(false, Ordering::SeqCst) {
        log::info!("the balancer let this server back in; taking clients again");
    }
}

/// A connection this old without a presence row lost it to the balancer, not to a race
/// with its own login (which writes the row before the session starts).
const SETTLED: Duration = Duration::from_secs(2);

/// Closes the local connections whose presence rows are gone: the balancer forgot this
/// server while it was stopped or cut off (it deletes a silent server's rows after ten
/// seconds), so nothing would be routed to them live. Their clients reconnect (to whichever
/// server the balancer gives them), write their rows again and read their queues: nothing is
/// lost, and live delivery resumes.
fn close_forgotten_connections(shared: &Shared) {
    let settled = shared.router.settled(SETTLED);
    if settled.is_empty() {
        return;
    }
    match shared
        .store
        .read(|tx| tx.present_connections(shared.server_id))
    {
        Ok(present) => {
            let present: std::collections::HashSet<u64> = present.into_iter().collect();
            let forgotten: Vec<u64> = settled
                .into_iter()
                .filter(|c| !present.contains(c))
                .collect();
            if !forgotten.is_empty() {
                let n = shared.router.cut(&forgotten);
                log::warn!(
                    "{n} connections had lost their presence rows (the balancer forgot this \
                     server while it was away); closed them so their clients reconnect"
                );
            }
        }
        Err(e) => log::warn!("cannot check this server's presence rows: {e}"),
    }
}

/// Closes the local connections whose session has ended (a logout on any balancer, or
/// expiry): the database is where sessions live, so every server hears of it.
fn close_ended_sessions(shared: &Shared) {
    match shared.store.read(|tx| tx.ended_sessions(shared.server_id)) {
        Ok(ended) if !ended.is_empty() => {
            let n = shared.router.cut(&ended);
            log::info!("closed {n} connections whose session ended");
        }
        Ok(_) => {}
        Err(e) => log::warn!("cannot check for ended sessions: {e}"),
    }
}
