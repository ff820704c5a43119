//! The `fastchat` command as scripts use it: kept sessions and their agent, JSON on every
//! command, standard input, exit codes, flags anywhere, the configuration file.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{run_limited, Cluster, LIMIT};

/// The agent of a kept session (by the pid in its session file), killed if the test ends
/// before it does.
struct AgentGuard(Option<u32>);

impl AgentGuard {
    fn of(c: &Cluster, user: &str) -> AgentGuard {
        let text = std::fs::read_to_string(c.home().join(user).join("session")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        AgentGuard(v["agent_pid"].as_u64().map(|p| p as u32))
    }

    fn alive(&self) -> bool {
        self.0
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists() && !zombie(pid))
    }

    /// Waits until the agent has ended; whether it did within `limit`.
    fn ended_within(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.alive() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    }
}

fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.split(") ")
                .nth(1)
                .is_some_and(|rest| rest.starts_with('Z'))
        })
        .unwrap_or(true)
}

impl Drop for AgentGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0.filter(|_| self.alive()) {
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
        }
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// `fastchat ARGS` as `user`, without a password in the environment.
fn run_nopw(c: &Cluster, user: Option<&str>, args: &[&str]) -> common::Output {
    let mut cmd = c.cmd(user.unwrap_or("nobody"));
    cmd.env_remove("FASTCHAT_PASSWORD");
    if user.is_none() {
        cmd.env_remove("FASTCHAT_USER");
    }
    run_limited(cmd.args(args))
}

#[test]
fn a_kept_session_needs_no_password_and_logout_ends_it() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    let out = c.run("alice", &["login", "alice"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.starts_with("logged in as alice"), "{out:?}");
    let agent = AgentGuard::of(&c, "alice");
    assert!(agent.alive());
    let dir = c.home().join("alice");
    assert_eq!(mode(&dir.join("session")), 0o600);
    assert_eq!(mode(&dir.join("agent.sock")), 0o600);
    // The session file holds no key: the token is useless without the agent's.
    let text = std::fs::read_to_string(dir.join("session")).unwrap();
    assert!(!text.contains("key"), "{text}");

    // No password, no user: the one kept session is used.
    let out = run_nopw(&c, None, &["send", "bob", "kept hello"]);
    assert_eq!(out.code, 0, "{out:?}");
    let out = run_nopw(&c, None, &["whoami", "--json"]);
    let who: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(
        (who["user"].as_str(), who["kept"].as_bool()),
        (Some("alice"), Some(true))
    );
    // Commands leave the kept session alive: one session row.
    assert_eq!(
        c.count("SELECT count(*) FROM sessions WHERE user = 'alice'"),
        1
    );
    let out = c.run("bob", &["recv"]);
    assert_eq!(out.stdout, "alice: kept hello\n", "{out:?}");

    let out = run_nopw(&c, None, &["logout"]);
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "logged out alice\n"),
        "{out:?}"
    );
    assert!(agent.ended_within(LIMIT), "the agent ended");
    assert!(!dir.join("session").exists() && !dir.join("agent.sock").exists());
    assert_eq!(
        c.count("SELECT count(*) FROM sessions WHERE user = 'alice'"),
        0
    );
    let out = run_nopw(&c, Some("alice"), &["send", "bob", "no session"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("no password"), "{out:?}");
    // Logging out again is not an error.
    let out = run_nopw(&c, Some("alice"), &["logout"]);
    assert_eq!(out.code, 0, "{out:?}");
}

#[test]
fn an_idle_agent_ends_and_commands_fall_back_to_the_password() {
    let c = Cluster::start(1);
    c.signup("alice");
    let out = c.run("alice", &["login", "--idle", "1"]);
    assert_eq!(out.code, 0, "{out:?}");
    let agent = AgentGuard::of(&c, "alice");
    assert!(
        agent.ended_within(LIMIT),
        "the agent ended after its idle time"
    );
    // The token alone is useless; with a password the command logs in on its own.
    let out = c.run("alice", &["whoami", "--json"]);
    assert_eq!(out.code, 0, "{out:?}");
    let who: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(who["kept"].as_bool(), Some(false));
    assert!(!c.home().join("alice").join("session").exists());
}

