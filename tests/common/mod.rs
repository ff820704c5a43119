//! Helpers for integration tests: start the real binaries on 127.0.0.1 port 0 with a fresh
//! temporary database, run client commands with a time limit, and stop everything (by PID) when
//! the test ends, however it ends.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver};

pub mod db;
pub use db::Sql;

/// How long any single wait in a test may take before the test fails.
pub const LIMIT: Duration = Duration::from_secs(20);

/// A started process whose standard output lines arrive on a channel. Killed on drop.
pub struct Proc {
    pub child: Child,
    pub lines: Receiver<String>,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let (tx, lines) = unbounded();
        let out = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Keep stderr flowing (a full pipe would block the child); echo it for failing tests.
        let err = child.stderr.take().expect("stderr");
        let label = name.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                eprintln!("[{label}] {line}");
            }
        });
        Proc {
            child,
            lines,
            name: name.to_string(),
        }
    }

    /// The next stdout line, failing the test after `LIMIT`.
    pub fn line(&self) -> String {
        self.lines
            .recv_timeout(LIMIT)
            .unwrap_or_else(|_| panic!("{}: no output line within {LIMIT:?}", self.name))
    }

    /// The next stdout line within `d`, if any.
    pub fn line_within(&self, d: Duration) -> Option<String> {
        self.lines.recv_timeout(d).ok()
    }

    /// Writes a line to the process's standard input.
    pub fn type_line(&mut self, text: &str) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{text}").expect("write to stdin");
        stdin.flush().expect("flush stdin");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, like `kill -9`, then reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGINT (Ctrl-C) by PID, then wait up to `LIMIT` for the exit status.
    pub fn interrupt(&mut self) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-INT", &self.pid().to_string()])
            .status();
        self.wait_exit(LIMIT)
    }

    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The result of a finished client command.
#[derive(Debug)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }

    /// Standard output as one JSON value a line (failing the test on a line that is not).
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
            .collect()
    }
}

/// A balancer and some servers on a fresh database in a temporary folder, with TLS and a
/// cluster CA of their own (unless started in plaintext).
pub struct Cluster {
    pub dir: tempfile::TempDir,
    /// What the processes get as `--db`: a SQLite file in `dir`, or a PostgreSQL URL.
    pub db: String,
    /// The cluster's certificate folder; `None` in plaintext.
    pub tls: Option<PathBuf>,
    /// How a library client reaches this cluster (its CA, or plaintext).
    pub transport: fastchat::transport::Transport,
    pub balancer: Proc,
    pub balancer_addr: String,
    pub servers: Vec<Proc>,
    pub server_addrs: Vec<String>,
    /// The id each server registered under, by index.
    pub server_ids: Vec<u64>,
    /// The PostgreSQL database of this cluster, dropped last (FASTCHAT_TEST_POSTGRES).
    pub pg: Option<db::PgDatabase>,
}

pub fn bin(name: &str) -> PathBuf {
    match name {
        "fastchat" => PathBuf::from(env!("CARGO_BIN_EXE_fastchat")),
        "fastchat-balancer" => PathBuf::from(env!("CARGO_BIN_EXE_fastchat-balancer")),
        "fastchat-server" => PathBuf::from(env!("CARGO_BIN_EXE_fastchat-server")),
        "fastchat-bench" => PathBuf::from(env!("CARGO_BIN_EXE_fastchat-bench")),
        "fastchat-admin" => PathBuf::from(env!("CARGO_BIN_EXE_fastchat-admin")),
        other => panic!("unknown binary {other}"),
    }
}

impl Cluster {
    /// A balancer (round-robin) and `n` servers.
    pub fn start(n: usize) -> Cluster {
        Cluster::start_with(n, "round-robin")
    }

    pub fn start_with(n: usize, algo: &str) -> Cluster {
        Cluster::start_secured(n, algo, true)
    }

    /// A balancer and `n` servers without TLS (`--insecure-plaintext`).
    pub fn start_plaintext(n: usize) -> Cluster {
        Cluster::start_secured(n, "round-robin", false)
    }

    /// A balancer started with `args` (which override the tests' defaults) and `n` servers.
    pub fn start_with_balancer_args(n: usize, args: &[&str]) -> Cluster {
        Cluster::start_full(n, "round-robin", true, args)
    }

