//! The process's single database writer: a thread that commits queued jobs in batches (group
//! commit).
//!
//! ```text
//! any thread ── submit(work, done) ──▶ jobs (bounded mailbox) ──▶ db-writer thread:
//!     take every queued job (waiting up to COMMIT_WINDOW, or SHARED_WINDOW, for more while
//!     the batch is small)
//!     BEGIN ── run each job (in a savepoint unless unguarded) ── COMMIT
//!              (consecutive plain sends and acknowledgements: one merged call each)
//!     then each job's `done`, in submission order, with its result or the commit's error
//! ```
//!
//! A commit costs far more than a job (WAL frames, locks, a wake-up of every thread it
//! answers), so at a moderate load a short wait saves most of that work for a small delay.
//! Completions run on the writer thread after the commit; they must not block (they send on
//! channels). If the transaction cannot begin (another process holds the write lock past the
//! busy timeout), no job of the batch runs: each is told the batch failed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};

use super::{DirectMessage, Fence, GroupMessage, Outgoing, StoredMessage, Tx};
use crate::error::{Error, Result};
use crate::mailbox;

/// Most jobs committed in one transaction.
const MAX_BATCH: usize = 2048;

/// How long a small batch waits for more jobs before it commits, when jobs come often (see
/// [`IDLE`]), by default (`fastchat-server --commit-window`). Longer trades latency for CPU:
/// with 1,000 µs the median latency of patient messages at 10,000 msg/s doubled (0.6 → 1.3
/// ms), one server's CPU a message fell by between nothing and a sixth (BENCHMARKS.md).
/// Awaited messages are not held (see `gather`).
pub const COMMIT_WINDOW: Duration = Duration::from_micros(300);

/// [`COMMIT_WINDOW`] times [`SHARED_FACTOR`] while other processes commit to the same
/// database between this writer's batches ([`Batch::shared`]: several chat servers on one
/// SQLite file). Each of their commits makes the next of ours dearer (SQLite then re-reads
/// every page the batch touches, and the file's locks are taken in turn), so gathering longer
/// pays more. On three servers at 10,000 msg/s, 600 µs instead of 300 cut the servers' CPU a
/// message by 6-9% and lowered p90 in eight alternating pairs of eight; 1,500 µs instead of
/// 600 cut it by another 15% (3 of 3) for half a millisecond more of median latency, p99
/// unchanged; 2,000 µs cut nothing more and raised p99 (BENCHMARKS.md). One server alone
/// keeps the shorter window, where 600 µs cost a fifth of a millisecond of median latency.
pub const SHARED_WINDOW: Duration = COMMIT_WINDOW.saturating_mul(SHARED_FACTOR);

/// How many times its window a writer gathers while other processes commit to the same
/// database (see [`SHARED_WINDOW`], the default).
pub const SHARED_FACTOR: u32 = 5;

/// A writer whose next job comes this long or more after its last commit commits it at once:
/// at such a rate the window would gather nothing and only add to every message's latency
/// (at 500 msg/s it was half of it). Not shorter: three servers on one SQLite file, each
/// seeing a third of 10,000 msg/s, then commit so often that they queue for the write lock
/// and the tail grows (BENCHMARKS.md).
pub const IDLE: Duration = Duration::from_millis(1);

/// A batch this large commits without waiting: the load is high enough to fill batches.
const WINDOW_SKIP: usize = 32;

/// How often a writer marks the delivery records that are too old to matter: those of messages
/// stored more than two periods ago (a client re-sends within `client::FAILOVER_LIMIT`).
const PURGE_EVERY: Duration = Duration::from_secs(30);

/// Marked records are removed this many at a time, in one batch in [`PURGE_PAUSE`] at most:
/// at 10,000 messages/s a period marks 300,000, and removing them in one statement holds the
/// writer, and every message behind it, for 50 ms or more (51 ms on a quiet file here).
const PURGE_CHUNK: usize = 1000;

/// See [`PURGE_CHUNK`]: up to 100,000 records a second, ten times what 10,000 messages/s
/// leave, for a few tenths of a millisecond (0.17 µs a record) in one batch of every ten
/// milliseconds while any are left.
const PURGE_PAUSE: Duration = Duration::from_millis(10);

/// Queued jobs at most; a submitter waits while the queue is full.
const QUEUE: usize = 8192;

/// What a backend's writer connection does for the writer thread.
pub trait Batch: Send + 'static {
    /// Begins the batch's transaction (taking the database's write lock, waiting up to the
    /// busy timeout).
    fn begin(&mut self) -> Result<()>;
    /// Commits it.
    fn commit(&mut self) -> Result<()>;
    /// Rolls it back after a failed commit.
    fn rollback(&mut self);
    /// Runs one job's work inside the transaction: in a savepoint when `guarded`, so that a
    /// failing job undoes only its own writes. `work` returns whether it succeeded.
    fn run(&mut self, guarded: bool, work: &mut dyn FnMut(&mut dyn Tx) -> bool) -> Result<()>;
    /// Whether other processes have lately committed to the database between this writer's
    /// batches (see [`SHARED_WINDOW`]).
    fn shared(&self) -> bool {
        false
    }
}

/// Background work that a backend runs beside the writer (SQLite: WAL checkpoints); it must
/// return once its `stop` channel disconnects.
pub type Background = Box<dyn FnOnce(Receiver<()>) + Send>;

