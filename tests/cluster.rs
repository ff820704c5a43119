//! Many servers: assignment algorithms, the registry, the peer mesh, races and failover.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{next_message, Cluster, LIMIT};
use fastchat::client::{Client, Event};
use fastchat::server::CONNECTION_STACK;

/// Logs in `n` library clients and counts them per server index.
fn spread(c: &Cluster, n: usize) -> (Vec<Client>, Vec<usize>) {
    let mut counts = vec![0; c.servers.len()];
    let mut clients = Vec::new();
    for i in 0..n {
        let user = format!("u{i}");
        c.signup_lib(&user);
        let client = c.login(&user);
        counts[c.index_of(client.server().id)] += 1;
        clients.push(client);
    }
    (clients, counts)
}

#[test]
fn round_robin_spreads_logins_exactly() {
    let c = Cluster::start_with(3, "round-robin");
    c.wait_servers(3);
    let (_clients, counts) = spread(&c, 30);
    assert_eq!(counts, [10, 10, 10]);
}

#[test]
fn least_loaded_stays_within_one_of_even() {
    let c = Cluster::start_with(3, "least-loaded");
    c.wait_servers(3);
    let (_clients, counts) = spread(&c, 30);
    assert!(counts.iter().all(|n| (9..=11).contains(n)), "{counts:?}");
    assert_eq!(counts.iter().sum::<usize>(), 30);
}

#[test]
fn random_and_p2c_use_every_server() {
    for algo in ["random", "p2c"] {
        let c = Cluster::start_with(3, algo);
        c.wait_servers(3);
        let (_clients, counts) = spread(&c, 30);
        assert!(counts.iter().all(|n| *n > 0), "{algo}: {counts:?}");
    }
}

