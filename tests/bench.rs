//! The load tool: it drives a cluster of its own through the real protocol and accounts for
//! every message; and a server refuses clients past its cap instead of failing. Correctness
//! only: the numbers belong in BENCHMARKS.md.

mod common;

use std::process::Command;

use common::{run_limited, Cluster};

/// The flags that point the tool at the running cluster `c`: its balancer and its CA.
fn cluster_args(c: &Cluster) -> Vec<String> {
    let ca = c.ca().to_string_lossy().into_owned();
    vec![
        "--balancer".into(),
        c.balancer_addr.clone(),
        "--ca".into(),
        ca,
    ]
}

/// `bench` against the running cluster `c`.
fn bench_against(c: &Cluster, args: &[&str]) -> (i32, serde_json::Value, String) {
    let mut all = cluster_args(c);
    all.extend(args.iter().map(|a| a.to_string()));
    bench(&all.iter().map(String::as_str).collect::<Vec<_>>())
}

fn bench(args: &[&str]) -> (i32, serde_json::Value, String) {
    let out = run_limited(
        Command::new(env!("CARGO_BIN_EXE_fastchat-bench"))
            .args(args)
            .arg("--json")
            .env_remove("RUST_LOG"),
    );
    let json = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {out:?}"));
    (out.code, json, out.stderr)
}

#[test]
fn direct_mode_delivers_every_message_once_across_servers() {
    let (code, r, err) = bench(&[
        "--spawn-servers",
        "2",
        "--clients",
        "6",
        "--messages",
        "50",
        "--window",
        "4",
    ]);
    assert_eq!(code, 0, "{r} {err}");
    assert_eq!(r["mode"], "direct");
    assert_eq!(r["pattern"], "spread", "the fair pattern by default");
    assert_eq!(r["servers"], 2);
    assert_eq!(r["expected"], 300);
    assert_eq!(r["delivered"], 300);
    assert_eq!(r["lost"], 0);
    assert_eq!(r["duplicated"], 0);
    assert_eq!(r["errors"], 0);
    let p50 = r["latency_us"]["p50"].as_u64().unwrap();
    let max = r["latency_us"]["max"].as_u64().unwrap();
    assert!(p50 <= max);
    assert!(r["throughput"].as_f64().unwrap() > 0.0);
    // CPU: every process, and the servers' share without this tool's clients.
    let secs = r["cpu_secs"].as_object().unwrap();
    assert!(
        secs.contains_key("bench") && secs.contains_key("balancer"),
        "{r}"
    );
    let servers: f64 = secs
        .iter()
        .filter(|(name, _)| *name != "bench")
        .map(|(_, s)| s.as_f64().unwrap())
        .sum();
    let server_us = r["server_cpu_us_per_delivery"].as_f64().unwrap();
    assert!((server_us - servers * 1e6 / 300.0).abs() < 0.01, "{r}");
    assert!(
        server_us < r["cpu_us_per_delivery"].as_f64().unwrap(),
        "{r}"
    );
    // Context switches, counted up to the last delivery: messages cannot cross two servers
    // without threads of each waking to read them, and the servers' share leaves this tool's
    // out.
    let switches = r["switches"].as_object().unwrap();
    let made = |name: &str| switches[name].as_u64().unwrap();
    assert!(made("server0") > 0 && made("server1") > 0, "{r}");
    let servers: u64 = switches
        .iter()
        .filter(|(name, _)| *name != "bench")
        .map(|(_, k)| k.as_u64().unwrap())
        .sum();
    let per = r["server_switches_per_delivery"].as_f64().unwrap();
    assert!((per - servers as f64 / 300.0).abs() < 0.001, "{r}");
}

