//! The load generator behind `fastchat-bench`: many clients, the real protocol, real crypto.
//!
//! Every simulated user signs up and logs in through the balancer (with fresh key pairs), then
//! holds one connection to the server it was given, driven by one of a few threads (one per
//! core and at most 50 clients each, unless `--threads` says otherwise; see `driver`): it
//! seals (and in groups tags) and sends while its window has room (and, at a fixed offered
//! rate, when each message is due), and opens, checks and acknowledges what arrives.
//!
//! A payload is text, `SENDER:SEQ:NANOS:` padded to the requested size, where NANOS is when it
//! was sent (or, with a fixed rate, when it was due: latency then includes any time the client
//! fell behind). Receivers count each (sender, seq) once: what never arrives is lost, what
//! arrives twice is duplicated.
//!
//! Direct mode: message s of client i goes to client i+1+(s mod R), R = min(messages,
//! clients-1) (`--pattern` spread, the default; random: one of those R at random; ring:
//! always i+1). Group mode: groups of K consecutive
//! clients, made through the real group protocol; every member sends to its group, and every
//! message reaches the K-1 others. Idle mode: connect and hold, to see what a connection costs a
//! server.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::BalancerClient;
use crate::crypto::{self, Identity};
use crate::error::{Error, Result};
use crate::transport::Transport;
use launch::{LocalCluster, Usage};

mod driver;
pub mod launch;
mod plan;
pub mod plot;
mod report;
mod rival;
mod usage;
mod users;

use plan::{drivers, Fault, Plan, Victim};
use usage::{cpu_sample, cpu_spent, processes, sample};
use users::{connect_all, connected, open_link, Link, User};

pub use report::{markdown_header, markdown_row, progress_default, render, to_json};
pub use rival::Rival;

/// What the clients do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Direct messages, to recipients chosen by a [`Pattern`].
    Direct,
    /// Groups of `group_size`; everyone sends to their group.
    Group,
    /// Connect and hold, sending nothing.
    Idle,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Mode, String> {
        match s {
            "direct" => Ok(Mode::Direct),
            "group" => Ok(Mode::Group),
            "idle" => Ok(Mode::Idle),
            other => Err(format!("unknown mode {other:?}: use direct, group or idle")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Direct => "direct",
            Mode::Group => "group",
            Mode::Idle => "idle",
        })
    }
}

/// Whom each client writes to in direct mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Client i to client i+1 only: a whole window to one recipient, which batches
    /// perfectly (and flatters the server).
    Ring,
    /// Message s of client i to client i+1+(s mod K), over K = min(messages, clients-1)
    /// others: every message to another recipient, as chat is (the default).
    Spread,
    /// Each message to one of those K others, chosen at random.
    Random,
}

impl std::str::FromStr for Pattern {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Pattern, String> {
        match s {
            "ring" => Ok(Pattern::Ring),
            "spread" => Ok(Pattern::Spread),
            "random" => Ok(Pattern::Random),
            other => Err(format!(
                "unknown pattern {other:?}: use ring, spread or random"
            )),
        }
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pattern::Ring => "ring",
            Pattern::Spread => "spread",
            Pattern::Random => "random",
        })
    }
}

/// Where the cluster comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A running cluster's balancer.
    Balancer(String),
    /// Start a balancer and this many servers on a temporary database, stop them after.
    Spawn(usize),
    /// Start a mature messaging server instead (its program found, or at this path), to
    /// measure it with the same workload; stop it after.
    Rival(Rival, Option<PathBuf>),
}

