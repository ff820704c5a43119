//! Waking a thread that waits in `poll(2)`: a [`Waker`] is an eventfd that another thread
//! writes to, and [`wait`] waits on a socket and any number of wakers at once. A thread that
//! serves many sockets (the load tool's) watches them with a [`Poller`] instead (epoll: a
//! wait costs what is ready, not what is watched).
//!
//! A connection's thread sleeps in [`wait`] on its socket and its waker; its outbound mailbox
//! rings the waker when it queues an item for a sleeping thread (see [`crate::mailbox`]). A
//! process-wide waker that nobody resets ends every wait at once: the stop signal.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::buffer::spare_capacity;
use rustix::event::{epoll, eventfd, poll, EventfdFlags, PollFd, PollFlags, Timespec};

/// An eventfd: readable (for `poll`) from the first [`Waker::wake`] until [`Waker::reset`].
#[derive(Debug)]
pub struct Waker {
    fd: OwnedFd,
}

impl Waker {
    /// A waker that is not yet set. One descriptor.
    pub fn new() -> io::Result<Waker> {
        let fd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        Ok(Waker { fd })
    }

    /// Sets the waker: a thread waiting on it wakes, and the next wait returns at once.
    pub fn wake(&self) {
        // Fails only when the counter would overflow, and then it is set anyway.
        let _ = rustix::io::write(&self.fd, &1u64.to_ne_bytes());
    }

    /// Clears the waker (after a wait that it ended).
    pub fn reset(&self) {
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(&self.fd, &mut buf);
    }

    /// Sleeps until the waker is set or `deadline` passes, without clearing it; whether it is
    /// set. For a thread that waits for nothing else (a socket in `poll` would end the wait
    /// at once, and every one after it, once its peer hung up).
    pub fn sleep(&self, deadline: Option<Instant>) -> io::Result<bool> {
        let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
        poll_until(&mut fds, deadline)?;
        Ok(fds[0].revents().contains(PollFlags::IN))
    }

    /// Whether the waker is set, without waiting or clearing it.
    pub fn is_set(&self) -> bool {
        let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
        matches!(poll(&mut fds, Some(&Timespec::default())), Ok(n) if n > 0)
    }
}

impl AsFd for Waker {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// What a socket is waited on for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Interest {
    /// Wake when there is something to read (or the peer closed).
    pub read: bool,
    /// Wake when a write would not block.
    pub write: bool,
}

/// What ended a [`wait`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ready {
    /// The socket has something to read, or an error or hang-up to report (a read tells which).
    pub readable: bool,
    /// The socket can take a write.
    pub writable: bool,
    /// Bit `i` is set when waker `i` is set.
    pub woken: u32,
}

impl Ready {
    /// Whether nothing happened before the timeout.
    pub fn timed_out(&self) -> bool {
        !self.readable && !self.writable && self.woken == 0
    }
}

/// Waits until `socket` is ready for what `interest` says, or one of `wakers` is set, or
/// `deadline` passes (`None`: no deadline). Interrupted waits are resumed.
pub fn wait(
    socket: &impl AsFd,
    interest: Interest,
    wakers: &[&Waker],
    deadline: Option<Instant>,
) -> io::Result<Ready> {
    let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(1 + wakers.len());
    fds.push(PollFd::new(socket, interest.flags()));
    fds.extend(wakers.iter().map(|w| PollFd::new(*w, PollFlags::IN)));
    poll_until(&mut fds, deadline)?;
    Ok(Ready {
        woken: woken(&fds[1..]),
        ..Ready::of(&fds[0])
    })
}

/// Many sockets and one waker watched by one thread, with epoll(7): each socket is registered
/// once and changed only when what it waits for changes, and a wait costs what is ready.
/// (`poll(2)` looks at every descriptor on every call: for a thread driving fifty
/// connections that was a third of its time.)
pub struct Poller {
    epoll: OwnedFd,
    /// What each key's socket is registered for (`None`: not registered).
    watched: Vec<Option<Interest>>,
    events: Vec<epoll::Event>,
}

/// The key of the waker's events (sockets' keys are their indexes).
const WAKER_KEY: u64 = u64::MAX;

/// Most events taken from one wait (more stay ready for the next: registrations are
/// level-triggered).
const EVENTS_PER_WAIT: usize = 256;

