//! Accepting connections, for the balancer and the chat servers alike: a thread per
//! connection, a stop on a signal, and every connection thread joined before the caller goes
//! on.
//!
//! ```text
//! caller: accept ──spawns──▶ handler thread (one per connection)
//!    ▲                            │ may hand the rest of its connection to a fresh thread,
//!    │                            │ which takes its place (`Rest`), and end
//!    │                            │ ends: sends its id
//!    │ self-connect               ▼
//! waker: waits for the          reaper: joins each handler thread as it ends
//! shutdown signal, sets
//! the flag, connects
//! ```
//!
//! A blocking `accept` cannot be interrupted, so the waker sets a flag and connects to the
//! listener itself: `accept` returns, the loop sees the flag and stops. [`accept`] then returns
//! the [`Handlers`], so the caller can close the connections it knows about (which makes their
//! threads end) before [`Handlers::join`] waits, with a deadline, for every thread to finish.
//!
//! Limits: past [`Threads::max`] connections at once, or [`Threads::per_address`] from one
//! address, a new connection is closed at once, before it costs a thread. A failing `accept`
//! (out of descriptors, say) is retried after a pause that doubles from 10 ms to 1 s, and
//! logged at most once a second.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::throttle::Quiet;

/// How connection threads are made.
#[derive(Debug, Clone)]
pub struct Threads {
    /// Thread name, shown by debuggers and `top -H`.
    pub name: &'static str,
    /// Stack size in bytes: a connection's work needs little, and thousands of connections
    /// each reserve this much address space.
    pub stack_size: usize,
    /// Keep a handle on each connection's socket (one more descriptor each) so that
    /// [`Handlers::close`] can end them; for callers that do not track their connections.
    pub closable: bool,
    /// Most connections at once (0: no limit).
    pub max: usize,
    /// Most connections at once from one address (0: no limit).
    pub per_address: usize,
}

/// What a connection's handler leaves to do: nothing (a handler that returns `()` is done), or
/// the rest of the connection, to run on a fresh thread that takes the first one's place (its
/// id, its count against the limits, its socket). The first thread then ends, and with it what
/// it kept that the rest does not need: after a TLS handshake, OpenSSL's per-thread random
/// generators and the like, about 5 KiB a connection (BENCHMARKS.md). Where no thread can be
/// made, the rest runs on the first.
pub enum Rest {
    /// The connection is over.
    Done,
    /// The rest of the connection, on a thread of its own.
    Then(Then),
}

/// The rest of a connection (see [`Rest::Then`]).
pub type Then = Box<dyn FnOnce() -> Result<()> + Send>;

impl From<()> for Rest {
    fn from((): ()) -> Rest {
        Rest::Done
    }
}

/// A running connection thread and, if its socket is kept, the socket.
struct Running {
    thread: JoinHandle<()>,
    socket: Option<TcpStream>,
    from: Option<IpAddr>,
}

/// The running connections: their threads, and how many come from each address.
#[derive(Default)]
struct Connections {
    threads: HashMap<u64, Running>,
    per_address: HashMap<IpAddr, usize>,
}

impl Connections {
    fn remove(&mut self, id: u64) -> Option<Running> {
        let r = self.threads.remove(&id)?;
        if let Some(ip) = r.from {
            if let Some(n) = self.per_address.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    self.per_address.remove(&ip);
                }
            }
        }
        Some(r)
    }
}

/// The connection threads of a stopped accept loop, to be joined.
pub struct Handlers {
    /// Handles of the threads still running, by id; the reaper joins each as it ends.
    running: Arc<Mutex<Connections>>,
    /// Disconnects when the reaper has joined every handler.
    reaped: Receiver<()>,
    reaper: JoinHandle<()>,
    name: &'static str,
}

impl Handlers {
    /// How many connection threads are still running.
    pub fn running(&self) -> usize {
        self.running.lock().threads.len()
    }

