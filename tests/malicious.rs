//! A malicious chat server (or anyone who can write the database): it holds a genuine server
//! certificate, so it can register and relay to users like any server, and it can rewrite
//! what is stored. It cannot read messages; these tests check that it cannot make a user see
//! something twice, or miss something genuine, without the user being told.

mod common;

use common::{next_message_id, run_limited, Cluster, EvilServer, Output};
use fastchat::net::Envelope;

/// A stored message, as the server holds it (or, with `table` = `spy`, held it).
fn stored_in(c: &Cluster, table: &str, id: i64) -> Envelope {
    c.envelopes(table, "id = ?1", &[&id]).remove(0)
}

fn stored(c: &Cluster, id: i64) -> Envelope {
    stored_in(c, "messages", id)
}

/// Keeps a copy of every message stored from now on in table `spy`, as a malicious server
/// would.
fn spy_on_messages(c: &Cluster) {
    let sql = c.sql();
    if sql.is_postgres() {
        sql.batch(
            "CREATE TABLE spy AS SELECT * FROM messages WHERE false;
             CREATE FUNCTION spy_copy() RETURNS trigger AS $$
                 BEGIN INSERT INTO spy SELECT NEW.*; RETURN NEW; END $$ LANGUAGE plpgsql;
             CREATE TRIGGER spying AFTER INSERT ON messages
                 FOR EACH ROW EXECUTE FUNCTION spy_copy();",
        );
    } else {
        sql.batch(
            "CREATE TABLE spy AS SELECT * FROM messages WHERE 0;
             CREATE TRIGGER spying AFTER INSERT ON messages BEGIN
                 INSERT INTO spy SELECT * FROM messages WHERE id = new.id;
             END;",
        );
    }
}

/// Puts `msg` back into the queue under `id` (and client id `client_id`), as a server that
/// rewrites its database would.
fn store_copy(c: &Cluster, msg: &Envelope, id: i64, client_id: u64) {
    c.sql().exec(
        "INSERT INTO messages (id, sender, recipient, client_id, body, sent_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        &[
            &id,
            &msg.from,
            &msg.to,
            &(client_id as i64),
            &msg.body,
            &msg.sent_at,
        ],
    );
}

/// A cluster where alice sent bob "meet at noon" and bob read it: its id, and the message as
/// the server held it.
fn read_once() -> (Cluster, i64, Envelope) {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    c.send("alice", "bob", "meet at noon");
    let id = next_message_id(&c) - 1;
    let original = stored(&c, id);
    let out = c.run("bob", &["recv"]);
    assert_eq!(out.lines(), ["alice: meet at noon"]);
    assert_eq!(c.count("SELECT count(*) FROM messages"), 0, "acknowledged");
    (c, id, original)
}