#[test]
fn any_number_of_driving_threads_delivers_everything_once() {
    // One thread for all seven clients, three for seven (shares of 3, 2 and 2), and one each.
    for threads in ["1", "3", "7"] {
        let (code, r, err) = bench(&[
            "--spawn-servers",
            "2",
            "--clients",
            "7",
            "--messages",
            "40",
            "--window",
            "3",
            "--threads",
            threads,
        ]);
        assert_eq!(code, 0, "{threads}: {r} {err}");
        assert_eq!(r["threads"].to_string(), threads, "{r}");
        assert_eq!(r["delivered"], 280, "{threads}: {r}");
        assert_eq!(r["lost"], 0);
        assert_eq!(r["duplicated"], 0);
        assert_eq!(r["errors"], 0, "{threads}: {r}");
    }
    // Never more threads than clients; by default one per core, at most 50 clients each.
    let cores = std::thread::available_parallelism().unwrap().get();
    for (clients, threads) in [(2, cores.min(2)), (120, cores.max(3))] {
        let n = clients.to_string();
        let (code, r, _) = bench(&["--spawn-servers", "1", "--clients", &n, "--messages", "2"]);
        assert_eq!(code, 0, "{r}");
        assert_eq!(r["threads"], threads, "{clients} clients: {r}");
    }
}

/// The CPUs this test process may run on, as the kernel lists them (`0-1`), and the first of
/// them alone.
fn our_cpus() -> (String, String) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let ours = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string();
    let first = ours.split([',', '-']).next().unwrap().to_string();
    (ours, first)
}

#[test]
fn the_servers_a_run_starts_run_on_the_cpus_it_is_given() {
    let (ours, first) = our_cpus();
    let run = |more: &[&str]| {
        let mut args = vec!["--spawn-servers", "2", "--clients", "4", "--messages", "10"];
        args.extend(more);
        let (code, r, err) = bench(&args);
        assert_eq!(code, 0, "{more:?}: {r} {err}");
        assert_eq!(r["delivered"], 40, "{more:?}: {r}");
        r["server_cpus"].clone()
    };
    assert_eq!(run(&[]), ours.as_str(), "every CPU unless asked");
    assert_eq!(run(&["--server-cpus", &first]), first.as_str());
}

#[test]
fn opaque_bodies_reach_everyone_once_in_both_modes() {
    for mode in ["direct", "group"] {
        let (code, r, err) = bench(&[
            "--spawn-servers",
            "2",
            "--clients",
            "6",
            "--messages",
            "20",
            "--mode",
            mode,
            "--group-size",
            "3",
            "--opaque",
        ]);
        assert_eq!(code, 0, "{mode}: {r} {err}");
        assert_eq!(r["opaque"], true);
        let expected = if mode == "group" { 6 * 20 * 2 } else { 6 * 20 };
        assert_eq!(r["expected"], expected, "{mode}: {r}");
        assert_eq!(
            (&r["delivered"], &r["lost"], &r["duplicated"], &r["errors"]),
            (&expected.into(), &0.into(), &0.into(), &0.into()),
            "{mode}: {r}"
        );
    }
    let (_, r, _) = bench(&["--spawn-servers", "1", "--clients", "2", "--messages", "5"]);
    assert_eq!(r["opaque"], false, "end to end unless asked");
}

