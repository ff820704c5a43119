//! Faults under load, each asserting nothing lost and nothing shown twice: a chat server
//! stopped (SIGSTOP) and resumed, a server the balancer refuses, the balancer stopped and
//! killed, an outside reader holding the database, an outside writer locking it, a full disk
//! (a small tmpfs, where the test may mount one), a huge offline backlog, and a restart of
//! everything. Killed servers and slow consumers are in tests/cluster.rs and tests/hostile.rs.
//! The long cases (a 60-second stop) are `#[ignore]`d: run them with
//! `cargo test --test faults -- --ignored` (the long suite, docs/ARCHITECTURE.md).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{signal, Cluster, LIMIT};
use fastchat::client::{Client, Event};

/// Reads messages on `client` until `want` distinct ones (by their number) have come or
/// `limit` passes; acknowledges each; returns the numbers in arrival order, and how many
/// came more than once under the same id (at least once on the wire).
fn read_numbers(client: &Client, want: usize, limit: Duration) -> (Vec<u64>, usize) {
    let deadline = Instant::now() + limit;
    let mut ids = HashSet::new();
    let mut got = Vec::new();
    let mut again = 0;
    while got.len() < want {
        match client.next(deadline).unwrap() {
            Some(Event::Message(m)) => {
                if ids.insert(m.id) {
                    got.push(u64::from_be_bytes(m.body[..8].try_into().unwrap()));
                } else {
                    again += 1;
                }
                client.ack(&[m.id]).unwrap();
            }
            Some(_) => {}
            None => break,
        }
    }
    (got, again)
}

/// Bob's and carol's server is stopped for `stop` while alice (on another server) sends to
/// both, and bob sends to alice; then it is resumed. Every message, sent before, during and
/// after the stop, reaches its recipient once: bob's send during the stop fails over instead
/// of waiting, and carol, who only listens, is moved off the server if the balancer forgot it
/// meanwhile.
fn a_stopped_server(stop: Duration) {
    let c = Cluster::start_with(2, "round-robin");
    c.wait_servers(2);
    for u in ["alice", "bob", "carol"] {
        c.signup_lib(u);
    }
    // Round-robin: alice on the first server, bob on the second, carol with bob.
    let alice = Arc::new(c.login("alice"));
    let bob = Arc::new(c.login("bob"));
    assert_ne!(alice.server().id, bob.server().id);
    let carol = loop {
        let carol = c.login("carol");
        if carol.server().id == bob.server().id {
            break carol;
        }
    };
    let bobs = c.index_of(bob.server().id);
    let pid = c.servers[bobs].child.id();

    const BEFORE: u64 = 20;
    const DURING: u64 = 20;
    const AFTER: u64 = 20;
    for i in 0..BEFORE {
        alice.send("bob", i, &i.to_be_bytes(), None).unwrap();
    }
    let (got, _) = read_numbers(&bob, BEFORE as usize, LIMIT);
    assert_eq!(got, (0..BEFORE).collect::<Vec<_>>());

    common::stop_outside_a_commit(pid, &c.db);
    let stopped = Instant::now();
    for i in BEFORE..BEFORE + DURING {
        alice.send("bob", i, &i.to_be_bytes(), None).unwrap();
        // Client ids are unique per sender: a message to carol needs its own.
        alice
            .send("carol", 10_000 + i, &i.to_be_bytes(), None)
            .unwrap();
    }
    // Bob sends while his server is stopped: the request fails over after a few seconds.
    let sent = Instant::now();
    let to_alice = 1000u64;
    bob.send("alice", to_alice, &to_alice.to_be_bytes(), None)
        .unwrap();
    assert!(
        sent.elapsed() < Duration::from_secs(15),
        "a send waited {:?} on a stopped server",
        sent.elapsed()
    );
    let left = stop.saturating_sub(stopped.elapsed());
    std::thread::sleep(left);
    signal(pid, "-CONT");

    for i in BEFORE + DURING..BEFORE + DURING + AFTER {
        alice.send("bob", i, &i.to_be_bytes(), None).unwrap();
        // Client ids are unique per sender: a message to carol needs its own.
        alice
            .send("carol", 10_000 + i, &i.to_be_bytes(), None)
            .unwrap();
    }
    let rest = (DURING + AFTER) as usize;
    for (who, client) in [("bob", &bob), ("carol", &Arc::new(carol))] {
        let (got, _) = read_numbers(client, rest, Duration::from_secs(60));
        let mut sorted = got.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            (BEFORE..BEFORE + DURING + AFTER).collect::<Vec<_>>(),
            "every message to {who} once"
        );
    }
    let (to_alice_got, _) = read_numbers(&alice, 1, LIMIT);
    assert_eq!(to_alice_got, [to_alice]);
    // Live delivery works again: one more from each, seen within seconds.
    alice
        .send("bob", 5000, &5000u64.to_be_bytes(), None)
        .unwrap();
    let (last, _) = read_numbers(&bob, 1, LIMIT);
    assert_eq!(last, [5000]);
    // Nothing is left queued.
    c.wait_until_none_stored("messages left in the queue");
}

