//! The peer mesh: one outbound link from this server to each other live server.
//!
//! A message stored here for a user connected to server B is relayed on the link to B, which
//! hands it to its router: exactly one peer hop. Links are one-directional (each server sends on
//! its own outbound links and receives on the links its peers opened), so a link's thread only
//! ever writes. The set of links follows the peer list that the balancer returns on every
//! heartbeat.
//!
//! Relaying is best-effort by design: every relayed message is already committed, so a message
//! lost with a broken link is still delivered from the queue on the recipient's next sync.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::mailbox::{self, Receiver, RecvTimeoutError, Sender, TrySendError};
use parking_lot::Mutex;

use crate::error::Result;
use crate::net::{Envelope, FrameWriter, ServerInfo, ServerRequest};

/// Messages waiting on one link before new ones are dropped (they stay stored).
const LINK_QUEUE: usize = 65_536;

/// A committed message and its recipients on one peer server.
#[derive(Debug)]
pub struct Relayed {
    /// The message.
    pub msg: Arc<Envelope>,
    /// Recipients connected to that server.
    pub users: Vec<String>,
}

struct Link {
    addr: String,
    tx: Sender<Arc<Relayed>>,
    thread: JoinHandle<()>,
}

/// The outbound links of one server, keyed by peer server id.
///
/// A lock and not a channel: the map changes only on heartbeats (twice a second), and a relay is
/// a lookup plus a `try_send`.
pub struct Peers {
    me: u64,
    secret: Vec<u8>,
    links: Mutex<HashMap<u64, Link>>,
    stopping: Arc<AtomicBool>,
}

impl Peers {
    /// No links yet; `me` and `secret` identify this server to its peers.
    pub fn new(me: u64, secret: Vec<u8>, stopping: Arc<AtomicBool>) -> Peers {
        Peers {
            me,
            secret,
            links: Mutex::new(HashMap::new()),
            stopping,
        }
    }

    /// Opens links to new peers and closes links to peers that are gone.
    pub fn update(&self, peers: &[ServerInfo]) {
        let mut links = self.links.lock();
        links.retain(|id, link| {
            let keep = peers.iter().any(|p| p.id == *id && p.addr == link.addr);
            if !keep {
                log::info!("peer {id} at {} left the mesh", link.addr);
            }
            keep
        });
        for p in peers {
            if p.id == self.me || links.contains_key(&p.id) {
                continue;
            }
            match self.open(p) {
                Ok(link) => {
                    log::info!("peer {} at {} joined the mesh", p.id, p.addr);
                    links.insert(p.id, link);
                }
                Err(e) => log::error!("cannot start link to peer {}: {e}", p.id),
            }
        }
    }

    fn open(&self, peer: &ServerInfo) -> Result<Link> {
        let (tx, rx) = mailbox::bounded(LINK_QUEUE);
        let hello = ServerRequest::PeerHello {
            server_id: self.me,
            secret: self.secret.clone(),
        };
        let addr = peer.addr.clone();
        let stopping = Arc::clone(&self.stopping);
        let peer_id = peer.id;
        let thread = std::thread::Builder::new()
            .name(format!("peer-{peer_id}"))
            .spawn(move || link_loop(peer_id, &addr, &hello, &rx, &stopping))?;
        Ok(Link {
            addr: peer.addr.clone(),
            tx,
            thread,
        })
    }

    /// Whether a link to `peer` exists.
    pub fn has_link(&self, peer: u64) -> bool {
        self.links.lock().contains_key(&peer)
    }

    /// Opens a link to `peer` at `addr` unless one exists (before the heartbeat lists it).
    pub fn ensure(&self, peer: u64, addr: &str) {
        let mut links = self.links.lock();
        if peer == self.me || links.contains_key(&peer) {
            return;
        }
        let info = ServerInfo {
            id: peer,
            addr: addr.to_string(),
            load: 0,
        };
        match self.open(&info) {
            Ok(link) => {
                log::info!("peer {peer} at {addr} linked on demand");
                links.insert(peer, link);
            }
            Err(e) => log::error!("cannot start link to peer {peer}: {e}"),
        }
    }

