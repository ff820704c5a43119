//! Hardening: hostile peers, slow and idle connections, limits, faults, graceful shutdown.
//! Nothing here may panic a server, stall other clients, or lose an acknowledged message.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{next_message, raw_exchange, Cluster, LIMIT};
use fastchat::client::{BalancerClient, Connection, Session};
use fastchat::net::{
    self, BalancerReply, ErrorCode, FrameReader, Greeting, NewMessage, Request, Response,
    ServerEvent, ServerReply, ServerRequest,
};

/// The code and reason of the one refusal `answer` holds (server or balancer).
fn error_of(answer: &[u8]) -> (ErrorCode, String) {
    if let Ok(Some(ServerEvent::Reply(Response { result: Err(r), .. }))) =
        FrameReader::new(answer).read::<ServerEvent>()
    {
        return (r.code, r.message);
    }
    match FrameReader::new(answer).read::<Response<BalancerReply>>() {
        Ok(Some(Response { result: Err(r), .. })) => (r.code, r.message),
        other => panic!("expected a refusal, got {other:?} from {answer:?}"),
    }
}

fn frame<T: serde::Serialize>(msg: &T) -> Vec<u8> {
    let mut out = Vec::new();
    net::encode_into(&mut out, msg).unwrap();
    out
}

/// The cluster still carries a message from alice to bob.
fn still_works(c: &Cluster) {
    let alice = c.login("alice");
    let bob = c.login("bob");
    let id = alice.send("bob", 4242, b"still working", None).unwrap();
    // Whatever else a test left queued for bob comes first.
    loop {
        let m = next_message(&bob);
        bob.ack(&[m.id]).unwrap();
        if m.id == id {
            assert_eq!(m.body, b"still working");
            break;
        }
    }
}

#[test]
fn stolen_expired_and_logged_out_tokens_are_refused() {
    let c = Cluster::start(1);
    c.signup_lib("alice");
    c.signup_lib("bob");
    let mut b = BalancerClient::connect(&c.balancer_addr, &c.transport).unwrap();
    let session = b.login("alice", "password-alice").unwrap();
    let refused = |token: &str| {
        let s = Session {
            token: token.to_string(),
            ..session.clone()
        };
        match Connection::open(&s, &c.transport) {
            Err(fastchat::Error::Refused {
                code: ErrorCode::InvalidToken,
                ..
            }) => {}
            other => panic!(
                "token {token:?} was not refused: {:?}",
                other.map(|c| c.user.clone())
            ),
        }
        let resumed = BalancerClient::connect(&c.balancer_addr, &c.transport)
            .unwrap()
            .resume(&s, None);
        assert!(
            matches!(
                resumed,
                Err(fastchat::Error::Refused {
                    code: ErrorCode::InvalidToken,
                    ..
                })
            ),
            "{resumed:?}"
        );
    };
    // What a thief reading the database gets is the token's hash: useless as a token.
    let stored: Vec<u8> = c.sql().one("SELECT token_hash FROM sessions LIMIT 1", &[]);
    refused(&fastchat::crypto::to_hex(&stored));
    // The real token works until logout, and never after.
    assert_eq!(
        Connection::open(&session, &c.transport).unwrap().user,
        "alice"
    );
    b.logout(&session).unwrap();
    refused(&session.token);
    // An expired session is refused too.
    let other = b.login("alice", "password-alice").unwrap();
    c.sql().exec("UPDATE sessions SET expires_at = 0", &[]);
    refused(&other.token);
    still_works(&c);
}

#[test]
fn the_key_directory_answers_logged_in_users_only() {
    let c = Cluster::start(1);
    c.signup_lib("alice");
    c.signup_lib("bob");
    let mut b = BalancerClient::connect(&c.balancer_addr, &c.transport).unwrap();
    let session = b.login("alice", "password-alice").unwrap();
    // A logged-in user gets keys, and learns that a name does not exist.
    assert!(b.keys(&session, "bob").is_ok());
    assert!(matches!(
        b.keys(&session, "nobody"),
        Err(fastchat::Error::Refused {
            code: ErrorCode::UnknownUser,
            ..
        })
    ));
    // A stranger gets the same refusal for a name that exists and one that does not.
    let stranger = Session {
        token: "not-a-token".into(),
        ..session.clone()
    };
    for name in ["bob", "nobody"] {
        let mut fresh = BalancerClient::connect(&c.balancer_addr, &c.transport).unwrap();
        match fresh.keys(&stranger, name) {
            Err(fastchat::Error::Refused {
                code: ErrorCode::InvalidToken,
                ..
            }) => {}
            other => panic!("{name}: {other:?}"),
        }
    }
    // After logout, the token no longer opens the directory.
    b.logout(&session).unwrap();
    assert!(b.keys(&session, "bob").is_err());
}