/// A run's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Simulated users, one connection each.
    pub clients: usize,
    /// Messages each client sends.
    pub messages: u64,
    /// Plaintext bytes per message (at least the header `SENDER:SEQ:NANOS:`).
    pub size: usize,
    /// Messages a client may have sent and not yet seen `Stored`.
    pub window: usize,
    /// What the clients do.
    pub mode: Mode,
    /// Whom they write to, in direct mode.
    pub pattern: Pattern,
    /// Members per group (group mode).
    pub group_size: usize,
    /// Total offered messages per second across all clients; `None` for as fast as possible.
    pub rate: Option<f64>,
    /// The cluster.
    pub target: Target,
    /// scrypt cost (log2 N) of a spawned balancer.
    pub scrypt_log_n: u8,
    /// How long to wait for missing deliveries once everything is sent.
    pub drain: Duration,
    /// How long idle clients stay connected (idle mode).
    pub hold: Duration,
    /// Show a progress bar on standard error.
    pub progress: bool,
    /// Kill one spawned server (SIGKILL) this long after the messages start: its clients must
    /// move to another server and nothing may be lost.
    pub kill_server: Option<Duration>,
    /// Stop one spawned server (SIGSTOP, outside a commit) this long after the messages
    /// start, until the run is over: its clients must leave it and nothing may be lost.
    pub stop_server: Option<Duration>,
    /// Resume the stopped server (SIGCONT) this long after it was stopped, while the run
    /// goes on: it must store nothing a second time that its clients re-sent elsewhere.
    pub resume_server: Option<Duration>,
    /// The CA of a running cluster (`--balancer`); a spawned cluster makes its own.
    pub ca: Option<PathBuf>,
    /// Run without TLS (a spawned cluster too).
    pub plaintext: bool,
    /// Message bodies are the payload itself, not sealed end to end (the servers' work is the
    /// same; the clients do no cryptography).
    pub opaque: bool,
    /// The database of a spawned cluster: a file, or a PostgreSQL URL (default: a SQLite file
    /// in the run's temporary folder).
    pub db: Option<String>,
    /// Threads that drive the clients, each its share (`None`: one per core, and at most 50
    /// clients each).
    pub threads: Option<usize>,
    /// Also report each stretch of this length of the run (by delivery time): latency and CPU.
    pub every: Option<Duration>,
    /// The CPUs the servers this run starts run on (their `--cpus`; a rival's too), where
    /// not every CPU.
    pub server_cpus: Option<crate::startup::CpuList>,
}

/// Latency percentiles, microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Latency {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest.
    pub max: u64,
}

/// What a run measured.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The mode, as text.
    pub mode: String,
    /// Whom messages went to (direct mode), as text.
    pub pattern: String,
    /// Bodies sent as they are, not end-to-end encrypted.
    pub opaque: bool,
    /// Every connection was TLS (not `--insecure-plaintext`).
    pub tls: bool,
    /// The rival server measured instead of fastchat, with its version (`--rival`).
    pub rival: Option<String>,
    /// Clients.
    pub clients: usize,
    /// Messages per client.
    pub messages: u64,
    /// Plaintext bytes per message.
    pub size: usize,
    /// Window per client.
    pub window: usize,
    /// Threads that drove the clients.
    pub threads: usize,
    /// Members per group (group mode).
    pub group_size: usize,
    /// Offered rate, if fixed.
    pub rate: Option<f64>,
    /// Servers in the cluster.
    pub servers: usize,
    /// The CPUs the (first) server it started may run on, read from `/proc` (`0-1`; with
    /// `--server-cpus`, those); `None` for a cluster it did not start.
    pub server_cpus: Option<String>,
    /// Time to sign up, log in and connect every client.
    pub connect_secs: f64,
    /// `--kill-server` came after the run had ended: no failover was tested.
    pub kill_missed: bool,
    /// Clients that could not sign up, log in or connect: the run goes on without them.
    pub connect_failed: usize,
    /// Why the first of them failed.
    pub connect_error: Option<String>,
    /// Time until every message was sent and stored.
    pub send_secs: f64,
    /// Time until the last delivery.
    pub deliver_secs: f64,
    /// Deliveries expected (each message times its recipients).
    pub expected: u64,
    /// Distinct deliveries.
    pub delivered: u64,
    /// Expected but never delivered.
    pub lost: u64,
    /// Delivered again under another message id: stored twice.
    pub duplicated: u64,
    /// Delivered again under the same message id (at-least-once on the wire; a client shows
    /// it once).
    pub redelivered: u64,
    /// Connections that moved to another server after losing theirs.
    pub failovers: u64,
    /// Error replies and undecryptable messages.
    pub errors: u64,
    /// The first error seen, if any.
    pub first_error: Option<String>,
    /// Delivered messages per second.
    pub throughput: f64,
    /// Send-to-delivery latency.
    pub latency: Latency,
    /// Per server (spawned clusters): before and after connecting the clients.
    pub server_usage: Vec<(Usage, Usage)>,
    /// CPU seconds each process spent while messages flowed: the spawned servers and balancer
    /// (when spawned), and this tool.
    pub cpu: Vec<(String, f64)>,
    /// Context switches each process made meanwhile (the same processes as `cpu`), counted
    /// from the start to the last delivery, before any connection closes (a thread that ends
    /// takes its count with it): a thread that goes to sleep and is woken, or is preempted.
    /// Where a message is handed from thread to thread, each hand-off is a wake-up.
    pub switches: Vec<(String, u64)>,
    /// The run stretch by stretch (`--every`): does the tail grow, or come in bursts?
    pub periods: Vec<Period>,
}

