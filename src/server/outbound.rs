//! A client connection's outbound side: what other threads hand its thread to send, the handle
//! they reach it by, and what its thread does with each item (including the sync of the
//! client's queue at login, page by page).
//!
//! ```text
//! db-writer (Stored,  ─┐             its thread asleep, its wire free? send it now ──▶ Channel
//!   live messages)     ├─▶ Handle ──┤
//! peer links ──────────┘             else: mailbox (bounded) + waker ──▶ the connection's thread:
//!                                      full? cut the connection      Delivery::put ──▶ Channel
//! ```
//!
//! The connection's sending state (its channel, mailbox and [`Delivery`]) is a [`Wire`]: its
//! thread holds the wire's lock for a whole turn and lets go only to sleep in `poll`. A thread
//! that hands it an item while it sleeps takes the lock and sends the item itself, after what
//! the mailbox holds, so the connection's thread is not woken for it: at a moderate rate a
//! delivery used to cost the recipient's thread a wake-up of its own (a context switch in and
//! out, the eventfd's write and read, a `poll`).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::Receiver;
use parking_lot::{Mutex, MutexGuard};

use super::shared::Refusals;
use crate::db::Store;
use crate::error::Result;
use crate::mailbox::{self, Sender, TrySendError};
use crate::net::{Envelope, Response, ServerEvent};
use crate::transport::{Channel, Waker};

/// Messages read from the database per page during a sync.
const SYNC_PAGE: usize = 256;

/// The longest a reply queued quietly ([`Handle::offer_quiet`]) waits for the connection's
/// thread to wake for something else before the thread wakes for it alone.
pub const QUIET_WITHIN: std::time::Duration = std::time::Duration::from_millis(10);

/// A slot of a connection's file window, given back when dropped: a file chunk holds one from
/// the moment its request is read until it is committed (upload) or queued for the socket
/// (download), so a client can make the server hold only a few chunks at a time.
#[derive(Debug)]
pub struct Permit(Receiver<()>);

impl Permit {
    /// A taken slot; `free` is the receiving side of the window's bounded channel, whose
    /// sending side was used to take it.
    pub fn new(free: Receiver<()>) -> Permit {
        Permit(free)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let _ = self.0.try_recv();
    }
}

/// What a connection's thread is asked to send.
#[derive(Debug)]
pub enum Outbound {
    /// A reply or notice, written as is. Boxed, like a chunk's, so that an item is small: a
    /// connection's mailbox keeps its current block of 31 slots for as long as it lives, and
    /// a slot of the whole event made it 4 KiB (BENCHMARKS.md).
    Event(Box<ServerEvent>),
    /// A file chunk; its window slot is given back once it is queued for the socket.
    Chunk(Box<ServerEvent>, Permit),
    /// A live message. Dropped if it arrives before the queue is synced (the sync reads it from
    /// the database) or if the sync already sent it.
    Message(Arc<Envelope>),
    /// Send everything queued in the database for this user, then `Synced`.
    Sync,
    /// Send again everything still queued for this user (the client drops what it has seen):
    /// a peer that died may have committed messages it never relayed.
    Resync,
}

impl Outbound {
    /// A reply or notice.
    pub fn event(event: ServerEvent) -> Outbound {
        Outbound::Event(Box::new(event))
    }
}

/// How another thread cuts a connection off (its queue is full, its session ended): the
/// connection's thread then notices and ends.
pub trait Cut: Send + Sync {
    /// Ends the connection.
    fn cut(&self);
}

/// A connection's cut-off: a flag its thread checks, and the waker that makes it look.
pub struct ConnCut {
    cut: AtomicBool,
    waker: Arc<Waker>,
}

impl ConnCut {
    /// A cut-off that wakes the thread sleeping on `waker`.
    pub fn new(waker: Arc<Waker>) -> ConnCut {
        ConnCut {
            cut: AtomicBool::new(false),
            waker,
        }
    }

    /// Whether the connection was cut off.
    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }
}

impl Cut for ConnCut {
    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.waker.wake();
    }
}

