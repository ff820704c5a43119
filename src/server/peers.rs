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
//!                                 └── peer-N asleep: the writer writes on its wire itself ──┘
//! socket from N ──▶ connection thread: serve_inbound ──▶ Router (local recipients)
//! ```
//!
//! As with a client connection (`outbound::Wire`), a link's channel and queue are behind a
//! lock its thread holds whenever it is awake; while it sleeps with everything written, the
//! thread that relays (the writer after a commit, unless it is swamped) writes the message
//! itself, without blocking, and wakes the link's thread only if bytes are left for the
//! socket. A relay then costs no wake-up of the link's thread. Unlike a delivery to a client,
//! a relay is written by the writer after a batch with an awaited message too: it is one
//! write, and handing it over put one more thread between the message and its recipient
//! (three servers, ten clients at a window of one: p50 0.58 -> 0.52 ms, p90 1.33 -> 1.19 ms,
//! six alternating pairs; BENCHMARKS.md).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};

use super::router::Router;
use crate::error::{Error, Result};
use crate::mailbox::{self, Receiver, Sender, TrySendError};
use crate::net::{Envelope, ErrorCode, Greeting, PeerMessage, ServerEvent, ServerInfo, MAX_FRAME};
use crate::throttle::Quiet;
use crate::transport::tls::LINK_TIMEOUT;
use crate::transport::{Channel, Expect, Transport, Waker};

/// Messages waiting on one link before new ones are dropped (they stay stored).
const LINK_QUEUE: usize = 65_536;

/// How long a peer the heartbeat stopped listing is not linked to on demand (the balancer
/// forgets a silent server, and its users' presence rows, after ten seconds).
const DEPARTED_FOR: Duration = Duration::from_secs(15);

/// The longest pause between attempts to reach a peer.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(5);

/// "Backed up" is said once a second at most: it can be true of every message for a while.
static BACKED_UP: Quiet = Quiet::new(Duration::from_secs(1));

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
    wire: Arc<LinkWire>,
    thread: JoinHandle<()>,
}

/// A link's sending state, shared by its thread (which holds the lock whenever it is awake)
/// and the threads that relay on it while it sleeps.
struct LinkWire {
    state: Mutex<LinkState>,
    /// Rung by the link's mailbox, and by a relaying thread that left bytes for the socket.
    waker: Arc<Waker>,
}

struct LinkState {
    /// The link, nonblocking, while it is up.
    ch: Option<Channel>,
    rx: Receiver<Arc<Relayed>>,
    /// Messages taken from the queue and not yet known to be written: kept until a flush that
    /// included them succeeded, and written again on the next link if this one breaks.
    unsent: Vec<Arc<Relayed>>,
    /// How many of `unsent` are in the channel's write buffer already (or written).
    queued: usize,
}

impl LinkState {
    /// Moves what the queue holds (`limit` at most) to `unsent`; `false` once the queue is
    /// closed (the link is dropped) and empty.
    fn take(&mut self, limit: usize) -> bool {
        while self.unsent.len() < limit {
            match self.rx.try_recv() {
                Ok(msg) => self.unsent.push(msg),
                Err(crossbeam_channel::TryRecvError::Empty) => break,
                Err(crossbeam_channel::TryRecvError::Disconnected) => return false,
            }
        }
        true
    }

    /// Puts the messages not yet queued into the channel's write buffer.
    fn queue(&mut self) -> Result<()> {
        let ch = self.ch.as_mut().ok_or_else(not_linked)?;
        for msg in &self.unsent[self.queued..] {
            ch.queue(&relay(msg))?;
        }
        self.queued = self.unsent.len();
        Ok(())
    }

    /// After a flush that wrote everything: nothing is unsent.
    fn written(&mut self) {
        self.unsent.clear();
        self.queued = 0;
    }
}

