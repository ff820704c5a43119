//! Talking to the balancer: strictly request and reply, one method per request.

use std::net::TcpStream;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::net::{
    BalancerReply, BalancerRequest, FrameReader, FrameWriter, PublicKeys, Request, Response,
    ServerInfo,
};
use crate::transport::dial;

/// How long to wait for the reply to a request.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// A logged-in session: who, the token, and the server assigned.
#[derive(Debug, Clone)]
pub struct Session {
    /// The user name.
    pub user: String,
    /// Session token for `Hello`.
    pub token: String,
    /// The chat server to use.
    pub server: ServerInfo,
}

/// A connection to the balancer.
pub struct BalancerClient {
    addr: String,
    reader: FrameReader<TcpStream>,
    writer: FrameWriter<TcpStream>,
    next_id: u64,
}

impl BalancerClient {
    /// Connects to the balancer at `addr`.
    pub fn connect(addr: &str) -> Result<BalancerClient> {
        let stream = dial(addr, "balancer")?;
        stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
        Ok(BalancerClient {
            addr: addr.to_string(),
            reader: FrameReader::new(stream.try_clone()?),
            writer: FrameWriter::new(stream),
            next_id: 1,
        })
    }

    /// The balancer's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends one request and returns the reply; a refusal becomes [`Error::Refused`].
    pub fn request(&mut self, body: BalancerRequest) -> Result<BalancerReply> {
        let id = self.next_id;
        self.next_id += 1;
        self.writer.send(&Request { id, body })?;
        let response = self
            .reader
            .read::<Response<BalancerReply>>()?
            .ok_or_else(|| {
                Error::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "balancer closed the connection",
                ))
            })?;
        match response.id {
            Some(i) if i != id => Err(Error::Protocol(format!(
                "the balancer answered request {i}, not {id}"
            ))),
            _ => response.into_result(),
        }
    }

    /// Creates an account.
    pub fn signup(&mut self, name: &str, password: &str, keys: PublicKeys) -> Result<()> {
        match self.request(BalancerRequest::Signup {
            name: name.into(),
            password: password.into(),
            keys,
        })? {
            BalancerReply::Ok => Ok(()),
            other => Err(unexpected("Signup", &other)),
        }
    }

    /// Logs in and gets a server.
    pub fn login(&mut self, name: &str, password: &str) -> Result<Session> {
        let reply = self.request(BalancerRequest::Login {
            name: name.into(),
            password: password.into(),
        })?;
        session(reply)
    }

    /// Gets a (possibly different) server for an existing session, other than `avoid` if
    /// another is live.
    pub fn resume(&mut self, token: &str, avoid: Option<u64>) -> Result<Session> {
        let reply = self.request(BalancerRequest::Resume {
            token: token.into(),
            avoid,
        })?;
        session(reply)
    }

    /// Ends a session: its token is refused from now on.
    pub fn logout(&mut self, token: &str) -> Result<()> {
        match self.request(BalancerRequest::Logout {
            token: token.into(),
        })? {
            BalancerReply::Ok => Ok(()),
            other => Err(unexpected("Logout", &other)),
        }
    }

    /// The live servers.
    pub fn servers(&mut self) -> Result<Vec<ServerInfo>> {
        match self.request(BalancerRequest::Servers)? {
            BalancerReply::Servers { servers } => Ok(servers),
            other => Err(unexpected("Servers", &other)),
        }
    }

    /// A user's public keys from the directory.
    pub fn keys(&mut self, name: &str) -> Result<PublicKeys> {
        match self.request(BalancerRequest::Keys { name: name.into() })? {
            BalancerReply::Keys { keys, .. } => Ok(keys),
            other => Err(unexpected("Keys", &other)),
        }
    }
}

fn session(reply: BalancerReply) -> Result<Session> {
    match reply {
        BalancerReply::LoggedIn {
            user,
            token,
            server,
        } => Ok(Session {
            user,
            token,
            server,
        }),
        other => Err(unexpected("Login", &other)),
    }
}

/// A reply that does not answer the request that was sent.
pub(crate) fn unexpected(what: &str, reply: &impl std::fmt::Debug) -> Error {
    Error::Protocol(format!("unexpected reply to {what}: {reply:?}"))
}
