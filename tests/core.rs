//! The core: signup, login, direct messages online and offline, storage, errors, hostile frames.
//! Every test runs the real binaries on 127.0.0.1 with a fresh temporary database.

mod common;

use std::time::Duration;

use common::{raw_exchange, Cluster};
use fastchat::client::{BalancerClient, Connection, Incoming, Session};
use fastchat::net::{
    self, BalancerReply, ErrorCode, FrameReader, NewMessage, Request, Response, ServerEvent,
    ServerReply, ServerRequest,
};

#[test]
fn signup_enforces_names_and_uniqueness() {
    let c = Cluster::start(1);
    c.signup("alice");
    // The same name from another machine (another key folder) is refused by the balancer.
    let out = c
        .cmd("alice")
        .env("FASTCHAT_HOME", c.dir.path().join("elsewhere"))
        .args(["signup", "alice"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the name alice is taken"));
    // Names ignore case for uniqueness: Alice is alice's name too.
    let out = c.run("Alice", &["signup", "Alice"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("the name Alice is taken"), "{out:?}");

    let long = "x".repeat(33);
    for bad in [
        "",
        "a b",
        "../x",
        "al/ice",
        long.as_str(),
        "bob\u{7}",
        "Robert'); DROP TABLE users;--",
    ] {
        let out = c.run("nobody", &["signup", bad]);
        assert_eq!(out.code, 1, "{bad:?}: {out:?}");
        assert!(
            out.stderr.starts_with("fastchat: error: user name"),
            "{bad:?}: {out:?}"
        );
        assert_eq!(out.stderr.lines().count(), 1, "one line: {out:?}");
    }
    assert_eq!(c.count("SELECT count(*) FROM users"), 1);
}

#[test]
fn a_new_password_has_eight_characters_at_least() {
    let c = Cluster::start(1);
    // Counted in characters, not bytes: seven two-byte letters are too short.
    for short in ["", "1234567", "ééééééé"] {
        let out = common::run_limited(
            c.cmd("dave")
                .env("FASTCHAT_PASSWORD", short)
                .args(["signup", "dave"]),
        );
        assert_eq!(out.code, 1, "{short:?}: {out:?}");
        assert_eq!(
            out.stderr.trim(),
            "fastchat: error: a password must be at least 8 characters long (it also protects \
             your private keys on this machine)",
            "{short:?}"
        );
        // Refused before any key was made.
        assert!(!c.home().join("dave").join("identity.key").exists());
    }
    // The balancer refuses it too, from a client that does not check.
    let keys = fastchat::crypto::Identity::generate()
        .unwrap()
        .public()
        .unwrap();
    let err = BalancerClient::connect(&c.balancer_addr, &c.transport)
        .unwrap()
        .signup("dave", "1234567", keys.clone(), None)
        .unwrap_err();
    assert!(
        matches!(&err, fastchat::Error::Refused { code: ErrorCode::BadRequest, message }
            if message.contains("at least 8 characters")),
        "{err:?}"
    );
    assert_eq!(c.count("SELECT count(*) FROM users"), 0);
    // Eight will do, whatever they are.
    let out = common::run_limited(
        c.cmd("dave")
            .env("FASTCHAT_PASSWORD", "ééééééé8")
            .args(["signup", "dave"]),
    );
    assert_eq!(out.code, 0, "{out:?}");
    // Logging in takes any password the account has (accounts made before the rule).
    let out = common::run_limited(
        c.cmd("dave")
            .env("FASTCHAT_PASSWORD", "short")
            .args(["whoami"]),
    );
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("invalid username or password"),
        "{out:?}"
    );
}

#[test]
fn passwords_are_stored_only_as_salted_scrypt_hashes() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    let rows: Vec<(String, String)> = c
        .sql()
        .rows("SELECT name, password_hash FROM users ORDER BY name", &[])
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows.len(), 2);
    for (name, hash) in &rows {
        assert!(hash.starts_with("scrypt$4$8$1$"), "cheap test cost: {hash}");
        assert!(!hash.contains(&format!("password-{name}")));
    }
    assert_ne!(
        rows[0].1.split('$').nth(4),
        rows[1].1.split('$').nth(4),
        "distinct salts"
    );
    // No password anywhere in the database files.
    assert!(common::dir_contains(c.dir.path(), b"password-alice")
        .iter()
        .all(|p| !p.to_string_lossy().contains("chat.db")));
}