/// A fresh cluster of two servers (round-robin), alice and bob logged in on different ones,
/// and the pid of bob's server.
fn alice_and_bob_apart() -> (Cluster, Client, Client, u32) {
    let c = Cluster::start_with(2, "round-robin");
    c.wait_servers(2);
    for u in ["alice", "bob"] {
        c.signup_lib(u);
    }
    let alice = c.login("alice");
    let bob = c.login("bob");
    assert_ne!(alice.server().id, bob.server().id);
    let pid = c.servers[c.index_of(bob.server().id)].child.id();
    (c, alice, bob, pid)
}

#[test]
fn a_client_that_only_listens_leaves_a_stopped_server_for_another() {
    // A stopped server keeps its sockets open and says nothing: a client that only waits
    // for messages hears nothing either way, so after QUIET it asks (Ping), and without an
    // answer it moves to another server, where what was sent meanwhile is waiting.
    let (c, alice, bob, pid) = alice_and_bob_apart();
    let first = bob.server().id;
    common::stop_outside_a_commit(pid, &c.db);
    let stopped = Instant::now();
    alice.send("bob", 1, &1u64.to_be_bytes(), None).unwrap();
    let limit = fastchat::client::api::QUIET + fastchat::client::connection::SERVER_TIMEOUT + LIMIT;
    let deadline = stopped + limit;
    let mut moved = false;
    let msg = loop {
        match bob.next(deadline).unwrap() {
            Some(Event::Failover(server)) => {
                assert_ne!(server.id, first, "not back to the stopped server");
                moved = true;
            }
            Some(Event::Message(m)) => break m,
            Some(_) => {}
            None => {
                signal(pid, "-CONT");
                panic!("nothing within {limit:?} of the stop");
            }
        }
    };
    signal(pid, "-CONT");
    assert!(moved, "the message came through another server");
    assert_eq!(u64::from_be_bytes(msg.body[..8].try_into().unwrap()), 1);
    bob.ack(&[msg.id]).unwrap();
}

#[test]
fn a_server_stopped_for_ten_seconds_loses_and_repeats_nothing() {
    a_stopped_server(Duration::from_secs(10));
}

#[test]
#[ignore = "long suite: a 60-second stop"]
fn a_server_stopped_for_a_minute_loses_and_repeats_nothing() {
    a_stopped_server(Duration::from_secs(60));
}