#[test]
fn a_kept_session_ended_elsewhere_says_so() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    assert_eq!(c.run("alice", &["login"]).code, 0);
    let agent = AgentGuard::of(&c, "alice");
    // An operator ends every session of alice's (as `fastchat-admin kick` does).
    c.sql()
        .exec("DELETE FROM sessions WHERE user = 'alice'", &[]);
    let out = run_nopw(&c, Some("alice"), &["send", "bob", "hi"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("the kept session of alice has ended"),
        "{out:?}"
    );
    assert!(agent.ended_within(LIMIT));
}

/// Runs `fastchat ARGS` as `user` with `input` on standard input.
fn run_with_input(c: &Cluster, user: &str, args: &[&str], input: &str) -> common::Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = c
        .cmd(user)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    common::Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn text_comes_from_standard_input_and_every_command_speaks_json() {
    let c = Cluster::start(1);
    // Flags anywhere, short or long; JSON from the first command on.
    let out = c.run("alice", &["signup", "alice", "--json"]);
    let v = &out.json_lines()[0];
    assert_eq!(
        (v["user"].as_str(), v["created"].as_bool()),
        (Some("alice"), Some(true)),
        "{out:?}"
    );
    assert!(v["fingerprint"].is_string());
    c.signup("bob");
    // A signup script that runs again: fine with --exist-ok, an error without.
    let again = c.run("bob", &["signup", "bob", "--exist-ok", "-j"]);
    assert_eq!(again.code, 0, "{again:?}");
    assert_eq!(again.json_lines()[0]["created"].as_bool(), Some(false));
    assert_eq!(c.run("bob", &["signup", "bob"]).code, 1);

    let out = run_with_input(
        &c,
        "alice",
        &["send", "bob", "-"],
        "one message\nover two lines\n",
    );
    assert_eq!(out.code, 0, "{out:?}");
    let out = run_with_input(
        &c,
        "alice",
        &["-j", "send", "bob", "-", "--lines"],
        "first\n\nsecond\n",
    );
    let sent = out.json_lines();
    assert_eq!(sent.len(), 2, "{out:?}");
    assert!(sent.iter().all(|v| v["to"] == "bob" && v["id"].is_i64()));
    let out = run_with_input(&c, "alice", &["send", "bob", "-"], "");
    assert_eq!(out.code, 1, "{out:?}");

    // Peek shows and keeps; limit stops early; then recv takes the rest.
    let peek = c.run("bob", &["recv", "--peek", "--json"]);
    let shown = peek.json_lines();
    assert_eq!(shown.len(), 3, "{peek:?}");
    assert_eq!(shown[0]["text"], "one message\nover two lines");
    assert_eq!(shown[1]["kind"], "text");
    for field in ["id", "from", "to", "group", "sent_at", "kind", "text"] {
        assert!(shown[2].get(field).is_some(), "{field} in {}", shown[2]);
    }
    let first = c.run("bob", &["--user", "bob", "recv", "-n", "1"]);
    assert_eq!(
        first.stdout, "alice: one message\\nover two lines\n",
        "{first:?}"
    );
    let rest = c.run("bob", &["recv", "-u", "bob"]);
    assert_eq!(rest.stdout, "alice: first\nalice: second\n", "{rest:?}");

    let whoami = c.run("alice", &["whoami", "--json"]).json_lines()[0].clone();
    assert_eq!(whoami["server"]["id"].as_u64(), Some(c.server_ids[0]));
    let servers = c.run("alice", &["servers", "--json"]).json_lines();
    assert_eq!(
        servers[0]["addr"].as_str(),
        Some(c.server_addrs[0].as_str())
    );
    let created = c
        .run("alice", &["group", "create", "team", "--json"])
        .json_lines();
    assert_eq!(created[0]["group"], "alice/team");
    let added = c.run("alice", &["group", "add", "team", "bob"]);
    assert_eq!(added.code, 0, "{added:?}");
    let members = c
        .run("alice", &["group", "members", "team", "--json"])
        .json_lines();
    assert_eq!(members.len(), 2);
    assert_eq!(members[0]["admin"].as_bool(), Some(true));
    let trust = c.run("alice", &["trust", "bob", "--json"]).json_lines();
    assert_eq!(trust[0]["user"], "bob");
}

