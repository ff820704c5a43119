//! TLS 1.3 on every link, with the cluster's own certificate authority.
//!
//! * Members (the balancer, each chat server) hold a certificate of the cluster CA
//!   ([`super::pki`]). They present it when they accept connections and when they connect to
//!   each other, and they verify each other's: mutual TLS, so no shared secret ever crosses
//!   the wire. A connection between members is refused during the handshake unless both
//!   certificates chain to the cluster CA; then the role and name in the certificate say who
//!   the peer is.
//! * Clients have no certificate. They verify the balancer's and servers' certificates against
//!   the cluster CA: one given to them (`--ca`), or the one the balancer showed the first time,
//!   pinned in `FASTCHAT_HOME/clusters/` (trust on first use), with a loud refusal when it
//!   changes.
//! * `--insecure-plaintext` turns TLS off, for teaching; every binary warns about it when it
//!   starts.
//!
//! Every connection's TLS session belongs to one thread: see [`super`] for the thread model.

use std::fs;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openssl::pkey::{PKey, Private};
use openssl::ssl::{
    ErrorCode as SslErrorCode, Ssl, SslAcceptor, SslContext, SslContextBuilder, SslMethod, SslMode,
    SslOptions, SslSessionCacheMode, SslStream, SslVerifyMode, SslVersion,
};
use openssl::stack::{Stack, StackRef};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::{X509StoreContext, X509};
use parking_lot::Mutex;

use super::pki::{self, Member, Role};
use super::waker::{self, Interest, Waker};
use super::{dial, CONNECT_TIMEOUT};
use crate::error::{Error, Result};

/// The label of the keying material both ends of a TLS connection derive for channel binding
/// (RFC 5705): a session token is proven by a signature over it, so it cannot be replayed on
/// another connection.
const BINDING_LABEL: &str = "EXPORTER-fastchat-session-binding";

/// The TCP socket under a [`Stream`].
///
/// In nonblocking mode a read that came back short (the kernel had nothing more at that
/// moment) makes the next read answer "would block" without a system call: its owner then
/// waits in poll, which returns at once if more has arrived since (poll is level-triggered,
/// and [`Socket::rearm`] is called before a wait for reading). That saves the read that
/// finds nothing on every wake-up; with TLS, which reads ahead, it is also how a record
/// already buffered inside OpenSSL is taken without asking the kernel.
#[derive(Debug)]
pub struct Socket {
    /// Shared only with what polls the socket from outside the stream's lock
    /// ([`Stream::shared_tcp`]); all reading and writing goes through the stream.
    tcp: Arc<TcpStream>,
    nonblocking: AtomicBool,
    drained: AtomicBool,
}

impl Socket {
    /// `tcp`, in blocking mode until [`Stream::set_nonblocking`].
    pub fn new(tcp: TcpStream) -> Socket {
        Socket {
            tcp: Arc::new(tcp),
            nonblocking: AtomicBool::new(false),
            drained: AtomicBool::new(false),
        }
    }

    /// The next read asks the kernel (its owner is about to wait until the socket is
    /// readable, or just did).
    pub fn rearm(&self) {
        self.drained.store(false, Ordering::Relaxed);
    }

    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        self.tcp.set_nonblocking(on)?;
        self.nonblocking.store(on, Ordering::Relaxed);
        self.rearm();
        Ok(())
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if *self.drained.get_mut() {
            *self.drained.get_mut() = false;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = (&*self.tcp).read(buf)?;
        *self.drained.get_mut() = *self.nonblocking.get_mut() && n > 0 && n < buf.len();
        Ok(n)
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self.tcp).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&*self.tcp).flush()
    }
}

/// A connection's byte stream: TCP, with or without TLS.
pub enum Stream {
    /// No encryption (`--insecure-plaintext`).
    Plain(Socket),
    /// TLS 1.3.
    Tls(Box<SslStream<Socket>>),
}

impl Stream {
    /// A stream without encryption over `tcp`.
    pub fn plain(tcp: TcpStream) -> Stream {
        Stream::Plain(Socket::new(tcp))
    }