impl LinkWire {
    /// Writes `item` on the link from the calling thread if the link's thread sleeps with
    /// everything written and nothing else holds the wire; `false` if it did not.
    fn send_now(&self, item: &Arc<Relayed>, tx: &Sender<Arc<Relayed>>) -> bool {
        let Some(mut st) = self.state.try_lock() else {
            return false;
        };
        // Announced only under the lock, by a thread about to sleep with nothing unsent.
        let idle = st.ch.as_ref().is_some_and(|ch| ch.pending() == 0) && st.unsent.is_empty();
        if !idle || !tx.receiver_sleeping() {
            return false;
        }
        // What reached the queue since goes first (it rang the thread, which will find it gone).
        st.take(usize::MAX);
        st.unsent.push(Arc::clone(item));
        let flushed = st.queue().and_then(|()| match st.ch.as_mut() {
            Some(ch) => ch.flush(),
            None => Ok(false),
        });
        match flushed {
            Ok(true) => st.written(),
            // Bytes left for the socket, or a failure: the link's thread takes over (writes the
            // rest, or links again and writes everything unsent).
            Ok(false) | Err(_) => self.waker.wake(),
        }
        true
    }
}

/// The outbound links of one server, keyed by peer server id.
///
/// A lock and not a channel: the map changes only on heartbeats (twice a second), and a relay is
/// a lookup plus a `try_send`.
pub struct Peers {
    me: u64,
    /// Our certificate, to present to peers, and the CA to check theirs.
    transport: Transport,
    links: Mutex<HashMap<u64, Link>>,
    /// Peers the heartbeat stopped listing, and when: not linked again on demand until the
    /// balancer lists them again (a stopped server's users keep their presence rows for a
    /// while, and linking to it for each of their messages only to drop the link at the next
    /// heartbeat would flap).
    departed: Mutex<HashMap<u64, Instant>>,
    stopping: Arc<AtomicBool>,
    /// Relays for servers being linked to on demand, in order, until the link is up (they
    /// then go first, so that no later message overtakes them).
    pub pending: Mutex<HashMap<u64, Vec<Arc<Relayed>>>>,
}

impl Peers {
    /// No links yet; this server is `me`, and proves it with `transport`'s certificate.
    pub fn new(me: u64, transport: Transport, stopping: Arc<AtomicBool>) -> Peers {
        Peers {
            me,
            transport,
            links: Mutex::new(HashMap::new()),
            departed: Mutex::new(HashMap::new()),
            stopping,
            pending: Mutex::default(),
        }
    }

    /// Opens links to new peers and closes links to peers that are gone.
    pub fn update(&self, peers: &[ServerInfo]) {
        let mut links = self.links.lock();
        let mut departed = self.departed.lock();
        links.retain(|id, link| {
            let keep = peers.iter().any(|p| p.id == *id && p.addr == link.addr);
            if !keep {
                log::info!("peer {id} at {} left the mesh", link.addr);
                departed.insert(*id, Instant::now());
            }
            keep
        });
        departed.retain(|id, at| at.elapsed() < DEPARTED_FOR && !peers.iter().any(|p| p.id == *id));
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
        let waker = Arc::new(Waker::new()?);
        let (tx, rx) = mailbox::lazy_with(LINK_QUEUE, Arc::clone(&waker));
        let wire = Arc::new(LinkWire {
            state: Mutex::new(LinkState {
                ch: None,
                rx,
                unsent: Vec::new(),
                queued: 0,
            }),
            waker,
        });
        let target = Target {
            id: peer.id,
            name: peer.name.clone(),
            addr: peer.addr.clone(),
            hello: Greeting::Peer { server_id: self.me },
        };
        let transport = self.transport.clone();
        let stopping = Arc::clone(&self.stopping);
        let link_wire = Arc::clone(&wire);
        let thread = std::thread::Builder::new()
            .name(format!("peer-{}", peer.id))
            .spawn(move || link_loop(&target, &transport, &link_wire, &stopping))?;
        Ok(Link {
            addr: peer.addr.clone(),
            tx,
            wire,
            thread,
        })
    }

    /// Whether a link to `peer` exists.
    pub fn has_link(&self, peer: u64) -> bool {
        self.links.lock().contains_key(&peer)
    }

