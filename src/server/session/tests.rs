//! In-process tests of a session's request handling: a real temporary store, no sockets. Each
//! test connects sessions the way the server does (`Session::new`, `start`), hands them
//! requests, and reads what they queue for their writer threads.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Session;
use crate::db::Store;
use crate::error::{ErrorCode, Result};
use crate::mailbox;
use crate::net::{
    GroupInfo, NewMessage, PublicKeys, Request, Response, ServerEvent, ServerReply, ServerRequest,
    WrappedKey, MAX_BODY,
};
use crate::server::config::Config;
use crate::server::outbound::{Handle, Outbound};
use crate::server::shared::Shared;
use crate::server::testing::Flag;
use crate::transport::Transport;

struct Server {
    _dir: tempfile::TempDir,
    shared: Arc<Shared>,
    _stop: crossbeam_channel::Sender<()>,
}

fn server(users: &[&str]) -> Result<Server> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("chat.db");
    let store = Store::open(&db)?;
    for u in users {
        let name = u.to_string();
        store.call(move |tx| {
            let keys = PublicKeys {
                x25519: vec![1; 32],
                ed25519: vec![2; 32],
            };
            tx.create_user(&name, "h", &keys)
        })?;
    }
    let mut config = Config::new(db, "127.0.0.1:1".into(), Transport::plaintext());
    config.max_file = 1 << 20;
    let (shared, stop) = Shared::for_tests(config, store, 1);
    Ok(Server {
        _dir: dir,
        shared,
        _stop: stop,
    })
}

/// A connected client: its session and what the session queues for its writer thread.
struct Conn<'a> {
    session: Session<'a>,
    rx: mailbox::Receiver<Outbound>,
    next_id: u64,
}

fn connect<'a>(shared: &'a Arc<Shared>, user: &str) -> Result<Conn<'a>> {
    let conn_id = shared
        .next_conn
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let (tx, rx) = mailbox::lazy(64);
    let handle = Handle {
        conn_id,
        tx,
        cut: Arc::new(Flag::default()),
    };
    shared
        .clients
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let session = Session::new(shared, user.to_string(), conn_id, handle, b"t".to_vec());
    session.start()?;
    let conn = Conn {
        session,
        rx,
        next_id: 1,
    };
    match conn.next() {
        Outbound::Event(ServerEvent::Welcome(w)) => assert_eq!(w.user, user),
        other => panic!("expected Welcome, got {other:?}"),
    }
    assert!(matches!(conn.next(), Outbound::Sync));
    Ok(conn)
}

impl Conn<'_> {
    /// The next item for the client: a reply the session made on its own thread, else what
    /// other threads queued (failing the test after a few seconds).
    fn next(&self) -> Outbound {
        if let Some(local) = self.session.local.borrow_mut().pop_front() {
            return local;
        }
        self.rx
            .recv_deadline(Instant::now() + Duration::from_secs(10))
            .expect("the session queued nothing within 10 s")
    }

    /// Sends a request and returns its response.
    fn call(&mut self, body: ServerRequest) -> Response<ServerReply> {
        let id = self.next_id;
        self.next_id += 1;
        self.session.handle(Request { id, body }).expect("handled");
        loop {
            match self.next() {
                Outbound::Event(ServerEvent::Reply(r)) => {
                    assert_eq!(r.id, Some(id), "the response names the request");
                    return r;
                }
                Outbound::Chunk(ServerEvent::Reply(r), _) => return r,
                Outbound::Message(_) => continue,
                other => panic!("expected a reply, got {other:?}"),
            }
        }
    }

    fn ok(&mut self, body: ServerRequest) -> ServerReply {
        match self.call(body).result {
            Ok(reply) => reply,
            Err(refusal) => panic!("refused: {refusal:?}"),
        }
    }

    fn refused(&mut self, body: ServerRequest) -> ErrorCode {
        match self.call(body).result {
            Ok(reply) => panic!("expected a refusal, got {reply:?}"),
            Err(refusal) => refusal.code,
        }
    }

    /// A live message queued for this connection.
    fn message(&self) -> i64 {
        match self.next() {
            Outbound::Message(m) => m.id,
            other => panic!("expected a message, got {other:?}"),
        }
    }
}

fn message(client_id: u64, body: &[u8], resend_after: Option<i64>) -> NewMessage {
    NewMessage {
        client_id,
        body: body.to_vec(),
        file: None,
        resend_after,
    }
}

fn send(to: &str, client_id: u64, body: &[u8]) -> ServerRequest {
    ServerRequest::Send {
        to: to.into(),
        message: message(client_id, body, None),
    }
}

fn stored(reply: ServerReply) -> i64 {
    match reply {
        ServerReply::Stored { msg_id } => msg_id,
        other => panic!("expected Stored, got {other:?}"),
    }
}

