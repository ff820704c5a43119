//! The running clients: each one's connection (replaced if its server dies), its sending side
//! and its receiving side, and the counters they share.
//!
//! ```text
//! sender ──(window slot)──▶ Conn::send: remember as unconfirmed, queue the frame ──▶ ring
//! connection thread (owns the socket): queued frames ──▶ server
//!    ◀── Stored (forget it, free the slot) / Deliver (open, count, acknowledge in batches)
//!    │ the connection ends while the run goes on
//!    ▼
//! failover: balancer Resume (avoiding the dead server), Hello to the new one, re-send every
//! unconfirmed message with `resend_after` (stored once, whatever happened to the first)
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use super::{open_link, Link};
use crate::client::e2e::{self, Plain};
use crate::client::{BalancerClient, Session};
use crate::crypto::{Identity, PairKey};
use crate::error::{Error, Result};
use crate::mailbox;
use crate::net::{
    encode_into, Envelope, NewMessage, Request, Response, ServerEvent, ServerReply, ServerRequest,
    MAX_FRAME,
};
use crate::transport::{wait, Channel, Fill, Transport, Waker};

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

/// Longest an acknowledgement waits to be batched with others. Like TCP's delayed ACK: a
/// client at a low rate does not cost the server a transaction and a reply per message.
const ACK_DELAY: Duration = Duration::from_millis(10);

/// Frames queued for one connection's thread, at most.
const OUTBOX: usize = 4096;

/// One client's connection, shared by its sender and its connection thread.
pub(super) struct Conn {
    balancer: String,
    transport: Transport,
    session: Session,
    /// Encoded request frames for the connection's thread to write.
    outbox: mailbox::Sender<Vec<u8>>,
    waker: Arc<Waker>,
    /// Sent and not yet confirmed stored, by request id (the sequence number): the request and
    /// the newest message id known when it was first sent (its `resend_after`).
    unconfirmed: Mutex<BTreeMap<u64, (Request<ServerRequest>, i64)>>,
    /// The newest message id this client has seen assigned.
    newest: AtomicI64,
    /// Set at the end of the run.
    closing: AtomicBool,
}

/// What the connection's thread owns: the socket and what waits for it.
pub(super) struct Owner {
    chan: Channel,
    frames: mailbox::Receiver<Vec<u8>>,
    server_id: u64,
    /// Acknowledgements not yet sent, and when the oldest must go.
    acks: Vec<i64>,
    acks_due: Option<Instant>,
    next_ack_id: u64,
}

impl Conn {
    /// Takes over a set-up link; returns the connection and what its thread owns.
    pub fn new(balancer: &str, transport: &Transport, link: Link) -> Result<(Arc<Conn>, Owner)> {
        let Link {
            mut chan,
            server_id,
            newest,
            session,
        } = link;
        chan.set_nonblocking(true)?;
        let waker = Arc::new(Waker::new()?);
        let (outbox, frames) = mailbox::lazy_with(OUTBOX, Arc::clone(&waker));
        let conn = Arc::new(Conn {
            balancer: balancer.to_string(),
            transport: transport.clone(),
            session,
            outbox,
            waker,
            unconfirmed: Mutex::new(BTreeMap::new()),
            newest: AtomicI64::new(newest),
            closing: AtomicBool::new(false),
        });
        let owner = Owner {
            chan,
            frames,
            server_id,
            acks: Vec::with_capacity(ACK_BATCH),
            acks_due: None,
            next_ack_id: 1 << 62,
        };
        Ok((conn, owner))
    }

    /// Queues a message request, remembering it until it is confirmed. If the server dies
    /// first, the failover re-sends it.
    fn send(&self, seq: u64, request: Request<ServerRequest>) -> Result<()> {
        let mut frame = Vec::new();
        encode_into(&mut frame, &request)?;
        // Remembered before it is written: its `Stored` may come back at once.
        {
            let mut unconfirmed = self.unconfirmed.lock();
            let newest = self.newest.load(Ordering::SeqCst);
            unconfirmed.entry(seq).or_insert((request, newest));
        }
        self.outbox
            .send(frame)
            .map_err(|_| Error::Protocol("the connection's thread is gone".into()))
    }

