//! A bounded crossbeam channel whose single consumer sleeps without spinning or yielding.
//!
//! crossbeam's blocking `recv` spins, then calls `sched_yield` up to eight times, before it
//! sleeps. That is the right trade when a message is usually microseconds away. A chat server
//! has a few hundred threads that each wait for the next message of one client: most blocking
//! receives find nothing for milliseconds, and every yield is a context switch to some other
//! runnable thread. Profiled at 10,000 messages/s, those yields were 45% of a server's CPU.
//!
//! Here the data still travels through a crossbeam channel (`try_send` / `try_recv`); only the
//! waiting differs. The receiver drains the channel, announces that it is going to sleep,
//! checks once more, and parks. A sender unparks it only if it announced sleep:
//!
//! ```text
//! receiver: sleeping = true; fence; try_recv → item? (sleeping = false) : park
//! sender:   push; fence; if sleeping.swap(false) { unpark }
//! ```
//!
//! The two fences make a lost wake-up impossible: either the receiver's second look finds the
//! item, or the sender sees `sleeping`. Dropping a sender wakes the receiver too, so it notices
//! disconnection.
//!
//! Used for the queues that have one long-lived consumer thread: a connection's outbound
//! queue, the database writer's jobs and the peer links.
//!
//! A consumer that waits for its socket too (a connection's thread, in `poll`) cannot park:
//! its mailbox rings a [`Waker`] instead ([`lazy_with`]), and the consumer announces sleep with
//! [`Receiver::prepare_wait`] before it polls and [`Receiver::woke`] after.
//!
//! A consumer that lets items gather for a while (the database writer, filling a batch) naps
//! instead ([`Receiver::prepare_nap`], [`Receiver::nap_until`]): items sent meanwhile do not
//! wake it, except those sent with [`Sender::send_urgent`], by the same two fences on a flag of
//! its own.

use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::Thread;
use std::time::Instant;

pub use crossbeam_channel::{RecvError, RecvTimeoutError, SendError, TrySendError};
use parking_lot::Mutex;

use crate::transport::Waker;

/// What a sender and its receiver share.
#[derive(Debug)]
struct Bell {
    /// The receiver is (about to be) asleep.
    sleeping: AtomicBool,
    /// The receiver (about to be) naps: only an urgent item wakes it.
    napping: AtomicBool,
    /// The receiving thread, recorded when it first waits (parking receivers).
    receiver: Mutex<Option<Thread>>,
    /// What to ring instead of unparking (receivers that sleep in `poll`).
    waker: Option<Arc<Waker>>,
    /// False once the receiver is dropped.
    receiver_alive: AtomicBool,
    /// Senders alive: the last one to go wakes the receiver to see the disconnection (the
    /// others' going changes nothing for it, and would wake it for nothing).
    senders: AtomicUsize,
}

impl Bell {
    fn ring(&self) {
        fence(Ordering::SeqCst);
        if self.sleeping.swap(false, Ordering::SeqCst) {
            match &self.waker {
                Some(w) => w.wake(),
                None => {
                    if let Some(t) = self.receiver.lock().as_ref() {
                        t.unpark();
                    }
                }
            }
        }
    }

    /// Rings, and wakes a napping receiver too.
    fn ring_urgent(&self) {
        self.ring();
        if self.napping.swap(false, Ordering::SeqCst) {
            if let Some(t) = self.receiver.lock().as_ref() {
                t.unpark();
            }
        }
    }

    /// Records the calling thread as the receiver, the one to unpark.
    fn register(&self) {
        let mut me = self.receiver.lock();
        if me.is_none() {
            *me = Some(std::thread::current());
        }
    }
}

/// A bounded mailbox with room for `cap` items, allocated up front (crossbeam's array
/// channel): for busy queues.
pub fn bounded<T>(cap: usize) -> (Sender<T>, Receiver<T>) {
    pair(crossbeam_channel::bounded(cap), None, None)
}

/// A mailbox that holds at most `cap` items but takes memory only for what it holds
/// (crossbeam's list channel, growing in small blocks): for the many queues that are mostly
/// empty, such as one per idle connection.
pub fn lazy<T>(cap: usize) -> (Sender<T>, Receiver<T>) {
    pair(crossbeam_channel::unbounded(), Some(cap), None)
}

/// Like [`lazy`], for a receiver that sleeps in `poll`: a sender rings `waker` when the
/// receiver announced sleep.
pub fn lazy_with<T>(cap: usize, waker: Arc<Waker>) -> (Sender<T>, Receiver<T>) {
    pair(crossbeam_channel::unbounded(), Some(cap), Some(waker))
}

