//! What every thread of one chat server shares.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::sync::Arc;

use std::collections::HashSet;

use crossbeam_channel::Receiver;
use parking_lot::Mutex;

use super::config::Config;
use super::peers::Peers;
use super::quota::Watch;
use super::router::Router;
use crate::db::Store;
use crate::transport::Waker;

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
    /// Clients accepted in all since the start (reported too: the balancer stops counting
    /// the logins it sent here as they arrive).
    pub arrived: AtomicU64,
    /// Set when the server stops.
    pub stopping: Arc<AtomicBool>,
    /// Set (and never reset) when the server stops: every connection thread waits on it too,
    /// so all of them end at once, whatever they were waiting for.
    pub stop: Waker,
    /// Disconnects (its sender is dropped) when the server stops: wakes timed waits at once.
    pub stop_signal: Receiver<()>,
    /// The queues and senders near their quotas.
    pub quota_watch: Watch,
    /// What this server has done since it started (heartbeats report it; `/metrics` shows
    /// it).
    pub counts: Counters,
    /// The connections watching users come and go.
    pub watches: super::presence::Watches,
    /// The other servers the balancer listed as live at the last heartbeat.
    pub live_peers: Mutex<Vec<u64>>,
    /// The peers that have linked in since this server started.
    pub peers_seen: Mutex<HashSet<u64>>,
    /// Set while the balancer refuses this server (for longer than it takes to forget a
    /// silent one): it has closed its clients and takes no new ones until it is let back in.
    pub detached: AtomicBool,
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
            peers: Peers::new(server_id, config.transport.clone(), Arc::clone(&stopping)),
            config,
            server_id,
            store,
            router: Router::default(),
            next_conn: AtomicU64::new(1),
            clients: AtomicU32::new(0),
            arrived: AtomicU64::new(0),
            watches: super::presence::Watches::default(),
            counts: Counters::default(),
            live_peers: Mutex::default(),
            stopping,
            stop: Waker::new().expect("an eventfd"),
            stop_signal,
            quota_watch: Watch::default(),
            peers_seen: Mutex::default(),
            detached: AtomicBool::new(false),
        };
        (Arc::new(shared), stop_tx)
    }
}

/// The counts behind [`crate::net::Counts`], updated as things happen.
#[derive(Default)]
pub struct Counters {
    /// Messages stored.
    pub stored: AtomicU64,
    /// Deliveries handed to peers.
    pub relayed: AtomicU64,
    /// Requests refused, by reason (counted as the refusal is sent, by whichever thread sends
    /// it: see [`super::outbound::Wire`]).
    pub refusals: Arc<Refusals>,
    /// Deliveries handed to each peer, by server id.
    pub relayed_to: Mutex<std::collections::BTreeMap<u64, u64>>,
}

/// Refusals sent, by reason.
pub type Refusals = Mutex<std::collections::BTreeMap<crate::net::ErrorCode, u64>>;

impl Shared {
    /// What this server has done since it started.
    pub fn counts(&self) -> crate::net::Counts {
        use std::sync::atomic::Ordering::Relaxed;
        crate::net::Counts {
            stored: self.counts.stored.load(Relaxed),
            delivered: self.router.delivered.load(Relaxed),
            relayed: self.counts.relayed.load(Relaxed),
            links: self
                .counts
                .relayed_to
                .lock()
                .iter()
                .map(|(k, v)| (*k, *v))
                .collect(),
        }
    }
}
