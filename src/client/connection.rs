//! One connection to a chat server, authenticated by a session token and its proof.
//!
//! One thread owns the connection (its socket and TLS session): it writes the requests other
//! threads queue, hands each response to the request waiting for it (matched by request id),
//! and pushes delivered messages onto an event channel, so a program can send while messages
//! arrive.
//!
//! ```text
//! caller ── request(body): encode, pending[id], outbox ──▶ ring waker
//!   ▲ reply channel                                            │
//!   │                     the connection's thread: poll(socket, waker)
//!   └───── pending[id] ◀── responses          outbox ──▶ socket
//!                          Deliver, Synced ──▶ events: Message, Synced, Closed
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use parking_lot::Mutex;

use super::balancer::{unexpected, Session};
use crate::error::{Error, Result};
use crate::mailbox;
use crate::net::{
    encode_into, Envelope, Greeting, Request, Response, ServerEvent, ServerReply, ServerRequest,
    MAX_FRAME,
};
use crate::transport::tls::not_fastchat;
use crate::transport::{wait, Channel, Expect, Fill, Transport, Waker};

/// How long a request to a chat server waits for its reply (and `Hello` for `Welcome`)
/// before the server counts as lost: a server that is stopped or cut off is left after a few
/// seconds for another, and the request is sent again there (stored once).
pub const SERVER_TIMEOUT: Duration = Duration::from_secs(5);

/// What a connection's thread hands to the program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A message for us (not yet acknowledged).
    Message(Envelope),
    /// Everything queued at login has been delivered.
    Synced,
    /// A watched user came online (`true`) or went offline.
    Presence(String, bool),
    /// The connection ended; the text says why when the server said so.
    Closed(Option<String>),
}

/// The response to one request, when it comes.
pub type Reply = Receiver<Response<ServerReply>>;

/// Requests waiting for their reply, by id; `None` once the connection's thread has ended, so
/// a request on a closed connection fails at once instead of waiting for a reply that cannot
/// come. A lock and not a channel: touched twice per request, by the caller and the thread.
type Pending = Arc<Mutex<Option<HashMap<u64, Sender<Response<ServerReply>>>>>>;

/// Requests queued for the thread to write, at most; a caller past it waits.
const OUTBOX: usize = 4096;

/// A connection to a chat server.
pub struct Connection {
    /// Who the server says we are.
    pub user: String,
    /// The server's id.
    pub server_id: u64,
    /// The largest file the server accepts.
    pub max_file: u64,
    /// See [`Connection::newest`]; raised by the connection's thread.
    newest: Arc<AtomicI64>,
    /// Encoded request frames for the thread to write.
    outbox: mailbox::Sender<Vec<u8>>,
    /// Set to end the connection; the waker makes the thread look.
    closing: Arc<AtomicBool>,
    waker: Arc<Waker>,
    pending: Pending,
    events: Receiver<Incoming>,
    next_id: AtomicU64,
    thread: Option<JoinHandle<()>>,
}

impl Connection {
    /// Connects to the session's server (checking its certificate with `transport`), says
    /// `Hello` with the session's proof for this connection, and starts the connection's
    /// thread.
    pub fn open(session: &Session, transport: &Transport) -> Result<Connection> {
        let expect = Expect::Server(Some(session.server.name.clone()));
        let stream = transport.connect(&session.server.addr, "chat server", &expect)?;
        let mut chan = Channel::new(stream)?;
        chan.stream().tcp().set_read_timeout(Some(SERVER_TIMEOUT))?;
        let proof = session.key.prove(chan.stream().binding().as_ref())?;
        chan.send(&Greeting::Hello {
            token: session.token.clone(),
            proof,
        })?;
        let first = chan.recv::<ServerEvent>(MAX_FRAME).map_err(|e| match e {
            Error::FrameTooLarge { .. } | Error::Malformed(_) => {
                not_fastchat(&session.server.addr, "its answer is not a fastchat frame")
            }
            e => e,
        })?;
        let welcome = match first {
            Some(ServerEvent::Welcome(w)) => w,
            Some(ServerEvent::Reply(Response {
                result: Err(refusal),
                ..
            })) => return Err(refusal.into()),
            Some(other) => return Err(unexpected("Hello", &other)),
            None => {
                return Err(Error::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "server closed the connection during Hello",
                )))
            }
        };
        chan.stream().tcp().set_read_timeout(None)?;
        chan.set_nonblocking(true)?;
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let (events_tx, events) = unbounded();
        let newest = Arc::new(AtomicI64::new(welcome.newest));
        let waker = Arc::new(Waker::new()?);
        let (outbox, requests) = mailbox::lazy_with(OUTBOX, Arc::clone(&waker));
        let closing = Arc::new(AtomicBool::new(false));
        let thread = {
            let driver = Driver {
                chan,
                requests,
                waker: Arc::clone(&waker),
                closing: Arc::clone(&closing),
                pending: Arc::clone(&pending),
                events: events_tx,
                newest: Arc::clone(&newest),
            };
            std::thread::Builder::new()
                .name("client-conn".into())
                .spawn(move || driver.run())?
        };
        Ok(Connection {
            user: welcome.user,
            server_id: welcome.server_id,
            max_file: welcome.max_file,
            newest,
            outbox,
            closing,
            waker,
            pending,
            events,
            next_id: AtomicU64::new(1),
            thread: Some(thread),
        })
    }

    /// Closes the connection; its thread then reports `Closed`.
    pub fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.waker.wake();
    }

    /// Delivered messages and connection state changes.
    pub fn events(&self) -> &Receiver<Incoming> {
        &self.events
    }

    /// Sends a request and returns a channel that will carry its response.
    pub fn request(&self, body: &ServerRequest) -> Result<Reply> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = Vec::new();
        encode_into(&mut frame, &Request { id, body })?;
        let (tx, rx) = bounded(1);
        match self.pending.lock().as_mut() {
            Some(pending) => pending.insert(id, tx),
            None => return Err(closed()),
        };
        if self.outbox.send(frame).is_err() {
            if let Some(pending) = self.pending.lock().as_mut() {
                pending.remove(&id);
            }
            return Err(closed());
        }
        Ok(rx)
    }

    /// Sends a request and waits for its reply; a refusal becomes [`Error::Refused`].
    pub fn call(&self, body: &ServerRequest) -> Result<ServerReply> {
        let rx = self.request(body)?;
        wait_reply(&rx)
    }

    /// The newest message id this connection knows was assigned: from `Welcome`, then every
    /// `Stored` and `Deliver`. A message sent now will get a larger one.
    pub fn newest(&self) -> i64 {
        self.newest.load(Ordering::SeqCst)
    }

    /// Acknowledges messages (they leave the queue) and waits for the server to confirm.
    pub fn ack(&self, msg_ids: &[i64]) -> Result<()> {
        if msg_ids.is_empty() {
            return Ok(());
        }
        let ack = ServerRequest::Ack {
            msg_ids: msg_ids.to_vec(),
            quiet: false,
        };
        match self.call(&ack)? {
            ServerReply::Done => Ok(()),
            other => Err(unexpected("Ack", &other)),
        }
    }
}