#[test]
fn login_needs_the_right_password() {
    let c = Cluster::start(1);
    c.signup("alice");
    let ok = c.run("alice", &["whoami"]);
    assert_eq!(ok.code, 0, "{ok:?}");
    assert!(
        ok.stdout.starts_with("alice on server 1 at 127.0.0.1:"),
        "{ok:?}"
    );

    for (user, password) in [
        ("alice", "wrong"),
        ("nobody", "password-nobody"),
        ("alice", ""),
    ] {
        let out = common::run_limited(
            c.cmd(user)
                .env("FASTCHAT_PASSWORD", password)
                .args(["send", "alice", "hi"]),
        );
        assert_eq!(out.code, 1, "{out:?}");
        assert_eq!(
            out.stderr.trim(),
            "fastchat: error: invalid username or password"
        );
    }
    assert_eq!(c.count("SELECT count(*) FROM messages"), 0);
}

#[test]
fn sessions_are_random_hashed_tokens_with_expiry() {
    let c = Cluster::start(1);
    c.signup("alice");
    let mut b = BalancerClient::connect(&c.balancer_addr, &c.transport).unwrap();
    let s1 = b.login("alice", "password-alice").unwrap();
    let s2 = b.login("alice", "password-alice").unwrap();
    assert_ne!(s1.token, s2.token);
    assert_eq!(s1.token.len(), 64);
    let rows: Vec<(Vec<u8>, String, i64)> = c
        .sql()
        .rows("SELECT token_hash, user, expires_at FROM sessions", &[])
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(rows.len(), 2);
    let now = fastchat::db::now_ms();
    for (hash, user, expires) in &rows {
        assert_eq!(hash.len(), 32);
        assert_eq!(user, "alice");
        assert!(*expires > now && *expires < now + 25 * 3600 * 1000);
    }
    let hashes: Vec<&Vec<u8>> = rows.iter().map(|r| &r.0).collect();
    let expected = fastchat::crypto::token_hash(s1.token.as_bytes()).unwrap();
    assert!(
        hashes.contains(&&expected),
        "stored as SHA-256 of the token"
    );
    assert!(!hashes.iter().any(|h| h.as_slice() == s1.token.as_bytes()));

    // An expired session is refused by the server.
    c.sql().exec("UPDATE sessions SET expires_at = 0", &[]);
    let err = Connection::open(&s1, &c.transport)
        .err()
        .expect("expired token refused");
    assert!(
        err.to_string().contains("invalid or expired session"),
        "{err}"
    );
}

