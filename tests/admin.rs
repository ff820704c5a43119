//! `fastchat-admin` on a running cluster's database: accounts made in bulk and claimed at
//! signup, password resets and new keys, who is online, queues, kick, delete, export,
//! announce, wipe.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{bin, run_limited, Cluster, Output, LIMIT};
use fastchat::client::e2e::{Directory, E2e};
use fastchat::client::keystore::Keystore;
use serde_json::Value;

/// `fastchat-admin --db DB ARGS`.
fn admin(c: &Cluster, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin("fastchat-admin"));
    cmd.arg("--db")
        .arg(&c.db)
        .args(["--scrypt-log-n", "4"])
        .env_remove("FASTCHAT_DB")
        .env_remove("FASTCHAT_CONFIG")
        .env("HOME", c.dir.path());
    run_limited(cmd.args(args))
}

/// Runs an admin command that must succeed; its JSON lines.
fn admin_json(c: &Cluster, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = admin(c, &all);
    assert_eq!(out.code, 0, "admin {args:?}: {out:?}");
    out.json_lines()
}

/// The users of `users list --json`, by name.
fn user_row(c: &Cluster, name: &str) -> Option<Value> {
    admin_json(c, &["users", "list"])
        .into_iter()
        .find(|u| u["name"] == name)
}

/// `fastchat ARGS` as `user` with `password`.
fn run_pw(c: &Cluster, user: &str, password: &str, args: &[&str]) -> Output {
    run_limited(c.cmd(user).env("FASTCHAT_PASSWORD", password).args(args))
}

/// `out`, which must have succeeded.
fn ok(out: Output) -> Output {
    assert_eq!(out.code, 0, "{out:?}");
    out
}