#[test]
fn recv_drains_a_queue_larger_than_one_acknowledgement() {
    let mut c = Cluster::start(0);
    c.add_server_with(&["--max-per-sender", "6000"]);
    c.signup("alice");
    c.signup("bob");
    let lines: String = (0..5000).map(|i| format!("m{i}\n")).collect();
    let out = run_with_input(&c, "alice", &["send", "bob", "-", "--lines"], &lines);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = run_limited(c.cmd_with_receipts("bob").arg("recv"));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout.lines().count(), 5000);
    assert_eq!(out.stdout.lines().last(), Some("alice: m4999"));
    assert_eq!(
        c.count("SELECT count(*) FROM messages WHERE recipient = 'bob'"),
        0
    );
    // alice is told, in receipts of at most 1024 messages each, that bob read all 5000.
    let out = c.run("alice", &["recv", "--json"]);
    let receipts = out.json_lines();
    assert_eq!(receipts.len(), 5, "{out:?}");
    let mut read = 0;
    for r in &receipts {
        assert_eq!(
            (&r["kind"], &r["reached"], &r["from"]),
            (&"receipt".into(), &"read".into(), &"bob".into())
        );
        read += r["of"].as_array().unwrap().len();
    }
    assert_eq!(read, 5000);
    // Text output is for people: receipts are not messages.
    c.send("alice", "bob", "one more");
    let out = run_limited(c.cmd_with_receipts("bob").args(["recv", "--no-receipts"]));
    assert_eq!(out.stdout, "alice: one more\n");
    assert_eq!(
        c.run("alice", &["recv", "--json"]).stdout,
        "",
        "bob turned receipts off"
    );
}

/// A TCP listener that answers every connection like a web server, for `count` connections.
fn http_port(count: usize) -> (String, std::thread::JoinHandle<()>) {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let t = std::thread::spawn(move || {
        for s in l.incoming().take(count) {
            let Ok(mut s) = s else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        }
    });
    (addr, t)
}