#[test]
fn identity_comes_from_the_token_only() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    let mut b = BalancerClient::connect(&c.balancer_addr, &c.transport).unwrap();
    let session = b.login("alice", "password-alice").unwrap();

    // A made-up token is refused.
    let forged = Session {
        token: "00".repeat(32),
        ..session.clone()
    };
    let err = Connection::open(&forged, &c.transport)
        .err()
        .expect("forged token refused");
    assert!(matches!(
        err,
        fastchat::Error::Refused {
            code: ErrorCode::InvalidToken,
            ..
        }
    ));

    // A real one: the server says who we are, and stores messages under that name.
    let conn = Connection::open(&session, &c.transport).unwrap();
    assert_eq!(conn.user, "alice");
    conn.call(&ServerRequest::Send {
        to: "bob".into(),
        message: NewMessage {
            client_id: 7,
            body: b"opaque".to_vec(),
            file: None,
            resend_after: None,
            patient: false,
        },
    })
    .unwrap();
    let sender: String = c.sql().one("SELECT sender FROM messages", &[]);
    assert_eq!(sender, "alice");
    // A patient sender's Stored may wait for the next thing the server sends it; on a
    // connection with nothing else coming, its thread wakes for it alone, soon.
    let reply = conn
        .call(&ServerRequest::Send {
            to: "bob".into(),
            message: NewMessage {
                client_id: 8,
                body: b"patient".to_vec(),
                file: None,
                resend_after: None,
                patient: true,
            },
        })
        .unwrap();
    assert!(matches!(reply, ServerReply::Stored { .. }), "{reply:?}");

    // A request before Hello is refused and the connection closed.
    let mut frame = Vec::new();
    net::encode_into(
        &mut frame,
        &Request {
            id: 1,
            body: ServerRequest::Send {
                to: "bob".into(),
                message: NewMessage {
                    client_id: 1,
                    body: b"x".to_vec(),
                    file: None,
                    resend_after: None,
                    patient: false,
                },
            },
        },
    )
    .unwrap();
    let answer = raw_exchange(&c.server_addrs[0], &frame);
    let mut r = FrameReader::new(&answer[..]);
    match r.read::<ServerEvent>().unwrap() {
        Some(ServerEvent::Reply(Response {
            id: None,
            result: Err(refusal),
        })) => {
            assert_eq!(refusal.code, ErrorCode::BadRequest);
            assert!(refusal.message.contains("Hello"), "{refusal:?}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(c.count("SELECT count(*) FROM messages"), 2);
}

#[test]
fn live_message_arrives_while_recipient_is_connected() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    let bob = c.spawn("bob", &["recv", "--wait", "15"]);
    c.wait_online("bob", 1);
    c.send("alice", "bob", "are you there?");
    assert_eq!(bob.line(), "alice: are you there?");
    c.send("alice", "bob", "second");
    assert_eq!(bob.line(), "alice: second");
}

#[test]
fn offline_messages_arrive_in_order_once() {
    let c = Cluster::start(1);
    for u in ["alice", "bob", "carol"] {
        c.signup(u);
    }
    for i in 1..=5 {
        c.send("alice", "bob", &format!("a{i}"));
        c.send("carol", "bob", &format!("c{i}"));
    }
    let out = c.run("bob", &["recv"]);
    assert_eq!(out.code, 0, "{out:?}");
    let lines = out.lines();
    assert_eq!(lines.len(), 10, "{out:?}");
    let from_alice: Vec<&str> = lines
        .iter()
        .filter(|l| l.starts_with("alice"))
        .copied()
        .collect();
    assert_eq!(
        from_alice,
        [
            "alice: a1",
            "alice: a2",
            "alice: a3",
            "alice: a4",
            "alice: a5"
        ]
    );
    assert_eq!(lines[0], "alice: a1");
    assert_eq!(lines[1], "carol: c1");
    // Acknowledged, so removed: a second recv prints nothing.
    assert_eq!(c.count("SELECT count(*) FROM messages"), 0);
    let again = c.run("bob", &["recv"]);
    assert_eq!((again.code, again.stdout.as_str()), (0, ""));
}

#[test]
fn a_client_id_reused_for_another_message_is_refused_not_dropped() {
    let c = Cluster::start(1);
    for u in ["alice", "bob", "carol"] {
        c.signup_lib(u);
    }
    let alice = c.login("alice");
    let first = alice.send("bob", 7, b"one", None).unwrap();
    // The same request again is a re-send: the same message, stored once.
    assert_eq!(alice.send("bob", 7, b"one", None).unwrap(), first);
    // The same id for another recipient or another body is a mistake the sender hears of.
    for (to, body) in [("carol", &b"one"[..]), ("bob", &b"two"[..])] {
        match alice.send(to, 7, body, None) {
            Err(fastchat::Error::Refused {
                code: ErrorCode::Conflict,
                message,
            }) => assert!(
                message.contains("client id 7 was already used"),
                "{message}"
            ),
            other => panic!("expected a conflict, got {other:?}"),
        }
    }
    assert_eq!(c.count("SELECT count(*) FROM messages"), 1);
}

#[test]
fn recv_json_prints_one_object_per_line() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    c.send("alice", "bob", "line one\nline two \"quoted\"");
    let out = c.run("bob", &["recv", "--json"]);
    assert_eq!(out.code, 0, "{out:?}");
    let v: serde_json::Value = serde_json::from_str(out.lines()[0]).unwrap();
    assert_eq!(v["from"], "alice");
    assert_eq!(v["to"], "bob");
    assert_eq!(v["text"], "line one\nline two \"quoted\"");
}

#[test]
fn control_characters_cannot_break_the_one_line_format() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    c.send("alice", "bob", "two\nlines \u{1b}[2J");
    let out = c.run("bob", &["recv"]);
    assert_eq!(out.lines(), ["alice: two\\nlines \\u{1b}[2J"]);
}

