//! Groups: admin rules and refusals, fan-out across servers, offline members, one stored copy
//! per message, key epochs (a removed member cannot read what follows), signatures.

mod common;

use common::{Cluster, Output, LIMIT};
use fastchat::client::e2e::{Directory, E2e};
use fastchat::client::keystore::Keystore;
use fastchat::client::Client;
use fastchat::net::Envelope;

fn group(c: &Cluster, user: &str, args: &[&str]) -> Output {
    c.group(user, args)
}

fn ok(c: &Cluster, user: &str, args: &[&str]) -> String {
    c.group_ok(user, args)
}

/// Runs a group command that must be refused with `error` (exit 1, one line, nothing printed).
fn refused(c: &Cluster, user: &str, args: &[&str], error: &str) {
    let out = group(c, user, args);
    assert_eq!(out.code, 1, "{user}: group {args:?}: {out:?}");
    assert_eq!(out.stdout, "", "{out:?}");
    assert_eq!(
        out.stderr.trim_end(),
        format!("fastchat: error: {error}"),
        "{user}: group {args:?}"
    );
}

fn members(c: &Cluster, user: &str, g: &str) -> Vec<String> {
    ok(c, user, &["members", g])
        .lines()
        .map(str::to_string)
        .collect()
}

/// One server; alice, `members` and `others` signed up; alice's group `team` with `members`.
fn alices_team(members: &[&str], others: &[&str]) -> Cluster {
    let c = Cluster::start(1);
    for u in ["alice"].iter().chain(members).chain(others) {
        c.signup(u);
    }
    ok(&c, "alice", &["create", "team"]);
    ok(&c, "alice", &[&["add", "team"][..], members].concat());
    c
}

/// Everything in the database about groups, to check that refusals change nothing.
fn group_state(c: &Cluster) -> String {
    let sql = c.sql();
    let mut out = String::new();
    for query in [
        "SELECT name || ':' || admin || ':' || epoch FROM groups ORDER BY name",
        "SELECT grp || ':' || user || ':' || seq FROM members ORDER BY grp, seq",
        "SELECT grp || ':' || epoch || ':' || member FROM group_keys ORDER BY 1",
        "SELECT CAST(count(*) AS TEXT) FROM messages",
    ] {
        for row in sql.column::<String>(query, &[]) {
            out.push_str(&row);
            out.push('\n');
        }
    }
    out
}

