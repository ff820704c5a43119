//! `fastchat-balancer`: the front door of a fastchat cluster.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use fastchat::balancer::{self, Algo, Config};
use fastchat::crypto::{ScryptCost, DEFAULT_SCRYPT_LOG_N};

/// Signs users up, checks passwords, serves public keys, and assigns each login a chat server.
///
/// Prints "fastchat-balancer listening on ADDR" on standard output once it accepts connections
/// (useful with port 0). Stops cleanly on Ctrl-C or SIGTERM. Exit codes: 0 stopped cleanly,
/// 2 bad arguments, 4 could not start (address in use, database unusable).
#[derive(Parser)]
#[command(
    version,
    after_help = "Example:\n  fastchat-balancer --listen 127.0.0.1:7000 --db /tmp/chat.db --algo least-loaded"
)]
struct Args {
    /// Address to listen on, e.g. 127.0.0.1:7000 (port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    listen: String,
    /// SQLite database file shared with the chat servers (created if missing).
    #[arg(long, value_name = "PATH")]
    db: PathBuf,
    /// How to choose a chat server for each login.
    #[arg(long, default_value = "round-robin", value_parser = parse_algo,
          help = "How to choose a chat server for each login: round-robin, random, least-loaded or p2c")]
    algo: Algo,
    /// scrypt cost for new passwords, as log2 N (N = 2^this; r = 8, p = 1). Lower is faster and
    /// weaker: use 4 only in tests.
    #[arg(long, value_name = "LOG_N", default_value_t = DEFAULT_SCRYPT_LOG_N)]
    scrypt_log_n: u8,
    /// Lifetime of a session token, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 24 * 3600)]
    token_ttl: u64,
}

fn parse_algo(s: &str) -> Result<Algo, String> {
    s.parse()
}

fn main() -> ExitCode {
    let args = Args::parse();
    fastchat::logging::init("balancer");
    let scrypt = match ScryptCost::with_log_n(args.scrypt_log_n) {
        Ok(c) => c,
        Err(e) => return fail(&e.to_string(), 2),
    };
    let listener = match TcpListener::bind(&args.listen) {
        Ok(l) => l,
        Err(e) => return fail(&format!("cannot listen on {}: {e}", args.listen), 4),
    };
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let mut config = Config::new(args.db);
    config.algo = args.algo;
    config.scrypt = scrypt;
    config.token_ttl = Duration::from_secs(args.token_ttl);
    let shutdown = fastchat::logging::shutdown_channel();
    println!("fastchat-balancer listening on {addr}");
    match balancer::run(listener, config, shutdown) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e.to_string(), e.exit_code()),
    }
}

fn fail(message: &str, code: i32) -> ExitCode {
    eprintln!("fastchat-balancer: error: {message}");
    ExitCode::from(code as u8)
}
