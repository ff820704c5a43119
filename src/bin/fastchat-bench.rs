//! `fastchat-bench`: the load generator.
// The doc comments below are the --help text (clap), not rustdoc: `[:PORT]` and `[bench]`
// are what a user types, not links.
#![allow(rustdoc::broken_intra_doc_links)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Parser;
use fastchat::bench::{self, Config, Mode, Target};

/// Drives a fastchat cluster with many clients over the real protocol, with real end-to-end
/// encryption, and reports delivered messages per second, latency percentiles (send to
/// decrypted delivery), and how many messages were lost or duplicated; for the processes it
/// starts, their CPU time and context switches (threads put to sleep and woken) per delivery.
///
/// Either point it at a running cluster (--balancer) or let it start its own balancer and
/// servers on a temporary database (--spawn-servers); those are stopped when it ends. To
/// compare like with like, --rival runs the same workload against mosquitto or ngircd.
///
/// Exit codes: 0 every message delivered exactly once; 1 something was lost, duplicated or
/// refused; 2 bad arguments; 3 the cluster could not be reached; 4 local trouble; 130
/// interrupted (Ctrl-C or SIGTERM; the processes it started are stopped first).
#[derive(Parser)]
#[command(
    version,
    args_override_self = true,
    after_help = "Examples:
  fastchat-bench --spawn-servers 3 --clients 100 --messages 1000
  fastchat-bench --spawn-servers 3 --clients 100 --messages 200 --mode group --group-size 10
  fastchat-bench --spawn-servers 3 --clients 100 --messages 300 --rate 10000
  fastchat-bench --spawn-servers 1 --clients 5000 --mode idle
  fastchat-bench --spawn-servers 3 --clients 60 --messages 2000 --rate 20000 --kill-server 1
  fastchat-bench --spawn-servers 3 --clients 100 --messages 1000 --insecure-plaintext
  fastchat-bench --balancer 127.0.0.1:7000 --ca /tmp/fc/tls/ca.pem --clients 50 --messages 100 --json
  fastchat-bench --rival mosquitto --clients 100 --messages 1000      (the same workload, another server)
  fastchat-bench --spawn-servers 1 --opaque --messages 300 --sweep rate=2000,5000,10000 --against mosquitto,ngircd --svg rivals.svg"
)]
struct Args {
    /// Log level on standard error: off, error, warn, info, debug, trace, or a RUST_LOG
    /// filter [default: info, or RUST_LOG].
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// A configuration file of defaults for these flags, table [bench] (docs/CLI.md)
    /// [default: FASTCHAT_CONFIG, else FASTCHAT_HOME/fastchat.toml if it exists].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Simulated users, one connection each.
    #[arg(long, default_value_t = 100, value_name = "N")]
    clients: usize,
    /// Messages each client sends.
    #[arg(long, default_value_t = 1000, value_name = "M")]
    messages: u64,
    /// Plaintext bytes per message.
    #[arg(long, default_value_t = 100, value_name = "B")]
    size: usize,
    /// Messages a client may have in flight (sent, not yet confirmed stored).
    #[arg(long, default_value_t = 32, value_name = "W")]
    window: usize,
    /// Threads that drive the clients, each its share of them over one poll. Default: one
    /// per core, and at most 50 clients each (the tool then costs the machine it measures
    /// little beyond its cryptography); as many as --clients gives each client a thread of
    /// its own.
    #[arg(long, value_name = "T")]
    threads: Option<usize>,
    /// direct (one recipient per message, by --pattern), group (everyone to their group) or
    /// idle (connect and hold).
    #[arg(long, default_value = "direct", value_name = "MODE")]
    mode: Mode,
    /// Direct mode: whom each message goes to. spread: message s of client i to client
    /// i+1+(s mod K), over K = min(M, N-1) others, as chat spreads (the default); random: to one
    /// of those K at random; ring: always client i+1 (a whole window to one recipient, which
    /// batches perfectly: not a fair workload).
    #[arg(long, default_value = "spread", value_name = "PATTERN")]
    pattern: bench::Pattern,
    /// Members per group, in group mode.
    #[arg(long, default_value_t = 10, value_name = "K")]
    group_size: usize,
    /// Offered load: total messages per second across all clients, on a fixed schedule
    /// (latency counts from when each message was due). Default: as fast as the window allows.
    #[arg(long, value_name = "R")]
    rate: Option<f64>,
    /// Use the running cluster whose balancer is at ADDR. Every simulated user signs up there,
    /// all from this address: start its balancer with --signups-per-address 0 (or more than
    /// --clients), or it refuses all but the first 30.
    #[arg(
        long,
        value_name = "ADDR",
        conflicts_with = "spawn_servers",
        value_parser = fastchat::startup::remote_addresses
    )]
    balancer: Option<String>,
    /// Start a balancer and K servers on a temporary database, and stop them at the end.
    #[arg(long, value_name = "K")]
    spawn_servers: Option<usize>,
    /// Measure a mature messaging server instead, with the same workload, on this machine:
    /// mosquitto (MQTT 5, QoS 1: the broker's PUBACK confirms a message, each receiver
    /// acknowledges each one) or ngircd (IRC: PRIVMSG, confirmed by a PING's PONG). Started on
    /// a free loopback port in a temporary folder (with a certificate of its own: TLS 1.3
    /// unless --insecure-plaintext), stopped at the end. Neither encrypts end to end: compare
    /// with --opaque runs of fastchat.
    #[arg(long, value_name = "SERVER", conflicts_with_all = ["balancer", "spawn_servers", "ca"])]
    rival: Option<bench::Rival>,
    /// With --rival: its program [default: found on PATH or in /usr/sbin].
    #[arg(long, value_name = "PATH")]
    rival_bin: Option<PathBuf>,
    /// Run the servers this run starts on these CPUs only: each spawned server with `--cpus
    /// LIST`, or the rival (its one thread). 0, 0-3, 0,2-3. On a machine the load tool shares,
    /// one CPU for the servers can cost fastchat less a message (BENCHMARKS.md).
    #[arg(long, value_name = "LIST", conflicts_with = "balancer", value_parser = fastchat::startup::cpu_list)]
    server_cpus: Option<fastchat::startup::CpuList>,
    /// Password-hash cost (scrypt log2 N) for a spawned balancer: signups and logins are not
    /// what is measured, so it is cheap by default.
    #[arg(long, default_value_t = 8, value_name = "LOG_N")]
    scrypt_log_n: u8,
    /// Seconds to wait for missing messages once all are sent (since the last delivery).
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    drain: f64,
    /// Seconds idle clients stay connected, in idle mode.
    #[arg(long, default_value_t = 2.0, value_name = "SECS")]
    hold: f64,
    /// Fault injection: kill one of the spawned servers (kill -9) SECS after the messages
    /// start. Its clients move to other servers; the run must still lose nothing.
    #[arg(long, value_name = "SECS", requires = "spawn_servers")]
    kill_server: Option<f64>,
    /// Fault injection: stop one of the spawned servers (SIGSTOP: its sockets stay open and it
    /// answers nothing) SECS after the messages start, until the run is over. Its clients
    /// leave it once it answers nothing (a Stored awaited 5 s, then a Ping 5 s: give
    /// --drain more than 10); the run must still lose nothing.
    #[arg(
        long,
        value_name = "SECS",
        requires = "spawn_servers",
        conflicts_with = "kill_server"
    )]
    stop_server: Option<f64>,
    /// Fault injection, with --stop-server: resume the stopped server (SIGCONT) SECS after
    /// it was stopped, while the run goes on. Its clients have left it and sent again, through
    /// another server, what it had not confirmed; resumed, it must store none of that a
    /// second time (a server that did not run for 2 s or more stores nothing it read
    /// before). Give more than 10 to let its clients leave it first.
    #[arg(long, value_name = "SECS", requires = "stop_server")]
    resume_server: Option<f64>,
    /// With --spawn-servers: the cluster's database, a SQLite file or postgres://... (default:
    /// a SQLite file in a temporary folder). Users are named per run, so a database may be
    /// reused.
    #[arg(long, env = "FASTCHAT_DB", value_name = "PATH|URL")]
    db: Option<String>,
    /// Also report the run stretch by stretch, SECS each (by delivery time): deliveries,
    /// latency percentiles and, for a spawned cluster, CPU per delivery. Shows whether a long
    /// run's tail grows with time or comes in bursts.
    #[arg(long, value_name = "SECS")]
    every: Option<f64>,
    /// Print the report as one JSON object.
    #[arg(long, conflicts_with = "markdown")]
    json: bool,
    /// Print the report as one row of a Markdown table, labelled LABEL (with --header, the
    /// table's header first).
    #[arg(long, value_name = "LABEL")]
    markdown: Option<String>,
    /// With --markdown: print the table header before the row.
    #[arg(long, requires = "markdown")]
    header: bool,
    /// Never draw the progress bar (it is drawn only on a terminal anyway).
    #[arg(long)]
    quiet: bool,
    /// With --balancer: the cluster's CA certificate (a spawned cluster makes its own).
    #[arg(long, value_name = "FILE", conflicts_with = "spawn_servers")]
    ca: Option<std::path::PathBuf>,
    /// No TLS (a spawned cluster runs without it too): to compare with and without.
    #[arg(long, conflicts_with = "ca")]
    insecure_plaintext: bool,
    /// Clients send the payload as it is instead of end-to-end encrypting it, and take it as
    /// it comes: the servers do the same work (they never look inside a message), the clients
    /// do no cryptography. Measures the servers alone, as a broker without end-to-end
    /// encryption is measured; label such rows so.
    #[arg(long)]
    opaque: bool,
    /// Run the workload once per value: rate=R1,R2,... (the offered rate) or
    /// clients=N1,N2,... (the number of clients), each on a fresh cluster when spawned; one
    /// report per run.
    #[arg(long, value_name = "WHAT=V1,V2,...")]
    sweep: Option<bench::plot::Sweep>,
    /// With --sweep: run each value against these servers too, one after another (the same
    /// minutes for all): mosquitto, ngircd, or both (comma separated). With --svg, one plot
    /// compares them.
    #[arg(long, value_name = "SERVERS", value_delimiter = ',')]
    against: Vec<bench::Rival>,
    /// With --sweep: also draw it in this SVG file (latency percentiles against the offered
    /// rate, or throughput against clients).
    #[arg(long, value_name = "FILE", requires = "sweep")]
    svg: Option<std::path::PathBuf>,
}