#[test]
fn group_mode_counts_every_member_and_a_fixed_rate_is_kept() {
    let (code, r, err) = bench(&[
        "--spawn-servers",
        "3",
        "--clients",
        "6",
        "--messages",
        "10",
        "--mode",
        "group",
        "--group-size",
        "3",
        "--rate",
        "200",
        "--every",
        "0.1",
    ]);
    assert_eq!(code, 0, "{r} {err}");
    // 6 senders x 10 messages, each to the 2 other members of its group.
    assert_eq!(r["expected"], 120);
    assert_eq!(r["delivered"], 120);
    assert_eq!(r["lost"], 0);
    assert_eq!(r["duplicated"], 0);
    // 60 messages offered at 200/s take at least 0.29 s to send.
    assert!(r["send_secs"].as_f64().unwrap() >= 0.29, "{r}");
    // Stretch by stretch (--every): a tenth of a second each, one after the other, every
    // delivery in one of them, and the CPU of each spawned process in each.
    let periods = r["periods"].as_array().unwrap();
    assert!(periods.len() >= 3, "{r}");
    let mut delivered = 0;
    for (k, p) in periods.iter().enumerate() {
        let from = p["from_secs"].as_f64().unwrap();
        assert!((from - k as f64 * 0.1).abs() < 1e-9, "{p}");
        assert!(p["to_secs"].as_f64().unwrap() > from, "{p}");
        delivered += p["delivered"].as_u64().unwrap();
        let cpu = p["cpu_secs"].as_object().unwrap();
        for name in ["server0", "server1", "server2", "balancer", "bench"] {
            assert!(cpu[name].as_f64().unwrap() >= 0.0, "{p}");
        }
    }
    assert_eq!(delivered, 120, "{r}");
    assert!(
        r["periods"][0]["latency_us"]["p50"].as_u64().unwrap() > 0,
        "{r}"
    );
}

#[test]
fn idle_mode_reports_what_connections_cost_the_server() {
    let (code, r, err) = bench(&[
        "--spawn-servers",
        "1",
        "--clients",
        "50",
        "--mode",
        "idle",
        "--hold",
        "0.2",
    ]);
    assert_eq!(code, 0, "{r} {err}");
    let usage = &r["server_usage"][0];
    let before = usage["threads_before"].as_u64().unwrap();
    let after = usage["threads_after"].as_u64().unwrap();
    assert_eq!(after - before, 50, "one thread per client: {r}");
    // Of the memory, the stacks: each thread's holds a page at least.
    let stacks = |key: &str| usage[key].as_u64().unwrap();
    assert!(
        stacks("stack_kib_after") >= stacks("stack_kib_before") + 50 * 4,
        "{r}"
    );
    assert!(stacks("stack_kib_after") < usage["rss_kib_after"].as_u64().unwrap());
}

#[test]
fn kill_9_of_a_server_mid_run_loses_nothing_and_stores_nothing_twice() {
    // 12 clients on 3 servers; one server is killed a third of the way through. Its clients
    // go back to the balancer, reconnect elsewhere and re-send what was not confirmed.
    let (code, r, err) = bench(&[
        "--spawn-servers",
        "3",
        "--clients",
        "12",
        "--messages",
        "300",
        "--rate",
        "2400",
        "--kill-server",
        "0.5",
    ]);
    assert_eq!(code, 0, "{r} {err}");
    assert_eq!(r["expected"], 3600);
    assert_eq!(r["delivered"], 3600, "{r}");
    assert_eq!(r["lost"], 0);
    assert_eq!(r["duplicated"], 0, "nothing stored twice");
    assert_eq!(r["errors"], 0, "{r}");
    assert!(
        r["failovers"].as_u64().unwrap() >= 4,
        "the killed server's clients moved: {r}"
    );
    assert_eq!(r["kill_missed"], false);
}

/// Two spawned servers, 6 clients sending `messages` each at 120 msg/s in all, one server
/// stopped (SIGSTOP) 1 s in, with `more` flags: every message arrives once, and some client
/// left the stopped server. Returns the report and standard error.
fn one_of_two_stopped(messages: u64, more: &[&str]) -> (serde_json::Value, String) {
    let messages = messages.to_string();
    let mut args = vec![
        "--spawn-servers",
        "2",
        "--clients",
        "6",
        "--messages",
        &messages,
        "--rate",
        "120",
        "--stop-server",
        "1",
        "--drain",
        "20",
    ];
    args.extend_from_slice(more);
    let (code, r, err) = bench(&args);
    assert_eq!(code, 0, "{r} {err}");
    let expected = serde_json::Value::from(6 * messages.parse::<u64>().unwrap());
    assert_eq!((&r["expected"], &r["delivered"]), (&expected, &expected));
    assert_eq!(
        (&r["lost"], &r["duplicated"]),
        (&0.into(), &0.into()),
        "{r}"
    );
    assert!(r["failovers"].as_u64() >= Some(1), "{r}");
    assert_eq!(r["kill_missed"], false);
    (r, err)
}

