//! `fastchat-server`: a chat server of a fastchat cluster.
// The doc comments below are the --help text (clap), not rustdoc: `[:PORT]` and `[bench]`
// are what a user types, not links.
#![allow(rustdoc::broken_intra_doc_links)]

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use fastchat::server::{self, Config};

/// Serves chat clients: authenticates them by session token, stores their (encrypted) messages
/// in the shared database and delivers them, relaying to other servers over the peer mesh.
///
/// Every connection is TLS 1.3 with the cluster's certificate authority: the server presents
/// its certificate (--name in --tls-dir, made by `fastchat-admin init DIR`) to clients, to the
/// balancer and to the other servers, and registers under the name in it.
///
/// Registers with the balancer before serving, then reports its load every 500 ms. Prints
/// "fastchat-server N listening on ADDR" on standard output once registered. Stops cleanly on
/// Ctrl-C or SIGTERM. Exit codes: 0 stopped cleanly, 2 bad arguments, 3 balancer unreachable at
/// start, 4 could not start (address in use, database unusable, certificates). Files it
/// creates are readable by its user only.
#[derive(Parser)]
#[command(
    version,
    args_override_self = true,
    after_help = "Example:\n  fastchat-server --listen 127.0.0.1:0 --balancer 127.0.0.1:7000 --db /tmp/fc/chat.db --tls-dir /tmp/fc/tls --name server-1"
)]
struct Args {
    /// Log level on standard error: off, error, warn, info, debug, trace, or a RUST_LOG
    /// filter [default: info, or RUST_LOG].
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// A configuration file of defaults for these flags, table [server] (docs/CLI.md)
    /// [default: FASTCHAT_CONFIG, else FASTCHAT_HOME/fastchat.toml if it exists].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:7001 (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", value_parser = fastchat::startup::listen_address)]
    listen: String,
    /// The balancer's address; ADDR,ADDR,... for a cluster with several balancers (on
    /// PostgreSQL): the server registers with every one.
    #[arg(long, value_name = "ADDR[,ADDR...]", value_parser = fastchat::startup::remote_addresses)]
    balancer: String,
    /// The cluster's database, shared with the balancer: a SQLite file, or
    /// postgres://USER[:PASSWORD]@HOST[:PORT]/DB for a cluster across machines.
    #[arg(long, env = "FASTCHAT_DB", value_name = "PATH|URL")]
    db: fastchat::db::Location,
    /// Address to give the balancer for clients and peers (default: the listening address).
    #[arg(long, value_name = "ADDR", value_parser = fastchat::startup::remote_address)]
    advertise: Option<String>,
    /// Serve /metrics (Prometheus text: clients, messages stored, delivered, relayed) on
    /// ADDR, such as 127.0.0.1:9101.
    #[arg(long, value_name = "ADDR", value_parser = fastchat::startup::listen_address)]
    metrics: Option<String>,
    /// Most clients connected at once; more are refused with "server is full".
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = fastchat::startup::at_least_one::<usize>)]
    max_clients: usize,
    /// Requests per second one client connection may make (in bursts of as many); a faster
    /// client is slowed down. 0 for no limit.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    max_rate: u32,
    /// Seconds a new connection has to finish the TLS handshake and say Hello before it is
    /// closed.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    hello_timeout: f64,
    /// Outbound messages waiting for one client before it counts as not reading and is
    /// disconnected (what it missed stays stored for its next login).
    #[arg(long, value_name = "N", default_value_t = 4096)]
    queue_len: usize,
    /// Largest file accepted, in bytes, or with a suffix K, M or G (powers of 1024).
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size)]
    max_file_size: u64,
    /// Quota: messages waiting for one user (or one group, not yet read by every member);
    /// more are refused until some are read.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 10_000,
        help_heading = "Quotas"
    )]
    max_queue: u64,
    /// Quota: bytes waiting for one user (or group).
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size, help_heading = "Quotas")]
    max_queue_size: u64,
    /// Quota: messages one sender may have waiting for one user.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1_000,
        help_heading = "Quotas"
    )]
    max_per_sender: u64,
    /// Quota: bytes one sender may have waiting for one user.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size, help_heading = "Quotas")]
    max_per_sender_size: u64,
    /// Quota: files one user may have stored (uploading, or offered and not yet taken).
    #[arg(long, value_name = "N", default_value_t = 100, help_heading = "Quotas")]
    max_files: u64,
    /// Quota: bytes of files one user may have stored.
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size, help_heading = "Quotas")]
    max_file_space: u64,
    /// Quota: bytes of all files stored.
    #[arg(long, value_name = "SIZE", default_value = "8G", value_parser = parse_size, help_heading = "Quotas")]
    max_file_space_total: u64,
    /// Days a message (and the file it offers) is kept when nobody takes it.
    #[arg(
        long,
        value_name = "DAYS",
        default_value_t = 30.0,
        help_heading = "Quotas"
    )]
    message_lifetime: f64,
    /// Seconds a write waits for the database when another process holds it, before it
    /// fails with "the database is busy".
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    db_timeout: f64,
    /// Bytes of the database's log not yet copied into it (a reader in another process
    /// holding back checkpoints) past which writes slow down; past twice this they are refused
    /// until the reader lets go.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = fastchat::units::parse_size)]
    wal_limit: u64,
    /// Microseconds the database writer lets a batch of messages gather before it commits,
    /// while they come often (five times this while other servers commit to the same SQLite
    /// file). Longer costs less CPU a message and adds up to that wait to the latency of
    /// messages whose sender sends on without waiting (a load test); one whose sender waits
    /// for it (fastchat send, the chat) is never held. 0 commits each batch at once.
    #[arg(
        long,
        value_name = "MICROS",
        default_value_t = fastchat::db::writer::COMMIT_WINDOW.as_micros() as u64,
        value_parser = clap::value_parser!(u64).range(0..=10_000)
    )]
    commit_window: u64,
    /// Run every thread of this server on these CPUs only, as `taskset -c` would: 0, 0-3,
    /// 0,2-3 [default: every CPU it may use]. On a machine it shares with other busy
    /// processes (a load test, other servers), one CPU can cost less a message: the server's
    /// threads hand each message from one to another, and a hand-off on the same CPU wakes
    /// no other (BENCHMARKS.md: a quarter less CPU a message with ten waiting clients, on two
    /// cores shared with the load tool). One CPU also caps the server at one CPU's work.
    #[arg(long, value_name = "LIST", value_parser = fastchat::startup::cpu_list)]
    cpus: Option<fastchat::startup::CpuList>,
    /// The cluster's certificate folder (see `fastchat-admin init`).
    #[arg(long, env = "FASTCHAT_TLS_DIR", value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// This server's name: its certificate in --tls-dir (server-1, server-2, ...). In
    /// plaintext, the name it registers under (default: server-PORT).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// No TLS at all: passwords and tokens cross the network readable. For a classroom on one
    /// trusted machine only; a warning is printed at every start.
    #[arg(long)]
    insecure_plaintext: bool,
}

