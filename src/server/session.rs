//! One client connection on a chat server, after `Hello`: one thread owns the connection (its
//! socket and TLS session), reads and handles requests, and writes what the client is sent,
//! except what another thread sends on it while it sleeps (see [`super::outbound::Wire`]).
//! What a request does is split by concern: [`messages`] (send, acknowledge, route),
//! [`groups`] and [`files`].
//!
//! ```text
//!                  ┌──────────── the connection's thread ─────────────┐
//! socket ─ frames ─▶ handle request ── reads: Store::read (here)       │
//!                  │      │ writes: Store::submit ──▶ db-writer ─ after commit ─┐
//!                  │      ▼ replies (local queue)                     │         │ Stored,
//!                  │  Delivery ◀── mailbox (bounded) ◀── waker ◀──────┼─────────┘ live
//!                  │      │  sync page by page                        │   messages (router,
//! socket ◀─ flush ─┼──────┘                                           │   peer links)
//!                  └─ poll(socket, waker, stop) when there is nothing to do:
//!                     its wire is let go, and an offering thread may send on it
//! ```
//!
//! The thread never waits for a commit, so a client may pipeline requests. It stops reading
//! while its output is backed up (a client that does not read cannot make it buffer without
//! bound), while a file request waits for a window slot, and while the client is over its
//! request rate. Other threads offer items without blocking; a client whose mailbox is full is
//! cut off (everything it was sent stays stored for its next login).

use std::cell::{OnceCell, RefCell};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use parking_lot::MutexGuard;

use super::outbound::{ConnCut, Delivery, Handle, Outbound, Permit, Sending, Wire, QUIET_WITHIN};
use super::shared::Shared;
use crate::db::{Fence, Tx};
use crate::error::{Error, Result};
use crate::mailbox;
use crate::names;
use crate::net::{ErrorCode, Request, ServerEvent, ServerReply, ServerRequest, Welcome, MAX_FRAME};
use crate::throttle::Bucket;
use crate::transport::{wait, Channel, Fill, Waker};

mod files;
mod groups;
mod messages;

/// File chunks one connection may have in flight: being committed (uploads) or waiting in its
/// outbound queue (downloads). Bounds the memory one client can make the server hold.
const FILE_WINDOW: usize = 8;

/// Bytes waiting for the socket above which a connection stops reading requests and taking
/// items from its mailbox, until the client reads.
const BACKLOG: usize = 1024 * 1024;

/// Requests handled in one turn before the thread looks at its mailbox again.
const TURN: usize = 64;

/// How long a connection that is closing may take to send what it still has.
const LINGER: Duration = Duration::from_secs(1);

/// A client whose `Hello` was checked: its channel, who it is, and its session token, hashed.
pub struct Login {
    /// The client's channel, past the TLS handshake and the `Hello`.
    pub chan: Channel,
    /// Who the token said the client is.
    pub user: String,
    /// The session's token, hashed (its presence row names it).
    pub token_hash: Vec<u8>,
    /// The freeze epoch the connection was accepted in (see [`Session::fence`]).
    pub fence: Fence,
}

/// Serves an authenticated client until it disconnects, on the calling thread.
pub fn serve_client(login: Box<Login>, shared: &Arc<Shared>) -> Result<()> {
    let Some(admitted) = admit(login, shared)? else {
        return Ok(());
    };
    let (connection, session) = (&admitted.0, &admitted.1);
    let served = connection.run(session);
    // The socket closes now, not when the last handle to the connection goes.
    connection.wire.close();
    served
}