fn pair<T>(
    (tx, rx): (crossbeam_channel::Sender<T>, crossbeam_channel::Receiver<T>),
    cap: Option<usize>,
    waker: Option<Arc<Waker>>,
) -> (Sender<T>, Receiver<T>) {
    let bell = Arc::new(Bell {
        sleeping: AtomicBool::new(false),
        napping: AtomicBool::new(false),
        receiver: Mutex::new(None),
        waker,
        receiver_alive: AtomicBool::new(true),
        senders: AtomicUsize::new(1),
    });
    (
        Sender {
            tx: Some(tx),
            cap,
            bell: Arc::clone(&bell),
        },
        Receiver { rx, bell },
    )
}

/// How often a sender looks again while a [`lazy`] mailbox is full.
const FULL_POLL: std::time::Duration = std::time::Duration::from_micros(200);

/// The sending side; cloned freely.
#[derive(Debug)]
pub struct Sender<T> {
    /// `None` only while dropping (so the receiver can see disconnection before it is woken).
    tx: Option<crossbeam_channel::Sender<T>>,
    /// The bound of a [`lazy`] mailbox (an array channel bounds itself).
    cap: Option<usize>,
    bell: Arc<Bell>,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Sender<T> {
        self.bell.senders.fetch_add(1, Ordering::SeqCst);
        Sender {
            tx: self.tx.clone(),
            cap: self.cap,
            bell: Arc::clone(&self.bell),
        }
    }
}

impl<T> Sender<T> {
    fn tx(&self) -> &crossbeam_channel::Sender<T> {
        self.tx.as_ref().expect("present until drop")
    }

    fn full(&self) -> bool {
        self.cap.is_some_and(|cap| self.tx().len() >= cap)
    }

    /// Queues without waiting; fails if full or if the receiver is gone.
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        if self.full() {
            return Err(TrySendError::Full(item));
        }
        self.tx().try_send(item)?;
        self.bell.ring();
        Ok(())
    }

    /// Queues without waiting and without waking the receiver: it takes the item whenever it
    /// next wakes for anything else, so a receiver must bound its sleep while such items may
    /// come (a connection's `Stored` replies, see `server::session`). Fails if full or if the
    /// receiver is gone.
    pub fn try_send_quiet(&self, item: T) -> Result<(), TrySendError<T>> {
        if self.full() {
            return Err(TrySendError::Full(item));
        }
        self.tx().try_send(item)
    }

    /// Whether the receiver announced that it sleeps ([`Receiver::prepare_wait`]) and was not
    /// rung since. Only a hint to a sender that cannot see what the receiver does; see
    /// `server::outbound::Wire` for one that can.
    pub fn receiver_sleeping(&self) -> bool {
        self.bell.sleeping.load(Ordering::SeqCst)
    }

    /// Queues, waiting while the mailbox is full; fails if the receiver is gone.
    pub fn send(&self, item: T) -> Result<(), SendError<T>> {
        self.push(item)?;
        self.bell.ring();
        Ok(())
    }

    /// Like [`Sender::send`], and wakes a receiver that naps ([`Receiver::nap_until`]) too:
    /// for an item that someone waits for.
    pub fn send_urgent(&self, item: T) -> Result<(), SendError<T>> {
        self.push(item)?;
        self.bell.ring_urgent();
        Ok(())
    }

    /// Queues without ringing, waiting while the mailbox is full.
    fn push(&self, item: T) -> Result<(), SendError<T>> {
        // A full lazy mailbox is rare (its consumer has stopped keeping up): poll.
        while self.full() {
            if !self.bell.receiver_alive.load(Ordering::SeqCst) {
                return Err(SendError(item));
            }
            std::thread::sleep(FULL_POLL);
        }
        self.tx().send(item)
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        // Disconnect first (if this was the last sender), then wake the receiver to see it.
        drop(self.tx.take());
        if self.bell.senders.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.bell.ring();
        }
    }
}

/// The receiving side: one consumer thread.
#[derive(Debug)]
pub struct Receiver<T> {
    rx: crossbeam_channel::Receiver<T>,
    bell: Arc<Bell>,
}

impl<T> Receiver<T> {
    /// How many items are queued now.
    pub fn len(&self) -> usize {
        self.rx.len()
    }

    /// Whether nothing is queued now.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// The next item if there is one now.
    pub fn try_recv(&self) -> Result<T, crossbeam_channel::TryRecvError> {
        self.rx.try_recv()
    }