/// A unit of work: `run` inside the batch transaction, then `complete` after the commit (with
/// the commit's error, if it failed). One allocation per job.
trait Job: Send {
    fn run(&mut self, batch: &mut dyn Batch);
    fn complete(self: Box<Self>, batch_error: Option<&BatchError>);
    /// What the job stores, if the backend may store it together with its neighbours'
    /// (see [`run_merged`]); such a job's `run` then does only what the merged call left.
    fn merged(&mut self) -> Option<Merged<'_>> {
        None
    }
    /// Whether its submitter waits on its commit (see [`Urgency`]).
    fn urgency(&self) -> Urgency {
        Urgency::Batched
    }
    /// The freeze epoch its request was read in, for work that must not be done after a
    /// freeze (see [`Fence`]).
    fn fence(&self) -> Option<Fence> {
        None
    }
}

/// Whether a job's batch may wait for more jobs before it commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urgency {
    /// Its submitter goes on meanwhile (a client with room in its window): the batch may
    /// wait for [`COMMIT_WINDOW`] (or [`SHARED_WINDOW`]) to gather more.
    Batched,
    /// Its submitter sends nothing more until it is committed (a client that waits for each
    /// `Stored`: a window of one, `fastchat send`, the chat): the batch commits with what
    /// is queued, without the window, which would only add to that client's every message.
    Awaited,
}

/// A job's part of a merged statement, and where its result goes.
enum Merged<'a> {
    /// A plain direct message ([`Tx::store_messages`]).
    Send {
        msg: Outgoing<'a>,
        to: &'a str,
        result: &'a mut Option<Result<StoredMessage>>,
    },
    /// A plain group message ([`Tx::store_group_messages`]): the result stays `None` if the
    /// backend left it to the job's fallback.
    GroupSend {
        msg: Outgoing<'a>,
        group: &'a str,
        epoch: u64,
        result: &'a mut Option<Result<StoredMessage>>,
    },
    /// An acknowledgement ([`Tx::ack_many`]).
    Ack {
        user: &'a str,
        ids: &'a [i64],
        result: &'a mut Option<Result<usize>>,
    },
}

/// Why a whole batch failed.
#[derive(Debug, Clone)]
pub enum BatchError {
    /// Another process held the database (its write lock, or its log full of pages a reader
    /// holds back), or the disk was full: nothing was written; try again later.
    Busy(String),
    /// The batch could not be begun or committed.
    Failed(String),
    /// Not run: the process has been frozen since its request was read (see [`Fence`]).
    Frozen,
}

impl BatchError {
    /// `e`, as a batch error: busy, or failed.
    pub fn of(e: &Error, what: &str) -> BatchError {
        match e {
            Error::Refused { message, .. } => BatchError::Busy(message.clone()),
            e => match e.storage_refusal() {
                Some(message) => BatchError::Busy(format!("{message} ({e})")),
                None => BatchError::Failed(format!("{what}: {e}")),
            },
        }
    }

    fn to_error(&self) -> Error {
        match self {
            BatchError::Busy(m) => Error::refused(crate::error::ErrorCode::Unavailable, m.clone()),
            BatchError::Failed(m) => Error::Commit(m.clone()),
            BatchError::Frozen => Error::Frozen,
        }
    }
}

/// A job made of closures: `work` produces a result, `done` receives it.
struct ClosureJob<T, W, D> {
    work: Option<W>,
    done: D,
    result: Option<Result<T>>,
    guarded: bool,
    fence: Option<Fence>,
}

impl<T, W, D> Job for ClosureJob<T, W, D>
where
    T: Send,
    W: FnOnce(&mut dyn Tx) -> Result<T> + Send,
    D: FnOnce(Result<T>) + Send,
{
    fn run(&mut self, batch: &mut dyn Batch) {
        if let Some(work) = self.work.take() {
            self.result = Some(run_one(batch, self.guarded, work));
        }
    }

    fn complete(self: Box<Self>, batch_error: Option<&BatchError>) {
        (self.done)(outcome(self.result, batch_error))
    }

    fn fence(&self) -> Option<Fence> {
        self.fence
    }
}

/// Runs one job's `work` in the batch (in a savepoint if `guarded`).
fn run_one<T>(
    batch: &mut dyn Batch,
    guarded: bool,
    work: impl FnOnce(&mut dyn Tx) -> Result<T>,
) -> Result<T> {
    let mut work = Some(work);
    let mut result = None;
    let ran = batch.run(guarded, &mut |tx| {
        let Some(work) = work.take() else {
            return false;
        };
        let r = work(tx);
        let ok = r.is_ok();
        result = Some(r);
        ok
    });
    match (ran, result) {
        (Err(e), _) => Err(e),
        (Ok(()), Some(r)) => r,
        (Ok(()), None) => Err(Error::Commit("the job never ran".into())),
    }
}

/// A first attempt of a direct message without a file: merged with its neighbours.
struct SendJob<D> {
    msg: DirectMessage,
    urgency: Urgency,
    fence: Fence,
    result: Option<Result<StoredMessage>>,
    done: D,
}

impl<D: FnOnce(Result<StoredMessage>) + Send> Job for SendJob<D> {
    /// Stored by [`run_merged`] already.
    fn run(&mut self, _: &mut dyn Batch) {}

    fn urgency(&self) -> Urgency {
        self.urgency
    }

