//! The running clients: each one's connection (replaced if its server dies), its sending side
//! and its receiving side, and the counters they share.
//!
//! ```text
//! sender ──(window slot)──▶ Conn::send: remember as unconfirmed, write ──▶ server
//! reader ◀── Stored (forget it, free the slot) / Deliver (open, count, queue an Ack)
//!    │ the connection ends while the run goes on
//!    ▼
//! Conn::failover: balancer Resume (avoiding the dead server), Hello to the new one, re-send
//! every unconfirmed message with `resend_after` (stored once, whatever happened to the first)
//! ```

use std::collections::{BTreeMap, HashMap};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use parking_lot::Mutex;

use super::{open_link, Link};
use crate::client::e2e::{self, Plain};
use crate::client::BalancerClient;
use crate::crypto::{Identity, PairKey};
use crate::error::{Error, Result};
use crate::net::{
    Envelope, FrameReader, FrameWriter, NewMessage, Request, Response, ServerEvent, ServerReply,
    ServerRequest,
};

/// Counters shared by every thread of a run.
#[derive(Default)]
pub(super) struct Counters {
    /// Distinct (sender, sequence) deliveries.
    pub delivered: AtomicU64,
    /// A (sender, sequence) delivered again under another message id: stored twice.
    pub duplicated: AtomicU64,
    /// A message delivered again under the same id (at-least-once on the wire).
    pub redelivered: AtomicU64,
    /// Connections replaced after their server was lost.
    pub failovers: AtomicU64,
    pub errors: AtomicU64,
    /// When the last new delivery happened, nanoseconds after the start.
    pub last_delivery_ns: AtomicU64,
    pub first_error: Mutex<Option<String>>,
    /// Set when the run is over: a closed connection is then not a failure.
    pub finished: AtomicBool,
}

impl Counters {
    pub fn error(&self, what: &str) {
        self.errors.fetch_add(1, Ordering::SeqCst);
        let mut first = self.first_error.lock();
        if first.is_none() {
            *first = Some(what.to_string());
        }
    }
}

/// How long a client keeps trying to reach another server.
const FAILOVER_LIMIT: Duration = Duration::from_secs(30);

/// Most message ids in one acknowledgement from the bench.
const ACK_BATCH: usize = 256;

/// Longest an acknowledgement waits to be batched with others.
const ACK_DELAY: Duration = Duration::from_millis(10);

/// The writing half of the current connection.
struct Out {
    writer: FrameWriter<TcpStream>,
    stream: TcpStream,
    server_id: u64,
}

/// One client's connection to its server, replaced when that server dies.
pub(super) struct Conn {
    balancer: String,
    token: String,
    /// Locked to write; a failover holds it while it swaps the connection and re-sends, so a
    /// message is either written to the new connection or re-sent on it.
    out: Mutex<Out>,
    /// Sent and not yet confirmed stored, by request id (the sequence number): the request and
    /// the newest message id known when it was first sent (its `resend_after`).
    unconfirmed: Mutex<BTreeMap<u64, (Request<ServerRequest>, i64)>>,
    /// The newest message id this client has seen assigned.
    newest: AtomicI64,
    /// Acknowledgements not yet sent. Like TCP's delayed ACK: sent at once when a batch is
    /// full, else by the [`Acker`] within [`ACK_DELAY`], so a client at a low rate does not
    /// cost the server a transaction and a reply per message.
    acks: Mutex<Vec<i64>>,
    next_ack_id: AtomicU64,
}

impl Conn {
    /// Takes over a set-up link; returns the connection and the link's reading half.
    pub fn new(balancer: &str, link: Link) -> (Conn, FrameReader<TcpStream>) {
        let Link {
            reader,
            writer,
            stream,
            server_id,
            newest,
            token,
        } = link;
        let conn = Conn {
            balancer: balancer.to_string(),
            token,
            out: Mutex::new(Out {
                writer,
                stream,
                server_id,
            }),
            unconfirmed: Mutex::new(BTreeMap::new()),
            newest: AtomicI64::new(newest),
            acks: Mutex::new(Vec::with_capacity(ACK_BATCH)),
            next_ack_id: AtomicU64::new(1 << 62),
        };
        (conn, reader)
    }