    fn socket(&self) -> &Socket {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref(),
        }
    }

    /// The TCP socket under the stream (for timeouts, shutdown and polling).
    pub fn tcp(&self) -> &TcpStream {
        &self.socket().tcp
    }

    /// The TCP socket, for a thread that polls it while another may hold the stream (the same
    /// descriptor, not a duplicate; closed when the stream and every such handle are gone).
    pub fn shared_tcp(&self) -> Arc<TcpStream> {
        Arc::clone(&self.socket().tcp)
    }

    /// Puts the socket in nonblocking mode, or back.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        self.socket().set_nonblocking(on)
    }

    /// The next read asks the kernel (see [`Socket`]).
    pub fn rearm(&self) {
        self.socket().rearm();
    }

    /// Whether the stream is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// The cluster member at the other end, as its certificate (verified against the cluster
    /// CA during the handshake) says; `None` without TLS or without a certificate.
    pub fn peer(&self) -> Option<Member> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(s) => pki::member_of(&s.ssl().peer_certificate()?),
        }
    }

    /// 32 bytes that both ends of this TLS connection, and nobody else, can compute: what a
    /// session-token proof signs. `None` without TLS.
    pub fn binding(&self) -> Option<[u8; 32]> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(s) => {
                let mut out = [0u8; 32];
                s.ssl()
                    .export_keying_material(&mut out, BINDING_LABEL, None)
                    .ok()?;
                Some(out)
            }
        }
    }

    /// Shuts the socket down both ways (the thread that owns the stream then sees the end).
    pub fn shutdown(&self) {
        let _ = self.tcp().shutdown(std::net::Shutdown::Both);
    }

    /// Says that nothing more will be written (TLS close_notify, then a TCP half-close), while
    /// what the peer still sends can be read.
    pub fn close_write(&mut self) {
        if let Stream::Tls(s) = self {
            let _ = s.shutdown();
        }
        let _ = self.tcp().shutdown(std::net::Shutdown::Write);
    }

    /// Reads, telling what a TLS read needs when it cannot go on: `Ok(Err(interest))` when it
    /// would block, with what to wait for. `Ok(Ok(0))` is the end of the stream.
    pub fn read_nonblocking(
        &mut self,
        buf: &mut [u8],
    ) -> io::Result<std::result::Result<usize, Interest>> {
        match self {
            Stream::Plain(s) => match s.read(buf) {
                Ok(n) => Ok(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Err(READ)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Err(READ)),
                Err(e) => Err(e),
            },
            Stream::Tls(s) => match s.ssl_read(buf) {
                Ok(n) => Ok(Ok(n)),
                Err(e) => ssl_outcome(e).map(|r| r.map(|()| 0)),
            },
        }
    }

    /// Writes, like [`Stream::read_nonblocking`].
    pub fn write_nonblocking(
        &mut self,
        buf: &[u8],
    ) -> io::Result<std::result::Result<usize, Interest>> {
        match self {
            Stream::Plain(s) => match s.write(buf) {
                Ok(n) => Ok(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Err(WRITE)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Err(WRITE)),
                Err(e) => Err(e),
            },
            Stream::Tls(s) => match s.ssl_write(buf) {
                Ok(n) => Ok(Ok(n)),
                Err(e) => match ssl_outcome(e)? {
                    Ok(()) => Err(io::ErrorKind::BrokenPipe.into()),
                    Err(i) => Ok(Err(i)),
                },
            },
        }
    }
}

const READ: Interest = Interest {
    read: true,
    write: false,
};
const WRITE: Interest = Interest {
    read: false,
    write: true,
};

/// What a failed TLS read or write means: `Ok(Ok(()))` the peer closed; `Ok(Err(interest))`
/// it would block until the socket is ready for `interest`; `Err` a real error.
fn ssl_outcome(e: openssl::ssl::Error) -> io::Result<std::result::Result<(), Interest>> {
    match e.code() {
        SslErrorCode::ZERO_RETURN => Ok(Ok(())),
        SslErrorCode::WANT_READ => Ok(Err(READ)),
        SslErrorCode::WANT_WRITE => Ok(Err(WRITE)),
        SslErrorCode::SYSCALL if e.io_error().is_none() => Ok(Ok(())),
        _ => match e.into_io_error() {
            Ok(io) if io.kind() == io::ErrorKind::WouldBlock => Ok(Err(READ)),
            Ok(io) => Err(io),
            Err(e) => Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
        },
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.tcp().as_fd()
    }
}

