//! One connection to a chat server, authenticated by a session token.
//!
//! A reader thread hands each response to the request waiting for it (matched by request id)
//! and pushes delivered messages onto an event channel, so a program can send while messages
//! arrive.
//!
//! ```text
//! caller ── request(body) ──▶ writer (a lock: one frame at a time) ──▶ socket
//!   ▲ reply channel                                                      │
//!   └──────────── pending[id] ◀── reader thread ◀────────────────────────┘
//!                                      └──▶ events: Message, Synced, Closed
//! ```

use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use parking_lot::Mutex;

use super::balancer::{unexpected, Session, REPLY_TIMEOUT};
use crate::error::{Error, Result};
use crate::net::{
    Envelope, FrameReader, FrameWriter, Greeting, Request, Response, ServerEvent, ServerReply,
    ServerRequest,
};
use crate::transport::dial;

/// What a connection's reader thread hands to the program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A message for us (not yet acknowledged).
    Message(Envelope),
    /// Everything queued at login has been delivered.
    Synced,
    /// The connection ended; the text says why when the server said so.
    Closed(Option<String>),
}

/// The response to one request, when it comes.
pub type Reply = Receiver<Response<ServerReply>>;

/// Requests waiting for their reply, by id; `None` once the reader thread has ended, so a request
/// on a closed connection fails at once instead of waiting for a reply that cannot come.
/// A lock and not a channel: touched twice per request, by the caller and the reader thread.
type Pending = Arc<Mutex<Option<HashMap<u64, Sender<Response<ServerReply>>>>>>;

/// A connection to a chat server, authenticated by a session token.
pub struct Connection {
    /// Who the server says we are.
    pub user: String,
    /// The server's id.
    pub server_id: u64,
    /// The largest file the server accepts.
    pub max_file: u64,
    /// See [`Connection::newest`]; raised by the reader thread.
    newest: Arc<AtomicI64>,
    writer: Mutex<FrameWriter<TcpStream>>,
    stream: TcpStream,
    pending: Pending,
    events: Receiver<Incoming>,
    next_id: AtomicU64,
    reader: Option<JoinHandle<()>>,
}

impl Connection {
    /// Connects to the session's server and says `Hello`.
    pub fn open(session: &Session) -> Result<Connection> {
        let stream = dial(&session.server.addr, "chat server")?;
        let mut reader = FrameReader::new(stream.try_clone()?);
        let mut writer = FrameWriter::new(stream.try_clone()?);
        stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
        writer.send(&Greeting::Hello {
            token: session.token.clone(),
        })?;
        let welcome = match reader.read::<ServerEvent>()? {
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
        stream.set_read_timeout(None)?;
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let (events_tx, events) = unbounded();
        let newest = Arc::new(AtomicI64::new(welcome.newest));
        let thread = {
            let pending = Arc::clone(&pending);
            let newest = Arc::clone(&newest);
            std::thread::Builder::new()
                .name("client-reader".into())
                .spawn(move || read_loop(reader, &pending, &events_tx, &newest))?
        };
        Ok(Connection {
            user: welcome.user,
            server_id: welcome.server_id,
            max_file: welcome.max_file,
            newest,
            writer: Mutex::new(writer),
            stream,
            pending,
            events,
            next_id: AtomicU64::new(1),
            reader: Some(thread),
        })
    }

    /// Closes the connection; its reader thread then reports `Closed`.
    pub fn close(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Delivered messages and connection state changes.
    pub fn events(&self) -> &Receiver<Incoming> {
        &self.events
    }

    /// Sends a request and returns a channel that will carry its response.
    pub fn request(&self, body: &ServerRequest) -> Result<Reply> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = bounded(1);
        match self.pending.lock().as_mut() {
            Some(pending) => pending.insert(id, tx),
            None => return Err(closed()),
        };
        let sent = self.writer.lock().send(&Request { id, body });
        if let Err(e) = sent {
            if let Some(pending) = self.pending.lock().as_mut() {
                pending.remove(&id);
            }
            return Err(e);
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
        };
        match self.call(&ack)? {
            ServerReply::Done => Ok(()),
            other => Err(unexpected("Ack", &other)),
        }
    }
}

/// Waits for the response from [`Connection::request`]; a refusal becomes [`Error::Refused`].
pub fn wait_reply(rx: &Reply) -> Result<ServerReply> {
    match rx.recv_timeout(REPLY_TIMEOUT) {
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
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
    }
}

fn read_loop(
    mut reader: FrameReader<TcpStream>,
    pending: &Pending,
    events: &Sender<Incoming>,
    newest: &AtomicI64,
) {
    let why = loop {
        let event = match reader.read::<ServerEvent>() {
            Ok(Some(e)) => e,
            Ok(None) => break None,
            Err(e) => break Some(e.to_string()),
        };
        match event {
            ServerEvent::Reply(response) => {
                let Some(id) = response.id else {
                    // A refusal of no request: the server is closing the connection.
                    break response.result.err().map(|r| r.message);
                };
                if let Ok(ServerReply::Stored { msg_id }) = &response.result {
                    newest.fetch_max(*msg_id, Ordering::SeqCst);
                }
                let waiter = pending.lock().as_mut().and_then(|p| p.remove(&id));
                if let Some(waiter) = waiter {
                    let _ = waiter.send(response);
                }
            }
            ServerEvent::Deliver { msg } => {
                newest.fetch_max(msg.id, Ordering::SeqCst);
                let _ = events.send(Incoming::Message(Arc::unwrap_or_clone(msg)));
            }
            ServerEvent::Synced => {
                let _ = events.send(Incoming::Synced);
            }
            ServerEvent::Welcome(_) => break Some("the server said hello twice".into()),
        }
    };
    // Wake every waiter (their requests get no reply on this connection) and refuse new ones.
    pending.lock().take();
    let _ = events.send(Incoming::Closed(why));
}