/// Takes a client in: its connection and its started session, or `None` when it was turned
/// away (the server is full or out of the cluster).
///
/// Out of line, and what it takes and gives boxed, so that the connection loop runs close to
/// the top of the thread's stack (see [`Reading::turn`]).
#[inline(never)]
#[expect(
    clippy::boxed_local,
    reason = "boxed so that the caller's frame holds a pointer, not the login"
)]
fn admit(
    login: Box<Login>,
    shared: &Arc<Shared>,
) -> Result<Option<Box<(Connection, Session<'_>)>>> {
    let Login {
        mut chan,
        user,
        token_hash,
        fence,
    } = *login;
    if shared.detached.load(Ordering::SeqCst) {
        let away = ServerEvent::refused(
            None,
            ErrorCode::Unavailable,
            "this server is not part of the cluster now (the balancer refuses it); ask the \
             balancer for another",
        );
        let _ = chan.send_before(&away, Instant::now() + LINGER);
        return Ok(None);
    }
    let count = shared.clients.fetch_add(1, Ordering::SeqCst) as usize + 1;
    if count > shared.config.max_clients {
        shared.clients.fetch_sub(1, Ordering::SeqCst);
        let full = ServerEvent::refused(
            None,
            ErrorCode::Unavailable,
            "server is full; ask the balancer for another",
        );
        let _ = chan.send_before(&full, Instant::now() + LINGER);
        return Ok(None);
    }
    shared.arrived.fetch_add(1, Ordering::SeqCst);
    let conn_id = shared.next_conn.fetch_add(1, Ordering::SeqCst);
    let waker = Arc::new(Waker::new()?);
    let (tx, rx) = mailbox::lazy_with::<Outbound>(shared.config.queue_len, Arc::clone(&waker));
    let cut = Arc::new(ConnCut::new(Arc::clone(&waker)));
    let tcp = chan.stream().shared_tcp();
    let sending = Sending {
        chan,
        rx,
        delivery: Delivery::default(),
    };
    let wire = Arc::new(Wire::new(
        sending,
        Arc::clone(&waker),
        Arc::clone(&shared.counts.refusals),
    ));
    let handle = Handle {
        conn_id,
        tx,
        cut: cut.clone(),
        since: std::time::Instant::now(),
        wire: Some(Arc::clone(&wire)),
    };
    let session = Session::new(shared, user, conn_id, handle, token_hash, fence);
    let connection = Connection {
        wire,
        tcp,
        waker,
        cut,
    };
    if let Err(e) = session.start() {
        connection.wire.close();
        return Err(e);
    }
    Ok(Some(Box::new((connection, session))))
}

/// One client connection's state, owned by its thread.
pub struct Session<'a> {
    shared: &'a Arc<Shared>,
    /// Who the token said the client is; every request acts as this user.
    user: String,
    /// Unique per server run.
    conn_id: u64,
    /// The session's token, hashed: its presence row names it, so that the server can close
    /// this connection when the session ends.
    token_hash: Vec<u8>,
    /// The outbound mailbox, and how to cut the connection off.
    handle: Handle,
    /// The freeze epoch the connection was accepted in: after a freeze of the process, the
    /// messages it sends are not stored (the connection is closed when it next sends one),
    /// nor are those it sent before (see [`crate::freeze`]).
    fence: Fence,
    /// Replies made on this thread, sent before what other threads queued.
    local: RefCell<VecDeque<Outbound>>,
    /// The file window: a slot is taken by sending, given back by receiving (see [`Permit`]).
    /// Made on first use: most connections never carry a file, and the channel is 0.6 KiB of
    /// an idle connection's 42 (BENCHMARKS.md).
    window: OnceCell<(Sender<()>, Receiver<()>)>,
    /// Stores submitted whose reply is not queued yet: while there are any, a reply may come
    /// quietly, and the connection's thread sleeps at most [`QUIET_WITHIN`].
    awaiting: Arc<AtomicUsize>,
}

/// One store's place in [`Session::awaiting`], held by what runs after its commit and given
/// back when that is dropped: after the reply is queued, so a thread that finds nothing
/// awaited finds every reply already in its mailbox (and does not sleep on it).
struct Awaited(Arc<AtomicUsize>);

impl Awaited {
    fn new(count: &Arc<AtomicUsize>) -> Awaited {
        count.fetch_add(1, Ordering::SeqCst);
        Awaited(Arc::clone(count))
    }
}

impl Drop for Awaited {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for Session<'_> {
    /// Releases what the connection holds, however its thread ends.
    fn drop(&mut self) {
        let shared = self.shared;
        shared.router.remove(&self.user, self.conn_id);
        shared.watches.remove(self.conn_id);
        shared.clients.fetch_sub(1, Ordering::SeqCst);
        let (sid, cid) = (shared.server_id, self.conn_id);
        shared.store.submit(
            move |tx| {
                tx.remove_presence(sid, cid)?;
                tx.drop_uploads(sid, Some(cid))
            },
            |_| {},
        );
        log::debug!("{} disconnected (connection {cid})", self.user);
    }
}