#[test]
fn only_the_admin_adds_and_removes_and_every_refusal_changes_nothing() {
    let c = Cluster::start(1);
    for u in ["alice", "bob", "carol", "dave"] {
        c.signup(u);
    }
    assert_eq!(
        ok(&c, "alice", &["create", "team"]),
        "created group alice/team; you are its admin\n"
    );
    assert_eq!(
        ok(&c, "alice", &["add", "team", "bob"]),
        "added bob to alice/team\n"
    );
    assert_eq!(
        ok(&c, "alice", &["add", "team", "carol"]),
        "added carol to alice/team\n"
    );
    assert_eq!(
        members(&c, "bob", "team"),
        ["alice (admin)", "bob", "carol"]
    );
    assert_eq!(
        ok(&c, "carol", &["list"]),
        "alice/team: 3 members, admin alice\n"
    );
    assert_eq!(ok(&c, "dave", &["list"]), "no groups\n");

    let before = group_state(&c);
    let not_member = "no group team with you as a member";
    refused(
        &c,
        "bob",
        &["add", "team", "dave"],
        "only the admin of alice/team (alice) can add members",
    );
    refused(
        &c,
        "bob",
        &["remove", "team", "carol"],
        "only the admin of alice/team (alice) can remove members",
    );
    refused(&c, "dave", &["add", "team", "dave"], not_member);
    refused(&c, "dave", &["send", "team", "let me in"], not_member);
    refused(&c, "dave", &["members", "team"], not_member);
    refused(&c, "dave", &["leave", "team"], not_member);
    refused(
        &c,
        "alice",
        &["members", "nosuch"],
        "no group nosuch with you as a member",
    );
    // Groups live in their creator's name space: nobody can ask for someone else's name,
    // so a refusal tells nothing about which groups exist.
    refused(
        &c,
        "bob",
        &["create", "alice/team"],
        "a group you create is named bob/NAME, not alice/team",
    );
    refused(
        &c,
        "bob",
        &["create", "alice/nosuch"],
        "a group you create is named bob/NAME, not alice/nosuch",
    );
    refused(
        &c,
        "alice",
        &["create", "team"],
        "you already have a group named alice/team",
    );
    refused(
        &c,
        "alice",
        &["add", "team", "nobody"],
        "no such user: nobody",
    );
    // Several at once: all or none, as far as can be checked before the first change.
    refused(
        &c,
        "alice",
        &["add", "team", "dave", "carol"],
        "carol is already a member of alice/team: nobody was added",
    );
    refused(
        &c,
        "alice",
        &["add", "team", "dave", "nobody"],
        "no such user: nobody: nobody was added",
    );
    refused(
        &c,
        "alice",
        &["add", "team", "dave", "dave"],
        "dave is named twice: nobody was added",
    );
    refused(
        &c,
        "bob",
        &["add", "team", "dave", "eve"],
        "only the admin of alice/team (alice) can add members",
    );
    refused(
        &c,
        "alice",
        &["add", "team", "bob"],
        "bob is already a member of alice/team",
    );
    refused(
        &c,
        "alice",
        &["remove", "team", "dave"],
        "dave is not a member of alice/team",
    );
    refused(
        &c,
        "alice",
        &["remove", "team", "alice"],
        "to leave alice/team, use group leave",
    );
    refused(
        &c,
        "alice",
        &["send", "team", ""],
        "empty message: nothing was sent",
    );
    refused(
        &c,
        "alice",
        &["create", "bad name"],
        "group name \"bad name\" contains a space: use letters, digits, '_', '.' and '-'",
    );
    refused(
        &c,
        "alice",
        &["add", "team", "x'; DROP TABLE users; --"],
        "user name \"x'; DROP TABLE users; --\" contains '\\'': use letters, digits, '_', '.' and '-'",
    );
    assert_eq!(group_state(&c), before, "refusals changed nothing");

    // The admin removes; the removed member is out.
    assert_eq!(
        ok(&c, "alice", &["remove", "team", "carol"]),
        "removed carol from alice/team; new group key (epoch 4)\n"
    );
    assert_eq!(members(&c, "alice", "team"), ["alice (admin)", "bob"]);
    refused(&c, "carol", &["send", "team", "still here?"], not_member);
    assert_eq!(ok(&c, "carol", &["list"]), "no groups\n");

    // Several in one command, one change each, in the order given.
    assert_eq!(
        ok(&c, "alice", &["add", "team", "dave", "carol"]),
        "added dave to alice/team\nadded carol to alice/team\n"
    );
    assert_eq!(
        members(&c, "carol", "team"),
        ["alice (admin)", "bob", "dave", "carol"]
    );
}