    /// Shuts down the socket of every running connection whose socket was kept (see
    /// [`Threads::closable`]), so that its thread ends.
    pub fn close(&self) {
        for r in self.running.lock().threads.values() {
            if let Some(s) = &r.socket {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// Waits until every connection thread has ended, or `limit` passes. Returns how many
    /// were still running then (0 when all were joined).
    pub fn join(self, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        let _ = self.reaped.recv_deadline(deadline);
        let left = self.running();
        if left == 0 {
            let _ = self.reaper.join();
        } else {
            log::warn!(
                "{left} {} threads still running {limit:?} after the stop",
                self.name
            );
        }
        left
    }
}

/// Accepts connections on `listener` and runs `handler` on a thread of its own for each, until
/// `shutdown` receives a message or disconnects; what the handler leaves ([`Rest`]) runs on a
/// fresh thread in its place. Per-connection errors are logged here (at debug level: a client
/// going away is not the server's problem). Returns the running connection threads, to be
/// closed and joined by the caller.
pub fn accept<R: Into<Rest>>(
    listener: &TcpListener,
    shutdown: Receiver<()>,
    threads: &Threads,
    handler: impl Fn(TcpStream) -> Result<R> + Send + Sync + 'static,
) -> Result<Handlers> {
    let local = listener.local_addr()?;
    let stopping = Arc::new(AtomicBool::new(false));
    let waker = wake_on(shutdown, Arc::clone(&stopping), local)?;
    let running: Arc<Mutex<Connections>> = Arc::default();
    let (ended_tx, ended) = unbounded::<u64>();
    let (reaped_tx, reaped) = bounded::<()>(0);
    let reaper = {
        let running = Arc::clone(&running);
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || {
                // Ends when every sender is gone: the accept loop's and each handler's.
                for id in ended {
                    let done = running.lock().remove(id);
                    if let Some(r) = done {
                        let _ = r.thread.join();
                    }
                }
                drop(reaped_tx);
            })?
    };
    let handler = Arc::new(handler);
    let mut next_id = 0u64;
    let mut pause = Duration::ZERO;
    let failing = Quiet::new(Duration::from_secs(1));
    let refusing = Quiet::new(Duration::from_secs(1));
    for stream in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            break;
        }
        let stream = match stream {
            Ok(s) => {
                pause = Duration::ZERO;
                s
            }
            Err(e) => {
                // Out of descriptors, most likely: wait for connections to end rather than
                // spin (the error repeats until one does).
                pause = (pause * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                failing.warn(&format!("accept failed: {e}; pausing {pause:?}"));
                std::thread::sleep(pause);
                continue;
            }
        };
        let from = stream.peer_addr().ok().map(|a| a.ip());
        {
            let conns = running.lock();
            let total = conns.threads.len();
            let here = from
                .and_then(|ip| conns.per_address.get(&ip))
                .copied()
                .unwrap_or(0);
            let full = threads.max > 0 && total >= threads.max;
            if full || (threads.per_address > 0 && here >= threads.per_address) {
                drop(conns);
                let what = if full {
                    format!("{total} connections, the most allowed")
                } else {
                    format!("{here} connections from {from:?}, the most allowed from one address")
                };
                refusing.warn(&format!("{}: {what}; closing a new one", threads.name));
                continue;
            }
        }
        next_id += 1;
        let id = next_id;
        let socket = if threads.closable {
            match stream.try_clone() {
                Ok(s) => Some(s),
                Err(e) => {
                    log::warn!("cannot keep a handle on a connection: {e}");
                    continue;
                }
            }
        } else {
            None
        };
        let (handler, ended) = (Arc::clone(&handler), ended_tx.clone());
        let (map_again, how) = (Arc::clone(&running), threads.clone());
        // The map stays locked until the handle is in it, so the reaper (which takes the
        // lock to remove it) cannot look for it too early.
        let mut map = running.lock();
        let spawned = std::thread::Builder::new()
            .name(threads.name.into())
            .stack_size(threads.stack_size)
            .spawn(move || {
                let peer = stream.peer_addr().ok();
                match handler(stream).map(Into::into) {
                    Ok(Rest::Done) => {}
                    Ok(Rest::Then(rest)) => {
                        return hand_on(id, rest, peer, &map_again, ended, &how)
                    }
                    Err(e) => ended_with(peer, &e),
                }
                let _ = ended.send(id);
            });
        match spawned {
            Ok(thread) => {
                map.threads.insert(
                    id,
                    Running {
                        thread,
                        socket,
                        from,
                    },
                );
                if let Some(ip) = from {
                    *map.per_address.entry(ip).or_insert(0) += 1;
                }
            }
            Err(e) => failing.warn(&format!("cannot start a connection thread: {e}")),
        }
    }
    drop(ended_tx);
    let _ = waker.join();
    Ok(Handlers {
        running,
        reaped,
        reaper,
        name: threads.name,
    })
}

/// Runs the rest of connection `id` on a fresh thread, which takes the calling thread's place
/// in `running` (the caller ends next). The fresh thread first joins the caller, so that a
/// connection's threads are all joined once its last one is, and what a thread frees as it
/// ends (OpenSSL's per-thread state) is freed before the rest begins. If no thread can be
/// made, the rest runs on the calling thread.
fn hand_on(
    id: u64,
    rest: Then,
    peer: Option<SocketAddr>,
    running: &Mutex<Connections>,
    ended: Sender<u64>,
    threads: &Threads,
) {
    // Taken by whichever thread runs it: a thread that cannot be made drops its closure.
    let rest = Arc::new(Mutex::new(Some(rest)));
    let theirs = Arc::clone(&rest);
    // Locked until the new handle is in place (see `accept`).
    let mut map = running.lock();
    let done = ended.clone();
    let (give, first) = bounded::<JoinHandle<()>>(1);
    let spawned = std::thread::Builder::new()
        .name(threads.name.into())
        .stack_size(threads.stack_size)
        .spawn(move || {
            if let Some(Err(e)) = take_place(first, theirs).map(|rest| rest()) {
                ended_with(peer, &e);
            }
            let _ = done.send(id);
        });
    match spawned {
        Ok(thread) => {
            if let Some(r) = map.threads.get_mut(&id) {
                let _ = give.send(std::mem::replace(&mut r.thread, thread));
            }
        }
        Err(e) => {
            drop(map);
            log::warn!("cannot start a thread for a connection from {peer:?} ({e}); it goes on on the one it has");
            if let Some(Err(e)) = rest.lock().take().map(|rest| rest()) {
                ended_with(peer, &e);
            }
            let _ = ended.send(id);
        }
    }
}

/// The start of a fresh thread that takes a connection's place: waits for the first thread's
/// handle (it comes once the map holds this one's) and joins it, and takes the rest of the
/// connection. What carried the handle and the rest goes at once: a connection's thread keeps
/// nothing it does not need.
///
/// Out of line, as is [`ended_with`], so that the rest runs close to the top of the thread's
/// stack: an idle chat connection's thread touches three pages of it (BENCHMARKS.md).
#[inline(never)]
fn take_place(first: Receiver<JoinHandle<()>>, rest: Arc<Mutex<Option<Then>>>) -> Option<Then> {
    let handle = first.recv();
    drop(first);
    let taken = rest.lock().take();
    drop(rest);
    if let Ok(handle) = handle {
        let _ = handle.join();
    }
    taken
}

/// Logs why a connection's handler ended (at debug level: a client going away is normal).
#[cold]
#[inline(never)]
fn ended_with(peer: Option<SocketAddr>, e: &Error) {
    log::debug!("connection from {peer:?} ended: {e}");
}

/// Starts the thread that waits for `shutdown`, then sets `stopping` and connects to the
/// listener at `addr` so that a blocking `accept` returns.
fn wake_on(
    shutdown: Receiver<()>,
    stopping: Arc<AtomicBool>,
    addr: SocketAddr,
) -> Result<JoinHandle<()>> {
    let target = if addr.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    };
    Ok(std::thread::Builder::new()
        .name("shutdown".into())
        .spawn(move || {
            let _ = shutdown.recv();
            stopping.store(true, Ordering::SeqCst);
            let _ = TcpStream::connect_timeout(&target, Duration::from_secs(1));
        })?)
}