    /// A balancer and `n` servers keeping their files (database, certificates) in `dir`.
    pub fn start_in(dir: tempfile::TempDir, n: usize) -> Cluster {
        Cluster::start_full_in(dir, n, "round-robin", true, &[])
    }

    fn start_secured(n: usize, algo: &str, tls: bool) -> Cluster {
        Cluster::start_full(n, algo, tls, &[])
    }

    fn start_full(n: usize, algo: &str, tls: bool, extra: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        Cluster::start_full_in(dir, n, algo, tls, extra)
    }

    fn start_full_in(
        dir: tempfile::TempDir,
        n: usize,
        algo: &str,
        tls: bool,
        extra: &[&str],
    ) -> Cluster {
        use fastchat::transport::pki::{self, Member, Role};
        let pg = db::postgres_url().map(|server| db::PgDatabase::create(&server));
        let db = match &pg {
            Some(pg) => pg.url.clone(),
            None => dir.path().join("chat.db").to_string_lossy().into_owned(),
        };
        let tls_dir = tls.then(|| dir.path().join("tls"));
        if let Some(t) = &tls_dir {
            let balancer = Member {
                role: Role::Balancer,
                name: "balancer".into(),
            };
            pki::init(t, &[balancer]).expect("a cluster CA");
        }
        let mut cmd = balancer_command(&db, tls_dir.as_deref(), "127.0.0.1:0", extra);
        let balancer = Proc::spawn("balancer", cmd.args(["--algo", algo]));
        let first = balancer.line();
        let balancer_addr = first
            .strip_prefix("fastchat-balancer listening on ")
            .unwrap_or_else(|| panic!("unexpected balancer output {first:?}"))
            .to_string();
        let transport = match &tls_dir {
            Some(t) => {
                fastchat::transport::Transport::client_with_ca(&pki::ca_path(t)).expect("the CA")
            }
            None => fastchat::transport::Transport::plaintext(),
        };
        let mut c = Cluster {
            dir,
            db,
            tls: tls_dir,
            transport,
            balancer,
            balancer_addr,
            servers: Vec::new(),
            server_addrs: Vec::new(),
            server_ids: Vec::new(),
            pg,
        };
        for _ in 0..n {
            c.add_server();
        }
        c
    }

    /// Starts one more server and waits until it is registered; returns its index.
    pub fn add_server(&mut self) -> usize {
        self.add_server_with(&[])
    }

    /// The index of the server with this id.
    pub fn index_of(&self, server_id: u64) -> usize {
        self.server_ids
            .iter()
            .position(|id| *id == server_id)
            .unwrap_or_else(|| panic!("no server {server_id}"))
    }

    /// Signs up through the library (keys made but not saved): for tests that use the library
    /// client with opaque bodies.
    pub fn signup_lib(&self, user: &str) {
        let keys = fastchat::crypto::Identity::generate()
            .unwrap()
            .public()
            .unwrap();
        self.balancer_client()
            .signup(user, &format!("password-{user}"), keys, None)
            .unwrap();
    }

    /// Messages of `table` (`messages`, or a copy of it) that `filter` (SQL after `WHERE`,
    /// with `params`) selects, oldest first, as envelopes.
    pub fn envelopes(
        &self,
        table: &str,
        filter: &str,
        params: &[&dyn db::Param],
    ) -> Vec<fastchat::net::Envelope> {
        self.sql()
            .rows(
                &format!(
                    "SELECT id, sender, coalesce(recipient, ''), grp, client_id, body, sent_at
                       FROM {table} WHERE {filter} ORDER BY id"
                ),
                params,
            )
            .iter()
            .map(|r| fastchat::net::Envelope {
                id: r.get(0),
                from: r.get(1),
                to: r.get(2),
                group: r.get(3),
                client_id: r.get::<i64>(4) as u64,
                body: r.get(5),
                sent_at: r.get(6),
            })
            .collect()
    }

    /// The direct messages queued for `to`, oldest first, as the server (or an observer of
    /// the database) holds them.
    pub fn queued_to(&self, to: &str) -> Vec<fastchat::net::Envelope> {
        self.envelopes("messages", "recipient = ?1", &[&to])
    }

    /// The group messages stored now, oldest first.
    pub fn group_messages(&self) -> Vec<fastchat::net::Envelope> {
        self.envelopes("messages", "grp IS NOT NULL", &[])
    }

