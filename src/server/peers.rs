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
//!
//! ```text
//! db-writer (after commit) ── relay ──▶ Link: mailbox ──▶ peer-N thread ──▶ socket to N
//! socket from N ──▶ connection thread: serve_inbound ──▶ Router (local recipients)
//! ```

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;

use super::router::Router;
use crate::error::{Error, Result};
use crate::mailbox::{self, Receiver, RecvTimeoutError, Sender, TrySendError};
use crate::net::{Envelope, FrameReader, FrameWriter, Greeting, PeerMessage, ServerInfo};

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
        let hello = Greeting::Peer {
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
    hello: &Greeting,
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

fn relay(item: &Relayed) -> PeerMessage {
    PeerMessage::Relay {
        msg: Arc::clone(&item.msg),
        users: item.users.clone(),
    }
}

/// Serves a link a peer opened to this server (after its [`Greeting::Peer`] was checked):
/// relayed messages go to their local recipients until the link ends. However it ends, the
/// peer may have committed messages it never relayed: every local connection then re-reads
/// its queue.
pub fn serve_inbound(
    reader: &mut FrameReader<TcpStream>,
    router: &Router,
    peer: u64,
) -> Result<()> {
    reader.get_ref().set_read_timeout(None)?;
    log::debug!("peer {peer} linked in");
    struct ResyncOnEnd<'a>(&'a Router, u64);
    impl Drop for ResyncOnEnd<'_> {
        fn drop(&mut self) {
            log::info!("link from peer {} ended; re-syncing local clients", self.1);
            self.0.resync_all();
        }
    }
    let _resync = ResyncOnEnd(router, peer);
    loop {
        match reader.read::<PeerMessage>() {
            Ok(Some(PeerMessage::Relay { msg, users })) => {
                router.deliver(&users, &msg);
            }
            Ok(None) => return Ok(()),
            Err(e @ (Error::Malformed(_) | Error::FrameTooLarge { .. })) => {
                super::outbound::refuse_once(
                    reader.get_ref(),
                    crate::net::ErrorCode::BadFrame,
                    &e.to_string(),
                );
                return Err(e);
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::encode_into;
    use crate::server::outbound::{Handle, Outbound};
    use crate::server::testing::{envelope, Flag};
    use std::io::Write;
    use std::net::TcpListener;
    use std::time::Instant;

    fn relayed(id: i64) -> Arc<Relayed> {
        Arc::new(Relayed {
            msg: envelope(id),
            users: vec!["bob".into()],
        })
    }

    /// Accepts the next link within a few seconds and checks its greeting.
    fn accept_link(listener: &TcpListener, me: u64) -> FrameReader<TcpStream> {
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => panic!("no link within 10 s: {e}"),
            }
        };
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut r = FrameReader::new(stream);
        match r.read::<Greeting>().unwrap() {
            Some(Greeting::Peer { server_id, secret }) => {
                assert_eq!(server_id, me);
                assert_eq!(secret, b"secret".to_vec());
            }
            other => panic!("expected a peer greeting, got {other:?}"),
        }
        r
    }

    fn next_id(r: &mut FrameReader<TcpStream>) -> i64 {
        match r.read::<PeerMessage>().unwrap() {
            Some(PeerMessage::Relay { msg, users }) => {
                assert_eq!(users, ["bob"]);
                msg.id
            }
            None => panic!("the link closed"),
        }
    }

    fn peers() -> Peers {
        Peers::new(1, b"secret".to_vec(), Arc::new(AtomicBool::new(false)))
    }

    fn info(id: u64, listener: &TcpListener) -> ServerInfo {
        ServerInfo {
            id,
            addr: listener.local_addr().unwrap().to_string(),
            load: 0,
        }
    }

    #[test]
    fn a_link_greets_then_relays_in_order() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let peers = peers();
        assert!(!peers.relay(2, &relayed(1)), "no link yet");
        peers.update(&[info(2, &listener)]);
        assert!(peers.has_link(2));
        for id in 1..=50 {
            assert!(peers.relay(2, &relayed(id)));
        }
        let mut r = accept_link(&listener, 1);
        let got: Vec<i64> = (0..50).map(|_| next_id(&mut r)).collect();
        assert_eq!(got, (1..=50).collect::<Vec<_>>());
        peers.update(&[]);
        assert!(!peers.has_link(2), "a peer gone from the list is unlinked");
        peers.close();
    }

    #[test]
    fn a_broken_link_reconnects_and_what_comes_next_arrives() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let peers = peers();
        peers.ensure(2, &info(2, &listener).addr);
        peers.relay(2, &relayed(1));
        let mut first = accept_link(&listener, 1);
        assert_eq!(next_id(&mut first), 1);
        drop(first);
        // Keep relaying until the link notices and comes back (a write into the dead socket
        // may still succeed once: relaying is best-effort, the database has it all).
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut id = 1;
        let stream = loop {
            id += 1;
            peers.relay(2, &relayed(id));
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("no reconnect within 10 s: {e}"),
            }
        };
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut again = FrameReader::new(stream);
        assert!(matches!(
            again.read::<Greeting>().unwrap(),
            Some(Greeting::Peer { server_id: 1, .. })
        ));
        peers.relay(2, &relayed(1000));
        let mut seen = Vec::new();
        while seen.last() != Some(&1000) {
            seen.push(next_id(&mut again));
        }
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "in order: {seen:?}");
        peers.close();
    }

    #[test]
    fn an_inbound_link_delivers_locally_and_its_end_resyncs_everyone() {
        let router = Router::default();
        let (tx, rx) = mailbox::lazy::<Outbound>(16);
        router.add(
            "bob",
            Handle {
                conn_id: 1,
                tx,
                cut: Arc::new(Flag::default()),
            },
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (inbound, _) = listener.accept().unwrap();
        let mut frames = Vec::new();
        for id in [5, 6] {
            encode_into(
                &mut frames,
                &PeerMessage::Relay {
                    msg: envelope(id),
                    users: vec!["bob".into(), "nobody".into()],
                },
            )
            .unwrap();
        }
        peer.write_all(&frames).unwrap();
        drop(peer);
        let mut reader = FrameReader::new(inbound);
        serve_inbound(&mut reader, &router, 2).unwrap();
        let got: Vec<String> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|o| match o {
                Outbound::Message(m) => format!("message {}", m.id),
                Outbound::Resync => "resync".to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(got, ["message 5", "message 6", "resync"]);
    }
}
