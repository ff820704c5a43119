//! The running clients: simulated users, each owning its connection (replaced if its server
//! dies), sending what its window and schedule allow and taking in what arrives. A few
//! threads (one per core and at most 50 clients each by default, `--threads`) each drive
//! their share of the clients.
//!
//! ```text
//! driving thread (owns its clients and their sockets), round after round:
//!   a turn for each client with something to do:
//!     send: seal the next message while fewer than `window` are unconfirmed (and, at a fixed
//!           rate, once it is due); remember it until `Stored`
//!     read: Stored → forget it (a window slot frees) │ Deliver → open, count, acknowledge in
//!           batches (ACK_BATCH ids; with the next message out; at the next ACK_DELAY tick, or
//!           one tick later if a message is due by then)
//!   wait: one wait (epoll: each socket registered once, changed when what it waits for
//!         changes) on every client's socket and the thread's waker, until data, the first
//!         due message or acknowledgement deadline, or the end of the run
//!   no Stored for SERVER_TIMEOUT (5 s) while one is pending → a Ping; no answer to it in 5 s
//!   more (a stopped server keeps its sockets open and says nothing) → as if it had ended
//!   a connection ends while the run goes on → that client fails over on a thread of its own
//!   (balancer Resume avoiding the dead server, Hello to the new one, re-send every
//!   unconfirmed message with `resend_after`: stored once, whatever happened to the first)
//!   and comes back; the others carry on meanwhile
//! ```
//!
//! No hand-off between threads per message, and one wake-up serves every client whose
//! socket is ready: what the tool costs the machine it measures is the sealing, the opening
//! and the system calls. (A thread per client, `--threads` = clients, cost the servers'
//! cores a context switch per event; see BENCHMARKS.md.)

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use super::{open_link, Link};
use crate::client::connection::SERVER_TIMEOUT;
use crate::client::e2e::{self, Plain};
use crate::client::sender_keys::GroupChains;
use crate::client::sessions::Session as RatchetSession;
use crate::client::{BalancerClient, Session};
use crate::crypto::PairKey;
use crate::error::{Error, Result};
use crate::net::{
    Envelope, NewMessage, Request, Response, ServerEvent, ServerReply, ServerRequest, MAX_FRAME,
};
use crate::transport::{Channel, Fill, Interest, Poller, Transport, Waker};

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

/// How long a client waits for a `Stored` before it gives up on its run.
const STORED_LIMIT: Duration = Duration::from_secs(40);

/// One message delivered for the first time: when (milliseconds since the run started) and
/// how long after it was sent, or due (microseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub at_ms: u32,
    pub latency_us: u32,
}

/// Most message ids in one acknowledgement from the bench.
const ACK_BATCH: usize = 256;

/// Acknowledgements go out with the client's next message, or on a common tick of this period
/// (counted from the start, the same for every client) when no message is due within one more
/// period: like TCP's delayed ACK, a client at a low rate does not cost the server a
/// transaction and a reply per message, and the acknowledgements of all clients reach the
/// servers together, to be committed together.
const ACK_DELAY: Duration = Duration::from_millis(10);

/// A client's keys, in memory: the ratchet with each peer (direct mode, by index), the sender
/// chains of its group (group mode).
pub(super) struct Keys {
    pub sessions: HashMap<usize, RatchetSession>,
    pub chains: GroupChains,
}

/// What a client sends.
pub(super) struct Sending {
    pub index: usize,
    pub me: String,
    /// Direct mode: the recipients (name, index).
    pub to: Vec<(String, usize)>,
    /// How a message's recipient is chosen among `to`.
    pub pattern: super::Pattern,
    /// Group mode: the group, its key and epoch.
    pub group: Option<(String, PairKey, u64)>,
    /// Group mode: the other members, in the order of a message's tags.
    pub others: Vec<String>,
    pub messages: u64,
    pub size: usize,
    /// Messages sent and not yet confirmed stored, at most.
    pub window: usize,
    /// At a fixed offered rate: (total messages per second, clients). Message `s` of client
    /// `i` is then due `(s × clients + i) / rate` seconds after the start.
    pub schedule: Option<(f64, u64)>,
    /// Send the payload as the body, not sealed (`--opaque`).
    pub opaque: bool,
}

