//! `fastchat-balancer`: the front door of a fastchat cluster.
// The doc comments below are the --help text (clap), not rustdoc: `[:PORT]` and `[bench]`
// are what a user types, not links.
#![allow(rustdoc::broken_intra_doc_links)]

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use fastchat::balancer::{self, Algo, Config};
use fastchat::crypto::{ScryptCost, DEFAULT_SCRYPT_LOG_N};

/// Signs users up, checks passwords, serves public keys, and assigns each login a chat server.
///
/// Every connection is TLS 1.3 with the cluster's certificate authority: the balancer presents
/// its certificate from --tls-dir (made by `fastchat-admin init DIR`), and accepts as chat
/// servers only processes that present a server certificate of the same CA.
///
/// Prints "fastchat-balancer listening on ADDR" on standard output once it accepts connections
/// (useful with port 0). Stops cleanly on Ctrl-C or SIGTERM. Exit codes: 0 stopped cleanly,
/// 2 bad arguments, 4 could not start (address in use, database unusable, certificates).
/// Files it creates are readable by its user only.
#[derive(Parser)]
#[command(
    version,
    args_override_self = true,
    after_help = "Example:\n  fastchat-admin init /tmp/fc/tls\n  fastchat-balancer --listen 127.0.0.1:7000 --db /tmp/fc/chat.db --tls-dir /tmp/fc/tls --algo least-loaded"
)]
struct Args {
    /// Log level on standard error: off, error, warn, info, debug, trace, or a RUST_LOG
    /// filter [default: info, or RUST_LOG].
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// A configuration file of defaults for these flags, table [balancer] (docs/CLI.md)
    /// [default: FASTCHAT_CONFIG, else FASTCHAT_HOME/fastchat.toml if it exists].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:7000 (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", value_parser = fastchat::startup::listen_address)]
    listen: String,
    /// The cluster's database, shared with the chat servers: a SQLite file (created if
    /// missing), or postgres://USER[:PASSWORD]@HOST[:PORT]/DB for a cluster across machines.
    #[arg(long, env = "FASTCHAT_DB", value_name = "PATH|URL")]
    db: fastchat::db::Location,
    /// How to choose a chat server for each login.
    #[arg(long, default_value = "round-robin", value_parser = parse_algo,
          help = "How to choose a chat server for each login: round-robin, random, least-loaded or p2c")]
    algo: Algo,
    /// scrypt cost for new passwords, as log2 N (N = 2^this; r = 8, p = 1). Lower is faster and
    /// weaker: use 4 only in tests.
    #[arg(long, value_name = "LOG_N", default_value_t = DEFAULT_SCRYPT_LOG_N)]
    scrypt_log_n: u8,
    /// Lifetime of a session token, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 24 * 3600, value_parser = fastchat::startup::at_least_one::<u64>)]
    token_ttl: u64,
    /// Signups allowed from one address; past that, each next one waits (1 s, 2 s, ... up to
    /// five minutes; forgotten after ten quiet minutes). Raise it for a class behind one
    /// address; 0 for no limit.
    #[arg(long, value_name = "N", default_value_t = 30)]
    signups_per_address: u32,
    /// Most connections at once (lowered to what the descriptor limit allows); more are
    /// closed at once.
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = fastchat::startup::at_least_one::<usize>)]
    max_connections: usize,
    /// Most connections at once from one address; more are closed at once.
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = fastchat::startup::at_least_one::<usize>)]
    max_per_address: usize,
    /// Seconds a connection has for its TLS handshake, and a request for all its bytes once
    /// the first has come; slower ones are closed.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    request_timeout: f64,
    /// Seconds a write waits for the database when another process holds it, before it
    /// fails with "the database is busy".
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    db_timeout: f64,
    /// Bytes of the database's log not yet copied into it (a reader in another process
    /// holding back checkpoints) past which writes slow down; past twice this they are refused
    /// until the reader lets go.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = fastchat::units::parse_size)]
    wal_limit: u64,
    /// The cluster's certificate folder (see `fastchat-admin init`).
    #[arg(long, env = "FASTCHAT_TLS_DIR", value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// Which certificate in --tls-dir is this balancer's.
    #[arg(long, value_name = "NAME", default_value = "balancer")]
    name: String,
    /// Serve the cluster dashboard (a live web page for the class), its JSON
    /// (/api/cluster) and /metrics (Prometheus) on ADDR, such as 127.0.0.1:8080. Read-only;
    /// off loopback it asks for a token (--http-token, or one made and printed at start).
    #[arg(long, value_name = "ADDR", value_parser = fastchat::startup::listen_address)]
    http: Option<String>,
    /// The dashboard's token [default: none on loopback, else made at start].
    #[arg(
        long,
        env = "FASTCHAT_HTTP_TOKEN",
        value_name = "TOKEN",
        requires = "http"
    )]
    http_token: Option<String>,
    /// No TLS at all: passwords and tokens cross the network readable. For a classroom on one
    /// trusted machine only; a warning is printed at every start.
    #[arg(long)]
    insecure_plaintext: bool,
}