#[test]
fn the_longest_standing_member_succeeds_a_leaving_admin_and_an_empty_group_is_deleted() {
    let c = Cluster::start(1);
    for u in ["alice", "bob", "carol"] {
        c.signup(u);
    }
    ok(&c, "alice", &["create", "team"]);
    ok(&c, "alice", &["add", "team", "carol"]);
    ok(&c, "alice", &["add", "team", "bob"]);
    // carol joined before bob.
    assert_eq!(
        ok(&c, "alice", &["leave", "team"]),
        "left alice/team; carol is now its admin\n"
    );
    assert_eq!(members(&c, "bob", "team"), ["carol (admin)", "bob"]);
    // The members are told who took over, from their verified chains.
    let told = |user: &str| {
        let out = c.run(user, &["recv"]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        out.stdout.lines().last().unwrap_or_default().to_string()
    };
    assert_eq!(
        told("bob"),
        "[alice/team] * alice left; carol is now the admin"
    );
    assert_eq!(
        told("carol"),
        "[alice/team] * alice left; you are now the admin"
    );
    ok(&c, "carol", &["add", "team", "alice"]);
    assert_eq!(ok(&c, "bob", &["leave", "team"]), "left alice/team\n");
    assert_eq!(told("carol"), "[alice/team] * bob left");
    ok(&c, "alice", &["leave", "team"]);
    assert_eq!(members(&c, "carol", "team"), ["carol (admin)"]);
    assert_eq!(
        ok(&c, "carol", &["leave", "team"]),
        "left alice/team, its last member: the group is gone\n"
    );
    assert_eq!(c.count("SELECT count(*) FROM groups"), 0);
    assert_eq!(c.count("SELECT count(*) FROM members"), 0);
    assert_eq!(c.count("SELECT count(*) FROM group_keys"), 0);
    assert_eq!(c.count("SELECT count(*) FROM messages"), 0);
    assert_eq!(c.count("SELECT count(*) FROM group_changes"), 0);
    // The name is free again.
    ok(&c, "alice", &["create", "team"]);
}

#[test]
fn group_messages_reach_every_member_live_across_servers_and_offline_in_order() {
    let c = Cluster::start_with(3, "round-robin");
    c.wait_servers(3);
    for u in ["alice", "bob", "carol", "dave"] {
        c.signup(u);
    }
    ok(&c, "alice", &["create", "team"]);
    for u in ["bob", "carol", "dave"] {
        ok(&c, "alice", &["add", "team", u]);
    }
    // bob and carol are online (on whatever servers round-robin gives); dave is offline.
    let bob = c.spawn("bob", &["chat"]);
    let carol = c.spawn("carol", &["recv", "--wait", "20"]);
    let bob_hello = bob.line();
    assert!(
        bob_hello.starts_with("logged in as bob on server "),
        "{bob_hello}"
    );
    for notice in ["added bob", "added carol", "added dave"] {
        if notice != "added bob" {
            assert_eq!(carol.line(), format!("[alice/team] * alice {notice}"));
        }
        assert_eq!(bob.line(), format!("[alice/team] * alice {notice}"));
    }
    c.wait_online("bob", 1);
    c.wait_online("carol", 1);
    let servers = c.count("SELECT count(DISTINCT server_id) FROM presence");
    assert!(servers >= 2, "bob and carol are on different servers");

    for i in 1..=3 {
        let out = group(&c, "alice", &["send", "team", &format!("hello {i}")]);
        assert_eq!(out.code, 0, "{out:?}");
        assert!(out.stdout.starts_with("stored message "), "{out:?}");
        assert!(out.stdout.ends_with(" for group alice/team\n"), "{out:?}");
    }
    for i in 1..=3 {
        assert_eq!(bob.line(), format!("[alice/team] alice: hello {i}"));
        assert_eq!(carol.line(), format!("[alice/team] alice: hello {i}"));
    }
    // Stored once each, however many members.
    let unread = c.count("SELECT count(*) FROM messages WHERE grp = 'alice/team'");
    assert!(unread <= 6, "3 notices and 3 texts at most: {unread}");
    // Besides, alice handed her sender key to each member once for the epoch, not once per
    // message: only dave's copy still waits.
    assert_eq!(
        c.count("SELECT count(*) FROM messages WHERE recipient IS NOT NULL"),
        1
    );
    assert_eq!(
        c.count("SELECT count(*) FROM messages WHERE recipient = 'dave' AND sender = 'alice'"),
        1
    );

    let dave = c.run("dave", &["recv"]);
    assert_eq!(
        dave.lines(),
        [
            "[alice/team] * alice added dave",
            "[alice/team] alice: hello 1",
            "[alice/team] alice: hello 2",
            "[alice/team] alice: hello 3",
        ],
        "{dave:?}"
    );
    assert_eq!(
        c.run("dave", &["recv"]).stdout,
        "",
        "acknowledged once, gone"
    );
    // Every member has passed every message: none is left stored.
    c.wait_until_none_stored("group messages were never removed");
    // The sender does not get its own messages back.
    assert_eq!(c.run("alice", &["recv"]).stdout, "");
}

#[test]
fn chat_mode_speaks_group_commands() {
    let c = Cluster::start_with(2, "round-robin");
    c.signup("alice");
    c.signup("bob");
    c.signup("carol");
    let mut alice = c.spawn("alice", &["chat"]);
    let mut bob = c.spawn("bob", &["chat"]);
    assert!(alice.line().starts_with("logged in as alice"));
    assert!(bob.line().starts_with("logged in as bob"));
    alice.type_line("/group create crew");
    assert_eq!(alice.line(), "created group alice/crew; you are its admin");
    alice.type_line("/group add crew bob carol");
    assert_eq!(alice.line(), "added bob to alice/crew");
    assert_eq!(alice.line(), "added carol to alice/crew");
    assert_eq!(bob.line(), "[alice/crew] * alice added bob");
    assert_eq!(bob.line(), "[alice/crew] * alice added carol");
    bob.type_line("/group send crew ahoy all");
    assert!(bob.line().ends_with(" for group alice/crew"));
    assert_eq!(alice.line(), "[alice/crew] bob: ahoy all");
    bob.type_line("/group members crew");
    assert_eq!(bob.line(), "alice (admin)");
    assert_eq!(bob.line(), "bob");
    assert_eq!(bob.line(), "carol");
    alice.type_line("/help");
    let help: Vec<String> = (0..20)
        .map(|_| alice.line())
        .take_while(|l| !l.contains("/quit"))
        .collect();
    assert!(
        help.iter().any(|l| l.contains("/group send GROUP TEXT")),
        "{help:?}"
    );
    bob.type_line("/quit");
    assert_eq!(bob.wait_exit(LIMIT).and_then(|s| s.code()), Some(0));
}

/// Bob's own end-to-end state, loaded from his key files, with a connection of his.
fn bob_keys(c: &Cluster) -> (Client, E2e) {
    let store = Keystore::new(&c.home(), "bob");
    let identity = store.load_identity("password-bob").unwrap();
    let client = c.login("bob");
    let e2e = E2e::new(
        "bob",
        identity,
        store,
        Directory::new(&c.balancer_addr, &c.transport, client.session(), None),
    )
    .unwrap();
    (client, e2e)
}

#[test]
fn a_removed_member_cannot_read_what_is_sent_after_with_its_own_keys() {
    let c = alices_team(&["bob", "carol"], &[]);
    ok(&c, "alice", &["send", "team", "before"]);

    // While a member, bob reads epoch 3 with his own keys (and keeps the key in his cache),
    // once he has alice's sender key (a direct message to him).
    let (client, mut e2e) = bob_keys(&c);
    for m in c.queued_to("bob") {
        e2e.open(&client, &m).expect("bob opens alice's sender key");
    }
    let before = c.group_messages();
    let texts: Vec<_> = before
        .iter()
        .map(|m| {
            e2e.open(&client, m)
                .expect("bob reads while a member")
                .plain
        })
        .collect();
    assert_eq!(
        texts.last(),
        Some(&fastchat::client::e2e::Plain::Text("before".into()))
    );

    ok(&c, "alice", &["remove", "team", "bob"]);
    ok(&c, "alice", &["send", "team", "SECRET-after-removal"]);
    let after: Vec<Envelope> = c
        .group_messages()
        .into_iter()
        .filter(|m| m.id > before.last().unwrap().id)
        .collect();
    assert!(!after.is_empty());
    for m in &after {
        let err = e2e.open(&client, m).unwrap_err();
        assert!(
            err.to_string()
                .contains("no group alice/team with you as a member")
                || err.to_string().contains("failed authentication"),
            "{err}"
        );
    }
    // No key of the new epoch was wrapped for bob, and none of the wrapped keys opens for him.
    assert_eq!(
        c.count("SELECT count(*) FROM group_keys WHERE epoch = 4 AND member = 'bob'"),
        0
    );
    // And the key bob still holds (epoch 3) does not open the new messages.
    let epoch3 = fastchat::client::e2e::E2e::group_key(&mut e2e, &client, "alice/team", 3);
    assert!(epoch3.is_ok(), "cached from when bob was a member");
    let key = epoch3.unwrap();
    let texts = after.iter().filter(|m| m.body[1] == 1);
    for m in texts {
        let body = fastchat::client::e2e::parse_group(m).unwrap();
        assert_eq!(body.at.epoch, 4);
        assert_eq!(body.tags(), 1, "a tag for carol alone");
        assert!(body.open(&key).is_err());
    }
    // Carol, still a member, reads it.
    let out = c.run("carol", &["recv"]);
    assert!(
        out.stdout
            .contains("[alice/team] alice: SECRET-after-removal"),
        "{out:?}"
    );
}

#[test]
fn a_group_message_with_a_forged_sender_is_rejected() {
    let c = alices_team(&["bob", "carol"], &[]);
    // Alice writes first: bob holds her sender key of the epoch, and her key for his tags.
    assert_eq!(group(&c, "alice", &["send", "team", "from alice"]).code, 0);
    let out = c.run("bob", &["recv"]);
    assert!(
        out.stdout.ends_with("[alice/team] alice: from alice\n"),
        "{out:?}"
    );
    let out = group(&c, "carol", &["send", "team", "from carol"]);
    assert_eq!(out.code, 0);
    // A hostile server relabels carol's message as alice's. Carol knows alice's chain key
    // (every member does), but not alice's key for bob's tag.
    let n = c.sql().exec(
        "UPDATE messages SET sender = 'alice' WHERE sender = 'carol' AND grp IS NOT NULL",
        &[],
    );
    assert_eq!(n, 1);
    let out = c.run("bob", &["recv"]);
    assert_eq!(out.stdout, "", "nothing forged is shown: {out:?}");
    assert!(
        out.stderr.contains("does not carry a valid tag of alice"),
        "{out:?}"
    );
}

#[test]
fn after_a_member_leaves_the_next_sender_makes_a_new_key() {
    let c = alices_team(&["bob", "carol"], &[]);
    ok(&c, "carol", &["leave", "team"]);
    assert_eq!(c.count("SELECT epoch FROM groups"), 4);
    assert_eq!(
        c.count("SELECT count(*) FROM group_keys WHERE epoch = 4"),
        0
    );
    ok(&c, "bob", &["send", "team", "after carol left"]);
    assert_eq!(
        c.count("SELECT count(*) FROM group_keys WHERE epoch = 4 AND member <> 'carol'"),
        2
    );
    assert_eq!(
        c.count("SELECT count(*) FROM group_keys WHERE epoch = 4 AND member = 'carol'"),
        0
    );
    let out = c.run("alice", &["recv"]);
    assert_eq!(
        out.lines(),
        [
            "[alice/team] * carol left",
            "[alice/team] bob: after carol left"
        ],
        "{out:?}"
    );
}

#[test]
fn a_key_change_must_name_the_key_of_its_makers_last_change() {
    let c = alices_team(&["bob", "mallory"], &[]);
    // mallory, a member, may say she has new keys; with her first change any key is named (no
    // change of hers is checked with it), and the group goes on for everyone.
    let (client, mut e2e) = library_user(&c, "mallory");
    let own = Keystore::new(&c.home(), "mallory")
        .load_identity("password-mallory")
        .unwrap()
        .public()
        .unwrap()
        .ed25519;
    e2e.group_key_change(&client, "alice/team", own.clone())
        .unwrap();
    // Naming a key that did not sign her last change would make the group's earlier links
    // fail for whoever checks them afresh: the server refuses it.
    let err = e2e
        .group_key_change(&client, "alice/team", vec![7; 32])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the key change names a key that did not sign your last change"),
        "{err}"
    );
    let err = e2e
        .group_key_change(&client, "alice/team", vec![7; 31])
        .unwrap_err()
        .to_string();
    assert!(err.contains("32-byte Ed25519 public key"), "{err}");
    let out = c.run("bob", &["recv"]);
    assert!(out.stdout.contains("* mallory has new keys"), "{out:?}");
    assert_eq!(out.stderr, "", "{out:?}");
    c.group_ok("alice", &["send", "team", "still here"]);
    let out = c.run("bob", &["recv"]);
    assert!(
        out.stdout.contains("[alice/team] alice: still here"),
        "{out:?}"
    );
}