    fn fence(&self) -> Option<Fence> {
        Some(self.fence)
    }

    fn complete(self: Box<Self>, batch_error: Option<&BatchError>) {
        (self.done)(outcome(self.result, batch_error))
    }

    fn merged(&mut self) -> Option<Merged<'_>> {
        let msg = &self.msg;
        Some(Merged::Send {
            msg: Outgoing::new(&msg.from, msg.client_id, &msg.body),
            to: &msg.to,
            result: &mut self.result,
        })
    }
}

/// An acknowledgement: merged with its neighbours.
struct AckJob<D> {
    user: String,
    ids: Vec<i64>,
    result: Option<Result<usize>>,
    done: D,
}

impl<D: FnOnce(Result<usize>) + Send> Job for AckJob<D> {
    /// Applied by [`run_merged`] already.
    fn run(&mut self, _: &mut dyn Batch) {}

    fn complete(self: Box<Self>, batch_error: Option<&BatchError>) {
        (self.done)(outcome(self.result, batch_error))
    }

    fn merged(&mut self) -> Option<Merged<'_>> {
        Some(Merged::Ack {
            user: &self.user,
            ids: &self.ids,
            result: &mut self.result,
        })
    }
}

/// A first attempt of a group message without a file: merged with its neighbours where the
/// common case holds ([`Tx::store_group_messages`]), else stored by `fallback` in a savepoint
/// of its own.
struct GroupSendJob<F, D> {
    msg: GroupMessage,
    fallback: Option<F>,
    urgency: Urgency,
    fence: Fence,
    result: Option<Result<StoredMessage>>,
    done: D,
}

impl<F, D> Job for GroupSendJob<F, D>
where
    F: FnOnce(&mut dyn Tx, &Outgoing<'_>) -> Result<StoredMessage> + Send,
    D: FnOnce(Result<StoredMessage>) + Send,
{
    fn urgency(&self) -> Urgency {
        self.urgency
    }

    fn fence(&self) -> Option<Fence> {
        Some(self.fence)
    }

    /// Runs the fallback if the merged statement left this message.
    fn run(&mut self, batch: &mut dyn Batch) {
        if self.result.is_some() {
            return;
        }
        if let Some(fallback) = self.fallback.take() {
            let msg = self.msg.outgoing();
            self.result = Some(run_one(batch, true, |tx| fallback(tx, &msg)));
        }
    }

    fn complete(self: Box<Self>, batch_error: Option<&BatchError>) {
        (self.done)(outcome(self.result, batch_error))
    }

    fn merged(&mut self) -> Option<Merged<'_>> {
        Some(Merged::GroupSend {
            msg: self.msg.outgoing(),
            group: &self.msg.group,
            epoch: self.msg.epoch,
            result: &mut self.result,
        })
    }
}

/// A job's result once its batch is over: its own, or the batch's error if it had none or
/// succeeded (its writes were not committed).
fn outcome<T>(result: Option<Result<T>>, batch_error: Option<&BatchError>) -> Result<T> {
    match (result, batch_error) {
        (Some(Ok(_)) | None, Some(e)) => Err(e.to_error()),
        (Some(result), _) => result,
        (None, None) => Err(Error::Commit("the job never ran".into())),
    }
}

/// Which statement a merged job belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Send,
    GroupSend,
    Ack,
}

impl Merged<'_> {
    fn kind(&self) -> Kind {
        match self {
            Merged::Send { .. } => Kind::Send,
            Merged::GroupSend { .. } => Kind::GroupSend,
            Merged::Ack { .. } => Kind::Ack,
        }
    }
}

/// How many jobs from the start of `jobs` form one merged run: mergeable jobs, with sends of
/// one kind only (direct and group messages keep their order between them), acknowledgements
/// among them as they come.
fn merged_run(jobs: &mut [Box<dyn Job>]) -> usize {
    let mut sends = None;
    let mut n = 0;
    for job in jobs.iter_mut() {
        let Some(kind) = job.merged().map(|m| m.kind()) else {
            break;
        };
        if kind != Kind::Ack && *sends.get_or_insert(kind) != kind {
            break;
        }
        n += 1;
    }
    n
}

/// Runs a merged run of jobs: their messages in one call of [`Tx::store_messages`] or
/// [`Tx::store_group_messages`], then their acknowledgements in one of [`Tx::ack_many`] (a
/// PostgreSQL round trip each, however many jobs), then each job's own work if the merged
/// call left it something (a group message outside the common case). Sends and
/// acknowledgements commute: a message is acknowledged only after its client received it,
/// which is after its batch committed.
fn run_merged(batch: &mut dyn Batch, jobs: &mut [Box<dyn Job>]) {
    let (mut sends, mut sent) = (Vec::new(), Vec::new());
    let (mut groups, mut grouped) = (Vec::new(), Vec::new());
    let (mut acks, mut acked) = (Vec::new(), Vec::new());
    for job in jobs.iter_mut() {
        match job.merged() {
            Some(Merged::Send { msg, to, result }) => {
                sends.push((msg, to));
                sent.push(result);
            }
            Some(Merged::GroupSend {
                msg,
                group,
                epoch,
                result,
            }) => {
                groups.push((msg, group, epoch));
                grouped.push(result);
            }
            Some(Merged::Ack { user, ids, result }) => {
                acks.push((user, ids));
                acked.push(result);
            }
            None => unreachable!("run_merged is given mergeable jobs only"),
        }
    }
    let ran = batch.run(false, &mut |tx| {
        let mut ok = true;
        if !sends.is_empty() {
            ok &= hand_out(tx.store_messages(&sends), &mut sent);
        }
        if ok && !groups.is_empty() {
            ok &= match tx.store_group_messages(&groups) {
                Ok(stored) => {
                    for (slot, stored) in grouped.iter_mut().zip(stored) {
                        **slot = stored.map(Ok);
                    }
                    true
                }
                Err(e) => hand_out(Err(e), &mut grouped),
            };
        }
        if ok && !acks.is_empty() {
            ok &= hand_out(tx.ack_many(&acks), &mut acked);
        }
        ok
    });
    if let Err(e) = ran {
        let why = e.to_string();
        for slot in sent.into_iter().chain(grouped) {
            slot.get_or_insert_with(|| Err(Error::Commit(why.clone())));
        }
        for slot in acked {
            slot.get_or_insert_with(|| Err(Error::Commit(why.clone())));
        }
    }
    for job in jobs.iter_mut() {
        job.run(batch);
    }
}