/// Whom a connection is expected to reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// The balancer.
    Balancer,
    /// A chat server; with a name, that one.
    Server(Option<String>),
}

impl Expect {
    fn check(&self, peer: Option<&Member>, addr: &str) -> Result<()> {
        let ok = match (self, peer) {
            (Expect::Balancer, Some(m)) => m.role == Role::Balancer,
            (Expect::Server(None), Some(m)) => m.role == Role::Server,
            (Expect::Server(Some(name)), Some(m)) => m.role == Role::Server && &m.name == name,
            (_, None) => false,
        };
        if ok {
            return Ok(());
        }
        let wanted = match self {
            Expect::Balancer => "the cluster's balancer".to_string(),
            Expect::Server(None) => "a chat server of the cluster".to_string(),
            Expect::Server(Some(n)) => format!("chat server {n}"),
        };
        let found = match peer {
            Some(m) => format!("{} {}", m.role, m.name),
            None => "no member certificate".to_string(),
        };
        Err(Error::Integrity(format!(
            "{addr} is not {wanted}: its certificate says {found}"
        )))
    }
}

/// How this process speaks on the network: TLS with the cluster's certificates, or plaintext.
/// Cheap to clone.
#[derive(Clone)]
pub struct Transport(Option<Arc<Tls>>);

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            None => f.write_str("Transport(plaintext)"),
            Some(tls) => match &tls.member {
                Some(m) => write!(f, "Transport(TLS as {} {})", m.role, m.name),
                None => f.write_str("Transport(TLS client)"),
            },
        }
    }
}

/// A process's TLS settings.
struct Tls {
    /// This process's certificate (members); clients have none and do not accept.
    member: Option<Member>,
    acceptor: Option<SslAcceptor>,
    /// For members: verifies the peer against the CA and presents our certificate. For
    /// clients: built without verification, which [`Tls::verify_server`] does by hand so that
    /// it can learn (and pin) the CA on first use, and explain a mismatch.
    connector: SslContext,
    /// The cluster CA, once known.
    ca: Mutex<Option<X509>>,
    /// Where a client pins the CA it learned, when none was given.
    pin: Option<PathBuf>,
}

fn context_defaults(ctx: &mut openssl::ssl::SslContextBuilder) -> Result<()> {
    ctx.set_min_proto_version(Some(SslVersion::TLS1_3))?;
    // No resumption (every connection is authenticated in full), so no tickets to write
    // after the handshake; idle connections give back their record buffers; a peer that
    // closes without close_notify is an ordinary end of stream.
    ctx.set_num_tickets(0)?;
    ctx.set_session_cache_mode(SslSessionCacheMode::OFF);
    ctx.set_mode(SslMode::RELEASE_BUFFERS);
    // Read as much as the kernel has, not one record header and then one record: fewer
    // system calls per wake-up (see `Socket`).
    ctx.set_read_ahead(true);
    ctx.set_options(SslOptions::IGNORE_UNEXPECTED_EOF | SslOptions::NO_TICKET);
    Ok(())
}

impl Transport {
    /// No TLS at all: for teaching on a trusted machine only.
    pub fn plaintext() -> Transport {
        Transport(None)
    }

    /// A cluster member: `name`'s certificate and key, and the CA, from the cluster folder
    /// `dir` (see [`pki`]).
    pub fn member(dir: &Path, name: &str) -> Result<Transport> {
        let id = pki::load_identity(dir, name)?;
        let mut acceptor = SslAcceptor::mozilla_modern_v5(SslMethod::tls_server())?;
        context_defaults(&mut acceptor)?;
        acceptor.set_private_key(&id.key)?;
        acceptor.set_certificate(&id.cert)?;
        // The CA goes with our certificate, so a client can pin it on first use.
        acceptor.add_extra_chain_cert(id.ca.clone())?;
        acceptor.check_private_key()?;
        // Ask for a certificate (members have one, clients do not); one that is presented
        // must chain to the cluster CA (and nothing else), or the handshake fails.
        acceptor.set_cert_store(only(&id.ca)?);
        acceptor.set_verify(SslVerifyMode::PEER);
        let connector = member_connector(&id.ca, &id.cert, &id.key)?;
        Ok(Transport(Some(Arc::new(Tls {
            member: Some(id.member),
            acceptor: Some(acceptor.build()),
            connector,
            ca: Mutex::new(Some(id.ca)),
            pin: None,
        }))))
    }

