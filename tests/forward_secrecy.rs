//! Forward secrecy of direct messages, end to end: a copy of a user's folder taken today
//! (identity, prekeys, sessions, and the password) does not open the messages captured
//! before it, and stops opening new ones after one round trip; 1,000 messages delivered out
//! of order to an offline user all open; a client killed after sealing never lets a key be
//! used twice.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{run_limited_for, Cluster};
use fastchat::client::e2e::{parse_direct, Directory, E2e, Plain};
use fastchat::client::keystore::Keystore;
use fastchat::client::Client;
use fastchat::crypto::ratchet::KEY_MIN_AGE_MS;
use fastchat::net::Envelope;

const LIMIT: Duration = Duration::from_secs(60);

/// A copy of `user`'s folder, as a thief takes it: `FASTCHAT_HOME` of its own.
fn steal(c: &Cluster, user: &str, into: &Path) {
    std::fs::create_dir_all(into).unwrap();
    let status = Command::new("cp")
        .arg("-a")
        .arg(c.home().join(user))
        .arg(into)
        .status()
        .unwrap();
    assert!(status.success());
}

/// `user`'s end-to-end state from the folder under `home` (password `password-USER`), logged in.
fn state_from(c: &Cluster, home: &Path, user: &str) -> (Client, E2e) {
    let store = Keystore::new(home, user);
    let identity = store.load_identity(&format!("password-{user}")).unwrap();
    let client = c.login(user);
    let directory = Directory::new(&c.balancer_addr, &c.transport, client.session(), None);
    let e2e = E2e::new(user, identity, store, directory).unwrap();
    (client, e2e)
}

/// What `e2e` makes of `msg`: its text, or why it does not open.
fn open_text(client: &Client, e2e: &mut E2e, msg: &Envelope) -> Result<String, String> {
    match e2e.open(client, msg) {
        Ok(opened) => match opened.plain {
            Plain::Text(t) => Ok(t),
            other => Err(format!("not text: {other:?}")),
        },
        Err(e) => Err(e.to_string()),
    }
}

#[test]
fn a_copy_of_the_key_folder_does_not_open_messages_captured_before_it() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    for text in ["first secret", "second secret", "third secret"] {
        c.send("alice", "bob", text);
    }
    let wire = c.queued_to("bob");
    assert_eq!(wire.len(), 3);
    let tmp = tempfile::tempdir().unwrap();

    // Taken before bob read them, the folder opens them (they are his to read): the test can
    // tell an open from a refusal.
    steal(&c, "bob", &tmp.path().join("before"));
    let (client, mut early) = state_from(&c, &tmp.path().join("before"), "bob");
    for (msg, text) in wire
        .iter()
        .zip(["first secret", "second secret", "third secret"])
    {
        assert_eq!(open_text(&client, &mut early, msg).as_deref(), Ok(text));
    }
    drop((client, early));

    // Bob reads them; a copy of his folder taken now opens none of them.
    let out = c.run("bob", &["recv"]);
    assert_eq!(out.lines().len(), 3, "{out:?}");
    steal(&c, "bob", &tmp.path().join("after"));
    let (client, mut thief) = state_from(&c, &tmp.path().join("after"), "bob");
    for msg in &wire {
        let got = open_text(&client, &mut thief, msg);
        assert!(got.is_err(), "message {} opened: {got:?}", msg.id);
    }
    // Nor does any file in it hold their keys in the clear: nothing in it names them.
    assert!(common::dir_contains(&tmp.path().join("after"), b"secret").is_empty());
}

