//! The balancer's dashboard and the `/metrics` endpoints: the JSON and the Prometheus text
//! parsed, and the page itself loaded in headless Chromium (installed by `.ci/run`; a
//! machine without it runs the rest, and CI, which sets FASTCHAT_REQUIRE_BROWSER, fails).

mod common;

use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Cluster, LIMIT};
use serde_json::Value;

/// `GET url` over plain HTTP; the status and the body.
fn get(url: &str) -> (u16, String) {
    let rest = url.strip_prefix("http://").expect("an http URL");
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut s = std::net::TcpStream::connect(host).expect("the dashboard listens");
    s.set_read_timeout(Some(LIMIT)).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap();
    (status, body.to_string())
}

/// The value of a metric line `NAME{...} VALUE` or `NAME VALUE`.
fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.split(['{', ' ']).next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The page's DOM after its scripts ran for a few seconds, or `None` without Chromium.
fn browse(url: &str) -> Option<String> {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=3000",
            "--dump-dom",
            url,
        ])
        .output();
    match out {
        Ok(o) if o.status.success() => Some(String::from_utf8_lossy(&o.stdout).to_string()),
        _ if std::env::var_os("FASTCHAT_REQUIRE_BROWSER").is_some() => {
            panic!("Chromium is required here (FASTCHAT_REQUIRE_BROWSER) and did not run")
        }
        _ => {
            eprintln!("no Chromium on this machine: the page was not loaded in a browser");
            None
        }
    }
}

/// The part of the page that draws server `name`: its box, up to its list of users.
fn server_box<'a>(dom: &'a str, name: &str) -> &'a str {
    let at = dom
        .find(&format!("data-server=\"{name}\""))
        .unwrap_or_else(|| panic!("{name} on the page: {dom}"));
    let start = dom[..at].rfind("<div").unwrap_or(at);
    let rest = &dom[start..];
    &rest[..rest.find("</ul>").unwrap_or(rest.len())]
}

