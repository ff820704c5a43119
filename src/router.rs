//! The router of one chat server: which local connection belongs to which user.
//!
//! Each client connection has an outbound queue (a bounded crossbeam channel) drained by its own
//! writer thread. The router maps a user to the queues of that user's connections here, and
//! pushes delivered messages into them with `try_send`: a full queue means the client stopped
//! reading, and that connection is shut down rather than allowed to slow the sender (its messages
//! stay stored for its next login).
//!
//! A lock and not a router thread: lookups come from the database writer thread (after every
//! commit) and from peer links, and are a hash lookup plus a channel send. A routing thread would
//! add a hop and a context switch to every message for no gain in safety.

use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;

use crossbeam_channel::Receiver;

use crate::mailbox::{Sender, TrySendError};
use parking_lot::RwLock;

use crate::net::{Envelope, ServerEvent};

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

/// One local connection of a user.
#[derive(Clone)]
pub struct Handle {
    /// Unique per server run.
    pub conn_id: u64,
    /// The connection's outbound queue.
    pub tx: Sender<Outbound>,
    /// The socket, so the router can cut off a client whose queue is full.
    pub stream: Arc<TcpStream>,
}

impl Handle {
    /// Queues without blocking; on a full queue the connection is shut down and `false` returned.
    pub fn offer(&self, item: Outbound) -> bool {
        match self.tx.try_send(item) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                log::warn!(
                    "connection {} is not reading; disconnecting it",
                    self.conn_id
                );
                let _ = self.stream.shutdown(Shutdown::Both);
                false
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }
}

/// User name to that user's connections on this server.
#[derive(Default)]
pub struct Router {
    users: RwLock<HashMap<String, Vec<Handle>>>,
}

impl Router {
    /// Adds a connection.
    pub fn add(&self, user: &str, handle: Handle) {
        self.users
            .write()
            .entry(user.to_string())
            .or_default()
            .push(handle);
    }

    /// Removes a connection; returns how many connections the user still has here.
    pub fn remove(&self, user: &str, conn_id: u64) -> usize {
        let mut users = self.users.write();
        let left = match users.get_mut(user) {
            Some(handles) => {
                handles.retain(|h| h.conn_id != conn_id);
                handles.len()
            }
            None => 0,
        };
        if left == 0 {
            users.remove(user);
        }
        left
    }

    /// Offers a message to every connection here of each of `users`. Returns how many took it.
    pub fn deliver(&self, users: &[String], msg: &Arc<Envelope>) -> usize {
        let map = self.users.read();
        users
            .iter()
            .filter_map(|u| map.get(u))
            .flatten()
            .filter(|h| h.offer(Outbound::Message(Arc::clone(msg))))
            .count()
    }

    /// Whether the user has a connection here.
    pub fn is_online(&self, user: &str) -> bool {
        self.users.read().contains_key(user)
    }

    /// Connected clients.
    pub fn connections(&self) -> usize {
        self.users.read().values().map(Vec::len).sum()
    }

    /// Asks every local connection to re-read its queue (after a peer link ended).
    pub fn resync_all(&self) {
        for handles in self.users.read().values() {
            for h in handles {
                h.offer(Outbound::Resync);
            }
        }
    }

    /// Shuts down every client socket (server shutdown); reader threads then clean up.
    pub fn close_all(&self) {
        for handles in self.users.read().values() {
            for h in handles {
                let _ = h.stream.shutdown(Shutdown::Both);
            }
        }
    }
}