    /// Queues a stored message for the peer server `to`. `false` if there is no link or its queue
    /// is full (the message stays stored and is delivered on the recipient's next sync).
    pub fn relay(&self, to: u64, item: &Arc<Relayed>) -> bool {
        let links = self.links.lock();
        let Some(link) = links.get(&to) else {
            log::debug!("no link to server {to}; message {} waits", item.msg.id);
            return false;
        };
        match link.tx.try_send(Arc::clone(item)) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                log::warn!(
                    "link to server {to} is backed up; message {} waits",
                    item.msg.id
                );
                false
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }

    /// Closes every link and waits for the link threads.
    pub fn close(&self) {
        let links: Vec<Link> = self.links.lock().drain().map(|(_, l)| l).collect();
        for link in links {
            drop(link.tx);
            let _ = link.thread.join();
        }
    }
}

/// Connects (and reconnects) to a peer and writes relayed messages until the link is dropped.
///
/// Messages written since the last successful flush are kept and written again after a
/// reconnect, so a broken link does not leave a gap that would let a later message overtake an
/// earlier one (the peer may get some twice; clients drop duplicates by id).
fn link_loop(
    peer: u64,
    addr: &str,
    hello: &ServerRequest,
    rx: &Receiver<Arc<Relayed>>,
    stopping: &AtomicBool,
) {
    let Ok(sockaddr) = addr.parse::<SocketAddr>() else {
        log::error!("peer {peer} has a bad address {addr:?}");
        return;
    };
    let mut unsent: Vec<Arc<Relayed>> = Vec::new();
    while !stopping.load(Ordering::SeqCst) {
        let stream = match TcpStream::connect_timeout(&sockaddr, Duration::from_secs(1)) {
            Ok(s) => s,
            Err(e) => {
                log::debug!("peer {peer} at {addr} unreachable: {e}");
                // Wait before retrying, but notice the link being closed.
                match rx.recv_deadline(std::time::Instant::now() + Duration::from_millis(250)) {
                    Err(RecvTimeoutError::Disconnected) => return,
                    Ok(msg) => unsent.push(msg),
                    Err(RecvTimeoutError::Timeout) => {}
                }
                // A peer that stays away must not make this list grow without bound.
                if unsent.len() > LINK_QUEUE {
                    unsent.drain(..unsent.len() - LINK_QUEUE);
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
        let mut w = FrameWriter::new(stream);
        if w.send(hello).is_err() {
            continue;
        }
        match pump(&mut w, rx, &mut unsent) {
            Ok(()) => return,
            Err(e) => log::warn!("link to peer {peer} at {addr} broke: {e}; reconnecting"),
        }
    }
}

/// Writes `unsent` and then queued messages, flushing whenever the queue runs dry; a message
/// leaves `unsent` only once a flush that included it succeeded. `Ok` when the link is closed.
fn pump(
    w: &mut FrameWriter<TcpStream>,
    rx: &Receiver<Arc<Relayed>>,
    unsent: &mut Vec<Arc<Relayed>>,
) -> Result<()> {
    loop {
        for msg in unsent.iter() {
            w.write(&relay(msg))?;
        }
        w.flush()?;
        unsent.clear();
        match rx.recv() {
            Ok(msg) => unsent.push(msg),
            Err(_) => return Ok(()),
        }
        while unsent.len() < 1024 {
            match rx.try_recv() {
                Ok(more) => unsent.push(more),
                Err(_) => break,
            }
        }
    }
}

fn relay(item: &Relayed) -> ServerRequest {
    ServerRequest::Relay {
        msg: Arc::clone(&item.msg),
        users: item.users.clone(),
    }
}