#[test]
fn the_cli_gives_up_its_session_when_a_command_ends() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    c.send("alice", "bob", "one");
    assert_eq!(c.run("bob", &["recv"]).lines(), ["alice: one"]);
    assert_eq!(
        c.count("SELECT count(*) FROM sessions"),
        0,
        "every command logged out"
    );
}

#[test]
fn a_connection_that_never_says_hello_is_closed() {
    let mut c = Cluster::start(0);
    c.add_server_with(&["--hello-timeout", "0.3"]);
    c.signup_lib("alice");
    c.signup_lib("bob");
    // One says nothing (not even a TLS hello); one trickles its Hello a byte at a time (a TLS
    // record each), too slowly.
    let started = Instant::now();
    let silent = TcpStream::connect(&c.server_addrs[0]).unwrap();
    let mut slow = common::tls_connect(&c.server_addrs[0]);
    let hello = frame(&Greeting::Hello {
        token: "0".repeat(64),
        proof: vec![0; 64],
    });
    let mut closed = false;
    for byte in &hello {
        if slow.write_all(&[*byte]).is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        if started.elapsed() > LIMIT {
            break;
        }
    }
    assert!(closed || hello.len() * 50 < 300, "the trickler was cut off");
    let streams = [fastchat::transport::Stream::plain(silent), slow];
    for mut s in streams {
        s.tcp().set_read_timeout(Some(LIMIT)).unwrap();
        let mut buf = Vec::new();
        // The server closes (EOF or reset), well before our own limit.
        let _ = s.read_to_end(&mut buf);
        assert!(started.elapsed() < LIMIT);
    }
    still_works(&c);
}

#[test]
fn a_client_that_stops_reading_is_cut_off_and_gets_everything_later() {
    let mut c = Cluster::start(0);
    c.add_server_with(&["--queue-len", "4"]);
    c.signup_lib("alice");
    c.signup_lib("bob");
    // Bob connects and then never reads.
    let session = BalancerClient::connect(&c.balancer_addr, &c.transport)
        .unwrap()
        .login("bob", "password-bob")
        .unwrap();
    let mut bob_raw = common::dial_hello(&session);
    c.wait_online("bob", 1);
    // Alice sends far more than his socket and queue hold.
    let alice = c.login("alice");
    let body = vec![b'x'; 60_000];
    let mut ids = Vec::new();
    for i in 0..400u64 {
        ids.push(alice.send("bob", i, &body, None).unwrap());
    }
    // The server gave up on bob (his presence is gone), and alice was never held up.
    c.wait_online("bob", 0);
    assert_eq!(c.count("SELECT count(*) FROM messages"), 400);
    let _ = bob_raw.write_all(b"");
    drop(bob_raw);
    // At his next login bob gets all of them, in order.
    let bob = c.login("bob");
    for (i, id) in ids.iter().enumerate() {
        let m = next_message(&bob);
        assert_eq!(m.id, *id, "message {i} in order");
        bob.ack(&[m.id]).unwrap();
    }
}

#[test]
fn a_client_over_the_request_rate_is_slowed_not_failed() {
    let mut c = Cluster::start(0);
    c.add_server_with(&["--max-rate", "50"]);
    c.signup_lib("alice");
    c.signup_lib("bob");
    let session = BalancerClient::connect(&c.balancer_addr, &c.transport)
        .unwrap()
        .login("alice", "password-alice")
        .unwrap();
    let alice = Connection::open(&session, &c.transport).unwrap();
    let started = Instant::now();
    // 100 pipelined sends: 50 pass at once (the burst), the other 50 at 50 per second.
    let replies: Vec<_> = (0..100u64)
        .map(|i| {
            alice
                .request(&ServerRequest::Send {
                    to: "bob".into(),
                    message: NewMessage {
                        client_id: i,
                        body: vec![1],
                        file: None,
                        resend_after: None,
                        patient: false,
                    },
                })
                .unwrap()
        })
        .collect();
    for r in &replies {
        assert!(matches!(
            fastchat::client::wait_reply(r),
            Ok(ServerReply::Stored { .. })
        ));
    }
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "never faster than the limit: {:?}",
        started.elapsed()
    );
    assert_eq!(c.count("SELECT count(*) FROM messages"), 100);
}