/// One stretch of a run (`--every`): the messages first delivered in it, and the CPU seconds
/// each process spent in it (spawned clusters and this tool; empty otherwise).
#[derive(Debug, Clone, Default)]
pub struct Period {
    /// Seconds since the first message where the stretch starts.
    pub from_secs: f64,
    /// And where it ends.
    pub to_secs: f64,
    /// Deliveries in it.
    pub delivered: u64,
    /// Their latency.
    pub latency: Latency,
    /// CPU seconds per process.
    pub cpu: Vec<(String, f64)>,
}

impl Report {
    /// What made the run unclean, for one line of text.
    pub fn problems(&self) -> String {
        let mut said = Vec::new();
        for (n, what) in [
            (self.lost, "lost"),
            (self.duplicated, "duplicated"),
            (self.errors, "errors"),
            (self.connect_failed as u64, "clients could not connect"),
        ] {
            if n > 0 {
                said.push(format!("{n} {what}"));
            }
        }
        if let Some(e) = self.first_error.as_ref().or(self.connect_error.as_ref()) {
            said.push(format!("first error: {e}"));
        }
        if self.kill_missed {
            said.push(
                "the run ended before --kill-server's (or --stop-server's) time: no failover \
                 was tested"
                    .into(),
            );
        }
        said.join("; ")
    }

    /// True when every client connected and nothing was lost, duplicated or refused.
    pub fn clean(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.errors == 0
            && self.connect_failed == 0
            && !self.kill_missed
    }
}