#[test]
fn a_message_read_by_a_server_after_its_stop_is_not_stored_again() {
    // Bob's message is left unread in his server's socket while the server is stopped; his
    // client gives up on it, sends it again through the other server, and alice reads it
    // there (it leaves the queue). When the stopped server resumes, it reads the message: it
    // must not store it a second time, under a new id, which alice's client would refuse as
    // a replay ("a message already received").
    let (c, alice, bob, pid) = alice_and_bob_apart();
    common::stop_outside_a_commit(pid, &c.db);
    let resume = Resume(pid);
    bob.send("alice", 1, &1u64.to_be_bytes(), None).unwrap();
    assert_eq!(
        bob.server().id,
        alice.server().id,
        "bob moved to the other server"
    );
    let (got, _) = read_numbers(&alice, 1, LIMIT);
    assert_eq!(got, [1]);
    c.wait_until_none_stored("the acknowledgement was not applied");
    drop(resume);
    let (again, _) = read_numbers(&alice, 1, Duration::from_secs(3));
    assert_eq!(again, [0u64; 0], "stored again after the server resumed");
    assert_eq!(c.count("SELECT count(*) FROM messages"), 0);
    // The resumed server serves again.
    let carol_on_it = (0..10).find_map(|i| {
        let who = format!("carol{i}");
        c.signup_lib(&who);
        let client = c.login(&who);
        (client.server().id != alice.server().id).then_some(client)
    });
    let carol = carol_on_it.expect("a login on the resumed server");
    carol.send("alice", 7, &7u64.to_be_bytes(), None).unwrap();
    let (later, _) = read_numbers(&alice, 1, LIMIT);
    assert_eq!(later, [7]);
}

#[test]
fn after_a_short_stop_acknowledgements_count_and_a_message_moves_its_sender() {
    // Stopped for 3 s, a server counts a freeze (2 s or more). Bob's client gave up on
    // nothing meanwhile: what he acknowledges over his connection from before is applied; a
    // message he sends over it is not stored there (it might have been sent again elsewhere,
    // for all the server knows): the connection is closed unanswered, and his client sends
    // it through the other server, once.
    let (c, alice, bob, pid) = alice_and_bob_apart();
    let first = bob.server().id;
    alice.send("bob", 1, &1u64.to_be_bytes(), None).unwrap();
    let msg = loop {
        match bob.next(Instant::now() + LIMIT).unwrap() {
            Some(Event::Message(m)) => break m,
            Some(_) => {}
            None => panic!("no message for bob"),
        }
    };
    common::stop_outside_a_commit(pid, &c.db);
    let resume = Resume(pid);
    std::thread::sleep(Duration::from_secs(3));
    drop(resume);
    bob.ack(&[msg.id]).unwrap();
    assert_eq!(c.count("SELECT count(*) FROM messages"), 0, "acknowledged");
    assert_eq!(bob.server().id, first, "no failover for an acknowledgement");
    bob.send("alice", 2, &2u64.to_be_bytes(), None).unwrap();
    assert_ne!(
        bob.server().id,
        first,
        "the message moved bob to the other server"
    );
    let (got, _) = read_numbers(&alice, 2, Duration::from_secs(3));
    assert_eq!(got, [2], "once");
    assert_eq!(c.count("SELECT count(*) FROM messages"), 0);
}

/// Resumes a stopped process when dropped (a failed assertion must not leave it stopped).
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        signal(self.0, "-CONT");
    }
}

fn wal_size(c: &Cluster) -> u64 {
    std::fs::metadata(c.dir.path().join("chat.db-wal")).map_or(0, |m| m.len())
}

/// Signs up alice and bob and logs alice in.
fn alice_for_bob(c: &Cluster) -> Client {
    c.signup_lib("alice");
    c.signup_lib("bob");
    c.login("alice")
}

/// Alice sends bob numbered 60 KiB messages (at most `limit`), calling `after_each` after
/// each, until one is refused as `Unavailable`; returns how many were stored, and the reason.
fn send_until_unavailable(
    alice: &Client,
    limit: u64,
    mut after_each: impl FnMut(),
) -> (u64, Option<String>) {
    for i in 0..limit {
        let mut body = i.to_be_bytes().to_vec();
        body.resize(60 * 1024, 7);
        match alice.send("bob", i, &body, None) {
            Ok(_) => after_each(),
            Err(fastchat::Error::Refused {
                code: fastchat::net::ErrorCode::Unavailable,
                message,
            }) => return (i, Some(message)),
            Err(e) => panic!("send {i}: {e}"),
        }
    }
    (limit, None)
}