    /// Opens a link to `peer` unless one exists (before the heartbeat lists it), or the
    /// heartbeat stopped listing it lately.
    pub fn ensure(&self, peer: &ServerInfo) {
        let mut links = self.links.lock();
        if peer.id == self.me || links.contains_key(&peer.id) {
            return;
        }
        if self
            .departed
            .lock()
            .get(&peer.id)
            .is_some_and(|at| at.elapsed() < DEPARTED_FOR)
        {
            log::debug!(
                "peer {} left the mesh lately; not linking on demand",
                peer.id
            );
            return;
        }
        match self.open(peer) {
            Ok(link) => {
                log::info!("peer {} at {} linked on demand", peer.id, peer.addr);
                links.insert(peer.id, link);
            }
            Err(e) => log::error!("cannot start link to peer {}: {e}", peer.id),
        }
    }

    /// Writes a stored message on the link to the peer server `to` if its thread sleeps and
    /// the caller is not a writer that is swamped ([`crate::db::writer::swamped`]), else
    /// queues it for the link's thread.
    /// `false` if there is no link or its queue is full (the message stays stored and is
    /// delivered on the recipient's next sync).
    pub fn relay(&self, to: u64, item: &Arc<Relayed>) -> bool {
        let links = self.links.lock();
        let Some(link) = links.get(&to) else {
            log::debug!("no link to server {to}; message {} waits", item.msg.id);
            return false;
        };
        if !crate::db::writer::swamped() && link.wire.send_now(item, &link.tx) {
            return true;
        }
        match link.tx.try_send(Arc::clone(item)) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                BACKED_UP.warn(&format!(
                    "link to server {to} is backed up; message {} waits",
                    item.msg.id
                ));
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

/// The server a link goes to.
struct Target {
    id: u64,
    /// The name its certificate must state.
    name: String,
    addr: String,
    /// Our greeting.
    hello: Greeting,
}

/// Connects (and reconnects) to a peer and writes relayed messages until the link is dropped.
///
/// Messages written since the last successful flush are kept and written again after a
/// reconnect, so a broken link does not leave a gap that would let a later message overtake an
/// earlier one (the peer may get some twice; clients drop duplicates by id).
fn link_loop(target: &Target, transport: &Transport, wire: &LinkWire, stopping: &AtomicBool) {
    let peer = target.id;
    let what = format!("peer server {peer}");
    let expect = Expect::Server(Some(target.name.clone()));
    // Held whenever this thread is awake (see `LinkWire`).
    let mut st = wire.state.lock();
    // Logged once when the link goes down and once when it is back; attempts in between
    // back off from 250 ms to five seconds.
    let mut down = false;
    let mut pause = Duration::ZERO;
    while !stopping.load(Ordering::SeqCst) {
        let link = transport
            .connect(&target.addr, &what, &expect)
            .and_then(Channel::new)
            .and_then(|mut ch| {
                ch.stream().tcp().set_write_timeout(Some(LINK_TIMEOUT))?;
                ch.send(&target.hello)?;
                ch.set_nonblocking(true)?;
                Ok(ch)
            });
        let ch = match link {
            Ok(ch) => ch,
            Err(e) => {
                if !down {
                    log::warn!(
                        "{what} at {} unreachable: {e}; retrying, less and less often",
                        target.addr
                    );
                    down = true;
                }
                pause = (pause * 2).clamp(Duration::from_millis(250), MAX_RETRY_PAUSE);
                // Wait before retrying, keeping what is queued meanwhile, but notice the link
                // being closed.
                if !wait_out(&mut st, &wire.waker, Instant::now() + pause) {
                    return;
                }
                // A peer that stays away must not make this list grow without bound.
                if st.unsent.len() > LINK_QUEUE {
                    let extra = st.unsent.len() - LINK_QUEUE;
                    st.unsent.drain(..extra);
                }
                continue;
            }
        };
        if down {
            log::info!("link to {what} at {} is back", target.addr);
        }
        pause = Duration::ZERO;
        st.ch = Some(ch);
        st.queued = 0;
        let pumped = pump(&mut st, &wire.waker);
        st.ch = None;
        match pumped {
            Ok(()) => return,
            Err(e) => {
                log::warn!("link to {what} at {} broke: {e}; reconnecting", target.addr);
                down = true;
            }
        }
    }
}

/// Sleeps until `until`, taking what is queued meanwhile into `unsent`; `false` once the link
/// is dropped.
fn wait_out(st: &mut MutexGuard<'_, LinkState>, waker: &Waker, until: Instant) -> bool {
    loop {
        if !st.take(usize::MAX) {
            return false;
        }
        if Instant::now() >= until {
            return true;
        }
        if st.rx.prepare_wait() {
            let rung = MutexGuard::unlocked(st, || waker.sleep(Some(until)));
            st.rx.woke(rung.unwrap_or(true));
        }
    }
}

/// Writes what is unsent and then queued messages, flushing whenever the queue runs dry; a
/// message leaves `unsent` only once a flush that included it succeeded. Sleeps (letting go of
/// the wire) when everything is written. `Ok` when the link is dropped.
fn pump(st: &mut MutexGuard<'_, LinkState>, waker: &Waker) -> Result<()> {
    loop {
        let limit = st.unsent.len() + 1024;
        let open = st.take(limit);
        st.queue()?;
        let ch = st.ch.as_mut().ok_or_else(not_linked)?;
        if !ch.flush_before(Instant::now() + LINK_TIMEOUT)? {
            return Err(Error::Io(std::io::ErrorKind::TimedOut.into()));
        }
        st.written();
        if !open {
            return Ok(());
        }
        if !st.rx.prepare_wait() {
            continue;
        }
        // Asleep, announced: the relaying thread may write on the link meanwhile.
        let rung = MutexGuard::unlocked(st, || waker.sleep(None));
        st.rx.woke(rung.unwrap_or(true));
    }
}

/// The link is not up (a state the link's own thread never asks to write in).
fn not_linked() -> Error {
    Error::Io(std::io::ErrorKind::NotConnected.into())
}

fn relay(item: &Relayed) -> PeerMessage {
    PeerMessage::Relay {
        msg: Arc::clone(&item.msg),
        users: item.users.clone(),
    }
}

/// Serves a link a peer opened to this server (after its greeting was checked): relayed
/// messages go to their local recipients until the link ends or `stop` is set. However it
/// ends, the peer may have committed messages it never relayed: every local connection then
/// re-reads its queue. The same when the link comes `again` after an absence: while it was
/// away the peer stored messages for local users without relaying them.
pub fn serve_inbound(
    ch: &mut Channel,
    router: &Router,
    stop: &Waker,
    peer: u64,
    again: bool,
) -> Result<()> {
    ch.set_nonblocking(true)?;
    log::debug!("peer {peer} linked in");
    if again {
        log::info!("link from peer {peer} is back; re-syncing local clients");
        router.resync_all();
    }
    struct ResyncOnEnd<'a>(&'a Router, u64);
    impl Drop for ResyncOnEnd<'_> {
        fn drop(&mut self) {
            log::info!("link from peer {} ended; re-syncing local clients", self.1);
            self.0.resync_all();
        }
    }
    let _resync = ResyncOnEnd(router, peer);
    loop {
        match ch.recv_until::<PeerMessage>(MAX_FRAME, None, Some(stop)) {
            Ok(Some(PeerMessage::Relay { msg, users })) => {
                // With more relays read, the recipients' threads send this one.
                super::outbound::behind_while(ch.has_frame(), || router.deliver(&users, &msg));
            }
            Ok(None) => return Ok(()),
            Err(e @ (Error::Malformed(_) | Error::FrameTooLarge { .. })) => {
                let bad = ServerEvent::refused(None, ErrorCode::BadFrame, e.to_string());
                let _ = ch.send_before(&bad, std::time::Instant::now() + LINK_TIMEOUT);
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
    use crate::transport::pki::{self, Member, Role};
    use crate::transport::Stream;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::path::PathBuf;
    use std::time::Instant;

    /// A cluster folder with a balancer and two servers' certificates.
    struct Pki {
        _tmp: tempfile::TempDir,
        dir: PathBuf,
    }

    fn pki() -> Pki {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("tls");
        let member = |role, name: &str| Member {
            role,
            name: name.into(),
        };
        pki::init(
            &dir,
            &[
                member(Role::Balancer, "balancer"),
                member(Role::Server, "server-1"),
                member(Role::Server, "server-2"),
            ],
        )
        .unwrap();
        Pki { _tmp: tmp, dir }
    }

    fn relayed(id: i64) -> Arc<Relayed> {
        Arc::new(Relayed {
            msg: envelope(id),
            users: vec!["bob".into()],
        })
    }

    /// Accepts the next link within a few seconds as `as_server`, checks that it comes from
    /// server-1 (its certificate and its greeting), and returns it.
    fn accept_link(listener: &TcpListener, as_server: &Transport) -> Option<Channel> {
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let tcp = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => panic!("no link within 10 s: {e}"),
            }
        };
        let stream = as_server.accept(tcp, deadline, None).ok()?;
        assert_eq!(stream.peer().map(|m| m.name), Some("server-1".into()));
        let mut ch = Channel::new(stream).unwrap();
        ch.set_nonblocking(true).unwrap();
        match ch.recv_until::<Greeting>(1024, Some(deadline), None) {
            Ok(Some(Greeting::Peer { server_id: 1 })) => Some(ch),
            _ => None,
        }
    }

    fn next_id(ch: &mut Channel) -> i64 {
        let deadline = Some(Instant::now() + Duration::from_secs(10));
        match ch
            .recv_until::<PeerMessage>(MAX_FRAME, deadline, None)
            .unwrap()
        {
            Some(PeerMessage::Relay { msg, users }) => {
                assert_eq!(users, ["bob"]);
                msg.id
            }
            None => panic!("the link closed"),
        }
    }

    fn peers(p: &Pki) -> Peers {
        let me = Transport::member(&p.dir, "server-1").unwrap();
        Peers::new(1, me, Arc::new(AtomicBool::new(false)))
    }

    fn info(id: u64, name: &str, listener: &TcpListener) -> ServerInfo {
        ServerInfo {
            id,
            name: name.into(),
            addr: listener.local_addr().unwrap().to_string(),
            load: 0,
        }
    }

    #[test]
    fn a_link_proves_itself_greets_then_relays_in_order() {
        let p = pki();
        let server2 = Transport::member(&p.dir, "server-2").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let peers = peers(&p);
        assert!(!peers.relay(2, &relayed(1)), "no link yet");
        peers.update(&[info(2, "server-2", &listener)]);
        assert!(peers.has_link(2));
        for id in 1..=50 {
            assert!(peers.relay(2, &relayed(id)));
        }
        let mut ch = accept_link(&listener, &server2).expect("linked");
        let got: Vec<i64> = (0..50).map(|_| next_id(&mut ch)).collect();
        assert_eq!(got, (1..=50).collect::<Vec<_>>());
        peers.update(&[]);
        assert!(!peers.has_link(2), "a peer gone from the list is unlinked");
        peers.close();
    }

    /// A link's wire over a plain socket, its queue's sending side, and the peer's end.
    fn wire() -> (LinkWire, Sender<Arc<Relayed>>, Channel) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (theirs, _) = listener.accept().unwrap();
        let mut ch = Channel::new(Stream::plain(ours)).unwrap();
        ch.set_nonblocking(true).unwrap();
        let waker = Arc::new(Waker::new().unwrap());
        let (tx, rx) = mailbox::lazy_with(LINK_QUEUE, Arc::clone(&waker));
        let state = LinkState {
            ch: Some(ch),
            rx,
            unsent: Vec::new(),
            queued: 0,
        };
        let wire = LinkWire {
            state: Mutex::new(state),
            waker,
        };
        let mut peer = Channel::new(Stream::plain(theirs)).unwrap();
        peer.set_nonblocking(true).unwrap();
        (wire, tx, peer)
    }