    /// A connection to the balancer, as a library client.
    pub fn balancer_client(&self) -> fastchat::client::BalancerClient {
        fastchat::client::BalancerClient::connect(&self.balancer_addr, &self.transport)
            .unwrap_or_else(|e| panic!("balancer: {e}"))
    }

    /// Logs a library client in as `user`.
    pub fn login(&self, user: &str) -> fastchat::client::Client {
        fastchat::client::Client::login(
            &self.balancer_addr,
            &self.transport,
            user,
            &format!("password-{user}"),
        )
        .unwrap_or_else(|e| panic!("login {user}: {e}"))
        .0
    }

    /// The cluster CA's certificate file (TLS clusters).
    pub fn ca(&self) -> PathBuf {
        fastchat::transport::pki::ca_path(self.tls.as_ref().expect("a TLS cluster"))
    }

    /// Waits until the balancer lists exactly `n` live servers.
    pub fn wait_servers(&self, n: usize) -> Vec<fastchat::net::ServerInfo> {
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Ok(list) =
                fastchat::client::BalancerClient::connect(&self.balancer_addr, &self.transport)
                    .and_then(|mut b| b.servers())
            {
                if list.len() == n {
                    return list;
                }
            }
            assert!(Instant::now() < deadline, "never saw {n} live servers");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// A `fastchat` command acting as `user` (password `password-USER`), without receipts (they
    /// are messages too, and the tests that count messages count the ones they sent; the
    /// tests of receipts use [`Cluster::cmd_with_receipts`]).
    pub fn cmd(&self, user: &str) -> Command {
        let mut cmd = self.cmd_with_receipts(user);
        cmd.env("FASTCHAT_NO_RECEIPTS", "1");
        cmd
    }

    /// A `fastchat` command acting as `user` that sends receipts.
    pub fn cmd_with_receipts(&self, user: &str) -> Command {
        let mut cmd = Command::new(bin("fastchat"));
        cmd.env_remove("FASTCHAT_NO_RECEIPTS")
            .env("FASTCHAT_BALANCER", &self.balancer_addr)
            .env("FASTCHAT_HOME", self.home())
            .env("FASTCHAT_USER", user)
            .env("FASTCHAT_PASSWORD", format!("password-{user}"))
            .env_remove("RUST_LOG")
            .env_remove("FASTCHAT_CA")
            .env_remove("FASTCHAT_INSECURE_PLAINTEXT");
        match &self.tls {
            Some(_) => cmd.env("FASTCHAT_CA", self.ca()),
            None => cmd.env("FASTCHAT_INSECURE_PLAINTEXT", "1"),
        };
        cmd
    }

    /// Runs `fastchat ARGS` as `user` to completion (at most `LIMIT`).
    pub fn run(&self, user: &str, args: &[&str]) -> Output {
        run_limited(self.cmd(user).args(args))
    }

    /// Signs up `user` and checks it worked.
    pub fn signup(&self, user: &str) {
        let out = self.run(user, &["signup", user]);
        assert_eq!(out.code, 0, "signup {user}: {out:?}");
    }

    /// Sends and checks the message was stored.
    pub fn send(&self, from: &str, to: &str, text: &str) {
        let out = self.run(from, &["send", to, text]);
        assert_eq!(out.code, 0, "send {from}->{to}: {out:?}");
        assert!(out.stdout.starts_with("stored message "), "{out:?}");
    }

    /// Runs `fastchat group ARGS` as `user`.
    pub fn group(&self, user: &str, args: &[&str]) -> Output {
        let mut all = vec!["group"];
        all.extend_from_slice(args);
        self.run(user, &all)
    }

    /// Runs a group command that must succeed; returns what it printed.
    pub fn group_ok(&self, user: &str, args: &[&str]) -> String {
        let out = self.group(user, args);
        assert_eq!(out.code, 0, "{user}: group {args:?}: {out:?}");
        out.stdout
    }

    /// Starts a long-running `fastchat ARGS` as `user`.
    pub fn spawn(&self, user: &str, args: &[&str]) -> Proc {
        Proc::spawn(&format!("{user}:{}", args[0]), self.cmd(user).args(args))
    }

    /// A connection to the shared database (SQLite or PostgreSQL: see [`Sql`]).
    pub fn sql(&self) -> Sql {
        Sql::open(&self.db)
    }

    /// Whether this cluster runs on PostgreSQL.
    pub fn on_postgres(&self) -> bool {
        self.pg.is_some()
    }

    /// The SQLite file, for the tests of what only SQLite does (its log, its locks, its
    /// file on disk); `None` on PostgreSQL, where such a test says it does not apply.
    pub fn sqlite_file(&self) -> Option<PathBuf> {
        (!self.on_postgres()).then(|| PathBuf::from(&self.db))
    }

    /// What the database holds at rest, by where: the SQLite file and its log (every byte,
    /// free pages included), or every value of every table of the PostgreSQL database.
    pub fn stored_bytes(&self) -> Vec<(String, Vec<u8>)> {
        if self.on_postgres() {
            return self.sql().dump_postgres();
        }
        let mut out = Vec::new();
        for entry in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with("chat.db") {
                out.push((name, std::fs::read(entry.path()).unwrap()));
            }
        }
        out
    }