#[test]
fn an_outside_reader_cannot_make_the_log_grow_without_bound() {
    let mut c = Cluster::start(0);
    c.add_server_with(&["--wal-limit", "1M"]);
    if c.sqlite_only("the write-ahead log's limit") {
        return;
    }
    let alice = alice_for_bob(&c);
    // Another process opens the database and keeps a read transaction open: checkpoints
    // cannot copy past its snapshot.
    let reader = rusqlite::Connection::open(&c.db).unwrap();
    reader
        .execute_batch("BEGIN; SELECT count(*) FROM messages;")
        .unwrap();
    let mut largest = 0;
    let (_, refused) = send_until_unavailable(&alice, 200, || largest = largest.max(wal_size(&c)));
    let why = refused.expect("writes were refused before the log grew without bound");
    assert!(
        why.starts_with("the database cannot take more writes now"),
        "{why}"
    );
    assert!(largest < 4 << 20, "the log grew to {largest} bytes");
    // Once the reader lets go, writes go through again and the log is cut back.
    reader.execute_batch("COMMIT").unwrap();
    drop(reader);
    let deadline = Instant::now() + LIMIT;
    let mut i = 1000;
    loop {
        i += 1;
        if alice.send("bob", i, b"small", None).is_ok() && wal_size(&c) <= 1 << 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the log stayed at {} bytes",
            wal_size(&c)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_database_locked_too_long_fails_writes_with_a_clear_error() {
    let mut c = Cluster::start(0);
    c.add_server_with(&["--db-timeout", "0.5"]);
    let alice = alice_for_bob(&c);
    // Another process takes the write lock and keeps it.
    let locker = c.hold_write_lock();
    // The server gives up after half a second (well before the client would fail over), and
    // says why.
    match alice.send("bob", 1, b"hello?", None) {
        Err(fastchat::Error::Refused {
            code: fastchat::net::ErrorCode::Unavailable,
            message,
        }) => assert!(
            message.starts_with("the database is busy: another process has held it"),
            "{message}"
        ),
        other => panic!("expected the database to be busy, got {other:?}"),
    }
    locker.batch("COMMIT");
    drop(locker);
    alice.send("bob", 2, b"now it goes", None).unwrap();
    let bob = c.login("bob");
    assert_eq!(common::next_message(&bob).body, b"now it goes");
}

/// A small tmpfs mounted on a fresh temporary folder, unmounted and the folder removed when
/// dropped (after the cluster that uses it, which the caller declares later so that it drops
/// first).
struct SmallDisk {
    path: std::path::PathBuf,
}

impl SmallDisk {
    /// Mounts `size` of tmpfs; `None` (with the reason) where this process may not mount.
    fn mount(size: &str) -> Result<(SmallDisk, tempfile::TempDir), String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "fastchat-test",
            ])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        let disk = SmallDisk {
            path: dir.path().to_path_buf(),
        };
        Ok((disk, dir))
    }

    /// Writes a file until the disk is full; returns its path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.path.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![0u8; 64 * 1024];
        for _ in 0..100_000 {
            if let Err(e) = f.write_all(&block) {
                assert_eq!(e.kind(), std::io::ErrorKind::StorageFull, "{e}");
                return path;
            }
        }
        panic!("the small disk never filled");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.path)
            .status();
        // The temporary folder could not remove itself while it was a mount point: its
        // contents went, the folder stayed.
        let _ = std::fs::remove_dir(&self.path);
    }
}