fn parse_algo(s: &str) -> Result<Algo, String> {
    s.parse()
}

fn main() -> ExitCode {
    let args: Args = fastchat::config::parse("fastchat-balancer", "balancer");
    fastchat::startup::init_with("balancer", args.log_level.as_deref(), "info");
    fastchat::startup::private_files();
    let transport = match fastchat::startup::member_transport(
        "fastchat-balancer",
        args.tls_dir.as_deref(),
        Some(&args.name),
        "balancer",
        args.insecure_plaintext,
    ) {
        Ok(t) => t,
        Err(e) => return fail(&e.to_string(), 4),
    };
    let scrypt = match ScryptCost::with_log_n(args.scrypt_log_n) {
        Ok(c) => c,
        Err(e) => return fail(&e.to_string(), 2),
    };
    let listener = match TcpListener::bind(&args.listen) {
        Ok(l) => l,
        Err(e) => return fail(&format!("cannot listen on {}: {e}", args.listen), 4),
    };
    let mut config = Config::new(args.db, transport);
    config.algo = args.algo;
    config.scrypt = scrypt;
    config.token_ttl = Duration::from_secs(args.token_ttl);
    config.signups_per_address = args.signups_per_address;
    config.max_connections = args.max_connections;
    config.max_per_address = args.max_per_address;
    config.db_options = match fastchat::db::Options::from_args(args.db_timeout, args.wal_limit) {
        Ok(o) => o,
        Err(why) => return fail(&why, 2),
    };
    config.request_timeout = match Duration::try_from_secs_f64(args.request_timeout) {
        Ok(d) if !d.is_zero() => d,
        _ => return fail("--request-timeout must be a positive number of seconds", 2),
    };
    config.http = args.http;
    config.http_token = args.http_token;
    let shutdown = fastchat::startup::shutdown_channel();
    let started = std::cell::Cell::new(false);
    let ready = |addr, board: Option<&balancer::dashboard::Dashboard>| {
        println!("fastchat-balancer listening on {addr}");
        if let Some(b) = board {
            match &b.token {
                Some(t) => println!(
                    "fastchat-balancer dashboard on http://{}/?token={t}",
                    b.addr
                ),
                None => println!("fastchat-balancer dashboard on http://{}/", b.addr),
            }
        }
        let _ = std::io::stdout().flush();
        started.set(true);
    };
    match balancer::run(listener, config, shutdown, ready) {
        Ok(()) => ExitCode::SUCCESS,
        // Before it listens, whatever failed (the database, mostly) means it could not start.
        Err(e) if !started.get() => fail(&e.to_string(), 4),
        Err(e) => fail(&e.to_string(), e.exit_code()),
    }
}

fn fail(message: &str, code: i32) -> ExitCode {
    eprintln!("fastchat-balancer: error: {message}");
    ExitCode::from(code as u8)
}