#[test]
fn a_server_stopped_mid_run_loses_nothing_and_its_clients_leave_it() {
    // SIGSTOP, outside a commit, until the run is over: its clients leave it once it answers
    // nothing; messages to them wait in the database and come from the other server.
    one_of_two_stopped(60, &[]);
}

#[test]
fn a_server_stopped_and_resumed_mid_run_stores_nothing_twice() {
    // Stopped 1 s into the run and resumed 11 s later, while the run goes on: its clients
    // have left it by then and sent again, through the other server, what it had not
    // confirmed, and their recipients have acknowledged that. Resumed, it reads what they had
    // sent it before the stop: none of it may be stored a second time.
    let (_, err) = one_of_two_stopped(360, &["--resume-server", "11"]);
    assert!(!err.contains("was over before"), "resumed mid-run: {err}");
}

#[test]
fn a_kill_that_comes_after_the_run_is_called_off_and_fails_the_run() {
    let (code, r, err) = bench(&[
        "--spawn-servers",
        "2",
        "--clients",
        "4",
        "--messages",
        "5",
        "--kill-server",
        "15",
    ]);
    assert_eq!(
        code, 1,
        "a fault run without its fault tested nothing: {r} {err}"
    );
    assert_eq!(r["kill_missed"], true, "{r}");
    assert_eq!((&r["delivered"], &r["failovers"]), (&20.into(), &0.into()));
    assert!(err.contains("no failover was tested"), "{err}");
}

/// The servers' commit window (set in the configuration file the servers the tool starts
/// read) changes when a batch commits, never what it holds: with none, and with the longest
/// allowed, nothing is lost or repeated, whether senders wait for each message (a window of
/// one) or send on. A window out of range stops the server: the file is read.
#[test]
fn every_commit_window_delivers_everything_once() {
    let dir = tempfile::tempdir().unwrap();
    let run = |window: u32, args: &[&str]| {
        let config = dir.path().join(format!("window-{window}.toml"));
        std::fs::write(&config, format!("[server]\ncommit-window = {window}\n")).unwrap();
        run_limited(
            Command::new(env!("CARGO_BIN_EXE_fastchat-bench"))
                .args(["--clients", "4", "--messages", "30"])
                .args(args)
                .arg("--json")
                .env("FASTCHAT_CONFIG", &config)
                .env_remove("RUST_LOG"),
        )
    };
    // Two servers on one file gather for SHARED_FACTOR times the window (50 ms at 10,000 µs).
    for (window, servers) in [(0, "1"), (10_000, "1"), (10_000, "2")] {
        for sending in ["1", "8"] {
            let out = run(window, &["--spawn-servers", servers, "--window", sending]);
            assert_eq!(
                out.code, 0,
                "window {window} µs, {servers} server(s), {sending} in flight: {out:?}"
            );
            let r: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
            assert_eq!(
                (&r["delivered"], &r["lost"], &r["duplicated"]),
                (&120.into(), &0.into(), &0.into()),
                "{r}"
            );
        }
    }
    let out = run(10_001, &["--spawn-servers", "1"]);
    assert_eq!(
        out.code, 4,
        "a server it could not start is local trouble: {out:?}"
    );
    assert!(out.stderr.contains("server0 did not start"), "{out:?}");
}