    /// Writes a message request, remembering it until it is confirmed. A write to a server
    /// that just died fails silently: the failover re-sends it.
    fn send(&self, seq: u64, request: Request<ServerRequest>, flush: bool) {
        let mut out = self.out.lock();
        // Remembered before it is written: its `Stored` may come back at once.
        let mut unconfirmed = self.unconfirmed.lock();
        let newest = self.newest.load(Ordering::SeqCst);
        let request = &unconfirmed.entry(seq).or_insert((request, newest)).0;
        let _ = out.writer.write(request);
        drop(unconfirmed);
        if flush {
            let _ = out.writer.flush();
        }
    }

    fn flush(&self) {
        let _ = self.out.lock().writer.flush();
    }

    /// Queues an acknowledgement; sends the batch if it is full.
    fn ack(&self, msg_id: i64) {
        let full = {
            let mut p = self.acks.lock();
            p.push(msg_id);
            p.len() >= ACK_BATCH
        };
        if full {
            self.flush_acks();
        }
    }

    /// Sends the pending acknowledgements.
    fn flush_acks(&self) {
        let msg_ids = std::mem::take(&mut *self.acks.lock());
        if msg_ids.is_empty() {
            return;
        }
        let id = self.next_ack_id.fetch_add(1, Ordering::Relaxed);
        // Lost with a dying server: the messages come again from the next one.
        let _ = self.out.lock().writer.send(&Request {
            id,
            body: ServerRequest::Ack { msg_ids },
        });
    }

    /// Closes the connection (end of the run).
    pub fn close(&self) {
        let _ = self.out.lock().stream.shutdown(Shutdown::Both);
    }