#[test]
fn a_message_is_stored_then_routed_to_every_connection_of_its_recipient() -> Result<()> {
    let s = server(&["alice", "bob"])?;
    let bob1 = connect(&s.shared, "bob")?;
    let bob2 = connect(&s.shared, "bob")?;
    let mut alice = connect(&s.shared, "alice")?;
    let id = stored(alice.ok(send("bob", 1, b"sealed")));
    assert_eq!(bob1.message(), id);
    assert_eq!(bob2.message(), id);
    // A re-send of the same client id is the same message.
    assert_eq!(stored(alice.ok(send("bob", 1, b"sealed"))), id);
    let queued = s.shared.store.read(|tx| tx.queued("bob", 0, 10))?;
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].from, "alice", "the sender is the session's user");
    Ok(())
}

#[test]
fn acknowledgements_remove_only_the_sessions_own_messages() -> Result<()> {
    let s = server(&["alice", "bob", "carol"])?;
    let mut alice = connect(&s.shared, "alice")?;
    let mut carol = connect(&s.shared, "carol")?;
    let id = stored(alice.ok(send("bob", 1, b"x")));
    carol.ok(ServerRequest::Ack { msg_ids: vec![id] });
    assert_eq!(s.shared.store.read(|tx| tx.queued("bob", 0, 10))?.len(), 1);
    let mut bob = connect(&s.shared, "bob")?;
    bob.ok(ServerRequest::Ack { msg_ids: vec![id] });
    assert!(s
        .shared
        .store
        .read(|tx| tx.queued("bob", 0, 10))?
        .is_empty());
    let too_many = ServerRequest::Ack {
        msg_ids: vec![1; super::messages::MAX_ACK + 1],
    };
    assert_eq!(bob.refused(too_many), ErrorCode::BadRequest);
    Ok(())
}

#[test]
fn bad_names_and_bodies_are_refused_before_anything_is_stored() -> Result<()> {
    let s = server(&["alice"])?;
    let mut alice = connect(&s.shared, "alice")?;
    assert_eq!(
        alice.refused(send("bad name", 1, b"x")),
        ErrorCode::InvalidName
    );
    assert_eq!(alice.refused(send("bob", 1, b"")), ErrorCode::BadMessage);
    let huge = vec![0u8; MAX_BODY + 1];
    assert_eq!(alice.refused(send("bob", 1, &huge)), ErrorCode::BadMessage);
    assert_eq!(
        alice.refused(send("nobody", 1, b"x")),
        ErrorCode::UnknownUser
    );
    let group = ServerRequest::GroupInfo {
        group: "../etc".into(),
    };
    assert_eq!(alice.refused(group), ErrorCode::InvalidName);
    assert_eq!(s.shared.store.read(|tx| tx.newest_message_id())?, 0);
    Ok(())
}

fn key_for(member: &str) -> WrappedKey {
    WrappedKey {
        member: member.into(),
        wrapped: format!("key for {member}").into_bytes(),
    }
}

fn info(conn: &mut Conn<'_>, group: &str) -> GroupInfo {
    match conn.ok(ServerRequest::GroupInfo {
        group: group.into(),
    }) {
        ServerReply::Group { group } => group,
        other => panic!("expected Group, got {other:?}"),
    }
}

#[test]
fn group_requests_follow_the_membership_rules() -> Result<()> {
    let s = server(&["alice", "bob", "carol"])?;
    let mut alice = connect(&s.shared, "alice")?;
    let mut bob = connect(&s.shared, "bob")?;
    let create = |group: &str| ServerRequest::GroupCreate {
        group: group.into(),
        key: b"k1".to_vec(),
    };
    alice.ok(create("team"));
    assert_eq!(bob.refused(create("team")), ErrorCode::NameTaken);
    let add = |user: &str, epoch| ServerRequest::GroupAdd {
        group: "team".into(),
        user: user.into(),
        epoch,
        key: b"k".to_vec(),
    };
    assert_eq!(
        bob.refused(add("carol", 1)),
        ErrorCode::UnknownGroup,
        "not a member"
    );
    alice.ok(add("bob", 1));
    assert_eq!(
        bob.refused(add("carol", 1)),
        ErrorCode::NotAllowed,
        "not the admin"
    );
    assert_eq!(
        alice.refused(add("carol", 2)),
        ErrorCode::Conflict,
        "wrong epoch"
    );
    alice.ok(add("carol", 1));
    let g = info(&mut bob, "team");
    assert_eq!(g.members, ["alice", "bob", "carol"]);
    assert_eq!((g.epoch, g.keyed), (1, true));
    match bob.ok(ServerRequest::GroupKey {
        group: "team".into(),
        epoch: 1,
    }) {
        ServerReply::GroupKey { wrapped_by, key } => {
            assert_eq!((wrapped_by.as_str(), key.as_slice()), ("alice", &b"k"[..]))
        }
        other => panic!("expected GroupKey, got {other:?}"),
    }
    // A removal must key the next epoch for exactly the others.
    let remove = |keys: Vec<WrappedKey>| ServerRequest::GroupRemove {
        group: "team".into(),
        user: "carol".into(),
        epoch: 2,
        keys,
    };
    let with_carol = vec![key_for("alice"), key_for("bob"), key_for("carol")];
    assert_eq!(alice.refused(remove(with_carol)), ErrorCode::Conflict);
    alice.ok(remove(vec![key_for("alice"), key_for("bob")]));
    let g = info(&mut alice, "team");
    assert_eq!((g.members.len(), g.epoch), (2, 2));
    // The admin leaves: bob takes over, the new epoch waits for keys, and the first member to
    // send provides them.
    alice.ok(ServerRequest::GroupLeave {
        group: "team".into(),
    });
    let g = info(&mut bob, "team");
    assert_eq!((g.admin.as_str(), g.epoch, g.keyed), ("bob", 3, false));
    let rekey = ServerRequest::GroupRekey {
        group: "team".into(),
        epoch: 3,
        keys: vec![key_for("bob")],
    };
    bob.ok(rekey.clone());
    assert_eq!(bob.refused(rekey), ErrorCode::Conflict, "keyed once");
    bob.ok(ServerRequest::GroupLeave {
        group: "team".into(),
    });
    assert_eq!(
        s.shared.store.read(|tx| tx.group("team"))?,
        None,
        "the last one out"
    );
    Ok(())
}