    /// A connection that holds the database's write lock until it runs `COMMIT`: SQLite's
    /// (`BEGIN IMMEDIATE`), or the advisory lock every PostgreSQL writer batch takes.
    pub fn hold_write_lock(&self) -> Sql {
        let holder = self.sql();
        if holder.is_postgres() {
            let lock = fastchat::db::postgres::WRITE_LOCK;
            holder.batch(&format!("BEGIN; SELECT pg_advisory_xact_lock({lock})"));
        } else {
            holder.batch("BEGIN IMMEDIATE");
        }
        holder
    }

    /// Says that a test of what only SQLite does does not apply on PostgreSQL; `true` if so
    /// (the test then returns).
    pub fn sqlite_only(&self, what: &str) -> bool {
        if self.on_postgres() {
            eprintln!("NOT APPLICABLE on PostgreSQL: {what} is SQLite's");
        }
        self.on_postgres()
    }

    /// The one integer a query returns.
    pub fn count(&self, sql: &str) -> i64 {
        self.sql().one(sql, &[])
    }

    /// Waits until no message is stored (every one acknowledged, or expired); fails the test
    /// with `why` after `LIMIT`.
    pub fn wait_until_none_stored(&self, why: &str) {
        let deadline = Instant::now() + LIMIT;
        while self.count("SELECT count(*) FROM messages") > 0 {
            assert!(Instant::now() < deadline, "{why}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `user` has `n` live connections (per the presence table).
    pub fn wait_online(&self, user: &str, n: i64) {
        let deadline = Instant::now() + LIMIT;
        loop {
            let got: i64 = self
                .sql()
                .one("SELECT count(*) FROM presence WHERE user = ?1", &[&user]);
            if got == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{user} never had {n} connections"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The command that starts a balancer on `db`, listening on `listen`, with the certificates
/// in `tls` (or in plaintext).
fn balancer_command(db: &str, tls: Option<&Path>, listen: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(bin("fastchat-balancer"));
    cmd.args(["--listen", listen, "--db", db]);
    // Cheap password hashes keep tests quick; tests/hostile.rs asks for dearer ones.
    if !extra.contains(&"--scrypt-log-n") {
        cmd.args(["--scrypt-log-n", "4"]);
    }
    // Tests sign up many users from 127.0.0.1; tests/hostile.rs checks the limit.
    if !extra.contains(&"--signups-per-address") {
        cmd.args(["--signups-per-address", "1000"]);
    }
    cmd.args(extra);
    match tls {
        Some(t) => cmd.arg("--tls-dir").arg(t),
        None => cmd.arg("--insecure-plaintext"),
    };
    cmd
}

impl Cluster {
    /// Starts another balancer on the same database and certificates; returns it with its
    /// address. Servers started after `balancer_addr` is set to `FIRST,SECOND` register with
    /// both, and clients try them in that order.
    pub fn spawn_balancer(&self) -> (Proc, String) {
        let mut cmd = balancer_command(&self.db, self.tls.as_deref(), "127.0.0.1:0", &[]);
        let b = Proc::spawn("balancer-b", &mut cmd);
        let first = b.line();
        let addr = first
            .strip_prefix("fastchat-balancer listening on ")
            .unwrap_or_else(|| panic!("unexpected balancer output {first:?}"))
            .to_string();
        (b, addr)
    }

    /// Starts a balancer again where the first one listened (after it was killed); waits
    /// until it listens.
    pub fn restart_balancer(&mut self) {
        let mut cmd = balancer_command(&self.db, self.tls.as_deref(), &self.balancer_addr, &[]);
        self.balancer = Proc::spawn("balancer2", &mut cmd);
        let line = self.balancer.line();
        assert!(line.ends_with(&self.balancer_addr), "{line}");
    }
}

/// Parses "fastchat-server ID listening on ADDR".
fn parse_ready(line: &str) -> (u64, String) {
    let words: Vec<&str> = line.split(' ').collect();
    match words[..] {
        ["fastchat-server", id, "listening", "on", addr] => (id.parse().unwrap(), addr.to_string()),
        _ => panic!("unexpected server output {line:?}"),
    }
}

/// Stops process `pid` (SIGSTOP) at a moment when it does not hold the write lock of the
/// database `db`: one stopped mid-commit would hold up every other writer (SQLite's lock until
/// it resumes), which a test of what its clients do must not depend on.
pub fn stop_outside_a_commit(pid: u32, db: &str) {
    let sql = db::Sql::open(db);
    for _ in 0..50 {
        signal(pid, "-STOP");
        if sql.write_lock_free() {
            return;
        }
        signal(pid, "-CONT");
        std::thread::sleep(Duration::from_millis(37));
    }
    panic!("process {pid} held the database's write lock every time it was stopped");
}

/// Sends signal `sig` (as `kill` takes it: "-STOP", "-CONT") to process `pid`, one this test
/// started.
pub fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {sig} {pid}");
}

/// Runs a command to completion, killing it (and failing) after `LIMIT`.
pub fn run_limited(cmd: &mut Command) -> Output {
    run_limited_for(cmd, LIMIT)
}

/// Runs a command to completion, killing it (and failing) after `limit`.
pub fn run_limited_for(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let o = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let e = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("command {cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        code: status.code().unwrap_or(-1),
        stdout: o.join().unwrap(),
        stderr: e.join().unwrap(),
    }
}

/// A TLS connection to `addr` that checks nothing about the other side: the test is a raw
/// peer, or an attacker.
pub fn tls_connect(addr: &str) -> fastchat::transport::Stream {
    use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
    // Built once: a connector loads the system's CA store, which takes a while.
    static CONNECTOR: std::sync::OnceLock<SslConnector> = std::sync::OnceLock::new();
    let connector = CONNECTOR.get_or_init(|| {
        let mut b = SslConnector::builder(SslMethod::tls_client()).unwrap();
        b.set_verify(SslVerifyMode::NONE);
        b.build()
    });
    let tcp = TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(LIMIT)).unwrap();
    tcp.set_nodelay(true).unwrap();
    let ssl = connector
        .configure()
        .unwrap()
        .verify_hostname(false)
        .use_server_name_indication(false);
    let s = ssl
        .connect("fastchat", fastchat::transport::Socket::new(tcp))
        .expect("TLS handshake");
    fastchat::transport::Stream::Tls(Box::new(s))
}

/// A TCP connection to `addr` from the local address `from` (on Linux any 127.x.y.z is a
/// loopback address): to be a client from another address.
pub fn connect_from(from: &str, addr: &str) -> TcpStream {
    use rustix::net::{AddressFamily, SocketType};
    let from: std::net::SocketAddr = format!("{from}:0").parse().unwrap();
    let to: std::net::SocketAddr = addr.parse().unwrap();
    let fd = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
    rustix::net::bind(&fd, &from).unwrap();
    rustix::net::connect(&fd, &to).unwrap();
    let tcp = TcpStream::from(fd);
    tcp.set_read_timeout(Some(LIMIT)).unwrap();
    tcp
}

/// TLS over an open TCP connection, checking nothing about the other side (see
/// [`tls_connect`]).
pub fn tls_over(tcp: TcpStream) -> fastchat::transport::Stream {
    use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
    let mut b = SslConnector::builder(SslMethod::tls_client()).unwrap();
    b.set_verify(SslVerifyMode::NONE);
    let ssl = b
        .build()
        .configure()
        .unwrap()
        .verify_hostname(false)
        .use_server_name_indication(false);
    let s = ssl
        .connect("fastchat", fastchat::transport::Socket::new(tcp))
        .expect("TLS handshake");
    fastchat::transport::Stream::Tls(Box::new(s))
}

/// Sends raw bytes (inside TLS) to `addr` and returns everything it answers until it closes
/// the connection (or `LIMIT` passes, which fails the test).
pub fn raw_exchange(addr: &str, bytes: &[u8]) -> Vec<u8> {
    exchange(tls_connect(addr), addr, bytes)
}

/// Like [`raw_exchange`], without TLS (for clusters in plaintext, or to show what a peer that
/// does not speak TLS gets).
pub fn raw_exchange_plain(addr: &str, bytes: &[u8]) -> Vec<u8> {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(LIMIT)).unwrap();
    exchange(fastchat::transport::Stream::plain(s), addr, bytes)
}

/// Says `Hello` as `session` (with a valid proof for the connection), then sends `bytes`, and
/// returns everything the server answers until it closes the connection.
pub fn exchange_after_hello(session: &fastchat::client::Session, bytes: &[u8]) -> Vec<u8> {
    let s = dial_hello(session);
    exchange(s, &session.server.addr, bytes)
}

fn exchange(mut s: fastchat::transport::Stream, addr: &str, bytes: &[u8]) -> Vec<u8> {
    let _ = s.write_all(bytes);
    let _ = s.flush();
    // Half-close, so a truncated frame is seen as one (EOF inside the frame).
    s.close_write();
    let mut answer = Vec::new();
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) if started.elapsed() < LIMIT && e.kind() == std::io::ErrorKind::Other => break,
            Err(e) => panic!("no close from {addr} after {:?}: {e}", started.elapsed()),
        }
    }
    answer
}