impl Sending {
    /// Direct mode: message `seq`'s recipient (name, index).
    fn recipient(&self, seq: u64) -> Option<&(String, usize)> {
        if self.to.is_empty() {
            return None;
        }
        self.to
            .get(pick(self.pattern, self.index, seq, self.to.len()))
    }

    fn due(&self, seq: u64, start: Instant) -> Option<Instant> {
        Some(due(self.schedule?, self.index, seq, start))
    }

    /// Message `seq` (direct ones sealed in the session with their recipient, which moves on);
    /// `patient` when the client can send on without its `Stored` (see [`NewMessage`]).
    fn request(
        &self,
        keys: &mut Keys,
        seq: u64,
        text: &str,
        patient: bool,
    ) -> Result<Request<ServerRequest>> {
        let plain = Plain::Text(text.to_string());
        let message = |body| NewMessage {
            client_id: seq,
            body,
            file: None,
            resend_after: None,
            patient,
        };
        if self.opaque {
            let body = text.as_bytes().to_vec();
            let body = match (self.recipient(seq), &self.group) {
                (Some((to, _)), _) => ServerRequest::Send {
                    to: to.clone(),
                    message: message(body),
                },
                (None, Some((group, _, epoch))) => ServerRequest::GroupSend {
                    group: group.clone(),
                    epoch: *epoch,
                    message: message(body),
                },
                (None, None) => {
                    return Err(Error::Invalid("a client with nobody to write to".into()))
                }
            };
            return Ok(Request { id: seq, body });
        }
        if let Some((to, peer)) = self.recipient(seq) {
            let session = keys
                .sessions
                .get_mut(peer)
                .ok_or_else(|| Error::Invalid(format!("no session with {to}")))?;
            let now = crate::db::now_ms();
            let body = e2e::seal_direct_in(session, &self.me, to, seq, seq, &plain, now)?;
            return Ok(Request {
                id: seq,
                body: ServerRequest::Send {
                    to: to.clone(),
                    message: message(body),
                },
            });
        }
        let (group, key, epoch) = self.group.as_ref().expect("a direct or group role");
        let (n, chain_key) = keys.chains.next_key(*epoch)?;
        let at = e2e::GroupSeq {
            epoch: *epoch,
            seq,
            n,
        };
        let message_key = e2e::group_message_key(key, &chain_key)?;
        let macs = keys
            .chains
            .macs(*epoch, &self.others)
            .ok_or_else(|| Error::Invalid("a member without a key of ours".into()))?;
        let body = e2e::seal_group_with(&message_key, &macs, group, &self.me, seq, at, &plain)?;
        Ok(Request {
            id: seq,
            body: ServerRequest::GroupSend {
                group: group.clone(),
                epoch: *epoch,
                message: message(body),
            },
        })
    }
}

