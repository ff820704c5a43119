//! Quotas and lifetimes: no one fills another user's queue, the server's file space or its
//! disk; every refusal says what is full.

mod common;

use std::time::{Duration, Instant};

use common::{Cluster, LIMIT};

fn server_with(args: &[&str]) -> Cluster {
    let mut c = Cluster::start(0);
    c.add_server_with(args);
    c
}

fn refused(c: &Cluster, from: &str, to: &str, text: &str) -> String {
    let out = c.run(from, &["send", to, text]);
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(out.stdout, "");
    out.stderr
}

#[test]
fn a_queue_holds_so_much_and_one_sender_so_much_of_it() {
    let c = server_with(&["--max-queue", "5", "--max-per-sender", "3"]);
    for u in ["alice", "bob", "carol"] {
        c.signup(u);
    }
    for i in 0..3 {
        c.send("alice", "bob", &format!("a{i}"));
    }
    let why = refused(&c, "alice", "bob", "a3");
    assert!(
        why.starts_with("fastchat: error: you have 3 messages (")
            && why.contains(" waiting in bob's queue, the most one sender may (3 messages, "),
        "{why}"
    );
    // Others may still write to bob, until his queue is full.
    c.send("carol", "bob", "c0");
    c.send("carol", "bob", "c1");
    let why = refused(&c, "carol", "bob", "c2");
    assert!(
        why.starts_with("fastchat: error: bob's queue is full (5 messages"),
        "{why}"
    );
    assert_eq!(c.count("SELECT count(*) FROM messages"), 5);
    // Once bob reads, there is room again.
    assert_eq!(c.run("bob", &["recv"]).lines().len(), 5);
    c.send("alice", "bob", "a3");
    c.send("carol", "bob", "c2");
}

#[test]
fn a_user_stores_so_many_files_until_they_are_taken() {
    let c = server_with(&["--max-files", "1"]);
    c.signup("alice");
    c.signup("bob");
    let path = c.dir.path().join("photo.png");
    std::fs::write(&path, vec![7u8; 3000]).unwrap();
    let send = || c.run("alice", &["send-file", "bob", path.to_str().unwrap()]);
    assert_eq!(send().code, 0);
    let out = send();
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.starts_with(
            "fastchat: error: you have 1 files (2.9 KiB) stored, the most one user may (1 files"
        ),
        "{out:?}"
    );
    assert_eq!(
        c.count("SELECT count(*) FROM files"),
        1,
        "nothing more stored"
    );
    // Once bob has taken it, alice may send another.
    assert_eq!(c.run("bob", &["recv"]).code, 0);
    assert_eq!(send().code, 0);
}

#[test]
fn messages_nobody_takes_are_deleted_after_their_lifetime() {
    // A lifetime of about two seconds (0.00002 days).
    let c = server_with(&["--message-lifetime", "0.00002"]);
    c.signup("alice");
    c.signup("bob");
    c.send("alice", "bob", "read me soon");
    let path = c.dir.path().join("big.bin");
    std::fs::write(&path, vec![1u8; 5000]).unwrap();
    assert_eq!(
        c.run("alice", &["send-file", "bob", path.to_str().unwrap()])
            .code,
        0
    );
    assert_eq!(c.count("SELECT count(*) FROM messages"), 2);
    c.wait_until_none_stored("never expired");
    assert_eq!(
        c.count("SELECT count(*) FROM files"),
        0,
        "with the file it offered"
    );
    assert_eq!(c.count("SELECT count(*) FROM file_chunks"), 0);
    assert_eq!(c.run("bob", &["recv"]).stdout, "");
}

#[test]
fn a_server_takes_as_many_clients_as_its_descriptors_allow_and_refuses_the_next() {
    let mut c = Cluster::start(0);
    // 200 descriptors: 192 kept for the database, links and slack, 2 per client: room for 4.
    c.add_server_limited(Some(200), &[]);
    let mut held = Vec::new();
    for i in 0..4 {
        let user = format!("u{i}");
        c.signup_lib(&user);
        held.push(c.login(&user));
    }
    c.signup_lib("u4");
    let err = fastchat::client::Client::login(&c.balancer_addr, &c.transport, "u4", "password-u4")
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(
            &err,
            fastchat::Error::Refused {
                code: fastchat::net::ErrorCode::Unavailable,
                message
            } if message.starts_with("server is full")
        ),
        "{err}"
    );
    // One leaves: there is room again.
    drop(held.pop());
    let deadline = Instant::now() + LIMIT;
    while fastchat::client::Client::login(&c.balancer_addr, &c.transport, "u4", "password-u4")
        .is_err()
    {
        assert!(Instant::now() < deadline, "no room came free");
        std::thread::sleep(Duration::from_millis(100));
    }
}