#[test]
fn loads_are_reported_and_listed() {
    let c = Cluster::start_with(2, "round-robin");
    c.wait_servers(2);
    let (_clients, _) = spread(&c, 4);
    let deadline = Instant::now() + LIMIT;
    loop {
        let out = c.run("u0", &["servers"]);
        assert_eq!(out.code, 0, "{out:?}");
        if out.lines().iter().all(|l| l.ends_with(": 2 clients")) {
            assert_eq!(out.lines().len(), 2);
            break;
        }
        assert!(Instant::now() < deadline, "loads never reported: {out:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_new_server_is_used_and_a_silent_one_leaves_within_two_seconds() {
    let mut c = Cluster::start_with(1, "round-robin");
    c.wait_servers(1);
    c.add_server();
    c.wait_servers(2);
    let (_clients, counts) = spread(&c, 4);
    assert_eq!(counts, [2, 2], "the later server takes new logins");

    c.servers[0].kill9();
    let killed = Instant::now();
    let live = c.wait_servers(1);
    assert!(
        killed.elapsed() < Duration::from_millis(2600),
        "took {:?}",
        killed.elapsed()
    );
    assert_eq!(live[0].id, c.server_ids[1]);
    c.signup_lib("late");
    for _ in 0..4 {
        assert_eq!(c.login("late").server().id, c.server_ids[1]);
    }
}

#[test]
fn a_message_crosses_to_another_server_live() {
    let c = Cluster::start_with(2, "round-robin");
    c.wait_servers(2);
    // No waiting for the peer links: a server links to another on demand.
    c.signup_lib("alice");
    c.signup_lib("bob");
    let alice = c.login("alice");
    let bob = c.login("bob");
    assert_ne!(alice.server().id, bob.server().id);
    let deadline = Instant::now() + LIMIT;
    assert_eq!(bob.next(deadline).unwrap(), Some(Event::Synced));
    for i in 0..20u64 {
        alice
            .send("bob", i, format!("m{i}").as_bytes(), None)
            .unwrap();
    }
    for i in 0..20u64 {
        let m = next_message(&bob);
        assert_eq!(
            (m.from.as_str(), m.body.as_slice()),
            ("alice", format!("m{i}").as_bytes())
        );
        bob.ack(&[m.id]).unwrap();
    }
    assert_eq!(c.count("SELECT count(*) FROM messages"), 0);
}

#[test]
fn logging_in_while_messages_are_in_flight_loses_and_repeats_nothing() {
    let c = Cluster::start_with(3, "round-robin");
    c.wait_servers(3);
    c.signup_lib("alice");
    c.signup_lib("bob");
    const N: u64 = 300;
    let (balancer, transport) = (c.balancer_addr.clone(), c.transport.clone());
    let sender = std::thread::spawn(move || {
        let (alice, _) = Client::login(&balancer, &transport, "alice", "password-alice").unwrap();
        for i in 0..N {
            alice.send("bob", i, &i.to_be_bytes(), None).unwrap();
            // Pacing (not synchronisation): spread the sends over many of bob's sessions.
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    // Bob logs in and out over and over, on server after server, while alice sends.
    let mut seen: Vec<u64> = Vec::new();
    let mut acked: HashSet<u64> = HashSet::new();
    let started = Instant::now();
    let mut sessions = 0;
    while (seen.len() as u64) < N {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "stuck at {}",
            seen.len()
        );
        sessions += 1;
        let bob = c.login("bob");
        let mut ids = Vec::new();
        let until = Instant::now() + Duration::from_millis(25);
        while let Some(event) = bob.next(until).unwrap() {
            if let Event::Message(m) = event {
                let seq = u64::from_be_bytes(m.body[..8].try_into().unwrap());
                assert!(
                    !acked.contains(&seq),
                    "message {seq} came back after its ack"
                );
                if !seen.contains(&seq) {
                    seen.push(seq);
                }
                ids.push((m.id, seq));
            }
        }
        bob.ack(&ids.iter().map(|(id, _)| *id).collect::<Vec<_>>())
            .unwrap();
        acked.extend(ids.iter().map(|(_, seq)| *seq));
    }
    sender.join().unwrap();
    assert!(
        sessions > 5,
        "the test's power: bob reconnected only {sessions} times"
    );
    assert_eq!(seen, (0..N).collect::<Vec<_>>(), "each once, in send order");
    assert_eq!(c.count("SELECT count(*) FROM messages"), 0);
}

/// Alice sends `n` numbered messages to bob (waiting for each to be stored) while bob reads and
/// acknowledges; `kill` runs after `kill_at` messages. Bob must get every stored message once,
/// in order.
fn traffic_with_a_kill(c: &mut Cluster, n: u64, kill_at: u64, kill: impl FnOnce(&mut Cluster)) {
    c.signup_lib("alice");
    c.signup_lib("bob");
    let alice = Arc::new(c.login("alice"));
    let bob = c.login("bob");
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        // Delivery is at least once: a message comes again after a failover until its
        // acknowledgement commits (the end-to-end layer drops it; this raw reader, by id).
        let mut ids = HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(90);
        while (got.len() as u64) < n {
            match bob.next(deadline).unwrap() {
                Some(Event::Message(m)) => {
                    if ids.insert(m.id) {
                        got.push(u64::from_be_bytes(m.body[..8].try_into().unwrap()));
                    }
                    bob.ack(&[m.id]).unwrap();
                }
                Some(_) => {}
                None => break,
            }
        }
        (got, bob.server().id)
    });
    let mut kill = Some(kill);
    for i in 0..n {
        if i == kill_at {
            (kill.take().unwrap())(c);
        }
        alice.send("bob", i, &i.to_be_bytes(), None).unwrap();
    }
    let (got, _) = reader.join().unwrap();
    assert_eq!(
        got,
        (0..n).collect::<Vec<_>>(),
        "every stored message, once, in order"
    );
}

#[test]
fn killing_the_recipients_server_loses_nothing() {
    let mut c = Cluster::start_with(3, "round-robin");
    c.wait_servers(3);
    // Logins go alice -> server 1, bob -> server 2; kill bob's mid-stream.
    let bob_server = c.server_ids[1];
    traffic_with_a_kill(&mut c, 200, 80, |c| {
        let i = c.index_of(bob_server);
        c.servers[i].kill9();
    });
}

#[test]
fn killing_the_senders_server_loses_nothing() {
    let mut c = Cluster::start_with(3, "round-robin");
    c.wait_servers(3);
    let alice_server = c.server_ids[0];
    traffic_with_a_kill(&mut c, 200, 80, |c| {
        let i = c.index_of(alice_server);
        c.servers[i].kill9();
    });
}

#[test]
fn servers_reregister_after_a_balancer_restart() {
    let mut c = Cluster::start_with(2, "round-robin");
    let before = c.wait_servers(2);
    c.signup_lib("alice");
    c.balancer.kill9();
    // The servers notice, and try again every heartbeat.
    std::thread::sleep(Duration::from_secs(1));
    c.restart_balancer();
    // A client that comes before the servers have registered again is not sent away: the
    // new balancer waits for them.
    let first = c.login("alice");
    assert!(c.server_ids.contains(&first.server().id));
    drop(first);
    let mut after = c.wait_servers(2);
    after.sort_by_key(|s| s.id);
    let ids = |v: &[fastchat::net::ServerInfo]| {
        v.iter().map(|s| (s.id, s.addr.clone())).collect::<Vec<_>>()
    };
    assert_eq!(ids(&after), ids(&before), "same ids and addresses");
    let alice = c.login("alice");
    assert!(c.server_ids.contains(&alice.server().id));
}

#[test]
fn chat_mode_moves_to_another_server_when_its_server_dies() {
    let mut c = Cluster::start_with(2, "round-robin");
    c.wait_servers(2);
    c.signup("alice");
    c.signup("bob");
    let mut bob = c.spawn("bob", &["chat"]);
    let hello = bob.line();
    let on: u64 = hello
        .split("on server ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected greeting {hello:?}"));
    c.wait_online("bob", 1);
    c.send("alice", "bob", "before");
    assert_eq!(bob.line(), "alice: before");

    let i = c.index_of(on);
    c.servers[i].kill9();
    let moved = bob.line();
    assert!(
        moved.starts_with("* server lost; now on server "),
        "{moved:?}"
    );
    assert!(!moved.contains(&format!("server {on} ")), "{moved:?}");
    c.send("alice", "bob", "after");
    assert_eq!(bob.line(), "alice: after");

    bob.type_line("/msg alice got it");
    assert_eq!(bob.line(), "-> alice: got it");
    bob.type_line("/quit");
    assert_eq!(bob.wait_exit(LIMIT).and_then(|s| s.code()), Some(0));
    let out = c.run("alice", &["recv"]);
    assert_eq!(
        out.lines(),
        ["bob: got it"],
        "{out:?} {}",
        c.count("SELECT count(*) FROM messages")
    );
}

#[test]
fn two_balancers_serve_one_cluster_and_clients_try_the_next() {
    let mut c = Cluster::start(0);
    let (_second, second_addr) = c.spawn_balancer();
    let first_addr = c.balancer_addr.clone();
    // Servers register with both; clients (and this test) try the first, then the second.
    c.balancer_addr = format!("{first_addr},{second_addr}");
    c.add_server();
    c.add_server();
    for addr in [&first_addr, &second_addr] {
        let deadline = Instant::now() + LIMIT;
        loop {
            let listed = fastchat::client::BalancerClient::connect(addr, &c.transport)
                .and_then(|mut b| b.servers())
                .map_or(0, |l| l.len());
            if listed == 2 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{addr} lists {listed} servers, not 2"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    c.signup("alice");
    c.signup("bob");
    c.send("alice", "bob", "through the first balancer");
    // The first balancer dies: accounts and sessions are in the database, so the second
    // takes every client, signups and logins included.
    c.balancer.kill9();
    c.signup("carol");
    c.send("alice", "bob", "through the second balancer");
    c.send("carol", "bob", "a newcomer, through the second");
    let out = c.run("bob", &["recv"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.lines(),
        [
            "alice: through the first balancer",
            "alice: through the second balancer",
            "carol: a newcomer, through the second"
        ]
    );
}

/// Each thread of a process by name, with its scheduling policy (`/proc/PID/task/*/stat`,
/// field 41: 0 normal, 3 batch).
fn thread_policies(pid: u32) -> Vec<(String, u32)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let Ok(stat) = std::fs::read_to_string(task.join("stat")) else {
            continue; // the thread ended meanwhile
        };
        // The name is in parentheses and may hold spaces; the fields after it count from 3.
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        let policy = after_name.split(' ').nth(41 - 3).unwrap().parse().unwrap();
        let Ok(name) = std::fs::read_to_string(task.join("comm")) else {
            continue;
        };
        threads.push((name.trim().to_string(), policy));
    }
    threads
}

#[test]
fn a_server_runs_without_glibcs_thread_and_stack_caches_under_its_own_pid() {
    let c = Cluster::start(1);
    // The server started itself again with the tunables, as the same process (scripts that
    // keep its PID keep the right one).
    let pid = c.servers[0].pid();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let tunables: Vec<_> = environ
        .split(|b| *b == 0)
        .filter_map(|v| v.strip_prefix(b"GLIBC_TUNABLES="))
        .map(String::from_utf8_lossy)
        .collect();
    // glibc takes the stack cache's setting out of the variable as it reads it (a tunable
    // not passed on to set-user-ID programs); what it did is checked below.
    assert_eq!(tunables, ["glibc.malloc.tcache_count=0"]);
    c.signup("alice");
    c.signup("bob");
    // A connected client's thread stack is found as such.
    let alice = c.login("alice");
    assert!(connection_stacks(pid) >= 1, "no connection stack found");
    drop(alice);
    c.send("alice", "bob", "still serving");
    assert_eq!(c.run("bob", &["recv"]).lines(), ["alice: still serving"]);
    // Each of those commands was a connection with two threads (the handshake's and the
    // session's), all ended now. Without the stack cache their stacks are gone: every
    // connection thread's stack left belongs to a live connection thread.
    let deadline = Instant::now() + LIMIT;
    loop {
        let (stacks, threads) = (connection_stacks(pid), connection_threads(pid));
        if stacks <= threads {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{stacks} connection thread stacks for {threads} connection threads: ended \
             threads' stacks are kept"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The stacks of connection threads in process `pid`: anonymous writable mappings of their
/// size right above a guard page, live or kept for new threads.
fn connection_stacks(pid: u32) -> usize {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mappings: Vec<(u64, &str, bool)> = maps
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (start, end) = fields[0].split_once('-').unwrap();
            let start = u64::from_str_radix(start, 16).unwrap();
            let size = u64::from_str_radix(end, 16).unwrap() - start;
            (size, fields[1], fields.len() == 5)
        })
        .collect();
    mappings
        .windows(2)
        .filter(|pair| {
            let [(guard, below, anon_below), (size, perms, anon)] = pair else {
                return false;
            };
            (*guard, *below, *anon_below) == (4096, "---p", true)
                && (*size, *perms, *anon) == (CONNECTION_STACK as u64, "rw-p", true)
        })
        .count()
}

/// The live connection threads (named `conn`) of process `pid`.
fn connection_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == "conn")
        .count()
}

/// What `read` says of each thread of server `pid`, once it has a connection thread (`conn`).
fn once_connected<T: std::fmt::Debug>(
    pid: u32,
    read: impl Fn(u32) -> Vec<(String, T)>,
) -> Vec<(String, T)> {
    let deadline = Instant::now() + LIMIT;
    loop {
        let threads = read(pid);
        if threads.iter().any(|(name, _)| name == "conn") {
            return threads;
        }
        assert!(
            Instant::now() < deadline,
            "no connection thread: {threads:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_server_runs_its_threads_under_batch_scheduling() {
    const SCHED_BATCH: u32 = 3;
    let c = Cluster::start(1);
    c.signup_lib("alice");
    let _alice = c.login("alice");
    let threads = once_connected(c.servers[0].pid(), thread_policies);
    // Only the Ctrl-C handler's thread starts before the server does.
    let normal: Vec<_> = threads
        .iter()
        .filter(|(name, policy)| *policy != SCHED_BATCH && name != "ctrl-c")
        .collect();
    assert!(normal.is_empty(), "not batch: {normal:?} of {threads:?}");
    assert!(threads.iter().any(|(name, _)| name == "db-writer"));
    // The balancer is left alone: its threads keep the policy it was started with (ours).
    let ours = thread_policies(std::process::id())[0].1;
    let balancer = thread_policies(c.balancer.pid());
    assert!(
        balancer.iter().all(|(_, policy)| *policy == ours),
        "{balancer:?}"
    );
}

/// Each thread of a process by name, with the CPUs it may run on (`Cpus_allowed_list` in
/// `/proc/PID/task/*/status`, as `taskset -c` writes them).
fn thread_cpus(pid: u32) -> Vec<(String, String)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(status) = std::fs::read_to_string(task.unwrap().path().join("status")) else {
            continue; // the thread ended meanwhile
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(key))
                .unwrap()
                .trim()
                .to_string()
        };
        threads.push((field("Name:"), field("Cpus_allowed_list:")));
    }
    threads
}