    /// Ends the connection (end of the run).
    pub fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.waker.wake();
    }

    /// Asks the balancer for another server, connects, and re-sends everything unconfirmed.
    fn failover(&self, owner: &mut Owner) -> Result<()> {
        let dead = owner.server_id;
        let deadline = Instant::now() + FAILOVER_LIMIT;
        loop {
            let attempt = BalancerClient::connect(&self.balancer, &self.transport)
                .and_then(|mut b| b.resume(&self.session, Some(dead)))
                .and_then(|session| open_link(&session, &self.transport));
            match attempt {
                Ok(link) => {
                    self.newest.fetch_max(link.newest, Ordering::SeqCst);
                    owner.chan = link.chan;
                    owner.chan.set_nonblocking(true)?;
                    owner.server_id = link.server_id;
                    for (request, newest) in self.unconfirmed.lock().values() {
                        owner.chan.queue(&resend(request, *newest))?;
                    }
                    return Ok(());
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
    fn send(&self, seq: u64, due: Instant, start: Instant) -> Result<()> {
        self.slots
            .send_timeout((), FAILOVER_LIMIT + Duration::from_secs(10))
            .map_err(|_| Error::Protocol("no Stored reply in 40 s".into()))?;
        let sent_ns = due.saturating_duration_since(start).as_nanos() as u64;
        let text = payload(self.index, seq, sent_ns, self.size);
        let request = self.request(seq, &text)?;
        self.conn.send(seq, request)
    }

    /// As fast as the window allows: this client's own thread.
    pub fn run(self, messages: u64, go: &Receiver<()>, start: &OnceLock<Instant>) -> Result<()> {
        let _ = go.recv();
        let start = *start.get().expect("set before go");
        for seq in 0..messages {
            self.send(seq, Instant::now(), start)?;
        }
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
        clients[(k % n) as usize].send(k / n, due, start)?;
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
    /// Drives the connection until the run is over, failing over when it is lost; returns
    /// latencies in microseconds.
    pub fn run(self, mut owner: Owner) -> Vec<u32> {
        let mut latencies = Vec::new();
        // (sender, sequence) → the message id it was delivered under.
        let mut seen: HashMap<(u64, u64), i64> = HashMap::new();
        loop {
            if self.conn.closing.load(Ordering::SeqCst) {
                break;
            }
            match self.turn(&mut owner, &mut seen, &mut latencies) {
                Ok(()) => {}
                Err(_) if self.counters.finished.load(Ordering::SeqCst) => break,
                Err(_) => {
                    self.counters.failovers.fetch_add(1, Ordering::SeqCst);
                    if let Err(e) = self.conn.failover(&mut owner) {
                        self.counters.error(&format!("failover: {e}"));
                        break;
                    }
                }
            }
        }
        latencies
    }

    /// One turn of the connection's thread: write what is queued, read what came, sleep if
    /// there is nothing to do. `Err` when the connection is lost.
    fn turn(
        &self,
        owner: &mut Owner,
        seen: &mut HashMap<(u64, u64), i64>,
        latencies: &mut Vec<u32>,
    ) -> Result<()> {
        while let Ok(frame) = owner.frames.try_recv() {
            owner.chan.queue_encoded(&frame);
        }
        let now = Instant::now();
        if owner.acks.len() >= ACK_BATCH || owner.acks_due.is_some_and(|d| now >= d) {
            let msg_ids = std::mem::take(&mut owner.acks);
            owner.acks_due = None;
            owner.next_ack_id += 1;
            owner.chan.queue(&Request {
                id: owner.next_ack_id,
                body: ServerRequest::Ack { msg_ids },
            })?;
        }
        if owner.chan.pending() > 0 {
            owner.chan.flush()?;
        }
        loop {
            while let Some(event) = owner.chan.frame::<ServerEvent>(MAX_FRAME)? {
                self.event(owner, event, seen, latencies);
            }
            match owner.chan.fill()? {
                Fill::Data => {}
                Fill::Idle => break,
                Fill::Closed => return Err(Error::Io(std::io::ErrorKind::UnexpectedEof.into())),
            }
        }
        if owner.acks.len() >= ACK_BATCH || !owner.frames.prepare_wait() {
            return Ok(());
        }
        let ready = wait(
            owner.chan.stream(),
            owner.chan.interest(true),
            &[&self.conn.waker],
            owner.acks_due,
        );
        owner.frames.woke();
        ready?;
        Ok(())
    }

    fn event(
        &self,
        owner: &mut Owner,
        event: ServerEvent,
        seen: &mut HashMap<(u64, u64), i64>,
        latencies: &mut Vec<u32>,
    ) {
        match event {
            ServerEvent::Reply(Response {
                id: Some(id),
                result: Ok(ServerReply::Stored { msg_id }),
            }) => {
                self.conn.newest.fetch_max(msg_id, Ordering::SeqCst);
                if self.conn.unconfirmed.lock().remove(&id).is_some() {
                    let _ = self.free.try_recv();
                }
            }
            ServerEvent::Deliver { msg } => {
                self.conn.newest.fetch_max(msg.id, Ordering::SeqCst);
                self.delivered(&msg, seen, latencies);
                owner.acks.push(msg.id);
                owner.acks_due.get_or_insert(Instant::now() + ACK_DELAY);
            }
            ServerEvent::Reply(Response {
                result: Err(refusal),
                ..
            }) => self.counters.error(&refusal.message),
            _ => {}
        }
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