#[test]
fn stored_messages_survive_a_server_crash() {
    let mut c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    for i in 0..3 {
        c.send("alice", "bob", &format!("m{i}"));
    }
    c.servers[0].kill9();
    c.add_server();
    // The dead server is out of rotation within two seconds; until then logins may land on it.
    let deadline = std::time::Instant::now() + common::LIMIT;
    let out = loop {
        let out = c.run("bob", &["recv"]);
        if out.code == 0 || std::time::Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.lines(), ["alice: m0", "alice: m1", "alice: m2"]);
}

#[test]
fn bad_requests_are_one_line_errors_and_store_nothing() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    let cases: [(&[&str], &str); 6] = [
        (
            &["send", "nobody", "hi"],
            "fastchat: error: no such user: nobody",
        ),
        // No key of alice's would open it.
        (
            &["send", "alice", "a note to self"],
            "fastchat: error: you cannot send a message to yourself",
        ),
        (
            &["send-file", "alice", "Cargo.toml"],
            "fastchat: error: you cannot send a message to yourself",
        ),
        (
            &["send", "bob", ""],
            "fastchat: error: empty message: nothing was sent",
        ),
        (
            &["send", "b ob", "hi"],
            "fastchat: error: recipient name \"b ob\" contains a space",
        ),
        (
            &["send", "../etc", "hi"],
            "fastchat: error: recipient name \"../etc\" contains '/'",
        ),
    ];
    for (args, expected) in cases {
        let out = c.run("alice", args);
        assert_eq!(out.code, 1, "{args:?}: {out:?}");
        assert!(out.stderr.trim().starts_with(expected), "{args:?}: {out:?}");
        assert_eq!(out.stderr.lines().count(), 1);
    }
    assert_eq!(c.count("SELECT count(*) FROM messages"), 0);
    // Nothing was uploaded for the file either.
    assert_eq!(c.count("SELECT count(*) FROM files"), 0);
    // A client that sends one to itself anyway is refused by the server.
    let alice = c.login("alice");
    match alice.send("alice", 1, b"opaque", None) {
        Err(fastchat::error::Error::Refused { code, message }) => {
            assert_eq!(code, fastchat::net::ErrorCode::BadRequest);
            assert_eq!(message, fastchat::net::TO_YOURSELF);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.count("SELECT count(*) FROM messages"), 0);

    let out = common::run_limited(
        c.cmd("alice")
            .env("FASTCHAT_BALANCER", "127.0.0.1:1")
            .args(["send", "bob", "hi"]),
    );
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out
        .stderr
        .starts_with("fastchat: error: cannot reach balancer at 127.0.0.1:1"));
    let out = common::run_limited(
        c.cmd("alice")
            .env_remove("FASTCHAT_USER")
            .args(["send", "bob", "hi"]),
    );
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("--user"), "{out:?}");
}