/// One wait for a driving thread's clients: each waiting client's socket watched for what it
/// waits for (its key, socket, interest and deadline), until one is ready, the first deadline
/// passes (at once with `at_once`), or the waker rings. Returns the keys of the ready sockets.
pub(super) fn wait_for_any<'a, S: AsFd + 'a>(
    poller: &mut Poller,
    waker: &Waker,
    waiting: impl Iterator<Item = (usize, &'a S, Interest, Option<Instant>)>,
    at_once: bool,
) -> std::io::Result<Vec<usize>> {
    let mut deadline = at_once.then(Instant::now);
    for (key, socket, interest, until) in waiting {
        poller.watch(key, socket, interest)?;
        deadline = match (deadline, until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    let (ready, woken) = poller.wait(deadline)?;
    if woken {
        waker.reset();
    }
    Ok(ready
        .into_iter()
        .filter(|(_, r)| r.readable || r.writable)
        .map(|(key, _)| key)
        .collect())
}

/// Which of `k` recipients (k ≥ 1) message `seq` of client `index` goes to.
pub(super) fn pick(pattern: super::Pattern, index: usize, seq: u64, k: usize) -> usize {
    let k = k as u64;
    let at = match pattern {
        super::Pattern::Ring | super::Pattern::Spread => seq % k,
        // A fixed mix of the client and the sequence (splitmix64): the same on a re-send.
        super::Pattern::Random => {
            let mut z = (index as u64)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(seq);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)) % k
        }
    };
    at as usize
}

/// At a fixed offered rate, `(total messages per second, clients)`: when message `seq` of
/// client `index` is due, `(seq × clients + index) / rate` seconds after `start`.
pub(super) fn due(schedule: (f64, u64), index: usize, seq: u64, start: Instant) -> Instant {
    let (rate, clients) = schedule;
    let k = seq * clients + index as u64;
    start + Duration::from_secs_f64(k as f64 / rate)
}

/// How a client opens what it receives.
pub(super) struct Receiving {
    /// Group mode: the group's key.
    pub group_key: Option<PairKey>,
    /// Group mode: by sender, where this client's tag is among the sender's tags (computed
    /// once, not per message).
    pub tag_index: HashMap<String, usize>,
    /// Each user's index (of the sessions), by name.
    pub senders: Arc<std::collections::HashMap<String, usize>>,
    /// Bodies are the payload itself (`--opaque`).
    pub opaque: bool,
}

impl Receiving {
    /// Decrypts (and in groups verifies) a delivery; returns its payload's fields.
    fn open(&self, keys: &mut Keys, msg: &Envelope) -> Result<(u64, u64, u64)> {
        let sender = *self
            .senders
            .get(&msg.from)
            .ok_or_else(|| Error::Integrity(format!("unknown sender {}", msg.from)))?;
        if self.opaque {
            return std::str::from_utf8(&msg.body)
                .ok()
                .and_then(parse_payload)
                .ok_or_else(|| Error::Integrity("not a bench payload".into()));
        }
        let now = crate::db::now_ms();
        let plain = match (keys.sessions.get_mut(&sender), &self.group_key) {
            (Some(session), _) => e2e::open_direct_in(session, msg, now)?,
            (None, Some(key)) => {
                let body = e2e::parse_group(msg)?;
                let at = body.at;
                let index = *self
                    .tag_index
                    .get(&msg.from)
                    .ok_or_else(|| Error::Integrity("not a member".into()))?;
                let mac = keys
                    .chains
                    .mac_of(at.epoch, &msg.from)
                    .ok_or_else(|| Error::Integrity("no sender key".into()))?;
                body.check(index, &mac, &msg.from)?;
                let chain_key = keys.chains.receive(at.epoch, &msg.from, at.n, now)?;
                keys.chains.release(at.epoch, &msg.from, at.n);
                body.open(&e2e::group_message_key(key, &chain_key)?)?
            }
            (None, None) => {
                return Err(Error::Integrity(format!(
                    "a message from {}, who does not write to this client",
                    msg.from
                )))
            }
        };
        match plain.plain {
            Plain::Text(t) => {
                parse_payload(&t).ok_or_else(|| Error::Integrity("not a bench payload".into()))
            }
            _ => Err(Error::Integrity("not a text message".into())),
        }
    }
}

/// What the run's threads share with each client.
pub(super) struct Shared {
    pub counters: Arc<Counters>,
    /// Time zero, set before `go`.
    pub start: Arc<OnceLock<Instant>>,
    pub balancer: String,
    pub transport: Transport,
}

/// One simulated user: everything its thread owns.
pub(super) struct Client {
    pub sending: Sending,
    pub receiving: Receiving,
    /// The ratchets and sender chains (kept in memory only: the tool measures what sealing
    /// and opening in them cost, not the client's files).
    keys: Keys,
    /// Messages opened, by id: one delivered again is not opened again (its key is gone once
    /// used).
    opened: std::collections::HashSet<i64>,
    pub shared: Arc<Shared>,
    /// Told once every message of this client is stored (or that it never will be); `None`
    /// once told.
    stored: Option<Sender<Result<()>>>,
    chan: Channel,
    server_id: u64,
    session: Session,
    /// The newest message id this client has seen assigned.
    newest: i64,
    /// Sent and not yet confirmed stored, by request id (the sequence number): the request and
    /// the newest message id known when it was first sent (its `resend_after`).
    unconfirmed: BTreeMap<u64, (Request<ServerRequest>, i64)>,
    next_seq: u64,
    /// Acknowledgements not yet sent, and when the first of them must go.
    acks: Vec<i64>,
    acks_due: Option<Instant>,
    next_ack_id: u64,
    /// (sender, sequence) → the message id it was delivered under.
    seen: HashMap<(u64, u64), i64>,
    latencies: Vec<Delivery>,
    /// When a `Stored` last came, or (with none pending) the next message went (or the run
    /// started): a client gives up after [`STORED_LIMIT`] without one.
    last_stored: Instant,
    /// When this connection's server last showed that it answers: the connection opened (at
    /// the start, or by a failover), or a `Ping` answered.
    answered: Instant,
    /// A `Ping` sent to ask whether the server still answers, and when (see [`Client::turn`]).
    probe: Option<(u64, Instant)>,
}

/// What a client waits for when a turn leaves it nothing to do now.
struct Wait {
    interest: Interest,
    deadline: Option<Instant>,
    /// A pending `Stored` is overdue: the client stops sending (and says so once).
    overdue: bool,
}

impl Client {
    /// A client on a set-up link.
    pub fn new(
        link: Link,
        sending: Sending,
        receiving: Receiving,
        keys: Keys,
        shared: Arc<Shared>,
        stored: Sender<Result<()>>,
    ) -> Result<Client> {
        let Link {
            mut chan,
            server_id,
            newest,
            session,
            unacked,
        } = link;
        chan.set_nonblocking(true)?;
        Ok(Client {
            sending,
            receiving,
            keys,
            opened: std::collections::HashSet::new(),
            shared,
            stored: Some(stored),
            chan,
            server_id,
            session,
            newest,
            unconfirmed: BTreeMap::new(),
            next_seq: 0,
            acks: unacked,
            acks_due: None,
            next_ack_id: 1 << 62,
            seen: HashMap::new(),
            latencies: Vec::new(),
            last_stored: Instant::now(),
            answered: Instant::now(),
            probe: None,
        })
    }

    /// Best effort when the run is over: what this client showed leaves its queue. Returns
    /// its deliveries.
    fn finish(mut self) -> Vec<Delivery> {
        if !self.acks.is_empty() && self.send_acks().is_ok() {
            let _ = self
                .chan
                .flush_before(Instant::now() + Duration::from_millis(200));
        }
        self.latencies
    }

    /// Tells the run how sending ended, once.
    fn tell(&mut self, outcome: Result<()>) {
        if let Some(stored) = self.stored.take() {
            let _ = stored.send(outcome);
        }
    }

    /// One turn: send what may go, read what came. `None` when there is more to do at once,
    /// else what to wait for; an error when the connection is lost.
    fn turn(&mut self, start: Instant) -> Result<Option<Wait>> {
        let now = Instant::now();
        let mut next_due = None;
        while self.next_seq < self.sending.messages && self.unconfirmed.len() < self.sending.window
        {
            let due = self.sending.due(self.next_seq, start).unwrap_or(now);
            if due > now {
                next_due = Some(due);
                break;
            }
            let seq = self.next_seq;
            let sent_ns = due.saturating_duration_since(start).as_nanos() as u64;
            let text = payload(self.sending.index, seq, sent_ns, self.sending.size);
            // The window has room for more after this one: its Stored may come with the next
            // thing the server sends.
            let patient = self.unconfirmed.len() + 1 < self.sending.window;
            let request = self.sending.request(&mut self.keys, seq, &text, patient)?;
            self.chan.queue(&request)?;
            if self.unconfirmed.is_empty() {
                // Waiting starts now, not at the last Stored (which may be long ago at a low rate).
                self.last_stored = now;
            }
            self.unconfirmed.insert(seq, (request, self.newest));
            self.next_seq += 1;
        }
        // Acknowledgements ride along with messages going out anyway; at their tick, they wait
        // one more period for a message that is due by then.
        let sending = self.chan.pending() > 0;
        if let (Some(tick), Some(send)) = (self.acks_due, next_due) {
            if now >= tick && send <= tick + ACK_DELAY {
                self.acks_due = Some(send);
            }
        }
        let due = self.acks_due.is_some_and(|d| now >= d) || (sending && !self.acks.is_empty());
        if self.acks.len() >= ACK_BATCH || due {
            self.send_acks()?;
        }
        if self.chan.pending() > 0 {
            self.chan.flush()?;
        }
        loop {
            while let Some(event) = self.chan.frame::<ServerEvent>(MAX_FRAME)? {
                if self.event(event) {
                    self.last_stored = Instant::now();
                }
            }
            match self.chan.fill()? {
                Fill::Data => {}
                Fill::Idle => break,
                Fill::Closed => return Err(Error::Io(std::io::ErrorKind::UnexpectedEof.into())),
            }
        }
        // A stopped server (SIGSTOP, a hung machine) keeps its sockets open and says nothing.
        // A client left without a `Stored` for SERVER_TIMEOUT asks whether the server still
        // answers (its connection's own thread does, however far behind its writer is), and
        // leaves it for another if it does not within SERVER_TIMEOUT, as the client library
        // leaves a server that answers no request.
        match self.probe {
            Some((_, sent)) if sent.elapsed() > SERVER_TIMEOUT => {
                return Err(Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("server {} answers nothing", self.server_id),
                )));
            }
            None if !self.unconfirmed.is_empty()
                && self.stalled_since().elapsed() > SERVER_TIMEOUT =>
            {
                self.next_ack_id += 1;
                self.probe = Some((self.next_ack_id, Instant::now()));
                self.chan.queue(&Request {
                    id: self.next_ack_id,
                    body: ServerRequest::Ping,
                })?;
                self.chan.flush()?;
            }
            _ => {}
        }
        if self.next_seq == self.sending.messages && self.unconfirmed.is_empty() {
            self.tell(Ok(()));
        }
        let overdue = !self.unconfirmed.is_empty() && self.last_stored.elapsed() > STORED_LIMIT;
        let can_send = self.next_seq < self.sending.messages
            && self.unconfirmed.len() < self.sending.window
            && next_due.is_none();
        if (can_send && !overdue) || self.acks.len() >= ACK_BATCH {
            return Ok(None);
        }
        let stall = match self.probe {
            Some((_, sent)) => Some(sent + SERVER_TIMEOUT),
            None => (!self.unconfirmed.is_empty()).then(|| self.stalled_since() + SERVER_TIMEOUT),
        };
        let deadline = [next_due, self.acks_due, stall, Some(now + STORED_LIMIT)]
            .into_iter()
            .flatten()
            .min();
        Ok(Some(Wait {
            interest: self.chan.interest(true),
            deadline,
            overdue,
        }))
    }

    /// Since when this connection's server has confirmed nothing that was pending, nor
    /// shown that it answers.
    fn stalled_since(&self) -> Instant {
        self.last_stored.max(self.answered)
    }

    /// Time zero of the run.
    fn start(&self) -> Instant {
        *self.shared.start.get().expect("set before go")
    }

    fn send_acks(&mut self) -> Result<()> {
        let msg_ids = std::mem::take(&mut self.acks);
        self.acks_due = None;
        self.next_ack_id += 1;
        self.chan.queue(&Request {
            id: self.next_ack_id,
            // Nothing waits for the confirmation: a message delivered again after a failover
            // is recognised by its id.
            body: ServerRequest::Ack {
                msg_ids,
                quiet: true,
            },
        })
    }

    /// Takes one event in; `true` for a `Stored` of one of ours.
    fn event(&mut self, event: ServerEvent) -> bool {
        match event {
            ServerEvent::Reply(Response {
                id: Some(id),
                result: Ok(ServerReply::Stored { msg_id }),
            }) => {
                self.newest = self.newest.max(msg_id);
                return self.unconfirmed.remove(&id).is_some();
            }
            ServerEvent::Reply(Response {
                id: Some(id),
                result: Ok(ServerReply::Done),
            }) if self.probe.is_some_and(|(ping, _)| ping == id) => {
                self.probe = None;
                self.answered = Instant::now();
            }
            ServerEvent::Deliver { msg } => {
                self.newest = self.newest.max(msg.id);
                self.delivered(&msg);
                self.acks.push(msg.id);
                if self.acks_due.is_none() {
                    self.acks_due = Some(next_tick(self.start(), Instant::now()));
                }
            }
            ServerEvent::Reply(Response {
                result: Err(refusal),
                ..
            }) => self.shared.counters.error(&refusal.message),
            _ => {}
        }
        false
    }

    fn delivered(&mut self, msg: &Envelope) {
        let counters = &self.shared.counters;
        // A membership change announced during set-up: acknowledged, not counted.
        if msg.group.is_some() && msg.body.get(1) == Some(&(e2e::Kind::Change as u8)) {
            return;
        }
        if !self.opened.insert(msg.id) {
            counters.redelivered.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let (sender, seq, sent_ns) = match self.receiving.open(&mut self.keys, msg) {
            Ok(fields) => fields,
            Err(e) => return counters.error(&format!("message {}: {e}", msg.id)),
        };
        match self.seen.get(&(sender, seq)) {
            None => {
                self.seen.insert((sender, seq), msg.id);
                let now = self
                    .shared
                    .start
                    .get()
                    .map_or(0, |s| s.elapsed().as_nanos() as u64);
                counters.delivered.fetch_add(1, Ordering::Relaxed);
                counters.last_delivery_ns.fetch_max(now, Ordering::Relaxed);
                self.latencies.push(Delivery {
                    at_ms: (now / 1_000_000) as u32,
                    latency_us: (now.saturating_sub(sent_ns) / 1000) as u32,
                });
            }
            Some(id) if *id == msg.id => {
                counters.redelivered.fetch_add(1, Ordering::Relaxed);
            }
            Some(_) => {
                counters.duplicated.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Asks the balancer for another server, connects, and re-sends everything unconfirmed.
    fn failover(&mut self) -> Result<()> {
        let dead = self.server_id;
        let deadline = Instant::now() + FAILOVER_LIMIT;
        loop {
            let shared = &self.shared;
            let attempt = BalancerClient::connect(&shared.balancer, &shared.transport)
                .and_then(|mut b| b.resume(&self.session, Some(dead)))
                .and_then(|session| open_link(&session, &shared.transport));
            match attempt {
                Ok(link) => {
                    self.newest = self.newest.max(link.newest);
                    self.chan = link.chan;
                    self.chan.set_nonblocking(true)?;
                    self.server_id = link.server_id;
                    self.answered = Instant::now();
                    self.probe = None;
                    // Acknowledgements that went with the old connection come again.
                    self.acks.clear();
                    self.acks_due = None;
                    for (request, newest) in self.unconfirmed.values() {
                        self.chan.queue(&resend(request, *newest))?;
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

/// A client of a driving thread, and where it is.
enum Slot {
    /// Driven here; `due` when it gets a turn this round, else what it waits for.
    Here {
        client: Box<Client>,
        due: bool,
        wait: Option<Wait>,
    },
    /// Failing over on a thread of its own.
    Away,
    /// Its run is over (it could not fail over): kept for its latencies.
    Done(Box<Client>),
}

/// Drives `clients` on this thread from `go` until the run is over (`Counters::finished`, then
/// `waker` rung): a turn for each client with something to do, then one wait (a [`Poller`])
/// on all their sockets and the waker. Returns their deliveries.
pub fn drive(clients: Vec<Client>, waker: Arc<Waker>, go: &Receiver<()>) -> Vec<Delivery> {
    let Some(first) = clients.first() else {
        return Vec::new();
    };
    let shared = Arc::clone(&first.shared);
    let mut slots: Vec<Slot> = clients
        .into_iter()
        .map(|client| Slot::Here {
            client: Box::new(client),
            due: true,
            wait: None,
        })
        .collect();
    let (back_tx, back) = crossbeam_channel::unbounded::<(usize, Box<Client>, Result<()>)>();
    let finished = || shared.counters.finished.load(Ordering::SeqCst);
    let mut poller = match Poller::new(&waker) {
        Ok(p) => Some(p),
        Err(e) => {
            shared.counters.error(&format!("epoll: {e}"));
            None
        }
    };
    let _ = go.recv();
    let start = *shared.start.get().expect("set before go");
    for slot in &mut slots {
        if let Slot::Here { client, .. } = slot {
            client.last_stored = Instant::now();
            client.answered = Instant::now();
        }
    }
    while !finished() {
        // A turn for each client that has something to do.
        let mut any_due = false;
        for (i, slot) in slots.iter_mut().enumerate() {
            let Slot::Here { client, due, wait } = slot else {
                continue;
            };
            if !*due {
                continue;
            }
            match client.turn(start) {
                Ok(None) => any_due = true,
                Ok(Some(w)) => {
                    if w.overdue {
                        let limit = STORED_LIMIT.as_secs();
                        client.tell(Err(Error::Protocol(format!(
                            "no Stored reply in {limit} s"
                        ))));
                    }
                    *due = false;
                    *wait = Some(w);
                }
                Err(_) if finished() => {}
                Err(_) => {
                    shared.counters.failovers.fetch_add(1, Ordering::SeqCst);
                    if let Some(p) = poller.as_mut() {
                        p.forget(i, client.chan.stream());
                    }
                    let Slot::Here { client, .. } = std::mem::replace(slot, Slot::Away) else {
                        unreachable!("matched above");
                    };
                    let (back_tx, waker) = (back_tx.clone(), Arc::clone(&waker));
                    std::thread::spawn(move || {
                        let mut client = client;
                        let outcome = client.failover();
                        let _ = back_tx.send((i, client, outcome));
                        waker.wake();
                    });
                }
            }
        }
        // One wait for all of them (none if a client can go on at once).
        let Some(poller) = poller.as_mut() else {
            break;
        };
        let waiting = slots.iter().enumerate().filter_map(|(i, slot)| match slot {
            Slot::Here {
                client,
                due: false,
                wait: Some(w),
            } => Some((i, client.chan.stream(), w.interest, w.deadline)),
            _ => None,
        });
        let ready = match wait_for_any(poller, &waker, waiting, any_due) {
            Ok(ready) => ready,
            Err(e) => {
                shared.counters.error(&format!("epoll: {e}"));
                break;
            }
        };
        let mut woken = vec![false; slots.len()];
        for i in ready {
            if let Some(w) = woken.get_mut(i) {
                *w = true;
            }
        }
        let now = Instant::now();
        for (slot, woken) in slots.iter_mut().zip(woken) {
            if let Slot::Here { due, wait, .. } = slot {
                let expired = wait
                    .as_ref()
                    .and_then(|w| w.deadline)
                    .is_some_and(|d| d <= now);
                *due |= woken || expired;
            }
        }
        // Clients back from a failover.
        while let Ok((i, mut client, outcome)) = back.try_recv() {
            slots[i] = match outcome {
                Ok(()) => Slot::Here {
                    client,
                    due: true,
                    wait: None,
                },
                Err(e) => {
                    shared.counters.error(&format!("failover: {e}"));
                    client.tell(Err(e));
                    Slot::Done(client)
                }
            };
        }
    }
    // Clients still failing over come back (within their failover limit).
    let mut away = slots.iter().filter(|s| matches!(s, Slot::Away)).count();
    let mut latencies = Vec::new();
    while away > 0 {
        match back.recv() {
            Ok((_, client, _)) => latencies.extend(client.finish()),
            Err(_) => break,
        }
        away -= 1;
    }
    for slot in slots {
        match slot {
            Slot::Here { client, .. } => latencies.extend(client.finish()),
            Slot::Done(client) => latencies.extend(client.latencies),
            Slot::Away => {}
        }
    }
    latencies
}

/// The first acknowledgement tick after `now`.
fn next_tick(start: Instant, now: Instant) -> Instant {
    let period = ACK_DELAY.as_nanos();
    let ticks = now.saturating_duration_since(start).as_nanos() / period + 1;
    start + Duration::from_nanos((ticks * period) as u64)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sending(pattern: super::super::Pattern, k: usize) -> Result<Sending> {
        Ok(Sending {
            index: 3,
            me: "b-3".into(),
            to: (0..k).map(|i| (format!("b-{i}"), i)).collect(),
            pattern,
            group: None,
            others: Vec::new(),
            messages: 100,
            size: 100,
            window: 1,
            schedule: None,
            opaque: false,
        })
    }

    #[test]
    fn patterns_choose_recipients_as_documented() -> Result<()> {
        use super::super::Pattern;
        let to = |s: &Sending, seq| s.recipient(seq).map(|(name, _)| name.clone());
        let ring = sending(Pattern::Ring, 1)?;
        assert!((0..10).all(|seq| to(&ring, seq).as_deref() == Some("b-0")));
        // Spread: each message to the next of the K, in turn.
        let spread = sending(Pattern::Spread, 5)?;
        let names: Vec<_> = (0..10).filter_map(|seq| to(&spread, seq)).collect();
        assert_eq!(names[..5], ["b-0", "b-1", "b-2", "b-3", "b-4"]);
        assert_eq!(names[5..], names[..5]);
        // Random: every one of the K used, the same choice for the same message.
        let random = sending(Pattern::Random, 5)?;
        let chosen: std::collections::HashSet<_> =
            (0..200).filter_map(|seq| to(&random, seq)).collect();
        assert_eq!(chosen.len(), 5);
        assert_eq!(to(&random, 42), to(&random, 42));
        Ok(())
    }

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