/// Waits until the cluster's JSON satisfies `check`.
fn wait_for(api: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + LIMIT;
    loop {
        let (status, body) = get(api);
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        if check(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "never saw {what}: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The name of the server `user` is shown on, if a live one.
fn server_of(v: &Value, user: &str) -> Option<String> {
    v["servers"].as_array()?.iter().find_map(|s| {
        let on = s["live"] == true && s["users"].as_array()?.iter().any(|u| u == user);
        on.then(|| s["name"].as_str().unwrap().to_string())
    })
}

#[test]
fn the_dashboard_shows_servers_clients_and_a_server_death_and_metrics_parse() {
    let mut c = Cluster::start_with_balancer_args(0, &["--http", "127.0.0.1:0"]);
    let board = c.balancer.line();
    let base = board
        .strip_prefix("fastchat-balancer dashboard on ")
        .unwrap_or_else(|| panic!("{board:?}"))
        .to_string();
    assert!(
        base.starts_with("http://127.0.0.1:"),
        "on loopback, no token: {base}"
    );
    let mut server_metrics = Vec::new();
    for _ in 0..2 {
        let i = c.add_server_with(&["--metrics", "127.0.0.1:0"]);
        let line = c.servers[i].line();
        let url = line
            .split(" metrics on ")
            .nth(1)
            .unwrap_or_else(|| panic!("{line:?}"))
            .to_string();
        server_metrics.push(url);
    }
    for u in ["alice", "bob", "carol"] {
        c.signup(u);
    }
    let mut alice = c.spawn("alice", &["recv", "--wait", "60"]);
    let mut bob = c.spawn("bob", &["recv", "--wait", "60"]);
    let api = format!("{base}api/cluster");
    let v = wait_for(&api, "alice and bob online", |v| {
        server_of(v, "alice").is_some() && server_of(v, "bob").is_some()
    });
    assert_eq!(v["servers"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v["algo"], "round-robin");
    let alice_on = server_of(&v, "alice").unwrap();
    let bob_on = server_of(&v, "bob").unwrap();
    assert_ne!(alice_on, bob_on, "round-robin: {v}");

    // Traffic shows in the counts; refusals by their reason.
    for i in 0..5 {
        c.send("carol", "alice", &format!("hello {i}"));
    }
    let wrong = common::run_limited(
        c.cmd("carol")
            .env("FASTCHAT_PASSWORD", "wrong")
            .args(["send", "alice", "x"]),
    );
    assert_eq!(wrong.code, 1, "{wrong:?}");
    // (The balancer's key directory refuses this one; a server the next.)
    let unknown = c.run("carol", &["send", "nobody", "x"]);
    assert_eq!(unknown.code, 1, "{unknown:?}");
    let no_group = c.run("carol", &["group", "members", "alice/nothing"]);
    assert_eq!(no_group.code, 1, "{no_group:?}");
    let (status, text) = get(&format!("{base}metrics"));
    assert_eq!(status, 200);
    assert_eq!(
        metric(&text, "fastchat_balancer_servers_live"),
        Some(2),
        "{text}"
    );
    assert!(
        metric(&text, "fastchat_balancer_logins_total").unwrap() >= 7,
        "{text}"
    );
    assert!(
        text.contains("# TYPE fastchat_balancer_signups_total counter"),
        "{text}"
    );
    assert_eq!(
        metric(&text, "fastchat_balancer_failed_logins_total"),
        Some(1),
        "{text}"
    );
    for reason in ["InvalidCredentials", "UnknownUser"] {
        assert!(
            text.contains(&format!(
                "fastchat_balancer_refusals_total{{reason=\"{reason}\"}} 1"
            )),
            "{text}"
        );
    }
    let servers: Vec<String> = server_metrics.iter().map(|url| get(url).1).collect();
    let sum = |name: &str| -> u64 { servers.iter().map(|t| metric(t, name).unwrap()).sum() };
    assert_eq!(
        sum("fastchat_server_messages_stored_total"),
        5,
        "every message counted once, by the server that stored it"
    );
    assert!(sum("fastchat_server_commits_total") >= 5, "{servers:?}");
    // carol's sends alternate between the servers (round-robin): some crossed a peer link.
    assert!(
        servers
            .iter()
            .any(|t| t.contains("fastchat_server_link_relayed_total{server=")),
        "{servers:?}"
    );
    assert!(
        sum("fastchat_server_commit_jobs_total") >= sum("fastchat_server_commits_total"),
        "{servers:?}"
    );
    assert!(
        servers
            .iter()
            .any(|t| t.contains("fastchat_server_refusals_total{server=")
                && t.contains("reason=\"UnknownGroup\"} 1")),
        "{servers:?}"
    );

    // The page, in a browser: both servers, each with its client.
    if let Some(dom) = browse(&base) {
        assert!(
            server_box(&dom, &alice_on).contains("data-user=\"alice\""),
            "{dom}"
        );
        assert!(
            server_box(&dom, &bob_on).contains("data-user=\"bob\""),
            "{dom}"
        );
        assert!(dom.contains("2 live servers"), "{dom}");
    }

    // alice's server dies: it is shown down, and alice on the other server once she moved.
    let dead = v["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == alice_on.as_str())
        .unwrap()["id"]
        .as_u64()
        .unwrap();
    let i = c.index_of(dead);
    c.servers[i].kill9();
    let v = wait_for(&api, "alice moved and her server down", |v| {
        server_of(v, "alice").as_deref() == Some(bob_on.as_str())
            && v["servers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["id"] == dead && s["live"] == false)
    });
    if let Some(dom) = browse(&base) {
        let down = server_box(&dom, &alice_on);
        assert!(down.contains("class=\"server down\""), "{down}");
        assert!(
            !down.contains("data-user"),
            "its clients are elsewhere now: {down}"
        );
        assert!(
            server_box(&dom, &bob_on).contains("data-user=\"alice\""),
            "{dom}"
        );
        assert!(dom.contains("1 live servers"), "{dom}");
    }
    assert_eq!(v["servers"].as_array().unwrap().len(), 2);
    alice.interrupt();
    bob.interrupt();

    // Read-only, and nothing but metadata: no message text anywhere.
    let (_, body) = get(&api);
    assert!(!body.contains("hello"), "{body}");
    let (status, _) = get(&format!("{base}nothing-here"));
    assert_eq!(status, 404);
}

#[test]
fn off_loopback_the_dashboard_needs_its_token() {
    let c = Cluster::start_with_balancer_args(0, &["--http", "0.0.0.0:0"]);
    let board = c.balancer.line();
    let url = board
        .strip_prefix("fastchat-balancer dashboard on ")
        .unwrap_or_else(|| panic!("{board:?}"));
    let (base, token) = url.split_once("?token=").expect("a token was made");
    assert!(token.len() >= 20, "{token}");
    let port = base.rsplit(':').next().unwrap().trim_end_matches('/');
    let local = format!("http://127.0.0.1:{port}/");
    let (status, _) = get(&format!("{local}api/cluster"));
    assert_eq!(status, 401, "no token, no dashboard");
    let (status, _) = get(&format!("{local}api/cluster?token=wrong"));
    assert_eq!(status, 401);
    let (status, body) = get(&format!("{local}api/cluster?token={token}"));
    assert_eq!(status, 200, "{body}");
}