#[test]
fn after_a_theft_one_round_trip_closes_new_messages_to_the_thief() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    c.send("alice", "bob", "a1");
    assert_eq!(c.run("bob", &["recv"]).lines(), ["alice: a1"]);
    c.send("bob", "alice", "b1");
    assert_eq!(c.run("alice", &["recv"]).lines(), ["bob: b1"]);

    // The theft.
    let tmp = tempfile::tempdir().unwrap();
    steal(&c, "bob", tmp.path());
    let (client, mut thief) = state_from(&c, tmp.path(), "bob");

    // Alice's next message still goes to keys the thief holds: it opens for them.
    c.send("alice", "bob", "a2: still exposed");
    let a2 = c.queued_to("bob").pop().unwrap();
    assert_eq!(
        open_text(&client, &mut thief, &a2).as_deref(),
        Ok("a2: still exposed")
    );

    // Bob reads it and answers, with a new ratchet key the thief never sees (his key is at
    // least a second old by then: a side makes at most one a second): a round trip.
    assert_eq!(
        c.run("bob", &["recv"]).lines(),
        ["alice: a2: still exposed"]
    );
    std::thread::sleep(std::time::Duration::from_millis(KEY_MIN_AGE_MS as u64));
    c.send("bob", "alice", "b2");
    assert_eq!(c.run("alice", &["recv"]).lines(), ["bob: b2"]);

    // From now on the thief's copy opens nothing, and bob everything.
    for text in ["a3: closed again", "a4: still closed"] {
        c.send("alice", "bob", text);
    }
    for msg in c.queued_to("bob") {
        let got = open_text(&client, &mut thief, &msg);
        assert!(got.is_err(), "message {} opened: {got:?}", msg.id);
    }
    assert_eq!(
        c.run("bob", &["recv"]).lines(),
        ["alice: a3: closed again", "alice: a4: still closed"]
    );
}

#[test]
fn a_thousand_messages_out_of_order_to_an_offline_user_all_open_once() {
    let c = Cluster::start(2);
    c.signup("alice");
    c.signup("bob");
    let home = c.home();
    let (client, mut alice) = state_from(&c, &home, "alice");
    let n = 1000;
    let mut sealed: Vec<(u64, Vec<u8>)> = (0..n)
        .map(|i| {
            let client_id = i as u64 + 1;
            let body = alice
                .seal_text("bob", client_id, &format!("message {i:04}"))
                .unwrap();
            (client_id, body)
        })
        .collect();
    // Stored (and so delivered) in another order than sealed: every ratchet key of the chain
    // is skipped and kept at some point.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..sealed.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        sealed.swap(i, (state % (i as u64 + 1)) as usize);
    }
    for (client_id, body) in &sealed {
        client.send("bob", *client_id, body, None).unwrap();
    }
    drop(client);
    let out = run_limited_for(c.cmd("bob").arg("recv"), LIMIT);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stderr, "", "nothing rejected");
    let shown: HashSet<&str> = out.lines().into_iter().collect();
    assert_eq!(shown.len(), n, "each shown once");
    for i in 0..n {
        assert!(
            shown.contains(format!("alice: message {i:04}").as_str()),
            "{i}"
        );
    }
    // Read, every key is gone: nothing opens a second time, and nothing is left to show.
    assert!(c.run("bob", &["recv"]).lines().is_empty());
}

/// The ratchet header of a stored direct message: which key sealed it.
fn key_of(msg: &Envelope) -> (u64, Vec<u8>, u32) {
    let direct = parse_direct(msg).unwrap();
    let h = direct.frame.header;
    (direct.frame.session, h.dh, h.n)
}