/// Whether any file in `dir` (recursively) contains `needle`.
pub fn dir_contains(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            hits.extend(dir_contains(&path, needle));
        } else if let Ok(bytes) = std::fs::read(&path) {
            if bytes.windows(needle.len()).any(|w| w == needle) {
                hits.push(path);
            }
        }
    }
    hits
}

/// A TCP proxy on 127.0.0.1 that records every byte clients send through it (what the server's
/// side of the connection receives) and everything the server answers.
pub struct RecordingProxy {
    pub addr: String,
    pub recorded: std::sync::Arc<parking_lot::Mutex<Vec<u8>>>,
    target: std::sync::Arc<parking_lot::Mutex<Option<String>>>,
}

impl RecordingProxy {
    /// Binds now; forwards to the address given later with [`RecordingProxy::forward_to`].
    pub fn bind() -> RecordingProxy {
        use std::net::{Shutdown, TcpListener};
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let recorded: Arc<parking_lot::Mutex<Vec<u8>>> = Arc::default();
        let target: Arc<parking_lot::Mutex<Option<String>>> = Arc::default();
        let (rec, tgt) = (Arc::clone(&recorded), Arc::clone(&target));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { break };
                let Some(to) = tgt.lock().clone() else {
                    continue;
                };
                let Ok(server) = TcpStream::connect(&to) else {
                    continue;
                };
                for (mut from, mut into) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let rec = Arc::clone(&rec);
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || into.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            rec.lock().extend_from_slice(&buf[..n]);
                        }
                        let _ = into.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        RecordingProxy {
            addr,
            recorded,
            target,
        }
    }

    pub fn forward_to(&self, addr: &str) {
        *self.target.lock() = Some(addr.to_string());
    }
}