/// `user`'s library client and end-to-end state (password `password-USER`).
fn library_user(c: &Cluster, user: &str) -> (Client, E2e) {
    let store = Keystore::new(&c.home(), user);
    let identity = store.load_identity(&format!("password-{user}")).unwrap();
    let client = c.login(user);
    let e2e = E2e::new(
        user,
        identity,
        store,
        Directory::new(&c.balancer_addr, &c.transport, client.session(), None),
    )
    .unwrap();
    (client, e2e)
}

#[test]
fn a_removed_member_is_told_and_a_forged_removal_is_refused() {
    let c = alices_team(&["bob", "carol", "mallory"], &[]);
    // carol follows the group (her client verifies its chain).
    let out = c.run("carol", &["recv"]);
    assert!(out.stdout.contains("* alice added mallory"), "{out:?}");

    // mallory, a member but not the admin, signs a change that removes carol, and sends it to
    // her sealed as a removal: carol's client checks it against the chain and refuses it.
    let (client, mut e2e) = library_user(&c, "mallory");
    let chain = c.group("carol", &["members", "team"]);
    assert_eq!(chain.code, 0, "{chain:?}");
    let roster = e2e.group_roster(&client, "alice/team").unwrap();
    let forged = fastchat::client::e2e::sign_change(
        &Keystore::new(&c.home(), "mallory")
            .load_identity("password-mallory")
            .unwrap(),
        fastchat::net::Change {
            group: "alice/team".into(),
            seq: roster.seq + 1,
            prev: roster.head.clone(),
            by: "mallory".into(),
            action: fastchat::net::Action::Remove("carol".into()),
        },
    )
    .unwrap();
    let body = e2e
        .seal_direct("carol", 99, &fastchat::client::e2e::Plain::Removal(forged))
        .unwrap();
    client.send("carol", 99, &body, None).unwrap();
    let out = c.run("carol", &["recv"]);
    assert_eq!(out.stdout, "", "{out:?}");
    assert!(
        out.stderr
            .contains("does not follow from the group's chain"),
        "{out:?}"
    );

    // The admin removes carol: she is told, although the group's messages no longer reach
    // her.
    c.group_ok("alice", &["remove", "team", "carol"]);
    let out = c.run("carol", &["recv"]);
    assert_eq!(
        out.stdout, "* alice removed you from alice/team\n",
        "{out:?}"
    );
}