/// Runs the benchmark.
pub fn run(config: &Config) -> Result<Report> {
    check(config)?;
    if let Target::Rival(rival, program) = &config.target {
        return rival::run(config, *rival, program.as_deref());
    }
    let max_clients = config.clients.max(10_000).to_string();
    let cpus = config.server_cpus.as_ref().map(|c| c.to_string());
    let mut server_args = vec!["--max-clients", &max_clients];
    if let Some(cpus) = &cpus {
        server_args.extend(["--cpus", cpus]);
    }
    let cluster = match &config.target {
        Target::Spawn(n) => Some(LocalCluster::start(
            *n,
            config.scrypt_log_n,
            "round-robin",
            &server_args,
            !config.plaintext,
            config.db.as_deref(),
        )?),
        Target::Balancer(_) | Target::Rival(..) => None,
    };
    let balancer = match (&config.target, &cluster) {
        (_, Some(c)) => c.balancer.clone(),
        (Target::Balancer(b), None) => b.clone(),
        (Target::Spawn(_) | Target::Rival(..), None) => unreachable!("spawned or run above"),
    };
    let transport = match (&cluster, &config.ca) {
        _ if config.plaintext => Transport::plaintext(),
        (Some(c), _) => c.transport()?,
        (None, Some(ca)) => Transport::client_with_ca(ca)?,
        (None, None) => {
            return Err(Error::Invalid(
                "give the cluster's CA file with --ca (or --insecure-plaintext)".into(),
            ))
        }
    };
    let servers = BalancerClient::connect(&balancer, &transport)?
        .servers()?
        .len();
    let usage_before = sample(cluster.as_ref());

    let run_id = crypto::to_hex(&crypto::random_bytes(3)?);
    let users: Vec<User> = (0..config.clients)
        .map(|i| {
            let identity = Identity::generate()?;
            Ok(User {
                name: format!("b{run_id}-{i}"),
                public: identity.public()?,
                identity: Arc::new(identity),
            })
        })
        .collect::<Result<_>>()?;
    let started = Instant::now();
    let outcomes = connect_all(&balancer, &transport, &users);
    let connect_secs = started.elapsed().as_secs_f64();
    let (users, links, failed) = connected(config, users, outcomes)?;

    let mut report = Report {
        mode: config.mode.to_string(),
        pattern: config.pattern.to_string(),
        opaque: config.opaque,
        tls: !config.plaintext,
        clients: config.clients,
        messages: config.messages,
        size: config.size,
        window: config.window,
        threads: drivers(config),
        group_size: config.group_size,
        rate: config.rate,
        servers,
        server_cpus: cluster
            .as_ref()
            .and_then(|c| c.servers.first())
            .and_then(|s| launch::cpus(s.pid())),
        connect_secs,
        connect_failed: failed.len(),
        connect_error: failed.into_iter().next().map(|e| e.to_string()),
        ..Report::default()
    };
    if config.mode == Mode::Idle {
        std::thread::sleep(config.hold.min(Duration::from_secs(1)));
        let after = sample(cluster.as_ref());
        report.server_usage = usage_before.into_iter().zip(after).collect();
        std::thread::sleep(config.hold.saturating_sub(Duration::from_secs(1)));
        for l in &links {
            l.chan.stream().shutdown();
        }
        return Ok(report);
    }
    let plan = Plan::make(config, &users, links)?;
    let processes = processes(cluster.as_ref());
    let cpu_before = cpu_sample(&processes);
    let fault = match (config.kill_server, config.stop_server, &cluster) {
        (Some(after), _, Some(_)) => Some((after, Fault::Kill)),
        (None, Some(after), Some(c)) => Some((
            after,
            Fault::Stop {
                db: c.db.clone(),
                resume: config.resume_server,
            },
        )),
        _ => None,
    };
    let victim = fault.and_then(|(after, fault)| {
        let c = cluster.as_ref()?;
        let pid = c.servers.first()?.pid();
        Some(Victim { after, pid, fault })
    });
    plan.run(
        config,
        &balancer,
        &transport,
        victim,
        &processes,
        &mut report,
    )?;
    report.cpu = cpu_spent(&cpu_before, &cpu_sample(&processes));
    drop(cluster);
    Ok(report)
}

/// Checks a configuration before anything starts (the binary reports a failure as a usage
/// error).
pub fn check(config: &Config) -> Result<()> {
    let bad = |m: &str| Err(Error::Invalid(m.to_string()));
    if config.clients == 0 {
        return bad("--clients must be at least 1");
    }
    if config.mode == Mode::Direct && config.clients < 2 {
        return bad("direct mode needs at least 2 clients");
    }
    if config.window == 0 {
        return bad("--window must be at least 1");
    }
    if config.threads == Some(0) {
        return bad("--threads must be at least 1");
    }
    if config.mode == Mode::Group {
        if config.group_size < 2 {
            return bad("--group-size must be at least 2");
        }
        if !config.clients.is_multiple_of(config.group_size) {
            return bad("--clients must be a multiple of --group-size");
        }
    }
    if config.size > crate::net::MAX_BODY - 200 {
        return bad("--size is over the largest message");
    }
    if let Target::Rival(rival, _) = &config.target {
        if config.size > rival.max_size() {
            return Err(Error::Invalid(format!(
                "--size is over what {rival} carries in a message ({} bytes)",
                rival.max_size()
            )));
        }
    }
    if let Some(r) = config.rate {
        if !(r > 0.0 && r.is_finite()) {
            return bad("--rate must be a positive number of messages per second");
        }
    }
    Ok(())
}
