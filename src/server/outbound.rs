//! A client connection's outbound side: what other threads hand its thread to send, the handle
//! they reach it by, and what its thread does with each item (including the sync of the
//! client's queue at login, page by page).
//!
//! ```text
//! db-writer (Stored,  ─┐
//!   live messages)     ├─▶ Handle: mailbox (bounded) + waker ──▶ the connection's thread:
//! peer links ──────────┘       full? cut the connection          Delivery::put ──▶ Channel
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::Receiver;

use crate::db::Store;
use crate::error::Result;
use crate::mailbox::{Sender, TrySendError};
use crate::net::{Envelope, ServerEvent};
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
    /// A reply or notice, written as is.
    Event(ServerEvent),
    /// A file chunk; its window slot is given back once it is queued for the socket.
    Chunk(ServerEvent, Permit),
    /// A live message. Dropped if it arrives before the queue is synced (the sync reads it from
    /// the database) or if the sync already sent it.
    Message(Arc<Envelope>),
    /// Send everything queued in the database for this user, then `Synced`.
    Sync,
    /// Send again everything still queued for this user (the client drops what it has seen):
    /// a peer that died may have committed messages it never relayed.
    Resync,
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
}

impl Handle {
    /// Queues without blocking; on a full queue the connection is cut off and `false` returned
    /// (everything it was sent stays stored for its next login).
    pub fn offer(&self, item: Outbound) -> bool {
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
    use crate::transport::Stream;

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