#[test]
fn a_full_disk_refuses_writes_clearly_and_loses_nothing() {
    let (disk, dir) = match SmallDisk::mount("24m") {
        Ok(mounted) => mounted,
        Err(why) => {
            // Mounting needs root; say so rather than pass silently.
            eprintln!("SKIPPED: cannot mount a small disk here: {why}");
            return;
        }
    };
    let c = Cluster::start_in(dir, 1);
    if c.sqlite_only("a database file on a full disk") {
        return;
    }
    let alice = alice_for_bob(&c);
    let filler = disk.fill();
    // Sends go through while the log has room it already owns, then are refused with the
    // reason: the disk is full. None is half-stored.
    let (accepted, refused) = send_until_unavailable(&alice, 400, || {});
    let why = refused.expect("a full disk refused writes");
    assert!(why.starts_with("server storage is full"), "{why}");
    // Space comes back: the server writes again without a restart.
    std::fs::remove_file(filler).unwrap();
    let deadline = Instant::now() + LIMIT;
    let mut sent_after = 0u64;
    while sent_after == 0 {
        let n = 10_000 + sent_after;
        if alice.send("bob", n, &n.to_be_bytes(), None).is_ok() {
            sent_after += 1;
        } else {
            assert!(Instant::now() < deadline, "writes never resumed");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // Bob gets every accepted message once, and the one sent after, in order.
    let bob = c.login("bob");
    let want = accepted as usize + 1;
    let (got, again) = read_numbers(&bob, want, LIMIT);
    let mut expected: Vec<u64> = (0..accepted).collect();
    expected.push(10_000);
    assert_eq!(got, expected, "repeated {again}");
    drop(c);
    drop(disk);
}

#[test]
fn a_server_the_balancer_refuses_closes_its_clients_and_takes_no_new_ones() {
    let mut c = Cluster::start(1);
    c.signup_lib("alice");
    c.signup_lib("bob");
    let alice = c.login("alice");
    let old_addr = c.server_addrs[0].clone();
    // The server stops long enough to be out of rotation; another process with its
    // certificate registers under its name meanwhile (a replacement, or an impostor with
    // the key). When the first resumes, the balancer refuses it: the name is held.
    common::stop_outside_a_commit(c.servers[0].pid(), &c.db);
    std::thread::sleep(Duration::from_secs(3));
    c.add_server_as("server-1", None, &[]);
    signal(c.servers[0].pid(), "-CONT");
    // Its client moves to the server the balancer knows, and hears bob there, live.
    let deadline = Instant::now() + LIMIT;
    let mut i = 0;
    loop {
        i += 1;
        if alice.send("bob", i, b"from alice", None).is_ok() && alice.server().addr != old_addr {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alice stayed on the refused server"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let bob = c.login("bob");
    bob.send("alice", 1, b"still here?", None).unwrap();
    loop {
        let m = common::next_message(&alice);
        if m.body == b"still here?" {
            break;
        }
    }
    // Once refused for as long as the balancer takes to forget a silent server, the old one
    // takes no clients: one that comes straight to it is told to ask the balancer.
    let mut b = c.balancer_client();
    let mut session = b.login("alice", "password-alice").unwrap();
    session.server.addr = old_addr;
    let deadline = Instant::now() + LIMIT;
    loop {
        let answer = common::exchange_after_hello(&session, &[]);
        let text = String::from_utf8_lossy(&answer);
        if text.contains("this server is not part of the cluster now") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the refused server still takes clients"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Alice sends `n` numbered messages to bob (each waiting for its store) from a thread;
/// `fault` runs on the cluster after `at` of them. Bob, on another server, reads meanwhile;
/// he must get every one once, in order.
fn traffic_through(c: &mut Cluster, n: u64, at: u64, fault: impl FnOnce(&mut Cluster)) {
    c.signup_lib("alice");
    c.signup_lib("bob");
    let alice = Arc::new(c.login("alice"));
    let bob = c.login("bob");
    assert_ne!(alice.server().id, bob.server().id, "on two servers");
    let (sent_tx, sent_rx) = crossbeam_channel::unbounded();
    let sender = {
        let alice = Arc::clone(&alice);
        std::thread::spawn(move || {
            for i in 0..n {
                alice.send("bob", i, &i.to_be_bytes(), None).unwrap();
                let _ = sent_tx.send(i);
            }
        })
    };
    let deadline = Instant::now() + LIMIT;
    while sent_rx.recv_deadline(deadline).expect("sends go on") + 1 < at {}
    fault(c);
    let (got, again) = read_numbers(&bob, n as usize, Duration::from_secs(60));
    sender.join().unwrap();
    assert_eq!(got, (0..n).collect::<Vec<_>>(), "repeated {again}");
}

#[test]
fn the_balancer_stopped_then_killed_under_load_loses_nothing() {
    let mut c = Cluster::start(2);
    c.wait_servers(2);
    traffic_through(&mut c, 600, 100, |c| {
        // Chat goes on between servers while the balancer is stopped, then dead.
        signal(c.balancer.pid(), "-STOP");
        std::thread::sleep(Duration::from_secs(4));
        signal(c.balancer.pid(), "-CONT");
        c.balancer.kill9();
        std::thread::sleep(Duration::from_secs(1));
        c.restart_balancer();
    });
    // The restarted balancer knows both servers again, and logins work.
    c.wait_servers(2);
    c.signup_lib("carol");
    let carol = c.login("carol");
    carol.send("alice", 1, b"hi", None).unwrap();
}

#[test]
fn a_huge_offline_backlog_arrives_whole_in_order_once() {
    const SENDERS: u64 = 4;
    const EACH: u64 = 2_000;
    let mut c = Cluster::start(0);
    c.add_server_with(&["--max-per-sender", "2000"]);
    c.signup_lib("bob");
    let senders: Vec<String> = (0..SENDERS).map(|s| format!("sender{s}")).collect();
    for s in &senders {
        c.signup_lib(s);
    }
    // Bob is offline while four senders queue 8,000 messages of 1 KiB for him.
    let threads: Vec<_> = senders
        .iter()
        .map(|s| {
            let client = c.login(s);
            std::thread::spawn(move || {
                for i in 0..EACH {
                    let mut body = i.to_be_bytes().to_vec();
                    body.resize(1024, b'.');
                    client.send("bob", i, &body, None).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(
        c.count("SELECT count(*) FROM messages"),
        (SENDERS * EACH) as i64
    );
    // He logs in and gets every one once, each sender's in the order sent.
    let bob = c.login("bob");
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut next: HashMap<String, u64> = HashMap::new();
    let mut ids = HashSet::new();
    let mut total = 0;
    while total < SENDERS * EACH {
        match bob.next(deadline).unwrap() {
            Some(Event::Message(m)) => {
                assert!(ids.insert(m.id), "message {} came twice", m.id);
                let n = u64::from_be_bytes(m.body[..8].try_into().unwrap());
                let want = next.entry(m.from.clone()).or_insert(0);
                assert_eq!(n, *want, "from {} in order", m.from);
                *want += 1;
                total += 1;
                bob.ack(&[m.id]).unwrap();
            }
            Some(_) => {}
            None => panic!("only {total} of the backlog arrived"),
        }
    }
    // Acknowledged, the backlog is gone from the database.
    c.wait_until_none_stored("the backlog stayed stored");
}

#[test]
fn a_restart_of_everything_loses_nothing() {
    let mut c = Cluster::start(2);
    c.wait_servers(2);
    for u in ["alice", "bob", "carol"] {
        c.signup_lib(u);
    }
    let alice = c.login("alice");
    // Bob is offline; carol is online and stays logged in through the restart. (Client ids
    // are unique per sender: carol's start at 1000.)
    let carol = c.login("carol");
    for i in 0..50u64 {
        alice.send("bob", i, &i.to_be_bytes(), None).unwrap();
        alice
            .send("carol", 1000 + i, &i.to_be_bytes(), None)
            .unwrap();
    }
    // Everything dies at once and comes back: the balancer, then servers under their names.
    c.balancer.kill9();
    for s in &mut c.servers {
        s.kill9();
    }
    c.restart_balancer();
    c.add_server_as("server-1", None, &[]);
    c.add_server_as("server-2", None, &[]);
    c.wait_servers(2);
    // Sessions survived: alice's client fails over on its own and sends on.
    for i in 50..100u64 {
        alice.send("bob", i, &i.to_be_bytes(), None).unwrap();
        alice
            .send("carol", 1000 + i, &i.to_be_bytes(), None)
            .unwrap();
    }
    let bob = c.login("bob");
    let (got, again) = read_numbers(&bob, 100, LIMIT);
    assert_eq!(got, (0..100).collect::<Vec<_>>(), "bob: repeated {again}");
    let (got, again) = read_numbers(&carol, 100, LIMIT);
    assert_eq!(got, (0..100).collect::<Vec<_>>(), "carol: repeated {again}");
}