/// Gives each slot its result, or every slot the error that failed them all; whether the
/// statements succeeded.
fn hand_out<T>(results: Result<Vec<Result<T>>>, slots: &mut [&mut Option<Result<T>>]) -> bool {
    match results {
        Ok(results) => {
            debug_assert_eq!(results.len(), slots.len());
            let mut results = results.into_iter();
            for slot in slots.iter_mut() {
                **slot = Some(results.next().unwrap_or_else(|| {
                    Err(Error::Commit(
                        "the database gave no answer for a job".into(),
                    ))
                }));
            }
            true
        }
        Err(e) => {
            let why = e.to_string();
            for slot in slots.iter_mut() {
                **slot = Some(Err(Error::Commit(why.clone())));
            }
            false
        }
    }
}

/// The writer thread and the backend's background thread; both stop when this is dropped,
/// after everything queued is committed.
pub struct Writer {
    /// What the writer has committed (for `/metrics`).
    pub stats: Arc<Stats>,
    jobs: Option<mailbox::Sender<Box<dyn Job>>>,
    thread: Option<JoinHandle<()>>,
    /// Dropped to stop the background thread.
    stop_background: Option<Sender<()>>,
    background: Option<JoinHandle<()>>,
}

/// What the writer thread has done since it started.
#[derive(Debug, Default)]
pub struct Stats {
    /// Transactions committed.
    pub batches: AtomicU64,
    /// Jobs in them (the mean batch size is `jobs / batches`).
    pub jobs: AtomicU64,
    /// Time from `BEGIN` to the end of `COMMIT`, in all, in microseconds.
    pub commit_us: AtomicU64,
}

impl Writer {
    /// Starts the writer thread on `batch`, and `background` on a thread of its own.
    pub fn start(batch: impl Batch, background: Option<Background>) -> Result<Writer> {
        Writer::start_with(batch, background, COMMIT_WINDOW)
    }

    /// Like [`Writer::start`], with a commit window of `window` ([`SHARED_FACTOR`] times
    /// that on a shared database; see [`COMMIT_WINDOW`]).
    pub fn start_with(
        batch: impl Batch,
        background: Option<Background>,
        window: Duration,
    ) -> Result<Writer> {
        let (tx, rx) = mailbox::bounded::<Box<dyn Job>>(QUEUE);
        let stats = Arc::new(Stats::default());
        let counted = Arc::clone(&stats);
        let thread = std::thread::Builder::new()
            .name("db-writer".into())
            .spawn(move || writer_loop(batch, rx, &counted, window))?;
        let (stop, stopped) = bounded::<()>(0);
        let background = match background {
            Some(work) => Some(
                std::thread::Builder::new()
                    .name("db-background".into())
                    .spawn(move || work(stopped))?,
            ),
            None => None,
        };
        Ok(Writer {
            stats,
            jobs: Some(tx),
            thread: Some(thread),
            stop_background: Some(stop),
            background,
        })
    }