impl<'a> Session<'a> {
    /// A session of `user` on connection `conn_id`, reached through `handle`; counted in
    /// `shared.clients` by its creator, uncounted when dropped.
    pub fn new(
        shared: &'a Arc<Shared>,
        user: String,
        conn_id: u64,
        handle: Handle,
        token_hash: Vec<u8>,
        fence: Fence,
    ) -> Session<'a> {
        Session {
            shared,
            user,
            conn_id,
            token_hash,
            handle,
            fence,
            local: RefCell::new(VecDeque::new()),
            window: OnceCell::new(),
            awaiting: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Register, then sync: see the documentation of [`crate::server`].
    pub fn start(&self) -> Result<()> {
        let shared = self.shared;
        shared.router.add(&self.user, self.handle.clone());
        let (sid, cid, u) = (shared.server_id, self.conn_id, self.user.clone());
        let hash = self.token_hash.clone();
        let newest = shared.store.call(move |tx| {
            tx.add_presence(sid, cid, &u, &hash)?;
            tx.newest_message_id()
        })?;
        self.queue(Outbound::event(ServerEvent::Welcome(Welcome {
            user: self.user.clone(),
            server_id: shared.server_id,
            max_file: shared.config.max_file,
            newest,
        })));
        self.queue(Outbound::Sync);
        log::debug!("{} connected (connection {cid})", self.user);
        Ok(())
    }

    /// Whether a request must wait for a file-window slot before it is handled.
    fn waits_for_window(&self, request: &ServerRequest) -> bool {
        matches!(
            request,
            ServerRequest::FileChunk { .. } | ServerRequest::FileGet { .. }
        ) && self.window.get().is_some_and(|(slots, _)| slots.is_full())
    }

    /// Handles one request. Refusals are replies; only a broken connection is an error.
    ///
    /// Out of line: see [`Reading::turn`].
    #[inline(never)]
    pub fn handle(&self, request: Request<ServerRequest>) -> Result<()> {
        let stores = matches!(
            request.body,
            ServerRequest::Send { .. } | ServerRequest::GroupSend { .. }
        );
        if stores && Fence::now() != self.fence {
            // Frozen since the connection began: its client may have given up on this message
            // and sent it again elsewhere. Closed unanswered, as after a crash, the client
            // sends it again (as a re-send, found if stored). Anything else (an
            // acknowledgement, a read) is served as ever.
            return Err(Error::Frozen);
        }
        let Request { id, body } = request;
        match body {
            ServerRequest::Send { to, message } => self.send(id, to, message),
            ServerRequest::Ack { msg_ids, quiet } => self.ack(id, msg_ids, quiet),
            ServerRequest::Who => {
                let live = super::presence::live_servers(self.shared);
                self.read(id, |tx| {
                    Ok(ServerReply::Online {
                        users: tx.online_users(crate::net::MAX_WHO, &live)?,
                    })
                })
            }
            ServerRequest::Watch { users } => self.watch(id, users),
            ServerRequest::Ping => {
                self.queue(Outbound::event(ServerEvent::reply(id, ServerReply::Done)))
            }
            ServerRequest::GroupChange {
                change,
                keys,
                client_id,
            } => self.group_change(id, change, keys, client_id),
            ServerRequest::GroupLog { group, after } => self.group_log(id, group, after),
            ServerRequest::GroupRekey { group, epoch, keys } => {
                self.group_rekey(id, group, epoch, keys)
            }
            ServerRequest::GroupSend {
                group,
                epoch,
                message,
            } => self.group_send(id, group, epoch, message),
            ServerRequest::GroupList => self.group_list(id),
            ServerRequest::GroupInfo { group } => self.group_info(id, group),
            ServerRequest::GroupKey { group, epoch } => self.group_key(id, group, epoch),
            ServerRequest::FileBegin { size, chunks } => self.file_begin(id, size, chunks),
            ServerRequest::FileChunk {
                upload,
                index,
                data,
            } => return self.file_chunk(id, upload, index, data),
            ServerRequest::FileGet { msg_id, index } => return self.file_get(id, msg_id, index),
        }
        Ok(())
    }

    /// Queues an item made on this thread (a reply); sent before the mailbox's items.
    fn queue(&self, item: Outbound) {
        self.local.borrow_mut().push_back(item);
    }

    fn refuse(&self, id: u64, code: ErrorCode, message: impl Into<String>) {
        self.queue(Outbound::event(ServerEvent::refused(
            Some(id),
            code,
            message,
        )));
    }

    /// Refuses the request if a name is bad; `names` pairs what each name is with the name.
    fn names_ok(&self, id: u64, names: &[(&str, &str)]) -> bool {
        for (kind, name) in names {
            let checked = match *kind {
                "group" => names::validate_group(name),
                _ => names::validate(kind, name),
            };
            if let Err(e) = checked {
                self.refuse(id, ErrorCode::InvalidName, e.to_string());
                return false;
            }
        }
        true
    }

    /// Watches `users` come and go; those online now are told at once.
    fn watch(&self, id: u64, users: Vec<String>) {
        if users.len() > crate::net::MAX_WHO {
            return self.refuse(
                id,
                ErrorCode::BadRequest,
                format!("at most {} users to watch", crate::net::MAX_WHO),
            );
        }
        let named: Vec<(&str, &str)> = users.iter().map(|u| ("user", u.as_str())).collect();
        if !self.names_ok(id, &named) {
            return;
        }
        self.shared.watches.set(
            self.conn_id,
            &self.user,
            self.handle.clone(),
            users.into_iter().collect(),
        );
        self.queue(Outbound::event(ServerEvent::reply(id, ServerReply::Done)));
        if let Err(e) = super::presence::tick(self.shared) {
            log::debug!("presence: {e}");
        }
    }

    /// Answers a read-only request from this thread.
    fn read(&self, id: u64, work: impl FnOnce(&mut dyn Tx) -> Result<ServerReply>) {
        let event = match self.shared.store.read(work) {
            Ok(reply) => ServerEvent::reply(id, reply),
            Err(e) => error_event(id, e),
        };
        self.queue(Outbound::event(event));
    }

    /// Runs `work` on the database writer thread; its reply goes out after the commit.
    fn write(
        &self,
        id: u64,
        work: impl FnOnce(&mut dyn Tx) -> Result<ServerReply> + Send + 'static,
    ) {
        let handle = self.handle.clone();
        self.shared.store.submit(work, move |res| {
            let event = match res {
                Ok(reply) => ServerEvent::reply(id, reply),
                Err(e) => error_event(id, e),
            };
            handle.offer(Outbound::event(event));
        });
    }

    /// Takes a slot of the file window ([`Session::waits_for_window`] said there is one).
    fn permit(&self) -> Result<Permit> {
        let (slots, free) = self.window.get_or_init(|| bounded(FILE_WINDOW));
        slots
            .try_send(())
            .map_err(|_| Error::Protocol("the file window is full".into()))?;
        Ok(Permit::new(free.clone()))
    }
}

/// The connection a session runs on, and what its thread keeps between turns.
struct Connection {
    /// The channel, mailbox and delivery state, held by its thread except while it sleeps.
    wire: Arc<Wire>,
    /// The channel's socket, to poll while the wire is let go.
    tcp: Arc<std::net::TcpStream>,
    waker: Arc<Waker>,
    cut: Arc<ConnCut>,
}

impl Connection {
    /// Serves the session until the client leaves, sends garbage, is cut off, or the server
    /// stops. Its frame is what an idle connection's thread keeps on the stack while it
    /// sleeps and writes: what the loop does on the side is out of line (see
    /// [`Reading::turn`]).
    #[inline(never)]
    fn run(&self, session: &Session<'_>) -> Result<()> {
        let shared = session.shared;
        let rate = shared.config.max_rate;
        let mut reading = Reading {
            waiting: None,
            bucket: (rate > 0).then(|| Bucket::new(rate)),
            rested_until: None,
            readable: true,
            closed: false,
        };
        // Held for the whole turn; let go only while the thread sleeps (see `Wire`).
        let mut wire = self.wire.lock();
        loop {
            let Some(s) = wire.as_mut() else {
                return Ok(());
            };
            if self.cut.is_cut() || shared.stopping.load(Ordering::SeqCst) {
                return Ok(());
            }
            self.send_queued(s, session)?;
            if s.chan.pending() > 0 {
                s.chan.flush()?;
            }
            if reading.rested_until.is_some_and(|t| Instant::now() >= t) {
                reading.rested_until = None;
            }
            let backed_up = s.chan.pending() >= BACKLOG;
            let handled = if backed_up {
                0
            } else {
                reading.turn(s, session)?
            };
            if reading.closed && reading.waiting.is_none() && !s.chan.has_frame() {
                // The client is gone; send what is left of the replies if it still reads.
                self.send_queued(s, session)?;
                let _ = s.chan.flush_before(Instant::now() + LINGER);
                return Ok(());
            }
            // Anything left to do without waiting?
            let window_open = reading
                .waiting
                .as_ref()
                .is_some_and(|r| !session.waits_for_window(&r.body));
            let more = !session.local.borrow().is_empty()
                || (s.delivery.syncing() && s.chan.pending() < BACKLOG)
                || (handled == TURN)
                || (window_open && reading.rested_until.is_none() && !backed_up);
            // A reply that comes quietly is sent by the next wake-up, whatever it is for; and
            // one comes within QUIET_WITHIN while stores are awaited (read before looking at
            // the mailbox: a store no longer awaited has its reply there).
            let deadline = match session.awaiting.load(Ordering::SeqCst) {
                0 => reading.rested_until,
                _ => {
                    let quiet = Instant::now() + QUIET_WITHIN;
                    Some(reading.rested_until.map_or(quiet, |r| r.min(quiet)))
                }
            };
            if more || !s.rx.prepare_wait() {
                continue;
            }
            // Asleep, a connection keeps no buffer for replies it has sent (0.5 KiB).
            session.local.borrow_mut().shrink_to_fit();
            let want_read = !reading.closed
                && reading.waiting.is_none()
                && reading.rested_until.is_none()
                && s.chan.pending() < BACKLOG;
            let interest = s.chan.interest(want_read);
            // Asleep, announced: other threads may send on the wire meanwhile.
            let ready = MutexGuard::unlocked(&mut wire, || {
                wait(&*self.tcp, interest, &[&self.waker, &shared.stop], deadline)
            });
            let Some(s) = wire.as_mut() else {
                return Ok(());
            };
            s.rx.woke(ready.as_ref().map_or(true, |r| r.woken & 1 != 0));
            let ready = ready?;
            reading.readable |= ready.readable;
        }
    }