use fastchat::units::parse_size;

fn main() -> ExitCode {
    fastchat::startup::tune_glibc();
    let args: Args = fastchat::config::parse("fastchat-server", "server");
    // Before any thread starts: they inherit it.
    if let Some(cpus) = &args.cpus {
        if let Err(e) = cpus.run_on() {
            return fail(&format!("cannot run on CPUs {cpus}: {e}"), 4);
        }
    }
    fastchat::startup::init_with("server", args.log_level.as_deref(), "info");
    if let Some(cpus) = &args.cpus {
        log::info!("running on CPU(s) {cpus} only (--cpus)");
    }
    fastchat::startup::private_files();
    if args.tls_dir.is_some() && args.name.is_none() {
        return fail(
            "--tls-dir needs --name: which certificate is this server's",
            2,
        );
    }
    let transport = match fastchat::startup::member_transport(
        "fastchat-server",
        args.tls_dir.as_deref(),
        args.name.as_deref(),
        "server",
        args.insecure_plaintext,
    ) {
        Ok(t) => t,
        Err(e) => return fail(&e.to_string(), 4),
    };
    let listener = match TcpListener::bind(&args.listen) {
        Ok(l) => l,
        Err(e) => return fail(&format!("cannot listen on {}: {e}", args.listen), 4),
    };
    let mut config = Config::new(args.db, args.balancer, transport);
    config.name = args.name;
    config.advertise = args.advertise;
    config.max_clients = args.max_clients;
    config.max_file = args.max_file_size;
    config.max_rate = args.max_rate;
    config.queue_len = args.queue_len;
    config.db_options = match fastchat::db::Options::from_args(args.db_timeout, args.wal_limit) {
        Ok(o) => o,
        Err(why) => return fail(&why, 2),
    };
    config.db_options.commit_window = std::time::Duration::from_micros(args.commit_window);
    let lifetime = match std::time::Duration::try_from_secs_f64(args.message_lifetime * 86_400.0) {
        Ok(d) if !d.is_zero() => d,
        _ => return fail("--message-lifetime must be a positive number of days", 2),
    };
    config.quotas = fastchat::server::quota::Quotas {
        queue_messages: args.max_queue,
        queue_bytes: args.max_queue_size,
        sender_messages: args.max_per_sender,
        sender_bytes: args.max_per_sender_size,
        user_files: args.max_files,
        user_file_bytes: args.max_file_space,
        total_file_bytes: args.max_file_space_total,
        lifetime,
    };
    if !(0.05..=3600.0).contains(&args.hello_timeout) || args.queue_len == 0 {
        return fail(
            "--hello-timeout must be 0.05 to 3600 seconds and --queue-len at least 1",
            2,
        );
    }
    config.hello_timeout = std::time::Duration::from_secs_f64(args.hello_timeout);
    config.metrics = args.metrics;
    let shutdown = fastchat::startup::shutdown_channel();
    let started = std::cell::Cell::new(false);
    let ready = |id: u64, addr: std::net::SocketAddr, metrics: Option<std::net::SocketAddr>| {
        println!("fastchat-server {id} listening on {addr}");
        if let Some(m) = metrics {
            println!("fastchat-server {id} metrics on http://{m}/metrics");
        }
        let _ = std::io::stdout().flush();
        started.set(true);
    };
    match server::run(listener, config, shutdown, ready) {
        Ok(()) => ExitCode::SUCCESS,
        // Before it listens: 3 if the balancer was out of reach, else 4 (could not start).
        Err(e) if !started.get() && e.exit_code() != 3 => fail(&e.to_string(), 4),
        Err(e) => fail(&e.to_string(), e.exit_code()),
    }
}

fn fail(message: &str, code: i32) -> ExitCode {
    eprintln!("fastchat-server: error: {message}");
    ExitCode::from(code as u8)
}
