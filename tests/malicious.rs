//! A malicious chat server (or anyone who can write the database): it holds a genuine server
//! certificate, so it can register and relay to users like any server, and it can rewrite
//! what is stored. It cannot read messages; these tests check that it cannot make a user see
//! something twice, or miss something genuine, without the user being told.

mod common;

use common::{next_message_id, run_limited, Cluster, EvilServer, Output};
use fastchat::net::Envelope;

/// A stored message, as the server holds it (or, with `table` = `spy`, held it).
fn stored_in(c: &Cluster, table: &str, id: i64) -> Envelope {
    c.sql()
        .query_row(
            &format!(
                "SELECT id, sender, recipient, client_id, body, sent_at FROM {table} WHERE id = ?1"
            ),
            [id],
            |r| {
                Ok(Envelope {
                    id: r.get(0)?,
                    from: r.get(1)?,
                    to: r.get(2)?,
                    group: None,
                    client_id: r.get::<_, i64>(3)? as u64,
                    body: r.get(4)?,
                    sent_at: r.get(5)?,
                })
            },
        )
        .unwrap()
}

fn stored(c: &Cluster, id: i64) -> Envelope {
    stored_in(c, "messages", id)
}

/// Keeps a copy of every message stored from now on in table `spy`, as a malicious server
/// would.
fn spy_on_messages(c: &Cluster) {
    c.sql()
        .execute_batch(
            "CREATE TABLE spy AS SELECT * FROM messages WHERE 0;
             CREATE TRIGGER spying AFTER INSERT ON messages BEGIN
                 INSERT INTO spy SELECT * FROM messages WHERE id = new.id;
             END;",
        )
        .unwrap();
}

/// Puts `msg` back into the queue under `id` (and client id `client_id`), as a server that
/// rewrites its database would.
fn store_copy(c: &Cluster, msg: &Envelope, id: i64, client_id: u64) {
    c.sql()
        .execute(
            "INSERT INTO messages (id, sender, recipient, client_id, body, sent_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            rusqlite::params![
                id,
                msg.from,
                msg.to,
                client_id as i64,
                msg.body,
                msg.sent_at
            ],
        )
        .unwrap();
}

#[test]
fn a_message_replayed_from_the_database_is_refused_with_a_warning() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    c.send("alice", "bob", "meet at noon");
    let id = next_message_id(&c) - 1;
    let original = stored(&c, id);
    let out = c.run("bob", &["recv"]);
    assert_eq!(out.lines(), ["alice: meet at noon"]);
    assert_eq!(c.count("SELECT count(*) FROM messages"), 0, "acknowledged");

    // The server puts the same ciphertext back under a new id; and again, relabelled with
    // another client id.
    store_copy(&c, &original, id + 100, original.client_id);
    store_copy(&c, &original, id + 101, original.client_id + 1);
    let out = c.run("bob", &["recv"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, "", "nothing is shown again");
    let replay = format!(
        "message {} from alice rejected: it replays message {id}",
        id + 100
    );
    assert!(out.stderr.contains(&replay), "{}", out.stderr);
    let relabelled = format!(
        "message {} from alice rejected: message failed authentication",
        id + 101
    );
    assert!(out.stderr.contains(&relabelled), "{}", out.stderr);
    // Genuine traffic is unaffected.
    c.send("alice", "bob", "lunch instead?");
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
            "message {} from alice rejected: it replays message {next}",
            next + 50
        )),
        "{}",
        out.stderr
    );
}