#[test]
fn bad_arguments_are_refused_with_exit_2() {
    for args in [
        vec!["--clients", "10"],
        vec!["--spawn-servers", "1", "--mode", "group", "--clients", "7"],
        vec!["--spawn-servers", "1", "--mode", "sideways"],
        vec!["--spawn-servers", "1", "--rate", "-5"],
        vec!["--spawn-servers", "1", "--kill-server", "1"],
        vec!["--spawn-servers", "1", "--stop-server", "1"],
        vec![
            "--spawn-servers",
            "2",
            "--stop-server",
            "1",
            "--kill-server",
            "1",
        ],
        vec!["--spawn-servers", "1", "--threads", "0"],
        vec!["--spawn-servers", "1", "--every", "0"],
    ] {
        let out = run_limited(Command::new(env!("CARGO_BIN_EXE_fastchat-bench")).args(&args));
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
        assert!(out.stderr.contains("error"), "{args:?}: {out:?}");
        assert_eq!(out.stdout, "", "{args:?}");
    }
}

#[test]
fn a_full_server_refuses_new_clients_cleanly_and_keeps_serving_the_others() {
    let mut c = Cluster::start(0);
    c.add_server_with(&["--max-clients", "2"]);
    for u in ["alice", "bob", "carol"] {
        c.signup_lib(u);
    }
    let alice = c.login("alice");
    let bob = c.login("bob");
    let refused =
        fastchat::client::Client::login(&c.balancer_addr, &c.transport, "carol", "password-carol")
            .err()
            .expect("a third client is refused");
    assert_eq!(
        refused.to_string(),
        "server is full; ask the balancer for another"
    );
    assert_eq!(refused.exit_code(), 3, "no server available: 3");
    // The two connected clients still talk.
    alice.send("bob", 1, b"still here", None).unwrap();
    let deadline = std::time::Instant::now() + common::LIMIT;
    loop {
        match bob.next(deadline).unwrap() {
            Some(fastchat::client::Event::Message(m)) => {
                assert_eq!(m.body, b"still here");
                break;
            }
            Some(_) => continue,
            None => panic!("no message"),
        }
    }
    // Once one leaves, there is room again.
    drop(alice);
    let deadline = std::time::Instant::now() + common::LIMIT;
    loop {
        match fastchat::client::Client::login(
            &c.balancer_addr,
            &c.transport,
            "carol",
            "password-carol",
        ) {
            Ok(_) => break,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "never admitted: {e}");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

/// The child processes of `pid` (Linux).
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[test]
fn ctrl_c_stops_the_cluster_the_bench_started() {
    let mut bench = common::Proc::spawn(
        "bench",
        Command::new(env!("CARGO_BIN_EXE_fastchat-bench")).args([
            "--spawn-servers",
            "2",
            "--clients",
            "4",
            "--messages",
            "10000",
            "--rate",
            "100",
            "--quiet",
        ]),
    );
    let deadline = std::time::Instant::now() + common::LIMIT;
    let started = loop {
        let kids = children(bench.pid());
        if kids.len() == 3 {
            break kids;
        }
        assert!(std::time::Instant::now() < deadline, "no cluster: {kids:?}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let status = bench.interrupt().expect("the bench exits");
    assert_eq!(status.code(), Some(130));
    for pid in started {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|s| s.contains(") Z "))
                    .unwrap_or(true),
            "process {pid} was left running"
        );
    }
}

#[test]
fn clients_that_cannot_connect_are_reported_and_the_run_goes_on_without_them() {
    // Someone else's cluster: one server with room for 4 clients; the bench brings 6.
    let mut c = Cluster::start(0);
    c.add_server_with(&["--max-clients", "4"]);
    let (code, r, err) = bench_against(&c, &["--clients", "6", "--messages", "5"]);
    assert_eq!(code, 1, "a run with failures is not clean: {r} {err}");
    assert_eq!(r["connect_failed"], 2, "{r}");
    assert!(
        r["connect_error"]
            .as_str()
            .is_some_and(|e| e.contains("server is full")),
        "{r}"
    );
    assert_eq!((&r["expected"], &r["delivered"]), (&20.into(), &20.into()));
    // Another machine's servers: their CPU is not this tool's to measure.
    assert!(
        r["cpu_secs"].is_null() && r["cpu_us_per_delivery"].is_null(),
        "{r}"
    );
    assert!(
        r["switches"].is_null() && r["server_switches_per_delivery"].is_null(),
        "{r}"
    );
    let out = run_limited(
        Command::new(env!("CARGO_BIN_EXE_fastchat-bench"))
            .args(cluster_args(&c))
            .args(["--clients", "6", "--messages", "5", "--clients", "2"])
            .env_remove("RUST_LOG"),
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("cpu         n/a"), "{out:?}");
    assert!(!out.stdout.contains("µs per delivery"), "{out:?}");
}

#[test]
fn a_balancer_that_limits_signups_is_named_with_its_flag() {
    // A cluster started with the balancer's defaults takes a few signups from one address;
    // the tool says which flag lets a load test in.
    let c = Cluster::start_with_balancer_args(1, &["--signups-per-address", "3"]);
    let (code, r, err) = bench_against(&c, &["--clients", "5", "--messages", "3"]);
    assert_eq!(code, 1, "a run with failures is not clean: {r} {err}");
    assert_eq!(r["connect_failed"], 2, "{r}");
    let why = r["connect_error"].as_str().unwrap_or_default();
    assert!(
        why.contains("too many signups") && why.contains("--signups-per-address 0"),
        "{r}"
    );
    assert_eq!((&r["expected"], &r["delivered"]), (&9.into(), &9.into()));
}

#[test]
fn clients_assigned_a_server_that_just_stopped_are_given_another() {
    // A stopped server (SIGSTOP: its sockets open, nothing answered) stays in the balancer's
    // rotation until its heartbeats are missed; the clients it is assigned meanwhile ask the
    // balancer for another, as the client library does, and are not left out.
    let c = Cluster::start_with_balancer_args(2, &["--signups-per-address", "0"]);
    c.wait_servers(2);
    common::stop_outside_a_commit(c.servers[1].pid(), &c.db);
    let (code, r, err) = bench_against(&c, &["--clients", "6", "--messages", "5"]);
    common::signal(c.servers[1].pid(), "-CONT");
    assert_eq!(code, 0, "{r} {err}");
    assert_eq!(r["connect_failed"], 0, "{r}");
    assert_eq!((&r["expected"], &r["delivered"]), (&30.into(), &30.into()));
}

#[test]
fn clients_of_a_server_stopped_mid_run_leave_it_once_it_answers_nothing() {
    // SIGSTOP keeps the server's sockets open and answers nothing: a client that waited 5 s
    // for a Stored asks the server whether it answers (Ping), and leaves it for another when
    // it does not within 5 s more.
    let c = Cluster::start_with_balancer_args(2, &["--signups-per-address", "0"]);
    c.wait_servers(2);
    let (pid, db) = (c.servers[1].pid(), c.db.clone());
    let (done, ended) = std::sync::mpsc::channel::<()>();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(1));
        common::stop_outside_a_commit(pid, &db);
        // Resumed once the run has ended (or after 30 s): whether it ended first.
        let ended_first = ended
            .recv_timeout(std::time::Duration::from_secs(30))
            .is_ok();
        common::signal(pid, "-CONT");
        ended_first
    });
    let (code, r, err) =
        bench_against(&c, &["--clients", "6", "--messages", "50", "--rate", "100"]);
    let _ = done.send(());
    let ended_first = stopper.join().unwrap();
    assert_eq!(code, 0, "{r} {err}");
    assert_eq!(
        (&r["expected"], &r["delivered"]),
        (&300.into(), &300.into())
    );
    assert!(r["failovers"].as_u64() >= Some(1), "{r}");
    // Every message delivered while the server was still stopped: its clients left it.
    assert!(ended_first, "{r}");
}