    /// A client that trusts the CA in the PEM file `ca`.
    pub fn client_with_ca(ca: &Path) -> Result<Transport> {
        let ca = pki::load_cert(ca)?;
        Transport::client(Some(ca), None)
    }

    /// A client that trusts the CA pinned in `pin`, or, if there is none yet, the one the
    /// first server it reaches presents (which is then pinned there).
    pub fn client_pinned(pin: PathBuf) -> Result<Transport> {
        let ca = if pin.exists() {
            Some(pki::load_cert(&pin)?)
        } else {
            None
        };
        Transport::client(ca, Some(pin))
    }

    fn client(ca: Option<X509>, pin: Option<PathBuf>) -> Result<Transport> {
        let mut b = connector_context()?;
        // Verified by hand against the cluster CA only (see `verify_server`).
        b.set_verify(SslVerifyMode::NONE);
        Ok(Transport(Some(Arc::new(Tls {
            member: None,
            acceptor: None,
            connector: b.build(),
            ca: Mutex::new(ca),
            pin,
        }))))
    }

    /// Whether connections are encrypted.
    pub fn is_tls(&self) -> bool {
        self.0.is_some()
    }

    /// This process's own name in the cluster (members only).
    pub fn me(&self) -> Option<&Member> {
        self.0.as_ref()?.member.as_ref()
    }

    /// Connects to `addr` (`what` names it in errors) and checks that the other end is who
    /// `expect` says (with TLS).
    pub fn connect(&self, addr: &str, what: &str, expect: &Expect) -> Result<Stream> {
        let tcp = dial(addr, what)?;
        let Some(tls) = &self.0 else {
            return Ok(Stream::plain(tcp));
        };
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let tcp = Socket::new(tcp);
        tcp.set_nonblocking(true)?;
        // No host name is checked and none is sent: the peer's certificate is checked
        // against the cluster CA and `expect` instead.
        let ssl = Ssl::new(&tls.connector)?;
        let mut s = SslStream::new(ssl, tcp)?;
        handshake(&mut s, deadline, None, |s| s.connect()).map_err(|e| match e {
            Error::Io(io) => Error::Unreachable {
                what: format!("{what} at {addr}"),
                source: io,
            },
            Error::Protocol(why) => not_fastchat(addr, &why),
            other => other,
        })?;
        let stream = Stream::Tls(Box::new(s));
        stream.set_nonblocking(false)?;
        let first_contact = match tls.member {
            None => tls.verify_server(&stream, addr)?,
            Some(_) => None,
        };
        expect.check(stream.peer().as_ref(), addr)?;
        // Pinned only once the other end proved to be what was asked for: a mistyped
        // address (another service that speaks TLS) leaves nothing behind.
        if let Some(root) = first_contact {
            tls.pin(root, addr)?;
        }
        Ok(stream)
    }

    /// The server side of a new connection: the TLS handshake, which must end before
    /// `deadline` (a peer cannot stretch it out), or as soon as `stop` is set. The stream is
    /// left in nonblocking mode.
    pub fn accept(
        &self,
        tcp: TcpStream,
        deadline: Instant,
        stop: Option<&Waker>,
    ) -> Result<Stream> {
        let tcp = Socket::new(tcp);
        tcp.set_nonblocking(true)?;
        let Some(tls) = &self.0 else {
            return Ok(Stream::Plain(tcp));
        };
        let acceptor = tls
            .acceptor
            .as_ref()
            .ok_or_else(|| Error::Invalid("a client cannot accept connections".into()))?;
        let ssl = Ssl::new(acceptor.context())?;
        let mut s = SslStream::new(ssl, tcp)?;
        handshake(&mut s, deadline, stop, |s| s.accept())?;
        Ok(Stream::Tls(Box::new(s)))
    }
}

/// A store that trusts `ca` and nothing else: not the system's public CAs.
fn only(ca: &X509) -> Result<openssl::x509::store::X509Store> {
    let mut store = X509StoreBuilder::new()?;
    store.add_cert(ca.clone())?;
    Ok(store.build())
}