#[test]
fn a_roster_makes_accounts_that_their_owners_claim_at_signup() {
    let c = Cluster::start(1);
    c.signup("alice");
    let roster = c.dir.path().join("class.txt");
    std::fs::write(&roster, "# class 3b\ncarol password-carol\ndave\n").unwrap();
    let made = admin_json(&c, &["users", "bulk", roster.to_str().unwrap()]);
    assert_eq!(made.len(), 2, "{made:?}");
    assert_eq!(
        (&made[0]["user"], &made[0]["created"]),
        (&"carol".into(), &true.into())
    );
    assert!(
        made[0]["password"].is_null(),
        "a given password is not printed"
    );
    let dave_pw = made[1]["password"]
        .as_str()
        .expect("a generated password")
        .to_string();
    assert_eq!(dave_pw.len(), 14, "{dave_pw}");
    // The hash is stored, never the password.
    assert_eq!(
        c.count(&format!(
            "SELECT count(*) FROM users WHERE password_hash LIKE '%{dave_pw}%'"
        )),
        0
    );
    // Run again: nothing changes, no password is printed again.
    let again = admin_json(&c, &["users", "bulk", roster.to_str().unwrap()]);
    assert!(
        again
            .iter()
            .all(|r| r["created"] == false && r["password"].is_null()),
        "{again:?}"
    );
    assert_eq!(user_row(&c, "carol").unwrap()["has_keys"], false);

    // Nobody can write to an unclaimed account yet, and the reason is said.
    let out = c.run("alice", &["send", "carol", "too early"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("not finished signing up"), "{out:?}");

    // A wrong password claims nothing: the name is taken.
    let out = run_pw(&c, "dave", "not-the-password", &["signup", "dave"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("taken"), "{out:?}");
    assert_eq!(user_row(&c, "dave").unwrap()["has_keys"], false);

    let out = c.run("carol", &["signup", "carol", "--json"]);
    assert_eq!(out.code, 0, "{out:?}");
    let claimed: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(
        (&claimed["created"], &claimed["claimed"]),
        (&true.into(), &true.into())
    );
    let out = run_pw(&c, "dave", &dave_pw, &["signup", "dave"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.starts_with("claimed dave"), "{out:?}");
    assert_eq!(user_row(&c, "dave").unwrap()["has_keys"], true);

    // A claimed account takes no other keys: a second claim, from a machine without its keys,
    // is refused even with the right password.
    let elsewhere = c.dir.path().join("elsewhere");
    let out = run_limited(
        c.cmd("carol")
            .env("FASTCHAT_HOME", &elsewhere)
            .args(["signup", "carol"]),
    );
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("taken"), "{out:?}");

    c.send("alice", "carol", "welcome");
    let out = c.run("carol", &["recv"]);
    assert_eq!(out.stdout, "alice: welcome\n", "{out:?}");
}

#[test]
fn a_reset_password_lets_its_owner_make_new_keys_once() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    c.send("bob", "alice", "before");
    // Alice has sessions and a group's sender chains, sealed under her old keys.
    for args in [
        &["group", "create", "team"][..],
        &["group", "add", "team", "bob"],
        &["group", "send", "team", "old keys"],
    ] {
        let out = c.run("alice", args);
        assert_eq!(out.code, 0, "{out:?}");
    }
    // Not without a reset: a stolen password must not be able to swap keys.
    let out = c.run("alice", &["rekey"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("already has keys"), "{out:?}");

    // Names are unique regardless of case, and found so.
    let out = admin(
        &c,
        &[
            "users",
            "reset-password",
            "ALICE",
            "--password",
            "new-password",
        ],
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.starts_with("reset alice"), "{out:?}");
    assert_eq!(user_row(&c, "alice").unwrap()["may_rekey"], true);
    let out = c.run("alice", &["recv"]);
    assert_eq!(out.code, 1, "the old password is refused: {out:?}");
    // The new one is taken, but the keys are still under the old: she is told what to run,
    // by a one-shot command and by `login` alike.
    for args in [&["recv"][..], &["login"]] {
        let out = run_pw(&c, "alice", "new-password", args);
        assert_eq!(out.code, 1, "{out:?}");
        assert!(
            out.stderr.contains("fastchat --user alice rekey"),
            "{args:?}: {out:?}"
        );
    }

    let out = run_pw(&c, "alice", "new-password", &["rekey", "--json"]);
    assert_eq!(out.code, 0, "{out:?}");
    let keys = c.home().join("alice");
    assert!(keys.join("identity.key").exists() && keys.join("identity.key.old").exists());
    // What was sealed under the old keys is gone: conversations and chains start again.
    assert!(!keys.join("sessions").exists() && !keys.join("senderkeys").exists());
    assert!(keys.join("prekeys").exists());
    assert_eq!(user_row(&c, "alice").unwrap()["may_rekey"], false);
    let out = run_pw(&c, "alice", "new-password", &["rekey"]);
    assert_eq!(out.code, 1, "once only: {out:?}");

    // bob pinned alice's old keys: he is told they changed, and trusts the new ones.
    let out = c.run("bob", &["send", "alice", "after"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("CHANGED"), "{out:?}");
    let out = c.run("bob", &["trust", "alice"]);
    assert_eq!(out.code, 0, "{out:?}");
    c.send("bob", "alice", "after");
    let out = run_pw(&c, "alice", "new-password", &["recv"]);
    assert!(out.stdout.ends_with("bob: after\n"), "{out:?}");
}

#[test]
fn after_new_keys_a_group_goes_on_and_a_new_member_checks_its_whole_chain() {
    let c = Cluster::start(1);
    for u in ["alice", "bob", "carol"] {
        c.signup(u);
    }
    for args in [
        &["group", "create", "team"][..],
        &["group", "add", "team", "bob"],
        &["group", "send", "team", "old keys"],
    ] {
        ok(c.run("alice", args));
    }
    let out = ok(c.run("bob", &["recv"]));
    assert!(
        out.stdout.contains("[alice/team] alice: old keys"),
        "{out:?}"
    );

    // Alice, the admin, loses her keys: an operator resets her password, she makes new ones,
    // and her key change goes into the group's chain.
    ok(admin(
        &c,
        &[
            "users",
            "reset-password",
            "alice",
            "--password",
            "new-password",
        ],
    ));
    let out = ok(run_pw(&c, "alice", "new-password", &["rekey", "--json"]));
    let said: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(said["groups"], serde_json::json!(["alice/team"]), "{out:?}");
    assert_eq!(said["groups_failed"], serde_json::json!([]), "{out:?}");

    // bob trusts her new keys; the group goes on both ways, in an epoch keyed with them.
    ok(c.run("bob", &["trust", "alice"]));
    ok(run_pw(
        &c,
        "alice",
        "new-password",
        &["group", "send", "team", "new keys"],
    ));
    let out = ok(c.run("bob", &["recv"]));
    assert!(out.stdout.contains("alice has new keys"), "{out:?}");
    assert!(
        out.stdout.contains("[alice/team] alice: new keys"),
        "{out:?}"
    );
    assert_eq!(out.stderr, "", "{out:?}");
    ok(c.run("bob", &["group", "send", "team", "bob after"]));
    let out = ok(run_pw(&c, "alice", "new-password", &["recv"]));
    assert!(
        out.stdout.contains("[alice/team] bob: bob after"),
        "{out:?}"
    );

    // carol, added after, checks the whole chain afresh: alice's changes before her key
    // change with the key it names, the ones after with her new key.
    let read = carol_joins_and_reads(&c, "new-password", "welcome carol");
    assert!(!read.contains("old keys"), "{read:?}");
    let out = ok(c.run("carol", &["group", "members", "alice/team"]));
    assert_eq!(out.stderr, "", "{out:?}");
    assert!(out.stdout.contains("carol"), "{out:?}");
}

#[test]
fn a_running_client_follows_a_key_change_once_its_user_trusts_the_new_keys() {
    let c = Cluster::start(1);
    for u in ["alice", "bob"] {
        c.signup(u);
    }
    for args in [
        &["group", "create", "team"][..],
        &["group", "add", "team", "bob"],
    ] {
        assert_eq!(c.run("alice", args).code, 0);
    }
    // bob's client runs throughout (as a chat would), with alice's keys in its memory.
    let store = Keystore::new(&c.home(), "bob");
    let identity = store.load_identity("password-bob").unwrap();
    let client = c.login("bob");
    let mut bob = E2e::new(
        "bob",
        identity,
        store,
        Directory::new(&c.balancer_addr, &c.transport, client.session(), None),
    )
    .unwrap();
    assert_eq!(
        bob.group_roster(&client, "alice/team").unwrap().members,
        ["alice", "bob"]
    );
    admin(
        &c,
        &[
            "users",
            "reset-password",
            "alice",
            "--password",
            "new-password",
        ],
    );
    assert_eq!(run_pw(&c, "alice", "new-password", &["rekey"]).code, 0);
    // Told that her keys changed (not that the server forges), until bob trusts them, from
    // another process; then the running client follows.
    let err = bob
        .group_roster(&client, "alice/team")
        .unwrap_err()
        .to_string();
    assert!(err.contains("the keys of alice have CHANGED"), "{err}");
    assert_eq!(c.run("bob", &["trust", "alice"]).code, 0);
    let roster = bob.group_roster(&client, "alice/team").unwrap();
    assert_eq!(roster.seq, 3, "the key change is the third link");
}

#[test]
fn a_key_change_that_failed_at_rekey_is_added_later() {
    let c = Cluster::start(1);
    for u in ["alice", "bob", "carol"] {
        c.signup(u);
    }
    ok(c.run("alice", &["group", "create", "team"]));
    ok(c.run("alice", &["group", "add", "team", "bob"]));
    let out = c.run("alice", &["group", "key-change", "team"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("were never made again"), "{out:?}");
    // bob makes new keys first: alice still has his old ones pinned, so her own key change,
    // keyed for bob among others, cannot be made when she rekeys.
    for (user, pw) in [("bob", "bob-new-password"), ("alice", "alice-new-password")] {
        ok(admin(
            &c,
            &["users", "reset-password", user, "--password", pw],
        ));
    }
    ok(run_pw(&c, "bob", "bob-new-password", &["rekey"]));
    let out = ok(run_pw(
        &c,
        "alice",
        "alice-new-password",
        &["rekey", "--json"],
    ));
    let said: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(said["groups"], serde_json::json!([]), "{out:?}");
    assert_eq!(said["groups_failed"][0]["group"], "alice/team", "{out:?}");
    assert!(
        out.stderr
            .contains("run `fastchat group key-change alice/team`"),
        "{out:?}"
    );
    // Once she trusts bob's new keys, she adds it; carol, added after, checks the chain.
    ok(run_pw(&c, "alice", "alice-new-password", &["trust", "bob"]));
    let out = ok(run_pw(
        &c,
        "alice",
        "alice-new-password",
        &["group", "key-change", "team"],
    ));
    assert!(
        out.stdout
            .starts_with("added your key change to alice/team"),
        "{out:?}"
    );
    // Twice is refused: her last change is now signed with her new keys.
    let out = run_pw(
        &c,
        "alice",
        "alice-new-password",
        &["group", "key-change", "team"],
    );
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("did not sign your last change"),
        "{out:?}"
    );
    carol_joins_and_reads(&c, "alice-new-password", "hi carol");
}

/// alice (password `pw`) adds carol to `alice/team` and greets her; carol, who checks the
/// group's whole chain afresh, reads the greeting without a warning. Returns what she read.
fn carol_joins_and_reads(c: &Cluster, pw: &str, greeting: &str) -> String {
    for args in [
        &["group", "add", "team", "carol"][..],
        &["group", "send", "team", greeting],
    ] {
        let out = run_pw(c, "alice", pw, args);
        assert_eq!(out.code, 0, "{out:?}");
    }
    let out = c.run("carol", &["recv"]);
    assert_eq!((out.code, out.stderr.as_str()), (0, ""), "{out:?}");
    let want = format!("[alice/team] alice: {greeting}");
    assert!(out.stdout.contains(&want), "{out:?}");
    out.stdout
}

#[test]
fn operators_see_queues_and_who_is_online_and_purge_kick_and_delete() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    for i in 0..3 {
        c.send("alice", "bob", &format!("secret number {i}"));
    }
    let queues = admin_json(&c, &["queues"]);
    assert_eq!(queues.len(), 1, "{queues:?}");
    assert_eq!(
        (&queues[0]["user"], &queues[0]["queued"]),
        (&"bob".into(), &3.into())
    );

    // The export shows what the server holds: metadata and ciphertext, no plaintext.
    let out = admin(&c, &["export", "bob"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.lines().len(), 3, "{out:?}");
    let first: Value = serde_json::from_str(out.lines()[0]).unwrap();
    assert_eq!(
        (&first["from"], &first["to"]),
        (&"alice".into(), &"bob".into())
    );
    let plain = fastchat::crypto::to_hex(b"secret number");
    assert!(
        !out.stdout.contains(&plain) && !out.stdout.contains("secret"),
        "{out:?}"
    );

    let purged = admin_json(&c, &["purge", "bob"]);
    assert_eq!(purged[0]["purged"], 3);
    assert!(admin_json(&c, &["queues"]).is_empty());
    let out = c.run("bob", &["recv"]);
    assert_eq!((out.code, out.stdout.as_str()), (0, ""), "{out:?}");

    // bob waits for messages; the operator sees him, kicks him, and his command ends.
    let mut waiting = c.spawn("bob", &["recv", "--wait", "60"]);
    // Connected with a live session (the connection of the `recv` before may linger).
    let deadline = Instant::now() + LIMIT;
    while c.count(
        "SELECT count(*) FROM presence p JOIN sessions s ON s.token_hash = p.token_hash \
          WHERE p.user = 'bob'",
    ) != 1
        || c.count("SELECT count(*) FROM presence WHERE user = 'bob'") != 1
    {
        assert!(Instant::now() < deadline, "bob never connected");
        std::thread::sleep(Duration::from_millis(50));
    }
    let online = admin_json(&c, &["online"]);
    assert_eq!(online.len(), 1, "{online:?}");
    assert_eq!(
        (&online[0]["user"], &online[0]["connections"]),
        (&"bob".into(), &1.into())
    );
    assert!(
        online[0]["server"].as_str().is_some_and(|s| !s.is_empty()),
        "{online:?}"
    );
    let kicked = admin_json(&c, &["kick", "bob"]);
    assert_eq!(kicked[0]["sessions"], 1);
    let status = waiting
        .wait_exit(LIMIT)
        .expect("a kicked user's command ends");
    assert_ne!(status.code(), Some(0));
    c.wait_online("bob", 0);

    // Deleting: the account and its queue go; others' messages to it are refused.
    c.send("alice", "bob", "one more");
    let gone = admin_json(&c, &["users", "delete", "Bob"]);
    assert_eq!(
        (&gone[0]["user"], &gone[0]["messages_deleted"]),
        (&"bob".into(), &1.into())
    );
    assert!(user_row(&c, "bob").is_none());
    assert_eq!(c.count("SELECT count(*) FROM messages"), 0);
    let out = c.run("alice", &["send", "bob", "anyone?"]);
    assert_eq!(out.code, 1, "{out:?}");
    let out = admin(&c, &["purge", "bob"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("no such user: bob"), "{out:?}");
    // The name is free again: bob's keys, still on his machine, sign him up anew.
    let out = c.run("bob", &["signup", "bob", "--exist-ok", "--json"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("\"created\":true"), "{out:?}");
}

#[test]
fn a_member_whose_account_is_deleted_is_removed_by_the_admin_and_the_group_goes_on() {
    let c = Cluster::start(1);
    for u in ["alice", "bob", "carol"] {
        c.signup(u);
    }
    c.group_ok("alice", &["create", "team"]);
    c.group_ok("alice", &["add", "team", "bob", "carol"]);
    c.group_ok("carol", &["send", "team", "before"]);
    let gone = admin_json(&c, &["users", "delete", "bob"]);
    assert_eq!(gone[0]["groups_left"], serde_json::json!(["alice/team"]));
    // The server no longer lists bob; the signed chain does until the admin removes him.
    // Nothing is sent meanwhile, and each member is told why and by whom it is mended.
    let out = c.group("carol", &["send", "team", "after"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains(
            "the account of bob in alice/team was deleted by an operator; its admin, alice, \
             must remove them first"
        ),
        "{out:?}"
    );
    let out = c.group("alice", &["send", "team", "after"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("remove them first: fastchat group remove alice/team NAME"),
        "{out:?}"
    );
    // The admin's removal is taken (without a word about telling bob), and the group goes on.
    let out = c.group("alice", &["remove", "team", "bob"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stderr, "", "{out:?}");
    c.group_ok("carol", &["send", "team", "after"]);
    let out = c.run("alice", &["recv"]);
    assert!(
        out.stdout.ends_with("[alice/team] carol: after\n"),
        "{out:?}"
    );
    let members = c.group_ok("carol", &["members", "team"]);
    assert_eq!(members, "alice (admin)\ncarol\n");
    // Only a member whose account is gone can be removed that way.
    let out = c.group("alice", &["remove", "team", "dave"]);
    assert_eq!(out.code, 1, "{out:?}");
}

#[test]
fn an_announcement_reaches_every_user_with_keys_end_to_end() {
    let c = Cluster::start(2);
    for u in ["teacher", "s1", "s2"] {
        c.signup(u);
    }
    let out = admin(&c, &["users", "add", "late", "--password", "password-late"]);
    assert_eq!(out.code, 0, "{out:?}");
    let mut cmd = Command::new(bin("fastchat-admin"));
    cmd.arg("--db")
        .arg(&c.db)
        .args(["announce", "--as", "teacher", "Exam at 10"])
        .args(["--balancer", &c.balancer_addr, "--ca"])
        .arg(c.ca())
        .arg("--home")
        .arg(c.home())
        .env("FASTCHAT_PASSWORD", "password-teacher");
    let out = run_limited(&mut cmd);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.lines().len(),
        2,
        "s1 and s2, not the unclaimed account: {out:?}"
    );
    for s in ["s1", "s2"] {
        let out = c.run(s, &["recv"]);
        assert_eq!(out.stdout, "teacher: Exam at 10\n", "{out:?}");
    }
    // The server stored ciphertext only.
    let out = admin(&c, &["export"]);
    assert!(
        !out.stdout.contains(&fastchat::crypto::to_hex(b"Exam")),
        "{out:?}"
    );
}

#[test]
fn wipe_deletes_a_class_only_when_told_twice() {
    let c = Cluster::start(1);
    for u in ["teacher", "s1", "s2"] {
        c.signup(u);
    }
    let roster = c.dir.path().join("class.txt");
    std::fs::write(&roster, "s1\nS2\nnever-made\n").unwrap();
    let out = admin(&c, &["wipe", roster.to_str().unwrap()]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("--yes"), "{out:?}");
    assert_eq!(c.count("SELECT count(*) FROM users"), 3);

    let out = admin(&c, &["wipe", roster.to_str().unwrap(), "--yes"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.ends_with("wiped 2 accounts\n"), "{out:?}");
    let names: Vec<Value> = admin_json(&c, &["users", "list"])
        .into_iter()
        .map(|u| u["name"].clone())
        .collect();
    assert_eq!(names, vec![Value::from("teacher")]);
    let out = admin(&c, &["wipe", "--all", "--yes"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(c.count("SELECT count(*) FROM users"), 0);
}

#[test]
fn bad_input_is_refused_clearly_and_changes_nothing() {
    let c = Cluster::start(0);
    // No --db.
    let out = run_limited(
        Command::new(bin("fastchat-admin"))
            .env_remove("FASTCHAT_DB")
            .env("HOME", c.dir.path())
            .args(["users", "list"]),
    );
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("--db"), "{out:?}");
    // A database that does not exist is not made.
    let missing = c.dir.path().join("typo.db");
    let out = run_limited(
        Command::new(bin("fastchat-admin"))
            .arg("--db")
            .arg(&missing)
            .env("HOME", c.dir.path())
            .args(["users", "list"]),
    );
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("no database at"), "{out:?}");
    assert!(!missing.exists());
    // A roster with bad lines does nothing at all.
    let roster = c.dir.path().join("bad.txt");
    std::fs::write(&roster, "ok1\nbad/name\nok2\nOK1\n").unwrap();
    let out = admin(&c, &["users", "bulk", roster.to_str().unwrap()]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("line 2") && out.stderr.contains("line 4"),
        "{out:?}"
    );
    assert_eq!(c.count("SELECT count(*) FROM users"), 0);
    // An empty table says so, rather than print a header alone.
    for (args, nothing) in [
        (&["users", "list"][..], "no accounts ("),
        (&["online"], "nobody is online"),
        (&["queues"], "no direct messages are waiting"),
    ] {
        let out = admin(&c, args);
        assert_eq!(out.code, 0, "{out:?}");
        assert_eq!(out.lines().len(), 1, "{out:?}");
        assert!(out.lines()[0].starts_with(nothing), "{out:?}");
        assert!(admin_json(&c, args).is_empty());
    }
    let out = admin(&c, &["users", "reset-password", "ghost"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("no such user: ghost"), "{out:?}");
    // Text output for people has a header line and one row per user.
    let out = admin(&c, &["users", "add", "solo"]);
    assert_eq!(out.code, 0, "{out:?}");
    let out = admin(&c, &["users", "list"]);
    assert_eq!(out.lines().len(), 2, "{out:?}");
    assert!(out.lines()[0].starts_with("USER"), "{out:?}");
    assert!(out.lines()[1].contains("unclaimed"), "{out:?}");
}

#[test]
fn a_single_account_is_checked_like_a_roster_line() {
    let c = Cluster::start(0);
    let out = admin(&c, &["users", "add", "bad/name"]);
    assert_eq!(out.code, 1, "{out:?}");
    for short in ["", "seven77"] {
        let out = admin(&c, &["users", "add", "ok", "--password", short]);
        assert_eq!(out.code, 1, "{out:?}");
        assert!(out.stderr.contains("at least 8 characters"), "{out:?}");
    }
    assert_eq!(c.count("SELECT count(*) FROM users"), 0);
}