    /// The link's thread announces that it sleeps, everything written.
    fn asleep(wire: &LinkWire) {
        assert!(wire.state.lock().rx.prepare_wait());
    }

    #[test]
    fn a_sleeping_link_is_written_by_the_relaying_thread_in_order() {
        let (wire, tx, mut peer) = wire();
        assert!(!wire.send_now(&relayed(1), &tx), "its thread is awake");
        assert!(wire.state.lock().rx.try_recv().is_err());
        asleep(&wire);
        // One that reached the queue first (its ring not yet rung) goes first.
        tx.try_send_quiet(relayed(2)).unwrap();
        assert!(wire.send_now(&relayed(3), &tx));
        assert!(wire.send_now(&relayed(4), &tx));
        assert!(!wire.waker.is_set(), "the link's thread was not woken");
        assert!(wire.state.lock().unsent.is_empty(), "all written");
        assert_eq!([2, 3, 4].map(|_| next_id(&mut peer)), [2, 3, 4]);
    }

    #[test]
    fn a_sleeping_link_whose_socket_fills_is_left_to_its_thread() {
        let (wire, tx, _peer) = wire();
        // The peer reads nothing: sooner or later the socket takes only part of a write.
        let mut sent = 0;
        while !wire.waker.is_set() && sent < 100_000 {
            asleep(&wire);
            assert!(wire.send_now(&relayed(sent + 1), &tx));
            sent += 1;
        }
        assert!(
            wire.waker.is_set(),
            "the link's thread was woken for the rest"
        );
        let st = wire.state.lock();
        assert!(st.ch.as_ref().is_some_and(|ch| ch.pending() > 0));
        assert!(!st.unsent.is_empty() && st.queued == st.unsent.len());
        drop(st);
        asleep(&wire);
        assert!(
            !wire.send_now(&relayed(sent + 1), &tx),
            "bytes wait for the socket: the next goes through the queue"
        );
    }