impl Cluster {
    /// Starts a server whose advertised address is `proxy`: every client connection to it passes
    /// through the proxy.
    pub fn add_server_behind(&mut self, proxy: &RecordingProxy) {
        let listening = self.add_server_at(&proxy.addr, &[]);
        proxy.forward_to(&listening);
    }
}

/// A TCP proxy on 127.0.0.1 that passes everything, except that on its `nth` connection it stops
/// forwarding in one direction after `limit` bytes: a transfer that hangs half-way,
/// deterministically. Closing either side closes the other.
pub struct GateProxy {
    pub addr: String,
    target: std::sync::Arc<parking_lot::Mutex<Option<String>>>,
}

/// Which way a [`GateProxy`] holds bytes back.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Client to server (an upload).
    Up,
    /// Server to client (a download).
    Down,
}

impl GateProxy {
    pub fn bind(nth: usize, gate: Gate, limit: usize) -> GateProxy {
        use std::net::{Shutdown, TcpListener};
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let target: Arc<parking_lot::Mutex<Option<String>>> = Arc::default();
        let count = Arc::new(AtomicUsize::new(0));
        let tgt = Arc::clone(&target);
        std::thread::spawn(move || {
            for (i, client) in listener.incoming().enumerate() {
                let Ok(client) = client else { break };
                let Some(to) = tgt.lock().clone() else {
                    continue;
                };
                let Ok(server) = TcpStream::connect(&to) else {
                    continue;
                };
                let up = (
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    Gate::Up,
                );
                for (mut from, mut into, dir) in [up, (server, client, Gate::Down)] {
                    let gated = i == nth && dir == gate;
                    let count = Arc::clone(&count);
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        let mut holding = false;
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            if holding {
                                // Swallow what comes, so a closed side is still noticed.
                                continue;
                            }
                            let mut pass = n;
                            if gated {
                                let before = count.load(Ordering::SeqCst);
                                pass = n.min(limit.saturating_sub(before));
                                count.fetch_add(pass, Ordering::SeqCst);
                            }
                            if into.write_all(&buf[..pass]).is_err() {
                                break;
                            }
                            holding = pass < n;
                        }
                        let _ = into.shutdown(Shutdown::Both);
                        let _ = from.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        GateProxy { addr, target }
    }

    pub fn forward_to(&self, addr: &str) {
        *self.target.lock() = Some(addr.to_string());
    }
}

impl Cluster {
    /// Starts a server, with extra arguments, whose advertised address is `proxy_addr`; returns
    /// the address it really listens on.
    pub fn add_server_at(&mut self, proxy_addr: &str, extra: &[&str]) -> String {
        let mut args = vec!["--advertise", proxy_addr];
        args.extend_from_slice(extra);
        let i = self.add_server_with(&args);
        // Clients are told the proxy's address; the caller gets the real one.
        std::mem::replace(&mut self.server_addrs[i], proxy_addr.to_string())
    }

    /// Starts one more server with extra arguments; returns its index. With TLS, server
    /// number i (from 1) holds the certificate `server-i`, made now if it does not exist yet.
    pub fn add_server_with(&mut self, extra: &[&str]) -> usize {
        self.add_server_limited(None, extra)
    }

    /// Like [`Cluster::add_server_with`], in a shell that first lowers the descriptor limit
    /// to `nofile`.
    pub fn add_server_limited(&mut self, nofile: Option<u32>, extra: &[&str]) -> usize {
        let name = format!("server-{}", self.servers.len() + 1);
        self.add_server_as(&name, nofile, extra)
    }

    /// Starts one more server under `name` (its certificate's, made if missing); waits until
    /// it is registered and returns its index.
    pub fn add_server_as(&mut self, name: &str, nofile: Option<u32>, extra: &[&str]) -> usize {
        use fastchat::transport::pki::{self, Member, Role};
        let i = self.servers.len();
        let mut cmd = match nofile {
            Some(n) => {
                let mut sh = Command::new("sh");
                sh.args(["-c", &format!("ulimit -n {n} && exec \"$0\" \"$@\"")])
                    .arg(bin("fastchat-server"));
                sh
            }
            None => Command::new(bin("fastchat-server")),
        };
        cmd.args([
            "--listen",
            "127.0.0.1:0",
            "--balancer",
            &self.balancer_addr,
            "--db",
            &self.db,
        ]);
        match &self.tls {
            Some(t) => {
                if !t.join(format!("{name}.pem")).exists() {
                    let member = Member {
                        role: Role::Server,
                        name: name.to_string(),
                    };
                    pki::issue(t, &member).expect("a server certificate");
                }
                cmd.arg("--tls-dir").arg(t).args(["--name", name]);
            }
            None => {
                cmd.arg("--insecure-plaintext");
            }
        }
        let server = Proc::spawn(&format!("server{i}"), cmd.args(extra));
        let (id, addr) = parse_ready(&server.line());
        self.servers.push(server);
        self.server_addrs.push(addr);
        self.server_ids.push(id);
        i
    }
}

/// Waits for the next message on a library client, failing the test after `LIMIT`.
pub fn next_message(client: &fastchat::client::Client) -> fastchat::net::Envelope {
    let deadline = Instant::now() + LIMIT;
    loop {
        match client.next(deadline).unwrap() {
            Some(fastchat::client::Event::Message(m)) => return m,
            Some(_) => continue,
            None => panic!("no message within {LIMIT:?}"),
        }
    }
}

/// Connects to the session's server and sends `Hello` with the session's proof for this
/// connection, and reads nothing at all afterwards: a client that has stopped reading.
pub fn dial_hello(session: &fastchat::client::Session) -> fastchat::transport::Stream {
    let mut s = tls_connect(&session.server.addr);
    let proof = session.key.prove(s.binding().as_ref()).unwrap();
    let mut hello = Vec::new();
    fastchat::net::encode_into(
        &mut hello,
        &fastchat::net::Greeting::Hello {
            token: session.token.clone(),
            proof,
        },
    )
    .unwrap();
    s.write_all(&hello).unwrap();
    s
}

/// A small deterministic random generator (xorshift64*) for fuzzing: a failure can be
/// replayed from its seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// Flips, overwrites, inserts, removes or truncates a few bytes; sometimes rewrites the
    /// length prefix.
    pub fn mutate(&mut self, data: &mut Vec<u8>) {
        for _ in 0..1 + self.below(4) {
            if data.is_empty() {
                data.push(self.next() as u8);
                continue;
            }
            let at = self.below(data.len());
            match self.below(6) {
                0 => data[at] ^= 1 << self.below(8),
                1 => data[at] = self.next() as u8,
                2 => data.insert(at, self.next() as u8),
                3 => {
                    data.remove(at);
                }
                4 => data.truncate(at),
                _ => {
                    if data.len() >= 4 {
                        let len = match self.below(3) {
                            0 => u32::MAX,
                            1 => self.next() as u32 % 4096,
                            _ => (data.len() as u32).saturating_sub(4) + 1,
                        };
                        data[..4].copy_from_slice(&len.to_be_bytes());
                    }
                }
            }
        }
    }
}

impl Cluster {
    /// Runs `fastchat ARGS` as `user` with the given password.
    pub fn run_with_password(&self, user: &str, password: &str, args: &[&str]) -> Output {
        run_limited(self.cmd(user).env("FASTCHAT_PASSWORD", password).args(args))
    }
}

/// A malicious chat server: a process with a genuine server certificate of the cluster (the
/// operator made it, or it was stolen with a server's disk), registered with the balancer
/// like any server, with a peer link open to a real server. Through that link it hands the
/// real server's users whatever it likes, as every honest server's relay does.
pub struct EvilServer {
    /// The id the balancer gave it.
    pub id: u64,
    link: fastchat::transport::Channel,
    /// Kept open: the registration lives as long as this link to the balancer.
    _balancer: fastchat::transport::Channel,
}

impl EvilServer {
    /// Makes a certificate `name`, registers, and links to server `target` (an index).
    pub fn join(c: &Cluster, name: &str, target: usize) -> EvilServer {
        use fastchat::net::{BalancerReply, BalancerRequest, Greeting, Request, Response};
        use fastchat::transport::pki::{self, Member, Role};
        use fastchat::transport::{Channel, Expect, Transport};
        let tls = c.tls.as_ref().expect("a TLS cluster");
        let member = Member {
            role: Role::Server,
            name: name.into(),
        };
        pki::issue(tls, &member).unwrap();
        let me = Transport::member(tls, name).unwrap();
        let stream = me
            .connect(&c.balancer_addr, "balancer", &Expect::Balancer)
            .unwrap();
        let mut balancer = Channel::new(stream).unwrap();
        balancer
            .send(&Request {
                id: 1,
                body: BalancerRequest::Register {
                    addr: "127.0.0.1:9".into(),
                    name: name.into(),
                },
            })
            .unwrap();
        let answer: Response<BalancerReply> =
            balancer.recv(fastchat::net::MAX_FRAME).unwrap().unwrap();
        let id = match answer.result {
            Ok(BalancerReply::Registered { server_id }) => server_id,
            other => panic!("registration refused: {other:?}"),
        };
        let stream = me
            .connect(&c.server_addrs[target], "server", &Expect::Server(None))
            .unwrap();
        let mut link = Channel::new(stream).unwrap();
        link.send(&Greeting::Peer { server_id: id }).unwrap();
        EvilServer {
            id,
            link,
            _balancer: balancer,
        }
    }

    /// Relays `msg` to `users` (connected to the target server), as if it had stored it.
    pub fn relay(&mut self, msg: fastchat::net::Envelope, users: &[&str]) {
        self.link
            .send(&fastchat::net::PeerMessage::Relay {
                msg: std::sync::Arc::new(msg),
                users: users.iter().map(|u| u.to_string()).collect(),
            })
            .unwrap();
    }
}

/// The id the next stored message will get.
pub fn next_message_id(c: &Cluster) -> i64 {
    let sql = c.sql();
    let newest = if sql.is_postgres() {
        "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM messages_id_seq"
    } else {
        "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0)"
    };
    sql.one::<i64>(newest, &[]) + 1
}
