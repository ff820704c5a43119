//! Waking a thread that waits in `poll(2)`: a [`Waker`] is an eventfd that another thread
//! writes to, and [`wait`] waits on a socket and any number of wakers at once.
//!
//! A connection's thread sleeps in [`wait`] on its socket and its waker; its outbound mailbox
//! rings the waker when it queues an item for a sleeping thread (see [`crate::mailbox`]). A
//! process-wide waker that nobody resets ends every wait at once: the stop signal.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags, Timespec};

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

/// Like [`wait`] for many sockets at once (one thread serving many connections): what each
/// socket is ready for (their `woken` is 0), and which wakers are set (bit `i` for waker `i`).
pub fn wait_many<S: AsFd>(
    sockets: &[(S, Interest)],
    wakers: &[&Waker],
    deadline: Option<Instant>,
) -> io::Result<(Vec<Ready>, u32)> {
    let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(sockets.len() + wakers.len());
    fds.extend(sockets.iter().map(|(s, i)| PollFd::new(s, i.flags())));
    fds.extend(wakers.iter().map(|w| PollFd::new(*w, PollFlags::IN)));
    poll_until(&mut fds, deadline)?;
    let (socket_fds, waker_fds) = fds.split_at(sockets.len());
    Ok((socket_fds.iter().map(Ready::of).collect(), woken(waker_fds)))
}

impl Interest {
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
    fn a_wait_on_many_sockets_says_which_are_ready() -> io::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let quiet = TcpStream::connect(listener.local_addr()?)?;
        let (_quiet_peer, _) = listener.accept()?;
        let talking = TcpStream::connect(listener.local_addr()?)?;
        let (mut talking_peer, _) = listener.accept()?;
        talking_peer.write_all(b"x")?;
        let waker = Waker::new()?;
        let read = Interest {
            read: true,
            write: false,
        };
        let deadline = Some(Instant::now() + Duration::from_secs(5));
        let (ready, woken) = wait_many(&[(&quiet, read), (&talking, read)], &[&waker], deadline)?;
        assert!(!ready[0].readable && ready[1].readable, "{ready:?}");
        assert_eq!(woken, 0);
        // Nothing ready but the waker.
        waker.wake();
        let (ready, woken) = wait_many(&[(&quiet, read)], &[&waker], deadline)?;
        assert!(ready[0].timed_out() && woken == 1, "{ready:?} {woken}");
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
