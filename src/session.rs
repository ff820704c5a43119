//! One client connection on a chat server, after `Hello`: its reader thread (which decodes and
//! handles requests), its writer thread (which owns the socket's write half), and the sync of
//! its queue.
//!
//! ```text
//! reader thread ── writes: Writer::submit ──▶ db-writer ── after commit ──▶ reply, route
//!      │ reads: Readers (own thread)                                          │
//!      ▼                                                                      ▼
//!  Outbound (bounded) ◀──────────────── Router (live messages) ◀───── local or peer
//!      │
//!      ▼
//! writer thread: Sync first, then events and live messages, one flush per burst
//! ```
//!
//! The reader never waits for a commit, so a client may pipeline requests. Replies that come
//! from the writer thread are offered without blocking; a client whose queue is full is cut off
//! (everything it was sent stays stored for its next login).

use std::net::{Shutdown, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::db;
use crate::error::{Error, Result};
use crate::mailbox;
use crate::names;
use crate::net::{
    chunk_count, ErrorCode, FrameReader, FrameWriter, ServerEvent, ServerRequest, MAX_BODY,
    MAX_CHUNK, MAX_WHO,
};
use crate::peers::Relayed;
use crate::router::{Handle, Outbound, Permit};
use crate::server::{reply_once, Shared};
use crate::throttle::Bucket;

/// Messages read from the database per page during a sync.
const SYNC_PAGE: usize = 256;

/// Most message ids in one `Ack`.
const MAX_ACK: usize = 4096;

/// File chunks one connection may have in flight: being committed (uploads) or waiting in its
/// outbound queue (downloads). Bounds the memory one client can make the server hold.
const FILE_WINDOW: usize = 8;

/// Unfinished uploads one connection may have at once.
const MAX_UPLOADS: usize = 4;

/// How long a reader waits for a file-window slot before giving up on the client.
const WINDOW_WAIT: Duration = Duration::from_secs(30);

/// Serves an authenticated client until it disconnects.
pub(crate) fn serve_client(
    stream: TcpStream,
    mut reader: FrameReader<TcpStream>,
    shared: &Arc<Shared>,
    hello_id: u64,
    user: String,
) -> Result<()> {
    let count = shared.clients.fetch_add(1, Ordering::SeqCst) as usize + 1;
    if count > shared.config.max_clients {
        shared.clients.fetch_sub(1, Ordering::SeqCst);
        reply_once(
            &stream,
            Some(hello_id),
            ErrorCode::Unavailable,
            "server is full; ask the balancer for another",
        );
        return Ok(());
    }
    reader.get_ref().set_read_timeout(None)?;
    let stream = Arc::new(stream);
    let conn_id = shared.next_conn.fetch_add(1, Ordering::SeqCst);
    let (tx, rx) = mailbox::lazy::<Outbound>(shared.config.queue_len);
    let handle = Handle {
        conn_id,
        tx,
        stream: Arc::clone(&stream),
    };
    let writer_thread = {
        let out = stream.try_clone()?;
        let socket = Arc::clone(&stream);
        let shared = Arc::clone(shared);
        let user = user.clone();
        std::thread::Builder::new()
            .name("conn-writer".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                if let Err(e) = write_loop(out, &rx, &shared, &user) {
                    log::debug!("writer for {user} ended: {e}");
                    // A writer that cannot write ends the connection, so the reader stops too.
                    let _ = socket.shutdown(Shutdown::Both);
                }
            })?
    };
    let (slots, free) = bounded(FILE_WINDOW);
    let session = Session {
        shared,
        user,
        conn_id,
        handle,
        slots,
        free,
    };
    let result = session
        .start(hello_id)
        .and_then(|()| session.run(&mut reader));
    drop(session);
    let _ = writer_thread.join();
    result
}

/// One client connection's state, owned by its reader thread.
struct Session<'a> {
    shared: &'a Arc<Shared>,
    /// Who the token said the client is; every request acts as this user.
    user: String,
    /// Unique per server run.
    conn_id: u64,
    /// The outbound queue and the socket.
    handle: Handle,
    /// The file window: a slot is taken by sending, given back by receiving (see [`Permit`]).
    slots: Sender<()>,
    free: Receiver<()>,
}

impl Drop for Session<'_> {
    /// Releases what the connection holds, however its thread ends.
    fn drop(&mut self) {
        let shared = self.shared;
        shared.router.remove(&self.user, self.conn_id);
        shared.clients.fetch_sub(1, Ordering::SeqCst);
        let _ = self.handle.stream.shutdown(Shutdown::Both);
        let (sid, cid) = (shared.server_id, self.conn_id);
        shared.writer.submit(
            move |c| {
                db::remove_presence(c, sid, cid)?;
                db::drop_uploads(c, sid, Some(cid))
            },
            |_| {},
        );
        log::debug!("{} disconnected (connection {cid})", self.user);
    }
}