#[test]
fn a_sender_that_dies_after_sealing_never_reuses_a_key_and_loses_no_conversation() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    c.send("alice", "bob", "hello");

    // In-process: a message sealed and stored, then the process "dies" (nothing more of it
    // runs) before it learns more; a new process of alice carries on from her folder.
    let home = c.home();
    let (client, mut first) = state_from(&c, &home, "alice");
    let body = first
        .seal_text("bob", 101, "sealed, then the sender died")
        .unwrap();
    client.send("bob", 101, &body, None).unwrap();
    drop((client, first));
    let (client, mut second) = state_from(&c, &home, "alice");
    let body = second.seal_text("bob", 102, "the next process").unwrap();
    client.send("bob", 102, &body, None).unwrap();
    drop((client, second));

    // And real processes killed with SIGKILL at every stage of a send.
    for i in 0..12u64 {
        let mut child = c
            .cmd("alice")
            .args(["send", "bob", &format!("killed {i}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(5 + 9 * i));
        let _ = child.kill();
        let _ = child.wait();
    }
    c.send("alice", "bob", "after the crashes");

    // Every stored message was sealed under a key of its own...
    let wire = c.queued_to("bob");
    let keys: HashSet<_> = wire.iter().map(key_of).collect();
    assert_eq!(keys.len(), wire.len(), "a ratchet key was used twice");
    // ...and every one of them opens for bob, in the order sent.
    let out = run_limited_for(c.cmd("bob").arg("recv"), LIMIT);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stderr, "", "nothing rejected");
    let lines = out.lines();
    assert_eq!(lines.len(), wire.len(), "{lines:?}");
    assert_eq!(lines[0], "alice: hello");
    assert_eq!(lines[1], "alice: sealed, then the sender died");
    assert_eq!(lines[2], "alice: the next process");
    assert_eq!(lines.last(), Some(&"alice: after the crashes"));
}

/// A group message's key epoch and number in its sender's chain.
fn chain_place(msg: &Envelope) -> (u64, u32) {
    let epoch = u64::from_be_bytes(msg.body[2..10].try_into().unwrap());
    let n = u32::from_be_bytes(msg.body[18..22].try_into().unwrap());
    (epoch, n)
}

#[test]
fn group_messages_captured_before_a_theft_stay_closed_and_each_change_starts_new_chains() {
    let c = Cluster::start(1);
    for u in ["alice", "bob", "carol"] {
        c.signup(u);
    }
    let group = |user: &str, args: &[&str]| {
        let mut all = vec!["group"];
        all.extend_from_slice(args);
        let out = c.run(user, &all);
        assert_eq!(out.code, 0, "{out:?}");
    };
    group("alice", &["create", "team"]);
    group("alice", &["add", "team", "bob"]);
    for text in ["team secret one", "team secret two"] {
        group("alice", &["send", "team", text]);
    }
    let wire: Vec<Envelope> = c
        .group_messages()
        .into_iter()
        .filter(|m| m.body[1] == 1)
        .collect();
    assert_eq!(wire.len(), 2);
    assert_eq!(
        wire.iter().map(chain_place).collect::<Vec<_>>(),
        [(2, 0), (2, 1)],
        "one chain, moving on with every message"
    );
    let tmp = tempfile::tempdir().unwrap();

    // Before bob read them, a copy of his folder opens them once it has alice's sender key
    // (queued for him as a direct message): the test can tell an open from a refusal.
    steal(&c, "bob", &tmp.path().join("before"));
    let (client, mut early) = state_from(&c, &tmp.path().join("before"), "bob");
    for m in c.queued_to("bob") {
        early
            .open(&client, &m)
            .expect("alice's sender key, or a notice");
    }
    for (msg, text) in wire.iter().zip(["team secret one", "team secret two"]) {
        assert_eq!(open_text(&client, &mut early, msg).as_deref(), Ok(text));
    }
    drop((client, early));

    // Bob reads them; a copy taken now opens none.
    let out = c.run("bob", &["recv"]);
    assert!(out.stdout.contains("team secret two"), "{out:?}");
    steal(&c, "bob", &tmp.path().join("after"));
    let (client, mut thief) = state_from(&c, &tmp.path().join("after"), "bob");
    for msg in &wire {
        let got = open_text(&client, &mut thief, msg);
        assert!(got.is_err(), "message {} opened: {got:?}", msg.id);
    }
    drop((client, thief));

    // A change of membership starts a new epoch, and alice a new chain in it, handed to bob
    // and to carol.
    group("alice", &["add", "team", "carol"]);
    group("alice", &["send", "team", "with carol"]);
    let last = c.group_messages().pop().unwrap();
    assert_eq!(chain_place(&last), (3, 0));
    assert_eq!(
        c.count("SELECT count(*) FROM messages WHERE sender = 'alice' AND recipient = 'carol'"),
        1,
        "carol got alice's key of the new epoch"
    );
    let out = c.run("carol", &["recv"]);
    assert!(
        out.stdout.contains("[alice/team] alice: with carol"),
        "{out:?}"
    );
    assert!(!out.stdout.contains("team secret"), "{out:?}");
}

#[test]
fn two_users_who_start_at_once_and_one_user_in_many_processes_lose_nothing() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    // Each starts a session before hearing from the other: two sessions, both kept.
    c.send("alice", "bob", "alice first");
    c.send("bob", "alice", "bob first");
    assert_eq!(c.run("bob", &["recv"]).lines(), ["alice: alice first"]);
    assert_eq!(c.run("alice", &["recv"]).lines(), ["bob: bob first"]);
    for i in 0..3 {
        c.send("alice", "bob", &format!("a{i}"));
        c.send("bob", "alice", &format!("b{i}"));
    }
    let out = c.run("bob", &["recv"]);
    assert_eq!(
        out.lines(),
        ["alice: a0", "alice: a1", "alice: a2"],
        "{out:?}"
    );
    assert_eq!(out.stderr, "");
    let out = c.run("alice", &["recv"]);
    assert_eq!(out.lines(), ["bob: b0", "bob: b1", "bob: b2"], "{out:?}");
    assert_eq!(out.stderr, "");

    // Ten processes of alice sending at once share her sessions under her state lock: no key
    // is used twice and every message opens.
    let children: Vec<_> = (0..10)
        .map(|i| {
            c.cmd("alice")
                .args(["send", "bob", &format!("at once {i}")])
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut child in children {
        assert!(child.wait().unwrap().success());
    }
    let wire = c.queued_to("bob");
    assert_eq!(wire.len(), 10);
    let keys: HashSet<_> = wire.iter().map(key_of).collect();
    assert_eq!(keys.len(), 10, "a ratchet key was used twice");
    let out = run_limited_for(c.cmd("bob").arg("recv"), LIMIT);
    assert_eq!(out.stderr, "", "nothing rejected");
    let mut lines = out.lines();
    lines.sort();
    let want: Vec<String> = (0..10).map(|i| format!("alice: at once {i}")).collect();
    assert_eq!(lines, want.iter().map(String::as_str).collect::<Vec<_>>());
}

#[test]
fn a_sender_key_from_outside_the_epoch_is_refused() {
    let c = Cluster::start(1);
    for u in ["alice", "bob", "mallory"] {
        c.signup(u);
    }
    for args in [
        &["group", "create", "team"][..],
        &["group", "add", "team", "bob"],
    ] {
        assert_eq!(c.run("alice", args).code, 0);
    }
    // Mallory, not a member, hands bob a chain "for" the group's epoch, hoping to have
    // messages of hers accepted in it.
    let home = c.home();
    let (client, mut mallory) = state_from(&c, &home, "mallory");
    let plain = Plain::SenderKey(fastchat::client::e2e::SenderKey {
        group: "alice/team".into(),
        epoch: 2,
        key: [7; 32],
        n: 0,
        mac: [8; 32],
    });
    let body = mallory.seal_direct("bob", 77, &plain).unwrap();
    client.send("bob", 77, &body, None).unwrap();
    let out = c.run("bob", &["recv"]);
    assert!(
        out.stderr.contains(
            "mallory handed a key for epoch 2 of alice/team, of which they or we were not a member"
        ),
        "{out:?}"
    );
    assert!(!out.stdout.contains("mallory"), "{out:?}");
}
