//! Messages: storing a client's message, routing it after the commit, acknowledging delivered
//! ones.
//!
//! Delivery is "store, then route; register, then sync". A message is committed together with
//! a read of where its recipient is connected (the presence table); a login commits its
//! presence row before reading its queue. Whichever of the two commits second sees the other,
//! so a message is never missed by both the live path and the sync.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{error_event, Awaited, Session};
use crate::db::{DirectMessage, Outgoing, StoredMessage, Tx, Urgency};
use crate::error::{Error, Result};
use crate::net::{
    ErrorCode, NewMessage, ServerEvent, ServerInfo, ServerReply, MAX_BODY, TO_YOURSELF,
};
use crate::server::outbound::Outbound;
use crate::server::peers::Relayed;
use crate::server::shared::Shared;

/// How soon a message's store must commit: at once for a sender that waits for its
/// `Stored` (not `patient`), else with the writer's next batch.
pub(super) fn urgency(patient: bool) -> Urgency {
    if patient {
        Urgency::Batched
    } else {
        Urgency::Awaited
    }
}

/// Most message ids in one `Ack`.
pub const MAX_ACK: usize = 4096;

impl Session<'_> {
    /// `Send`: stores a direct message; `Stored` once committed.
    pub(super) fn send(&self, id: u64, to: String, message: NewMessage) {
        if !(self.names_ok(id, &[("recipient", &to)]) && self.body_ok(id, &message.body)) {
            return;
        }
        if to == self.user {
            return self.refuse(id, ErrorCode::BadRequest, TO_YOURSELF);
        }
        let me = self.user.clone();
        let quotas = self.shared.config.quotas;
        // Counted only for a queue or a sender near its quota (see `quota::Watch`).
        let watch = &self.shared.quota_watch;
        let counted = watch.count(&quotas, &to, Some(&me), message.body.len() as u64);
        // Without a file or a look-up of an earlier attempt, storing is one insert: atomic
        // without a savepoint, and merged with the batch's other such messages.
        let resend = message.resend_after.is_some();
        if !(message.file.is_some() || resend || counted) {
            let done = self.stored_once(id, message.patient);
            let urgency = urgency(message.patient);
            let msg = DirectMessage {
                from: me,
                to,
                client_id: message.client_id,
                body: message.body,
            };
            return self
                .shared
                .store
                .submit_message(msg, urgency, self.fence, done);
        }
        self.store(id, message.patient, move |tx| {
            if !counted {
                return tx.store_message(&Outgoing::of(&me, &message), &to);
            }
            let (queue, mine) = (tx.queue_usage(&to)?, tx.pair_usage(&me, &to)?);
            let check = || {
                let len = message.body.len() as u64;
                quotas.check_message(&format!("{to}'s queue"), queue, Some(mine), len)
            };
            if !resend {
                check()?;
            }
            let stored = tx.store_message(&Outgoing::of(&me, &message), &to)?;
            // A re-send that was stored before is that message, quota or not; one that was not
            // is checked like any message (and undone with its savepoint if it does not fit).
            if resend && tx.queue_usage(&to)?.messages > queue.messages {
                check()?;
            }
            Ok(stored)
        });
    }

    /// `Ack`: the client has shown these messages; they leave its queue.
    pub(super) fn ack(&self, id: u64, msg_ids: Vec<i64>, quiet: bool) {
        if msg_ids.len() > MAX_ACK {
            let why = format!("at most {MAX_ACK} ids per acknowledgement");
            return self.refuse(id, ErrorCode::BadRequest, why);
        }
        let me = self.user.clone();
        let handle = self.handle.clone();
        // Unguarded (an acknowledgement applied half-way is still true), merged with others.
        self.shared.store.submit_ack(me, msg_ids, move |res| {
            let event = match res {
                Ok(_) if quiet => return,
                Ok(_) => ServerEvent::reply(id, ServerReply::Done),
                Err(e) => error_event(id, e),
            };
            handle.offer(Outbound::event(event));
        });
    }

    /// Refuses an empty or oversized message body.
    pub(super) fn body_ok(&self, id: u64, body: &[u8]) -> bool {
        let why = if body.is_empty() {
            "empty message".to_string()
        } else if body.len() > MAX_BODY {
            format!(
                "message of {} bytes is over the limit of {MAX_BODY}",
                body.len()
            )
        } else {
            return true;
        };
        self.refuse(id, ErrorCode::BadMessage, why);
        false
    }

    /// Stores a message on the writer thread (in a savepoint: work with more than one write);
    /// after the commit it is routed and the sender told (`patient`: see
    /// [`Session::stored_reply`]).
    pub(super) fn store(
        &self,
        id: u64,
        patient: bool,
        work: impl FnOnce(&mut dyn Tx) -> Result<StoredMessage> + Send + 'static,
    ) {
        self.shared
            .store
            .submit_fenced(self.fence, work, self.stored_once(id, patient));
    }

    /// What runs after the commit of a message's store (see [`Session::stored_reply`]).
    pub(super) fn stored_once(
        &self,
        id: u64,
        patient: bool,
    ) -> impl FnOnce(Result<StoredMessage>) + Send + 'static {
        let done = self.stored_reply(id, patient);
        move |res| done(res.map(Some))
    }

    /// Like [`Session::store`], for work that may store nothing: then the reply is
    /// `Done`.
    pub(super) fn store_or_done(
        &self,
        id: u64,
        work: impl FnOnce(&mut dyn Tx) -> Result<Option<StoredMessage>> + Send + 'static,
    ) {
        self.shared.store.submit(work, self.stored_reply(id, false));
    }

    /// What runs after the commit of a store: route the message, tell the sender. For a
    /// `patient` sender `Stored` goes quietly (the connection's thread sends it when it next
    /// wakes, within [`QUIET_WITHIN`](crate::server::outbound::QUIET_WITHIN)): a sender
    /// writing steadily gets it with its next request or delivery instead of a wake-up of its
    /// own, a third of a message's.
    fn stored_reply(
        &self,
        id: u64,
        patient: bool,
    ) -> impl FnOnce(Result<Option<StoredMessage>>) + Send + 'static {
        let handle = self.handle.clone();
        let shared = Arc::clone(self.shared);
        let awaited = Awaited::new(&self.awaiting);
        move |res: Result<Option<StoredMessage>>| {
            match res {
                Ok(Some(stored)) => {
                    let msg_id = stored.envelope.id;
                    route(&shared, stored);
                    let stored =
                        Outbound::event(ServerEvent::reply(id, ServerReply::Stored { msg_id }));
                    if patient {
                        handle.offer_quiet(stored);
                    } else {
                        handle.offer(stored);
                    }
                }
                Ok(None) => {
                    handle.offer(Outbound::event(ServerEvent::reply(id, ServerReply::Done)));
                }
                Err(Error::Frozen) => {
                    // Not stored: the process was frozen since it was read. Closed without a
                    // reply, as after a crash, its client sends it again (as a re-send).
                    handle.cut.cut();
                }
                Err(e) => {
                    handle.offer(Outbound::event(error_event(id, e)));
                }
            }
            // Counted out only once the reply is queued (see `Awaited`).
            drop(awaited);
        }
    }
}

