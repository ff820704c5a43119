//! The router of one chat server: which local connection belongs to which user.
//!
//! Each client connection has an outbound queue (see [`super::outbound`]) drained by its own
//! writer thread. The router maps a user to the [`Handle`]s of that user's connections here,
//! and pushes delivered messages into them without blocking: a full queue means the client
//! stopped reading, and that connection is cut off rather than allowed to slow the sender (its
//! messages stay stored for its next login).
//!
//! A lock and not a router thread: lookups come from the database writer thread (after every
//! commit) and from peer links, and are a hash lookup plus a channel send. A routing thread would
//! add a hop and a context switch to every message for no gain in safety.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;

use super::outbound::{Handle, Outbound};
use crate::net::Envelope;

/// User name to that user's connections on this server.
#[derive(Default)]
pub struct Router {
    users: RwLock<HashMap<String, Vec<Handle>>>,
    /// Messages handed to local connections, in all (from this server and from peers).
    pub delivered: std::sync::atomic::AtomicU64,
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
        let n = users
            .iter()
            .filter_map(|u| map.get(u))
            .flatten()
            .filter(|h| h.offer(Outbound::Message(Arc::clone(msg))))
            .count();
        self.delivered
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        n
    }

    /// Asks every local connection to re-read its queue (after a peer link ended).
    pub fn resync_all(&self) {
        for handles in self.users.read().values() {
            for h in handles {
                h.offer(Outbound::Resync);
            }
        }
    }

    /// The connections whose sessions started here more than `age` ago.
    pub fn settled(&self, age: Duration) -> Vec<u64> {
        self.users
            .read()
            .values()
            .flatten()
            .filter(|h| h.since.elapsed() > age)
            .map(|h| h.conn_id)
            .collect()
    }

    /// Cuts off the connections with these ids (their sessions ended); returns how many.
    pub fn cut(&self, conn_ids: &[u64]) -> usize {
        let mut n = 0;
        for handles in self.users.read().values() {
            for h in handles.iter().filter(|h| conn_ids.contains(&h.conn_id)) {
                h.cut.cut();
                n += 1;
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailbox;
    use crate::server::testing::{envelope, Flag};

    fn connection(conn_id: u64, cap: usize) -> (Handle, mailbox::Receiver<Outbound>, Arc<Flag>) {
        let (tx, rx) = mailbox::lazy(cap);
        let flag = Arc::new(Flag::default());
        let cut: Arc<dyn crate::server::outbound::Cut> = flag.clone();
        let since = std::time::Instant::now();
        (
            Handle {
                conn_id,
                tx,
                cut,
                since,
                wire: None,
            },
            rx,
            flag,
        )
    }

    fn delivered(rx: &mailbox::Receiver<Outbound>) -> Vec<i64> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .filter_map(|o| match o {
                Outbound::Message(m) => Some(m.id),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_message_reaches_every_connection_of_its_recipients_only() {
        let router = Router::default();
        let (bob1, rx1, _) = connection(1, 8);
        let (bob2, rx2, _) = connection(2, 8);
        let (carol, rx3, _) = connection(3, 8);
        router.add("bob", bob1);
        router.add("bob", bob2);
        router.add("carol", carol);
        let took = router.deliver(&["bob".to_string(), "dave".to_string()], &envelope(7));
        assert_eq!(took, 2, "both of bob's connections, nobody else");
        assert_eq!(delivered(&rx1), [7]);
        assert_eq!(delivered(&rx2), [7]);
        assert!(delivered(&rx3).is_empty());
        assert_eq!(
            router.remove("bob", 1),
            1,
            "one of bob's connections is left"
        );
        assert_eq!(router.remove("bob", 2), 0);
        assert_eq!(router.deliver(&["bob".to_string()], &envelope(8)), 0);
    }

    #[test]
    fn a_connection_that_stops_reading_is_cut_off_not_waited_for() {
        let router = Router::default();
        let (slow, rx, cut) = connection(1, 2);
        router.add("bob", slow);
        let bob = ["bob".to_string()];
        assert_eq!(router.deliver(&bob, &envelope(1)), 1);
        assert_eq!(router.deliver(&bob, &envelope(2)), 1);
        assert!(!cut.is_set());
        assert_eq!(router.deliver(&bob, &envelope(3)), 0, "full: not queued");
        assert!(cut.is_set(), "and cut off");
        assert_eq!(delivered(&rx), [1, 2], "what was queued stays in order");
    }

    #[test]
    fn resync_reaches_every_connection_and_cut_only_those_named() {
        let router = Router::default();
        let (a, rx_a, cut_a) = connection(1, 8);
        let (b, rx_b, cut_b) = connection(2, 8);
        router.add("alice", a);
        router.add("bob", b);
        router.resync_all();
        for rx in [&rx_a, &rx_b] {
            assert!(matches!(rx.try_recv(), Ok(Outbound::Resync)));
        }
        assert_eq!(router.cut(&[2, 9]), 1);
        assert!(!cut_a.is_set() && cut_b.is_set());
    }
}