/// One local connection, as other threads reach it.
#[derive(Clone)]
pub struct Handle {
    /// Unique per server run.
    pub conn_id: u64,
    /// The connection's outbound mailbox (it rings the connection's waker).
    pub tx: Sender<Outbound>,
    /// Cuts the connection off (a client whose queue is full, a session that ended).
    pub cut: Arc<dyn Cut>,
    /// When the connection's session started here.
    pub since: Instant,
    /// The connection's sending state, for sending while its thread sleeps (`None`: always
    /// through the mailbox).
    pub wire: Option<Arc<Wire>>,
}

impl Handle {
    /// Sends now if the connection's thread sleeps, nothing else holds its wire (see
    /// [`Wire`]) and the caller has no more work waiting (a database writer that is behind,
    /// [`crate::db::writer::behind`], or see [`behind_while`]: the connection's thread can
    /// send it on the other core); else queues without blocking. On a full queue the
    /// connection is cut off and `false` returned (everything it was sent stays stored for
    /// its next login); `false` too once the connection's thread has ended.
    pub fn offer(&self, item: Outbound) -> bool {
        let item = match &self.wire {
            Some(wire) if !crate::db::writer::behind() && !BEHIND.with(Cell::get) => {
                match wire.send_now(item, &self.tx, self.cut.as_ref()) {
                    Ok(()) => return true,
                    Err(item) => item,
                }
            }
            _ => item,
        };
        self.offered(self.tx.try_send(item))
    }

    /// Like [`Handle::offer`], without waking the connection's thread: it sends the item when
    /// it next wakes, which it does within [`QUIET_WITHIN`] while it waits for such items.
    pub fn offer_quiet(&self, item: Outbound) -> bool {
        self.offered(self.tx.try_send_quiet(item))
    }

    fn offered(&self, sent: std::result::Result<(), TrySendError<Outbound>>) -> bool {
        match sent {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                log::warn!(
                    "connection {} is not reading; disconnecting it",
                    self.conn_id
                );
                self.cut.cut();
                false
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }
}

/// A connection's sending side, shared by its thread and the threads that hand it items.
///
/// The connection's thread holds the lock for a whole turn (reading requests, sending replies
/// and its mailbox's items) and lets go only while it sleeps in `poll`, having announced that
/// it sleeps to its mailbox. A thread with an item for it ([`Handle::offer`]) that finds the
/// lock free and the thread asleep sends what the mailbox holds and then its item, and flushes
/// as far as the socket takes without blocking; only if something is left for the socket, or
/// a sync is to be read, does it wake the connection's thread. Order holds: whatever reached
/// the mailbox before the item goes first, and the connection's thread sleeps only with
/// nothing of its own left to send.
pub struct Wire {
    /// `None` once the connection's thread has ended (the channel, and the socket, are closed
    /// with it).
    state: Mutex<Option<Sending>>,
    waker: Arc<Waker>,
    refusals: Arc<Refusals>,
}

/// What a [`Wire`]'s lock guards.
pub struct Sending {
    /// The client's channel (reads too: a TLS session is used by one thread at a time).
    pub chan: Channel,
    /// The connection's mailbox.
    pub rx: mailbox::Receiver<Outbound>,
    /// What the connection has sent of the user's queue.
    pub delivery: Delivery,
}

impl Wire {
    /// The wire of a connection whose thread sleeps on `waker`; refusals sent are counted in
    /// `refusals`.
    pub fn new(sending: Sending, waker: Arc<Waker>, refusals: Arc<Refusals>) -> Wire {
        Wire {
            state: Mutex::new(Some(sending)),
            waker,
            refusals,
        }
    }

    /// The connection's thread takes the wire for a turn; `None` once it was closed.
    pub fn lock(&self) -> MutexGuard<'_, Option<Sending>> {
        self.state.lock()
    }

    /// Closes the channel and the mailbox (the connection's thread is ending): later offers
    /// find nobody and return `false`.
    pub fn close(&self) {
        self.state.lock().take();
    }

    /// Moves one item into the channel's write buffer, counting a refusal.
    pub fn put(&self, sending: &mut Sending, item: Outbound) -> Result<()> {
        if let Outbound::Event(event) = &item {
            if let ServerEvent::Reply(Response {
                result: Err(refusal),
                ..
            }) = &**event
            {
                *self.refusals.lock().entry(refusal.code).or_default() += 1;
            }
        }
        sending.delivery.put(item, &mut sending.chan)
    }

