//! A client connection's outbound side: what its writer thread is asked to write, the handle
//! other threads use to reach it, and the writer thread's loop (including the sync of the
//! client's queue at login).
//!
//! ```text
//! session (replies) ──┐
//! db-writer (Stored,  ├─▶ Handle: mailbox (bounded) ──▶ writer thread ──▶ socket
//!   live messages) ───┤       full? cut the connection     one flush per burst
//! peer links ─────────┘
//! ```

use std::net::{Shutdown, TcpStream};
use std::sync::Arc;

use crossbeam_channel::Receiver;

use crate::db::Store;
use crate::error::Result;
use crate::mailbox::{self, Sender, TrySendError};
use crate::net::{Envelope, ErrorCode, FrameWriter, ServerEvent};

/// Messages read from the database per page during a sync.
const SYNC_PAGE: usize = 256;

/// A slot of a connection's file window, given back when dropped: a file chunk holds one from
/// the moment its request is read until it is committed (upload) or written to the socket
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

/// What a connection's writer thread is asked to write.
#[derive(Debug)]
pub enum Outbound {
    /// A reply or notice, written as is.
    Event(ServerEvent),
    /// A file chunk; its window slot is given back once it is written.
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

/// How another thread cuts a connection off (its queue is full, the server is stopping): the
/// connection's own threads then notice and end.
pub trait Cut: Send + Sync {
    /// Ends the connection.
    fn cut(&self);
}

impl Cut for TcpStream {
    fn cut(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

/// One local connection, as other threads reach it.
#[derive(Clone)]
pub struct Handle {
    /// Unique per server run.
    pub conn_id: u64,
    /// The connection's outbound queue.
    pub tx: Sender<Outbound>,
    /// Cuts the connection off (a client whose queue is full, a server stopping).
    pub cut: Arc<dyn Cut>,
}

impl Handle {
    /// Queues without blocking; on a full queue the connection is cut off and `false` returned
    /// (everything it was sent stays stored for its next login).
    pub fn offer(&self, item: Outbound) -> bool {
        match self.tx.try_send(item) {
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

/// Writes one refusal of the connection (no request id) and closes the socket: for
/// connections refused before they start.
pub fn refuse_once(stream: &TcpStream, code: ErrorCode, message: &str) {
    if let Ok(s) = stream.try_clone() {
        let _ = FrameWriter::new(s).send(&ServerEvent::refused(None, code, message));
    }
    let _ = stream.shutdown(Shutdown::Both);
}

/// The connection's writer thread: drains its outbound queue onto the socket, flushing when the
/// queue runs dry so bursts go out in few system calls.
pub fn write_loop(
    stream: TcpStream,
    rx: &mailbox::Receiver<Outbound>,
    store: &Store,
    user: &str,
) -> Result<()> {
    let mut w = FrameWriter::new(stream);
    // Highest message id sent by the sync; `None` until the sync has run.
    let mut synced_to: Option<i64> = None;
    while let Ok(first) = rx.recv() {
        let mut item = Some(first);
        while let Some(next) = item.take() {
            match next {
                Outbound::Event(e) => w.write(&e)?,
                Outbound::Chunk(e, permit) => {
                    w.write(&e)?;
                    drop(permit);
                }
                Outbound::Message(msg) => match synced_to {
                    Some(upto) if msg.id > upto => w.write(&ServerEvent::Deliver { msg })?,
                    _ => {}
                },
                Outbound::Sync => synced_to = Some(sync(&mut w, store, user, 0)?),
                Outbound::Resync => {
                    if let Some(upto) = synced_to {
                        synced_to = Some(upto.max(sync(&mut w, store, user, 0)?));
                    }
                }
            }
            item = rx.try_recv().ok();
        }
        w.flush()?;
    }
    Ok(())
}

/// Sends every queued message for `user` with an id above `after`, oldest first, then
/// `Synced`. Returns the highest id sent (`after` when there was none).
fn sync(w: &mut FrameWriter<TcpStream>, store: &Store, user: &str, mut after: i64) -> Result<i64> {
    loop {
        let page = store.read(|tx| tx.queued(user, after, SYNC_PAGE))?;
        let last_page = page.len() < SYNC_PAGE;
        for msg in page {
            after = msg.id;
            w.write(&ServerEvent::Deliver { msg: Arc::new(msg) })?;
        }
        if last_page {
            break;
        }
        w.flush()?;
    }
    w.write(&ServerEvent::Synced)?;
    // Ids follow commit order (db invariant 1), so every message for this user with an id up
    // to `after` was in the pages read above; live messages with higher ids are new.
    Ok(after)
}