#[test]
fn a_rate_sweep_reports_each_run_and_draws_them() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("sweep.svg");
    let out = run_limited(
        Command::new(env!("CARGO_BIN_EXE_fastchat-bench"))
            .args(["--spawn-servers", "1", "--clients", "4", "--messages", "20"])
            .args(["--sweep", "rate=200,400", "--json", "--svg"])
            .arg(&svg)
            .env_remove("RUST_LOG"),
    );
    assert_eq!(out.code, 0, "{out:?}");
    let runs = out.json_lines();
    assert_eq!(runs.len(), 2, "{out:?}");
    assert_eq!(
        (&runs[0]["rate"], &runs[1]["rate"]),
        (&200.0.into(), &400.0.into())
    );
    assert!(runs.iter().all(|r| r["delivered"] == 80), "{out:?}");
    let drawn = std::fs::read_to_string(&svg).unwrap();
    assert!(
        drawn.starts_with("<svg") && drawn.contains("p99"),
        "{drawn}"
    );
}

/// Whether `program` is installed (in PATH or /usr/sbin); where it is not, the rival tests
/// are skipped with a note, unless FASTCHAT_REQUIRE_RIVALS says they must run (CI installs
/// mosquitto and ngircd).
fn rival_installed(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain([std::path::PathBuf::from("/usr/sbin")])
        .any(|dir| dir.join(program).is_file());
    if !found {
        assert!(
            std::env::var_os("FASTCHAT_REQUIRE_RIVALS").is_none(),
            "{program} is required here (FASTCHAT_REQUIRE_RIVALS) and is not installed"
        );
        eprintln!("{program} is not installed: its rival run was not tested");
    }
    found
}