/// Waits for the response from [`Connection::request`]; a refusal becomes [`Error::Refused`].
pub fn wait_reply(rx: &Reply) -> Result<ServerReply> {
    match rx.recv_timeout(SERVER_TIMEOUT) {
        Ok(response) => response.into_result(),
        Err(crossbeam_channel::RecvTimeoutError::Timeout) => Err(Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the server did not answer",
        ))),
        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => Err(closed()),
    }
}

/// The error of a request on a connection that has ended.
pub(crate) fn closed() -> Error {
    Error::Io(std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "connection closed",
    ))
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the connection's thread owns.
struct Driver {
    chan: Channel,
    requests: mailbox::Receiver<Vec<u8>>,
    waker: Arc<Waker>,
    closing: Arc<AtomicBool>,
    pending: Pending,
    events: Sender<Incoming>,
    newest: Arc<AtomicI64>,
}

impl Driver {
    fn run(mut self) {
        let why = match self.serve() {
            Ok(()) => None,
            Err(e) => Some(e.to_string()),
        };
        // Wake every waiter (their requests get no reply on this connection) and refuse new
        // ones.
        self.pending.lock().take();
        let _ = self.events.send(Incoming::Closed(why));
    }

    /// Until the connection ends: `Ok` when closed by us or cleanly by the server, `Err` with
    /// the reason otherwise.
    fn serve(&mut self) -> Result<()> {
        let mut readable = true;
        loop {
            if self.closing.load(Ordering::SeqCst) {
                return Ok(());
            }
            while let Ok(frame) = self.requests.try_recv() {
                self.chan.queue_encoded(&frame);
            }
            if self.chan.pending() > 0 {
                self.chan.flush()?;
            }
            while readable {
                while let Some(event) = self.chan.frame::<ServerEvent>(MAX_FRAME)? {
                    self.dispatch(event)?;
                }
                match self.chan.fill()? {
                    Fill::Data => {}
                    Fill::Idle => readable = false,
                    Fill::Closed if self.chan.buffered() == 0 => return Ok(()),
                    Fill::Closed => {
                        return Err(Error::Io(std::io::ErrorKind::UnexpectedEof.into()))
                    }
                }
            }
            if !self.requests.prepare_wait() {
                continue;
            }
            let ready = wait(
                self.chan.stream(),
                self.chan.interest(true),
                &[&self.waker],
                None,
            );
            self.requests
                .woke(ready.as_ref().map_or(true, |r| r.woken & 1 != 0));
            readable = ready?.readable;
        }
    }

    fn dispatch(&mut self, event: ServerEvent) -> Result<()> {
        match event {
            ServerEvent::Reply(response) => {
                let Some(id) = response.id else {
                    // A refusal of no request: the server is closing the connection.
                    let why = response
                        .result
                        .err()
                        .map(|r| r.message)
                        .unwrap_or_else(|| "the server closed the connection".into());
                    return Err(Error::Invalid(why));
                };
                if let Ok(ServerReply::Stored { msg_id }) = &response.result {
                    self.newest.fetch_max(*msg_id, Ordering::SeqCst);
                }
                let waiter = self.pending.lock().as_mut().and_then(|p| p.remove(&id));
                if let Some(waiter) = waiter {
                    let _ = waiter.send(response);
                }
            }
            ServerEvent::Deliver { msg } => {
                self.newest.fetch_max(msg.id, Ordering::SeqCst);
                let _ = self
                    .events
                    .send(Incoming::Message(Arc::unwrap_or_clone(msg)));
            }
            ServerEvent::Synced => {
                let _ = self.events.send(Incoming::Synced);
            }
            ServerEvent::Presence { user, online } => {
                let _ = self.events.send(Incoming::Presence(user, online));
            }
            ServerEvent::Welcome(_) => {
                return Err(Error::Protocol("the server said hello twice".into()))
            }
        }
        Ok(())
    }
}