    /// Queues a job (see [`super::Store::submit`] and [`super::Store::submit_fenced`]).
    pub fn submit<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut dyn Tx) -> Result<T> + Send + 'static,
        done: impl FnOnce(Result<T>) + Send + 'static,
        guarded: bool,
        fence: Option<Fence>,
    ) {
        self.queue(Box::new(ClosureJob {
            work: Some(work),
            done,
            result: None,
            guarded,
            fence,
        }));
    }

    /// Queues a first attempt of a direct message without a file (see `run_merged`).
    pub fn submit_message(
        &self,
        msg: DirectMessage,
        urgency: Urgency,
        fence: Fence,
        done: impl FnOnce(Result<StoredMessage>) + Send + 'static,
    ) {
        self.queue(Box::new(SendJob {
            msg,
            urgency,
            fence,
            result: None,
            done,
        }));
    }

    /// Queues `msg`; `fallback` stores it (in a savepoint) if the merged statement does not
    /// (see `run_merged`).
    pub fn submit_group_message(
        &self,
        msg: GroupMessage,
        fallback: impl FnOnce(&mut dyn Tx, &Outgoing<'_>) -> Result<StoredMessage> + Send + 'static,
        urgency: Urgency,
        fence: Fence,
        done: impl FnOnce(Result<StoredMessage>) + Send + 'static,
    ) {
        self.queue(Box::new(GroupSendJob {
            msg,
            fallback: Some(fallback),
            urgency,
            fence,
            result: None,
            done,
        }));
    }

    /// Queues an acknowledgement (see `run_merged`).
    pub fn submit_ack(
        &self,
        user: String,
        ids: Vec<i64>,
        done: impl FnOnce(Result<usize>) + Send + 'static,
    ) {
        self.queue(Box::new(AckJob {
            user,
            ids,
            result: None,
            done,
        }));
    }

    fn queue(&self, job: Box<dyn Job>) {
        // The thread only ends when `jobs` is dropped, so a failed send means it panicked; the
        // dropped completion then closes its caller's reply channel, which reports the failure.
        if let Some(jobs) = &self.jobs {
            // One that someone waits for cuts the writer's window short (see `gather`).
            let sent = if job.urgency() == Urgency::Awaited {
                jobs.send_urgent(job)
            } else {
                jobs.send(job)
            };
            if sent.is_err() {
                log::error!("database writer thread has died; write dropped");
            }
        }
    }

    /// Runs `work` and waits for its commit.
    pub fn call<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut dyn Tx) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = bounded(1);
        self.submit(
            work,
            move |res| {
                let _ = tx.send(res);
            },
            true,
            None,
        );
        rx.recv()
            .unwrap_or_else(|_| Err(Error::Commit("the database writer has stopped".into())))
    }
}