/// The processes whose command line mentions `text`, and their command lines.
fn processes_mentioning(text: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let cmdline = std::fs::read(e.ok()?.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(text).then_some(cmdline)
        })
        .collect()
}

#[test]
fn a_rival_server_carries_the_same_workload_and_every_message_is_accounted_for() {
    for rival in ["mosquitto", "ngircd"] {
        if !rival_installed(rival) {
            continue;
        }
        let tmp = tempfile::tempdir().unwrap();
        let (ours, first) = our_cpus();
        for (args, expected) in [
            // Direct, spread: 10 x 100, over TLS (as fastchat, by default), a whole window
            // (32) written at once (ngircd stalls on it in one TLS record).
            (vec!["--clients", "10", "--messages", "100"], 1000),
            // Groups of 3: every message to the 2 others, none back to its sender.
            (
                vec![
                    "--clients",
                    "6",
                    "--messages",
                    "20",
                    "--mode",
                    "group",
                    "--group-size",
                    "3",
                    "--insecure-plaintext",
                ],
                240,
            ),
            // A fixed rate, with a thread per client, the rival on one CPU.
            (
                vec![
                    "--clients",
                    "4",
                    "--messages",
                    "25",
                    "--rate",
                    "400",
                    "--threads",
                    "4",
                    "--server-cpus",
                    &first,
                ],
                100,
            ),
        ] {
            let out = run_limited(
                Command::new(env!("CARGO_BIN_EXE_fastchat-bench"))
                    .args(["--rival", rival, "--json", "--drain", "3"])
                    .args(&args)
                    .env("TMPDIR", tmp.path())
                    .env_remove("RUST_LOG"),
            );
            let r: serde_json::Value = serde_json::from_str(out.stdout.trim())
                .unwrap_or_else(|e| panic!("{rival} {args:?}: not JSON ({e}): {out:?}"));
            assert_eq!(out.code, 0, "{rival} {args:?}: {r} {}", out.stderr);
            let server = r["server"].as_str().unwrap().to_lowercase();
            assert!(server.starts_with(rival), "{r}");
            assert_eq!(r["opaque"], true, "no end-to-end encryption: {r}");
            let plaintext = args.contains(&"--insecure-plaintext");
            assert_eq!(r["tls"], !plaintext, "{rival} {args:?}: {r}");
            assert_eq!(
                (
                    &r["expected"],
                    &r["delivered"],
                    &r["lost"],
                    &r["duplicated"]
                ),
                (&expected.into(), &expected.into(), &0.into(), &0.into()),
                "{rival} {args:?}: {r}"
            );
            assert_eq!(r["errors"], 0, "{r}");
            let cpus = if args.contains(&"--server-cpus") {
                &first
            } else {
                &ours
            };
            assert_eq!(r["server_cpus"], cpus.as_str(), "{rival} {args:?}: {r}");
            // Its CPU and this tool's, counted apart.
            let secs = r["cpu_secs"].as_object().unwrap();
            assert!(
                secs.contains_key(rival) && secs.contains_key("bench"),
                "{r}"
            );
            // Counted (an event loop that never slept through a short burst counts none).
            assert!(
                r["switches"][rival].is_u64() && r["switches"]["bench"].as_u64() > Some(0),
                "{r}"
            );
        }
        // Stopped, and its folder gone.
        let left = processes_mentioning(&tmp.path().to_string_lossy());
        assert!(left.is_empty(), "{rival} left running: {left:?}");
        let files: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
        assert!(files.is_empty(), "{rival} left {files:?}");
    }
}