    /// Sends `item` from the calling thread if the connection's thread sleeps, its wire is
    /// free, and nothing is waiting for the socket or a sync; else gives it back. `tx` is the
    /// connection's mailbox (to tell whether its thread sleeps), `cut` ends the connection if
    /// the socket failed.
    fn send_now(
        &self,
        item: Outbound,
        tx: &Sender<Outbound>,
        cut: &dyn Cut,
    ) -> std::result::Result<(), Outbound> {
        let Some(mut guard) = self.state.try_lock() else {
            return Err(item);
        };
        // Announced only under the lock, by a thread about to let go of it and sleep with
        // nothing of its own to send: so the thread is between that and waking up.
        let sending = match guard.as_mut() {
            Some(s) if tx.receiver_sleeping() && !s.delivery.syncing() && s.chan.pending() == 0 => {
                s
            }
            _ => return Err(item),
        };
        let sent = self.send_all(sending, item);
        let left = sending.chan.pending() > 0 || sending.delivery.syncing();
        drop(guard);
        match sent {
            Ok(()) if left => self.waker.wake(),
            Ok(()) => {}
            Err(e) => {
                log::debug!("sending to a sleeping connection: {e}");
                cut.cut();
            }
        }
        Ok(())
    }

    /// What the mailbox holds, then `item`, into the channel; then a flush without blocking.
    fn send_all(&self, sending: &mut Sending, item: Outbound) -> Result<()> {
        while let Ok(earlier) = sending.rx.try_recv() {
            self.put(sending, earlier)?;
        }
        self.put(sending, item)?;
        sending.chan.flush()?;
        Ok(())
    }
}