/// One raw login to the balancer from the local address `from`; the refusal's code and
/// reason, or `None` if it succeeded.
fn raw_login(c: &Cluster, from: &str, name: &str, password: &str) -> Option<(ErrorCode, String)> {
    let stream = common::tls_over(common::connect_from(from, &c.balancer_addr));
    let mut ch = fastchat::transport::Channel::new(stream).unwrap();
    ch.send(&Request {
        id: 1,
        body: fastchat::net::BalancerRequest::Login {
            name: name.into(),
            password: password.into(),
            session_key: vec![0; 32],
        },
    })
    .unwrap();
    let answer: Response<BalancerReply> = ch.recv(net::MAX_FRAME).unwrap().unwrap();
    answer.result.err().map(|r| (r.code, r.message))
}

#[test]
fn failed_logins_lock_out_the_name_from_that_address_for_a_while() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    for _ in 0..4 {
        let out = c.run_with_password("alice", "wrong", &["whoami"]);
        assert_eq!(
            out.stderr.trim(),
            "fastchat: error: invalid username or password"
        );
    }
    // The fifth failure locks the name from this address for a second; even the right
    // password waits (raw logins, quicker than starting the client, so the second is not
    // over before the check).
    // On a loaded machine the second may be over before the check (the right password then
    // logs in, which clears the count): then five more failures, and check again.
    let mut failures = 1;
    let mut tries = 0;
    let why = loop {
        tries += 1;
        for _ in 0..failures {
            let (code, _) = raw_login(&c, "127.0.0.1", "alice", "wrong").expect("refused");
            assert_eq!(code, ErrorCode::InvalidCredentials);
        }
        match raw_login(&c, "127.0.0.1", "alice", "password-alice") {
            Some((ErrorCode::RateLimited, why)) => break why,
            other if tries < 3 => eprintln!("not locked out in time ({other:?}); again"),
            other => panic!("never locked out: {other:?}"),
        }
        failures = 5;
    };
    assert_eq!(
        why,
        "too many failed logins for alice from 127.0.0.1; try again in 1 s"
    );
    // Another name from the same address is not locked.
    assert_eq!(c.run("bob", &["whoami"]).code, 0);
    // After the lock-out (one second), the right password works again.
    let deadline = Instant::now() + LIMIT;
    loop {
        let out = c.run("alice", &["whoami"]);
        if out.code == 0 {
            break;
        }
        assert!(out.stderr.contains("too many failed logins"), "{out:?}");
        assert!(Instant::now() < deadline, "never unlocked");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_stranger_guessing_a_password_locks_out_only_himself() {
    let c = Cluster::start(1);
    c.signup("carol");
    for _ in 0..5 {
        let (code, _) = raw_login(&c, "127.0.0.2", "carol", "guess").expect("refused");
        assert_eq!(code, ErrorCode::InvalidCredentials);
    }
    let (code, why) = raw_login(&c, "127.0.0.2", "carol", "guess").expect("refused");
    assert_eq!(code, ErrorCode::RateLimited);
    assert!(
        why.starts_with("too many failed logins for carol from 127.0.0.2"),
        "{why}"
    );
    // Carol, from her own address, is not locked out.
    assert_eq!(c.run("carol", &["whoami"]).code, 0);
    assert_eq!(raw_login(&c, "127.0.0.3", "carol", "password-carol"), None);
}

#[test]
fn guesses_sent_at_once_are_counted_before_they_are_hashed() {
    let c = Cluster::start(1);
    c.signup("carol");
    let outcomes: Vec<Option<(ErrorCode, String)>> = std::thread::scope(|s| {
        let guesses: Vec<_> = (0..48)
            .map(|_| s.spawn(|| raw_login(&c, "127.0.0.4", "carol", "guess")))
            .collect();
        guesses.into_iter().map(|g| g.join().unwrap()).collect()
    });
    let hashed = outcomes
        .iter()
        .filter(|o| matches!(o, Some((ErrorCode::InvalidCredentials, _))))
        .count();
    let limited = outcomes
        .iter()
        .filter(|o| matches!(o, Some((ErrorCode::RateLimited, _))))
        .count();
    assert!(hashed <= 5, "{hashed} guesses were checked: {outcomes:?}");
    assert_eq!(hashed + limited, outcomes.len(), "{outcomes:?}");
}

#[test]
fn a_user_logging_in_many_times_at_once_waits_rather_than_being_refused() {
    // Hashes dear enough (tens of milliseconds) that the logins overlap: more of them run at
    // once than a name may fail, and those past the limit wait their turn.
    let c = Cluster::start_with_balancer_args(1, &["--scrypt-log-n", "14"]);
    c.signup("alice");
    let outcomes: Vec<Option<(ErrorCode, String)>> = std::thread::scope(|s| {
        let logins: Vec<_> = (0..16)
            .map(|_| s.spawn(|| raw_login(&c, "127.0.0.5", "alice", "password-alice")))
            .collect();
        logins.into_iter().map(|l| l.join().unwrap()).collect()
    });
    assert!(outcomes.iter().all(Option::is_none), "{outcomes:?}");
}

#[test]
fn signups_from_one_address_are_limited() {
    let c = Cluster::start_with_balancer_args(1, &["--signups-per-address", "3"]);
    for u in ["u1", "u2", "u3"] {
        c.signup(u);
    }
    let out = c.run("u4", &["signup", "u4"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .starts_with("fastchat: error: too many signups from 127.0.0.1; try again in "),
        "{out:?}"
    );
}

#[test]
fn the_balancer_refuses_large_slow_and_too_many_connections() {
    let c = Cluster::start_with_balancer_args(
        1,
        &["--request-timeout", "0.5", "--max-per-address", "3"],
    );
    // A request announcing more than 4 KiB is refused before anything more is read.
    let mut big = Vec::new();
    big.extend_from_slice(&(1u32 << 20).to_be_bytes());
    big.push(0x91);
    let (code, why) = error_of(&raw_exchange(&c.balancer_addr, &big));
    assert_eq!(code, ErrorCode::BadFrame);
    assert!(why.contains("over the limit of 4096"), "{why}");
    // A request trickled more slowly than the timeout: the connection is closed.
    let started = Instant::now();
    let mut slow = common::tls_over(common::connect_from("127.0.0.5", &c.balancer_addr));
    slow.write_all(&[0, 0, 0, 40]).unwrap();
    let mut closed = false;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        if slow.write_all(b"x").and_then(|_| slow.flush()).is_err() {
            closed = true;
            break;
        }
        let mut b = [0u8; 1];
        if matches!(slow.read(&mut b), Ok(0)) {
            closed = true;
            break;
        }
    }
    assert!(closed || slow.read(&mut [0u8; 64]).map_or(true, |n| n == 0));
    assert!(started.elapsed() < Duration::from_secs(5));
    // Three connections from one address are served; a fourth is closed at once.
    let held: Vec<_> = (0..3)
        .map(|_| common::tls_over(common::connect_from("127.0.0.6", &c.balancer_addr)))
        .collect();
    let fourth = common::connect_from("127.0.0.6", &c.balancer_addr);
    let mut b = [0u8; 1];
    assert!(
        matches!((&fourth).read(&mut b), Ok(0) | Err(_)),
        "closed before any handshake"
    );
    // Another address still gets in.
    assert_eq!(
        raw_login(&c, "127.0.0.7", "nobody", "pw").map(|e| e.0),
        Some(ErrorCode::InvalidCredentials)
    );
    drop(held);
}

#[test]
fn hostile_names_and_bytes_are_refused_and_change_nothing() {
    let c = Cluster::start(1);
    c.signup_lib("alice");
    c.signup_lib("bob");
    let users_before = c.count("SELECT count(*) FROM users");
    let keys = fastchat::crypto::Identity::generate()
        .unwrap()
        .public()
        .unwrap();
    let long = "a".repeat(10_000);
    for name in [
        "tab\there",
        "nul\0byte",
        "esc\u{1b}[2J",
        long.as_str(),
        "x'; DROP TABLE users; --",
        "robert\"); DELETE FROM messages;--",
        "",
    ] {
        let err = BalancerClient::connect(&c.balancer_addr, &c.transport)
            .unwrap()
            .signup(name, "pw", keys.clone(), None)
            .unwrap_err();
        // A name too long for a balancer request is refused as a frame, before it is read.
        let code = if name.len() > 4000 {
            ErrorCode::BadFrame
        } else {
            ErrorCode::InvalidName
        };
        assert!(
            matches!(&err, fastchat::Error::Refused { code: c, .. } if *c == code),
            "{:?}: {err:.200}",
            &name[..name.len().min(40)]
        );
        assert!(
            err.to_string().len() < 200,
            "the error stays one short line"
        );
        // And as a recipient, through a chat server.
        let alice = c.login("alice");
        let err = alice.send(name, 1, b"x", None).unwrap_err();
        assert!(
            matches!(
                err,
                fastchat::Error::Refused {
                    code: ErrorCode::InvalidName,
                    ..
                }
            ),
            "{name:?}: {err}"
        );
    }
    // Invalid UTF-8 where a name should be: a frame that does not decode.
    let mut bad = frame(&Request {
        id: 1,
        body: fastchat::net::BalancerRequest::Keys {
            name: "alice".into(),
            token: "t".into(),
            proof: vec![],
        },
    });
    let at = bad.windows(5).position(|w| w == b"alice").unwrap();
    bad[at] = 0xff;
    for addr in [&c.balancer_addr, &c.server_addrs[0]] {
        let (code, _) = error_of(&raw_exchange(addr, &bad));
        assert_eq!(code, ErrorCode::BadFrame);
    }
    // A valid frame of the wrong kind, and a huge length prefix, after a good Hello.
    assert_eq!(c.count("SELECT count(*) FROM users"), users_before);
    assert_eq!(c.count("SELECT count(*) FROM messages"), 0);
    still_works(&c);
}

#[test]
fn random_and_mutated_frames_never_take_a_server_down() {
    let c = Cluster::start(1);
    c.signup_lib("alice");
    c.signup_lib("bob");
    let session = BalancerClient::connect(&c.balancer_addr, &c.transport)
        .unwrap()
        .login("alice", "password-alice")
        .unwrap();
    let send = frame(&Request {
        id: 2,
        body: ServerRequest::Send {
            to: "bob".into(),
            message: NewMessage {
                client_id: 9,
                body: vec![7; 40],
                file: None,
                resend_after: None,
                patient: false,
            },
        },
    });
    let mut rng = common::Rng::new(0x5eed_f00d);
    let started = Instant::now();
    let mut rounds = 0;
    while rounds < 300 && started.elapsed() < Duration::from_secs(10) {
        rounds += 1;
        // After a valid Hello (authenticated), then without: mutated requests and noise.
        let mut bytes = send.clone();
        rng.mutate(&mut bytes);
        if rounds % 5 == 0 {
            bytes.extend(rng.bytes(64));
        }
        if rounds % 2 == 0 {
            let _ = common::exchange_after_hello(&session, &bytes);
        } else {
            let _ = raw_exchange(&c.server_addrs[0], &bytes);
        }
        let _ = raw_exchange(&c.balancer_addr, &rng.bytes(32));
    }
    assert!(rounds >= 100, "enough rounds: {rounds}");
    still_works(&c);
}

#[test]
fn a_busy_database_delays_writes_but_never_fails_them() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    // Another process holds the write lock for a second and a half (SQLite's, or the
    // advisory lock every PostgreSQL writer takes).
    let holder = c.hold_write_lock();
    let sender = c.spawn("alice", &["send", "bob", "patience"]);
    std::thread::sleep(Duration::from_millis(1500));
    holder.batch("COMMIT");
    let mut sender = sender;
    let status = sender.wait_exit(LIMIT).expect("send finished");
    assert!(status.success(), "the send waited and succeeded");
    let out = c.run("bob", &["recv"]);
    assert_eq!(out.lines(), ["alice: patience"], "{out:?}");
    assert!(!out.stderr.contains("locked"));
}

