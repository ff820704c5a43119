//! Frames over one [`Stream`], both ways, owned by one thread.
//!
//! A `Channel` buffers what it has read and what it has yet to write. It serves two kinds of
//! owner:
//!
//! * request and reply on one thread (the balancer's connections, a client's balancer
//!   connection, the links between members): [`Channel::send`] and [`Channel::recv`] block
//!   (on a blocking socket, or by waiting with poll on a nonblocking one);
//! * a connection thread that must react to its socket and to other threads at once (a chat
//!   server's session, a client's server connection): the socket is nonblocking, and the
//!   thread calls [`Channel::fill`], [`Channel::frame`], [`Channel::queue`] and
//!   [`Channel::flush`] as far as they go, then waits in [`super::wait`] on the socket (for
//!   what [`Channel::interest`] says) and on its waker.
//!
//! The read buffer grows only as bytes arrive: a peer announcing a 1 MiB frame and sending one
//! byte costs the one byte (and the length is refused at once if it is over the limit).

use std::time::Instant;

use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::tls::Stream;
use super::waker::{self, Interest, Waker};
use crate::error::{Error, Result};
use crate::net::{decode, encode_into};

/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 16 * 1024;

/// Consumed bytes at the front of the read buffer past which they are dropped (the read
/// buffer itself is given back whenever it is empty).
const KEEP: usize = 64 * 1024;

/// Read buffers kept for the next channel that reads, at most.
const SPARES: usize = 16;

/// Read buffers of [`READ_CHUNK`] bytes that no channel holds.
///
/// A channel holds a read buffer only while it has bytes in it, so a connection's thread took
/// a fresh one at every wake-up (twice: the read that brings a request and the one that finds
/// nothing more), zeroed its 16 KiB, and freed it: a large allocation, before which glibc
/// sorts every small chunk freed since the last one (`malloc_consolidate`). A buffer given
/// back waits here instead, with its bytes as they are (only what a read puts in it is ever
/// looked at), for whichever channel reads next: a few serve every connection, since few read
/// at the same moment. At 10,000 msg/s on one server the zeroing and the allocator's share
/// of the connection threads' time fell from 6.0-7.6% to 5.0% (perf, two pairs; what is left
/// is mostly OpenSSL's own read buffer, which it takes and frees the same way).
struct Spares(Mutex<Vec<Vec<u8>>>);

static SPARE: Spares = Spares::new();

impl Spares {
    const fn new() -> Spares {
        Spares(Mutex::new(Vec::new()))
    }

    /// A read buffer of [`READ_CHUNK`] bytes.
    fn take(&self) -> Vec<u8> {
        self.0.lock().pop().unwrap_or_else(|| vec![0; READ_CHUNK])
    }

    /// Keeps `buf` for the next [`Spares::take`] if it has the size they give and fewer than
    /// [`SPARES`] wait (a buffer grown for a large frame goes back to the allocator).
    fn give(&self, buf: Vec<u8>) {
        if buf.len() == READ_CHUNK && buf.capacity() == READ_CHUNK {
            let mut spares = self.0.lock();
            if spares.len() < SPARES {
                spares.push(buf);
            }
        }
    }
}

/// A write buffer larger than this is given back once written out: an idle connection keeps
/// at most this much of one.
const KEEP_WRITE: usize = 4 * 1024;

/// What one [`Channel::fill`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Bytes arrived.
    Data,
    /// Nothing to read now.
    Idle,
    /// The peer closed its side.
    Closed,
}

/// Frames over a stream, with a read buffer and a write buffer.
pub struct Channel {
    stream: Stream,
    /// The read buffer: bytes `rpos..rend` are read and not yet decoded; what lies past
    /// `rend` is room for the next read (its old bytes are never looked at). Empty (no
    /// allocation) whenever nothing is buffered.
    rbuf: Vec<u8>,
    rpos: usize,
    rend: usize,
    wbuf: Vec<u8>,
    wpos: usize,
    /// What the last read needs before it can go on (TLS may need to write to read).
    read_blocked_on: Interest,
    /// What the last write needs.
    write_blocked_on: Interest,
    /// Whether the socket is in nonblocking mode (else a read or write that would block means
    /// its timeout ran out).
    nonblocking: bool,
}

