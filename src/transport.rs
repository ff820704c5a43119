//! How bytes travel between processes: TCP, TLS 1.3 with the cluster's certificate authority,
//! and the framed channel a connection's thread drives.
//!
//! # The thread model
//!
//! An OpenSSL session must not be read and written from two threads at once, so every
//! connection belongs to one thread, which does its reads and writes:
//!
//! ```text
//!                 other threads (db writer, router, peer links, a client's callers)
//!                        │ queue an item in the connection's mailbox, ring its waker
//!                        ▼
//!  connection thread: poll(socket: read, and write while bytes are pending; waker; stop)
//!        ├─ socket readable → Channel::fill → frames → handle them
//!        ├─ waker set       → drain the mailbox → Channel::queue
//!        └─ pending bytes   → Channel::flush (as far as the socket takes them)
//! ```
//!
//! One exception, on a chat server's client connections: while the connection's thread
//! sleeps, the thread with an item for it may take its channel (under a lock the connection's
//! thread holds whenever it is awake) and send the item itself, rather than wake it
//! (`server::outbound::Wire`). The channel is still used by one thread at a time.
//!
//! One thread per connection, not two, so a server holds twice the connections for the same
//! thread budget, and a connection costs two descriptors (its socket and its eventfd) instead
//! of three. Connections used strictly in turn (request, then reply) by one thread, such as the
//! balancer's, simply block in [`Channel::send`] and [`Channel::recv`].
//!
//! # Layout
//!
//! * [`tls`]: [`Stream`] (plain or TLS) and [`Transport`] (a process's certificates and trust:
//!   accepting, connecting, checking who the peer is).
//! * [`pki`]: the cluster CA and its member certificates.
//! * [`channel`]: [`Channel`], frames both ways over a stream.
//! * [`waker`]: [`Waker`] (eventfd) and [`wait`] (poll; a [`Poller`], epoll, for many sockets).

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::error::{Error, Result};

pub mod channel;
pub mod pki;
pub mod tls;
pub mod waker;

pub use channel::{Channel, Fill};
pub use tls::{pin_path, Expect, Socket, Stream, Transport};
pub use waker::{wait, Interest, Poller, Ready, Waker};

/// How long to wait for a TCP connection (and, after it, for the TLS handshake).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Connects to `addr` (host:port) over TCP, trying each address it resolves to; `what` names
/// the other side in the error (`cannot reach balancer at 127.0.0.1:7000: Connection refused`).
pub fn dial(addr: &str, what: &str) -> Result<TcpStream> {
    let unreachable = |source| Error::Unreachable {
        what: format!("{what} at {addr}"),
        source,
    };
    let addrs = addr.to_socket_addrs().map_err(unreachable)?;
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "address resolves to nothing");
    for a in addrs {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(unreachable(last))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::pki::{Member, Role};
    use std::net::TcpListener;
    use std::time::Instant;

    #[test]
    fn unreachable_is_a_clear_error() {
        // Bind then drop, so the port is very likely closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = dial(&format!("127.0.0.1:{port}"), "balancer").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot reach balancer at 127.0.0.1:"),
            "{err}"
        );
        assert_eq!(err.exit_code(), 3);
    }

    fn cluster(dir: &std::path::Path) -> Result<()> {
        let member = |role, name: &str| Member {
            role,
            name: name.into(),
        };
        pki::init(
            dir,
            &[
                member(Role::Balancer, "balancer"),
                member(Role::Server, "server-1"),
                member(Role::Server, "server-2"),
            ],
        )
    }

    /// Accepts one connection on a thread with `transport`, and returns what the accepting
    /// side saw of its peer (or the error).
    fn serve_once(
        transport: Transport,
    ) -> Result<(String, std::thread::JoinHandle<Result<Option<pki::Member>>>)> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        let t = std::thread::spawn(move || {
            let (tcp, _) = listener.accept()?;
            let deadline = Instant::now() + Duration::from_secs(10);
            let stream = transport.accept(tcp, deadline, None)?;
            let peer = stream.peer();
            let mut ch = Channel::new(stream)?;
            ch.send(&42u32)?;
            Ok(peer)
        });
        Ok((addr, t))
    }

    #[test]
    fn members_authenticate_each_other_and_clients_check_the_ca() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("tls");
        cluster(&dir)?;
        let balancer = Transport::member(&dir, "balancer")?;
        let server = Transport::member(&dir, "server-1")?;
        // A server reaches the balancer; each side knows the other from its certificate.
        let (addr, t) = serve_once(balancer.clone())?;
        let stream = server.connect(&addr, "balancer", &Expect::Balancer)?;
        assert_eq!(stream.peer().map(|m| m.name), Some("balancer".into()));
        let mut ch = Channel::new(stream)?;
        assert_eq!(ch.recv::<u32>(16)?, Some(42));
        let seen = t.join().expect("no panic")?;
        assert_eq!(
            seen,
            Some(Member {
                role: Role::Server,
                name: "server-1".into()
            })
        );
        // A client with the CA file reaches it and sees no impostor; a client expecting a
        // server refuses the balancer's certificate.
        let client = Transport::client_with_ca(&pki::ca_path(&dir))?;
        let (addr, t) = serve_once(balancer.clone())?;
        let stream = client.connect(&addr, "balancer", &Expect::Balancer)?;
        assert!(stream.binding().is_some());
        assert_eq!(
            t.join().expect("no panic")?,
            None,
            "clients have no certificate"
        );
        let (addr, t) = serve_once(balancer.clone())?;
        let err = client
            .connect(&addr, "chat server", &Expect::Server(None))
            .err()
            .expect("refused");
        assert!(err.to_string().contains("is not a chat server"), "{err}");
        let _ = t.join();
        Ok(())
    }

    #[test]
    fn a_foreign_certificate_is_refused_by_members_and_clients() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let (ours, theirs) = (tmp.path().join("ours"), tmp.path().join("theirs"));
        cluster(&ours)?;
        cluster(&theirs)?;
        let balancer = Transport::member(&ours, "balancer")?;
        let rogue = Transport::member(&theirs, "server-1")?;
        // A rogue server with another CA's certificate cannot even finish the handshake.
        let (addr, t) = serve_once(balancer.clone())?;
        assert!(rogue.connect(&addr, "balancer", &Expect::Balancer).is_err());
        assert!(
            t.join().expect("no panic").is_err(),
            "the balancer refused it"
        );
        // A client that pinned our CA refuses a server of theirs, loudly.
        let pin = tmp.path().join("home/clusters/x.pem");
        let client = Transport::client_pinned(pin.clone())?;
        let (addr, t) = serve_once(balancer)?;
        client.connect(&addr, "balancer", &Expect::Balancer)?;
        let _ = t.join();
        assert!(pin.exists(), "pinned on first use");
        let impostor = Transport::member(&theirs, "balancer")?;
        let (addr, t) = serve_once(impostor)?;
        let err = Transport::client_pinned(pin)?
            .connect(&addr, "balancer", &Expect::Balancer)
            .err()
            .expect("refused");
        assert!(err.to_string().starts_with("WARNING"), "{err}");
        assert!(err.to_string().contains("did not sign"), "{err}");
        let _ = t.join();
        Ok(())
    }

    #[test]
    fn a_plaintext_peer_gets_a_clear_error_from_a_tls_client() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("tls");
        cluster(&dir)?;
        let (addr, t) = serve_once(Transport::plaintext())?;
        let err = Transport::client_with_ca(&pki::ca_path(&dir))?
            .connect(&addr, "balancer", &Expect::Balancer)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("does not speak TLS"), "{err}");
        let _ = t.join();
        Ok(())
    }
}
