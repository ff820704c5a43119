//! Presence: each connection may watch some users (`Watch`), and is told when one of them
//! comes online or goes offline (`Presence`). A user is online while they have a connection on
//! a live server: this one, or a peer the balancer lists as live. Presence rows of a server
//! that died stay in the database until it is forgotten; they are never counted, because that
//! server is not live.
//!
//! The heartbeat thread compares, every period, who of the watched users is online with what
//! each watcher was told, and tells the differences; a newly watched user is told at once,
//! online or not (so a client that moved to this server after a failover learns who left
//! meanwhile).

use std::collections::{BTreeSet, HashMap, HashSet};

use parking_lot::Mutex;

use super::outbound::{Handle, Outbound};
use super::Shared;
use crate::error::Result;
use crate::net::ServerEvent;

/// One watching connection.
struct Watcher {
    /// Its user (never told about themselves).
    user: String,
    handle: Handle,
    users: BTreeSet<String>,
    /// What it was last told of each watched user (online or not); a user it was never
    /// told about is told at the next tick, whichever it is.
    told: HashMap<String, bool>,
}

/// The watching connections of this server, by connection id.
#[derive(Default)]
pub struct Watches {
    watchers: Mutex<HashMap<u64, Watcher>>,
}

impl Watches {
    /// Connection `conn_id` of `user` watches `users` from now on (instead of what it watched).
    pub fn set(&self, conn_id: u64, user: &str, handle: Handle, users: BTreeSet<String>) {
        let mut watchers = self.watchers.lock();
        let mut told = watchers
            .remove(&conn_id)
            .map(|w| w.told)
            .unwrap_or_default();
        told.retain(|u, _| users.contains(u));
        watchers.insert(
            conn_id,
            Watcher {
                user: user.to_string(),
                handle,
                users,
                told,
            },
        );
    }

    /// The connection ended.
    pub fn remove(&self, conn_id: u64) {
        self.watchers.lock().remove(&conn_id);
    }

    /// Every user some connection watches.
    fn watched(&self) -> Vec<String> {
        let watchers = self.watchers.lock();
        let all: BTreeSet<&String> = watchers.values().flat_map(|w| w.users.iter()).collect();
        all.into_iter().cloned().collect()
    }

    /// Tells each watcher what changed among its users, given who is `online` now.
    fn tell(&self, online: &HashSet<String>) {
        for w in self.watchers.lock().values_mut() {
            for user in &w.users {
                let now = online.contains(user);
                if *user == w.user || w.told.get(user) == Some(&now) {
                    continue;
                }
                let told = w.handle.offer(Outbound::event(ServerEvent::Presence {
                    user: user.clone(),
                    online: now,
                }));
                if told {
                    w.told.insert(user.clone(), now);
                }
            }
        }
    }
}

/// The servers whose connections count: this one and the live peers.
pub fn live_servers(shared: &Shared) -> Vec<u64> {
    let mut ids = shared.live_peers.lock().clone();
    ids.push(shared.server_id);
    ids
}

/// Tells every watcher what changed since it was last told.
pub fn tick(shared: &Shared) -> Result<()> {
    let users = shared.watches.watched();
    if users.is_empty() {
        return Ok(());
    }
    let live = live_servers(shared);
    let online: HashSet<String> = shared
        .store
        .read(|tx| tx.online_among(&users, &live))?
        .into_iter()
        .collect();
    shared.watches.tell(&online);
    Ok(())
}
