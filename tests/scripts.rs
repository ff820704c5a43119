//! The shell scripts: the classroom demo and the cluster helper.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::run_limited;

fn bin_dir() -> PathBuf {
    common::bin("fastchat").parent().unwrap().to_path_buf()
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

#[test]
fn demo_runs_a_conversation_and_exits_0() {
    let out = run_limited(Command::new(script("demo.sh")).env("FASTCHAT_BIN", bin_dir()));
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    for expected in [
        "logged in as bob on server 1",
        "logged in as dave on server 2",
        "alice on server 3",
        "alice: hi bob! this crossed from one server to another",
        "   alice: carol, lunch at noon?\n   bob: and bring the slides\n",
        "[alice/class] alice: welcome to the class, everyone",
        "removed dave from alice/class; new group key (epoch 5)",
        "[alice/class] alice: dave cannot read this one",
        "dave's screen:\n   * alice removed you from alice/class\n",
        "[alice/class] alice sent photo.png (70 B) -> ",
        "bob's copy is byte-for-byte the original",
        "* server lost; now on server ",
        "alice: bob, are you still there?",
        "Done: stopping every process",
    ] {
        assert!(
            out.stdout.contains(expected),
            "missing {expected:?} in\n{}",
            out.stdout
        );
    }
    // After the kill, the listing names the two servers left, with bob and dave on them (not
    // a count from before bob moved).
    let (_, listing) = out
        .stdout
        .rsplit_once("$ fastchat servers\n")
        .expect("the last listing");
    let servers: Vec<&str> = listing
        .lines()
        .take_while(|l| l.contains(" at 127.0.0.1:"))
        .collect();
    let clients: u32 = servers
        .iter()
        .filter_map(|l| {
            l.rsplit_once(": ")?
                .1
                .split(' ')
                .next()?
                .parse::<u32>()
                .ok()
        })
        .sum();
    assert!(servers.len() == 2 && clients == 2, "{listing}");
    assert!(
        !out.stdout.contains("\u{1b}["),
        "no colour when not on a terminal"
    );
}

/// `scripts/cluster.sh COMMAND DIR` with this build's binaries.
fn cluster_sh(command: &str, dir: &std::path::Path) -> common::Output {
    run_limited(
        Command::new(script("cluster.sh"))
            .arg(command)
            .arg(dir)
            .env("FASTCHAT_BIN", bin_dir()),
    )
}

#[test]
fn cluster_script_starts_and_stops_by_pid() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("c");
    // Stops the cluster however the test ends (a failed assertion left it running).
    struct StopOnDrop(PathBuf);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            let _ = run_limited(Command::new(script("cluster.sh")).arg("stop").arg(&self.0));
        }
    }
    let _stop = StopOnDrop(d.clone());
    let start = run_limited(
        Command::new(script("cluster.sh"))
            .args(["start", "2"])
            .arg(&d)
            .args(["--scrypt-log-n", "4"])
            .env("FASTCHAT_BIN", bin_dir()),
    );
    assert_eq!(start.code, 0, "{start:?}");
    assert!(start.stdout.contains("server 2  127.0.0.1:"), "{start:?}");
    let pids: Vec<String> = ["balancer", "server1", "server2"]
        .iter()
        .map(|p| {
            std::fs::read_to_string(d.join(format!("{p}.pid")))
                .unwrap()
                .trim()
                .to_string()
        })
        .collect();
    let balancer = std::fs::read_to_string(d.join("balancer.addr")).unwrap();

    let again = run_limited(
        Command::new(script("cluster.sh"))
            .args(["start", "1"])
            .arg(&d)
            .env("FASTCHAT_BIN", bin_dir()),
    );
    assert_eq!(again.code, 1, "refuses to start twice: {again:?}");

    let both_servers_listed = || {
        let deadline = std::time::Instant::now() + common::LIMIT;
        loop {
            // A home of its own: the cluster's certificate is pinned there, not in the
            // user's (where a later cluster on the same port would meet the old pin).
            let out = run_limited(
                Command::new(common::bin("fastchat"))
                    .args(["--balancer", balancer.trim(), "servers"])
                    .env("FASTCHAT_HOME", dir.path().join("home")),
            );
            if out.lines().len() == 2 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{out:?}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    both_servers_listed();

    // The balancer and a server die (kill -9): `restart` starts those two again, as they
    // were started (the balancer on its address, with its options), and only those.
    let restart = || cluster_sh("restart", &d);
    let nothing = restart();
    assert_eq!(nothing.code, 0, "{nothing:?}");
    assert!(nothing.stdout.contains("is running"), "{nothing:?}");
    for pid in &pids[..2] {
        assert!(Command::new("kill")
            .args(["-9", pid])
            .status()
            .unwrap()
            .success());
    }
    let status = || cluster_sh("status", &d);
    let down = status();
    assert_eq!(down.code, 1, "a process is down: {down:?}");
    assert!(down.stdout.contains("server1  pid"), "{down:?}");
    let restarted = restart();
    assert_eq!(restarted.code, 0, "{restarted:?}");
    assert_eq!(
        restarted.stdout.matches("restarted").count(),
        2,
        "{restarted:?}"
    );
    assert!(restarted.stdout.contains(balancer.trim()), "{restarted:?}");
    let pid_of = |p: &str| {
        std::fs::read_to_string(d.join(format!("{p}.pid")))
            .unwrap()
            .trim()
            .to_string()
    };
    let now: Vec<String> = ["balancer", "server1", "server2"].map(pid_of).to_vec();
    assert!(
        now[0] != pids[0] && now[1] != pids[1] && now[2] == pids[2],
        "{now:?} {pids:?}"
    );
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", now[0])).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("--scrypt-log-n 4"), "{cmdline}");
    assert!(d.join("balancer.log.old").exists() && d.join("server1.log.old").exists());
    both_servers_listed();
    let up = status();
    assert_eq!(up.code, 0, "{up:?}");
    let pids = [pids, now].concat();

    let stop = run_limited(Command::new(script("cluster.sh")).arg("stop").arg(&d));
    assert_eq!(stop.code, 0, "{stop:?}");
    for pid in pids {
        // Exited processes may linger as zombies until PID 1 reaps them: they count as stopped.
        let ps = Command::new("ps")
            .args(["-o", "stat=", "-p", &pid])
            .output()
            .unwrap();
        let state = String::from_utf8_lossy(&ps.stdout).trim().to_string();
        assert!(
            state.is_empty() || state.starts_with('Z'),
            "process {pid} still running: {state}"
        );
    }
    let bad = run_limited(
        Command::new(script("cluster.sh"))
            .args(["start", "x"])
            .arg(&d),
    );
    assert_eq!(bad.code, 2, "{bad:?}");
    let stopped = restart();
    assert_eq!(
        stopped.code, 1,
        "nothing to restart once stopped: {stopped:?}"
    );
    assert!(stopped.stderr.contains("cluster.sh start N"), "{stopped:?}");

    // A balancer started without options of its own is restarted without any, too.
    let plain = dir.path().join("plain");
    let _stop_plain = StopOnDrop(plain.clone());
    let start = run_limited(
        Command::new(script("cluster.sh"))
            .args(["start", "1"])
            .arg(&plain)
            .env("FASTCHAT_BIN", bin_dir()),
    );
    assert_eq!(start.code, 0, "{start:?}");
    let pid = std::fs::read_to_string(plain.join("balancer.pid")).unwrap();
    assert!(Command::new("kill")
        .args(["-9", pid.trim()])
        .status()
        .unwrap()
        .success());
    let again = cluster_sh("restart", &plain);
    assert_eq!(again.code, 0, "{again:?}");
}

#[test]
fn compare_runs_two_builds_in_turn_and_sums_them_up() {
    let bins = bin_dir();
    let compare = |args: &[&str]| {
        run_limited(
            Command::new(script("compare.sh"))
                .arg(&bins)
                .arg(&bins)
                .args(args),
        )
    };
    let workload = ["--spawn-servers", "1", "--opaque", "--clients", "4"];
    let out = compare(&[&["2", "--"][..], &workload, &["--messages", "20"]].concat());
    assert_eq!(out.code, 0, "{out:?}");
    let rows: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("| A |") || l.starts_with("| B |"))
        .collect();
    // Round one A then B, round two B then A, each a passing run of 4 x 20.
    assert_eq!(rows.len(), 4, "{}", out.stdout);
    for (row, who) in rows.iter().zip(["| A |", "| B |", "| B |", "| A |"]) {
        assert!(row.starts_with(who) && row.contains("| 80 |"), "{row}");
    }
    assert_eq!(out.stdout.matches("| run | deliveries |").count(), 1);
    for figure in [
        "| delivered/s |",
        "| p99 (ms) |",
        "| servers CPU a delivery (µs) |",
        "| servers switches a delivery |",
    ] {
        let line = out.stdout.lines().find(|l| l.starts_with(figure));
        assert!(
            line.is_some_and(|l| l.ends_with(" of 2 |")),
            "{figure} in {}",
            out.stdout
        );
    }

    // Flags after a side's build go to that side's servers only: a window out of range stops
    // B's, a valid one runs; the folders made for them are gone afterwards.
    let sides = |b_flags: &str| {
        run_limited(
            Command::new(script("compare.sh"))
                .arg(&bins)
                .arg(format!("{} {b_flags}", bins.display()))
                .args(["1", "--", "--spawn-servers", "1", "--clients", "2"])
                .args(["--messages", "5"]),
        )
    };
    let refused = sides("--commit-window 10001");
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(refused.stdout.contains("| B | failed: "), "{refused:?}");
    assert!(!refused.stdout.contains("| A | failed"), "{refused:?}");
    let ran = sides("--commit-window 0");
    assert_eq!(ran.code, 0, "{ran:?}");
    assert!(ran.stdout.contains(" --commit-window 0 ("), "{ran:?}");
    let compare_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/compare");
    let left: Vec<_> = std::fs::read_dir(&compare_dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        !left
            .iter()
            .any(|n| n.to_string_lossy().starts_with("side.")),
        "{left:?}"
    );

    // A run that fails is shown as failed, and the script says so.
    let failed = compare(&["1", "--", "--spawn-servers", "1", "--clients", "0"]);
    assert_eq!(failed.code, 1, "{failed:?}");
    assert!(failed.stdout.contains("| A | failed: "), "{failed:?}");
    // Bad arguments.
    for bad in [
        &["--", "--clients", "4"][..],
        &["0", "--", "--spawn-servers", "1"],
        &["1", "--", "--spawn-servers", "1", "--json"],
    ] {
        let out = compare(bad);
        assert_eq!(out.code, 2, "{bad:?}: {out:?}");
    }
    let unknown = run_limited(Command::new(script("compare.sh")).args([
        "no-such-revision",
        "HEAD",
        "--",
        "--spawn-servers",
        "1",
    ]));
    assert_eq!(unknown.code, 2, "{unknown:?}");
    assert!(unknown
        .stderr
        .contains("neither a directory nor a git revision"));
}

#[test]
fn a_cluster_across_hosts_loses_nothing_when_a_host_dies() {
    // Network namespaces need root; CI runs as root. Elsewhere, say so rather than pass
    // silently.
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIPPED: scripts/multihost.sh needs root for network namespaces");
        return;
    }
    let out = common::run_limited_for(
        Command::new(script("multihost.sh")).env("FASTCHAT_BIN", bin_dir()),
        std::time::Duration::from_secs(180),
    );
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    for expected in [
        "balancer 2 on fc",
        "server 3 on fc",
        "host 1 (10.77.0.11) is gone",
        "   alice: during the outage: 3",
        "   dave: a newcomer, during the outage",
        "Nothing lost, nothing repeated: 6 messages",
    ] {
        assert!(
            out.stdout.contains(expected),
            "missing {expected:?} in\n{}",
            out.stdout
        );
    }
    // Its namespaces (named after its PID) are gone.
    let ours = out
        .stdout
        .split_whitespace()
        .find(|w| w.starts_with("fc") && w.ends_with("-db"))
        .expect("the database host's name")
        .trim_end_matches("db")
        .to_string();
    let left = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let left = String::from_utf8_lossy(&left.stdout);
    assert!(!left.contains(&ours), "{ours} left behind: {left}");
}