/// A shutdown channel for [`accept`] that the caller triggers by dropping the sender.
pub fn stop_channel() -> (Sender<()>, Receiver<()>) {
    bounded(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    const THREADS: Threads = Threads {
        name: "test-conn",
        stack_size: 64 * 1024,
        closable: false,
        max: 0,
        per_address: 0,
    };

    /// An echo server whose connections end when their peer closes.
    fn echo(stream: TcpStream) -> Result<()> {
        let mut s = stream;
        let mut buf = [0u8; 64];
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            s.write_all(&buf[..n])?;
        }
    }

    #[test]
    fn serves_until_stopped_and_joins_every_connection_thread() -> Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let (stop, shutdown) = stop_channel();
        let server = std::thread::spawn(move || accept(&listener, shutdown, &THREADS, echo));
        let mut clients = Vec::new();
        for i in 0..5u8 {
            let mut c = TcpStream::connect(addr)?;
            c.write_all(&[i])?;
            let mut b = [0u8; 1];
            c.read_exact(&mut b)?;
            assert_eq!(b[0], i, "echoed by its own thread");
            clients.push(c);
        }
        drop(stop);
        let handlers = server.join().expect("no panic")?;
        assert_eq!(handlers.running(), 5, "the connections are still open");
        // Closing the connections ends their threads; join waits for all of them.
        drop(clients);
        assert_eq!(handlers.join(Duration::from_secs(10)), 0);
        Ok(())
    }

    #[test]
    fn join_gives_up_at_its_deadline_and_says_how_many_are_left() -> Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let (stop, shutdown) = stop_channel();
        let server = std::thread::spawn(move || accept(&listener, shutdown, &THREADS, echo));
        let held = TcpStream::connect(addr)?;
        // Make sure the connection has its thread before stopping.
        (&held).write_all(b"x")?;
        (&held).read_exact(&mut [0u8; 1])?;
        stop.send(()).expect("accept loop is waiting");
        let handlers = server.join().expect("no panic")?;
        let started = Instant::now();
        assert_eq!(handlers.join(Duration::from_millis(100)), 1);
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(held);
        Ok(())
    }

    #[test]
    fn connections_past_the_limits_are_closed_at_once() -> Result<()> {
        for threads in [
            Threads { max: 2, ..THREADS },
            Threads {
                per_address: 2,
                ..THREADS
            },
        ] {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            let addr = listener.local_addr()?;
            let (stop, shutdown) = stop_channel();
            let server = std::thread::spawn(move || accept(&listener, shutdown, &threads, echo));
            let mut held = Vec::new();
            for i in 0..2u8 {
                let mut c = TcpStream::connect(addr)?;
                c.write_all(&[i])?;
                c.read_exact(&mut [0u8; 1])?;
                held.push(c);
            }
            let mut third = TcpStream::connect(addr)?;
            third.set_read_timeout(Some(Duration::from_secs(10)))?;
            let _ = third.write_all(b"x");
            assert!(
                matches!(third.read(&mut [0u8; 1]), Ok(0) | Err(_)),
                "closed, not served"
            );
            // Once one ends, a new one is served again.
            drop(held.pop());
            let deadline = Instant::now() + Duration::from_secs(10);
            let served = loop {
                let mut c = TcpStream::connect(addr)?;
                c.set_read_timeout(Some(Duration::from_secs(10)))?;
                c.write_all(b"y")?;
                if c.read(&mut [0u8; 1]).is_ok_and(|n| n == 1) {
                    break true;
                }
                if Instant::now() > deadline {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            assert!(served);
            drop(stop);
            drop(held);
            let handlers = server.join().expect("no panic")?;
            assert_eq!(handlers.join(Duration::from_secs(10)), 0);
        }
        Ok(())
    }

    #[test]
    fn closable_connections_are_ended_by_close() -> Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let (stop, shutdown) = stop_channel();
        let threads = Threads {
            closable: true,
            ..THREADS
        };
        let server = std::thread::spawn(move || accept(&listener, shutdown, &threads, echo));
        let mut held = TcpStream::connect(addr)?;
        held.write_all(b"x")?;
        held.read_exact(&mut [0u8; 1])?;
        drop(stop);
        let handlers = server.join().expect("no panic")?;
        handlers.close();
        assert_eq!(handlers.join(Duration::from_secs(10)), 0);
        assert_eq!(held.read(&mut [0u8; 1])?, 0, "the client sees the close");
        Ok(())
    }

    #[test]
    fn the_rest_runs_on_the_thread_it_has_when_no_thread_can_be_made() {
        let running = Mutex::new(Connections::default());
        let (ended, reaped) = unbounded::<u64>();
        // A stack no system gives: the new thread cannot be made.
        let threads = Threads {
            stack_size: usize::MAX / 2,
            ..THREADS
        };
        let here = std::thread::current().id();
        let (said, hear) = unbounded();
        let rest: Box<dyn FnOnce() -> Result<()> + Send> = Box::new(move || {
            let _ = said.send(std::thread::current().id());
            Ok(())
        });
        hand_on(7, rest, None, &running, ended, &threads);
        assert_eq!(
            hear.try_recv().ok(),
            Some(here),
            "ran here, before hand_on returned"
        );
        assert_eq!(
            reaped.try_recv().ok(),
            Some(7),
            "and the connection is over"
        );
    }

    #[test]
    fn the_rest_of_a_connection_runs_on_a_fresh_thread_that_keeps_its_place() -> Result<()> {
        thread_local! {
            // Says so when the thread that set it ends.
            static ENDED: std::cell::RefCell<Option<Flag>> = const { std::cell::RefCell::new(None) };
        }
        struct Flag(Sender<&'static str>);
        impl Drop for Flag {
            fn drop(&mut self) {
                // Slow to end, as a thread whose libraries free their state can be.
                std::thread::sleep(Duration::from_millis(100));
                let _ = self.0.send("the first thread ended");
            }
        }
        let (said, hear) = unbounded::<&'static str>();
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let (stop, shutdown) = stop_channel();
        let threads = Threads { max: 1, ..THREADS };
        let handler = move |mut s: TcpStream| -> Result<Rest> {
            // The first part reads a byte, and leaves something in its thread's locals.
            s.read_exact(&mut [0u8; 1])?;
            ENDED.with(|e| *e.borrow_mut() = Some(Flag(said.clone())));
            let first = std::thread::current().id();
            let said = said.clone();
            Ok(Rest::Then(Box::new(move || {
                if std::thread::current().id() != first {
                    let _ = said.send("the rest runs on another thread");
                }
                echo(s)
            })))
        };
        let server = std::thread::spawn(move || accept(&listener, shutdown, &threads, handler));
        let mut c = TcpStream::connect(addr)?;
        c.write_all(b"a")?;
        let heard: Vec<&str> = (0..2)
            .map(|_| {
                hear.recv_timeout(Duration::from_secs(10))
                    .unwrap_or("nothing")
            })
            .collect();
        assert_eq!(
            heard,
            ["the first thread ended", "the rest runs on another thread"],
            "the rest begins once the first thread is gone"
        );
        c.write_all(b"b")?;
        let mut b = [0u8; 1];
        c.read_exact(&mut b)?;
        assert_eq!(&b, b"b", "the rest serves the connection");
        // The rest still counts against the limit: a second connection is closed at once.
        let mut second = TcpStream::connect(addr)?;
        second.set_read_timeout(Some(Duration::from_secs(10)))?;
        let _ = second.write_all(b"x");
        assert!(matches!(second.read(&mut [0u8; 1]), Ok(0) | Err(_)));
        drop(stop);
        let handlers = server.join().expect("no panic")?;
        assert_eq!(handlers.running(), 1, "the rest's thread is still running");
        drop(c);
        assert_eq!(handlers.join(Duration::from_secs(10)), 0, "and is joined");
        Ok(())
    }
}