impl Session<'_> {
    /// Register, then sync: see the module documentation of [`crate::server`].
    fn start(&self, hello_id: u64) -> Result<()> {
        let shared = self.shared;
        shared.router.add(&self.user, self.handle.clone());
        let (sid, cid, u) = (shared.server_id, self.conn_id, self.user.clone());
        let newest = shared.writer.call(move |c| {
            db::add_presence(c, sid, cid, &u)?;
            db::newest_message_id(c)
        })?;
        self.queue(Outbound::Event(ServerEvent::Welcome {
            id: hello_id,
            user: self.user.clone(),
            server_id: shared.server_id,
            max_file: shared.config.max_file,
            newest,
        }));
        self.queue(Outbound::Sync);
        log::debug!("{} connected (connection {cid})", self.user);
        Ok(())
    }

    /// Reads and handles requests until the client leaves or sends garbage. A client over
    /// the request rate waits: its requests stay in its socket, and only it is slowed.
    fn run(&self, reader: &mut FrameReader<TcpStream>) -> Result<()> {
        let rate = self.shared.config.max_rate;
        let mut bucket = (rate > 0).then(|| Bucket::new(rate));
        loop {
            let request = match reader.read::<ServerRequest>() {
                Ok(Some(r)) => r,
                Ok(None) => return Ok(()),
                Err(e @ (Error::Malformed(_) | Error::FrameTooLarge(_))) => {
                    self.queue(Outbound::Event(ServerEvent::Error {
                        id: None,
                        code: ErrorCode::BadFrame,
                        message: e.to_string(),
                    }));
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            if let Some(wait) = bucket.as_mut().and_then(Bucket::take) {
                std::thread::sleep(wait);
            }
            self.handle(request)?;
        }
    }

    /// Queues an item for the writer thread, waiting if the queue is full: this is the client's
    /// own thread, so only the client is slowed.
    fn queue(&self, item: Outbound) {
        let _ = self.handle.tx.send(item);
    }

    fn refuse(&self, id: u64, code: ErrorCode, message: impl Into<String>) {
        self.queue(Outbound::Event(ServerEvent::Error {
            id: Some(id),
            code,
            message: message.into(),
        }));
    }

    /// Refuses the request if a name is bad; `kinds` says what each name is.
    fn names_ok(&self, id: u64, names: &[(&str, &str)]) -> bool {
        for (kind, name) in names {
            if let Err(e) = names::validate(kind, name) {
                self.refuse(id, ErrorCode::InvalidName, e.to_string());
                return false;
            }
        }
        true
    }

    /// Answers a read-only request from this thread.
    fn read(&self, id: u64, work: impl FnOnce(&rusqlite::Connection) -> Result<ServerEvent>) {
        let event = self
            .shared
            .readers
            .with(work)
            .unwrap_or_else(|e| error_event(id, e));
        self.queue(Outbound::Event(event));
    }

    /// Runs `work` on the database writer thread; its reply goes out after the commit.
    fn write(
        &self,
        id: u64,
        work: impl FnOnce(&rusqlite::Connection) -> Result<ServerEvent> + Send + 'static,
    ) {
        let handle = self.handle.clone();
        self.shared.writer.submit(work, move |res| {
            handle.offer(Outbound::Event(res.unwrap_or_else(|e| error_event(id, e))));
        });
    }

    /// Stores a message on the writer thread; after the commit it is routed and the sender
    /// told. `guarded`: run in a savepoint (work with more than one write).
    fn store(
        &self,
        id: u64,
        guarded: bool,
        work: impl FnOnce(&rusqlite::Connection) -> Result<db::StoredMessage> + Send + 'static,
    ) {
        let handle = self.handle.clone();
        let shared = Arc::clone(self.shared);
        let done = move |res: Result<db::StoredMessage>| {
            let event = match res {
                Ok(stored) => {
                    let msg_id = stored.envelope.id;
                    route(&shared, stored);
                    ServerEvent::Stored { id, msg_id }
                }
                Err(e) => error_event(id, e),
            };
            handle.offer(Outbound::Event(event));
        };
        if guarded {
            self.shared.writer.submit(work, done);
        } else {
            self.shared.writer.submit_unguarded(work, done);
        }
    }

    /// Takes a slot of the file window, waiting for one to come back if all are out.
    fn permit(&self) -> Result<Permit> {
        self.slots.send_timeout((), WINDOW_WAIT).map_err(|_| {
            Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "client stopped taking file chunks",
            ))
        })?;
        Ok(Permit::new(self.free.clone()))
    }

    /// Handles one request. Refusals are replies; only a broken connection is an error.
    fn handle(&self, request: ServerRequest) -> Result<()> {
        let me = self.user.clone();
        match request {
            ServerRequest::Send {
                id,
                to,
                client_id,
                body,
                file,
                resend_after,
            } => {
                if self.names_ok(id, &[("recipient", &to)]) && self.body_ok(id, &body) {
                    // Without a file, storing is one insert: atomic without a savepoint.
                    self.store(id, file.is_some() || resend_after.is_some(), move |c| {
                        let msg = db::Outgoing {
                            from: &me,
                            client_id,
                            body: &body,
                            file,
                            resend_after,
                        };
                        db::store_message(c, &msg, &to)
                    });
                }
            }
            ServerRequest::GroupSend {
                id,
                group,
                client_id,
                epoch,
                body,
                file,
                resend_after,
            } => {
                if self.names_ok(id, &[("group", &group)]) && self.body_ok(id, &body) {
                    self.store(id, true, move |c| {
                        let msg = db::Outgoing {
                            from: &me,
                            client_id,
                            body: &body,
                            file,
                            resend_after,
                        };
                        db::store_group_message(c, &msg, &group, epoch)
                    });
                }
            }
            ServerRequest::Ack { id, msg_ids } => {
                if msg_ids.len() > MAX_ACK {
                    let why = format!("at most {MAX_ACK} ids per acknowledgement");
                    self.refuse(id, ErrorCode::BadRequest, why);
                } else {
                    // Unguarded: an acknowledgement applied half-way is still true.
                    let handle = self.handle.clone();
                    self.shared.writer.submit_unguarded(
                        move |c| db::ack(c, &me, &msg_ids),
                        move |res| {
                            let event = match res {
                                Ok(_) => ServerEvent::Acked { id },
                                Err(e) => error_event(id, e),
                            };
                            handle.offer(Outbound::Event(event));
                        },
                    );
                }
            }
            ServerRequest::GroupCreate { id, group, key } => {
                if self.names_ok(id, &[("group", &group)]) {
                    self.write(id, move |c| {
                        db::create_group(c, &group, &me, &key).map(|()| ServerEvent::Done { id })
                    });
                }
            }
            ServerRequest::GroupAdd {
                id,
                group,
                user,
                epoch,
                key,
            } => {
                if self.names_ok(id, &[("group", &group), ("user", &user)]) {
                    self.write(id, move |c| {
                        db::add_member(c, &group, &me, &user, epoch, &key)
                            .map(|()| ServerEvent::Done { id })
                    });
                }
            }
            ServerRequest::GroupRemove {
                id,
                group,
                user,
                epoch,
                keys,
            } => {
                if self.names_ok(id, &[("group", &group), ("user", &user)]) {
                    self.write(id, move |c| {
                        db::remove_member(c, &group, &me, &user, epoch, &keys)
                            .map(|()| ServerEvent::Done { id })
                    });
                }
            }
            ServerRequest::GroupLeave { id, group } => {
                if self.names_ok(id, &[("group", &group)]) {
                    self.write(id, move |c| {
                        db::leave_group(c, &group, &me).map(|_| ServerEvent::Done { id })
                    });
                }
            }
            ServerRequest::GroupRekey {
                id,
                group,
                epoch,
                keys,
            } => {
                if self.names_ok(id, &[("group", &group)]) {
                    self.write(id, move |c| {
                        db::rekey_group(c, &group, &me, epoch, &keys)
                            .map(|()| ServerEvent::Done { id })
                    });
                }
            }
            ServerRequest::Who { id } => self.read(id, |c| {
                Ok(ServerEvent::Online {
                    id,
                    users: db::online_users(c, MAX_WHO)?,
                })
            }),
            ServerRequest::GroupList { id } => self.read(id, |c| {
                Ok(ServerEvent::Groups {
                    id,
                    groups: db::user_groups(c, &me)?,
                })
            }),
            ServerRequest::GroupInfo { id, group } => {
                if self.names_ok(id, &[("group", &group)]) {
                    self.read(id, |c| {
                        Ok(ServerEvent::Group {
                            id,
                            group: db::group_info(c, &group, &me)?,
                        })
                    });
                }
            }
            ServerRequest::GroupKey { id, group, epoch } => {
                if self.names_ok(id, &[("group", &group)]) {
                    self.read(id, |c| {
                        let (key, wrapped_by) = db::group_key(c, &group, &me, epoch)?;
                        Ok(ServerEvent::GroupKey {
                            id,
                            wrapped_by,
                            key,
                        })
                    });
                }
            }
            ServerRequest::FileBegin { id, size, chunks } => self.file_begin(id, size, chunks),
            ServerRequest::FileChunk {
                id,
                upload,
                index,
                data,
            } => {
                if data.is_empty() || data.len() > MAX_CHUNK {
                    let why = format!("a file chunk holds 1 to {MAX_CHUNK} bytes");
                    self.refuse(id, ErrorCode::BadMessage, why);
                    return Ok(());
                }
                let permit = self.permit()?;
                let handle = self.handle.clone();
                self.shared.writer.submit(
                    move |c| db::store_chunk(c, &me, upload, index, &data),
                    move |res| {
                        drop(permit);
                        let event = match res {
                            Ok(()) => ServerEvent::Done { id },
                            Err(e) => error_event(id, e),
                        };
                        handle.offer(Outbound::Event(event));
                    },
                );
            }
            ServerRequest::FileGet { id, msg_id, index } => {
                let permit = self.permit()?;
                match self
                    .shared
                    .readers
                    .with(|c| db::file_chunk(c, &me, msg_id, index))
                {
                    Ok(data) => {
                        self.queue(Outbound::Chunk(ServerEvent::FileData { id, data }, permit))
                    }
                    Err(e) => self.queue(Outbound::Event(error_event(id, e))),
                }
            }
            ServerRequest::Hello { id, .. } => {
                self.refuse(id, ErrorCode::BadRequest, "already said hello");
            }
            ServerRequest::PeerHello { .. } | ServerRequest::Relay { .. } => {
                self.queue(Outbound::Event(ServerEvent::Error {
                    id: None,
                    code: ErrorCode::BadRequest,
                    message: "not a peer link".into(),
                }));
            }
        }
        Ok(())
    }

    /// Refuses an empty or oversized message body.
    fn body_ok(&self, id: u64, body: &[u8]) -> bool {
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

    fn file_begin(&self, id: u64, size: u64, chunks: u64) {
        let max = self.shared.config.max_file;
        if size > max {
            let why = format!("a file of {size} bytes is over this server's limit of {max} bytes");
            return self.refuse(id, ErrorCode::BadMessage, why);
        }
        if chunks != chunk_count(size) {
            let why = format!("a file of {size} bytes has {} chunks", chunk_count(size));
            return self.refuse(id, ErrorCode::BadRequest, why);
        }
        let (me, sid, cid) = (self.user.clone(), self.shared.server_id, self.conn_id);
        self.write(id, move |c| {
            let upload = db::begin_upload(c, &me, sid, cid, size, chunks, MAX_UPLOADS)?;
            Ok(ServerEvent::Upload { id, upload })
        });
    }
}