#[test]
fn a_rival_that_is_missing_or_cannot_carry_the_messages_is_refused_clearly() {
    let bench = || Command::new(env!("CARGO_BIN_EXE_fastchat-bench"));
    let missing = run_limited(bench().args([
        "--rival",
        "mosquitto",
        "--rival-bin",
        "/nonexistent/mosquitto",
    ]));
    assert_eq!(missing.code, 4, "local trouble: {missing:?}");
    assert!(
        missing
            .stderr
            .contains("cannot start /nonexistent/mosquitto"),
        "{missing:?}"
    );
    for args in [
        vec!["--rival", "redis"],
        vec!["--rival", "ngircd", "--size", "401"],
        vec!["--rival", "mosquitto", "--spawn-servers", "1"],
        vec!["--rival-bin", "/usr/sbin/mosquitto", "--spawn-servers", "1"],
        vec!["--spawn-servers", "1", "--against", "mosquitto"],
        vec![
            "--spawn-servers",
            "1",
            "--sweep",
            "rate=10",
            "--against",
            "irc",
        ],
    ] {
        let out = run_limited(bench().args(&args));
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
        assert!(out.stderr.contains("error"), "{args:?}: {out:?}");
    }
}

#[test]
fn a_sweep_against_the_rivals_runs_each_value_on_every_server_and_draws_them_together() {
    if !(rival_installed("mosquitto") && rival_installed("ngircd")) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("rivals.svg");
    let out = run_limited(
        Command::new(env!("CARGO_BIN_EXE_fastchat-bench"))
            .args(["--spawn-servers", "1", "--opaque", "--clients", "4"])
            .args(["--messages", "20", "--sweep", "rate=200,400"])
            .args(["--against", "mosquitto,ngircd", "--json", "--svg"])
            .arg(&svg)
            .env_remove("RUST_LOG"),
    );
    assert_eq!(out.code, 0, "{out:?}");
    let runs = out.json_lines();
    // Each value on every server, one after another.
    let order: Vec<(String, f64)> = runs
        .iter()
        .map(|r| {
            let server = r["server"].as_str().unwrap().to_lowercase();
            let name = server.split(' ').next().unwrap().to_string();
            (name, r["rate"].as_f64().unwrap())
        })
        .collect();
    let expected: Vec<(String, f64)> = [200.0, 400.0]
        .into_iter()
        .flat_map(|rate| ["fastchat", "mosquitto", "ngircd"].map(|s| (s.to_string(), rate)))
        .collect();
    assert_eq!(order, expected, "{out:?}");
    assert!(runs.iter().all(|r| r["delivered"] == 80), "{out:?}");
    let drawn = std::fs::read_to_string(&svg).unwrap();
    for line in [
        "fastchat, 1 server (servers alone) p99",
        "mosquitto p50",
        "ngircd p99",
    ] {
        assert!(drawn.contains(line), "{line} in {drawn}");
    }
}