/// A group message that comes before its sender's key (a sender that failed over between
/// handing its key out and sending, or a server that delivers out of order) waits for it,
/// unacknowledged, and is shown when it comes; one whose key never comes stays queued for a
/// while, then is reported and let go.
#[test]
fn a_group_message_before_its_senders_key_waits_for_it() {
    let c = alices_team(&["bob"], &["carol"]);
    ok(&c, "alice", &["send", "team", "after its key"]);
    let sql = c.sql();
    // Bob's queue holds alice's sender key (a direct message), then her group message: the
    // key goes behind it.
    let keys: Vec<i64> = c.queued_to("bob").iter().map(|m| m.id).collect();
    assert_eq!(keys.len(), 1, "one sender key for bob");
    let newest = c.count("SELECT max(id) FROM messages");
    sql.exec(
        "UPDATE messages SET id = ?1 WHERE id = ?2",
        &[&(newest + 1000), &keys[0]],
    );
    let out = c.run("bob", &["recv"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("[alice/team] alice: after its key"),
        "{out:?}"
    );
    assert!(!out.stderr.contains("rejected"), "{out:?}");
    assert!(
        !out.stderr.contains("waiting"),
        "nothing left waiting: {out:?}"
    );

    // A new epoch whose key for bob never comes: the message stays queued (bob's place in
    // the group stays before it), and is not reported while it may still come.
    ok(&c, "alice", &["add", "team", "carol"]);
    ok(&c, "alice", &["send", "team", "no key for bob"]);
    let lost = c.group_messages().last().expect("the message").id;
    sql.exec(
        "DELETE FROM messages WHERE recipient = 'bob' AND sender = 'alice'",
        &[],
    );
    let position = || c.count("SELECT position FROM members WHERE user = 'bob'");
    let out = c.run("bob", &["recv"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(!out.stdout.contains("no key for bob"), "{out:?}");
    assert!(!out.stderr.contains("rejected"), "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "group messages waiting for a sender's key: 1 (from alice; message {lost} first)"
        )),
        "the user is told: {out:?}"
    );
    assert!(position() < lost, "not acknowledged while its key may come");
    // An hour later it is reported, and acknowledged.
    sql.exec(
        "UPDATE messages SET sent_at = sent_at - 3600000 WHERE id = ?1",
        &[&lost],
    );
    let out = c.run("bob", &["recv"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "message {lost} from alice rejected: no sender key"
        )),
        "{out:?}"
    );
    assert!(position() >= lost, "let go once it has waited long enough");
}
