//! One client connection on a chat server, after `Hello`: its reader thread (which decodes and
//! handles requests), its writer thread (which owns the socket's write half; see
//! [`super::outbound`]), and what a request does, by concern: [`messages`] (send, acknowledge,
//! route), [`groups`] and [`files`].
//!
//! ```text
//! reader thread ── writes: Store::submit ──▶ db-writer ── after commit ──▶ reply, route
//!      │ reads: Store::read (own thread)                                      │
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

use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};

use super::outbound::{self, Handle, Outbound, Permit};
use super::shared::Shared;
use crate::db::Tx;
use crate::error::{Error, Result};
use crate::mailbox;
use crate::names;
use crate::net::{
    ErrorCode, FrameReader, Request, ServerEvent, ServerReply, ServerRequest, Welcome,
};
use crate::throttle::Bucket;

mod files;
mod groups;
mod messages;

/// File chunks one connection may have in flight: being committed (uploads) or waiting in its
/// outbound queue (downloads). Bounds the memory one client can make the server hold.
const FILE_WINDOW: usize = 8;

/// How long a reader waits for a file-window slot before giving up on the client.
const WINDOW_WAIT: Duration = Duration::from_secs(30);

/// Serves an authenticated client until it disconnects.
pub fn serve_client(
    stream: TcpStream,
    mut reader: FrameReader<TcpStream>,
    shared: &Arc<Shared>,
    user: String,
) -> Result<()> {
    let count = shared.clients.fetch_add(1, Ordering::SeqCst) as usize + 1;
    if count > shared.config.max_clients {
        shared.clients.fetch_sub(1, Ordering::SeqCst);
        outbound::refuse_once(
            &stream,
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
        cut: stream.clone(),
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
                if let Err(e) = outbound::write_loop(out, &rx, &shared.store, &user) {
                    log::debug!("writer for {user} ended: {e}");
                    // A writer that cannot write ends the connection, so the reader stops too.
                    outbound::Cut::cut(&*socket);
                }
            })?
    };
    let session = Session::new(shared, user, conn_id, handle);
    let result = session.start().and_then(|()| session.run(&mut reader));
    drop(session);
    let _ = writer_thread.join();
    result
}

/// One client connection's state, owned by its reader thread.
pub struct Session<'a> {
    shared: &'a Arc<Shared>,
    /// Who the token said the client is; every request acts as this user.
    user: String,
    /// Unique per server run.
    conn_id: u64,
    /// The outbound queue, and how to cut the connection off.
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
        self.handle.cut.cut();
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
    /// A session of `user` on connection `conn_id`, writing through `handle`; counted in
    /// `shared.clients` by its creator, uncounted when dropped.
    pub fn new(shared: &'a Arc<Shared>, user: String, conn_id: u64, handle: Handle) -> Session<'a> {
        let (slots, free) = bounded(FILE_WINDOW);
        Session {
            shared,
            user,
            conn_id,
            handle,
            slots,
            free,
        }
    }

    /// Register, then sync: see the documentation of [`crate::server`].
    pub fn start(&self) -> Result<()> {
        let shared = self.shared;
        shared.router.add(&self.user, self.handle.clone());
        let (sid, cid, u) = (shared.server_id, self.conn_id, self.user.clone());
        let newest = shared.store.call(move |tx| {
            tx.add_presence(sid, cid, &u)?;
            tx.newest_message_id()
        })?;
        self.queue(Outbound::Event(ServerEvent::Welcome(Welcome {
            user: self.user.clone(),
            server_id: shared.server_id,
            max_file: shared.config.max_file,
            newest,
        })));
        self.queue(Outbound::Sync);
        log::debug!("{} connected (connection {cid})", self.user);
        Ok(())
    }

    /// Reads and handles requests until the client leaves or sends garbage. A client over
    /// the request rate waits: its requests stay in its socket, and only it is slowed.
    pub fn run(&self, reader: &mut FrameReader<TcpStream>) -> Result<()> {
        let rate = self.shared.config.max_rate;
        let mut bucket = (rate > 0).then(|| Bucket::new(rate));
        loop {
            let request = match reader.read::<Request<ServerRequest>>() {
                Ok(Some(r)) => r,
                Ok(None) => return Ok(()),
                Err(e @ (Error::Malformed(_) | Error::FrameTooLarge { .. })) => {
                    self.queue(Outbound::Event(ServerEvent::refused(
                        None,
                        ErrorCode::BadFrame,
                        e.to_string(),
                    )));
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

    /// Handles one request. Refusals are replies; only a broken connection is an error.
    pub fn handle(&self, request: Request<ServerRequest>) -> Result<()> {
        let Request { id, body } = request;
        match body {
            ServerRequest::Send { to, message } => self.send(id, to, message),
            ServerRequest::Ack { msg_ids } => self.ack(id, msg_ids),
            ServerRequest::Who => self.read(id, |tx| {
                Ok(ServerReply::Online {
                    users: tx.online_users(crate::net::MAX_WHO)?,
                })
            }),
            ServerRequest::GroupCreate { group, key } => self.group_create(id, group, key),
            ServerRequest::GroupAdd {
                group,
                user,
                epoch,
                key,
            } => self.group_add(id, group, user, epoch, key),
            ServerRequest::GroupRemove {
                group,
                user,
                epoch,
                keys,
            } => self.group_remove(id, group, user, epoch, keys),
            ServerRequest::GroupLeave { group } => self.group_leave(id, group),
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

    /// Queues an item for the writer thread, waiting if the queue is full: this is the client's
    /// own thread, so only the client is slowed.
    fn queue(&self, item: Outbound) {
        let _ = self.handle.tx.send(item);
    }

    fn refuse(&self, id: u64, code: ErrorCode, message: impl Into<String>) {
        self.queue(Outbound::Event(ServerEvent::refused(
            Some(id),
            code,
            message,
        )));
    }

    /// Refuses the request if a name is bad; `names` pairs what each name is with the name.
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
    fn read(&self, id: u64, work: impl FnOnce(&mut dyn Tx) -> Result<ServerReply>) {
        let event = match self.shared.store.read(work) {
            Ok(reply) => ServerEvent::reply(id, reply),
            Err(e) => error_event(id, e),
        };
        self.queue(Outbound::Event(event));
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
            handle.offer(Outbound::Event(event));
        });
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
    ServerEvent::refused(Some(id), code, message)
}

#[cfg(test)]
mod tests;
