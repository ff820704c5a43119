//! What every thread of one chat server shares.

use std::collections::HashMap;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::Receiver;
use parking_lot::Mutex;

use super::config::Config;
use super::peers::Peers;
use super::router::Router;
use crate::db::Store;

/// The server's state, behind an `Arc` held by every connection thread.
pub struct Shared {
    /// The settings it was started with.
    pub config: Config,
    /// The id the balancer gave it.
    pub server_id: u64,
    /// The database: reads on the calling thread, writes through the group-commit writer.
    pub store: Store,
    /// Local users to their connections' outbound queues.
    pub router: Router,
    /// Outbound links to the other servers.
    pub peers: Peers,
    /// Next connection id (clients and inbound peer links).
    pub next_conn: AtomicU64,
    /// Connected clients (the load reported to the balancer).
    pub clients: AtomicU32,
    /// Set when the server stops.
    pub stopping: Arc<AtomicBool>,
    /// Disconnects (its sender is dropped) when the server stops: wakes timed waits at once.
    pub stop_signal: Receiver<()>,
    /// Sockets of the connections the router does not know (saying hello, inbound peer
    /// links), so that shutdown can close them. A lock, not a channel: touched once when such
    /// a connection starts and once when it ends.
    pub unrouted: Mutex<HashMap<u64, TcpStream>>,
}

impl Shared {
    /// Keeps a handle on `stream` until the returned guard is dropped, so that
    /// [`Shared::close_unrouted`] can close it.
    pub fn track(&self, stream: &TcpStream) -> std::io::Result<Tracked<'_>> {
        let id = self.next_conn.fetch_add(1, Ordering::SeqCst);
        self.unrouted.lock().insert(id, stream.try_clone()?);
        Ok(Tracked { shared: self, id })
    }

    /// Shuts down every tracked socket (server shutdown).
    pub fn close_unrouted(&self) {
        for (_, s) in self.unrouted.lock().drain() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A socket kept in [`Shared::unrouted`] while this lives.
pub struct Tracked<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        self.shared.unrouted.lock().remove(&self.id);
    }
}

#[cfg(test)]
impl Shared {
    /// A server's shared state without a balancer or a listener: for in-process tests of the
    /// session, router and peer logic. The returned sender keeps `stop_signal` open.
    pub fn for_tests(
        config: Config,
        store: Store,
        server_id: u64,
    ) -> (Arc<Shared>, crossbeam_channel::Sender<()>) {
        let stopping = Arc::new(AtomicBool::new(false));
        let (stop_tx, stop_signal) = crossbeam_channel::bounded(0);
        let shared = Shared {
            config,
            server_id,
            store,
            router: Router::default(),
            peers: Peers::new(server_id, vec![0; 32], Arc::clone(&stopping)),
            next_conn: AtomicU64::new(1),
            clients: AtomicU32::new(0),
            stopping,
            stop_signal,
            unrouted: Mutex::default(),
        };
        (Arc::new(shared), stop_tx)
    }
}