/// Links to `server` (looked up in the database), then relays what waited for it, in order,
/// under the lock that keeps later relays behind them.
fn link_and_relay(shared: &Shared, server: u64) {
    let peer = match shared.store.read(|tx| tx.server_addr(server)) {
        Ok(Some((addr, name))) => Some(ServerInfo {
            id: server,
            name,
            addr,
            load: 0,
        }),
        Ok(None) => None,
        Err(e) => {
            log::warn!("cannot look up server {server}: {e}");
            None
        }
    };
    if let Some(peer) = &peer {
        shared.peers.ensure(peer);
    }
    let mut pending = shared.peers.pending.lock();
    for item in pending.remove(&server).unwrap_or_default() {
        if peer.is_some() && shared.peers.relay(server, &item) {
            let n = item.users.len() as u64;
            shared.counts.relayed.fetch_add(n, Ordering::Relaxed);
            *shared.counts.relayed_to.lock().entry(server).or_default() += n;
        } else {
            log::debug!("server {server} is gone; message {} waits", item.msg.id);
        }
    }
}

/// Hands a committed message to every server where a recipient is connected: local users
/// through the router, others through one relay per server.
pub fn route(shared: &Arc<Shared>, stored: StoredMessage) {
    shared.counts.stored.fetch_add(1, Ordering::Relaxed);
    let msg = Arc::new(stored.envelope);
    let mut online = stored.online_at.into_iter().peekable();
    while let Some((server, first)) = online.next() {
        let mut users = vec![first];
        while let Some((_, user)) = online.next_if(|(s, _)| *s == server) {
            users.push(user);
        }
        if server == shared.server_id {
            shared.router.deliver(&users, &msg);
            continue;
        }
        let n = users.len() as u64;
        let item = Arc::new(Relayed {
            msg: Arc::clone(&msg),
            users,
        });
        // Behind earlier relays still waiting for a link to that server: in order.
        if let Some(waiting) = shared.peers.pending.lock().get_mut(&server) {
            waiting.push(item);
            continue;
        }
        if shared.peers.relay(server, &item) {
            shared.counts.relayed.fetch_add(n, Ordering::Relaxed);
            *shared.counts.relayed_to.lock().entry(server).or_default() += n;
        } else if !shared.peers.has_link(server) {
            // A server that registered since our last heartbeat: link to it now rather than
            // leave the message until its recipients' next login; off this thread (the
            // writer's, which must not wait on a database read or start a link). What follows
            // for that server waits behind it in `pending`.
            shared.peers.pending.lock().insert(server, vec![item]);
            let linker = Arc::clone(shared);
            let spawned = std::thread::Builder::new()
                .name("link-on-demand".into())
                .spawn(move || link_and_relay(&linker, server));
            if let Err(e) = spawned {
                log::warn!("cannot start a link to server {server}: {e}");
                shared.peers.pending.lock().remove(&server);
            }
        }
    }
}