/// Set when Ctrl-C arrived: the handler thread decides the exit status then.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn main() -> ExitCode {
    let args: Args = fastchat::config::parse("fastchat-bench", "bench");
    fastchat::startup::init_with("bench", args.log_level.as_deref(), "info");
    if !args.against.is_empty() && (args.kill_server.is_some() || args.stop_server.is_some()) {
        return usage(
            "--against and --kill-server or --stop-server do not go together: the rivals have \
             no failover",
        );
    }
    if args.rival_bin.is_some() && args.rival.is_none() {
        return usage("--rival-bin goes with --rival");
    }
    let target = match (args.balancer, args.spawn_servers, args.rival) {
        (Some(b), None, None) => Target::Balancer(b),
        (None, Some(k), None) if k >= 1 => Target::Spawn(k),
        (None, Some(_), None) => return usage("--spawn-servers must be at least 1"),
        (None, None, Some(rival)) => Target::Rival(rival, args.rival_bin),
        _ => return usage(
            "say where the cluster is: --balancer ADDR or --spawn-servers K (or --rival SERVER)",
        ),
    };
    let seconds = [
        Some(args.drain),
        Some(args.hold),
        args.kill_server,
        args.stop_server,
        args.resume_server,
    ];
    if seconds
        .iter()
        .flatten()
        .any(|s| !(0.0..=3600.0).contains(s))
    {
        return usage(
            "--drain, --hold, --kill-server, --stop-server and --resume-server must be between 0 \
             and 3600 seconds",
        );
    }
    if args.every.is_some_and(|s| !(0.1..=3600.0).contains(&s)) {
        return usage("--every must be between 0.1 and 3600 seconds");
    }
    if (args.kill_server.is_some() || args.stop_server.is_some())
        && args.spawn_servers.unwrap_or(0) < 2
    {
        return usage(
            "--kill-server and --stop-server need --spawn-servers 2 or more: the clients need \
             somewhere to go",
        );
    }
    let config = Config {
        clients: args.clients,
        messages: args.messages,
        size: args.size,
        window: args.window,
        mode: args.mode,
        pattern: args.pattern,
        group_size: args.group_size,
        rate: args.rate,
        target,
        scrypt_log_n: args.scrypt_log_n,
        drain: Duration::from_secs_f64(args.drain),
        hold: Duration::from_secs_f64(args.hold),
        kill_server: args.kill_server.map(Duration::from_secs_f64),
        stop_server: args.stop_server.map(Duration::from_secs_f64),
        resume_server: args.resume_server.map(Duration::from_secs_f64),
        ca: args.ca,
        plaintext: args.insecure_plaintext,
        opaque: args.opaque,
        db: args.db,
        threads: args.threads,
        every: args.every.map(Duration::from_secs_f64),
        server_cpus: args.server_cpus,
        progress: !args.quiet && !args.json && args.markdown.is_none() && bench::progress_default(),
    };
    if let Err(e) = bench::check(&config) {
        return usage(&e.to_string());
    }
    // Ctrl-C (or SIGTERM): stop the cluster this run started, say so, exit 130. The run may
    // fail meanwhile (its cluster is going away): that thread then waits for this one.
    let interrupt = fastchat::startup::shutdown_channel();
    std::thread::spawn(move || {
        if interrupt.recv().is_ok() {
            INTERRUPTED.store(true, Ordering::SeqCst);
            fastchat::bench::launch::stop_everything();
            eprintln!("fastchat-bench: interrupted; stopped every process it had started");
            std::process::exit(130);
        }
    });
    if let Some(sweep) = &args.sweep {
        let print = Print {
            json: args.json,
            markdown: args.markdown.clone(),
            header: args.header,
        };
        return run_sweep(&print, &config, sweep, args.svg.as_deref(), &args.against);
    }
    if !args.against.is_empty() {
        return usage("--against goes with --sweep");
    }
    let result = bench::run(&config);
    if INTERRUPTED.load(Ordering::SeqCst) {
        loop {
            std::thread::park();
        }
    }
    match result {
        Ok(report) => {
            if args.json {
                println!("{}", bench::to_json(&report));
            } else if let Some(label) = &args.markdown {
                if args.header {
                    println!("{}", bench::markdown_header(report.mode == "idle"));
                }
                println!("{}", bench::markdown_row(label, &report));
            } else {
                print!("{}", bench::render(&report));
            }
            if report.clean() {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "fastchat-bench: the run was not clean: {}",
                    report.problems()
                );
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("fastchat-bench: error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// How reports are printed.
struct Print {
    json: bool,
    markdown: Option<String>,
    header: bool,
}

/// Runs the workload once per value of the sweep (on each of the `against` servers too, one
/// after another), prints each report as it comes, and draws the plot if asked.
fn run_sweep(
    args: &Print,
    config: &Config,
    sweep: &bench::plot::Sweep,
    svg: Option<&std::path::Path>,
    against: &[bench::Rival],
) -> ExitCode {
    let mut targets = vec![config.target.clone()];
    targets.extend(against.iter().map(|r| Target::Rival(*r, None)));
    let mut series: Vec<(String, Vec<bench::Report>)> = targets
        .iter()
        .map(|t| {
            (
                server_name(t, config.opaque),
                Vec::with_capacity(sweep.len()),
            )
        })
        .collect();
    let mut clean = true;
    for i in 0..sweep.len() {
        for (t, target) in targets.iter().enumerate() {
            let mut run = config.clone();
            run.target = target.clone();
            match sweep {
                bench::plot::Sweep::Rate(rates) => run.rate = Some(rates[i]),
                bench::plot::Sweep::Clients(clients) => run.clients = clients[i],
            }
            let what = if against.is_empty() {
                sweep.label(i)
            } else {
                format!("{}, {}", series[t].0, sweep.label(i))
            };
            if let Err(e) = bench::check(&run) {
                return usage(&format!("{what}: {e}"));
            }
            let report = match bench::run(&run) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("fastchat-bench: error: {what}: {e}");
                    return ExitCode::from(e.exit_code() as u8);
                }
            };
            if args.json {
                println!("{}", bench::to_json(&report));
            } else if let Some(label) = &args.markdown {
                if args.header && i == 0 && t == 0 {
                    println!("{}", bench::markdown_header(report.mode == "idle"));
                }
                println!(
                    "{}",
                    bench::markdown_row(&format!("{label}, {what}"), &report)
                );
            } else {
                println!("== {what}");
                print!("{}", bench::render(&report));
            }
            if !report.clean() {
                eprintln!(
                    "fastchat-bench: {what} was not clean: {}",
                    report.problems()
                );
                clean = false;
            }
            series[t].1.push(report);
        }
    }
    if let Some(path) = svg {
        let drawn = if against.is_empty() {
            bench::plot::write_svg(path, sweep, &series[0].1)
        } else {
            bench::plot::write_comparison_svg(path, sweep, &series)
        };
        if let Err(e) = drawn {
            eprintln!("fastchat-bench: error: {e}");
            return ExitCode::from(e.exit_code() as u8);
        }
    }
    if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// What a sweep's line is called: `fastchat, 1 server (servers alone)`, `mosquitto`.
fn server_name(target: &Target, opaque: bool) -> String {
    let alone = if opaque { " (servers alone)" } else { "" };
    match target {
        Target::Spawn(1) => format!("fastchat, 1 server{alone}"),
        Target::Spawn(k) => format!("fastchat, {k} servers{alone}"),
        Target::Balancer(_) => format!("fastchat{alone}"),
        Target::Rival(rival, _) => rival.to_string(),
    }
}

fn usage(message: &str) -> ExitCode {
    eprintln!("fastchat-bench: error: {message}\n\nFor more information, try '--help'.");
    ExitCode::from(2)
}