/// Hands a committed message to every server where a recipient is connected: local users
/// through the router, others through one relay per server.
fn route(shared: &Shared, stored: db::StoredMessage) {
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
        let item = Arc::new(Relayed {
            msg: Arc::clone(&msg),
            users,
        });
        if !shared.peers.relay(server, &item) && !shared.peers.has_link(server) {
            // A server that registered since our last heartbeat: link to it now rather than
            // leave the message until its recipients' next login.
            match shared.readers.with(|c| db::server_addr(c, server)) {
                Ok(Some(addr)) => {
                    shared.peers.ensure(server, &addr);
                    shared.peers.relay(server, &item);
                }
                Ok(None) => log::debug!("server {server} is gone; message {} waits", msg.id),
                Err(e) => log::warn!("cannot look up server {server}: {e}"),
            }
        }
    }
}

/// The reply for a failed request: refusals keep their reason; anything else is logged here
/// and reported as an internal error, without details.
fn error_event(id: u64, e: Error) -> ServerEvent {
    let (code, message) = match e {
        Error::Refused { code, message } => (code, message),
        Error::InvalidName(message) => (ErrorCode::InvalidName, message),
        e => {
            log::error!("request {id} failed: {e}");
            (
                ErrorCode::Internal,
                "internal error; the request had no effect".to_string(),
            )
        }
    };
    ServerEvent::Error {
        id: Some(id),
        code,
        message,
    }
}

/// The connection's writer thread: drains its outbound queue onto the socket, flushing when the
/// queue runs dry so bursts go out in few system calls.
fn write_loop(
    stream: TcpStream,
    rx: &mailbox::Receiver<Outbound>,
    shared: &Shared,
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
                Outbound::Sync => synced_to = Some(sync(&mut w, shared, user, 0)?),
                Outbound::Resync => {
                    if let Some(upto) = synced_to {
                        synced_to = Some(upto.max(sync(&mut w, shared, user, 0)?));
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
fn sync(
    w: &mut FrameWriter<TcpStream>,
    shared: &Shared,
    user: &str,
    mut after: i64,
) -> Result<i64> {
    loop {
        let page = shared
            .readers
            .with(|c| db::queued(c, user, after, SYNC_PAGE))?;
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
    // Ids follow commit order, so every message for this user with an id up to `after` was in
    // the pages read above; live messages with higher ids are new.
    Ok(after)
}
