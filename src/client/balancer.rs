//! Talking to the balancer: strictly request and reply, one method per request.

use std::sync::Arc;
use std::time::Duration;

use crate::crypto::SessionKey;
use crate::error::{Error, Result};
use crate::net::{
    BalancerReply, BalancerRequest, PublicKeys, Request, Response, ServerInfo, MAX_FRAME,
};
use crate::transport::tls::not_fastchat;
use crate::transport::{Channel, Expect, Transport};

/// How long to wait for the reply to a request.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// A logged-in session: who, the token and the key that proves it, and the server assigned.
#[derive(Clone)]
pub struct Session {
    /// The user name.
    pub user: String,
    /// Session token for `Hello`.
    pub token: String,
    /// The key made for this session; the token is good only with its proofs.
    pub key: Arc<SessionKey>,
    /// The chat server to use.
    pub server: ServerInfo,
}

impl std::fmt::Debug for Session {
    /// Everything but the token and the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("user", &self.user)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

/// A connection to the balancer.
pub struct BalancerClient {
    addr: String,
    chan: Channel,
    next_id: u64,
}

impl BalancerClient {
    /// Connects to the balancer at `addr` (checking, with TLS, that it is the cluster's). A
    /// list `ADDR,ADDR,...` names several balancers of one cluster: they are tried in order,
    /// and the first that answers is used.
    pub fn connect(addr: &str, transport: &Transport) -> Result<BalancerClient> {
        let mut last = None;
        for one in addr.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            match BalancerClient::connect_one(one, transport) {
                Ok(b) => return Ok(b),
                Err(e) => {
                    if addr.contains(',') {
                        log::info!("balancer {one}: {e}; trying the next");
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::Invalid("no balancer address given".into())))
    }

    fn connect_one(addr: &str, transport: &Transport) -> Result<BalancerClient> {
        let stream = transport.connect(addr, "balancer", &Expect::Balancer)?;
        let chan = Channel::new(stream)?;
        chan.stream().tcp().set_read_timeout(Some(REPLY_TIMEOUT))?;
        chan.stream().tcp().set_write_timeout(Some(REPLY_TIMEOUT))?;
        Ok(BalancerClient {
            addr: addr.to_string(),
            chan,
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
        self.chan.send(&Request { id, body })?;
        let response = self
            .chan
            .recv::<Response<BalancerReply>>(MAX_FRAME)
            .map_err(|e| match e {
                // The first answer is no fastchat frame at all: another program.
                Error::FrameTooLarge { .. } | Error::Malformed(_) if id == 1 => {
                    not_fastchat(&self.addr, "its answer is not a fastchat frame")
                }
                e => e,
            })?
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

    /// Creates an account, with its first prekeys if given.
    pub fn signup(
        &mut self,
        name: &str,
        password: &str,
        keys: PublicKeys,
        prekeys: Option<crate::net::NewPrekeys>,
    ) -> Result<()> {
        match self.request(BalancerRequest::Signup {
            name: name.into(),
            password: password.into(),
            keys,
            prekeys,
        })? {
            BalancerReply::Ok => Ok(()),
            other => Err(unexpected("Signup", &other)),
        }
    }

    /// Logs in with a fresh session key and gets a server.
    pub fn login(&mut self, name: &str, password: &str) -> Result<Session> {
        let key = Arc::new(SessionKey::generate()?);
        let reply = self.request(BalancerRequest::Login {
            name: name.into(),
            password: password.into(),
            session_key: key.public()?,
        })?;
        session(reply, key)
    }

    /// The proof of `session` for this connection.
    fn proof(&self, session: &Session) -> Result<Vec<u8>> {
        session.key.prove(self.chan.stream().binding().as_ref())
    }

    /// Gets a (possibly different) server for an existing session, other than `avoid` if
    /// another is live.
    pub fn resume(&mut self, session: &Session, avoid: Option<u64>) -> Result<Session> {
        let reply = self.request(BalancerRequest::Resume {
            token: session.token.clone(),
            proof: self.proof(session)?,
            avoid,
        })?;
        let resumed = self::session(reply, Arc::clone(&session.key))?;
        Ok(resumed)
    }

    /// Ends a session: its token is refused from now on, and its connections are closed.
    pub fn logout(&mut self, session: &Session) -> Result<()> {
        match self.request(BalancerRequest::Logout {
            token: session.token.clone(),
            proof: self.proof(session)?,
        })? {
            BalancerReply::Ok => Ok(()),
            other => Err(unexpected("Logout", &other)),
        }
    }

    /// Replaces the session user's public keys (allowed once after an operator reset).
    pub fn set_keys(&mut self, session: &Session, keys: PublicKeys) -> Result<()> {
        match self.request(BalancerRequest::SetKeys {
            token: session.token.clone(),
            proof: self.proof(session)?,
            keys,
        })? {
            BalancerReply::Ok => Ok(()),
            other => Err(unexpected("SetKeys", &other)),
        }
    }

    /// The live servers.
    pub fn servers(&mut self) -> Result<Vec<ServerInfo>> {
        match self.request(BalancerRequest::Servers)? {
            BalancerReply::Servers { servers } => Ok(servers),
            other => Err(unexpected("Servers", &other)),
        }
    }

    /// A user's public keys from the directory (asked as `session`'s user).
    pub fn keys(&mut self, session: &Session, name: &str) -> Result<PublicKeys> {
        match self.request(BalancerRequest::Keys {
            name: name.into(),
            token: session.token.clone(),
            proof: self.proof(session)?,
        })? {
            BalancerReply::Keys { keys, .. } => Ok(keys),
            other => Err(unexpected("Keys", &other)),
        }
    }

    /// Publishes prekeys for the asynchronous key agreement (a new signed prekey, and
    /// one-time prekeys to add); returns how many one-time prekeys the directory holds for
    /// this user. With neither, it only counts.
    pub fn publish_prekeys(
        &mut self,
        session: &Session,
        signed: Option<crate::net::SignedPrekey>,
        one_time: Vec<(u32, Vec<u8>)>,
    ) -> Result<u32> {
        match self.request(BalancerRequest::Prekeys {
            token: session.token.clone(),
            proof: self.proof(session)?,
            signed,
            one_time: one_time
                .into_iter()
                .map(|(id, k)| (id, serde_bytes::ByteBuf::from(k)))
                .collect(),
        })? {
            BalancerReply::Prekeys { one_time } => Ok(one_time),
            other => Err(unexpected("Prekeys", &other)),
        }
    }

    /// `name`'s prekey bundle (taking one of their one-time prekeys while any are left);
    /// `None` if they have published none.
    pub fn bundle(
        &mut self,
        session: &Session,
        name: &str,
    ) -> Result<Option<crate::crypto::x3dh::Bundle>> {
        match self.request(BalancerRequest::Bundle {
            name: name.into(),
            token: session.token.clone(),
            proof: self.proof(session)?,
        })? {
            BalancerReply::Bundle { bundle, .. } => Ok(bundle),
            other => Err(unexpected("Bundle", &other)),
        }
    }
}

fn session(reply: BalancerReply, key: Arc<SessionKey>) -> Result<Session> {
    match reply {
        BalancerReply::LoggedIn {
            user,
            token,
            server,
        } => Ok(Session {
            user,
            token,
            key,
            server,
        }),
        other => Err(unexpected("Login", &other)),
    }
}

/// A reply that does not answer the request that was sent.
pub(crate) fn unexpected(what: &str, reply: &impl std::fmt::Debug) -> Error {
    Error::Protocol(format!("unexpected reply to {what}: {reply:?}"))
}