thread_local! {
    /// Set while the calling thread offers items with more work waiting ([`behind_while`]).
    static BEHIND: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`, in which the [`Handle`]s the calling thread offers items to leave them to their
/// connections' threads if `behind` (more work waits for the caller: a peer link with more
/// relays read), instead of sending them themselves.
pub fn behind_while<R>(behind: bool, f: impl FnOnce() -> R) -> R {
    let before = BEHIND.with(|b| b.replace(behind));
    let r = f();
    BEHIND.with(|b| b.set(before));
    r
}

/// A sync in progress.
#[derive(Debug, Clone, Copy)]
struct Syncing {
    /// The highest message id sent so far.
    after: i64,
    /// A resync (the first sync is done).
    again: bool,
}

/// What a connection has sent of its user's queue, and what it holds back meanwhile.
///
/// The first sync reads the queue in pages (so a large backlog never sits whole in memory);
/// live messages that arrive meanwhile are dropped, because the sync reads them from the
/// database (they were committed before they were routed). After it, live messages with ids
/// above the last one synced are sent as they come. A resync reads the queue again from where
/// the last sync ended (everything up to there was read then; what a dead peer committed and
/// never relayed has a higher id, since ids follow commit order); live messages that arrive
/// meanwhile wait until it ends, so that nothing newer overtakes what it finds.
#[derive(Debug, Default)]
pub struct Delivery {
    /// The highest id the syncs sent; `None` until the first sync ended.
    synced_to: Option<i64>,
    /// Where the last sync ended reading the queue: every message for this user up to this id
    /// was sent by a sync.
    read_to: i64,
    syncing: Option<Syncing>,
    held: Vec<Arc<Envelope>>,
}

impl Delivery {
    /// Whether a sync is in progress (see [`Delivery::sync_page`]).
    pub fn syncing(&self) -> bool {
        self.syncing.is_some()
    }

    /// Takes one outbound item: frames go into `chan`'s write buffer.
    pub fn put(&mut self, item: Outbound, chan: &mut Channel) -> Result<()> {
        match item {
            Outbound::Event(e) => chan.queue(&e)?,
            Outbound::Chunk(e, permit) => {
                chan.queue(&e)?;
                drop(permit);
            }
            Outbound::Message(msg) => match (self.syncing, self.synced_to) {
                (Some(Syncing { again: true, .. }), _) => self.held.push(msg),
                (Some(_), _) => {}
                (None, Some(upto)) if msg.id > upto => {
                    chan.queue(&ServerEvent::Deliver { msg })?;
                }
                _ => {}
            },
            Outbound::Sync => {
                if self.syncing.is_none() && self.synced_to.is_none() {
                    self.syncing = Some(Syncing {
                        after: 0,
                        again: false,
                    });
                }
            }
            // A sync in progress already covers what a resync would find (ids follow commit
            // order, and what a dead peer committed is older than what the sync reads next).
            Outbound::Resync => {
                if self.syncing.is_none() && self.synced_to.is_some() {
                    self.syncing = Some(Syncing {
                        after: self.read_to,
                        again: true,
                    });
                }
            }
        }
        Ok(())
    }

    /// Sends the next page of the sync in progress (and `Synced`, after the last page).
    pub fn sync_page(&mut self, chan: &mut Channel, store: &Store, user: &str) -> Result<()> {
        let Some(mut s) = self.syncing else {
            return Ok(());
        };
        let page = store.read(|tx| tx.queued(user, s.after, SYNC_PAGE))?;
        let last_page = page.len() < SYNC_PAGE;
        for msg in page {
            s.after = msg.id;
            chan.queue(&ServerEvent::Deliver { msg: Arc::new(msg) })?;
        }
        if !last_page {
            self.syncing = Some(s);
            return Ok(());
        }
        chan.queue(&ServerEvent::Synced)?;
        self.syncing = None;
        self.read_to = self.read_to.max(s.after);
        // Ids follow commit order (db invariant 1), so every message for this user with an id
        // up to `s.after` was in the pages read; live messages with higher ids are new.
        let upto = self.synced_to.map_or(s.after, |t| t.max(s.after));
        self.synced_to = Some(upto);
        for msg in std::mem::take(&mut self.held) {
            if msg.id > upto {
                chan.queue(&ServerEvent::Deliver { msg })?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::Outgoing;
    use crate::net::{PublicKeys, MAX_FRAME};
    use crate::server::testing::{envelope, Flag};
    use crate::transport::Stream;

    #[test]
    fn an_outbound_item_is_small() {
        // A connection's mailbox keeps a block of 31 slots of this (plus a word each) once
        // anything has gone through it: 4 KiB when an event was held whole (120 bytes), 1 KiB
        // at 24.
        let size = std::mem::size_of::<Outbound>();
        assert!(size <= 24, "{size} bytes");
    }

    /// A channel whose other end is read back: the frames the delivery queued.
    fn channel() -> Result<(Channel, Channel)> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let a = std::net::TcpStream::connect(listener.local_addr()?)?;
        let (b, _) = listener.accept()?;
        Ok((
            Channel::new(Stream::plain(a))?,
            Channel::new(Stream::plain(b))?,
        ))
    }

    /// The message ids of the `Deliver`s (and a 0 for each `Synced`) that arrived.
    fn delivered(rx: &mut Channel, tx: &mut Channel) -> Result<Vec<i64>> {
        tx.flush()?;
        rx.stream()
            .tcp()
            .set_read_timeout(Some(std::time::Duration::from_millis(300)))?;
        let mut ids = Vec::new();
        while let Ok(Some(event)) = rx.recv::<ServerEvent>(MAX_FRAME) {
            match event {
                ServerEvent::Deliver { msg } => ids.push(msg.id),
                ServerEvent::Synced => ids.push(0),
                _ => {}
            }
        }
        Ok(ids)
    }

    /// What the client end read: `Deliver`s by id, replies by request id (negated), in order.
    fn read_back(rx: &mut Channel) -> Result<Vec<i64>> {
        rx.stream()
            .tcp()
            .set_read_timeout(Some(std::time::Duration::from_millis(300)))?;
        let mut seen = Vec::new();
        while let Ok(Some(event)) = rx.recv::<ServerEvent>(MAX_FRAME) {
            match event {
                ServerEvent::Deliver { msg } => seen.push(msg.id),
                ServerEvent::Reply(r) => seen.push(-(r.id.unwrap_or(0) as i64)),
                _ => {}
            }
        }
        Ok(seen)
    }

    /// A synced connection as other threads see it: its handle, wire, waker and cut-off flag,
    /// and the client's end of its socket.
    struct Wired {
        handle: Handle,
        wire: Arc<Wire>,
        waker: Arc<Waker>,
        cut: Arc<Flag>,
        client: Channel,
    }

    fn wired() -> Result<Wired> {
        let (mut server, client) = channel()?;
        server.set_nonblocking(true)?;
        let waker = Arc::new(Waker::new()?);
        let (tx, rx) = mailbox::lazy_with(64, Arc::clone(&waker));
        let sending = Sending {
            chan: server,
            rx,
            delivery: Delivery {
                synced_to: Some(0),
                ..Delivery::default()
            },
        };
        let wire = Arc::new(Wire::new(sending, Arc::clone(&waker), Arc::default()));
        let cut = Arc::new(Flag::default());
        let handle = Handle {
            conn_id: 1,
            tx,
            cut: cut.clone(),
            since: Instant::now(),
            wire: Some(Arc::clone(&wire)),
        };
        Ok(Wired {
            handle,
            wire,
            waker,
            cut,
            client,
        })
    }

    /// The connection's thread announces that it sleeps (as it does before it polls).
    fn sleep(wire: &Wire) {
        let guard = wire.lock();
        assert!(guard.as_ref().expect("open").rx.prepare_wait());
    }

    fn done(id: u64) -> Outbound {
        Outbound::event(ServerEvent::reply(id, crate::net::ServerReply::Done))
    }

    #[test]
    fn a_sleeping_connection_is_sent_to_at_once_after_its_mailbox_and_not_woken() -> Result<()> {
        let mut c = wired()?;
        sleep(&c.wire);
        // A reply queued quietly, then a message: the message's sender sends both, in order.
        assert!(c.handle.offer_quiet(done(1)));
        assert!(c.handle.offer(Outbound::Message(envelope(5))));
        assert!(c.handle.offer(Outbound::Message(envelope(6))));
        assert!(!c.waker.is_set(), "the connection's thread was not woken");
        assert!(c.wire.lock().as_ref().expect("open").rx.try_recv().is_err());
        assert_eq!(read_back(&mut c.client)?, [-1, 5, 6]);
        // A refusal sent this way is counted like one its thread sends.
        let refusal = ServerEvent::refused(Some(2), crate::net::ErrorCode::BadMessage, "no");
        assert!(c.handle.offer(Outbound::event(refusal)));
        assert_eq!(read_back(&mut c.client)?, [-2]);
        assert_eq!(
            c.wire
                .refusals
                .lock()
                .get(&crate::net::ErrorCode::BadMessage),
            Some(&1)
        );
        assert!(!c.cut.is_set());
        Ok(())
    }

    #[test]
    fn a_connection_awake_busy_or_syncing_gets_its_items_through_the_mailbox() -> Result<()> {
        let mut c = wired()?;
        // Awake (it never announced sleep): queued, not sent.
        assert!(c.handle.offer(Outbound::Message(envelope(1))));
        // Asleep, but its wire held (its thread is between waking and its turn, or another
        // sender is on it): queued and rung.
        {
            let mut guard = c.wire.lock();
            let s = guard.as_mut().expect("open");
            assert!(
                !s.rx.prepare_wait(),
                "the mailbox is not empty: no sleeping"
            );
            assert!(matches!(s.rx.try_recv(), Ok(Outbound::Message(m)) if m.id == 1));
            assert!(s.rx.prepare_wait());
            assert!(c.handle.offer(Outbound::Message(envelope(2))));
            assert!(c.waker.is_set(), "rung: its thread sends it");
            assert!(matches!(s.rx.try_recv(), Ok(Outbound::Message(m)) if m.id == 2));
            s.rx.woke(true);
            // A resync begins: what comes meanwhile waits for it (its thread reads the queue).
            c.wire.put(s, Outbound::Resync)?;
            assert!(s.delivery.syncing());
            assert!(s.rx.prepare_wait());
        }
        assert!(c.handle.offer(Outbound::Message(envelope(3))));
        assert!(c.waker.is_set());
        let mut guard = c.wire.lock();
        let s = guard.as_mut().expect("open");
        assert!(matches!(s.rx.try_recv(), Ok(Outbound::Message(m)) if m.id == 3));
        drop(guard);
        assert_eq!(
            read_back(&mut c.client)?,
            Vec::<i64>::new(),
            "nothing was sent"
        );
        Ok(())
    }

    #[test]
    fn a_sender_with_more_work_waiting_leaves_the_item_to_the_connections_thread() -> Result<()> {
        let mut c = wired()?;
        sleep(&c.wire);
        assert!(behind_while(true, || c
            .handle
            .offer(Outbound::Message(envelope(1)))));
        assert!(c.waker.is_set(), "its thread was rung");
        assert_eq!(read_back(&mut c.client)?, Vec::<i64>::new());
        let mut guard = c.wire.lock();
        let s = guard.as_mut().expect("open");
        assert!(matches!(s.rx.try_recv(), Ok(Outbound::Message(m)) if m.id == 1));
        s.rx.woke(true);
        assert!(s.rx.prepare_wait());
        drop(guard);
        // And once that is over, the next goes at once again.
        assert!(behind_while(false, || c
            .handle
            .offer(Outbound::Message(envelope(2)))));
        assert!(!c.waker.is_set());
        assert_eq!(read_back(&mut c.client)?, [2]);
        Ok(())
    }

    #[test]
    fn a_sleeping_connection_whose_sync_a_sender_starts_is_woken_to_read_it() -> Result<()> {
        let c = wired()?;
        sleep(&c.wire);
        assert!(c.handle.offer(Outbound::Resync));
        assert!(c.waker.is_set(), "the resync is read by its thread");
        assert!(c.wire.lock().as_ref().expect("open").delivery.syncing());
        Ok(())
    }

    #[test]
    fn a_connection_whose_socket_failed_under_a_sender_is_cut_off() -> Result<()> {
        let c = wired()?;
        drop(c.client);
        let mut offers = 0;
        // The first writes may reach the kernel before the peer's reset comes back.
        while !c.cut.is_set() && offers < 100 {
            sleep(&c.wire);
            c.handle.offer(Outbound::Message(envelope(offers + 1)));
            offers += 1;
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(c.cut.is_set(), "not cut off after {offers} offers");
        Ok(())
    }

    #[test]
    fn a_closed_wire_sends_nothing_and_takes_nothing() -> Result<()> {
        let mut c = wired()?;
        sleep(&c.wire);
        c.wire.close();
        // Its thread ended: the mailbox went with it, and the message stays stored.
        assert!(!c.handle.offer(Outbound::Message(envelope(1))));
        assert!(!c.cut.is_set());
        assert_eq!(
            read_back(&mut c.client)?,
            Vec::<i64>::new(),
            "the socket is closed"
        );
        Ok(())
    }

    #[test]
    fn a_resync_reads_only_past_where_the_last_sync_ended() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path().join("chat.db"))?;
        let keys = PublicKeys {
            x25519: vec![1; 32],
            ed25519: vec![2; 32],
        };
        for u in ["alice", "bob"] {
            let k = keys.clone();
            store.call(move |tx| tx.create_user(u, "h", &k))?;
        }
        let put = |n: u64| -> Result<i64> {
            store.call(move |tx| {
                Ok(tx
                    .store_message(&Outgoing::new("alice", n, b"x"), "bob")?
                    .envelope
                    .id)
            })
        };
        let (first, second) = (put(1)?, put(2)?);
        let (mut tx, mut rx) = channel()?;
        let mut d = Delivery::default();
        d.put(Outbound::Sync, &mut tx)?;
        d.sync_page(&mut tx, &store, "bob")?;
        assert_eq!(delivered(&mut rx, &mut tx)?, [first, second, 0]);
        // A peer committed a message and died before relaying it; bob has not acknowledged
        // the first two. The resync sends the lost one only.
        let lost = put(3)?;
        d.put(Outbound::Resync, &mut tx)?;
        d.sync_page(&mut tx, &store, "bob")?;
        assert_eq!(delivered(&mut rx, &mut tx)?, [lost, 0]);
        // And the next resync starts past it.
        d.put(Outbound::Resync, &mut tx)?;
        d.sync_page(&mut tx, &store, "bob")?;
        assert_eq!(delivered(&mut rx, &mut tx)?, [0]);
        Ok(())
    }
}