#[test]
fn a_message_replayed_from_the_database_is_refused_with_a_warning() {
    let (c, id, original) = read_once();

    // The server puts the same ciphertext back under a new id; and again, relabelled with
    // another client id.
    store_copy(&c, &original, id + 100, original.client_id);
    store_copy(&c, &original, id + 101, original.client_id + 1);
    let out = c.run("bob", &["recv"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, "", "nothing is shown again");
    // Its key was used and deleted: the ratchet refuses both before anything is decrypted.
    for copy in [id + 100, id + 101] {
        let replay = format!("message {copy} from alice rejected: a message already received");
        assert!(out.stderr.contains(&replay), "{}", out.stderr);
    }
    // Genuine traffic is unaffected.
    c.send("alice", "bob", "lunch instead?");
    assert_eq!(c.run("bob", &["recv"]).lines(), ["alice: lunch instead?"]);
}

#[test]
fn a_message_delivered_again_under_its_own_id_is_acknowledged_without_a_word() {
    // Delivery is at least once: a server that lost the acknowledgement (it was stopped, or
    // its link was) sends a shown message again under its id. Its key is gone, so it no
    // longer opens; it is that message again, not an attack: nothing shown, nothing said,
    // and it leaves the queue.
    let (c, id, original) = read_once();
    store_copy(&c, &original, id, original.client_id);
    let out = c.run("bob", &["recv"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        (out.stdout.as_str(), out.stderr.as_str()),
        ("", ""),
        "{out:?}"
    );
    assert_eq!(c.count("SELECT count(*) FROM messages"), 0, "acknowledged");
    // Anything else a server sends under that id is dropped the same way, never shown; a
    // new message of alice's under an old id still opens and is shown.
    let mut forged = original.clone();
    let last = forged.body.len() - 1;
    forged.body[last] ^= 1;
    store_copy(&c, &forged, id, original.client_id);
    assert_eq!(c.run("bob", &["recv"]).stdout, "");
    c.send("alice", "bob", "lunch instead?");
    let newer = stored(&c, next_message_id(&c) - 1);
    c.sql().exec("DELETE FROM messages", &[]);
    store_copy(&c, &newer, id, newer.client_id);
    assert_eq!(c.run("bob", &["recv"]).lines(), ["alice: lunch instead?"]);
}

#[test]
fn forged_frames_never_make_a_genuine_message_disappear() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    // Bob pins alice's keys and is listening.
    c.send("alice", "bob", "hello");
    spy_on_messages(&c);
    let mut listen = c.cmd("bob");
    listen.args(["recv", "--wait", "4"]);
    let bob = std::thread::spawn(move || run_limited(&mut listen));
    c.wait_online("bob", 1);

    // The malicious server relays junk "from alice" under the ids that alice's next
    // messages will get, then the same again under later ids.
    let mut evil = EvilServer::join(&c, "server-evil", 0);
    let next = next_message_id(&c);
    for (i, id) in (next..next + 3).enumerate() {
        evil.relay(
            Envelope {
                id,
                from: "alice".into(),
                to: "bob".into(),
                group: None,
                client_id: id as u64,
                body: vec![2, 1, 0, 0, 0, 0, 0, 0, 0, i as u8, 0xde, 0xad],
                sent_at: 0,
            },
            &["bob"],
        );
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    // Alice's genuine messages take those ids.
    c.send("alice", "bob", "the real one");
    c.send("alice", "bob", "and another");
    let genuine = stored_in(&c, "spy", next);
    // And a replay of the genuine one, relayed live under a new id.
    evil.relay(
        Envelope {
            id: next + 50,
            ..genuine
        },
        &["bob"],
    );
    let out: Output = bob.join().unwrap();
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.lines(),
        ["alice: hello", "alice: the real one", "alice: and another"],
        "{out:?}"
    );
    for id in next..next + 3 {
        assert!(
            out.stderr
                .contains(&format!("message {id} from alice rejected")),
            "junk {id}: {}",
            out.stderr
        );
    }
    assert!(
        out.stderr.contains(&format!(
            "message {} from alice rejected: a message already received",
            next + 50
        )),
        "{}",
        out.stderr
    );
}

fn group(c: &Cluster, user: &str, args: &[&str]) -> Output {
    c.group(user, args)
}

fn ok(c: &Cluster, user: &str, args: &[&str]) -> String {
    c.group_ok(user, args)
}

/// alice/team with alice (admin), bob and carol; everyone has read the announcements.
fn team(c: &Cluster, extra: &[&str]) {
    for u in ["alice", "bob", "carol"].iter().chain(extra) {
        c.signup(u);
    }
    ok(c, "alice", &["create", "team"]);
    ok(c, "alice", &["add", "team", "bob"]);
    ok(c, "alice", &["add", "team", "carol"]);
    for u in ["bob", "carol"] {
        let out = c.run(u, &["recv"]);
        assert_eq!(out.code, 0, "{out:?}");
    }
}

#[test]
fn a_member_the_server_adds_gets_no_key_and_is_reported() {
    let c = Cluster::start(1);
    team(&c, &["mallory"]);
    // The server adds mallory on its own: a member row, and a key "for" her.
    let sql = c.sql();
    sql.exec(
        "INSERT INTO members (grp, user, seq, position) VALUES ('alice/team', 'mallory', 9, 0)",
        &[],
    );
    // Carol leaves; the next sender keys the new epoch, for the members it has verified.
    ok(&c, "carol", &["leave", "team"]);
    let out = group(&c, "bob", &["send", "team", "secret plan"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains(
            "WARNING: the server lists members of alice/team that no signed change made \
             ([\"mallory\"])"
        ),
        "{}",
        out.stderr
    );
    assert_eq!(
        c.count("SELECT count(*) FROM group_keys WHERE member = 'mallory'"),
        0,
        "no key was ever wrapped for mallory"
    );
    let mallory = c.run("mallory", &["recv"]);
    assert!(!mallory.stdout.contains("secret plan"), "{mallory:?}");
    // `members` shows the verified chain, not the server's list.
    assert_eq!(ok(&c, "bob", &["members", "team"]), "alice (admin)\nbob\n");
}

#[test]
fn a_forged_change_is_refused_with_a_warning() {
    let c = Cluster::start(1);
    team(&c, &["mallory"]);
    // The server appends a change to the chain that alice never made: mallory adds herself,
    // with a valid signature of hers (she is a user; she is not the admin).
    let store = fastchat::client::keystore::Keystore::new(&c.home(), "mallory");
    let mallory = store.load_identity("password-mallory").unwrap();
    let sql = c.sql();
    let last: Vec<u8> = sql.one(
        "SELECT change FROM group_changes WHERE grp = 'alice/team' ORDER BY seq DESC LIMIT 1",
        &[],
    );
    let last: fastchat::net::SignedChange = fastchat::net::decode(&last).unwrap();
    let forged = fastchat::client::e2e::sign_change(
        &mallory,
        fastchat::net::Change {
            group: "alice/team".into(),
            seq: 4,
            prev: fastchat::membership::hash(&last).unwrap(),
            by: "mallory".into(),
            action: fastchat::net::Action::Add("mallory".into()),
        },
    )
    .unwrap();
    sql.exec(
        "INSERT INTO group_changes (grp, seq, change) VALUES ('alice/team', 4, ?1)",
        &[&fastchat::net::encode(&forged).unwrap()],
    );
    sql.exec("UPDATE groups SET epoch = 4 WHERE name = 'alice/team'", &[]);
    let out = group(&c, "bob", &["send", "team", "secret plan"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains(
            "WARNING: change 4 of alice/team (mallory added mallory) was made by mallory, who is \
             not a member. The server may be forging the group's membership"
        ),
        "{}",
        out.stderr
    );
    // Nor can it rewrite history signed by alice: a change with a broken signature.
    let mut tampered = forged.clone();
    tampered.change.by = "alice".into();
    sql.exec(
        "UPDATE group_changes SET change = ?1 WHERE grp = 'alice/team' AND seq = 4",
        &[&fastchat::net::encode(&tampered).unwrap()],
    );
    let out = group(&c, "carol", &["members", "team"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("does not carry a valid signature of alice"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_history_rolled_back_by_the_server_is_noticed() {
    let c = Cluster::start(1);
    team(&c, &[]);
    // Bob has verified the chain up to carol's addition (change 3). The server forgets it.
    let sql = c.sql();
    sql.exec(
        "DELETE FROM group_changes WHERE grp = 'alice/team' AND seq = 3",
        &[],
    );
    sql.exec(
        "DELETE FROM members WHERE grp = 'alice/team' AND user = 'carol'",
        &[],
    );
    sql.exec("UPDATE groups SET epoch = 2 WHERE name = 'alice/team'", &[]);
    let out = group(&c, "bob", &["send", "team", "hello"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains(
            "WARNING: the server says alice/team is at change 2, but its verified chain is at \
             change 3"
        ),
        "{}",
        out.stderr
    );
}

#[test]
fn a_new_member_cannot_read_what_was_sent_before_it_joined() {
    let c = Cluster::start(1);
    team(&c, &["dave"]);
    ok(&c, "alice", &["send", "team", "before dave"]);
    ok(&c, "alice", &["add", "team", "dave"]);
    ok(&c, "alice", &["send", "team", "after dave"]);
    // The server hands dave everything, from the start.
    c.sql()
        .exec("UPDATE members SET position = 0 WHERE user = 'dave'", &[]);
    let out = c.run("dave", &["recv"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(!out.stdout.contains("before dave"), "{out:?}");
    assert!(
        out.stdout.contains("[alice/team] alice: after dave"),
        "{out:?}"
    );
    assert!(
        out.stderr
            .contains("rejected: we were not a member of alice/team in key epoch 3"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_key_wrapped_by_someone_who_may_not_key_the_epoch_is_refused() {
    let c = Cluster::start(1);
    team(&c, &[]);
    ok(&c, "alice", &["send", "team", "the real plan"]);
    // Epoch 3 began with alice adding carol: only alice keys it. Carol (a member, colluding
    // with the server) wraps a key she chose for bob, and the server hands him that one.
    let carol = fastchat::client::keystore::Keystore::new(&c.home(), "carol")
        .load_identity("password-carol")
        .unwrap();
    let sql = c.sql();
    let bob_x25519: Vec<u8> = sql.one("SELECT x25519 FROM users WHERE name = 'bob'", &[]);
    let chosen = fastchat::crypto::PairKey::random().unwrap();
    let aad = fastchat::client::e2e::wrap_aad("alice/team", 3, "bob", "carol");
    let wrapped = carol
        .pair_key("carol", "bob", &bob_x25519)
        .unwrap()
        .seal(&aad, &chosen.0)
        .unwrap();
    let n = sql.exec(
        "UPDATE group_keys SET wrapped = ?1, wrapped_by = 'carol'
             WHERE grp = 'alice/team' AND epoch = 3 AND member = 'bob'",
        &[&wrapped],
    );
    assert_eq!(n, 1);
    let out = c.run("bob", &["recv"]);
    assert!(!out.stdout.contains("the real plan"), "{out:?}");
    assert!(
        out.stderr.contains(
            "WARNING: the key of alice/team epoch 3 was wrapped by carol, who may not key that \
             epoch"
        ),
        "{}",
        out.stderr
    );
}