impl Poller {
    /// A poller that watches `waker`, and no socket yet. One descriptor.
    pub fn new(waker: &Waker) -> io::Result<Poller> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let key = epoll::EventData::new_u64(WAKER_KEY);
        epoll::add(&epoll, waker, key, epoll::EventFlags::IN)?;
        Ok(Poller {
            epoll,
            watched: Vec::new(),
            events: Vec::with_capacity(EVENTS_PER_WAIT),
        })
    }

    /// Watches `socket` as `key` for `interest` from now on (for nothing: not at all). Only a
    /// change costs a system call.
    pub fn watch(&mut self, key: usize, socket: &impl AsFd, interest: Interest) -> io::Result<()> {
        if self.watched.len() <= key {
            self.watched.resize(key + 1, None);
        }
        let flags = interest.epoll_flags();
        let data = epoll::EventData::new_u64(key as u64);
        match (self.watched[key], flags.is_empty()) {
            (Some(now), _) if now == interest => return Ok(()),
            (None, true) => return Ok(()),
            (None, false) => epoll::add(&self.epoll, socket, data, flags)?,
            (Some(_), false) => epoll::modify(&self.epoll, socket, data, flags)?,
            (Some(_), true) => epoll::delete(&self.epoll, socket)?,
        }
        self.watched[key] = (!flags.is_empty()).then_some(interest);
        Ok(())
    }

    /// Stops watching `key`'s socket (before it goes to another thread, or away).
    pub fn forget(&mut self, key: usize, socket: &impl AsFd) {
        if let Some(watched) = self.watched.get_mut(key) {
            if watched.take().is_some() {
                // Fails only if the socket is already closed, which unregistered it.
                let _ = epoll::delete(&self.epoll, socket);
            }
        }
    }

    /// Waits until a watched socket is ready, the waker is set, or `deadline` passes (`None`:
    /// no deadline); interrupted waits are resumed. Returns the ready sockets' keys with what
    /// they are ready for, and whether the waker is set. The wait itself is a `poll(2)` on the
    /// epoll descriptor, whose timeout has nanoseconds (epoll's own, on kernels before 5.11,
    /// milliseconds: a message due in 0.2 ms would go 1 ms late).
    pub fn wait(&mut self, deadline: Option<Instant>) -> io::Result<(Vec<(usize, Ready)>, bool)> {
        poll_until(&mut [PollFd::new(&self.epoll, PollFlags::IN)], deadline)?;
        self.events.clear();
        let now = Timespec::default();
        loop {
            match epoll::wait(&self.epoll, spare_capacity(&mut self.events), Some(&now)) {
                Ok(_) => break,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let mut ready = Vec::with_capacity(self.events.len());
        let mut woken = false;
        for event in &self.events {
            match event.data.u64() {
                WAKER_KEY => woken = true,
                key => ready.push((key as usize, Ready::of_epoll(event.flags))),
            }
        }
        Ok((ready, woken))
    }
}

impl Interest {
    fn epoll_flags(self) -> epoll::EventFlags {
        let mut flags = epoll::EventFlags::empty();
        if self.read {
            flags |= epoll::EventFlags::IN | epoll::EventFlags::RDHUP;
        }
        if self.write {
            flags |= epoll::EventFlags::OUT;
        }
        flags
    }

    fn flags(self) -> PollFlags {
        let mut flags = PollFlags::empty();
        if self.read {
            flags |= PollFlags::IN;
        }
        if self.write {
            flags |= PollFlags::OUT;
        }
        flags
    }
}

impl Ready {
    /// What a polled socket is ready for: an error or hang-up counts as both (a read or a
    /// write then tells which).
    fn of(fd: &PollFd<'_>) -> Ready {
        let trouble = PollFlags::ERR | PollFlags::HUP | PollFlags::NVAL;
        Ready {
            readable: fd.revents().intersects(PollFlags::IN | trouble),
            writable: fd.revents().intersects(PollFlags::OUT | trouble),
            woken: 0,
        }
    }
}

impl Ready {
    /// What an epoll event says a socket is ready for (trouble counts as both, as in
    /// [`Ready::of`]).
    fn of_epoll(flags: epoll::EventFlags) -> Ready {
        use epoll::EventFlags as E;
        let trouble = E::ERR | E::HUP;
        Ready {
            readable: flags.intersects(E::IN | E::RDHUP | trouble),
            writable: flags.intersects(E::OUT | trouble),
            woken: 0,
        }
    }
}

/// Bit `i` set for each of `wakers` (polled) that is set.
fn woken(wakers: &[PollFd<'_>]) -> u32 {
    let mut woken = 0;
    for (i, fd) in wakers.iter().enumerate() {
        if fd.revents().contains(PollFlags::IN) {
            woken |= 1 << i;
        }
    }
    woken
}

/// `poll(2)` on `fds` until something is ready or `deadline` passes, resumed if interrupted.
fn poll_until(fds: &mut [PollFd<'_>], deadline: Option<Instant>) -> io::Result<()> {
    loop {
        let timeout = match deadline {
            None => None,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                Some(Timespec::try_from(left.min(Duration::from_secs(3600))).unwrap_or_default())
            }
        };
        match poll(fds, timeout.as_ref()) {
            Ok(_) => return Ok(()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::sync::Arc;

    #[test]
    fn a_poller_says_which_sockets_are_ready_and_follows_what_they_wait_for() -> io::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let quiet = TcpStream::connect(listener.local_addr()?)?;
        let (quiet_peer, _) = listener.accept()?;
        let talking = TcpStream::connect(listener.local_addr()?)?;
        let (mut talking_peer, _) = listener.accept()?;
        talking_peer.write_all(b"x")?;
        let waker = Waker::new()?;
        let mut poller = Poller::new(&waker)?;
        let read = Interest {
            read: true,
            write: false,
        };
        let write = Interest {
            read: false,
            write: true,
        };
        let soon = || Some(Instant::now() + Duration::from_millis(50));
        let readable = |key| {
            let ready = Ready {
                readable: true,
                ..Ready::default()
            };
            vec![(key, ready)]
        };
        poller.watch(0, &quiet, read)?;
        poller.watch(7, &talking, read)?;
        let (ready, woken) = poller.wait(soon())?;
        assert_eq!(ready, readable(7));
        assert!(!woken);
        // Level-triggered: still unread, still ready; watched for nothing, not reported.
        assert_eq!(poller.wait(soon())?.0.len(), 1);
        poller.watch(7, &talking, Interest::default())?;
        let (ready, woken) = poller.wait(soon())?;
        assert!(ready.is_empty() && !woken, "{ready:?}");
        // Watched again, for writing now (an idle socket's buffer has room).
        poller.watch(0, &quiet, write)?;
        let (ready, _) = poller.wait(soon())?;
        assert!(
            ready.len() == 1 && ready[0].0 == 0 && ready[0].1.writable,
            "{ready:?}"
        );
        assert!(!ready[0].1.readable);
        // Nothing ready but the waker; forgotten sockets are not reported.
        poller.forget(0, &quiet);
        waker.wake();
        let (ready, woken) = poller.wait(soon())?;
        assert!(ready.is_empty() && woken, "{ready:?}");
        waker.reset();
        // The deadline ends a wait on nothing, not much later.
        let started = Instant::now();
        let (ready, woken) = poller.wait(Some(started + Duration::from_millis(30)))?;
        assert!(ready.is_empty() && !woken);
        assert!(started.elapsed() >= Duration::from_millis(30));
        // A peer that hangs up makes its socket readable (the read then says so).
        poller.watch(0, &quiet, read)?;
        assert!(poller.wait(soon())?.0.is_empty());
        drop(quiet_peer);
        let (ready, _) = poller.wait(soon())?;
        assert_eq!(ready, readable(0));
        drop(talking_peer);
        Ok(())
    }

    #[test]
    fn a_wake_from_another_thread_ends_a_wait_on_an_idle_socket() -> io::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let socket = TcpStream::connect(listener.local_addr()?)?;
        let waker = Arc::new(Waker::new()?);
        let other = Arc::clone(&waker);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            other.wake();
        });
        let read = Interest {
            read: true,
            write: false,
        };
        let ready = wait(&socket, read, &[&waker], None)?;
        assert_eq!(ready.woken, 1);
        assert!(!ready.readable);
        assert!(waker.is_set(), "still set until reset");
        waker.reset();
        assert!(!waker.is_set());
        t.join().unwrap();
        // With nothing to wake it, a wait ends at its deadline.
        let started = Instant::now();
        let deadline = started + Duration::from_millis(30);
        assert!(wait(&socket, read, &[&waker], Some(deadline))?.timed_out());
        assert!(started.elapsed() >= Duration::from_millis(30));
        // Data makes the socket readable.
        let (mut peer, _) = listener.accept()?;
        peer.write_all(b"x")?;
        assert!(wait(&socket, read, &[&waker], None)?.readable);
        Ok(())
    }
}