    /// Moves replies, then the mailbox's items, then sync pages, into the write buffer, as far
    /// as the client keeps up.
    fn send_queued(&self, s: &mut Sending, session: &Session<'_>) -> Result<()> {
        while s.chan.pending() < BACKLOG {
            let local = session.local.borrow_mut().pop_front();
            let item = match local {
                Some(item) => item,
                None => match s.rx.try_recv() {
                    Ok(item) => item,
                    Err(_) => break,
                },
            };
            self.wire.put(s, item)?;
        }
        while s.delivery.syncing() && s.chan.pending() < BACKLOG {
            s.delivery
                .sync_page(&mut s.chan, &session.shared.store, &session.user)?;
        }
        Ok(())
    }
}

/// Where a connection's reading of requests stands between its turns.
struct Reading {
    /// A request read but not yet handled: it waits for a window slot or for its turn under
    /// the request rate.
    waiting: Option<Request<ServerRequest>>,
    /// The request rate (`--max-rate`), if there is one.
    bucket: Option<Bucket>,
    /// Under the request rate, no request is read before this.
    rested_until: Option<Instant>,
    /// Whether the socket may have something to read (a read that found nothing clears it;
    /// poll sets it).
    readable: bool,
    /// The client closed its side.
    closed: bool,
}

impl Reading {
    /// Reads and handles requests, as many as may go now (at most [`TURN`]); how many were
    /// handled. A malformed frame is refused and ends the connection.
    ///
    /// Out of line, like [`Session::handle`]: what reading and handling keep on the stack is
    /// gone while the connection writes and sleeps, so an idle connection's thread touches
    /// three pages of stack, not four (BENCHMARKS.md).
    #[inline(never)]
    fn turn(&mut self, s: &mut Sending, session: &Session<'_>) -> Result<usize> {
        let mut handled = 0;
        while self.rested_until.is_none() && handled < TURN {
            if let Some(request) = self.waiting.take() {
                if session.waits_for_window(&request.body) {
                    self.waiting = Some(request);
                    break;
                }
                session.handle(request)?;
                handled += 1;
                continue;
            }
            let request = match s.chan.frame::<Request<ServerRequest>>(MAX_FRAME) {
                Ok(Some(r)) => r,
                Ok(None) if self.closed || !self.readable => break,
                Ok(None) => {
                    match s.chan.fill()? {
                        Fill::Data => {}
                        Fill::Idle => self.readable = false,
                        Fill::Closed => self.closed = true,
                    }
                    continue;
                }
                Err(e @ (Error::Malformed(_) | Error::FrameTooLarge { .. })) => {
                    let bad = ServerEvent::refused(None, ErrorCode::BadFrame, e.to_string());
                    let _ = s.chan.send_before(&bad, Instant::now() + LINGER);
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            if let Some(pause) = self.bucket.as_mut().and_then(Bucket::take) {
                self.rested_until = Some(Instant::now() + pause);
            }
            self.waiting = Some(request);
        }
        Ok(handled)
    }
}

/// The reply for a failed request: refusals keep their reason; anything else is logged here
/// and reported as an internal error, without details.
fn error_event(id: u64, e: Error) -> ServerEvent {
    let (code, message) = e.into_refusal(id);
    ServerEvent::refused(Some(id), code, message)
}

#[cfg(test)]
mod tests;