#[test]
fn a_group_message_needs_the_current_epoch_unless_it_is_a_resend() -> Result<()> {
    let s = server(&["alice", "bob"])?;
    let mut alice = connect(&s.shared, "alice")?;
    let bob = connect(&s.shared, "bob")?;
    alice.ok(ServerRequest::GroupCreate {
        group: "team".into(),
        key: b"k1".to_vec(),
    });
    alice.ok(ServerRequest::GroupAdd {
        group: "team".into(),
        user: "bob".into(),
        epoch: 1,
        key: b"k1".to_vec(),
    });
    let group_send = |client_id, epoch, resend_after| ServerRequest::GroupSend {
        group: "team".into(),
        epoch,
        message: message(client_id, b"sealed", resend_after),
    };
    let first = stored(alice.ok(group_send(1, 1, None)));
    assert_eq!(bob.message(), first, "routed to the other member");
    assert_eq!(alice.refused(group_send(2, 2, None)), ErrorCode::Conflict);
    // The group moves on to epoch 2; the re-send of message 1 is still message 1.
    alice.ok(ServerRequest::GroupLeave {
        group: "team".into(),
    });
    let mut bob = bob;
    bob.ok(ServerRequest::GroupRekey {
        group: "team".into(),
        epoch: 2,
        keys: vec![key_for("bob")],
    });
    let mut alice = alice;
    assert_eq!(
        alice.refused(group_send(1, 1, Some(0))),
        ErrorCode::UnknownGroup,
        "a member who left sends nothing, not even a re-send"
    );
    Ok(())
}

#[test]
fn file_requests_are_checked_against_the_limits() -> Result<()> {
    let s = server(&["alice", "bob"])?;
    let mut alice = connect(&s.shared, "alice")?;
    let over = ServerRequest::FileBegin {
        size: (1 << 20) + 1,
        chunks: 5,
    };
    assert_eq!(alice.refused(over), ErrorCode::BadMessage);
    let miscounted = ServerRequest::FileBegin {
        size: 10,
        chunks: 2,
    };
    assert_eq!(alice.refused(miscounted), ErrorCode::BadRequest);
    let upload = match alice.ok(ServerRequest::FileBegin {
        size: 10,
        chunks: 1,
    }) {
        ServerReply::Upload { upload } => upload,
        other => panic!("expected Upload, got {other:?}"),
    };
    let empty = ServerRequest::FileChunk {
        upload,
        index: 0,
        data: vec![],
    };
    assert_eq!(alice.refused(empty), ErrorCode::BadMessage);
    alice.ok(ServerRequest::FileChunk {
        upload,
        index: 0,
        data: vec![9; 38],
    });
    let offer = ServerRequest::Send {
        to: "bob".into(),
        message: NewMessage {
            file: Some(upload),
            ..message(1, b"offer", None)
        },
    };
    let msg_id = stored(alice.ok(offer));
    let mut bob = connect(&s.shared, "bob")?;
    match bob.ok(ServerRequest::FileGet { msg_id, index: 0 }) {
        ServerReply::FileData { data } => assert_eq!(data, vec![9; 38]),
        other => panic!("expected FileData, got {other:?}"),
    }
    assert_eq!(
        alice.refused(ServerRequest::FileGet { msg_id, index: 0 }),
        ErrorCode::BadRequest,
        "not offered to alice"
    );
    Ok(())
}

#[test]
fn a_session_that_ends_leaves_no_presence_and_no_uploads() -> Result<()> {
    let s = server(&["alice"])?;
    let mut alice = connect(&s.shared, "alice")?;
    alice.ok(ServerRequest::FileBegin {
        size: 10,
        chunks: 1,
    });
    assert_eq!(s.shared.store.read(|tx| tx.online_users(10))?, ["alice"]);
    drop(alice);
    // The clean-up is a write queued by the session's drop: a later write commits after it.
    s.shared.store.call(|_| Ok(()))?;
    assert!(s.shared.store.read(|tx| tx.online_users(10))?.is_empty());
    let unfinished = s.shared.store.call(|tx| tx.drop_uploads(1, None))?;
    assert_eq!(unfinished, 0, "the upload went with its connection");
    assert_eq!(
        s.shared.clients.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    Ok(())
}