#[test]
fn exit_codes_are_what_the_help_says() {
    let mut c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    c.send("alice", "bob", "one");
    c.send("alice", "bob", "two");

    // Standard output closed early (`| head -0`): quiet, 0, and nothing lost.
    let mut child = c
        .cmd("bob")
        .args(["recv"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    assert_eq!(c.run("bob", &["recv"]).stdout, "alice: one\nalice: two\n");

    // Not a fastchat server: said so, 3 (with TLS, and in plaintext).
    let (addr, web) = http_port(2);
    let out = c.run("alice", &["servers", "--balancer", &addr]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(
        out.stderr
            .contains(&format!("not a fastchat server at {addr}")),
        "{out:?}"
    );
    let mut plain = c.cmd("alice");
    plain
        .env_remove("FASTCHAT_CA")
        .env("FASTCHAT_INSECURE_PLAINTEXT", "1")
        .args(["servers", "--balancer", &addr]);
    let out = run_limited(&mut plain);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(
        out.stderr
            .contains(&format!("not a fastchat server at {addr}")),
        "{out:?}"
    );
    web.join().unwrap();

    // --timeout: a wait that would last a minute ends after one second, with 3.
    let started = Instant::now();
    let out = c.run("bob", &["recv", "--wait", "60", "--timeout", "1"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("timed out after 1 s"), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(15));

    // No chat server left: 3.
    c.servers[0].kill9();
    let deadline = Instant::now() + LIMIT;
    loop {
        let out = c.run("alice", &["send", "bob", "anyone?"]);
        if out.code == 3 && out.stderr.contains("no chat server is available") {
            break;
        }
        assert!(Instant::now() < deadline, "{out:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
    c.add_server();
    // Refused: 1.
    let out = run_limited(
        c.cmd("alice")
            .env("FASTCHAT_PASSWORD", "wrong")
            .args(["send", "bob", "x"]),
    );
    assert_eq!(out.code, 1, "{out:?}");
    // Local trouble (a key folder that cannot be made): 4, and no account is left behind.
    let blocker = c.dir.path().join("a-file");
    std::fs::write(&blocker, "").unwrap();
    let out = run_limited(
        c.cmd("zed")
            .env("FASTCHAT_HOME", blocker.join("home"))
            .args(["signup", "zed"]),
    );
    assert_eq!(out.code, 4, "{out:?}");
    assert!(out.stderr.contains("cannot create"), "{out:?}");
    assert_eq!(c.count("SELECT count(*) FROM users WHERE name = 'zed'"), 0);
    // Bad arguments: 2.
    assert_eq!(c.run("alice", &["send"]).code, 2);
    assert_eq!(c.run("alice", &["recv", "--wait", "-1"]).code, 2);
}

#[test]
fn ctrl_c_ends_recv_at_once_even_while_it_looks_for_a_server() {
    let c = Cluster::start(1);
    c.signup("alice");
    c.signup("bob");
    let mut recv = c.spawn("bob", &["recv", "--wait", "120"]);
    // Connected and synced, not merely seen by the server (whose presence row can commit
    // before the client has its welcome: a server gone then is a failed start, exit 3).
    c.wait_online("bob", 1);
    c.send("alice", "bob", "hello");
    assert_eq!(recv.line(), "alice: hello");
    // Its only server dies: the client looks for another (for up to 30 s).
    let mut server = c.servers.into_iter().next().unwrap();
    server.kill9();
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let status = recv.interrupt().expect("recv ended");
    assert_eq!(status.code(), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_balancer_prints_listening_only_once_its_database_is_open() {
    let out = run_limited(
        std::process::Command::new(common::bin("fastchat-balancer")).args([
            "--listen",
            "127.0.0.1:0",
            "--db",
            "/nonexistent/folder/chat.db",
            "--insecure-plaintext",
        ]),
    );
    assert_eq!(out.code, 4, "{out:?}");
    assert_eq!(out.stdout, "", "no listening line: {out:?}");
    assert!(
        out.stderr.contains("/nonexistent/folder/chat.db"),
        "{out:?}"
    );
}

#[test]
fn a_configuration_file_sets_defaults_that_flags_and_the_environment_override() {
    let c = Cluster::start(1);
    c.signup("alice");
    let config = c.dir.path().join("fastchat.toml");
    std::fs::write(&config, "[fastchat]\njson = true\ntimeout = 30\n").unwrap();
    let out = c.run("alice", &["whoami", "--config", config.to_str().unwrap()]);
    assert!(out.stdout.starts_with('{'), "JSON from the file: {out:?}");
    // FASTCHAT_HOME/fastchat.toml is read without a flag; the environment beats the file.
    std::fs::write(
        c.home().join("fastchat.toml"),
        "[fastchat]\nuser = \"nobody\"\nbalancer = \"127.0.0.1:1\"\n",
    )
    .unwrap();
    let out = c.run("alice", &["whoami"]);
    assert_eq!(
        out.code, 0,
        "FASTCHAT_USER and FASTCHAT_BALANCER win: {out:?}"
    );
    assert!(out.stdout.starts_with("alice on server"), "{out:?}");
    // A setting that is no flag is an error that names the settings.
    std::fs::write(c.home().join("fastchat.toml"), "[fastchat]\njsn = true\n").unwrap();
    let out = c.run("alice", &["whoami"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr.contains("[fastchat] has no setting jsn"),
        "{out:?}"
    );
    std::fs::remove_file(c.home().join("fastchat.toml")).unwrap();
}