#[test]
fn ctrl_c_stops_every_binary_cleanly_within_two_seconds() {
    let mut c = Cluster::start(2);
    c.signup("alice");
    c.signup("bob");
    let mut chat = c.spawn("alice", &["chat"]);
    assert!(chat.line().starts_with("logged in as alice"));
    c.wait_online("alice", 1);
    // The interactive client: it logs out and exits 0.
    let started = Instant::now();
    let status = chat.interrupt().expect("chat exits");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(status.code(), Some(0));
    c.wait_online("alice", 0);
    // A server with a connected client: it stops accepting, commits what is pending (the
    // client's presence is cleared) and exits 0.
    let bob = c.login("bob");
    c.wait_online("bob", 1);
    let i = c.index_of(bob.server().id);
    let started = Instant::now();
    let status = c.servers[i].interrupt().expect("server exits");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        c.count(&format!(
            "SELECT count(*) FROM presence WHERE server_id = {}",
            c.server_ids[i]
        )),
        0
    );
    let started = Instant::now();
    let status = c.balancer.interrupt().expect("balancer exits");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(status.code(), Some(0));
}

#[test]
fn clients_keep_talking_while_the_balancer_is_down() {
    let mut c = Cluster::start_with(2, "round-robin");
    c.wait_servers(2);
    c.signup_lib("alice");
    c.signup_lib("bob");
    let alice = c.login("alice");
    let bob = c.login("bob");
    c.balancer.kill9();
    for i in 0..5u64 {
        let id = alice.send("bob", i, b"no balancer needed", None).unwrap();
        let m = next_message(&bob);
        assert_eq!(m.id, id);
        bob.ack(&[m.id]).unwrap();
    }
}