    /// For a receiver that sleeps in `poll` on its waker: announces sleep. Returns `false` if
    /// an item arrived meanwhile, or every sender is gone (the last one to go rings only a
    /// receiver that announced sleep first): then do not sleep, look.
    pub fn prepare_wait(&self) -> bool {
        self.bell.sleeping.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if !self.rx.is_empty() || self.bell.senders.load(Ordering::SeqCst) == 0 {
            self.bell.sleeping.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// After the `poll` that followed [`Receiver::prepare_wait`]: awake again. `rung`: the
    /// poll saw the waker set, so it is cleared (one system call; a waker left set by a ring
    /// that came after the poll only ends the next wait at once).
    pub fn woke(&self, rung: bool) {
        self.bell.sleeping.store(false, Ordering::SeqCst);
        if let Some(w) = &self.bell.waker {
            if rung {
                w.reset();
            }
        }
    }

    /// For a parking receiver about to let items gather (see [`Receiver::nap_until`]):
    /// announces the nap. Look at the queue after this, then nap or [`Receiver::end_nap`]:
    /// an urgent item sent from here on either is seen by that look or wakes the nap.
    pub fn prepare_nap(&self) {
        self.bell.register();
        self.bell.napping.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    /// Sleeps until `deadline`, unless an item sent with [`Sender::send_urgent`] came since
    /// [`Receiver::prepare_nap`] (it may also return early for nothing). Items sent with
    /// [`Sender::send`] meanwhile do not wake it: they wait in the queue.
    pub fn nap_until(&self, deadline: Instant) {
        let now = Instant::now();
        if now < deadline && self.bell.napping.load(Ordering::SeqCst) {
            std::thread::park_timeout(deadline - now);
        }
        self.end_nap();
    }

    /// Ends a nap announced with [`Receiver::prepare_nap`] without sleeping.
    pub fn end_nap(&self) {
        self.bell.napping.store(false, Ordering::SeqCst);
    }

    /// The next item, sleeping until one comes; `Err` once every sender is gone and the
    /// mailbox is empty.
    pub fn recv(&self) -> Result<T, RecvError> {
        self.recv_until(None).map_err(|_| RecvError)
    }

    /// The next item, sleeping until one comes or `deadline` passes.
    pub fn recv_deadline(&self, deadline: Instant) -> Result<T, RecvTimeoutError> {
        self.recv_until(Some(deadline))
    }

    fn recv_until(&self, deadline: Option<Instant>) -> Result<T, RecvTimeoutError> {
        use crossbeam_channel::TryRecvError;
        loop {
            match self.rx.try_recv() {
                Ok(item) => return Ok(item),
                Err(TryRecvError::Disconnected) => return Err(RecvTimeoutError::Disconnected),
                Err(TryRecvError::Empty) => {}
            }
            self.bell.register();
            self.bell.sleeping.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            match self.rx.try_recv() {
                Ok(item) => {
                    self.bell.sleeping.store(false, Ordering::SeqCst);
                    return Ok(item);
                }
                Err(TryRecvError::Disconnected) => {
                    self.bell.sleeping.store(false, Ordering::SeqCst);
                    return Err(RecvTimeoutError::Disconnected);
                }
                Err(TryRecvError::Empty) => {}
            }
            match deadline {
                None => std::thread::park(),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        self.bell.sleeping.store(false, Ordering::SeqCst);
                        return Err(RecvTimeoutError::Timeout);
                    }
                    std::thread::park_timeout(d - now);
                }
            }
            self.bell.sleeping.store(false, Ordering::SeqCst);
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.bell.receiver_alive.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_nap_is_woken_by_an_urgent_item_only() {
        let (tx, rx) = bounded::<u32>(16);
        let (napping, started) = crossbeam_channel::bounded::<()>(1);
        let napper = std::thread::spawn(move || {
            rx.prepare_nap();
            napping.send(()).unwrap();
            let began = Instant::now();
            // A spurious wake-up may end a nap early: nap again until the urgent item is in.
            let mut got = Vec::new();
            while !got.contains(&2) && began.elapsed() < Duration::from_secs(60) {
                rx.nap_until(began + Duration::from_secs(60));
                got.extend(std::iter::from_fn(|| rx.try_recv().ok()));
                rx.prepare_nap();
            }
            rx.end_nap();
            (got, began.elapsed())
        });
        started.recv().unwrap();
        tx.send(1).unwrap();
        // The plain item does not end the nap: it is still going a moment later.
        std::thread::sleep(Duration::from_millis(100));
        assert!(!napper.is_finished(), "a plain item woke the nap");
        tx.send_urgent(2).unwrap();
        let (got, slept) = napper.join().unwrap();
        assert_eq!(got, [1, 2]);
        assert!(
            slept < Duration::from_secs(30),
            "the urgent item woke it: {slept:?}"
        );
    }

    /// An urgent item sent between the announcement and the nap is not missed: the nap does
    /// not sleep at all.
    #[test]
    fn an_urgent_item_before_the_nap_keeps_it_from_sleeping() {
        let (tx, rx) = bounded::<u32>(16);
        rx.prepare_nap();
        tx.send_urgent(7).unwrap();
        let began = Instant::now();
        rx.nap_until(began + Duration::from_secs(60));
        assert!(began.elapsed() < Duration::from_secs(30));
        assert_eq!(rx.try_recv().ok(), Some(7));
    }

    #[test]
    fn items_arrive_in_order_across_threads() {
        let (tx, rx) = bounded::<u64>(16);
        let producers: Vec<_> = (0..4)
            .map(|p| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        tx.send(p * 1_000_000 + i).unwrap();
                        if i % 1000 == 0 {
                            std::thread::sleep(Duration::from_micros(50));
                        }
                    }
                })
            })
            .collect();
        drop(tx);
        let mut last = [None::<u64>; 4];
        let mut count = 0;
        while let Ok(v) = rx.recv() {
            let p = (v / 1_000_000) as usize;
            assert!(last[p].is_none_or(|l| l < v), "per-sender order");
            last[p] = Some(v);
            count += 1;
        }
        for p in producers {
            p.join().unwrap();
        }
        assert_eq!(
            count, 40_000,
            "nothing lost, and recv ended when all senders left"
        );
    }

    #[test]
    fn a_deadline_passes_and_a_late_item_still_arrives() {
        let (tx, rx) = bounded::<u8>(1);
        let start = Instant::now();
        assert_eq!(
            rx.recv_deadline(start + Duration::from_millis(30)),
            Err(RecvTimeoutError::Timeout)
        );
        assert!(start.elapsed() >= Duration::from_millis(30));
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx.try_send(7).unwrap();
        });
        assert_eq!(rx.recv(), Ok(7));
        t.join().unwrap();
        assert_eq!(rx.recv(), Err(RecvError), "the sender is gone");
    }

    #[test]
    fn a_full_mailbox_refuses_without_blocking() {
        for (tx, rx) in [bounded::<u8>(1), lazy::<u8>(1)] {
            tx.try_send(1).unwrap();
            assert!(matches!(tx.try_send(2), Err(TrySendError::Full(2))));
            assert_eq!(rx.recv(), Ok(1));
            drop(rx);
            assert!(matches!(tx.try_send(3), Err(TrySendError::Disconnected(3))));
        }
    }

    #[test]
    fn a_lazy_mailbox_makes_a_sender_wait_for_room() {
        let (tx, rx) = lazy::<u32>(2);
        let t = std::thread::spawn(move || {
            for i in 0..100 {
                tx.send(i).unwrap();
            }
        });
        for i in 0..100 {
            assert_eq!(rx.recv(), Ok(i));
            assert!(rx.rx.len() <= 2, "never more than the bound");
        }
        t.join().unwrap();
        let (tx, rx) = lazy::<u32>(1);
        tx.send(1).unwrap();
        drop(rx);
        assert!(tx.send(2).is_err(), "a full mailbox with no receiver fails");
    }

    /// A receiver that sleeps in `poll`: a send rings its waker, a quiet one does not, and of
    /// the senders going away only the last rings (to tell it they are gone).
    #[test]
    fn quiet_sends_and_all_but_the_last_sender_leave_a_sleeper_asleep() {
        let waker = Arc::new(Waker::new().unwrap());
        let (tx, rx) = lazy_with::<u8>(8, Arc::clone(&waker));
        let asleep = || {
            assert!(rx.prepare_wait(), "nothing queued: it may sleep");
        };
        asleep();
        tx.try_send_quiet(1).unwrap();
        assert!(!waker.is_set(), "a quiet send does not ring");
        assert!(!rx.prepare_wait(), "but a receiver about to sleep sees it");
        assert_eq!(rx.try_recv(), Ok(1));
        asleep();
        let copy = tx.clone();
        drop(copy);
        assert!(
            !waker.is_set(),
            "a sender that goes while others stay does not ring"
        );
        tx.try_send(2).unwrap();
        assert!(waker.is_set(), "a send rings a sleeper");
        rx.woke(true);
        assert_eq!(rx.try_recv(), Ok(2));
        asleep();
        drop(tx);
        assert!(waker.is_set(), "the last sender going rings");
        rx.woke(true);
        assert!(rx.try_recv().is_err());
    }

    /// The last sender can go after the receiver last looked and before it announces sleep:
    /// then it rings nobody, and the receiver must not sleep (a peer link's thread slept for
    /// ever so, and the server's stop waited on it).
    #[test]
    fn a_receiver_about_to_sleep_sees_its_last_sender_gone() {
        let waker = Arc::new(Waker::new().unwrap());
        let (tx, rx) = lazy_with::<u8>(8, Arc::clone(&waker));
        assert_eq!(rx.try_recv(), Err(crossbeam_channel::TryRecvError::Empty));
        drop(tx);
        assert!(!waker.is_set(), "not announced: not rung");
        assert!(!rx.prepare_wait(), "nobody is left to ring it: no sleeping");
        assert_eq!(
            rx.try_recv(),
            Err(crossbeam_channel::TryRecvError::Disconnected)
        );
    }
}