#[test]
fn usage_errors_exit_2_and_help_explains() {
    let c = Cluster::start(0);
    let out = c.run("alice", &["frobnicate"]);
    assert_eq!(out.code, 2);
    // A mistyped address is a usage error; one that does not resolve is unreachable (3).
    let out = c.run(
        "alice",
        &["--balancer", "127.0.0.1:7000,localhost", "whoami"],
    );
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr.contains("\"localhost\" is not an address"),
        "{out:?}"
    );
    let out = c.run("alice", &["--balancer", "nohost.invalid:7000", "whoami"]);
    assert_eq!(out.code, 3, "{out:?}");
    for bin in [
        "fastchat",
        "fastchat-balancer",
        "fastchat-server",
        "fastchat-bench",
    ] {
        let out = common::run_limited(std::process::Command::new(common::bin(bin)).arg("--help"));
        assert_eq!(out.code, 0);
        assert!(out.stdout.contains("Usage:"), "{bin}: {out:?}");
        assert!(out.stdout.contains("Exit codes"), "{bin}: {out:?}");
    }
    // Values that could only make a useless process are usage errors, named before anything
    // starts (no database is made).
    let db = c.dir.path().join("never.db");
    let db = db.to_str().unwrap();
    for (bin, args, says) in [
        (
            "fastchat-server",
            &["--listen", "nonsense"][..],
            "not an address: give HOST:PORT",
        ),
        ("fastchat-server", &["--metrics", "9101"], "not an address"),
        (
            "fastchat-server",
            &["--max-clients", "0"],
            "must be at least 1",
        ),
        (
            "fastchat-server",
            &["--cpus", "100000"],
            "CPU 100000 is not one this process may run on",
        ),
        ("fastchat-server", &["--cpus", "0-x"], "not a CPU number"),
        (
            "fastchat-balancer",
            &["--listen", "localhost"],
            "not an address",
        ),
        ("fastchat-balancer", &["--http", "8080"], "not an address"),
        (
            "fastchat-balancer",
            &["--token-ttl", "0"],
            "must be at least 1",
        ),
        (
            "fastchat-balancer",
            &["--max-connections", "0"],
            "must be at least 1",
        ),
        (
            "fastchat-balancer",
            &["--max-per-address", "0"],
            "must be at least 1",
        ),
        (
            "fastchat-server",
            &["--balancer", "7000"],
            "\"7000\" is not an address",
        ),
        (
            "fastchat-server",
            &["--advertise", "host"],
            "\"host\" is not an address",
        ),
    ] {
        let mut cmd = std::process::Command::new(common::bin(bin));
        cmd.args([
            "--listen",
            "127.0.0.1:0",
            "--db",
            db,
            "--insecure-plaintext",
        ]);
        if bin == "fastchat-server" {
            cmd.args(["--balancer", "127.0.0.1:1", "--name", "s"]);
        }
        let out = common::run_limited(cmd.args(args));
        assert_eq!(out.code, 2, "{bin} {args:?}: {out:?}");
        assert!(out.stderr.contains(says), "{bin} {args:?}: {out:?}");
        assert!(!std::path::Path::new(db).exists(), "{bin} {args:?}");
    }
}

/// Decodes the single error frame a server or balancer sends before closing.
fn error_code(answer: &[u8]) -> ErrorCode {
    let mut r = FrameReader::new(answer);
    if let Ok(Some(ServerEvent::Reply(Response {
        id: None,
        result: Err(refusal),
    }))) = r.read::<ServerEvent>()
    {
        return refusal.code;
    }
    let mut r = FrameReader::new(answer);
    match r.read::<Response<BalancerReply>>() {
        Ok(Some(Response {
            id: None,
            result: Err(refusal),
        })) => refusal.code,
        other => panic!("expected a refusal, got {other:?} from {answer:?}"),
    }
}

#[test]
fn hostile_frames_get_an_error_and_a_closed_connection() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    let mut garbage = 6u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(&[0xc1, 0xc1, 0xff, 0x00, 0x01, 0x02]);
    let huge = u32::MAX.to_be_bytes().to_vec();
    let mut wrong_kind = Vec::new();
    net::encode_into(&mut wrong_kind, &ServerEvent::Synced).unwrap();
    for addr in [&c.balancer_addr, &c.server_addrs[0]] {
        for bytes in [&garbage, &huge, &wrong_kind] {
            let answer = raw_exchange(addr, bytes);
            assert_eq!(error_code(&answer), ErrorCode::BadFrame, "{addr} {bytes:?}");
        }
        // A truncated frame, then close: no answer needed, and no harm done.
        let _ = raw_exchange(addr, &garbage[..5]);
    }
    // Both still serve.
    c.send("alice", "bob", "still here");
    assert_eq!(c.run("bob", &["recv"]).lines(), ["alice: still here"]);
}

#[test]
fn library_client_gets_live_events_and_synced_marker() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    c.send("alice", "bob", "queued");
    let mut b = BalancerClient::connect(&c.balancer_addr, &c.transport).unwrap();
    let bob = Connection::open(&b.login("bob", "password-bob").unwrap(), &c.transport).unwrap();
    let first = bob.events().recv_timeout(common::LIMIT).unwrap();
    let Incoming::Message(m) = first else {
        panic!("expected the queued message, got {first:?}")
    };
    assert_eq!(m.from, "alice");
    assert_eq!(
        bob.events().recv_timeout(common::LIMIT).unwrap(),
        Incoming::Synced
    );
    bob.ack(&[m.id]).unwrap();
    assert_eq!(c.count("SELECT count(*) FROM messages"), 0);
}