impl Drop for Writer {
    /// Commits everything queued, then stops the threads.
    fn drop(&mut self) {
        self.stop_background.take();
        if let Some(t) = self.background.take() {
            let _ = t.join();
        }
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            // A completion may hold the last reference to the owner of this writer; then the
            // drop runs on the writer thread itself, which ends on its own once the queue closes.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

/// A failing `BEGIN` or `COMMIT` (a locked database, a full disk) repeats for every batch while
/// it lasts: each said once a second.
static BEGIN_FAILED: crate::throttle::Quiet = crate::throttle::Quiet::new(Duration::from_secs(1));
static COMMIT_FAILED: crate::throttle::Quiet = crate::throttle::Quiet::new(Duration::from_secs(1));
/// Tried every few milliseconds while records are left: said every half minute at most.
static PURGE_FAILED: crate::throttle::Quiet = crate::throttle::Quiet::new(Duration::from_secs(30));

/// The removal of old delivery records, spread over the writer's batches.
struct Purge {
    /// [`PURGE_EVERY`], [`PURGE_PAUSE`] and [`PURGE_CHUNK`] (shorter in tests).
    every: Duration,
    pause: Duration,
    chunk: usize,
    /// When the next mark is due.
    next_mark: Instant,
    /// The newest message id at the previous two marks: the older one is at least
    /// 2 x [`PURGE_EVERY`] old.
    watermarks: (i64, i64),
    /// Records up to this id are still to be removed.
    upto: Option<i64>,
    /// When the next chunk may go.
    next_chunk: Instant,
}

impl Purge {
    fn new(every: Duration, pause: Duration, chunk: usize) -> Purge {
        let now = Instant::now();
        Purge {
            every,
            pause,
            chunk,
            next_mark: now + every,
            watermarks: (0, 0),
            upto: None,
            next_chunk: now,
        }
    }

    /// Inside a batch's transaction: takes a mark when one is due, and removes a chunk of
    /// marked records when one may go.
    fn step(&mut self, conn: &mut dyn Batch) {
        let now = Instant::now();
        if now >= self.next_mark {
            self.next_mark = now + self.every;
            let mut newest = None;
            let marked = conn.run(true, &mut |tx| {
                let r = tx.newest_message_id();
                let ok = r.is_ok();
                newest = Some(r);
                ok
            });
            match (marked, newest) {
                (Ok(()), Some(Ok(newest))) => {
                    // Forget what was delivered before the previous mark (a minute or more
                    // ago).
                    if self.watermarks.0 > 0 {
                        self.upto = Some(self.watermarks.0);
                    }
                    self.watermarks = (self.watermarks.1, newest);
                }
                (Err(e), _) | (_, Some(Err(e))) => {
                    PURGE_FAILED.warn(&format!("database: cannot mark old deliveries: {e}"))
                }
                _ => {}
            }
        }
        let Some(upto) = self.upto else { return };
        if now < self.next_chunk {
            return;
        }
        self.next_chunk = now + self.pause;
        let chunk = self.chunk;
        let mut removed = None;
        let purged = conn.run(true, &mut |tx| {
            let r = tx.forget_deliveries(upto, chunk);
            let ok = r.is_ok();
            removed = Some(r);
            ok
        });
        match (purged, removed) {
            (Ok(()), Some(Ok(n))) if n < chunk => self.upto = None,
            (Ok(()), Some(Ok(_))) => {}
            (Err(e), _) | (_, Some(Err(e))) => {
                PURGE_FAILED.warn(&format!("database: cannot forget old deliveries: {e}"))
            }
            _ => {}
        }
    }
}

/// Jobs queued behind a batch's completions from which the writer counts as behind (see
/// [`behind`]).
pub const BEHIND_QUEUE: usize = WINDOW_SKIP / 4;

thread_local! {
    /// Set on a writer thread while it runs the completions of a batch with more work behind
    /// it (see [`behind`]).
    static BEHIND: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Set on a writer thread while it runs the completions of a batch that filled, or with
    /// [`BEHIND_QUEUE`] jobs queued behind it (see [`swamped`]).
    static SWAMPED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the calling thread is a writer running completions with more work than it keeps
/// up with: a batch that filled without waiting out its window, or [`BEHIND_QUEUE`] jobs
/// queued behind it. Unlike [`behind`], not for a batch with an [`Urgency::Awaited`] job.
pub fn swamped() -> bool {
    SWAMPED.with(|b| b.get())
}

/// Whether the calling thread is a writer running completions that should hand work another
/// thread can do (writing to a client's socket) to that thread: those of a batch that filled
/// without waiting out its window, or with [`BEHIND_QUEUE`] jobs already queued behind them
/// (jobs come faster than it commits: the writer is the one thread every message goes
/// through), or of a batch with an [`Urgency::Awaited`] job (senders wait for their replies:
/// the connections' threads send on the other core while the writer takes the next batch;
/// when the writer sent them itself, p90 rose by a third: BENCHMARKS.md). `false` on any
/// other thread, and on a writer that keeps up with patient traffic (it would otherwise
/// sleep).
pub fn behind() -> bool {
    BEHIND.with(|b| b.get())
}

fn writer_loop(
    mut conn: impl Batch,
    jobs: mailbox::Receiver<Box<dyn Job>>,
    stats: &Stats,
    window: Duration,
) {
    let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(MAX_BATCH);
    let mut purge = Purge::new(PURGE_EVERY, PURGE_PAUSE, PURGE_CHUNK);
    let mut last_commit = Instant::now();
    while let Ok(first) = jobs.recv() {
        let now = Instant::now();
        let until = window_end(now, last_commit, first.urgency(), conn.shared(), window);
        batch.push(first);
        gather(&jobs, &mut batch, until, |job| {
            job.urgency() == Urgency::Awaited
        });
        let began = Instant::now();
        if let Err(e) = conn.begin() {
            // Nothing ran: outside a transaction each job would commit on its own while its
            // submitter is told it failed.
            BEGIN_FAILED.warn(&format!("database: cannot begin a transaction: {e}"));
            let why = BatchError::of(&e, "cannot begin a transaction");
            for job in batch.drain(..) {
                job.complete(Some(&why));
            }
            continue;
        }
        // With the write lock held: a freeze from now on keeps every other writer out until
        // this batch has committed (see `refuse_frozen`).
        let frozen = refuse_frozen(&mut batch);
        let mut at = 0;
        while at < batch.len() {
            let run = merged_run(&mut batch[at..]);
            if run == 0 {
                batch[at].run(&mut conn);
                at += 1;
            } else {
                run_merged(&mut conn, &mut batch[at..at + run]);
                at += run;
            }
        }
        purge.step(&mut conn);
        last_commit = Instant::now();
        let message = match conn.commit() {
            Ok(()) => {
                stats.batches.fetch_add(1, Ordering::Relaxed);
                stats.jobs.fetch_add(batch.len() as u64, Ordering::Relaxed);
                stats
                    .commit_us
                    .fetch_add(began.elapsed().as_micros() as u64, Ordering::Relaxed);
                None
            }
            Err(e) => {
                COMMIT_FAILED.error(&format!("database: a commit failed: {e}"));
                conn.rollback();
                Some(BatchError::of(&e, "commit failed"))
            }
        };
        // Behind, or waited for: either way the connections' threads send in parallel.
        let filled = batch.len() >= WINDOW_SKIP;
        let hand_over = filled || batch.iter().any(|j| j.urgency() == Urgency::Awaited);
        for job in batch.drain(..) {
            let queued = jobs.len() >= BEHIND_QUEUE;
            BEHIND.with(|b| b.set(hand_over || queued));
            SWAMPED.with(|b| b.set(filled || queued));
            job.complete(message.as_ref());
        }
        BEHIND.with(|b| b.set(false));
        SWAMPED.with(|b| b.set(false));
        for job in frozen {
            job.complete(Some(&BatchError::Frozen));
        }
    }
}

/// Takes out of `batch` the jobs whose requests were read before a freeze of the process
/// (see [`crate::freeze`]): their clients may have sent them again elsewhere meanwhile, and a
/// re-sent copy stored and delivered before this original would not be found by it. Called
/// once the batch holds the write lock (SQLite's, or on PostgreSQL the writers' advisory
/// lock): a freeze after the check keeps every other writer out until this batch has
/// committed, so a re-send comes after it and finds the original.
fn refuse_frozen(batch: &mut Vec<Box<dyn Job>>) -> Vec<Box<dyn Job>> {
    if batch.iter().all(|job| job.fence().is_none()) {
        return Vec::new();
    }
    let now = Fence::now();
    batch
        .extract_if(.., |job| job.fence().is_some_and(|read| read != now))
        .collect()
}

/// Until when a batch whose first job is `first` may gather more, `now`, for a writer with a
/// commit window of `window` that last committed at `last_commit`, on a database that other
/// processes share ([`SHARED_FACTOR`] times the window) or not.
fn window_end(
    now: Instant,
    last_commit: Instant,
    first: Urgency,
    shared: bool,
    window: Duration,
) -> Instant {
    if now.duration_since(last_commit) >= IDLE || first == Urgency::Awaited {
        now
    } else if shared {
        now + window * SHARED_FACTOR
    } else {
        now + window
    }
}

/// Takes the jobs queued behind the first, up to [`MAX_BATCH`]; a batch still smaller than
/// [`WINDOW_SKIP`] and without an `awaited` job waits until `window` for more, then takes
/// what came.
///
/// It naps through the window ([`mailbox::Receiver::nap_until`]) rather than waiting on the
/// mailbox: a sender that finds the writer asleep in its mailbox wakes it, so a window of 300
/// µs at 10,000 messages/s cost two or three wake-ups a batch (a futex call in each sender, a
/// context switch for the writer), each to take one job and sleep again. Napping, it is woken
/// only by an awaited job (its sender waits: [`Writer`] sends those with
/// [`mailbox::Sender::send_urgent`]), which then commits with what came; the window's other
/// jobs it takes in one go. (A batch that reaches `WINDOW_SKIP` during the window waits for
/// its end all the same: at the rates where that happens, commits are long enough that
/// batches fill while the writer works, and the window is skipped.)
fn gather<T>(
    jobs: &mailbox::Receiver<T>,
    batch: &mut Vec<T>,
    window: Instant,
    awaited: impl Fn(&T) -> bool,
) {
    loop {
        // Announced before the look: an awaited job sent after it either is found by the look
        // or cuts the nap short.
        jobs.prepare_nap();
        let mut hurry = false;
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => {
                    hurry |= awaited(&job);
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        let now = Instant::now();
        if hurry || batch.len() >= WINDOW_SKIP || now >= window {
            jobs.end_nap();
            return;
        }
        jobs.nap_until(window);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{Options, Outgoing, Tx};
    use crate::net::PublicKeys;

    #[test]
    fn a_full_enough_batch_is_taken_at_once_and_capped() {
        let (tx, rx) = mailbox::bounded(2 * MAX_BATCH);
        for i in 0..MAX_BATCH + 5 {
            tx.try_send(i).unwrap();
        }
        let began = Instant::now();
        let mut batch = Vec::new();
        // A window far away: a batch of WINDOW_SKIP jobs or more does not wait for it.
        gather(&rx, &mut batch, began + Duration::from_secs(30), |_| false);
        assert!(began.elapsed() < Duration::from_secs(10));
        assert_eq!(batch, (0..MAX_BATCH).collect::<Vec<_>>());
        assert_eq!(
            rx.try_recv(),
            Ok(MAX_BATCH),
            "the rest wait for the next batch"
        );
    }

    #[test]
    fn a_batch_waits_longer_on_a_shared_database_and_not_at_all_when_idle_or_awaited() {
        let last = Instant::now();
        let now = last + Duration::from_micros(200);
        let batched = Urgency::Batched;
        let w = COMMIT_WINDOW;
        assert_eq!(
            window_end(now, last, batched, false, w),
            now + COMMIT_WINDOW
        );
        assert_eq!(window_end(now, last, batched, true, w), now + SHARED_WINDOW);
        assert!(SHARED_WINDOW > COMMIT_WINDOW);
        let longer = Duration::from_micros(900);
        assert_eq!(window_end(now, last, batched, false, longer), now + longer);
        assert_eq!(
            window_end(now, last, batched, true, longer),
            now + longer * SHARED_FACTOR
        );
        for shared in [false, true] {
            assert_eq!(window_end(now, last, Urgency::Awaited, shared, w), now);
            let later = last + IDLE;
            assert_eq!(window_end(later, last, batched, shared, w), later, "idle");
        }
    }

    #[test]
    fn a_batch_with_an_awaited_job_does_not_wait_for_its_window() {
        let (tx, rx) = mailbox::bounded(64);
        // Odd numbers stand for awaited jobs.
        for i in [2, 4, 5, 6] {
            tx.try_send(i).unwrap();
        }
        let began = Instant::now();
        let mut batch = vec![0];
        gather(&rx, &mut batch, began + Duration::from_secs(30), |j| {
            j % 2 == 1
        });
        assert!(began.elapsed() < Duration::from_secs(10), "it waited");
        assert_eq!(batch, [0, 2, 4, 5, 6], "with everything queued behind it");
    }

    #[test]
    fn an_awaited_job_sent_during_the_window_ends_it() {
        let (tx, rx) = mailbox::bounded(64);
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx.send(2).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            // Odd numbers stand for awaited jobs, sent as the writer sends them.
            tx.send_urgent(5).unwrap();
            tx
        });
        let began = Instant::now();
        let mut batch = vec![0];
        gather(&rx, &mut batch, began + Duration::from_secs(60), |j| {
            j % 2 == 1
        });
        assert!(began.elapsed() < Duration::from_secs(30), "it waited");
        assert_eq!(
            batch,
            [0, 2, 5],
            "the plain job did not end the window; the awaited one did"
        );
        drop(sender.join().unwrap());
    }

    #[test]
    fn completions_hand_over_when_jobs_queue_faster_than_the_writer_commits_or_are_awaited(
    ) -> crate::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = crate::db::Store::open(dir.path().join("chat.db"))?;
        let (told, seen) = crossbeam_channel::unbounded::<(u32, bool, bool)>();
        let report = |i: u32| {
            let t = told.clone();
            move |_: crate::Result<()>| t.send((i, behind(), swamped())).unwrap()
        };
        // The first job runs alone and holds the writer until 63 more are queued behind it.
        let (started, running) = crossbeam_channel::bounded::<()>(1);
        let (release, hold) = crossbeam_channel::bounded::<()>(1);
        store.submit(
            move |_| {
                started.send(()).unwrap();
                let _ = hold.recv_timeout(Duration::from_secs(10));
                Ok(())
            },
            report(0),
        );
        running.recv_timeout(Duration::from_secs(10)).unwrap();
        for i in 1..=63 {
            store.submit(|_| Ok(()), report(i));
        }
        release.send(()).unwrap();
        let mut told_behind = Vec::new();
        for _ in 0..64 {
            told_behind.push(seen.recv_timeout(Duration::from_secs(10)).unwrap());
        }
        // The first by the queue behind it; the others, committed together, by their batch.
        assert_eq!(
            told_behind,
            (0..=63).map(|i| (i, true, true)).collect::<Vec<_>>(),
            "a batch of one with 63 queued, then a batch of 63"
        );
        // One job on an idle writer; and never on another thread.
        store.submit(|_| Ok(()), report(64));
        assert_eq!(
            seen.recv_timeout(Duration::from_secs(10)).unwrap(),
            (64, false, false)
        );
        assert!(!behind() && !swamped());
        // A message whose sender waits for it (refused here: nobody exists), alone too:
        // handed over, though the writer is not swamped.
        let t = told.clone();
        let done = move |_: crate::Result<crate::db::StoredMessage>| {
            t.send((65, behind(), swamped())).unwrap();
        };
        let msg = crate::db::DirectMessage {
            from: "alice".into(),
            to: "bob".into(),
            client_id: 1,
            body: b"x".to_vec(),
        };
        store.submit_message(msg, Urgency::Awaited, Fence::now(), done);
        assert_eq!(
            seen.recv_timeout(Duration::from_secs(10)).unwrap(),
            (65, true, false)
        );
        Ok(())
    }

    #[test]
    fn a_small_batch_takes_what_comes_during_its_window() {
        let (tx, rx) = mailbox::bounded(64);
        let began = Instant::now();
        let window = began + Duration::from_millis(1000);
        let sender = std::thread::spawn(move || {
            for i in 1..=3 {
                std::thread::sleep(Duration::from_millis(20));
                tx.try_send(i).unwrap();
            }
            tx
        });
        let mut batch = vec![0];
        gather(&rx, &mut batch, window, |_| false);
        assert!(
            Instant::now() >= window,
            "it returned before its window ended"
        );
        let tx = sender.join().unwrap();
        assert_eq!(batch, [0, 1, 2, 3], "all that came in the window, in order");
        // Nothing comes: it returns when the window ends, with what it had.
        let window = Instant::now() + Duration::from_millis(50);
        let mut batch = vec![4];
        gather(&rx, &mut batch, window, |_| false);
        assert!(Instant::now() >= window);
        assert_eq!(batch, [4]);
        drop(tx);
    }

    /// `n` messages from alice to bob, stored and acknowledged (each leaves a delivery record).
    fn delivered(conn: &mut dyn Batch, from: u64, n: u64) -> Result<()> {
        conn.begin()?;
        let mut result = Ok(());
        conn.run(false, &mut |tx: &mut dyn Tx| {
            result = (from..from + n).try_for_each(|client_id| {
                let stored = tx.store_message(&Outgoing::new("alice", client_id, b"m"), "bob")?;
                tx.ack("bob", &[stored.envelope.id]).map(|_| ())
            });
            true
        })?;
        result?;
        conn.commit()
    }

    fn step(purge: &mut Purge, conn: &mut dyn Batch) -> Result<()> {
        conn.begin()?;
        purge.step(conn);
        conn.commit()
    }

    #[test]
    fn old_delivery_records_go_a_chunk_at_a_time_and_only_they_go() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("chat.db");
        let (mut conn, _) = crate::db::sqlite::writer_conn(&path, &Options::default())?;
        let reader = rusqlite::Connection::open(&path)?;
        let records = || -> Result<i64> {
            Ok(reader.query_row("SELECT count(*) FROM delivered", [], |r| r.get(0))?)
        };
        let keys = PublicKeys {
            x25519: vec![1; 32],
            ed25519: vec![2; 32],
        };
        conn.begin()?;
        conn.run(false, &mut |tx: &mut dyn Tx| {
            tx.create_user("alice", "h", &keys).is_ok() && tx.create_user("bob", "h", &keys).is_ok()
        })?;
        conn.commit()?;
        // A mark at every step until told otherwise; three records a chunk.
        let mut purge = Purge::new(Duration::ZERO, Duration::ZERO, 3);
        delivered(&mut conn, 0, 10)?;
        step(&mut purge, &mut conn)?; // marks the first ten
        delivered(&mut conn, 10, 5)?;
        step(&mut purge, &mut conn)?; // marks all fifteen; nothing is two marks old yet
        assert_eq!(records()?, 15);
        step(&mut purge, &mut conn)?; // the first mark is two marks old: its first chunk goes
        assert_eq!(records()?, 12);
        purge.next_mark = Instant::now() + Duration::from_secs(3600);
        for left in [9, 6, 5, 5] {
            step(&mut purge, &mut conn)?;
            assert_eq!(records()?, left, "a chunk at a time, up to the mark");
        }
        assert_eq!(purge.upto, None, "done until the next mark");
        Ok(())
    }
}
