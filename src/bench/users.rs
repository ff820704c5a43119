//! The simulated users: signed up and logged in through the balancer, each with its link to
//! the server it was given (those that failed are reported, not run).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{Config, Mode};
use crate::client::api::open_with_failover;
use crate::client::{BalancerClient, Session};
use crate::crypto::Identity;
use crate::error::{Error, ErrorCode, Result};
use crate::net::{
    Greeting, PublicKeys, Request, Response, ServerEvent, ServerReply, ServerRequest, MAX_FRAME,
};
use crate::transport::{Channel, Expect, Transport};

/// One simulated user.
pub(super) struct User {
    pub(super) name: String,
    pub(super) identity: Arc<Identity>,
    pub(super) public: PublicKeys,
}

/// A connected client: its channel, and what `Welcome` said.
pub(super) struct Link {
    pub(super) chan: Channel,
    pub(super) server_id: u64,
    /// The newest message id when it connected.
    pub(super) newest: i64,
    /// The session (token and key), for moving to another server.
    pub(super) session: Session,
    /// Messages delivered during set-up (group membership announcements), to acknowledge.
    pub(super) unacked: Vec<i64>,
}

/// The users that connected, with their links, and why the others did not. A run goes on
/// without the clients that failed (and reports them); in group mode, with whole groups only.
/// No client at all is an error.
pub(super) fn connected(
    config: &Config,
    users: Vec<User>,
    outcomes: Vec<Result<Link>>,
) -> Result<(Vec<User>, Vec<Link>, Vec<Error>)> {
    let mut ok = Vec::with_capacity(users.len());
    let mut failed = Vec::new();
    for (user, outcome) in users.into_iter().zip(outcomes) {
        match outcome {
            Ok(link) => ok.push((user, link)),
            Err(e) => failed.push(e),
        }
    }
    if !failed.is_empty() {
        log::warn!(
            "{} of {} clients could not connect (first: {})",
            failed.len(),
            failed.len() + ok.len(),
            failed[0]
        );
    }
    if config.mode == Mode::Group {
        let whole = ok.len() - ok.len() % config.group_size;
        for (_, link) in ok.drain(whole..) {
            link.chan.stream().shutdown();
        }
    }
    let least = if config.mode == Mode::Group {
        config.group_size
    } else {
        1
    };
    if ok.len() < least.max(1) {
        return Err(failed.into_iter().next().unwrap_or_else(|| {
            Error::Invalid("too few clients connected to make a group".into())
        }));
    }
    let (users, links) = ok.into_iter().unzip();
    Ok((users, links, failed))
}

/// Signs up, logs in and connects every user, from a few threads at once: each user's
/// outcome, in order.
pub(super) fn connect_all(
    balancer: &str,
    transport: &Transport,
    users: &[User],
) -> Vec<Result<Link>> {
    let next = AtomicU64::new(0);
    let slots: Vec<Mutex<Option<Result<Link>>>> = users.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..16.min(users.len()) {
            scope.spawn(|| {
                let mut b: Option<BalancerClient> = None;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= users.len() {
                        break;
                    }
                    let result = connect_one(balancer, transport, &mut b, &users[i]);
                    if result.is_err() {
                        b = None;
                    }
                    *slots[i].lock() = Some(result);
                }
            });
        }
    });
    slots
        .into_iter()
        .map(|s| s.into_inner().expect("every slot filled"))
        .collect()
}

const PASSWORD: &str = "bench-password";

fn connect_one(
    balancer: &str,
    transport: &Transport,
    b: &mut Option<BalancerClient>,
    user: &User,
) -> Result<Link> {
    let conn = match b {
        Some(c) => c,
        None => b.insert(BalancerClient::connect(balancer, transport)?),
    };
    conn.signup(&user.name, PASSWORD, user.public.clone(), None)
        .map_err(signup_hint)?;
    let session = conn.login(&user.name, PASSWORD)?;
    // As the client library does: a server assigned as it died or stopped is avoided.
    open_with_failover(conn, session, |s| open_link(s, transport)).map(|(link, _)| link)
}

/// A balancer's refusal of too many signups from this address, with what to do about it: every
/// simulated user signs up, all from this one address, and a balancer started with its
/// defaults takes 30 (a spawned one has no limit).
fn signup_hint(e: Error) -> Error {
    match e {
        Error::Refused {
            code: ErrorCode::RateLimited,
            message,
        } => Error::refused(
            ErrorCode::RateLimited,
            format!(
                "{message} (every simulated user signs up from this address: start the \
                 balancer with --signups-per-address 0 for a load test, e.g. \
                 scripts/cluster.sh start N DIR --signups-per-address 0)"
            ),
        ),
        other => other,
    }
}

/// Connects to the session's server and says hello (with the session's proof).
pub(super) fn open_link(session: &Session, transport: &Transport) -> Result<Link> {
    let expect = Expect::Server(Some(session.server.name.clone()));
    let stream = transport.connect(&session.server.addr, "chat server", &expect)?;
    let mut chan = Channel::new(stream)?;
    chan.stream()
        .tcp()
        .set_read_timeout(Some(crate::client::balancer::REPLY_TIMEOUT))?;
    let proof = session.key.prove(chan.stream().binding().as_ref())?;
    chan.send(&Greeting::Hello {
        token: session.token.clone(),
        proof,
    })?;
    match chan.recv::<ServerEvent>(MAX_FRAME)? {
        Some(ServerEvent::Welcome(w)) => Ok(Link {
            chan,
            server_id: w.server_id,
            newest: w.newest,
            session: session.clone(),
            unacked: Vec::new(),
        }),
        Some(ServerEvent::Reply(Response {
            result: Err(refusal),
            ..
        })) => Err(refusal.into()),
        other => Err(Error::Protocol(format!(
            "unexpected reply to Hello: {other:?}"
        ))),
    }
}

/// Sends a request on a link and reads until its reply (setup only; nothing else is going on).
pub(super) fn call(link: &mut Link, id: u64, body: ServerRequest) -> Result<ServerReply> {
    link.chan.send(&Request { id, body })?;
    loop {
        match link.chan.recv::<ServerEvent>(MAX_FRAME)? {
            Some(ServerEvent::Reply(r)) if r.id == Some(id) || r.id.is_none() => {
                return r.into_result()
            }
            Some(ServerEvent::Deliver { msg }) => link.unacked.push(msg.id),
            Some(_) => {}
            None => return Err(Error::Protocol("server closed during setup".into())),
        }
    }
}