/// The connector of a member: verifies the peer against the cluster CA only, presents our
/// certificate.
fn member_connector(ca: &X509, cert: &X509, key: &PKey<Private>) -> Result<SslContext> {
    let mut b = connector_context()?;
    b.set_cert_store(only(ca)?);
    b.set_verify(SslVerifyMode::PEER);
    b.set_certificate(cert)?;
    b.set_private_key(key)?;
    b.check_private_key()?;
    Ok(b.build())
}

/// The client side's context: what `SslConnector::builder` sets up, but without the system's
/// CA bundle, which it parses on every start (some 40 ms per `fastchat` command, for public
/// CAs that fastchat never trusts).
fn connector_context() -> Result<SslContextBuilder> {
    let mut b = SslContextBuilder::new(SslMethod::tls_client())?;
    b.set_options(SslOptions::ALL | SslOptions::NO_COMPRESSION);
    b.set_mode(
        SslMode::AUTO_RETRY | SslMode::ACCEPT_MOVING_WRITE_BUFFER | SslMode::ENABLE_PARTIAL_WRITE,
    );
    context_defaults(&mut b)?;
    Ok(b)
}

/// Drives a nonblocking handshake (`step`: connect or accept) to its end, waiting with poll
/// for what it needs, until `deadline` or `stop`.
fn handshake(
    s: &mut SslStream<Socket>,
    deadline: Instant,
    stop: Option<&Waker>,
    mut step: impl FnMut(&mut SslStream<Socket>) -> std::result::Result<(), openssl::ssl::Error>,
) -> Result<()> {
    loop {
        let interest = match step(s) {
            Ok(()) => return Ok(()),
            Err(e) => match e.code() {
                SslErrorCode::WANT_READ => READ,
                SslErrorCode::WANT_WRITE => WRITE,
                _ => return Err(handshake_error(e)),
            },
        };
        if Instant::now() >= deadline {
            return Err(Error::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                "the TLS handshake took too long",
            )));
        }
        let wakers: Vec<&Waker> = stop.into_iter().collect();
        s.get_ref().rearm();
        let ready = waker::wait(&s.get_ref().tcp, interest, &wakers, Some(deadline))?;
        if ready.woken != 0 {
            return Err(Error::Io(io::Error::new(
                io::ErrorKind::Interrupted,
                "stopping",
            )));
        }
    }
}

/// What a client is told when the other end of `addr` is not a fastchat balancer or server
/// (`why`: what gave it away).
pub fn not_fastchat(addr: &str, why: &str) -> Error {
    Error::Protocol(format!("not a fastchat server at {addr}: {why}"))
}

fn handshake_error(e: openssl::ssl::Error) -> Error {
    if let Some(io) = e.io_error() {
        return Error::Io(io::Error::new(io.kind(), io.to_string()));
    }
    let detail = e
        .ssl_error()
        .map(|stack| stack.to_string())
        .unwrap_or_else(|| e.to_string());
    if detail.contains("wrong version number") || detail.contains("record layer failure") {
        return Error::Protocol(
            "it does not speak TLS (another program, or a cluster running with \
             --insecure-plaintext)"
                .into(),
        );
    }
    if detail.contains("certificate") {
        return Error::Integrity(format!("TLS handshake refused: {detail}"));
    }
    Error::Protocol(format!("TLS handshake failed: {detail}"))
}