#[test]
fn a_server_given_cpus_runs_every_thread_on_them_alone() {
    let ours = thread_cpus(std::process::id())[0].1.clone();
    // The first CPU this test may use, alone (as a range of one, twice).
    let first = ours.split([',', '-']).next().unwrap().to_string();
    if first == ours {
        eprintln!("one CPU only ({ours}): nothing to tell apart");
        return;
    }
    let mut c = Cluster::start(0);
    c.add_server_with(&["--cpus", &format!("{first}-{first},{first}")]);
    let want = first;
    c.signup("alice");
    c.signup("bob");
    let _alice = c.login("alice");
    c.send("bob", "alice", "pinned");
    assert_eq!(c.run("alice", &["recv"]).lines(), ["bob: pinned"]);
    let pid = c.servers[0].pid();
    let threads = once_connected(pid, thread_cpus);
    let elsewhere: Vec<_> = threads.iter().filter(|(_, list)| *list != want).collect();
    assert!(
        elsewhere.is_empty(),
        "not on {want}: {elsewhere:?} of {threads:?}"
    );
    for name in ["db-writer", "freeze-watch", "ctrl-c"] {
        assert!(
            threads.iter().any(|(n, _)| n == name),
            "{name}: {threads:?}"
        );
    }
    // The balancer keeps what it was started with (ours).
    let balancer = thread_cpus(c.balancer.pid());
    assert!(
        balancer.iter().all(|(_, list)| *list == ours),
        "{balancer:?}"
    );
}