    #[test]
    fn a_link_refuses_a_peer_whose_certificate_is_another_servers() {
        let p = pki();
        // Listed as server-3, but the process there holds server-2's certificate.
        let server2 = Transport::member(&p.dir, "server-2").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let peers = peers(&p);
        peers.update(&[info(3, "server-3", &listener)]);
        peers.relay(3, &relayed(1));
        assert!(
            accept_link(&listener, &server2).is_none(),
            "no greeting, no relay"
        );
        peers.close();
    }

    #[test]
    fn a_broken_link_reconnects_and_what_comes_next_arrives() {
        let p = pki();
        let server2 = Transport::member(&p.dir, "server-2").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let peers = peers(&p);
        peers.ensure(&info(2, "server-2", &listener));
        peers.relay(2, &relayed(1));
        let mut first = accept_link(&listener, &server2).expect("linked");
        assert_eq!(next_id(&mut first), 1);
        drop(first);
        // Keep relaying until the link notices and comes back (a write into the dead socket
        // may still succeed once: relaying is best-effort, the database has it all).
        let relaying = std::thread::spawn({
            let peers = Arc::new(());
            move || drop(peers)
        });
        relaying.join().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut id = 1;
        listener.set_nonblocking(true).unwrap();
        let tcp = loop {
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
        let stream = server2
            .accept(tcp, Instant::now() + Duration::from_secs(10), None)
            .unwrap();
        let mut again = Channel::new(stream).unwrap();
        again.set_nonblocking(true).unwrap();
        let greeting = again
            .recv_until::<Greeting>(1024, Some(Instant::now() + Duration::from_secs(10)), None)
            .unwrap();
        assert!(matches!(greeting, Some(Greeting::Peer { server_id: 1 })));
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
                since: std::time::Instant::now(),
                wire: None,
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
        let mut ch = Channel::new(Stream::plain(inbound)).unwrap();
        let stop = Waker::new().unwrap();
        serve_inbound(&mut ch, &router, &stop, 2, false).unwrap();
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