impl Tls {
    /// A client's check of a server's certificate chain: against the known CA; or, if none is
    /// known yet, against the root the server presented, which is returned to be pinned (see
    /// [`Tls::pin`]) once the other end has shown it is what the client asked for.
    fn verify_server(&self, stream: &Stream, addr: &str) -> Result<Option<X509>> {
        let Stream::Tls(s) = stream else {
            return Ok(None);
        };
        let ssl = s.ssl();
        let leaf = ssl
            .peer_certificate()
            .ok_or_else(|| Error::Integrity(format!("{addr} presented no certificate")))?;
        let empty = Stack::new()?;
        let chain: &StackRef<X509> = ssl.peer_cert_chain().unwrap_or(&empty);
        let known = self.ca.lock();
        match known.as_ref() {
            Some(ca) => {
                if chains_to(ca, &leaf, chain)? {
                    return Ok(None);
                }
                let presented = presented_root(chain)
                    .map(|r| pki::fingerprint(&r))
                    .transpose()?
                    .unwrap_or_else(|| "none".into());
                let pinned_where = match &self.pin {
                    Some(p) => format!(
                        "; if the cluster was really set up again, delete {} and try again",
                        p.display()
                    ),
                    None => String::new(),
                };
                Err(Error::Integrity(format!(
                    "WARNING: {addr} presents a certificate that the cluster's certificate \
                     authority did not sign (trusted {}, presented {presented}). Someone may be \
                     intercepting the connection. Refusing to continue{pinned_where}",
                    pki::fingerprint(ca)?
                )))
            }
            None => {
                if self.pin.is_none() {
                    return Err(Error::Integrity("no certificate authority to check".into()));
                }
                let root = presented_root(chain).ok_or_else(|| {
                    Error::Integrity(format!(
                        "{addr} did not present its certificate authority, so it cannot be \
                         trusted on first use; give its CA file with --ca"
                    ))
                })?;
                if !chains_to(&root, &leaf, chain)? {
                    return Err(Error::Integrity(format!(
                        "{addr} presented a certificate chain that does not verify"
                    )));
                }
                Ok(Some(root))
            }
        }
    }

    /// Trusts `root` from now on (first contact: see [`Tls::verify_server`]), unless another
    /// connection pinned a root meanwhile, which `root` must then be.
    fn pin(&self, root: X509, addr: &str) -> Result<()> {
        let mut known = self.ca.lock();
        if let Some(ca) = known.as_ref() {
            if ca.to_der()? == root.to_der()? {
                return Ok(());
            }
            return Err(Error::Integrity(format!(
                "WARNING: {addr} presents another certificate authority ({}) than the one \
                 just trusted ({}). Someone may be intercepting the connection. Refusing to \
                 continue",
                pki::fingerprint(&root)?,
                pki::fingerprint(ca)?
            )));
        }
        let Some(pin) = &self.pin else {
            return Err(Error::Integrity("no certificate authority to check".into()));
        };
        write_pin(pin, &root)?;
        eprintln!(
            "fastchat: first contact with the cluster at {addr}: trusting its certificate \
             authority {} from now on (pinned in {})",
            pki::fingerprint(&root)?,
            pin.display()
        );
        *known = Some(root);
        Ok(())
    }
}

/// Whether `leaf` (with the intermediate `chain`) verifies against `ca` as the only trusted
/// root: signatures, validity dates, and the CA's constraints.
fn chains_to(ca: &X509, leaf: &X509, chain: &StackRef<X509>) -> Result<bool> {
    let mut store = X509StoreBuilder::new()?;
    store.add_cert(ca.clone())?;
    let store = store.build();
    let mut untrusted = Stack::new()?;
    for c in chain {
        untrusted.push(c.to_owned())?;
    }
    let mut ctx = X509StoreContext::new()?;
    Ok(ctx.init(&store, leaf, &untrusted, |c| c.verify_cert())?)
}

/// The self-signed certificate at the end of a presented chain, if any.
fn presented_root(chain: &StackRef<X509>) -> Option<X509> {
    chain
        .iter()
        .rev()
        .find(|c| c.public_key().and_then(|k| c.verify(&k)).unwrap_or(false))
        .map(|c| c.to_owned())
}

/// Pins a CA: its PEM in `path` (0600, in a 0700 folder).
fn write_pin(path: &Path, ca: &X509) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)
            .map_err(|e| Error::Local(format!("cannot create {}: {e}", dir.display())))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| Error::Local(format!("cannot write {}: {e}", tmp.display())))?;
    f.write_all(&ca.to_pem()?)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    Ok(())
}

/// Where a client pins the CA of the cluster whose balancer is at `balancer`, under `home`.
pub fn pin_path(home: &Path, balancer: &str) -> PathBuf {
    let safe: String = balancer
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    home.join("clusters").join(format!("{safe}.pem"))
}

/// How long a blocking read or write on an established member link may wait.
pub const LINK_TIMEOUT: Duration = Duration::from_secs(5);