    /// Asks the balancer for another server, connects, and re-sends everything unconfirmed.
    /// Returns the new connection's reading half.
    fn failover(&self) -> Result<FrameReader<TcpStream>> {
        let dead = self.out.lock().server_id;
        let deadline = Instant::now() + FAILOVER_LIMIT;
        loop {
            let attempt = BalancerClient::connect(&self.balancer)
                .and_then(|mut b| b.resume(&self.token, Some(dead)))
                .and_then(|session| open_link(&session));
            match attempt {
                Ok(link) => {
                    self.newest.fetch_max(link.newest, Ordering::SeqCst);
                    let mut out = self.out.lock();
                    *out = Out {
                        writer: link.writer,
                        stream: link.stream,
                        server_id: link.server_id,
                    };
                    for (request, newest) in self.unconfirmed.lock().values() {
                        let _ = out.writer.write(&resend(request, *newest));
                    }
                    out.writer.flush()?;
                    return Ok(link.reader);
                }
                Err(e) if Instant::now() < deadline => {
                    log::debug!("failover from server {dead}: {e}; trying again");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The same request, marked as a re-send.
fn resend(request: &Request<ServerRequest>, newest: i64) -> Request<ServerRequest> {
    let mut again = request.clone();
    match &mut again.body {
        ServerRequest::Send { message, .. } | ServerRequest::GroupSend { message, .. } => {
            message.resend_after = Some(newest)
        }
        _ => {}
    }
    again
}

/// A client's sending side.
pub(super) struct Sending {
    pub index: usize,
    pub me: String,
    pub to: Option<(String, PairKey)>,
    pub group: Option<(String, PairKey)>,
    pub identity: Arc<Identity>,
    pub conn: Arc<Conn>,
    /// Window: a slot is taken per message and given back by the reader on `Stored`.
    pub slots: Sender<()>,
    pub size: usize,
    pub counters: Arc<Counters>,
}

impl Sending {
    /// Seals and writes message `seq`, due at `due` (`start` is time zero); `flush` sends it
    /// now, else it waits in the buffer until the window fills.
    fn send(&self, seq: u64, due: Instant, start: Instant, flush: bool) -> Result<()> {
        if self.slots.try_send(()).is_err() {
            // The window is full: push out what is buffered, then wait for a slot.
            self.conn.flush();
            self.slots
                .send_timeout((), FAILOVER_LIMIT + Duration::from_secs(10))
                .map_err(|_| Error::Protocol("no Stored reply in 40 s".into()))?;
        }
        let sent_ns = due.saturating_duration_since(start).as_nanos() as u64;
        let text = payload(self.index, seq, sent_ns, self.size);
        let request = self.request(seq, &text)?;
        self.conn.send(seq, request, flush);
        Ok(())
    }

    /// As fast as the window allows: this client's own thread.
    pub fn run(self, messages: u64, go: &Receiver<()>, start: &OnceLock<Instant>) -> Result<()> {
        let _ = go.recv();
        let start = *start.get().expect("set before go");
        for seq in 0..messages {
            self.send(seq, Instant::now(), start, false)?;
        }
        self.conn.flush();
        self.wait_stored();
        Ok(())
    }

    /// Waits until every message is stored (all window slots back).
    fn wait_stored(&self) {
        for _ in 0..self.slots.capacity().unwrap_or(0) {
            if self
                .slots
                .send_timeout((), FAILOVER_LIMIT + Duration::from_secs(10))
                .is_err()
            {
                self.counters.error("messages never confirmed as stored");
                break;
            }
        }
    }

    fn request(&self, seq: u64, text: &str) -> Result<Request<ServerRequest>> {
        let plain = Plain::Text(text.to_string());
        if let Some((to, key)) = &self.to {
            let body = e2e::seal_direct_with(key, &self.me, to, seq, &plain)?;
            return Ok(Request {
                id: seq,
                body: ServerRequest::Send {
                    to: to.clone(),
                    message: NewMessage {
                        client_id: seq,
                        body,
                        file: None,
                        resend_after: None,
                    },
                },
            });
        }
        let (group, key) = self.group.as_ref().expect("a direct or group role");
        let body = e2e::seal_group_with(&self.identity, key, group, &self.me, seq, 1, &plain)?;
        Ok(Request {
            id: seq,
            body: ServerRequest::GroupSend {
                group: group.clone(),
                epoch: 1,
                message: NewMessage {
                    client_id: seq,
                    body,
                    file: None,
                    resend_after: None,
                },
            },
        })
    }
}

/// A fixed offered load, from one thread for all clients: message k (of client k mod N, its
/// number k div N) is due k/R seconds after the start, and is written and flushed then. One
/// pacing thread wakes far less often than one sleeping thread per client would, so the tool
/// takes less of the machine it measures.
pub(super) fn pace(
    clients: Vec<Sending>,
    messages: u64,
    rate: f64,
    go: &Receiver<()>,
    start: &OnceLock<Instant>,
) -> Result<()> {
    let _ = go.recv();
    let start = *start.get().expect("set before go");
    let n = clients.len() as u64;
    for k in 0..n * messages {
        let due = start + Duration::from_secs_f64(k as f64 / rate);
        let now = Instant::now();
        if due > now + Duration::from_micros(50) {
            std::thread::sleep(due - now);
        }
        clients[(k % n) as usize].send(k / n, due, start, true)?;
    }
    for c in &clients {
        c.wait_stored();
    }
    Ok(())
}

/// `SENDER:SEQ:NANOS:` padded with dots to `size` bytes.
pub(super) fn payload(sender: usize, seq: u64, nanos: u64, size: usize) -> String {
    let mut s = format!("{sender}:{seq}:{nanos}:");
    if s.len() < size {
        s.extend(std::iter::repeat_n('.', size - s.len()));
    }
    s
}

/// Parses a payload back into (sender, seq, nanos).
pub(super) fn parse_payload(text: &str) -> Option<(u64, u64, u64)> {
    let mut it = text.splitn(4, ':');
    Some((
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
    ))
}

/// A client's receiving side.
pub(super) struct Receiving {
    pub conn: Arc<Conn>,
    pub from_key: Option<PairKey>,
    pub group_key: Option<PairKey>,
    pub ed25519: Arc<Vec<Vec<u8>>>,
    /// Where the index starts in a user name (`bRUN-INDEX`).
    pub prefix_len: usize,
    pub counters: Arc<Counters>,
    pub start: Arc<OnceLock<Instant>>,
    pub free: Receiver<()>,
}

impl Receiving {
    /// Reads until the run is over, failing over when the connection is lost; returns
    /// latencies in microseconds.
    pub fn run(self, mut reader: FrameReader<TcpStream>) -> Vec<u32> {
        let mut latencies = Vec::new();
        // (sender, sequence) → the message id it was delivered under.
        let mut seen: HashMap<(u64, u64), i64> = HashMap::new();
        loop {
            match reader.read::<ServerEvent>() {
                Ok(Some(ServerEvent::Reply(Response {
                    id: Some(id),
                    result: Ok(ServerReply::Stored { msg_id }),
                }))) => {
                    self.conn.newest.fetch_max(msg_id, Ordering::SeqCst);
                    if self.conn.unconfirmed.lock().remove(&id).is_some() {
                        let _ = self.free.try_recv();
                    }
                }
                Ok(Some(ServerEvent::Deliver { msg })) => {
                    self.conn.newest.fetch_max(msg.id, Ordering::SeqCst);
                    self.delivered(&msg, &mut seen, &mut latencies);
                    self.conn.ack(msg.id);
                }
                Ok(Some(ServerEvent::Reply(Response {
                    result: Err(refusal),
                    ..
                }))) => self.counters.error(&refusal.message),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    if self.counters.finished.load(Ordering::SeqCst) {
                        break;
                    }
                    self.counters.failovers.fetch_add(1, Ordering::SeqCst);
                    match self.conn.failover() {
                        Ok(r) => reader = r,
                        Err(e) => {
                            self.counters.error(&format!("failover: {e}"));
                            break;
                        }
                    }
                }
            }
        }
        latencies
    }

    fn delivered(
        &self,
        msg: &Envelope,
        seen: &mut HashMap<(u64, u64), i64>,
        latencies: &mut Vec<u32>,
    ) {
        let (sender, seq, sent_ns) = match self.open(msg) {
            Ok(fields) => fields,
            Err(e) => return self.counters.error(&format!("message {}: {e}", msg.id)),
        };
        match seen.get(&(sender, seq)) {
            None => {
                seen.insert((sender, seq), msg.id);
                let now = self
                    .start
                    .get()
                    .map_or(0, |s| s.elapsed().as_nanos() as u64);
                self.counters.delivered.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .last_delivery_ns
                    .fetch_max(now, Ordering::Relaxed);
                latencies.push((now.saturating_sub(sent_ns) / 1000) as u32);
            }
            Some(id) if *id == msg.id => {
                self.counters.redelivered.fetch_add(1, Ordering::Relaxed);
            }
            Some(_) => {
                self.counters.duplicated.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Decrypts (and in groups verifies) a delivery; returns its payload's fields.
    fn open(&self, msg: &Envelope) -> Result<(u64, u64, u64)> {
        let plain = match (&self.from_key, &self.group_key) {
            (Some(key), _) => e2e::open_direct_with(key, msg)?,
            (None, Some(key)) => {
                let sender: usize = msg
                    .from
                    .get(self.prefix_len..)
                    .and_then(|i| i.parse().ok())
                    .filter(|i| *i < self.ed25519.len())
                    .ok_or_else(|| Error::Integrity(format!("unknown sender {}", msg.from)))?;
                e2e::verify_group(&self.ed25519[sender], msg)?.open(key)?
            }
            (None, None) => return Err(Error::Protocol("a message in idle mode".into())),
        };
        match plain {
            Plain::Text(t) => {
                parse_payload(&t).ok_or_else(|| Error::Integrity("not a bench payload".into()))
            }
            _ => Err(Error::Integrity("not a text message".into())),
        }
    }
}

/// One thread that sends every client's pending acknowledgements every [`ACK_DELAY`].
pub(super) struct Acker {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

impl Acker {
    pub fn start(all: Vec<Arc<Conn>>) -> Result<Acker> {
        let (stop, stopped) = bounded::<()>(0);
        let thread = std::thread::Builder::new()
            .name("bench-acker".into())
            .spawn(move || {
                while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(ACK_DELAY)
                {
                    for conn in &all {
                        conn.flush_acks();
                    }
                }
            })?;
        Ok(Acker { stop, thread })
    }

    pub fn stop(self) {
        drop(self.stop);
        let _ = self.thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_pad() {
        let p = payload(7, 42, 123_456, 64);
        assert_eq!(p.len(), 64);
        assert_eq!(parse_payload(&p), Some((7, 42, 123_456)));
        let short = payload(1, 2, 3, 0);
        assert_eq!(short, "1:2:3:");
        assert_eq!(parse_payload("garbage"), None);
    }
}