impl Channel {
    /// Frames over `stream`, whose socket is put in blocking mode (see
    /// [`Channel::set_nonblocking`]).
    pub fn new(stream: Stream) -> Result<Channel> {
        stream.set_nonblocking(false)?;
        Ok(Channel {
            stream,
            rbuf: Vec::new(),
            rpos: 0,
            rend: 0,
            wbuf: Vec::new(),
            wpos: 0,
            read_blocked_on: Interest::default(),
            write_blocked_on: Interest::default(),
            nonblocking: false,
        })
    }

    /// Puts the socket in nonblocking mode (for an owner that waits with poll), or back.
    pub fn set_nonblocking(&mut self, on: bool) -> Result<()> {
        self.stream.set_nonblocking(on)?;
        self.nonblocking = on;
        Ok(())
    }

    /// The stream.
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// The range of the next complete frame's body in the read buffer, if one is complete;
    /// a frame announced longer than `max` is refused (and the connection should end).
    fn next_body(&self, max: usize) -> Result<Option<(usize, usize)>> {
        let buffered = &self.rbuf[self.rpos..self.rend];
        if buffered.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buffered[0], buffered[1], buffered[2], buffered[3]]) as usize;
        if len > max {
            return Err(Error::FrameTooLarge { len, max });
        }
        if buffered.len() < 4 + len {
            return Ok(None);
        }
        let start = self.rpos + 4;
        Ok(Some((start, start + len)))
    }

    /// Decodes the next complete frame already read, if there is one; a frame announced
    /// longer than `max` is refused (and the connection should end).
    pub fn frame<T: DeserializeOwned>(&mut self, max: usize) -> Result<Option<T>> {
        let Some((start, end)) = self.next_body(max)? else {
            return Ok(None);
        };
        let value = decode(&self.rbuf[start..end]);
        self.rpos = end;
        self.compact();
        value.map(Some)
    }

    /// Like [`Channel::frame`], the body's bytes undecoded.
    fn raw_frame(&mut self, max: usize) -> Result<Option<Vec<u8>>> {
        let Some((start, end)) = self.next_body(max)? else {
            return Ok(None);
        };
        let body = self.rbuf[start..end].to_vec();
        self.rpos = end;
        self.compact();
        Ok(Some(body))
    }

    /// Whether a complete frame (of any length) is buffered.
    pub fn has_frame(&self) -> bool {
        self.next_body(usize::MAX).ok().flatten().is_some()
    }

    fn compact(&mut self) {
        if self.rpos == self.rend {
            self.rpos = 0;
            self.rend = 0;
            SPARE.give(std::mem::take(&mut self.rbuf));
        } else if self.rpos > KEEP {
            self.rbuf.copy_within(self.rpos..self.rend, 0);
            self.rend -= self.rpos;
            self.rpos = 0;
        }
    }

    /// Bytes read and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.rend - self.rpos
    }

    /// Reads what the socket has (one read). On a blocking socket this waits for data.
    ///
    /// It reads into the end of the read buffer, which is given back whenever it is empty
    /// (to the spares: `Spares`): an idle connection holds no read buffer, and its
    /// thread's stack never holds one (a chunk on the stack stayed resident in every
    /// connection thread).
    pub fn fill(&mut self) -> Result<Fill> {
        if self.rbuf.is_empty() {
            self.rbuf = SPARE.take();
        }
        if self.rbuf.len() - self.rend < READ_CHUNK / 4 {
            self.rbuf.resize(self.rend + READ_CHUNK, 0);
        }
        let read = self.stream.read_nonblocking(&mut self.rbuf[self.rend..]);
        if let Ok(Ok(n)) = &read {
            self.rend += n;
        }
        self.compact();
        match read? {
            Ok(0) => Ok(Fill::Closed),
            Ok(_) => {
                self.read_blocked_on = Interest::default();
                Ok(Fill::Data)
            }
            Err(interest) => {
                self.read_blocked_on = interest;
                Ok(Fill::Idle)
            }
        }
    }

    /// Appends one frame to the write buffer.
    pub fn queue<T: Serialize>(&mut self, msg: &T) -> Result<()> {
        encode_into(&mut self.wbuf, msg)
    }

    /// Appends bytes that are already whole frames.
    pub fn queue_encoded(&mut self, frames: &[u8]) {
        self.wbuf.extend_from_slice(frames);
    }

    /// Bytes queued and not yet written.
    pub fn pending(&self) -> usize {
        self.wbuf.len() - self.wpos
    }

    /// Writes as much of the write buffer as the socket takes now; `true` when all of it is
    /// written. On a blocking socket this writes it all.
    pub fn flush(&mut self) -> Result<bool> {
        while self.wpos < self.wbuf.len() {
            match self.stream.write_nonblocking(&self.wbuf[self.wpos..])? {
                Ok(0) => return Err(Error::Io(std::io::ErrorKind::WriteZero.into())),
                Ok(n) => self.wpos += n,
                Err(interest) => {
                    self.write_blocked_on = interest;
                    return Ok(false);
                }
            }
        }
        self.write_blocked_on = Interest::default();
        self.wpos = 0;
        if self.wbuf.capacity() > KEEP_WRITE {
            self.wbuf = Vec::new();
        } else {
            self.wbuf.clear();
        }
        Ok(true)
    }

    /// What to wait for on the socket: reading if `want_read` (and what a blocked read needs),
    /// writing while something is queued (and what a blocked write needs). Call it right
    /// before the wait: when it asks for reading, the next read after the wait asks the kernel.
    pub fn interest(&self, want_read: bool) -> Interest {
        if want_read {
            self.stream.rearm();
        }
        let mut i = Interest {
            read: want_read,
            write: self.pending() > 0,
        };
        if want_read && self.read_blocked_on != Interest::default() {
            i.read = self.read_blocked_on.read;
            i.write |= self.read_blocked_on.write;
        }
        if self.pending() > 0 && self.write_blocked_on != Interest::default() {
            i.read |= self.write_blocked_on.read;
            i.write = self.write_blocked_on.write || !self.write_blocked_on.read;
        }
        i
    }

    /// Sends one frame and waits until it is written (waiting with poll if the socket is
    /// nonblocking).
    pub fn send<T: Serialize>(&mut self, msg: &T) -> Result<()> {
        self.queue(msg)?;
        if self.flush_until(None)? {
            Ok(())
        } else {
            Err(Error::Io(std::io::ErrorKind::TimedOut.into()))
        }
    }

    /// Like [`Channel::send`], giving up at `deadline` (a nonblocking socket: a peer that
    /// does not read cannot hold the thread).
    pub fn send_before<T: Serialize>(&mut self, msg: &T, deadline: Instant) -> Result<()> {
        self.queue(msg)?;
        if self.flush_until(Some(deadline))? {
            Ok(())
        } else {
            Err(Error::Io(std::io::ErrorKind::TimedOut.into()))
        }
    }

    /// Writes everything queued, waiting for the socket until `deadline`; `false` if the
    /// deadline passed first.
    pub fn flush_before(&mut self, deadline: Instant) -> Result<bool> {
        self.flush_until(Some(deadline))
    }

    fn flush_until(&mut self, deadline: Option<Instant>) -> Result<bool> {
        while !self.flush()? {
            if !self.nonblocking || deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(false);
            }
            waker::wait(self.stream.tcp(), self.interest(false), &[], deadline)?;
        }
        Ok(true)
    }

    /// Waits (on a nonblocking socket) until something has been read, or the peer closed, or
    /// `deadline` passes: `false` then.
    pub fn wait_for_data(&mut self, deadline: Instant) -> Result<bool> {
        loop {
            if self.buffered() > 0 {
                return Ok(true);
            }
            match self.fill()? {
                Fill::Data | Fill::Closed => return Ok(true),
                Fill::Idle if !self.nonblocking => return Ok(false),
                Fill::Idle => {}
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            let interest = self.interest(true);
            waker::wait(self.stream.tcp(), interest, &[], Some(deadline))?;
        }
    }

    /// Waits for the next frame; `Ok(None)` on a clean close between frames. On a blocking
    /// socket the socket's read timeout applies.
    pub fn recv<T: DeserializeOwned>(&mut self, max: usize) -> Result<Option<T>> {
        self.recv_until(max, None, None)
    }

    /// Like [`Channel::recv`], but the whole frame must arrive before `deadline` (each wait
    /// gets only the time left, so trickling bytes does not help), and a set `stop` waker ends
    /// the wait. The deadline and waker apply only to a nonblocking socket.
    pub fn recv_until<T: DeserializeOwned>(
        &mut self,
        max: usize,
        deadline: Option<Instant>,
        stop: Option<&Waker>,
    ) -> Result<Option<T>> {
        match self.recv_raw_until(max, deadline, stop)? {
            Some(body) => decode(&body).map(Some),
            None => Ok(None),
        }
    }

    /// Like [`Channel::recv_until`], returning the frame's body undecoded.
    pub fn recv_raw_until(
        &mut self,
        max: usize,
        deadline: Option<Instant>,
        stop: Option<&Waker>,
    ) -> Result<Option<Vec<u8>>> {
        loop {
            if let Some(body) = self.raw_frame(max)? {
                return Ok(Some(body));
            }
            match self.fill()? {
                Fill::Data => continue,
                Fill::Closed if self.buffered() == 0 => return Ok(None),
                Fill::Closed => return Err(Error::Io(std::io::ErrorKind::UnexpectedEof.into())),
                Fill::Idle if !self.nonblocking => {
                    // A blocking socket's read timeout ran out.
                    return Err(Error::Io(std::io::ErrorKind::TimedOut.into()));
                }
                Fill::Idle => {}
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(Error::Io(std::io::ErrorKind::TimedOut.into()));
            }
            let wakers: Vec<&Waker> = stop.into_iter().collect();
            let ready = waker::wait(self.stream.tcp(), self.interest(true), &wakers, deadline)?;
            if ready.woken != 0 {
                return Err(Error::Io(std::io::Error::new(
                    std::io::ErrorKind::Interrupted,
                    "stopping",
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::{Greeting, Request, ServerRequest, MAX_FRAME};
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    fn pair() -> Result<(Channel, TcpStream)> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let client = TcpStream::connect(listener.local_addr()?)?;
        let (server, _) = listener.accept()?;
        let mut ch = Channel::new(Stream::plain(server))?;
        ch.set_nonblocking(true)?;
        Ok((ch, client))
    }

    /// `n` encoded `Who` requests, numbered from 0.
    fn who_frames(n: u64) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        for id in 0..n {
            let who = Request {
                id,
                body: ServerRequest::Who,
            };
            encode_into(&mut bytes, &who)?;
        }
        Ok(bytes)
    }

    /// An idle connection holds no read buffer and at most a small write buffer, however much
    /// went through it.
    #[test]
    fn an_idle_channel_gives_its_buffers_back() -> Result<()> {
        let (mut ch, mut peer) = pair()?;
        let bytes = who_frames(200)?;
        peer.write_all(&bytes)?;
        let deadline = Some(Instant::now() + Duration::from_secs(10));
        for id in 0..200 {
            let r: Request<ServerRequest> = ch.recv_until(MAX_FRAME, deadline, None)?.unwrap();
            assert_eq!(r.id, id);
        }
        assert_eq!(
            ch.rbuf.capacity(),
            0,
            "the read buffer went back once empty"
        );
        for _ in 0..200 {
            ch.queue_encoded(&bytes);
        }
        assert!(ch.wbuf.capacity() > KEEP_WRITE);
        ch.set_nonblocking(false)?;
        let reader = std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut peer, &mut sink);
        });
        assert!(ch.flush()?);
        assert!(
            ch.wbuf.capacity() <= KEEP_WRITE,
            "the write buffer went back once written"
        );
        drop(ch);
        reader.join().expect("the reader");
        Ok(())
    }

    #[test]
    fn spare_read_buffers_are_kept_only_of_one_size_and_only_a_few() {
        let spares = Spares::new();
        let first = spares.take();
        assert_eq!(first.len(), READ_CHUNK);
        let at = first.as_ptr();
        spares.give(first);
        let again = spares.take();
        assert_eq!(
            again.as_ptr(),
            at,
            "the buffer given back is the next one taken"
        );
        let mut grown = again;
        grown.resize(2 * READ_CHUNK, 0);
        spares.give(grown);
        assert_eq!(
            spares.0.lock().len(),
            0,
            "a grown buffer goes back to the allocator"
        );
        for _ in 0..SPARES + 3 {
            spares.give(vec![0; READ_CHUNK]);
        }
        assert_eq!(spares.0.lock().len(), SPARES);
    }

    /// Frames larger than a read, frames cut across reads and bytes left behind a large
    /// frame all arrive whole, on channel after channel reading into the same reused buffers
    /// (each holding the last one's bytes when it gets them).
    #[test]
    fn frames_of_every_size_arrive_whole_through_reused_read_buffers() -> Result<()> {
        let sizes = [
            10,
            3 * READ_CHUNK + 7,
            5,
            KEEP + 100,
            1,
            READ_CHUNK,
            0,
            20_000,
        ];
        let body = |i: usize, len: usize| -> Vec<u8> {
            (0..len).map(|j| (i * 31 + j * 7) as u8).collect()
        };
        let mut bytes = Vec::new();
        for (i, &len) in sizes.iter().enumerate() {
            bytes.extend_from_slice(&(len as u32).to_be_bytes());
            bytes.extend_from_slice(&body(i, len));
        }
        for _ in 0..3 {
            let (mut ch, mut peer) = pair()?;
            let sent = bytes.clone();
            let writer = std::thread::spawn(move || {
                // In pieces of odd sizes, so that frames and reads never line up.
                for piece in sent.chunks(5_000 - 3) {
                    peer.write_all(piece)?;
                }
                Ok::<_, std::io::Error>(peer)
            });
            let deadline = Some(Instant::now() + Duration::from_secs(10));
            for (i, &len) in sizes.iter().enumerate() {
                let got = ch.recv_raw_until(4 * KEEP, deadline, None)?;
                assert_eq!(got, Some(body(i, len)), "frame {i} of {len} bytes");
            }
            assert_eq!(ch.buffered(), 0);
            assert_eq!(
                ch.rbuf.capacity(),
                0,
                "the read buffer went back once empty"
            );
            drop(writer.join().expect("the writer")?);
        }
        Ok(())
    }

    #[test]
    fn frames_arrive_whole_however_the_bytes_are_cut() -> Result<()> {
        let (mut ch, mut peer) = pair()?;
        let bytes = who_frames(3)?;
        for b in &bytes {
            peer.write_all(&[*b])?;
        }
        let deadline = Some(Instant::now() + Duration::from_secs(10));
        for id in 0..3 {
            let r: Request<ServerRequest> = ch.recv_until(MAX_FRAME, deadline, None)?.unwrap();
            assert_eq!(r.id, id);
        }
        drop(peer);
        let end: Option<Request<ServerRequest>> = ch.recv_until(MAX_FRAME, deadline, None)?;
        assert!(end.is_none(), "a clean close between frames");
        Ok(())
    }

    fn who(id: u64) -> Vec<u8> {
        let mut bytes = Vec::new();
        encode_into(
            &mut bytes,
            &Request {
                id,
                body: ServerRequest::Who,
            },
        )
        .unwrap();
        bytes
    }

    /// Reads every frame that arrives within a few seconds, the way a connection's thread
    /// does: read until idle, then wait in poll.
    fn ids_until(ch: &mut Channel, want: usize) -> Result<Vec<u64>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut ids = Vec::new();
        while ids.len() < want && Instant::now() < deadline {
            while let Some(r) = ch.frame::<Request<ServerRequest>>(MAX_FRAME)? {
                ids.push(r.id);
            }
            if ids.len() == want {
                break;
            }
            if ch.fill()? == Fill::Idle {
                let interest = ch.interest(true);
                waker::wait(ch.stream().tcp(), interest, &[], Some(deadline))?;
            }
        }
        Ok(ids)
    }

    #[test]
    fn a_short_read_skips_the_empty_read_and_misses_nothing() -> Result<()> {
        let (mut ch, mut peer) = pair()?;
        peer.write_all(&who(1))?;
        assert_eq!(ids_until(&mut ch, 1)?, [1]);
        // The last read came back short: the next one says "idle" without asking the kernel,
        // even though more has arrived since...
        peer.write_all(&who(2))?;
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(ch.fill()?, Fill::Idle);
        // ...and the wait that follows sees it at once.
        let interest = ch.interest(true);
        let ready = waker::wait(ch.stream().tcp(), interest, &[], None)?;
        assert!(ready.readable);
        assert_eq!(ids_until(&mut ch, 1)?, [2]);
        Ok(())
    }

    #[test]
    fn tls_records_read_ahead_are_all_delivered_before_a_wait() -> Result<()> {
        use crate::transport::pki::{self, Member, Role};
        use crate::transport::{Expect, Transport};
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("tls");
        let member = Member {
            role: Role::Server,
            name: "server-1".into(),
        };
        pki::init(&dir, &[member])?;
        let server = Transport::member(&dir, "server-1")?;
        let client = Transport::client_with_ca(&dir.join("ca.pem"))?;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        let accepting = std::thread::spawn(move || -> Result<Channel> {
            let (tcp, _) = listener.accept()?;
            let stream = server.accept(tcp, Instant::now() + Duration::from_secs(10), None)?;
            let mut ch = Channel::new(stream)?;
            ch.set_nonblocking(true)?;
            Ok(ch)
        });
        let mut peer = client.connect(&addr, "server", &Expect::Server(Some("server-1".into())))?;
        let mut ch = accepting.join().expect("accept thread")?;
        // Three records back to back: the first read takes all of them (read-ahead).
        for id in 1..=3 {
            peer.write_all(&who(id))?;
        }
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(ids_until(&mut ch, 3)?, [1, 2, 3]);
        peer.write_all(&who(4))?;
        assert_eq!(ids_until(&mut ch, 1)?, [4]);
        Ok(())
    }

    #[test]
    fn an_announced_length_over_the_limit_is_refused_without_waiting_for_it() -> Result<()> {
        let (mut ch, mut peer) = pair()?;
        peer.write_all(&(1u32 << 20).to_be_bytes())?;
        peer.write_all(b"x")?;
        let deadline = Some(Instant::now() + Duration::from_secs(10));
        match ch.recv_until::<Greeting>(1024, deadline, None) {
            Err(Error::FrameTooLarge { len, max }) => assert_eq!((len, max), (1 << 20, 1024)),
            other => panic!("expected FrameTooLarge, got {:?}", other.map(|_| ())),
        }
        assert!(ch.buffered() < 16, "only what arrived is held");
        Ok(())
    }

    #[test]
    fn a_frame_must_arrive_before_its_deadline() -> Result<()> {
        let (mut ch, mut peer) = pair()?;
        peer.write_all(&[0, 0, 0, 9, 1])?;
        let deadline = Instant::now() + Duration::from_millis(50);
        let err = ch
            .recv_until::<Greeting>(1024, Some(deadline), None)
            .map(|_| ())
            .expect_err("timed out");
        assert!(err.is_disconnect(), "{err}");
        assert!(Instant::now() >= deadline);
        // A set waker ends the wait at once.
        let stop = Waker::new()?;
        stop.wake();
        let far = Some(Instant::now() + Duration::from_secs(60));
        assert!(ch.recv_until::<Greeting>(1024, far, Some(&stop)).is_err());
        Ok(())
    }
}
