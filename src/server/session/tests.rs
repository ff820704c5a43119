//! In-process tests of a session's request handling: a real temporary store, no sockets. Each
//! test connects sessions the way the server does (`Session::new`, `start`), hands them
//! requests, and reads what they queue for their writer threads.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Session;
use crate::client::e2e::sign_change;
use crate::crypto::Identity;
use crate::db::{Fence, Store};
use crate::error::{ErrorCode, Result};
use crate::mailbox;
use crate::membership::{self, After, Roster};
use crate::net::{
    Action, Change, GroupInfo, NewMessage, PublicKeys, Request, Response, ServerEvent, ServerReply,
    ServerRequest, SignedChange, WrappedKey, MAX_BODY,
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
    /// Each user's keys, to sign group changes with.
    ids: HashMap<String, Identity>,
}

fn server(users: &[&str]) -> Result<Server> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("chat.db");
    let store = Store::open(&db)?;
    let mut ids = HashMap::new();
    for u in users {
        let name = u.to_string();
        let id = Identity::generate()?;
        let keys: PublicKeys = id.public()?;
        ids.insert(name.clone(), id);
        store.call(move |tx| tx.create_user(&name, "h", &keys))?;
    }
    let mut config = Config::new(db, "127.0.0.1:1".into(), Transport::plaintext());
    config.max_file = 1 << 20;
    let (shared, stop) = Shared::for_tests(config, store, 1);
    Ok(Server {
        _dir: dir,
        shared,
        _stop: stop,
        ids,
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
        since: std::time::Instant::now(),
        wire: None,
    };
    shared
        .clients
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let session = Session::new(
        shared,
        user.to_string(),
        conn_id,
        handle,
        b"t".to_vec(),
        Fence::now(),
    );
    session.start()?;
    let conn = Conn {
        session,
        rx,
        next_id: 1,
    };
    match conn.next() {
        Outbound::Event(e) => match *e {
            ServerEvent::Welcome(w) => assert_eq!(w.user, user),
            other => panic!("expected Welcome, got {other:?}"),
        },
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
            let (event, chunk) = match self.next() {
                Outbound::Event(e) => (*e, false),
                Outbound::Chunk(e, _) => (*e, true),
                Outbound::Message(_) => continue,
                other => panic!("expected a reply, got {other:?}"),
            };
            match event {
                ServerEvent::Reply(r) => {
                    if !chunk {
                        assert_eq!(r.id, Some(id), "the response names the request");
                    }
                    return r;
                }
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
        patient: false,
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
    carol.ok(ack(vec![id]));
    assert_eq!(s.shared.store.read(|tx| tx.queued("bob", 0, 10))?.len(), 1);
    let mut bob = connect(&s.shared, "bob")?;
    bob.ok(ack(vec![id]));
    assert!(s
        .shared
        .store
        .read(|tx| tx.queued("bob", 0, 10))?
        .is_empty());
    let too_many = ack(vec![1; super::messages::MAX_ACK + 1]);
    assert_eq!(bob.refused(too_many), ErrorCode::BadRequest);
    Ok(())
}

fn ack(msg_ids: Vec<i64>) -> ServerRequest {
    ServerRequest::Ack {
        msg_ids,
        quiet: false,
    }
}

#[test]
fn a_quiet_acknowledgement_is_applied_without_a_reply_but_a_refusal_still_answers() -> Result<()> {
    let s = server(&["alice", "bob"])?;
    let mut alice = connect(&s.shared, "alice")?;
    let mut bob = connect(&s.shared, "bob")?;
    let id = stored(alice.ok(send("bob", 1, b"x")));
    assert_eq!(bob.message(), id);
    let quiet = |msg_ids| ServerRequest::Ack {
        msg_ids,
        quiet: true,
    };
    bob.session
        .handle(Request {
            id: 1000,
            body: quiet(vec![id]),
        })
        .expect("handled");
    // The next answer bob gets is the one to his next request (`call` checks the id), and
    // that request's commit follows the quiet one's.
    assert!(matches!(bob.ok(ack(Vec::new())), ServerReply::Done));
    assert!(s
        .shared
        .store
        .read(|tx| tx.queued("bob", 0, 10))?
        .is_empty());
    let too_many = quiet(vec![1; super::messages::MAX_ACK + 1]);
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

/// A group's chain as its members make it in these tests.
struct Chain {
    group: String,
    roster: Option<Roster>,
}

impl Chain {
    fn new(group: &str) -> Chain {
        Chain {
            group: group.into(),
            roster: None,
        }
    }

    /// The next change, made and signed by `by`.
    fn next(&self, s: &Server, by: &str, action: Action) -> SignedChange {
        let (seq, prev) = self
            .roster
            .as_ref()
            .map_or((1, Vec::new()), |r| (r.seq + 1, r.head.clone()));
        let change = Change {
            group: self.group.clone(),
            seq,
            prev,
            by: by.into(),
            action,
        };
        sign_change(&s.ids[by], change).unwrap()
    }

    /// Records a change the server accepted.
    fn accepted(&mut self, signed: &SignedChange) {
        self.roster = match membership::apply(self.roster.as_ref(), signed).unwrap() {
            After::Roster(r) => Some(r),
            After::Deleted => None,
        };
    }
}

fn submit(change: &SignedChange, keys: &[&str]) -> ServerRequest {
    ServerRequest::GroupChange {
        change: change.clone(),
        keys: keys.iter().map(|m| key_for(m)).collect(),
        client_id: crate::crypto::random_u64().unwrap(),
    }
}

impl Conn<'_> {
    /// Submits `change` with keys for `keys`; expects it to be accepted.
    fn change(&mut self, chain: &mut Chain, change: SignedChange, keys: &[&str]) -> ServerReply {
        let reply = self.ok(submit(&change, keys));
        chain.accepted(&change);
        reply
    }
}

#[test]
fn group_changes_follow_the_rules_and_the_chain() -> Result<()> {
    let s = server(&["alice", "bob", "carol"])?;
    let mut alice = connect(&s.shared, "alice")?;
    let mut bob = connect(&s.shared, "bob")?;
    let mut team = Chain::new("alice/team");
    // Only alice may create alice/..., whether or not it exists: nothing is learned.
    let by_bob = team.next(&s, "bob", Action::Create);
    assert_eq!(
        bob.refused(submit(&by_bob, &["bob"])),
        ErrorCode::NotAllowed
    );
    let create = team.next(&s, "alice", Action::Create);
    assert_eq!(
        bob.refused(submit(&create, &["alice"])),
        ErrorCode::NotAllowed,
        "a change is submitted by its signer"
    );
    let mut forged = create.clone();
    forged.signature[0] ^= 1;
    assert_eq!(
        alice.refused(submit(&forged, &["alice"])),
        ErrorCode::BadRequest
    );
    stored(alice.change(&mut team, create.clone(), &["alice"]));
    assert_eq!(
        alice.refused(submit(&create, &["alice"])),
        ErrorCode::NameTaken
    );
    // Group names ignore case too.
    let shouting = Chain::new("alice/TEAM");
    let create_shouting = shouting.next(&s, "alice", Action::Create);
    assert_eq!(
        alice.refused(submit(&create_shouting, &["alice"])),
        ErrorCode::NameTaken
    );
    let mut bobs = Chain::new("bob/team");
    let bobs_create = bobs.next(&s, "bob", Action::Create);
    bob.change(&mut bobs, bobs_create, &["bob"]);

    // Additions: the admin only, each starting an epoch keyed for everyone after it.
    let by_outsider = team.next(&s, "bob", Action::Add("carol".into()));
    assert_eq!(
        bob.refused(submit(&by_outsider, &["alice", "carol"])),
        ErrorCode::UnknownGroup
    );
    let add_bob = team.next(&s, "alice", Action::Add("bob".into()));
    assert_eq!(
        alice.refused(submit(&add_bob, &["bob"])),
        ErrorCode::Conflict,
        "keys for all"
    );
    let ghost = team.next(&s, "alice", Action::Add("nobody".into()));
    assert_eq!(
        alice.refused(submit(&ghost, &["alice", "nobody"])),
        ErrorCode::UnknownUser
    );
    alice.change(&mut team, add_bob.clone(), &["alice", "bob"]);
    assert_eq!(
        alice.refused(submit(&add_bob, &["alice", "bob"])),
        ErrorCode::Conflict,
        "stale"
    );
    let by_member = team.next(&s, "bob", Action::Add("carol".into()));
    assert_eq!(
        bob.refused(submit(&by_member, &["alice", "bob", "carol"])),
        ErrorCode::NotAllowed
    );
    let add_carol = team.next(&s, "alice", Action::Add("carol".into()));
    alice.change(&mut team, add_carol, &["alice", "bob", "carol"]);
    let g = info(&mut bob, "alice/team");
    assert_eq!(g.members, ["alice", "bob", "carol"]);
    assert_eq!((g.epoch, g.keyed), (3, true));
    match bob.ok(ServerRequest::GroupKey {
        group: "alice/team".into(),
        epoch: 3,
    }) {
        ServerReply::GroupKey { wrapped_by, key } => {
            assert_eq!(
                (wrapped_by.as_str(), key.as_slice()),
                ("alice", &b"key for bob"[..])
            )
        }
        other => panic!("expected GroupKey, got {other:?}"),
    }

    // A removal keys the next epoch for exactly the others.
    let remove = team.next(&s, "alice", Action::Remove("carol".into()));
    assert_eq!(
        alice.refused(submit(&remove, &["alice", "bob", "carol"])),
        ErrorCode::Conflict
    );
    alice.change(&mut team, remove, &["alice", "bob"]);
    let g = info(&mut alice, "alice/team");
    assert_eq!((g.members.len(), g.epoch), (2, 4));

    // The chain, as a member fetches it; not for anyone else.
    let log = |after| ServerRequest::GroupLog {
        group: "alice/team".into(),
        after,
    };
    match bob.ok(log(1)) {
        ServerReply::Changes { changes } => {
            let seqs: Vec<u64> = changes.iter().map(|c| c.change.seq).collect();
            assert_eq!(seqs, [2, 3, 4]);
        }
        other => panic!("expected Changes, got {other:?}"),
    }
    let mut carol = connect(&s.shared, "carol")?;
    assert_eq!(carol.refused(log(0)), ErrorCode::UnknownGroup);

    // The admin leaves: bob takes over, the new epoch waits for keys, and the first member to
    // send provides them.
    let leave = team.next(&s, "alice", Action::Leave);
    assert_eq!(
        alice.refused(submit(&leave, &["bob"])),
        ErrorCode::Conflict,
        "no keys yet"
    );
    alice.change(&mut team, leave, &[]);
    let g = info(&mut bob, "alice/team");
    assert_eq!((g.admin.as_str(), g.epoch, g.keyed), ("bob", 5, false));
    let rekey = ServerRequest::GroupRekey {
        group: "alice/team".into(),
        epoch: 5,
        keys: vec![key_for("bob")],
    };
    bob.ok(rekey.clone());
    assert_eq!(bob.refused(rekey), ErrorCode::Conflict, "keyed once");
    let last = team.next(&s, "bob", Action::Leave);
    assert_eq!(bob.change(&mut team, last, &[]), ServerReply::Done);
    assert_eq!(
        s.shared.store.read(|tx| tx.group("alice/team"))?,
        None,
        "the last one out"
    );
    Ok(())
}

#[test]
fn a_group_message_needs_the_current_epoch_unless_it_is_a_resend() -> Result<()> {
    let s = server(&["alice", "bob"])?;
    let mut alice = connect(&s.shared, "alice")?;
    let mut bob = connect(&s.shared, "bob")?;
    let mut team = Chain::new("alice/team");
    let create = team.next(&s, "alice", Action::Create);
    alice.change(&mut team, create, &["alice"]);
    let add = team.next(&s, "alice", Action::Add("bob".into()));
    alice.change(&mut team, add, &["alice", "bob"]);
    // Bob was told of his addition.
    let announced = bob.message();
    let group_send = |client_id, epoch, resend_after| ServerRequest::GroupSend {
        group: "alice/team".into(),
        epoch,
        message: message(client_id, b"sealed", resend_after),
    };
    let first = stored(alice.ok(group_send(1, 2, None)));
    assert!(first > announced);
    assert_eq!(bob.message(), first, "routed to the other member");
    assert_eq!(alice.refused(group_send(2, 1, None)), ErrorCode::Conflict);
    assert_eq!(alice.refused(group_send(2, 3, None)), ErrorCode::Conflict);
    // The group moves on to epoch 3; the re-send of message 1 is still message 1.
    let leave = team.next(&s, "alice", Action::Leave);
    alice.change(&mut team, leave, &[]);
    bob.ok(ServerRequest::GroupRekey {
        group: "alice/team".into(),
        epoch: 3,
        keys: vec![key_for("bob")],
    });
    assert_eq!(
        alice.refused(group_send(1, 1, Some(0))),
        ErrorCode::UnknownGroup,
        "a member who left sends nothing, not even a re-send"
    );
    Ok(())
}

#[test]
fn the_file_window_is_made_on_first_use_and_holds_at_most_its_slots() -> Result<()> {
    let s = server(&["alice"])?;
    let alice = connect(&s.shared, "alice")?;
    let chunk = ServerRequest::FileChunk {
        upload: 1,
        index: 0,
        data: vec![1],
    };
    let session = &alice.session;
    assert!(session.window.get().is_none(), "no file yet, no window");
    assert!(!session.waits_for_window(&chunk));
    let mut held: Vec<_> = (0..super::FILE_WINDOW)
        .map(|_| session.permit())
        .collect::<Result<_>>()?;
    assert!(session.waits_for_window(&chunk), "every slot is taken");
    assert!(
        !session.waits_for_window(&ServerRequest::Who),
        "only file requests wait"
    );
    assert!(session.permit().is_err(), "no slot beyond the window");
    held.pop();
    assert!(!session.waits_for_window(&chunk), "a slot given back");
    session.permit()?;
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
    assert_eq!(
        s.shared.store.read(|tx| tx.online_users(10, &[1]))?,
        ["alice"]
    );
    drop(alice);
    // The clean-up is a write queued by the session's drop: a later write commits after it.
    s.shared.store.call(|_| Ok(()))?;
    assert!(s
        .shared
        .store
        .read(|tx| tx.online_users(10, &[1]))?
        .is_empty());
    let unfinished = s.shared.store.call(|tx| tx.drop_uploads(1, None))?;
    assert_eq!(unfinished, 0, "the upload went with its connection");
    assert_eq!(
        s.shared.clients.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    Ok(())
}
